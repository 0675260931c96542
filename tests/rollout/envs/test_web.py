"""Real web tools against a scripted local server (retries, clear errors, no key in logs) and WebWalkerQA."""

import json
import logging
from pathlib import Path

import pytest

from expint_jax.records import Completion, RecordError
from expint_jax.rollout.envs.web import (
    SEPARATOR,
    JinaVisit,
    SerperSearch,
    WebToolConfigError,
    parse_search_results,
)
from expint_jax.rollout.envs.webwalker import WebQAEnv, load_webqa_tasks, task_id
from expint_jax.llm.http import RetryPolicy
from expint_jax.rollout.judge import LLMJudge
from expint_jax.rollout.tools import ToolError
from tests.fakes.http_server import Reply, ScriptedServer, sequence

SERPER_KEY = "serper-secret-0123456789"
JINA_KEY = "jina-secret-9876543210"
FAST = RetryPolicy(max_attempts=3, timeout_s=0.5, backoff_s=0.01, max_backoff_s=0.02)
WEBWALKER = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "webwalkerqa.jsonl"


@pytest.fixture(autouse=True)
def keys(monkeypatch):
    monkeypatch.setenv("SERPER_API_KEY", SERPER_KEY)
    monkeypatch.setenv("JINA_API_KEY", JINA_KEY)


class ScriptedSummarizer:
    def __init__(self, *replies):
        self.replies, self.prompts = list(replies), []

    def chat(self, conversations, params):
        self.prompts += [c[-1].content for c in conversations]
        replies = [self.replies.pop(0) for _ in conversations]
        return [r if isinstance(r, Completion) else Completion(text=r) for r in replies]


def _organic(*titles):
    return {"organic": [{"title": t, "link": f"https://example.com/{i}", "snippet": f"about {t}"}
                        for i, t in enumerate(titles)]}


def _no_secret_anywhere(caplog, *texts):
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for secret in (SERPER_KEY, JINA_KEY):
        assert secret not in logged
        for text in texts:
            assert secret not in text


def test_missing_keys_fail_at_construction_naming_the_variable(monkeypatch):
    monkeypatch.delenv("SERPER_API_KEY")
    with pytest.raises(WebToolConfigError, match="SERPER_API_KEY"):
        SerperSearch()
    monkeypatch.setenv("JINA_API_KEY", "  ")
    with pytest.raises(WebToolConfigError, match="JINA_API_KEY"):
        JinaVisit(None)
    monkeypatch.setenv("JINA_API_KEY", JINA_KEY)
    with pytest.raises(WebToolConfigError, match="base_url"):
        JinaVisit(None, base_url="ftp://x")


def test_serper_search_request_and_result_format():
    with ScriptedServer(sequence([Reply(json_body=_organic("Alpha", "Beta"))])) as server:
        tool = SerperSearch(base_url=server.url, top_k=3, retry=FAST)
        text = tool({"query": "alpha beta"})
        request = server.requests[0]
        assert request.path == "/search" and request.json == {"q": "alpha beta", "num": 3}
        assert {k.lower(): v for k, v in request.headers.items()}["x-api-key"] == SERPER_KEY
    hits = parse_search_results(text)
    assert [(h.title, h.url, h.snippet) for h in hits] == [
        ("Alpha", "https://example.com/0", "about Alpha"), ("Beta", "https://example.com/1", "about Beta")]
    assert SERPER_KEY not in repr(tool)


