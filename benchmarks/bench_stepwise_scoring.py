"""Step-wise teacher scoring of one trajectory: tree-packed single pass vs one pass per turn.

Under step-wise injection every assistant turn k has its own teacher context
(``context_before_turn(trajectory, k)``: the history with turn k's experience block at the end of
the last user message). Two ways to get the teacher's distributions at every assistant token:

  * ``packed`` (ours): one forward over the tree-packed layout of ``build_example`` (the trunk
    plus one branch per turn) under ``tree_attention_mask``, hidden states gathered at the loss
    positions, only those projected to the vocabulary;
  * ``per_turn``: one forward per turn over that turn's own context + the turn, gathering that
    turn's loss positions, only those projected.

Both return log-probabilities over the vocabulary at the same tokens (equal to numerical
precision, which the distillation view tests assert), both are jitted, and both pad sequences
to multiples of ``--bucket`` (per turn: a handful of shapes) and loss positions to multiples of
``--loss-bucket``. Compilation happens in the untimed warm-up call.

The trajectory is a synthetic web-agent rollout tokenized with the real Qwen3 tokenizer:
a system prompt, a question, ``--turns`` assistant turns (a short ``<think>`` and a ``visit``
tool call; the last one answers), tool responses that are page extracts of ``--tool-words``
words, and before every turn a step-wise block of ``--items`` lessons of ``--item-words`` words.
Model: random Qwen3, hidden 512, 8 layers, 8 heads, 4 KV heads, vocab 151,936, fp32.
The description line reports the token counts of both layouts.

    python benchmarks/bench_stepwise_scoring.py --rounds 2 --repeats 3
    python benchmarks/bench_stepwise_scoring.py --tool-words 800 --items 4   # another trajectory shape
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (  # noqa: E402
    add_model_arguments, is_worker, main_side_by_side, prepare_environment, script_arguments)

WORDS = (
    "the of and to in is was for on with as by at from that this which city museum river society founded year "
    "history council library station festival archive annual report member director page section list official "
    "record record published notes census population district north south east west bridge street park hall "
    "school college club team season league award committee first second third former current original "
    "building opened closed renamed located near between during after before under about since until"
).split()
SYSTEM_PROMPT = (
    "You are a web research agent. Answer the user's question by searching the web and visiting pages. "
    "Think briefly before each action. Call exactly one tool per turn inside <tool_call></tool_call> with "
    "a JSON object holding the tool name and its arguments. Available tools: search(query) returns result "
    "titles and links; visit(url, goal) returns the parts of the page relevant to the goal. When you are "
    "sure, write the final answer inside <answer></answer> and stop."
)


def add_arguments(parser):
    parser.add_argument("--turns", type=int, default=10, help="assistant turns (the last one answers)")
    parser.add_argument("--tool-words", type=int, default=300, help="words per tool response (page extract)")
    parser.add_argument("--items", type=int, default=8, help="lessons in each step-wise block")
    parser.add_argument("--item-words", type=int, default=32)
    parser.add_argument("--bucket", type=int, default=256, help="sequence lengths are padded to multiples of this")
    parser.add_argument("--loss-bucket", type=int, default=32, help="loss positions are padded to multiples of this")
    add_model_arguments(parser)


def _words(rng, n: int) -> str:
    return " ".join(rng.choice(WORDS, size=n))


def _page_extract(rng, k: int, n: int) -> str:
    lines, written = [f"Title: Riverside archive, page {k}", f"URL: https://archive.example.org/riverside/p{k}"], 0
    while written < n:
        size = min(n - written, int(rng.integers(25, 60)))
        lines.append(_words(rng, size).capitalize() + f" ({1900 + int(rng.integers(0, 120))}).")
        written += size
    return "\n".join(lines)


def _lesson(rng, n: int) -> str:
    half = n // 2
    return f"When {_words(rng, half - 1)}, {_words(rng, n - half - 1)}."


def web_trajectory(args):
    """A ``--turns``-turn ReAct web trajectory with a step-wise block before every turn."""
    import numpy as np

    from expint_jax.experience.inject import format_experience_block
    from expint_jax.records import Message, Trajectory

    rng = np.random.default_rng(0)
    messages = [Message("system", SYSTEM_PROMPT),
                Message("user", "In which year was the Riverside Film Society founded, according to its archive?")]
    for k in range(args.turns - 1):
        call = {"name": "visit", "arguments": {"url": f"https://archive.example.org/riverside/p{k}",
                                               "goal": "founding year of the film society"}}
        messages.append(Message("assistant", f"<think>{_words(rng, 15)}</think>\n<tool_call>\n{json.dumps(call)}\n"
                                             "</tool_call>"))
        messages.append(Message("user", f"<tool_response>\n{_page_extract(rng, k, args.tool_words)}\n</tool_response>"))
    messages.append(Message("assistant", f"<think>{_words(rng, 15)}</think>\n<answer>1950</answer>"))
    blocks = tuple(format_experience_block({f"G{i}": _lesson(rng, args.item_words) for i in range(args.items)})
                   for _ in range(args.turns))
    return Trajectory(task_id="web", messages=tuple(messages), injection="stepwise", step_injections=blocks)


def per_turn_sequences(trajectory, chat):
    """Per turn k: (token ids of its own context + turn k, positions predicting turn k's tokens)."""
    import numpy as np

    from expint_jax.experience.inject import context_before_turn

    assistant = [m for m in trajectory.messages if m.role == "assistant"]
    out = []
    for k in range(trajectory.num_assistant_turns):
        own = chat.encode(context_before_turn(trajectory, k) + (assistant[k],))
        predicting = np.flatnonzero(own.loss_mask & (own.turn_index == k)) - 1
        out.append((own.token_ids.astype(np.int32), predicting.astype(np.int32)))
    return out


def _chat():
    from expint_jax.models.chat import ChatFormat
    from expint_jax.models.tokenizer import load_tokenizer

    return ChatFormat(load_tokenizer(None))


def _model(args):
    from flax import nnx

    from expint_jax.models.config import Qwen3Config
    from expint_jax.models.qwen3 import Qwen3

    config = Qwen3Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                         num_layers=args.layers, num_heads=8, num_kv_heads=4, head_dim=args.hidden // 8)
    return Qwen3(config, rngs=nnx.Rngs(0))


def _score_at(model, hidden, index):
    """Teacher log-probabilities [B, N, V] at hidden positions ``index`` [B, N]: only those are projected."""
    import jax
    import jax.numpy as jnp

    picked = jnp.take_along_axis(hidden, index[..., None], axis=1)
    return jax.nn.log_softmax(model.logits(picked), axis=-1)


def packed(args):
    import jax

    from expint_jax.distill.batch import bucket_shape, collate
    from expint_jax.distill.views import tree_attention_mask

    example, _ = layouts(args)
    batch = jax.tree.map(jax.numpy.asarray, collate([example], bucket_shape([example], 1, args.bucket, args.loss_bucket)))
    model = _model(args)

    @jax.jit
    def score(model, b):
        mask = tree_attention_mask(b.teacher_branch, b.teacher_attach, b.teacher_valid)
        hidden = model.hidden_states(b.teacher_ids, b.teacher_positions, attention_mask=mask)
        return _score_at(model, hidden, b.teacher_loss_index)

    return lambda: score(model, batch).block_until_ready()


def _pad(values, multiple: int):
    import numpy as np

    from expint_jax.distill.batch import round_up

    return np.pad(values, (0, round_up(len(values), multiple) - len(values)))[None]


def per_turn(args):
    import jax
    import jax.numpy as jnp
    import numpy as np

    calls = [(_pad(ids, args.bucket), _pad(np.ones(len(ids), np.int32), args.bucket), _pad(index, args.loss_bucket))
             for ids, index in layouts(args)[1]]
    calls = [tuple(jnp.asarray(x) for x in call) for call in calls]
    model = _model(args)

    @jax.jit
    def score(model, ids, valid, index):
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
        return _score_at(model, model.hidden_states(ids, positions, segment_ids=valid), index)

    return lambda: jax.block_until_ready([score(model, *call) for call in calls])


def layouts(args):
    """``(packed example, per-turn sequences)`` of the benchmark trajectory."""
    from expint_jax.distill.views import build_example

    trajectory, chat = web_trajectory(args), _chat()
    return build_example(trajectory, chat), per_turn_sequences(trajectory, chat)


def layout_summary(args) -> str:
    """Token counts of both layouts, for the description line."""
    from expint_jax.distill.batch import round_up

    example, turns = layouts(args)
    per_turn_tokens = sum(len(ids) for ids, _ in turns)
    per_turn_padded = sum(round_up(len(ids), args.bucket) for ids, _ in turns)
    shapes = len({round_up(len(ids), args.bucket) for ids, _ in turns})
    return (f"{args.turns} turns, {example.num_loss_tokens} scored tokens; packed layout {len(example.teacher_ids)} "
            f"tokens ({round_up(len(example.teacher_ids), args.bucket)} padded, trunk "
            f"{int((example.teacher_branch == 0).sum())}); per-turn layouts {per_turn_tokens} tokens "
            f"({per_turn_padded} padded, {shapes} shapes)")


if __name__ == "__main__":
    prepare_environment()  # before layout_summary, whose imports bring in jax
    summary = "" if is_worker() else f"\n# trajectory: {layout_summary(script_arguments(add_arguments))}"
    main_side_by_side(
        "Step-wise teacher scoring, tree-packed single pass vs one pass per turn, fp32" + summary,
        {"packed": packed, "per_turn": per_turn},
        add_arguments,
        lambda a: (layouts(a)[0].num_loss_tokens, "scored tokens"),
        reference="per_turn",
    )
