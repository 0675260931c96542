"""``OpenAICompatible``: a ``ChatBackend`` for any ``/v1/chat/completions`` server.

Works with vLLM, SGLang, DeepSeek, OpenAI and anything else speaking that protocol. Contract:
  * ``chat(conversations, params)`` returns one ``Completion`` per conversation, in input order.
  * At most ``max_concurrency`` requests are in flight at once per backend instance, also when
    several threads call ``chat`` at the same time (a shared semaphore guards every request).
  * Each request has a timeout and is retried with exponential back-off by
    ``expint_jax.llm.http`` (5xx, 429, time-outs, truncated or non-JSON bodies).
  * A request that fails for good, or whose answer lacks ``choices[0].message``, becomes
    ``Completion(text="", finish_reason="error", error=...)`` for that conversation only.
  * The API key is read from a named environment variable and only ever placed in the
    ``Authorization`` header: it is passed as a secret to the HTTP helpers (so it is redacted
    from their errors and logs) and never appears in ``repr``, errors or log lines.

``SamplingParams`` mapping: ``temperature``, ``top_p``, ``max_tokens``, ``stop`` (when non-empty),
``seed`` (when set), ``presence_penalty`` and ``frequency_penalty`` (when non-zero; the OpenAI
API's own fields, which vLLM and SGLang implement with the same definition). ``top_k`` is not part of the OpenAI API; it is sent only when > 0, which
vLLM and SGLang accept and the OpenAI service rejects. With ``logprobs=True`` the request asks
for per-token log-probabilities and ``Completion.logprobs`` carries them when the server returns
them.

Teacher signal (``SamplingParams.top_logprobs = k > 0``): the request asks for ``logprobs`` with
``top_logprobs: k`` and ``return_tokens_as_token_ids: true`` (vLLM's extension, which names every
token ``"token_id:<id>"``: alignment with the distillation views needs ids, not strings), and
``Completion.top_logprobs`` is built from ``choices[0].logprobs.content``: per generated token its
id, the server's top entries (sorted, duplicates dropped, the first k kept; fewer when the server
caps them, e.g. vLLM's ``--max-logprobs``, default 20) and the tail mass ``1 - Σ top`` (clamped at
1e-12; an HTTP server reports no tail, so a tiny one is only as precise as the reported top). No
distribution after the last token is reported, so a turn whose stored ``<|im_end|>`` follows a stop
string gets no signal there. The server must report the model's unmodified distribution (vLLM V1:
``--logprobs-mode raw_logprobs``, its default). A reply whose tokens are not ids, or whose entries
are malformed, has ``top_logprobs=None`` (a warning says why).

Thinking (Qwen3's hybrid models behind vLLM or SGLang): ``enable_thinking=False`` sends
``chat_template_kwargs: {"enable_thinking": false}``, which both servers pass to the chat template
(it then opens the generation prompt with an empty think block, as ``ChatFormat`` does with
``enable_thinking=False``; the server's template renders earlier assistant turns without the block,
which ``ChatFormat`` keeps); ``None`` (the default) sends nothing, for servers without templates.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from expint_jax.records import Completion, Message, SamplingParams
from expint_jax.llm.http import HttpError, RetryPolicy, post_json, redact
from expint_jax.llm.base import BackendError, SamplingSpec, per_conversation
from expint_jax.token_signal import TopLogprobs

log = logging.getLogger(__name__)

_FINISH_REASONS = {"stop": "stop", "eos": "stop", "tool_calls": "stop", "function_call": "stop",
                   "length": "length"}


class MalformedResponse(ValueError):
    """A 2xx answer whose JSON does not have the shape of a chat completion."""


class OpenAICompatible:
    """Batched chat completions over HTTP; see the module docstring for the contract."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str | None = None,
        max_concurrency: int = 8,
        retry: RetryPolicy = RetryPolicy(),
        logprobs: bool = False,
        extra_body: Mapping[str, Any] | None = None,
        enable_thinking: bool | None = None,
    ):
        if not base_url.startswith(("http://", "https://")):
            raise BackendError(f"OpenAICompatible: base_url must start with http:// or https://, got {base_url!r}")
        if not model:
            raise BackendError("OpenAICompatible: model must be a non-empty string")
        if max_concurrency < 1:
            raise BackendError(f"OpenAICompatible: max_concurrency must be >= 1, got {max_concurrency}")
        api_key = ""
        if api_key_env is not None:
            api_key = os.environ.get(api_key_env, "")
            if not api_key:
                raise BackendError(f"OpenAICompatible: environment variable {api_key_env} is not set or empty")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self.max_concurrency = max_concurrency
        self.retry = retry
        self.logprobs = logprobs
        self.extra_body = dict(extra_body or {})
        if enable_thinking is not None:  # merged into any chat_template_kwargs extra_body already has
            self.extra_body["chat_template_kwargs"] = {**self.extra_body.get("chat_template_kwargs", {}),
                                                       "enable_thinking": enable_thinking}
        self._api_key = api_key
        self._slots = threading.BoundedSemaphore(max_concurrency)

    @property
    def url(self) -> str:
        # Accept base URLs given with or without the conventional /v1 suffix.
        root = self.base_url if self.base_url.endswith("/v1") else self.base_url + "/v1"
        return root + "/chat/completions"

    def __repr__(self) -> str:
        return (f"OpenAICompatible(base_url={self.base_url!r}, model={self.model!r}, "
                f"api_key_env={self.api_key_env!r}, max_concurrency={self.max_concurrency})")

    def chat(self, conversations: Sequence[Sequence[Message]], params: SamplingSpec) -> list[Completion]:
        if not conversations:
            return []
        each = per_conversation(params, len(conversations))
        payloads = [self._payload(messages, p) for messages, p in zip(conversations, each)]
        workers = min(self.max_concurrency, len(payloads))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="openai-chat") as pool:
            return list(pool.map(self._complete, payloads, each))

    def _payload(self, messages: Sequence[Message], params: SamplingParams) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.model,
            "messages": [m.to_json() for m in messages],
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_tokens,
        }
        if params.stop:
            payload["stop"] = list(params.stop)
        if params.seed is not None:
            payload["seed"] = params.seed
        if params.top_k > 0:
            payload["top_k"] = params.top_k
        if params.presence_penalty:
            payload["presence_penalty"] = params.presence_penalty
        if params.frequency_penalty:
            payload["frequency_penalty"] = params.frequency_penalty
        if self.logprobs or params.top_logprobs:
            payload["logprobs"] = True
        if params.top_logprobs:
            payload["top_logprobs"] = params.top_logprobs
            payload["return_tokens_as_token_ids"] = True
        payload.update(self.extra_body)
        return payload

    def _complete(self, payload: Mapping[str, Any], params: SamplingParams) -> Completion:
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        secrets = (self._api_key,) if self._api_key else ()
        try:
            with self._slots:
                body = post_json(self.url, payload, headers=headers, policy=self.retry, secrets=secrets)
            return _parse_completion(body, params)
        except (HttpError, MalformedResponse) as e:
            message = redact(f"{type(e).__name__}: {e}", secrets)
        except Exception as e:  # noqa: BLE001 - the protocol forbids raising for one failed request
            message = redact(f"unexpected {type(e).__name__} from {self.url}: {e}", secrets)
            log.warning("chat request failed unexpectedly: %s", message)
        return Completion(text="", finish_reason="error", error=message)


