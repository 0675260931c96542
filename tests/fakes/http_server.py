"""A scripted HTTP server on 127.0.0.1 for offline tests of clients that talk to the network.

``ScriptedServer(handler)`` serves every request by calling ``handler(request) -> Reply`` in the
server thread (on a free port unless ``port`` is given); ``Reply`` can delay (to trigger client
time-outs), send any status, send a body that is not JSON, or cut the body short (declared
Content-Length larger than what is sent).
Every request is recorded (method, path, headers, parsed JSON body) for assertions.

    with ScriptedServer(lambda req: Reply(json_body={"ok": True})) as server:
        post_json(server.url + "/v1/chat/completions", {...})
        assert server.requests[0].path == "/v1/chat/completions"
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclasses.dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body.decode("utf-8")) if self.body else None


@dataclasses.dataclass(frozen=True)
class Reply:
    status: int = 200
    json_body: Any = None
    text: str | None = None  # raw body; wins over json_body
    delay_s: float = 0.0
    truncate_to: int | None = None  # send only this many bytes of the body, declaring the full length
    headers: tuple[tuple[str, str], ...] = ()

    def body_bytes(self) -> bytes:
        if self.text is not None:
            return self.text.encode("utf-8")
        return json.dumps(self.json_body).encode("utf-8")


def sequence(replies: Iterable[Reply], then: Reply | None = None) -> Callable[[Request], Reply]:
    """A handler that answers with ``replies`` in order, then ``then`` forever (default: HTTP 500)."""
    pending = list(replies)
    lock = threading.Lock()
    fallback = then or Reply(status=500, text="script exhausted")

    def handler(_: Request) -> Reply:
        with lock:
            return pending.pop(0) if pending else fallback

    return handler


class ScriptedServer:
    def __init__(self, handler: Callable[[Request], Reply], *, host: str = "127.0.0.1", port: int = 0):
        self.handler = handler
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        server = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                request = Request(self.command, self.path, dict(self.headers.items()), body)
                with server._lock:
                    server.requests.append(request)
                reply = server.handler(request)
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                payload = reply.body_bytes()
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    for k, v in reply.headers:
                        self.send_header(k, v)
                    self.end_headers()
                    sent = payload if reply.truncate_to is None else payload[: reply.truncate_to]
                    self.wfile.write(sent)
                    if reply.truncate_to is not None:
                        self.close_connection = True
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

            do_GET = do_POST = _serve

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

        self._server = ThreadingHTTPServer((host, port), _Handler)
        self._server.daemon_threads = True
        # A short poll interval makes shutdown take milliseconds instead of the default 0.5 s.
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> ScriptedServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()
