"""A deterministic fake extraction LLM: one responder per stage, routed by the prompt's title.

``good_responders()`` answer every stage correctly (a function of the prompt only, so a rerun
gets the same answers, like temperature 0). Tests swap single stages for misbehaving responders.
"""

from __future__ import annotations

import json
import re
from typing import Any

from expint_jax.experience.extract import prompts
from tests.fakes.http_server import Reply
from tests.fakes.openai import ChatScript, Responder

TITLES = {
    "summary": prompts.SUMMARY_TITLE,
    "critique": prompts.CRITIQUE_TITLE,
    "group_update": prompts.GROUP_UPDATE_TITLE,
    "reconcile": prompts.RECONCILE_TITLE,
    "consolidate": prompts.CONSOLIDATE_TITLE,
}
SHARED_LESSON = "Pointer following: When search results only show snippets, open the most relevant page before answering."


def task_prompt(messages: list[dict[str, Any]]) -> str:
    """The stage prompt (the first user message; retries append more turns after it)."""
    return next(m["content"] for m in messages if m["role"] == "user")


def section(prompt: str, heading: str) -> str:
    match = re.search(rf"### {re.escape(heading)}[^\n]*\n(.*?)(?=\n\n### |\Z)", prompt, re.DOTALL)
    assert match, f"no section {heading!r} in prompt"
    return match.group(1).strip()


def current_lessons(prompt: str) -> list[tuple[str, str]]:
    return re.findall(r"^\[(G\d+)\]\. (.*)$", section(prompt, "Current lessons"), re.MULTILINE)


def good_summary(messages):
    prompt = task_prompt(messages)
    return f"The agent searched for: {section(prompt, 'Question')}."


def good_critique(messages):
    question = section(task_prompt(messages), "Question")
    topic = re.sub(r"[^A-Za-z ]", "", question).split()[-1]
    return (f"Comparing the rollouts:\n<Experiences>\n1. {SHARED_LESSON}\n"
            f"2. Topic {topic}: When the question names a {topic.lower()}, check its own page.\n</Experiences>")


def proposals(prompt: str) -> list[str]:
    """The lessons a group-update prompt decides on: one per query's list, or the single proposal."""
    if "### New lessons" in prompt:
        return [re.sub(r"^\d+\. ", "", line) for line in section(prompt, "New lessons").splitlines()]
    return [section(prompt, "Proposed lesson")]


def good_group_update_ops(messages) -> list[dict[str, Any]]:
    return [{"operation": "ADD", "id": None, "content": lesson} for lesson in proposals(task_prompt(messages))]


def good_reconcile_ops(messages) -> list[dict[str, Any]]:
    return json.loads(section(task_prompt(messages), "Proposed operations"))


def good_consolidate_entries(messages) -> list[dict[str, Any]]:
    prompt = task_prompt(messages)
    cap = int(re.search(r"the limit is (\d+)", prompt).group(1))
    return [{"id": item_id, "content": text} for item_id, text in current_lessons(prompt)[:cap]]


def good_responders() -> dict[str, Responder]:
    return {
        "summary": good_summary,
        "critique": good_critique,
        "group_update": lambda m: json.dumps(good_group_update_ops(m)),
        "reconcile": lambda m: json.dumps(good_reconcile_ops(m)),
        "consolidate": lambda m: json.dumps(good_consolidate_entries(m)),
    }


def fenced(produce):
    """The same content inside prose and a code fence, with Python-style quoting and trailing commas."""
    def responder(messages):
        literal = repr(produce(messages))
        literal = literal[:-1] + ",]" if literal.endswith("]") else literal
        return f"Sure! Here is the answer:\n```json\n{literal}\n```\nLet me know if you need more."
    return responder


def extractor_llm(**overrides: Responder) -> ChatScript:
    unknown = set(overrides) - set(TITLES)
    assert not unknown, f"unknown stages {unknown}"
    responders = good_responders() | overrides
    return ChatScript([(TITLES[stage], responders[stage]) for stage in TITLES],
                      default=Reply(status=400, text="unrecognized prompt"))
