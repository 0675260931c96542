"""``python -m expint_jax.llm.serve --checkpoint DIR --port N``: an OpenAI-compatible server over ``LocalEngine``.

A small stand-in for vLLM or SGLang: it serves a (tiny) Qwen3 checkpoint with our own engine, so
the loop's server backend (``policy.backend='server'``) runs without a GPU engine, and tests talk
the real protocol to a real process. Standard library HTTP; one engine, in one worker thread.

Endpoints: ``GET /v1/models`` (lists ``--model-name``), ``GET /health``, and ``POST
/v1/chat/completions`` (not streamed). Request fields read: ``messages``, ``model`` (must be the
served name, else 404), ``temperature``, ``top_p``, ``top_k``, ``max_tokens`` (or
``max_completion_tokens``; default: the room left in the context), ``stop``, ``seed``,
``presence_penalty``, ``frequency_penalty``, ``logprobs``, ``top_logprobs`` (at most
``--max-logprobs``, 20 by default as in vLLM), ``return_tokens_as_token_ids``, ``n`` (1 only)
and ``chat_template_kwargs.enable_thinking`` (Qwen3's thinking switch, as vLLM and SGLang pass it
to the template: false opens the generation prompt with the empty think block; its other keys
are ignored); other fields are ignored. A bad request, or a prompt that leaves no room in ``--max-context``,
is answered 400 with ``{"error": {"message": ...}}``.

Semantics: each request is one ``LocalEngine`` conversation with its own ``SamplingParams``, so
its seed alone picks its random stream and its completion does not depend on the requests that
share its batch (every request waiting when the worker is free goes into one engine call).
``finish_reason`` is "stop" or "length"; ``stop_reason`` names the stop string that ended the text.

Log-probabilities, vLLM's format: ``choices[0].logprobs.content[i] = {"token", "logprob",
"top_logprobs": [{"token", "logprob"}, ...]}``; ``token`` is ``"token_id:<id>"`` with
``return_tokens_as_token_ids``, else the token's text. Values are the model's unmodified
distribution (vLLM's ``raw_logprobs``). With ``top_logprobs`` the entries cover every generated
token, the eos and stop-string tokens after the text included (as vLLM reports them), and the
``logprob`` of such a trailing token is known only when it is among the top entries (else
null); with ``logprobs`` alone they cover the tokens of the text.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import queue
import signal
import sys
import threading
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from expint_jax.records import Completion, Message, RecordError, SamplingParams, messages_from_json

log = logging.getLogger(__name__)

DEFAULT_MAX_LOGPROBS = 20  # vLLM's default --max-logprobs


class BadRequest(ValueError):
    """A request the server answers with HTTP 400 (``status`` 404 for an unknown model)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    messages: tuple[Message, ...]
    params: SamplingParams
    logprobs: bool
    token_ids: bool  # name tokens "token_id:<id>"
    enable_thinking: bool = True  # chat_template_kwargs.enable_thinking