def test_serper_retries_then_reports_failures_as_tool_errors_without_the_key(caplog):
    caplog.set_level(logging.DEBUG)
    script = sequence([
        Reply(status=500, text=f"internal error for key {SERPER_KEY}"),  # a server that echoes the key
        Reply(delay_s=1.0, json_body=_organic("late")),  # the client times out
        Reply(text='{"organic": [', truncate_to=5),  # truncated body
        Reply(json_body=_organic("Gamma")),
    ])
    with ScriptedServer(script) as server:
        tool = SerperSearch(base_url=server.url, retry=RetryPolicy(max_attempts=4, timeout_s=0.5, backoff_s=0.01))
        assert parse_search_results(tool({"query": "gamma"}))[0].title == "Gamma"
        assert len(server.requests) == 4
    errors = []
    for reply, expected in [(Reply(status=500, text=f"bad key {SERPER_KEY}"), "HTTP 500"),
                            (Reply(text="<html>not json</html>"), "invalid JSON"),
                            (Reply(delay_s=1.0, json_body={}), "gave up after 3 attempts"),
                            (Reply(json_body={"organic": "nope"}), "unexpected response")]:
        with ScriptedServer(sequence([], then=reply)) as server:
            with pytest.raises(ToolError) as info:
                SerperSearch(base_url=server.url, retry=FAST)({"query": "q"})
        assert expected in str(info.value)
        assert "search for 'q' failed" in str(info.value)
        errors.append(str(info.value))
    assert any("***" in e for e in errors)  # the echoed key was redacted
    _no_secret_anywhere(caplog, *errors)


def test_serper_accepts_a_list_of_queries_and_shows_partial_failures():
    script = sequence([Reply(json_body=_organic("One"))], then=Reply(status=500))
    with ScriptedServer(script) as server:
        out = SerperSearch(base_url=server.url, retry=FAST)({"query": ["one", "two"]})
    first, second = out.split(SEPARATOR)
    assert parse_search_results(first)[0].title == "One"
    assert second.startswith("Error: search for 'two' failed")


def _page(content, title="Page"):
    return Reply(json_body={"code": 200, "data": {"title": title, "url": "https://example.com", "content": content}})


def test_jina_visit_fetches_and_summarizes_toward_the_goal():
    summarizer = ScriptedSummarizer("Evidence: founded in 1987.\nSummary: 1987.")
    with ScriptedServer(sequence([_page("The lab was founded in 1987. " * 3)])) as server:
        tool = JinaVisit(summarizer, base_url=server.url, retry=FAST)
        out = tool({"url": "https://example.com/about", "goal": "founding year"})
        request = server.requests[0]
        assert request.method == "GET" and request.path == "/https://example.com/about"
        assert {k.lower(): v for k, v in request.headers.items()}["authorization"] == f"Bearer {JINA_KEY}"
    assert out.startswith('The useful information in https://example.com/about for the goal "founding year":')
    assert out.endswith("Summary: 1987.")
    (prompt,) = summarizer.prompts
    assert "Goal: founding year" in prompt and "founded in 1987" in prompt
    assert tool.spec.parameters["required"] == ["url", "goal"]


def test_jina_visit_truncates_long_pages_and_falls_back_when_summary_fails():
    summarizer = ScriptedSummarizer(Completion(text="", finish_reason="error", error="HTTP 500"))
    with ScriptedServer(sequence([_page("x" * 5000)])) as server:
        tool = JinaVisit(summarizer, base_url=server.url, max_page_chars=1000, fallback_chars=300, retry=FAST)
        out = tool({"url": "https://example.com/long", "goal": "anything"})
    assert "[... 4000 more characters not shown]" in summarizer.prompts[0]
    assert "could not be summarized" in out and "[... 4700 more characters not shown]" in out
    with ScriptedServer(sequence([_page("short page")])) as server:
        raw = JinaVisit(None, base_url=server.url, retry=FAST)({"url": "https://example.com"})
    assert raw.endswith("\nshort page") and 'for the goal "Summarize the main content of the page."' in raw


