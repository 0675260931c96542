"""The copy probe: can a network copy from its context what acting on SimWeb needs?

``copy_probe(backend, config, count)`` (``expint organism probe --checkpoint DIR``) asks the network
for the first ``count`` drills (``organism.drills``) of a world it never trained on, greedily, and
counts exact replies per kind: ``link`` (open a named link: find the title, copy its URL), ``fact``
(copy a fact's value), ``repeat`` (copy link lines verbatim) and, when the config asks for them,
``search`` (open a named page out of search results). It is cheap (one batched call,
no tools) and answers the question the gate cannot separate: a network that cannot copy a URL
fails the gate with and without experience alike. It measures the bootstrap's drill phase
directly; after the later phases it measures whether the skill survived, in a format the agent
never uses, so read it as a lower bound there.

``turn_probe(backend, env, scripted_conversations(env, count))`` (``expint organism probe --layout
agent``) asks the same in the agent's own layout: the mistake-free scripted agent (no experience)
rolls out on ``env``'s first ``count`` tasks inside the real ``ReActAgent``, each conversation is
cut before every one of its turns, and the network's greedy next turn is compared with the script's. Kinds: ``search``,
``visit from search`` (the first hop: a URL copied out of search results), ``visit from page``
(a URL copied out of a page's link list), ``answer``; and ``real page``: of the visit turns, those
whose reply visits a page that exists in the world (right or not), the copying itself.

``turn_losses(model, chat, trajectories)`` (printed by ``--layout agent`` too) is the teacher-forced
view of the same turns: the network's mean loss per token of the script's turns, split by what the
token is part of (``url``, ``query``, ``answer``, ``other``), and split by the token's embedding
row: ``weak row`` for rows whose norm is below ``WEAK_ROW`` x the median over the conversations'
tokens (tokens the network rarely trained on; with tied embeddings it can hardly write them, so a
name holding one cannot be copied), ``trained row`` for the rest.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from expint_jax.experience.inject import NoInjection
from expint_jax.models.chat import ChatFormat, ToolCall, parse_tool_call
from expint_jax.organism.data import CorpusConfig
from expint_jax.organism.drills import DrillConfig, drills
from expint_jax.records import SamplingParams, Trajectory
from expint_jax.rollout.agent import AgentConfig, ReActAgent
from expint_jax.rollout.envs.simweb.env import SimWebEnv
from expint_jax.rollout.envs.simweb.measure import interleaved_tasks
from expint_jax.rollout.envs.simweb.reference_agent import ReferenceAgentConfig, ReferencePolicy

KINDS = ("link", "fact", "repeat", "search")
TURN_KINDS = ("search", "visit from search", "visit from page", "answer", "real page")
WEAK_ROW = 0.7
_PARTS = (("url", re.compile(r'"url": "([^"]*)"')), ("query", re.compile(r'"query": "([^"]*)"')),
          ("answer", re.compile(r"<answer>(.*?)</answer>", re.S)))


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    exact: dict[str, int]  # per kind (KINDS or TURN_KINDS): replies equal to the wanted one
    total: dict[str, int]
    examples: tuple[tuple[str, str], ...]  # (wanted, got) for the first few misses

    def rate(self, kind: str) -> float:
        return self.exact[kind] / self.total[kind] if self.total[kind] else float("nan")

    def to_json(self) -> dict:
        return {"exact": self.exact, "total": self.total, "examples": [list(e) for e in self.examples]}


def copy_probe(backend, config: DrillConfig, count: int = 64, max_tokens: int = 160) -> ProbeResult:
    if count < 1:
        raise ValueError(f"copy_probe: count must be >= 1, got {count}")
    probes = drills(config)[:count]
    replies = backend.chat([list(t.messages[:1]) for t in probes], SamplingParams(temperature=0.0,
                                                                                   max_tokens=max_tokens))
    exact, total = dict.fromkeys(KINDS, 0), dict.fromkeys(KINDS, 0)
    misses = []
    for drill, reply in zip(probes, replies, strict=True):
        kind, wanted, got = drill.metadata["drill"], drill.messages[1].content.strip(), reply.text.strip()
        total[kind] += 1
        exact[kind] += got == wanted
        if got != wanted and len(misses) < 3:
            misses.append((wanted, got))
    return ProbeResult(exact, total, tuple(misses))


def _tool_call(text: str) -> ToolCall | None:
    call = parse_tool_call(text)
    return call if isinstance(call, ToolCall) else None


def _turn_kind(turn: str, observation: str) -> str:
    call = _tool_call(turn)
    if call is None:
        return "answer"
    if call.name == "visit":
        return "visit from page" if "\nLinks:\n" in observation else "visit from search"
    return call.name


def scripted_conversations(env: SimWebEnv, count: int, agent: AgentConfig | None = None) -> list[Trajectory]:
    """The mistake-free scripted agent's rollouts (no experience) on ``env``'s first ``count`` tasks;
    ``agent``: the limits it runs under (default: the bootstrap's)."""
    if count < 1:
        raise ValueError(f"the agent-layout probe needs count >= 1, got {count}")
    script = ReActAgent(ReferencePolicy(ReferenceAgentConfig(think=False)), agent or CorpusConfig().agent(),
                        NoInjection())
    return script.run_batch(interleaved_tasks(env, count), env, n=1, seed=0)


def turn_probe(backend, env: SimWebEnv, trajectories: Sequence[Trajectory], max_tokens: int = 160) -> ProbeResult:
    """See the module docstring; ``trajectories``: ``scripted_conversations(env, ...)``."""
    cuts = []  # (conversation before the turn, the script's turn, its kind)
    for trajectory in trajectories:
        messages = trajectory.messages
        cuts += [(messages[:i], m.content.strip(), _turn_kind(m.content, messages[i - 1].content))
                 for i, m in enumerate(messages) if m.role == "assistant"]
    replies = backend.chat([c[0] for c in cuts], SamplingParams(temperature=0.0, max_tokens=max_tokens))
    exact, total = dict.fromkeys(TURN_KINDS, 0), dict.fromkeys(TURN_KINDS, 0)
    misses = []
    for (_, wanted, kind), reply in zip(cuts, replies, strict=True):
        got = reply.text.strip()
        total[kind] += 1
        exact[kind] += got == wanted
        if kind.startswith("visit"):
            call = _tool_call(got)
            url = call.arguments.get("url") if call is not None and call.name == "visit" else None
            total["real page"] += 1
            exact["real page"] += isinstance(url, str) and env.world.page(url) is not None
        if got != wanted and len(misses) < 3:
            misses.append((wanted, got))
    return ProbeResult(exact, total, tuple(misses))


@dataclasses.dataclass(frozen=True)
class TurnLosses:
    parts: dict[str, tuple[float, int]]  # url/query/answer/other -> (mean loss per token, tokens)
    rows: dict[str, tuple[float, int]]  # weak row/trained row -> (mean loss per token, tokens)


def turn_losses(model, chat: ChatFormat, trajectories: Sequence[Trajectory], bucket: int = 512) -> TurnLosses:
    """See the module docstring (``model``: a Qwen3 with tied embeddings, ``chat``: its format)."""
    @jax.jit
    def next_token_losses(ids, positions):  # [1, T - 1]: the loss of token i + 1 at i
        logits = model(ids, positions)[:, :-1].astype(jnp.float32)
        picked = jnp.take_along_axis(logits, ids[:, 1:, None], axis=-1)[..., 0]
        return jax.nn.logsumexp(logits, axis=-1) - picked

    norms = np.linalg.norm(np.asarray(model.embed[...], np.float32), axis=1)
    conversations = [chat.encode(t.messages) for t in trajectories]
    # The median over the tokens as they occur, not over the vocabulary (whose median row is a rare token's).
    weak = norms < WEAK_ROW * np.median(norms[np.concatenate([e.token_ids for e in conversations])])
    sums: dict[str, list[float]] = {}
    for encoded in conversations:
        ids = encoded.token_ids
        padded = np.full((1, -(-len(ids) // bucket) * bucket), chat.pad_id, np.int32)
        padded[0, :len(ids)] = ids
        losses = np.asarray(next_token_losses(padded, np.arange(padded.shape[1], dtype=np.int32)[None]))[0]
        for turn in range(int(encoded.turn_index.max()) + 1):
            where = np.nonzero((encoded.turn_index == turn) & encoded.loss_mask)[0]
            turn_ids = [int(i) for i in ids[where]]
            text = chat.tokenizer.decode(turn_ids)
            spans = [(m.start(1), m.end(1), part) for part, pattern in _PARTS for m in pattern.finditer(text)]
            for k, position in enumerate(where):
                start = len(chat.tokenizer.decode(turn_ids[:k]))
                part = next((name for a, b, name in spans if a <= start < b), "other")
                row = "weak row" if weak[ids[position]] else "trained row"
                for key in (part, row):
                    total = sums.setdefault(key, [0.0, 0])
                    total[0] += float(losses[position - 1])
                    total[1] += 1
    mean = {key: (total / n, n) for key, (total, n) in sums.items()}
    return TurnLosses({k: mean[k] for k in ("url", "query", "answer", "other") if k in mean},
                      {k: mean[k] for k in ("weak row", "trained row") if k in mean})


def format_turn_losses(losses: TurnLosses) -> str:
    def line(title: str, values: dict[str, tuple[float, int]]) -> str:
        return f"  {title}: " + ", ".join(f"{k} {loss:.3f} ({n} tokens)" for k, (loss, n) in values.items())

    rows = f"by embedding row (weak: norm < {WEAK_ROW} x median of the tokens read)"
    return "\n".join(["teacher-forced loss per token of the script's turns (nats)", line("by part", losses.parts),
                      line(rows, losses.rows)])


def format_probe(result: ProbeResult, where: str) -> str:
    lines = [f"{where}: copy probe, greedy, exact replies"]
    lines += [f"  {kind}: {result.exact[kind]}/{result.total[kind]}" for kind, n in result.total.items() if n]
    for wanted, got in result.examples:
        lines += [f"  wanted: {' '.join(wanted.split())}", f"  got:    {' '.join(got.split())}"]
    return "\n".join(lines)
