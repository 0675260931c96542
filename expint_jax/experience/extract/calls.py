"""Asking the extraction LLM many questions at once, with bounded retries and immediate persistence.

``ask_all`` sends the requests of one stage through any ``ChatBackend`` in batches of
``batch_size`` conversations (the backend runs a batch concurrently), parses each answer, and
hands every parsed answer to ``on_answer`` as soon as its batch returns, so a run killed
mid-stage loses at most the batch in flight. A failed answer is asked again, up to
``max_retries`` more times:

  * backend error or empty answer -> the same conversation is sent again;
  * unparseable answer -> the conversation plus the bad answer and a note saying what was wrong.

"Unparseable" is any exception the parser raises, not only ``ParseError``: a parser bug on some
odd answer must cost that request a retry (and its stage's fallback), never the whole run. Such
an exception is logged as a warning with its traceback, since it means a parser broke its contract.

Reasoning (``<think>`` blocks) is removed before parsing.

Requests that never produce a usable answer are returned with the last reason, for the caller's
documented fallback.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

from expint_jax.experience.extract.parsers import ParseError
from expint_jax.experience.extract.prompts import retry_instruction
from expint_jax.experience.extract.stats import RunStats
from expint_jax.models.chat import strip_think
from expint_jax.records import Message, SamplingParams
from expint_jax.llm.base import BackendError, ChatBackend

log = logging.getLogger("expint_jax.experience.extract")


@dataclasses.dataclass(frozen=True)
class Ask:
    key: str
    messages: tuple[Message, ...]


@dataclasses.dataclass(frozen=True)
class AskPolicy:
    params: SamplingParams
    max_retries: int
    batch_size: int


def ask_all(
    backend: ChatBackend,
    asks: Sequence[Ask],
    parse: Callable[[str], Any],
    on_answer: Callable[[str, Any], None],
    *,
    stage: str,
    policy: AskPolicy,
    stats: RunStats,
) -> dict[str, str]:
    """Returns ``{key: reason}`` for the asks that failed every attempt."""
    pending = [(ask, ask.messages) for ask in asks]
    reasons: dict[str, str] = {}
    for attempt in range(policy.max_retries + 1):
        retry: list[tuple[Ask, tuple[Message, ...]]] = []
        for start in range(0, len(pending), policy.batch_size):
            batch = pending[start : start + policy.batch_size]
            completions = backend.chat([messages for _, messages in batch], policy.params)
            if len(completions) != len(batch):
                raise BackendError(f"{stage}: backend returned {len(completions)} completions for {len(batch)} requests")
            stats.calls[stage] += len(batch)
            if attempt:
                stats.retries[stage] += len(batch)
            for (ask, _), completion in zip(batch, completions):
                if completion.finish_reason == "error":
                    reason, follow_up = f"backend error: {completion.error}", ask.messages
                elif not completion.text.strip():
                    reason, follow_up = "empty answer", ask.messages
                else:
                    try:
                        value = parse(strip_think(completion.text))
                    except ParseError as e:
                        reason = f"unparseable answer ({e})"
                        follow_up = (*ask.messages, Message("assistant", completion.text), retry_instruction(str(e)))
                    except Exception as e:  # noqa: BLE001 -- a parser bug; see the module docstring
                        log.warning("extraction %s: the parser raised %s on the answer for %s", stage,
                                    type(e).__name__, ask.key, exc_info=True)
                        reason = f"unparseable answer ({type(e).__name__} in the parser)"
                        follow_up = (*ask.messages, Message("assistant", completion.text),
                                     retry_instruction("it could not be parsed"))
                    else:
                        on_answer(ask.key, value)
                        continue
                stats.failures[stage] += 1
                reasons[ask.key] = reason
                log.info("extraction %s: attempt %d for %s failed: %s", stage, attempt + 1, ask.key, reason[:300])
                retry.append((ask, follow_up))
        pending = retry
        if not pending:
            break
    return {ask.key: reasons[ask.key] for ask, _ in pending}
