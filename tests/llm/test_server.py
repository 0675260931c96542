"""``llm.server``: a policy server's command template, start-up, health checks and shutdown.

Most tests serve with ``python -m http.server`` over a "checkpoint" folder holding a ``v1/models``
file: a real process that answers ``GET /v1/models`` in milliseconds and has no chat route. The last ones start
the real stand-in (``python -m expint_jax.llm.serve``) over a tiny exported checkpoint and check
that what it serves is what the local engine computes, teacher signal included."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from expint_jax.llm.server import PolicyServer, ServerError, ServerSpec, check_command, render_command
from expint_jax.records import Message, SamplingParams
from tests.fakes.processes import group_alive

STATIC = "{python} -m http.server {port} --bind {host} --directory {checkpoint}"
HELLO = [[Message("user", "hello")]]


def _gone(pid: int) -> bool:
    """No process of ``pid``'s group is left (the group id is the server's pid)."""
    return not group_alive(pid)


def _wait_gone(pid: int, within_s: float = 30.0) -> bool:
    deadline = time.monotonic() + within_s
    while not _gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture
def site(tmp_path):
    """A checkpoint folder (``config.json``) whose ``v1/models`` lists ``policy``."""
    folder = tmp_path / "ckpt"
    (folder / "v1").mkdir(parents=True)
    (folder / "v1" / "models").write_text(json.dumps({"object": "list", "data": [{"id": "policy"}]}))
    (folder / "config.json").write_text("{}")
    return folder


def _static(**kwargs) -> ServerSpec:
    return ServerSpec(command=STATIC, health_interval_s=0, **kwargs)


# ---------------------------------------------------------------------- templates


@pytest.mark.parametrize("template, expected", [
    ("vllm serve {checkpoint} --port {prot}", "unknown placeholder {prot}"),
    ("vllm serve {checkpoint} --port {}", "unknown placeholder {}"),
    ("vllm serve --port {port}", "needs {checkpoint}"),
    ("vllm serve {checkpoint}", "needs {port}"),
    ("vllm serve '{checkpoint} --port {port}", "does not split"),
    ("", "is empty"),
])
def test_a_bad_template_says_what_is_wrong(template, expected):
    with pytest.raises(ValueError, match=expected.replace("{", r"\{").replace("}", r"\}")):
        check_command(template)


def test_a_template_is_split_before_it_is_filled_in():
    arguments = render_command("serve {checkpoint} --port {port} --name={model_name} --json '{{\"a\": 1}}'",
                               checkpoint="/runs/my run/policy", port=8001, host="h", model_name="p")
    assert arguments == ["serve", "/runs/my run/policy", "--port", "8001", "--name=p", '--json', '{"a": 1}']


# ---------------------------------------------------------------------- lifecycle


def test_start_check_and_stop_leave_no_process(site, tmp_path):
    checkpoint = site
    log = tmp_path / "stage" / "server.log"
    with PolicyServer(_static(), checkpoint, log) as server:
        assert server.port > 0 and f":{server.port}/v1" in server.url
        assert str(checkpoint) in server.command
        server.check()
        pid = server.pid
        assert not _gone(pid)
    assert _gone(pid)
    text = log.read_text()
    assert "starting:" in text and f"pid {pid}" in text and "ready at" in text and "stopped (exit code" in text
    with pytest.raises(ServerError, match="is not running"):
        server.check()


def test_a_command_that_exits_at_once_fails_with_its_log(site, tmp_path):
    checkpoint = site
    spec = ServerSpec(command="{python} -c \"import sys; sys.exit('cannot load {checkpoint} on port {port}')\"")
    with pytest.raises(ServerError) as e:
        PolicyServer(spec, checkpoint, tmp_path / "server.log").start()
    message = str(e.value)
    assert "exited with code 1 before it answered GET http://127.0.0.1:" in message
    assert f"cannot load {checkpoint} on port" in message  # the log's tail
    assert sys.executable in message  # the command


def test_a_missing_engine_is_named(site, tmp_path):
    checkpoint = site
    spec = ServerSpec(command="no-such-engine serve {checkpoint} --port {port}")
    with pytest.raises(ServerError, match="cannot run 'no-such-engine'"):
        PolicyServer(spec, checkpoint, tmp_path / "server.log").start()


def test_startup_timeout_names_the_url_and_stops_the_process(site, tmp_path):
    checkpoint = site
    spec = ServerSpec(command="{python} -c \"print('loading {checkpoint}', flush=True); "
                              "import time; time.sleep(600)\" {port}", startup_timeout_s=0.5, shutdown_grace_s=5)
    server = PolicyServer(spec, checkpoint, tmp_path / "server.log")
    with pytest.raises(ServerError) as e:
        server.start()
    assert "did not answer GET http://127.0.0.1:" in str(e.value) and "within 0.5 s" in str(e.value)
    assert "startup_timeout_s" in str(e.value) and f"loading {checkpoint}" in str(e.value)
    pid = int(next(line for line in (tmp_path / "server.log").read_text().splitlines() if "] pid " in line).split()[-1])
    assert _gone(pid)


def test_a_server_listing_another_model_is_refused(site, tmp_path):
    checkpoint = site
    with pytest.raises(ServerError, match=r"lists the models \['policy'\], not 'qwen'.*--served-model-name"):
        PolicyServer(_static(model_name="qwen"), checkpoint, tmp_path / "server.log").start()


def test_a_server_ignoring_sigterm_is_killed_after_the_grace_period(site, tmp_path):
    checkpoint = site
    ignore = ("{python} -c \"import runpy, signal, sys; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
              "sys.argv = ['http.server', sys.argv[1], '--bind', sys.argv[2], '--directory', sys.argv[3]]; "
              "runpy.run_module('http.server', run_name='__main__')\" {port} {host} {checkpoint}")
    log = tmp_path / "server.log"
    with PolicyServer(ServerSpec(command=ignore, shutdown_grace_s=0.2, health_interval_s=0), checkpoint, log) as s:
        pid = s.pid
    assert _gone(pid)
    assert "SIGKILL" in log.read_text() and "exit code -9" in log.read_text()


def test_a_dead_server_fails_the_next_request(site, tmp_path):
    checkpoint = site
    with PolicyServer(_static(), checkpoint, tmp_path / "server.log") as server:
        backend = server.backend()
        os.killpg(server.pid, signal.SIGKILL)
        server._process.wait()
        with pytest.raises(ServerError, match="exited with code -9"):
            backend.chat(HELLO, SamplingParams())


def test_a_failed_request_raises_instead_of_returning_an_error_completion(site, tmp_path):
    checkpoint = site  # http.server answers POST with 501: the server is up, the request fails
    with PolicyServer(_static(max_attempts=1), checkpoint, tmp_path / "server.log") as server:
        with pytest.raises(ServerError, match="failed 1 of 1 requests after 1 attempts each; first error: .*501"):
            server.backend().chat(HELLO, SamplingParams())


def test_the_background_health_check_keeps_the_first_failure(site, tmp_path):
    checkpoint = site
    spec = ServerSpec(command=STATIC, health_interval_s=0.05, health_timeout_s=1)
    with PolicyServer(spec, checkpoint, tmp_path / "server.log") as server:
        (checkpoint / "v1" / "models").unlink()  # alive, but no longer answers its health check
        deadline = time.monotonic() + 30
        while server._failure is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(ServerError, match="does not answer its health check.*404"):
            server.backend().chat(HELLO, SamplingParams())


def test_the_api_key_never_appears_in_an_error(site, tmp_path, monkeypatch):
    checkpoint = site
    monkeypatch.setenv("TEST_SERVER_KEY", "sk-very-secret")
    spec = ServerSpec(command="{python} -c \"import os, sys; sys.exit('key ' + os.environ['TEST_SERVER_KEY'])\" "
                              "{checkpoint} {port}", api_key_env="TEST_SERVER_KEY")
    with pytest.raises(ServerError) as e:
        PolicyServer(spec, checkpoint, tmp_path / "server.log").start()
    assert "key ***" in str(e.value) and "sk-very-secret" not in str(e.value)


def test_a_server_outlives_no_killed_parent(site, tmp_path):
    """kill -9 of the process that started a server: Linux sends the server SIGTERM."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the parent-death signal is Linux's")
    checkpoint = site
    script = (f"from expint_jax.llm.server import PolicyServer, ServerSpec\n"
              f"s = PolicyServer(ServerSpec(command={STATIC!r}, health_interval_s=0), "
              f"{str(checkpoint)!r}, {str(tmp_path / 'server.log')!r}).start()\n"
              f"print(s.pid, flush=True)\n"
              f"import time; time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    pid = int(parent.stdout.readline())
    assert not _gone(pid)
    parent.kill()
    parent.wait()
    assert _wait_gone(pid)


# ---------------------------------------------------------------------- the stand-in over a real model


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from expint_jax.models.hf import save_checkpoint
    from expint_jax.models.source import ModelSpec, TinyModel, build_model
    from expint_jax.models.tokenizer import load_tokenizer

    directory = tmp_path_factory.mktemp("tiny") / "policy"
    save_checkpoint(build_model(ModelSpec(tiny=TinyModel(init_std=0.1))), directory, tokenizer=load_tokenizer(None))
    return directory


def standin_spec(cache_dir: Path, **kwargs) -> ServerSpec:
    """The stand-in with a short context, sharing one XLA cache across the tests' servers."""
    command = ("{python} -m expint_jax.llm.serve --checkpoint {checkpoint} --host {host} --port {port} "
               "--model-name {model_name} --max-context 256 --max-logprobs 8")
    env = (f"JAX_COMPILATION_CACHE_DIR={cache_dir}", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0", f"PYTHONPATH={Path(__file__).resolve().parents[2]}")
    return ServerSpec(command=command, env=env, startup_timeout_s=300, **kwargs)


@pytest.mark.slow
def test_the_standin_serves_what_the_local_engine_computes(tiny_checkpoint, tmp_path):
    from expint_jax.llm.local import LocalEngine

    conversations = [[Message("system", "Be brief."), Message("user", "Name a color.")],
                     [Message("user", "What is 2 + 3?")]]
    params = [SamplingParams(temperature=0.7, top_p=0.95, max_tokens=12, seed=7 + i, presence_penalty=1.1,
                             top_logprobs=8) for i in range(2)]
    # One request at a time: each is an engine call of its own, as the local engine runs it below.
    spec = standin_spec(tmp_path / "xla", max_concurrency=1)
    with PolicyServer(spec, tiny_checkpoint, tmp_path / "server.log") as server:
        backend = server.backend()
        served = backend.chat(conversations, params)
        with pytest.raises(ServerError, match="400.*leaves no room in the context of 256"):
            backend.chat([[Message("user", "word " * 400)]], SamplingParams(max_tokens=4))
        pid = server.pid
    assert _gone(pid)
    engine = LocalEngine.from_checkpoint(tiny_checkpoint, max_context=256)
    for i, conversation in enumerate(conversations):
        (local,) = engine.chat([conversation], [params[i]])  # alone, as the server ran it: same shapes
        assert served[i].text == local.text and served[i].finish_reason == local.finish_reason
        got, want = served[i].top_logprobs, local.top_logprobs
        n = len(want.token_ids)
        np.testing.assert_array_equal(got.token_ids, want.token_ids)
        assert got.num_positions == n  # a server reports no distribution after the last token
        np.testing.assert_array_equal(got.top_ids, want.top_ids[:n])
        np.testing.assert_allclose(got.top_logprobs, want.top_logprobs[:n], rtol=0, atol=1e-6)
        assert got.k == 8


# ---------------------------------------------------------------------- thinking off


def test_a_served_backend_sends_the_thinking_switch_only_when_asked(site, tmp_path):
    with PolicyServer(_static(), site, tmp_path / "server.log") as server:
        assert server.backend(enable_thinking=False).client.extra_body == {
            "chat_template_kwargs": {"enable_thinking": False}}
        assert server.backend().client.extra_body == {}


def test_the_standin_prompts_each_request_in_its_thinking_mode():
    """``chat_template_kwargs.enable_thinking`` as vLLM reads it: each mode is its own engine call,
    with the engine in that mode (``LocalEngine.with_thinking``)."""
    import threading

    from expint_jax.llm import serve
    from expint_jax.records import Completion

    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    parse = lambda extra: serve.parse_request({**body, **extra}, model_name="m", max_context=64,  # noqa: E731
                                              max_logprobs=8)
    assert parse({}).enable_thinking and parse({"chat_template_kwargs": {"add_vision_id": True}}).enable_thinking
    assert not parse({"chat_template_kwargs": {"enable_thinking": False}}).enable_thinking
    with pytest.raises(serve.BadRequest, match="enable_thinking='no': expected true or false"):
        parse({"chat_template_kwargs": {"enable_thinking": "no"}})
    with pytest.raises(serve.BadRequest, match="chat_template_kwargs must be a JSON object"):
        parse({"chat_template_kwargs": ["enable_thinking"]})

    class Engine:  # records each call's mode and size
        def __init__(self, thinking=True, calls=None):
            self.thinking, self.calls = thinking, [] if calls is None else calls

        def with_thinking(self, mode):
            return self if mode == self.thinking else Engine(mode, self.calls)

        def chat(self, conversations, params):
            self.calls.append((self.thinking, len(conversations)))
            return [Completion(text=f"thinking={self.thinking}") for _ in conversations]

    engine = Engine()
    batcher = serve._Batcher(engine, max_batch=8)
    requests = [parse({"chat_template_kwargs": {"enable_thinking": i % 2 == 0}}) for i in range(4)]
    answers = [None] * 4

    def ask(i):
        answers[i] = batcher.complete(requests[i]).text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert answers == ["thinking=True", "thinking=False", "thinking=True", "thinking=False"]
    assert sum(n for _, n in engine.calls) == 4 and all(
        sum(n for mode, n in engine.calls if mode is thinking) == 2 for thinking in (True, False))
