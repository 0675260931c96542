"""JSON over HTTP with timeouts, bounded retries and exponential back-off, standard library only.

Used by the OpenAI-compatible backend, the web tools and the LLM judge. Contract:
  * ``post_json`` returns the decoded JSON body of a 2xx response, or raises ``HttpError``.
  * Retried: connection errors, timeouts, 408/409/425/429 and 5xx, and 2xx bodies that are not
    valid JSON (a truncated body). Not retried: other 4xx (a bad request will not get better).
  * Secrets never reach a message: header values are not logged, and any occurrence of a
    registered secret in an error text or a log line (a key in the URL, a body that echoes it)
    is replaced by ``***``.
"""

from __future__ import annotations

import http.client
import json
import logging
import random
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 409, 425, 429}) | frozenset(range(500, 600))


class HttpError(RuntimeError):
    """A request failed for good; ``status`` is the last HTTP status (None for transport errors)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 4
    timeout_s: float = 60.0
    backoff_s: float = 0.5  # first wait; doubles each attempt
    max_backoff_s: float = 8.0
    jitter: float = 0.25  # +- fraction of each wait, so parallel clients do not retry in lockstep

    def wait(self, attempt: int, rng: random.Random) -> float:
        base = min(self.max_backoff_s, self.backoff_s * (2**attempt))
        return max(0.0, base * (1 + rng.uniform(-self.jitter, self.jitter)))


def redact(text: str, secrets: tuple[str, ...]) -> str:
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return text


def post_json(
    url: str,
    payload: Mapping[str, Any],
    *,
    headers: Mapping[str, str] | None = None,
    policy: RetryPolicy = RetryPolicy(),
    secrets: tuple[str, ...] = (),
    rng: random.Random | None = None,
) -> Any:
    """POSTs ``payload`` as JSON and returns the decoded response, retrying transient failures."""
    return request_json("POST", url, payload, headers=headers, policy=policy, secrets=secrets, rng=rng)


def request_json(
    method: str,
    url: str,
    payload: Mapping[str, Any] | None = None,
    *,
    headers: Mapping[str, str] | None = None,
    policy: RetryPolicy = RetryPolicy(),
    secrets: tuple[str, ...] = (),
    rng: random.Random | None = None,
    expect_json: bool = True,
) -> Any:
    """Sends one request with retries; returns parsed JSON, or the body text if not ``expect_json``."""
    rng = rng or random.Random()
    body = None if payload is None else json.dumps(payload).encode("utf-8")
    all_headers = {"Content-Type": "application/json", "Accept": "application/json"}
    all_headers.update(headers or {})
    last_error = "no attempt made"
    last_status: int | None = None
    for attempt in range(policy.max_attempts):
        if attempt:
            delay = policy.wait(attempt - 1, rng)
            log.info("retrying %s %s in %.2fs (attempt %d/%d): %s", method, redact(url, secrets), delay, attempt + 1,
                     policy.max_attempts, last_error)
            time.sleep(delay)
        request = urllib.request.Request(url, data=body, headers=all_headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=policy.timeout_s) as response:
                last_status = response.status
                raw = response.read()
        except urllib.error.HTTPError as e:
            last_status = e.code
            detail = _read_error_body(e)
            last_error = redact(f"HTTP {e.code} from {url}: {detail}", secrets)
            if e.code in RETRYABLE_STATUS:
                continue
            raise HttpError(last_error, status=e.code) from None
        except http.client.IncompleteRead:
            last_error = redact(f"truncated response body from {url}", secrets)
            continue
        except (urllib.error.URLError, http.client.HTTPException, socket.timeout, TimeoutError, OSError) as e:
            reason = getattr(e, "reason", e)
            last_error = redact(f"{type(e).__name__} contacting {url}: {reason}", secrets)
            last_status = None
            continue
        text = raw.decode("utf-8", errors="replace")
        if not expect_json:
            return text
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            last_error = redact(
                f"invalid JSON from {url} ({e.msg} at char {e.pos}; body starts {text[:120]!r})", secrets
            )
            continue
    raise HttpError(f"gave up after {policy.max_attempts} attempts: {last_error}", status=last_status)


def _read_error_body(e: urllib.error.HTTPError) -> str:
    try:
        return e.read(500).decode("utf-8", errors="replace").strip() or e.reason
    except Exception:  # the body of an error response is best-effort context only
        return str(e.reason)
