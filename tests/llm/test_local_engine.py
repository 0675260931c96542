"""LocalEngine: chat completions from a local checkpoint with the offline Qwen3 tokenizer.

The checkpoint is a tiny random Qwen3 with the real vocabulary, saved with the tokenizer files so
that ``from_checkpoint`` loads both. Conversations are sized so that most calls share one padded
shape (and one compilation).
"""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from expint_jax.models.hf import load_checkpoint
from expint_jax.models.tokenizer import load_tokenizer, save_tokenizer
from expint_jax.parallel.mesh import MeshConfig, make_mesh
from expint_jax.records import Message, SamplingParams
from expint_jax.llm.base import BackendError, ChatBackend
from expint_jax.llm.local import LocalEngine
from expint_jax.llm.sampler import Greedy, decode, generate
from tests.models.hf_fixtures import make_checkpoint

GREEDY = SamplingParams(temperature=0.0, max_tokens=8)
SAMPLED = SamplingParams(temperature=0.9, top_k=40, max_tokens=8, seed=3)


def _conversation(question: str) -> list[Message]:
    return [Message("system", "You are a careful web agent."), Message("user", question)]


CONVERSATIONS = [
    _conversation("Which river flows through Lyon?"),
    _conversation("Name the tallest mountain in Europe, please."),
    _conversation("Who wrote Les Misérables?"),
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qwen3")
    make_checkpoint(directory, vocab_size=151936, max_position_embeddings=4096)
    save_tokenizer(load_tokenizer(None), directory)
    return directory


@pytest.fixture(scope="module")
def engine(checkpoint):
    return LocalEngine.from_checkpoint(checkpoint, max_batch_size=2)


def test_chat_equals_direct_generation_on_the_encoded_prompts(engine):
    assert isinstance(engine, ChatBackend)
    completions = engine.chat(CONVERSATIONS, GREEDY)
    chat_format = engine.chat_format
    prompts = [chat_format.encode_prompt(c) for c in CONVERSATIONS]
    graphdef, state = nnx.split(engine.model)
    direct = [  # one prompt at a time, in the engine's batch shape
        generate(graphdef, state, [prompt], strategy=Greedy(), max_new_tokens=8, eos_ids=chat_format.eos_ids,
                 batch_size=2, pad_id=chat_format.pad_id)[0]
        for prompt in prompts
    ]
    for completion, expected in zip(completions, direct):
        assert completion.token_ids == expected.token_ids
        assert completion.logprobs == pytest.approx(expected.logprobs, abs=1e-5)
        assert completion.text == chat_format.tokenizer.decode(list(expected.token_ids))
        assert completion.finish_reason == ("length" if expected.finish_reason == "length" else "stop")
        assert completion.error is None


def test_stop_strings_cut_chat_text(engine):
    free = engine.chat(CONVERSATIONS[:1], GREEDY)[0].text
    start = next(i for i in range(2, len(free) - 2) if "\ufffd" not in free[i:i + 2] and free.find(free[i:i + 2]) == i)
    stop = free[start:start + 2]
    completion = engine.chat(CONVERSATIONS[:1], SamplingParams(temperature=0.0, max_tokens=8, stop=("\x00", stop)))[0]
    assert completion.finish_reason == "stop" and completion.stop_string == stop
    assert completion.text == free[:start]


def test_top_logprobs_cover_every_generated_token_and_the_position_after(engine):
    free = engine.chat(CONVERSATIONS[:1], GREEDY)[0].text
    start = next(i for i in range(2, len(free) - 2) if "\ufffd" not in free[i:i + 2] and free.find(free[i:i + 2]) == i)
    params = SamplingParams(temperature=0.0, max_tokens=8, stop=(free[start:start + 2],))
    plain, recorded = engine.chat(CONVERSATIONS[:1], params)[0], engine.chat(CONVERSATIONS[:1],
                                                                              dataclasses.replace(params, top_logprobs=4))[0]
    assert plain.top_logprobs is None and recorded.stop_string == plain.stop_string is not None
    assert (recorded.text, recorded.token_ids, recorded.logprobs) == (plain.text, plain.token_ids, plain.logprobs)
    signal = recorded.top_logprobs
    kept = len(recorded.token_ids)
    assert tuple(signal.token_ids[:kept]) == recorded.token_ids and len(signal.token_ids) > kept  # the stop's tokens
    assert signal.num_positions == len(signal.token_ids) + 1 and signal.k == 4
    # Greedy writes the most likely token: the first of the top 4, with the completion's log-prob.
    np.testing.assert_array_equal(signal.top_ids[:len(signal.token_ids), 0], signal.token_ids)
    np.testing.assert_allclose(signal.top_logprobs[:kept, 0], recorded.logprobs, atol=1e-5)
    assert np.all(np.diff(signal.top_logprobs, axis=1) <= 0) and np.all(signal.tail_logmass < 0)


def _engine_like(engine: LocalEngine, **kwargs) -> LocalEngine:
    return LocalEngine(engine.model, engine.chat_format.tokenizer, **kwargs)


def test_results_do_not_depend_on_micro_batching(engine):
    one_batch = _engine_like(engine, max_batch_size=4).chat(CONVERSATIONS, SAMPLED)
    micro_batched = engine.chat(CONVERSATIONS, SAMPLED)
    assert [c.token_ids for c in micro_batched] == [c.token_ids for c in one_batch]
    assert [c.text for c in micro_batched] == [c.text for c in one_batch]
    _same_completions(engine.chat(CONVERSATIONS, SAMPLED), micro_batched)
    other_seed = engine.chat(CONVERSATIONS, SamplingParams(temperature=0.9, top_k=40, max_tokens=8, seed=4))
    assert [c.token_ids for c in other_seed] != [c.token_ids for c in micro_batched]


def test_per_conversation_params_own_seeds_decide_wherever_the_conversation_sits(engine):
    each = [dataclasses.replace(SAMPLED, seed=s) for s in (11, 12, 13)]
    each[1] = dataclasses.replace(GREEDY, seed=12)  # a different strategy in the same call
    completions = engine.chat(CONVERSATIONS, each)
    order = [2, 0, 1]
    shuffled = engine.chat([CONVERSATIONS[i] for i in order], [each[i] for i in order])
    _same_completions([shuffled[order.index(i)] for i in range(3)], completions)
    _same_completions(engine.chat(CONVERSATIONS[1:2], GREEDY), completions[1:2])
    with pytest.raises(ValueError, match="2 SamplingParams for 3 conversations"):
        engine.chat(CONVERSATIONS, each[:2])


def test_context_overflow_is_a_length_completion_not_a_crash(engine):
    engine = _engine_like(engine, max_batch_size=2, max_context=30)
    short = _conversation("Hi?")
    long = _conversation("Tell me everything about " + "the history of Lyon and " * 10)
    assert len(engine.chat_format.encode_prompt(short)) > 30 - 16
    broken = [Message("user", "x"), {"role": "user"}]
    completions = engine.chat([short, long, broken], SamplingParams(temperature=0.0, max_tokens=16))
    room = 30 - len(engine.chat_format.encode_prompt(short))
    assert len(completions[0].token_ids) <= room and completions[0].error is None
    assert completions[1].finish_reason == "length" and completions[1].text == ""
    assert "leaves no room in the context of 30 tokens" in completions[1].error
    assert completions[2].finish_reason == "error" and "conversation 2" in completions[2].error


def test_set_params_swaps_weights_without_recompiling(engine):
    before = engine.chat(CONVERSATIONS[:2], GREEDY)
    compiled = decode._cache_size()
    original = engine.state
    engine.set_params(jax.tree.map(lambda x: x * 1.5, original))
    after = engine.chat(CONVERSATIONS[:2], GREEDY)
    assert decode._cache_size() == compiled
    assert [c.token_ids for c in after] != [c.token_ids for c in before]
    engine.set_params(original)
    _same_completions(engine.chat(CONVERSATIONS[:2], GREEDY), before)
    wrong = jax.tree.map(lambda x: x, original)
    wrong["final_norm"].set_value(np.ones(3, np.float32))
    with pytest.raises(ValueError, match=r"final_norm.* is float32\[3\], expected float32\[64\]"):
        engine.set_params(wrong)


def test_sharded_engine_equals_single_device(checkpoint, engine):
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharded = LocalEngine(load_checkpoint(checkpoint, mesh=mesh), engine.chat_format.tokenizer, mesh=mesh,
                          max_batch_size=4)
    assert sharded._batch_size(3) == 4 and sharded._batch_size(1) == 4
    completions = sharded.chat(CONVERSATIONS, SAMPLED)
    assert [c.token_ids for c in completions] == [c.token_ids for c in engine.chat(CONVERSATIONS, SAMPLED)]
    again = _second_turns(CONVERSATIONS, completions)  # reuses the first call's keys and values, sharded
    reused = sharded.counters.reused_tokens
    assert [c.token_ids for c in sharded.chat(again, SAMPLED)] == [c.token_ids for c in engine.chat(again, SAMPLED)]
    assert sharded.counters.reused_tokens > reused


def _same_completions(got, want):
    """Equal but for the last bits of the log-probabilities (a different batch shape sums differently)."""
    assert [dataclasses.replace(c, logprobs=None) for c in got] == [dataclasses.replace(c, logprobs=None) for c in want]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-5, rtol=0)


