"""The one interface every LLM backend implements.

A backend takes a batch of conversations and returns one ``Completion`` per conversation, in
order. ``params`` is one ``SamplingParams`` for the whole batch or one per conversation (so that
the rollouts of a group can carry their own seeds and still share one batched call). It never
raises for a single failed request: that request's completion has ``finish_reason="error"`` and
an ``error`` message (with no secret in it), so one bad call does not sink a batch of agent
rollouts. A prompt too long for the backend's context is the one exception:
``finish_reason="length"`` with an ``error`` and no text, so that the agent can force an answer
instead of resending it. ``BackendError`` is for failures of the backend itself
(misconfiguration, a model that cannot load).

Optional: ``count_tokens(messages) -> int``, the exact length of the prompt the backend would
build for ``messages``; the agent measures its context budget with it when present.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeAlias, runtime_checkable

from expint_jax.records import Completion, Message, SamplingParams


SamplingSpec: TypeAlias = SamplingParams | Sequence[SamplingParams]


class BackendError(RuntimeError):
    """The backend cannot serve at all (bad configuration, missing key, unreachable model)."""


@runtime_checkable
class ChatBackend(Protocol):
    """Batched chat completion."""

    def chat(self, conversations: Sequence[Sequence[Message]], params: SamplingSpec) -> list[Completion]: ...


def per_conversation(params: SamplingSpec, count: int) -> list[SamplingParams]:
    """One ``SamplingParams`` per conversation, whichever form the caller passed."""
    if isinstance(params, SamplingParams):
        return [params] * count
    params = list(params)
    if len(params) != count:
        raise ValueError(f"{len(params)} SamplingParams for {count} conversations")
    return params


def chat_one(backend: ChatBackend, messages: Sequence[Message], params: SamplingParams) -> Completion:
    """Convenience for a single conversation."""
    return backend.chat([messages], params)[0]
