"""OpenAI-protocol scripting on top of ``tests.fakes.http_server``.

``completion_body(text)`` wraps text into a ``/v1/chat/completions`` JSON body;
``ChatScript`` is a handler that answers by the content of the conversation: each rule is a
substring looked up in the request's messages and a responder (a text, a ``Reply``, or a function
of the request's messages returning either). Rules are tried in order; hits are counted per rule
so tests can assert how many LLM calls each stage made.

    script = ChatScript([("Summarize", "a summary"), ("<Experiences>", lambda msgs: "...")])
    with ScriptedServer(script) as server: ...
    assert script.hits["Summarize"] == 4
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Union

from tests.fakes.http_server import Reply, Request

Responder = Union[str, Reply, Callable[[list[dict[str, Any]]], Union[str, Reply]]]


def completion_body(text: str | None, *, finish_reason: str = "stop", logprobs: Sequence[float] | None = None,
                    stop_reason: str | int | None = None) -> dict[str, Any]:
    choice: dict[str, Any] = {
        "index": 0,
        "message": {"role": "assistant", "content": text},
        "finish_reason": finish_reason,
    }
    if stop_reason is not None:
        choice["stop_reason"] = stop_reason
    if logprobs is not None:
        choice["logprobs"] = {"content": [{"token": f"t{i}", "logprob": lp} for i, lp in enumerate(logprobs)]}
    return {"id": "chatcmpl-fake", "object": "chat.completion", "model": "fake", "choices": [choice]}


def chat_reply(text: str | None, **kwargs: Any) -> Reply:
    return Reply(json_body=completion_body(text, **kwargs))


def request_messages(request: Request) -> list[dict[str, Any]]:
    body = request.json or {}
    return list(body.get("messages") or [])


def conversation_text(messages: Sequence[dict[str, Any]]) -> str:
    return "\n".join(str(m.get("content") or "") for m in messages)


class ChatScript:
    """A request handler routing by conversation content; unmatched requests get ``default``."""

    def __init__(self, rules: Sequence[tuple[str, Responder]], default: Responder | None = None):
        self.rules = list(rules)
        self.default = default if default is not None else Reply(status=400, text="no rule matched")
        self.hits: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __call__(self, request: Request) -> Reply:
        messages = request_messages(request)
        text = conversation_text(messages)
        for marker, responder in self.rules:
            if marker in text:
                with self._lock:
                    self.hits[marker] += 1
                return _reply(responder, messages)
        with self._lock:
            self.hits["<unmatched>"] += 1
        return _reply(self.default, messages)


def _reply(responder: Responder, messages: list[dict[str, Any]]) -> Reply:
    if callable(responder) and not isinstance(responder, Reply):
        responder = responder(messages)
    if isinstance(responder, Reply):
        return responder
    return chat_reply(responder)
