"""post_json against a scripted local server: retries, give-up, non-retryable errors, redaction."""

import logging

import pytest

from expint_jax.llm.http import HttpError, RetryPolicy, post_json
from tests.fakes.http_server import Reply, ScriptedServer, sequence

FAST = RetryPolicy(max_attempts=4, timeout_s=0.5, backoff_s=0.01, max_backoff_s=0.02)


def test_retries_transient_failures_then_succeeds():
    script = sequence([
        Reply(status=500, text="boom"),
        Reply(delay_s=1.0, json_body={"late": True}),  # client times out
        Reply(text='{"truncated": tr', truncate_to=10),
        Reply(json_body={"ok": 1}),
    ])
    with ScriptedServer(script) as server:
        assert post_json(server.url + "/x", {"q": 1}, policy=FAST) == {"ok": 1}
        assert len(server.requests) == 4
        assert server.requests[0].json == {"q": 1}


def test_non_json_body_is_retried_and_reported():
    with ScriptedServer(sequence([], then=Reply(text="<html>oops</html>"))) as server:
        with pytest.raises(HttpError, match="invalid JSON"):
            post_json(server.url, {}, policy=FAST)
        assert len(server.requests) == FAST.max_attempts


def test_client_error_is_not_retried():
    with ScriptedServer(sequence([], then=Reply(status=400, text="bad field 'x'"))) as server:
        with pytest.raises(HttpError, match="HTTP 400") as info:
            post_json(server.url, {}, policy=FAST)
        assert info.value.status == 400
        assert len(server.requests) == 1


def test_secret_never_appears_in_errors_or_logs(caplog):
    secret = "sk-very-secret-key"
    with ScriptedServer(sequence([], then=Reply(status=503, text=f"echo {secret}"))) as server:
        with caplog.at_level(logging.DEBUG), pytest.raises(HttpError) as info:
            post_json(server.url, {}, headers={"Authorization": f"Bearer {secret}"}, policy=FAST,
                      secrets=(secret,))
        assert server.requests[0].headers["Authorization"] == f"Bearer {secret}"
    assert secret not in str(info.value)
    assert all(secret not in r.getMessage() for r in caplog.records)


def test_secret_in_the_url_is_redacted_from_every_error(caplog):
    secret = "key-in-the-query-77"
    replies = [Reply(text='{"truncated": true}', truncate_to=5), Reply(text="not json"), Reply(status=502),
               Reply(delay_s=1.0, json_body={})]
    for reply in replies:  # truncated body, non-JSON body, HTTP error, time-out: each error names the URL
        with ScriptedServer(sequence([], then=reply)) as server:
            with caplog.at_level(logging.DEBUG), pytest.raises(HttpError) as info:
                post_json(f"{server.url}/search?key={secret}", {}, policy=FAST, secrets=(secret,))
        assert secret not in str(info.value) and "?key=***" in str(info.value), reply
    assert caplog.records and all(secret not in r.getMessage() for r in caplog.records)


def test_unreachable_host_gives_clear_error():
    with pytest.raises(HttpError, match="contacting http://127.0.0.1:9"):
        post_json("http://127.0.0.1:9/none", {}, policy=RetryPolicy(max_attempts=2, timeout_s=0.2, backoff_s=0.01))