def _parse_completion(body: Any, params: SamplingParams) -> Completion:
    if not isinstance(body, Mapping):
        raise MalformedResponse(f"expected a JSON object, got {type(body).__name__}")
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices:
        detail = body.get("error") if "error" in body else "missing or empty 'choices'"
        raise MalformedResponse(f"no completion in response: {str(detail)[:300]}")
    choice = choices[0]
    message = choice.get("message") if isinstance(choice, Mapping) else None
    if not isinstance(message, Mapping):
        raise MalformedResponse("choices[0].message is missing or not an object")
    text = message.get("content")
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise MalformedResponse(f"choices[0].message.content is {type(text).__name__}, expected a string")
    finish = _FINISH_REASONS.get(choice.get("finish_reason") or "stop", "stop")
    # vLLM and SGLang report which stop string ended the text in "stop_reason" (an int = a stop token).
    stop_reason = choice.get("stop_reason")
    stop_string = stop_reason if isinstance(stop_reason, str) and stop_reason in params.stop else None
    top = _top_logprobs(choice, params.top_logprobs) if params.top_logprobs else None
    return Completion(text=text, finish_reason=finish, logprobs=_logprobs(choice), stop_string=stop_string,
                      top_logprobs=top)


def _logprobs(choice: Mapping[str, Any]) -> tuple[float, ...] | None:
    logprobs = choice.get("logprobs")
    content = logprobs.get("content") if isinstance(logprobs, Mapping) else None
    if not isinstance(content, list):
        return None
    values = [entry.get("logprob") for entry in content if isinstance(entry, Mapping)]
    if len(values) != len(content) or not all(isinstance(v, (int, float)) for v in values):
        return None
    return tuple(float(v) for v in values)


_TOKEN_ID_PREFIX = "token_id:"
_MIN_TAIL = 1e-12


def _token_id(entry: Any) -> int:
    token = entry.get("token") if isinstance(entry, Mapping) else None
    if not (isinstance(token, str) and token.startswith(_TOKEN_ID_PREFIX)):
        raise ValueError(f"token {token!r} is not an id (the server ignored return_tokens_as_token_ids)")
    return int(token[len(_TOKEN_ID_PREFIX):])


def _top_logprobs(choice: Mapping[str, Any], k: int) -> TopLogprobs | None:
    """The teacher signal of ``choice`` (module docstring); None when the server gave no usable one."""
    logprobs = choice.get("logprobs")
    content = logprobs.get("content") if isinstance(logprobs, Mapping) else None
    if not isinstance(content, list):
        log.warning("top_logprobs requested but the reply has no logprobs.content")
        return None
    try:
        ids, rows = [], []
        for entry in content:
            ids.append(_token_id(entry))
            best: dict[int, float] = {}
            for alternative in entry.get("top_logprobs") or ():
                value = float(alternative["logprob"])
                token = _token_id(alternative)
                if math.isfinite(value) and value > best.get(token, -math.inf):
                    best[token] = value
            rows.append(sorted(best.items(), key=lambda item: -item[1])[:k])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        log.warning("top_logprobs requested but the reply's are unusable: %s", e)
        return None
    width = min((len(r) for r in rows), default=k)
    if width == 0 and rows:
        log.warning("top_logprobs requested but the reply lists no alternatives")
        return None
    top_ids = np.asarray([[t for t, _ in r[:width]] for r in rows], np.int32).reshape(len(rows), width)
    top = np.asarray([[v for _, v in r[:width]] for r in rows], np.float64).reshape(len(rows), width)
    mass = np.exp(top).sum(axis=1) if width else np.zeros(len(rows))
    tail = np.log(np.maximum(1.0 - mass, _MIN_TAIL))
    return TopLogprobs(np.asarray(ids, np.int32), top_ids, top.astype(np.float32), tail.astype(np.float32))
