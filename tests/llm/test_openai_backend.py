"""OpenAICompatible against the scripted local server: failures, concurrency, ordering, secrets."""

import logging
import threading
import time

import pytest

from expint_jax.records import Message, SamplingParams
from expint_jax.llm.http import RetryPolicy
from expint_jax.llm.base import BackendError, ChatBackend, chat_one
from expint_jax.llm.openai import OpenAICompatible
from tests.fakes.http_server import Reply, ScriptedServer, sequence
from tests.fakes.openai import chat_reply, completion_body, request_messages

FAST = RetryPolicy(max_attempts=3, timeout_s=0.5, backoff_s=0.01, max_backoff_s=0.02)
GREEDY = SamplingParams(temperature=0.0, max_tokens=32)
HELLO = [Message("user", "hello")]


def backend(server, **kwargs):
    kwargs.setdefault("retry", FAST)
    return OpenAICompatible(server.url, "fake-model", **kwargs)


def test_implements_the_protocol_and_maps_sampling_params():
    params = SamplingParams(temperature=0.3, top_p=0.9, top_k=20, max_tokens=64, stop=("</tool_call>",), seed=7)
    with ScriptedServer(sequence([], then=chat_reply("hi"))) as server:
        llm = backend(server)
        assert isinstance(llm, ChatBackend)
        assert chat_one(llm, [Message("system", "s"), Message("user", "u")], params).text == "hi"
        body = server.requests[0].json
        assert server.requests[0].path == "/v1/chat/completions"
        assert body["model"] == "fake-model"
        assert body["messages"] == [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
        assert (body["temperature"], body["top_p"], body["top_k"], body["max_tokens"]) == (0.3, 0.9, 20, 64)
        assert body["stop"] == ["</tool_call>"] and body["seed"] == 7
        llm.chat([HELLO], GREEDY)
        minimal = server.requests[1].json
        assert not {"stop", "seed", "top_k", "logprobs"} & minimal.keys()


def test_base_url_with_v1_suffix_is_not_doubled():
    with ScriptedServer(sequence([], then=chat_reply("ok"))) as server:
        OpenAICompatible(server.url + "/v1/", "m", retry=FAST).chat([HELLO], GREEDY)
        assert server.requests[0].path == "/v1/chat/completions"


def test_finish_reason_stop_string_and_logprobs():
    replies = [
        Reply(json_body=completion_body("cut", finish_reason="length")),
        Reply(json_body=completion_body("call", stop_reason="</tool_call>", logprobs=[-0.5, -1.25])),
        Reply(json_body=completion_body(None, finish_reason="tool_calls")),
    ]
    with ScriptedServer(sequence(replies)) as server:
        llm = backend(server, logprobs=True, max_concurrency=1)
        params = SamplingParams(temperature=0.0, stop=("</tool_call>",))
        cut, call, empty = llm.chat([HELLO, HELLO, HELLO], params)
        assert server.requests[0].json["logprobs"] is True
    assert (cut.text, cut.finish_reason, cut.logprobs) == ("cut", "length", None)
    assert (call.stop_string, call.logprobs) == ("</tool_call>", (-0.5, -1.25))
    assert (empty.text, empty.finish_reason) == ("", "stop")


def test_transient_failures_are_retried_then_succeed():
    replies = [Reply(status=500, text="boom"), Reply(text='{"choices": [', truncate_to=5), chat_reply("fine")]
    with ScriptedServer(sequence(replies)) as server:
        out = backend(server).chat([HELLO], GREEDY)
        assert len(server.requests) == 3
    assert out[0].text == "fine" and out[0].error is None


@pytest.mark.parametrize(
    "reply, expected",
    [
        (Reply(status=500, text="overloaded"), "HTTP 500"),
        (Reply(delay_s=1.0, json_body=completion_body("late")), "gave up"),
        (Reply(text='{"choices": [{"message": {"content": "tru', truncate_to=12), "gave up"),
        (Reply(text="<html>not json</html>"), "invalid JSON"),
        (Reply(json_body={"object": "chat.completion"}), "missing or empty 'choices'"),
        (Reply(json_body={"error": {"message": "model not loaded"}}), "model not loaded"),
        (Reply(json_body={"choices": [{"finish_reason": "stop"}]}), "message is missing"),
        (Reply(json_body={"choices": [{"message": {"content": 42}}]}), "content is int"),
        (Reply(status=400, text="bad request"), "HTTP 400"),
    ],
    ids=["500", "timeout", "truncated", "non-json", "no-choices", "error-body", "no-message", "bad-content", "400"],
)
def test_a_failed_request_becomes_an_error_completion(reply, expected):
    with ScriptedServer(sequence([], then=reply)) as server:
        (out,) = backend(server).chat([HELLO], GREEDY)
    assert out.finish_reason == "error" and out.text == ""
    assert expected in out.error


def test_one_failure_does_not_sink_the_batch():
    def handler(request):
        content = request_messages(request)[-1]["content"]
        return Reply(status=503, text="down") if content == "bad" else chat_reply(content.upper())

    with ScriptedServer(handler) as server:
        out = backend(server).chat([[Message("user", "a")], [Message("user", "bad")], [Message("user", "c")]], GREEDY)
    assert [c.text for c in out] == ["A", "", "C"]
    assert [c.finish_reason for c in out] == ["stop", "error", "stop"]


class _ConcurrencyProbe:
    """Echoes the last user message after a random-ish delay, recording the peak number in flight."""

    def __init__(self, hold_s):
        self.hold_s = hold_s
        self.in_flight = 0
        self.peak = 0
        self.lock = threading.Lock()

    def __call__(self, request):
        content = request_messages(request)[-1]["content"]
        with self.lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        # Later requests finish sooner, so completion order differs from submission order.
        time.sleep(self.hold_s * (1 + (7 - int(content) % 8) / 8))
        with self.lock:
            self.in_flight -= 1
        return chat_reply(f"echo {content}")


def test_requests_run_in_parallel_up_to_the_limit_and_results_keep_their_order():
    probe = _ConcurrencyProbe(hold_s=0.1)
    conversations = [[Message("user", str(i))] for i in range(12)]
    with ScriptedServer(probe) as server:
        llm = backend(server, max_concurrency=4, retry=RetryPolicy(max_attempts=1, timeout_s=5))
        start = time.perf_counter()
        out = llm.chat(conversations, GREEDY)
        elapsed = time.perf_counter() - start
    assert [c.text for c in out] == [f"echo {i}" for i in range(12)]
    assert probe.peak == 4
    assert elapsed < 12 * 0.1  # strictly faster than serial


def test_the_limit_holds_across_threads_sharing_one_backend():
    probe = _ConcurrencyProbe(hold_s=0.05)
    with ScriptedServer(probe) as server:
        llm = backend(server, max_concurrency=3, retry=RetryPolicy(max_attempts=1, timeout_s=5))
        results = {}

        def run(name):
            results[name] = llm.chat([[Message("user", str(i))] for i in range(6)], GREEDY)

        threads = [threading.Thread(target=run, args=(n,)) for n in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert probe.peak == 3
    assert all([c.text for c in results[n]] == [f"echo {i}" for i in range(6)] for n in range(3))


def test_api_key_goes_only_into_the_header(monkeypatch, caplog):
    secret = "sk-test-0123456789abcdef"
    monkeypatch.setenv("FAKE_LLM_KEY", secret)

    def echo_headers(request):  # a hostile server echoing the credentials back in its error
        return Reply(status=502, text=f"denied for {request.headers.get('Authorization')}")

    with ScriptedServer(echo_headers) as server:
        llm = backend(server, api_key_env="FAKE_LLM_KEY")
        with caplog.at_level(logging.DEBUG):
            (out,) = llm.chat([HELLO], GREEDY)
        assert server.requests[0].headers["Authorization"] == f"Bearer {secret}"
    assert out.finish_reason == "error" and "***" in out.error
    assert secret not in out.error
    assert secret not in repr(llm) and secret not in str(llm)
    assert all(secret not in record.getMessage() for record in caplog.records)


def test_missing_key_variable_is_a_backend_error_naming_it(monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(BackendError, match="NO_SUCH_KEY_VAR"):
        OpenAICompatible("http://127.0.0.1:9", "m", api_key_env="NO_SUCH_KEY_VAR")


@pytest.mark.parametrize("kwargs, match", [
    ({"base_url": "localhost:8000"}, "base_url"),
    ({"model": ""}, "model"),
    ({"max_concurrency": 0}, "max_concurrency"),
])
def test_bad_configuration_is_rejected(kwargs, match):
    args = {"base_url": "http://127.0.0.1:9", "model": "m"} | kwargs
    with pytest.raises(BackendError, match=match):
        OpenAICompatible(args.pop("base_url"), args.pop("model"), **args)


def test_empty_batch_makes_no_request():
    with ScriptedServer(sequence([])) as server:
        assert backend(server).chat([], GREEDY) == []
        assert server.requests == []


def test_each_conversation_can_carry_its_own_sampling_params():
    with ScriptedServer(lambda request: Reply(json_body=completion_body("ok"))) as server:
        backend = OpenAICompatible(server.url, "m")
        params = [SamplingParams(seed=s, temperature=t) for s, t in ((1, 0.5), (2, 0.0))]
        backend.chat([[Message("user", "a")], [Message("user", "b")]], params)
        sent = {r.json["messages"][0]["content"]: (r.json["seed"], r.json["temperature"]) for r in server.requests}
        assert sent == {"a": (1, 0.5), "b": (2, 0.0)}
        with pytest.raises(ValueError, match="1 SamplingParams for 2 conversations"):
            backend.chat([[Message("user", "a")], [Message("user", "b")]], params[:1])


def test_presence_and_frequency_penalties_are_sent_when_set():
    # The release's agent sends presence_penalty=1.1 with every request (evaluation/react_agent.py).
    params = SamplingParams(temperature=0.7, top_p=0.95, max_tokens=64, presence_penalty=1.1, frequency_penalty=-0.5)
    with ScriptedServer(sequence([], then=chat_reply("hi"))) as server:
        llm = backend(server)
        llm.chat([HELLO], params)
        llm.chat([HELLO], GREEDY)
        body, minimal = server.requests[0].json, server.requests[1].json
    assert (body["presence_penalty"], body["frequency_penalty"]) == (1.1, -0.5)
    assert not {"presence_penalty", "frequency_penalty"} & minimal.keys()


def _vllm_body(tokens, alternatives, text="hi"):
    """A chat completion as vLLM answers with top_logprobs and return_tokens_as_token_ids."""
    content = [{"token": f"token_id:{t}", "logprob": alts[0][1] if alts else -1.0,
                "top_logprobs": [{"token": f"token_id:{i}", "logprob": lp} for i, lp in alts]}
               for t, alts in zip(tokens, alternatives)]
    body = completion_body(text)
    body["choices"][0]["logprobs"] = {"content": content}
    return body


def test_top_logprobs_request_and_vllm_reply_feed_the_teacher_signal():
    import numpy as np

    alternatives = [[(7, -0.1), (3, -2.5), (9, -3.0)],  # sorted and cut to k = 2 on our side
                    [(5, -2.0), (4, -0.2), (4, -0.3), (8, -4.0)]]  # unsorted, a duplicate id
    replies = [Reply(json_body=_vllm_body([7, 4], alternatives)),
               Reply(json_body=completion_body("no ids", logprobs=[-0.5]))]
    with ScriptedServer(sequence(replies)) as server:
        llm = backend(server, max_concurrency=1)
        params = SamplingParams(temperature=1.0, top_logprobs=2)
        good, plain = llm.chat([HELLO, HELLO], params)
        body = server.requests[0].json
        assert (body["logprobs"], body["top_logprobs"], body["return_tokens_as_token_ids"]) == (True, 2, True)
    signal = good.top_logprobs
    np.testing.assert_array_equal(signal.token_ids, [7, 4])
    np.testing.assert_array_equal(signal.top_ids, [[7, 3], [4, 5]])
    np.testing.assert_allclose(signal.top_logprobs, [[-0.1, -2.5], [-0.2, -2.0]], rtol=1e-6)
    np.testing.assert_allclose(signal.tail_logmass, np.log1p(-np.exp([[-0.1, -2.5], [-0.2, -2.0]]).sum(1)), rtol=1e-5)
    assert plain.top_logprobs is None and plain.logprobs == (-0.5,)  # tokens as strings: no ids, no signal
    with ScriptedServer(sequence([], then=chat_reply("x"))) as server:
        backend(server).chat([HELLO], GREEDY)
        assert "top_logprobs" not in server.requests[0].json


def test_thinking_off_is_sent_as_chat_template_kwargs_as_vllm_and_sglang_take_it():
    with ScriptedServer(sequence([], then=chat_reply("ok"))) as server:
        backend(server, enable_thinking=False).chat([HELLO], GREEDY)
        backend(server, enable_thinking=False,
                extra_body={"chat_template_kwargs": {"add_vision_id": True}, "min_p": 0.1}).chat([HELLO], GREEDY)
        backend(server).chat([HELLO], GREEDY)
        thinking_off, merged, default = (request.json for request in server.requests)
    assert thinking_off["chat_template_kwargs"] == {"enable_thinking": False}
    assert merged["chat_template_kwargs"] == {"add_vision_id": True, "enable_thinking": False} and merged["min_p"] == 0.1
    assert "chat_template_kwargs" not in default  # None: nothing sent (DeepSeek, OpenAI have no templates)