def _second_turns(first_turns, replies):
    return [[*conversation, Message("assistant", reply.text or "..."),
             Message("user", "<tool_response>\nLyon lies on the Rhone and the Saone.\n</tool_response>")]
            for conversation, reply in zip(first_turns, replies)]


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_completions_do_not_depend_on_the_prefix_cache(engine, params):
    cached = _engine_like(engine, max_batch_size=2)
    uncached = _engine_like(engine, max_batch_size=2, prefix_cache_mib=0)
    assert uncached.prefix_cache is None and cached.prefix_cache is not None
    first = cached.chat(CONVERSATIONS, params)
    _same_completions(first, uncached.chat(CONVERSATIONS, params))
    # Turn 2 extends each conversation; a step-wise block in turn 1's last message is gone by then.
    blocked = [[*c[:-1], Message("user", c[-1].content + "\n\nExperience: open the source.")] for c in CONVERSATIONS]
    again = _second_turns(CONVERSATIONS, first) + _second_turns(blocked, cached.chat(blocked, params))
    uncached.chat(blocked, params)
    _same_completions(cached.chat(again, params), uncached.chat(again, params))
    counters = cached.counters
    assert 0 < counters.reused_tokens < counters.prompt_tokens and uncached.counters.reused_tokens == 0
    assert counters.prompt_tokens == uncached.counters.prompt_tokens
    assert counters.prefill_slots < uncached.counters.prefill_slots


