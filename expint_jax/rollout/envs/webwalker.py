"""WebWalkerQA-style web QA: a validating JSONL loader and ``WebQAEnv`` (real web tools + a judge).

Each line is ``{"question", "answer", "root_url", "info": {...}}`` (``info`` optional: ``domain``,
``source_website``, ``golden_path``, ``type``, ``difficulty_level``, ``lang``). A malformed line
raises ``RecordError`` naming ``file:line`` and the field. Task ids are stable: ``webwalker-`` plus
the first 12 hex digits of SHA-1 over ``root_url + "\\n" + question``, so reordering or
filtering the file never renames a task; two lines with the same id are an error.

By default the agent sees the question alone, as in the paper's evaluation; with
``include_root_url=True`` it is told the website to start from, as in the original WebWalkerQA.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from expint_jax.records import RecordError, read_jsonl
from expint_jax.rollout.envs.base import Task
from expint_jax.rollout.envs.web import JinaVisit, SerperSearch
from expint_jax.rollout.judge import ExactMatchJudge, Judge, LLMJudge
from expint_jax.llm.base import ChatBackend
from expint_jax.rollout.tools import Tool

_INFO_FIELDS: dict[str, type] = {"domain": str, "type": str, "difficulty_level": str, "lang": str,
                                 "source_website": list, "golden_path": list}


def _text_field(obj: Mapping[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        raise RecordError(f"{where}: field {key!r}: expected a non-empty string, got {value!r:.80}")
    return value.strip()


def _info(obj: Mapping[str, Any], where: str) -> dict[str, Any]:
    info = obj.get("info", {})
    if not isinstance(info, dict):
        raise RecordError(f"{where}: field 'info': expected an object, got {type(info).__name__}")
    for key, kind in _INFO_FIELDS.items():
        if key in info and not isinstance(info[key], kind):
            raise RecordError(f"{where}: field 'info.{key}': expected {kind.__name__}, got {type(info[key]).__name__}")
        if kind is list and not all(isinstance(item, str) for item in info.get(key, [])):
            raise RecordError(f"{where}: field 'info.{key}': expected a list of strings")
    return dict(info)


def task_id(root_url: str, question: str) -> str:
    return "webwalker-" + hashlib.sha1(f"{root_url}\n{question}".encode()).hexdigest()[:12]


def load_webqa_tasks(path: str | Path, *, limit: int | None = None, include_root_url: bool = False) -> list[Task]:
    """Tasks from a WebWalkerQA-style JSONL file, in file order (the first ``limit`` if given)."""
    tasks: list[Task] = []
    first_seen: dict[str, str] = {}
    for where, obj in read_jsonl(path):
        if limit is not None and len(tasks) >= limit:
            break
        if not isinstance(obj, dict):
            raise RecordError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        question = _text_field(obj, "question", where)
        answer = _text_field(obj, "answer", where)
        root_url = _text_field(obj, "root_url", where)
        if not root_url.startswith(("http://", "https://")):
            raise RecordError(f"{where}: field 'root_url': expected an http(s) URL, got {root_url!r}")
        info = _info(obj, where)
        identifier = task_id(root_url, question)
        if identifier in first_seen:
            raise RecordError(f"{where}: duplicate task (same question and root_url as {first_seen[identifier]})")
        first_seen[identifier] = where
        shown = f"{question}\n\nStart from the website {root_url}" if include_root_url else question
        tasks.append(Task(identifier, shown, answer, {"root_url": root_url, **info}))
    return tasks


class WebQAEnv:
    """Questions answered on the live web with ``search``/``visit``, scored by a judge."""

    name = "webqa"

    def __init__(self, tasks: Sequence[Task], search: Tool, visit: Tool, judge: Judge):
        if search.spec.name != "search" or visit.spec.name != "visit":
            raise ValueError(f"WebQAEnv needs tools named 'search' and 'visit', got {search.spec.name!r}, "
                             f"{visit.spec.name!r}")
        self._tasks, self._tools, self.judge = tuple(tasks), (search, visit), judge

    @classmethod
    def from_jsonl(
        cls,
        path: str | Path,
        *,
        summarizer: ChatBackend | None,
        judge_backend: ChatBackend | None,
        limit: int | None = None,
        include_root_url: bool = False,
        serper_base_url: str = "https://google.serper.dev",
        jina_base_url: str = "https://r.jina.ai",
    ) -> WebQAEnv:
        """The usual setup: Serper search, Jina visit, and an LLM judge (exact match if no backend)."""
        judge: Judge = LLMJudge(judge_backend) if judge_backend is not None else ExactMatchJudge(containment=True)
        return cls(load_webqa_tasks(path, limit=limit, include_root_url=include_root_url),
                   SerperSearch(base_url=serper_base_url), JinaVisit(summarizer, base_url=jina_base_url), judge)

    def tasks(self) -> Sequence[Task]:
        return self._tasks

    def tools(self, task: Task) -> Sequence[Tool]:
        return self._tools

    def score(self, task: Task, prediction: str | None) -> float:
        if task.answer is None:
            raise ValueError(f"web QA task {task.task_id!r} has no gold answer")
        return self.judge.judge(task.question, task.answer, prediction).reward