def parse_request(body: Any, *, model_name: str, max_context: int, max_logprobs: int) -> ChatRequest:
    """The request's conversation and sampling; ``BadRequest`` says what is wrong."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    if body.get("model", model_name) != model_name:
        raise BadRequest(f"The model `{body.get('model')}` does not exist; this server serves `{model_name}`", 404)
    if body.get("stream"):
        raise BadRequest("stream=true is not supported by this server")
    if body.get("n", 1) != 1:
        raise BadRequest(f"n={body.get('n')!r}: this server returns one choice per request")
    try:
        messages = messages_from_json(body.get("messages") or (), "messages")
    except RecordError as e:
        raise BadRequest(str(e)) from None
    if not messages:
        raise BadRequest("messages must be a non-empty list")
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    top_logprobs = int(body.get("top_logprobs") or 0)
    if top_logprobs > max_logprobs:
        raise BadRequest(f"top_logprobs={top_logprobs} exceeds this server's --max-logprobs {max_logprobs}")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens")) or max_context
    try:
        params = SamplingParams(
            temperature=float(body.get("temperature", 1.0)), top_p=float(body.get("top_p", 1.0)),
            top_k=max(int(body.get("top_k") or 0), 0), max_tokens=int(max_tokens), stop=stop,
            seed=None if body.get("seed") is None else int(body["seed"]),
            presence_penalty=float(body.get("presence_penalty") or 0.0),
            frequency_penalty=float(body.get("frequency_penalty") or 0.0), top_logprobs=top_logprobs)
    except (TypeError, ValueError) as e:
        raise BadRequest(f"invalid sampling parameters: {e}") from None
    template_kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(template_kwargs, dict):
        raise BadRequest("chat_template_kwargs must be a JSON object")
    enable_thinking = template_kwargs.get("enable_thinking", True)
    if not isinstance(enable_thinking, bool):
        raise BadRequest(f"chat_template_kwargs.enable_thinking={enable_thinking!r}: expected true or false")
    return ChatRequest(messages, params, bool(body.get("logprobs")) or top_logprobs > 0,
                       bool(body.get("return_tokens_as_token_ids")), enable_thinking)


def completion_body(completion: Completion, request: ChatRequest, *, model_name: str, prompt_tokens: int,
                    token_text: Any, request_id: str) -> dict[str, Any]:
    """The ``chat.completion`` JSON of one engine completion (module docstring)."""
    if completion.finish_reason != "stop" and completion.error:
        raise BadRequest(completion.error)
    name = (lambda t: f"token_id:{t}") if request.token_ids else token_text
    content = None
    if request.logprobs:
        content = _logprob_entries(completion, request.params.top_logprobs, name)
    generated = (len(completion.top_logprobs.token_ids) if completion.top_logprobs is not None
                 else len(completion.token_ids or ()))
    choice = {"index": 0, "message": {"role": "assistant", "content": completion.text},
              "finish_reason": completion.finish_reason, "stop_reason": completion.stop_string,
              "logprobs": None if content is None else {"content": content}}
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model_name,
            "choices": [choice], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                                           "total_tokens": prompt_tokens + generated}}


def _logprob_entries(completion: Completion, k: int, name: Any) -> list[dict[str, Any]]:
    text_logprobs = list(completion.logprobs or ())
    signal_ = completion.top_logprobs
    if signal_ is None:
        return [{"token": name(t), "logprob": float(lp), "top_logprobs": []}
                for t, lp in zip(completion.token_ids or (), text_logprobs)]
    entries = []
    for i, token in enumerate(int(t) for t in signal_.token_ids):
        top = {int(t): float(v) for t, v in zip(signal_.top_ids[i][:k], signal_.top_logprobs[i][:k])}
        value = float(text_logprobs[i]) if i < len(text_logprobs) else top.get(token)
        entries.append({"token": name(token), "logprob": value,
                        "top_logprobs": [{"token": name(t), "logprob": v} for t, v in top.items()]})
    return entries


class _Batcher:
    """Runs every request waiting when the worker is free as one engine call, in one thread."""

    @dataclasses.dataclass
    class _Job:
        request: ChatRequest
        done: threading.Event = dataclasses.field(default_factory=threading.Event)
        completion: Completion | None = None
        error: BaseException | None = None

    def __init__(self, engine: Any, max_batch: int):
        self.engine, self.max_batch = engine, max_batch
        self._jobs: queue.Queue = queue.Queue()
        threading.Thread(target=self._work, name="serve-engine", daemon=True).start()

    def complete(self, request: ChatRequest) -> Completion:
        job = self._Job(request)
        self._jobs.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        assert job.completion is not None
        return job.completion

    def _work(self) -> None:
        while True:
            jobs = [self._jobs.get()]
            while len(jobs) < self.max_batch:
                try:
                    jobs.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            for mode in sorted({j.request.enable_thinking for j in jobs}):  # one engine call per thinking mode
                group = [j for j in jobs if j.request.enable_thinking == mode]
                try:
                    completions = self.engine.with_thinking(mode).chat([j.request.messages for j in group],
                                                                       [j.request.params for j in group])
                    for job, completion in zip(group, completions, strict=True):
                        job.completion = completion
                except Exception as e:  # noqa: BLE001 - reported to each waiting request as a 500
                    log.exception("engine call failed")
                    for job in group:
                        job.error = e
            for job in jobs:
                job.done.set()


def make_server(engine: Any, *, host: str, port: int, model_name: str, max_logprobs: int = DEFAULT_MAX_LOGPROBS,
                ) -> ThreadingHTTPServer:
    """The HTTP server (not yet serving) answering for ``engine`` (a ``LocalEngine``)."""
    batcher = _Batcher(engine, engine.max_batch_size)
    tokenizer = engine.chat_format.tokenizer
    ids = itertools.count()
    models = {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "expint-jax",
                                          "max_model_len": engine.max_context}]}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 - the http.server interface
            path = self.path.split("?", 1)[0].rstrip("/")
            if path == "/v1/models":
                self._send(200, models)
            elif path == "/health":
                self._send(200, {})
            else:
                self._send(404, _error(f"no route GET {path}", 404))

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            if self.path.split("?", 1)[0].rstrip("/") != "/v1/chat/completions":
                self._send(404, _error(f"no route POST {self.path}", 404))
                return
            try:
                try:
                    body = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise BadRequest(f"the body is not JSON: {e}") from None
                request = parse_request(body, model_name=model_name, max_context=engine.max_context,
                                        max_logprobs=max_logprobs)
                completion = batcher.complete(request)
                answer = completion_body(completion, request, model_name=model_name,
                                         prompt_tokens=engine.with_thinking(request.enable_thinking).count_tokens(
                                             request.messages),
                                         token_text=lambda t: tokenizer.decode([t]), request_id=f"chatcmpl-{next(ids)}")
            except BadRequest as e:
                self._send(e.status, _error(str(e), e.status))
                return
            except Exception as e:  # noqa: BLE001 - the client gets a 500 and retries; the log has the cause
                log.exception("request failed")
                self._send(500, _error(f"{type(e).__name__}: {e}", 500))
                return
            self._send(200, answer)

        def _send(self, status: int, obj: Any) -> None:
            payload = json.dumps(obj).encode("utf-8")
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up
                pass

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the http.server signature
            log.info("%s %s", self.address_string(), format % args)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def _error(message: str, status: int) -> dict[str, Any]:
    return {"error": {"message": message, "type": "BadRequestError" if status < 500 else "InternalServerError",
                      "code": status}}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m expint_jax.llm.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="Hugging Face Qwen3 directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model-name", default=None, help="the name /v1/models lists (default: the checkpoint path)")
    parser.add_argument("--max-batch-size", type=int, default=8, help="conversations decoded together")
    parser.add_argument("--max-context", type=int, default=None, help="prompt + generation tokens (default: the model's)")
    parser.add_argument("--max-logprobs", type=int, default=DEFAULT_MAX_LOGPROBS, help="largest top_logprobs accepted")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="parameter and compute dtype")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    from expint_jax import xla_cache
    from expint_jax.llm.local import LocalEngine
    from expint_jax.models.config import DTypePolicy

    xla_cache.enable()  # a restarted server reuses its compiled prefill and decode
    engine = LocalEngine.from_checkpoint(args.checkpoint, policy=DTypePolicy(args.dtype, args.dtype),
                                         max_batch_size=args.max_batch_size, max_context=args.max_context)
    model_name = args.model_name or args.checkpoint
    server = make_server(engine, host=args.host, port=args.port, model_name=model_name,
                         max_logprobs=args.max_logprobs)
    # SIGTERM (how a caller stops a server) ends serve_forever and exits 0.
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    log.info("serving %s as %r on http://%s:%d/v1", args.checkpoint, model_name, args.host, server.server_address[1])
    try:
        server.serve_forever(poll_interval=0.1)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