def test_set_params_empties_the_prefix_cache(engine):
    cached = _engine_like(engine)
    cached.chat(CONVERSATIONS[:1], GREEDY)
    assert len(cached.prefix_cache) == 1
    cached.set_params(cached.state)
    assert len(cached.prefix_cache) == 0


def test_micro_batches_of_a_stage_share_one_row_count_and_compiled_programs(engine):
    wide = _engine_like(engine, max_batch_size=8)
    assert [wide._batch_size(n) for n in (1, 3, 8, 9, 30)] == [1, 4, 8, 8, 8]
    uncached = _engine_like(engine, max_batch_size=2, prefix_cache_mib=0)
    uncached.chat(CONVERSATIONS, GREEDY)  # micro-batches of 2 rows, the last one padded
    compiled = uncached.compile_counts()
    others = [_conversation(q) for q in ("Which river flows through Paris?", "Who painted the Mona Lisa?",
                                         "Name a city on the Loire.", "Where is Mont Blanc?", "Who wrote Candide?")]
    uncached.chat(others, GREEDY)  # other prompts, lengths and count, the same widths and rows
    assert uncached.compile_counts() == compiled


def test_bad_configuration_is_a_backend_error(engine):
    with pytest.raises(BackendError, match="max_batch_size must be >= 1"):
        _engine_like(engine, max_batch_size=0)
    with pytest.raises(BackendError, match="max_context must be >= 2"):
        _engine_like(engine, max_context=1)
    with pytest.raises(BackendError, match="prefix_cache_mib must be >= 0"):
        _engine_like(engine, prefix_cache_mib=-1)


def test_thinking_off_generates_after_the_empty_think_block(engine):
    """Qwen3's thinking-off prompt (models.chat): the block ends the prompt and counts in the
    context budget; the completion is what follows it."""
    off = engine.with_thinking(False)
    assert off.state is engine.state and engine.with_thinking(True) is engine and engine.chat_format.enable_thinking
    assert LocalEngine(engine.model, engine.chat_format.tokenizer, enable_thinking=False).chat_format.render(
        CONVERSATIONS[0], add_generation_prompt=True) == off.chat_format.render(CONVERSATIONS[0], add_generation_prompt=True)
    conversation = CONVERSATIONS[0]
    prompt = off.chat_format.encode_prompt(conversation)
    assert off.chat_format.tokenizer.decode(prompt[-7:]) == "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert off.count_tokens(conversation) == len(prompt) == engine.count_tokens(conversation) + 4
    (completion,) = off.chat([conversation], GREEDY)
    graphdef, state = nnx.split(off.model)
    (expected,) = generate(graphdef, state, [prompt], strategy=Greedy(), max_new_tokens=8,
                           eos_ids=off.chat_format.eos_ids, batch_size=2, pad_id=off.chat_format.pad_id)
    assert completion.token_ids == expected.token_ids


def test_engines_sharing_a_prefix_cache_never_mix_their_weights(engine):
    off = _engine_like(engine).with_thinking(False)
    on = off.with_thinking(True)  # a copy: the same prefix cache object
    assert on.prefix_cache is off.prefix_cache
    on.chat(CONVERSATIONS[:1], GREEDY)
    on.set_params(jax.tree.map(lambda x: x * 1.5, on.state))  # `off` keeps the old weights
    off.chat(CONVERSATIONS[:1], GREEDY)  # stores keys of the old weights ...
    reused = on.counters.reused_tokens
    _same_completions(on.chat(CONVERSATIONS[:1], GREEDY), _engine_like(on, prefix_cache_mib=0).chat(
        CONVERSATIONS[:1], GREEDY))  # ... which `on` must not reuse
    assert on.counters.reused_tokens == reused
