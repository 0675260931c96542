"""A policy server process for the loop's server-backend tests, which dies like a crashed engine.

    python -m tests.fakes.policy_server --checkpoint DIR --host H --port N --model-name M [--scripted] [serve flags]

Without ``--scripted`` it is the real stand-in (``expint_jax.llm.serve``; the remaining flags are
its own); with it, a JAX-free server that lists M and answers every chat request with
``SCRIPTED_REPLY``. Either way, when ``$EXPINT_TEST_SERVER_DIES_WHEN`` names a file, the first
chat request after that file exists kills the server with SIGKILL (unset: it never dies).
"""

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from expint_jax.llm import serve
from tests.fakes.http_server import Reply, ScriptedServer
from tests.fakes.openai import chat_reply

TRIGGER = "EXPINT_TEST_SERVER_DIES_WHEN"
SCRIPTED_REPLY = "<answer>I do not know</answer>"


def die_if_triggered() -> None:
    trigger = os.environ.get(TRIGGER)
    if trigger and Path(trigger).exists():
        os.kill(os.getpid(), signal.SIGKILL)


def scripted(host: str, port: int, model_name: str) -> None:
    def handler(request):
        if request.path.rstrip("/") == "/v1/models":
            return Reply(json_body={"object": "list", "data": [{"id": model_name, "object": "model"}]})
        if request.path.rstrip("/") == "/v1/chat/completions":
            die_if_triggered()
            return chat_reply(SCRIPTED_REPLY)
        return Reply(status=404, text=f"no route {request.path}")

    with ScriptedServer(handler, host=host, port=port):
        print(f"scripted policy server for {model_name!r} on {host}:{port}", file=sys.stderr, flush=True)
        threading.Event().wait()  # until SIGTERM


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scripted", action="store_true")
    args, rest = parser.parse_known_args(argv)
    if args.scripted:
        own = argparse.ArgumentParser()
        for flag in ("--checkpoint", "--host", "--model-name"):
            own.add_argument(flag, required=True)
        own.add_argument("--port", type=int, required=True)
        parsed = own.parse_args(rest)
        scripted(parsed.host, parsed.port, parsed.model_name)
        return 0
    parse = serve.parse_request

    def parse_or_die(*a, **kw):  # called once per chat request
        die_if_triggered()
        return parse(*a, **kw)

    serve.parse_request = parse_or_die
    return serve.main(rest)


if __name__ == "__main__":
    sys.exit(main())