def test_jina_visit_errors_are_tool_errors_without_the_key(caplog):
    caplog.set_level(logging.DEBUG)
    messages = []
    for reply, expected in [(Reply(status=503, text=f"quota exceeded for {JINA_KEY}"), "HTTP 503"),
                            (Reply(text="plain text, not JSON"), "invalid JSON"),
                            (Reply(text='{"data": {"content": "cut', truncate_to=12), "truncated"),
                            (Reply(delay_s=1.0, json_body={}), "gave up after 3 attempts"),
                            (Reply(json_body={"data": {"content": 42}}), "unexpected response"),
                            (Reply(json_body={"data": {"content": "   "}}), "no readable text")]:
        with ScriptedServer(sequence([], then=reply)) as server:
            with pytest.raises(ToolError) as info:
                JinaVisit(None, base_url=server.url, retry=FAST)({"url": "https://example.com/x", "goal": "g"})
        assert expected in str(info.value), str(info.value)
        messages.append(str(info.value))
    with pytest.raises(ToolError, match="not a web address"):
        JinaVisit(None, retry=FAST)({"url": "example.com", "goal": "g"})
    _no_secret_anywhere(caplog, *messages)


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"question": "When was X founded?", "answer": "1987", "root_url": "https://x.org/",
        "info": {"domain": "conference", "type": "single_source", "difficulty_level": "easy", "lang": "en",
                 "source_website": ["https://x.org/about"], "golden_path": ["root->About"]}}


@pytest.mark.skipif(not WEBWALKER.exists(), reason="shared WebWalkerQA file not present")
def test_loads_the_webwalkerqa_file_with_stable_unique_ids():
    tasks = load_webqa_tasks(WEBWALKER)
    assert len(tasks) == 680 and len({t.task_id for t in tasks}) == 680
    assert [t.task_id for t in load_webqa_tasks(WEBWALKER, limit=5)] == [t.task_id for t in tasks[:5]]
    first = tasks[0]
    assert first.task_id == task_id(first.metadata["root_url"], first.question)
    assert {"root_url", "domain", "type", "difficulty_level", "golden_path"} <= set(first.metadata)


def test_loader_options_and_errors_name_file_line_and_field(tmp_path):
    path = _write_jsonl(tmp_path / "ok.jsonl", [GOOD, "", {**GOOD, "question": "Another?"}])
    tasks = load_webqa_tasks(path, include_root_url=True)
    assert len(tasks) == 2 and tasks[0].question.endswith("Start from the website https://x.org/")
    assert tasks[0].task_id == task_id("https://x.org/", "When was X founded?")
    cases = [
        ({**GOOD, "question": ""}, "bad.jsonl:2: field 'question'"),
        ({**GOOD, "answer": 5}, "bad.jsonl:2: field 'answer'"),
        ({**GOOD, "root_url": "x.org"}, "bad.jsonl:2: field 'root_url': expected an http"),
        ({**GOOD, "info": {"golden_path": "root"}}, "bad.jsonl:2: field 'info.golden_path'"),
        ({**GOOD, "info": {"source_website": [1]}}, "bad.jsonl:2: field 'info.source_website'"),
        (["not", "an", "object"], "bad.jsonl:2: expected a JSON object"),
        ("{broken json", "bad.jsonl:2: not valid JSON"),
        (GOOD, "bad.jsonl:2: duplicate task (same question and root_url as "),
    ]
    for row, message in cases:
        with pytest.raises(RecordError) as info:
            load_webqa_tasks(_write_jsonl(tmp_path / "bad.jsonl", [GOOD, row]))
        assert message in str(info.value)


def test_webqa_env_scores_with_the_llm_judge_and_wires_the_tools(tmp_path):
    path = _write_jsonl(tmp_path / "qa.jsonl", [GOOD])
    judge_backend = ScriptedSummarizer("Correct", "Incorrect")
    env = WebQAEnv.from_jsonl(path, summarizer=None, judge_backend=judge_backend)
    (task,) = env.tasks()
    assert [t.spec.name for t in env.tools(task)] == ["search", "visit"]
    assert isinstance(env.judge, LLMJudge)
    assert env.score(task, "It was founded in 1987.") == 1.0
    assert env.score(task, None) == 0.0 and len(judge_backend.prompts) == 1
    offline = WebQAEnv.from_jsonl(path, summarizer=None, judge_backend=None)
    assert offline.score(task, "1987") == 1.0 and offline.score(task, "1988") == 0.0
