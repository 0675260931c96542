"""Web tools: the search/visit observation conventions and the real Serper + Jina tools.

Shared conventions (SimWeb's simulated tools use them too, so lessons transfer):
  * ``search`` takes ``{"query": str | [str, ...]}`` and answers, per query, a numbered list of
    results, each as title, ``URL:`` line and ``Snippet:`` line (``format_search_results``;
    ``parse_search_results`` reads it back);
  * ``visit`` takes ``{"url": str | [str, ...], "goal": str}``; several URLs/queries in one call
    are answered one after another, separated by a blank line and ``=====``.

Real tools (for real runs only; tests point ``base_url`` at a local fake server):
  * ``SerperSearch`` posts to ``{base_url}/search`` with the key from ``SERPER_API_KEY`` in the
    ``X-API-KEY`` header;
  * ``JinaVisit`` GETs ``{base_url}/{url}`` (JSON mode) with the key from ``JINA_API_KEY`` as a
    Bearer token, truncates the page to ``max_page_chars`` and has a ``ChatBackend`` summarize it
    toward the stated goal. If the summary call fails the observation is the start of the raw page
    (``fallback_chars``) with a note saying so.
A missing key raises ``WebToolConfigError`` at construction, naming the environment variable.
Keys go only into request headers and into ``secrets=`` of the HTTP helpers, so they are
redacted from every error and log line; they never appear in ``repr``. HTTP failures (after the
helpers' retries) and malformed responses raise ``ToolError`` with a message the agent can read.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from expint_jax.records import Message, SamplingParams
from expint_jax.llm.http import HttpError, RetryPolicy, post_json, request_json
from expint_jax.llm.base import ChatBackend
from expint_jax.rollout.tools import ToolError, ToolSpec

SEPARATOR = "\n\n=====\n\n"


class WebToolConfigError(ValueError):
    """A web tool is misconfigured (missing API key, bad base URL, bad limits)."""


# ---------------------------------------------------------------------------------------------
# Observation format
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SearchHit:
    title: str
    url: str
    snippet: str


def format_search_results(query: str, hits: Sequence[SearchHit]) -> str:
    if not hits:
        return f'No results for "{query}". Try other keywords.'
    lines = [f'Search results for "{query}":']
    for rank, hit in enumerate(hits, start=1):
        lines += [f"{rank}. {_one_line(hit.title)}", f"   URL: {hit.url}", f"   Snippet: {_one_line(hit.snippet)}"]
    return "\n".join(lines)


_HIT = re.compile(r"^(?P<rank>\d+)\. (?P<title>.*)\n   URL: (?P<url>\S*)\n   Snippet: (?P<snippet>.*)$", re.M)


def parse_search_results(text: str) -> list[SearchHit]:
    """The hits listed in a ``format_search_results`` observation (all queries, in order)."""
    return [SearchHit(m.group("title"), m.group("url"), m.group("snippet")) for m in _HIT.finditer(text)]


def _one_line(text: str) -> str:
    return " ".join(text.split())


def read_one_or_many(arguments: Mapping[str, Any], key: str, tool: str, max_items: int) -> list[str]:
    """A string argument that may also be given as a list of strings (the paper's agent does both)."""
    value = arguments.get(key)
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(v, str) and v.strip() for v in items):
        raise ToolError(f"{tool}: argument {key!r} must be a non-empty string or a list of non-empty strings, "
                        f"got {value!r}")
    if len(items) > max_items:
        raise ToolError(f"{tool}: at most {max_items} values of {key!r} per call, got {len(items)}")
    return [v.strip() for v in items]


def answer_each(items: Sequence[str], answer: Callable[[str], str]) -> str:
    """Answers every item; an item whose answer raises ``ToolError`` shows its error in place.

    If every item fails, the call fails (``ToolError`` with all the messages).
    """
    outputs, failures = [], 0
    for item in items:
        try:
            outputs.append(answer(item))
        except ToolError as e:
            failures += 1
            outputs.append(f"Error: {e}")
    if failures == len(items):
        raise ToolError("\n".join(o.removeprefix("Error: ") for o in outputs))
    return SEPARATOR.join(outputs)


def search_spec(description: str) -> ToolSpec:
    return ToolSpec("search", description, {
        "type": "object",
        "properties": {"query": {
            "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
            "description": "The search query, or a list of queries searched one after another.",
        }},
        "required": ["query"],
    })


def visit_spec(description: str, with_goal: bool) -> ToolSpec:
    properties: dict[str, Any] = {"url": {
        "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
        "description": "The URL to open, or a list of URLs opened one after another.",
    }}
    if with_goal:
        properties["goal"] = {"type": "string", "description": "What information you want from the page(s)."}
    return ToolSpec("visit", description, {"type": "object", "properties": properties,
                                           "required": ["url", "goal"] if with_goal else ["url"]})


# ---------------------------------------------------------------------------------------------
# Real tools
# ---------------------------------------------------------------------------------------------


def _read_key(env_var: str, tool: str) -> str:
    key = os.environ.get(env_var, "")
    if not key.strip():
        raise WebToolConfigError(f"{tool} needs an API key: set the environment variable {env_var}")
    return key.strip()


def _check_base_url(base_url: str, tool: str) -> str:
    if not base_url.startswith(("http://", "https://")):
        raise WebToolConfigError(f"{tool}: base_url must start with http:// or https://, got {base_url!r}")
    return base_url.rstrip("/")


class SerperSearch:
    """Google search through the Serper API."""

    def __init__(
        self,
        *,
        api_key_env: str = "SERPER_API_KEY",
        base_url: str = "https://google.serper.dev",
        top_k: int = 10,
        max_queries: int = 5,
        retry: RetryPolicy = RetryPolicy(timeout_s=30.0),
    ):
        if top_k < 1 or max_queries < 1:
            raise WebToolConfigError(f"SerperSearch: top_k and max_queries must be >= 1, got {top_k}, {max_queries}")
        self._key = _read_key(api_key_env, "SerperSearch")
        self.base_url = _check_base_url(base_url, "SerperSearch")
        self.top_k, self.max_queries, self.retry = top_k, max_queries, retry
        self.spec = search_spec(
            "Search the web. Returns the top results (title, URL, snippet) for each query. "
            f"'query' may be a string or a list of up to {max_queries} strings."
        )

    def __repr__(self) -> str:
        return f"SerperSearch(base_url={self.base_url!r}, top_k={self.top_k})"

    def __call__(self, arguments: Mapping[str, Any]) -> str:
        queries = read_one_or_many(arguments, "query", "search", self.max_queries)
        return answer_each(queries, self._search)

    def _search(self, query: str) -> str:
        try:
            body = post_json(f"{self.base_url}/search", {"q": query, "num": self.top_k},
                             headers={"X-API-KEY": self._key}, policy=self.retry, secrets=(self._key,))
        except HttpError as e:
            raise ToolError(f"search for {query!r} failed: {e}") from None
        organic = body.get("organic", []) if isinstance(body, dict) else None
        if not isinstance(organic, list):
            raise ToolError(f"search for {query!r} failed: the search service sent an unexpected response")
        hits = [SearchHit(str(r.get("title", "")), str(r.get("link", "")), str(r.get("snippet", "")))
                for r in organic[: self.top_k] if isinstance(r, dict) and r.get("link")]
        return format_search_results(query, hits)


SUMMARY_PROMPT = """You are reading a web page for a research assistant.

Goal: {goal}

Page ({url}):
{content}

Extract what on this page serves the goal. Reply in this form:
Evidence: the relevant passages, quoted as closely as possible (or "none").
Summary: a short answer to the goal based only on the evidence, saying plainly if the page does \
not contain it."""


class JinaVisit:
    """Opens a page through the Jina reader and summarizes it toward the agent's goal."""

    def __init__(
        self,
        summarizer: ChatBackend | None,
        *,
        api_key_env: str = "JINA_API_KEY",
        base_url: str = "https://r.jina.ai",
        max_page_chars: int = 60_000,
        fallback_chars: int = 4_000,
        max_urls: int = 5,
        summary_params: SamplingParams = SamplingParams(temperature=0.0, max_tokens=1024),
        retry: RetryPolicy = RetryPolicy(timeout_s=60.0),
    ):
        if min(max_page_chars, fallback_chars, max_urls) < 1:
            raise WebToolConfigError("JinaVisit: max_page_chars, fallback_chars and max_urls must be >= 1")
        self._key = _read_key(api_key_env, "JinaVisit")
        self.base_url = _check_base_url(base_url, "JinaVisit")
        self.summarizer = summarizer
        self.max_page_chars, self.fallback_chars, self.max_urls = max_page_chars, fallback_chars, max_urls
        self.summary_params, self.retry = summary_params, retry
        self.spec = visit_spec(
            "Open web page(s) and return the information relevant to your goal. "
            f"'url' may be a string or a list of up to {max_urls} URLs.", with_goal=True)

    def __repr__(self) -> str:
        return f"JinaVisit(base_url={self.base_url!r}, max_page_chars={self.max_page_chars})"

    def __call__(self, arguments: Mapping[str, Any]) -> str:
        urls = read_one_or_many(arguments, "url", "visit", self.max_urls)
        goal = arguments.get("goal")
        goal = goal.strip() if isinstance(goal, str) and goal.strip() else "Summarize the main content of the page."
        return answer_each(urls, lambda url: self._visit(url, goal))

    def fetch(self, url: str) -> str:
        """The whole page as text (Jina's markdown)."""
        if not url.startswith(("http://", "https://")):
            raise ToolError(f"visit: {url!r} is not a web address (it must start with http:// or https://)")
        try:
            body = request_json("GET", f"{self.base_url}/{url}", headers={"Authorization": f"Bearer {self._key}"},
                                policy=self.retry, secrets=(self._key,))
        except HttpError as e:
            raise ToolError(f"visit {url} failed: {e}") from None
        data = body.get("data") if isinstance(body, dict) else None
        content = data.get("content") if isinstance(data, dict) else None
        if not isinstance(content, str):
            raise ToolError(f"visit {url} failed: the reader service sent an unexpected response")
        if not content.strip():
            raise ToolError(f"visit {url}: the page has no readable text")
        return content

    def _visit(self, url: str, goal: str) -> str:
        content = self.fetch(url)
        page = truncate(content, self.max_page_chars)
        header = f'The useful information in {url} for the goal "{goal}":'
        if self.summarizer is None:
            return f"{header}\n{page}"
        prompt = SUMMARY_PROMPT.format(goal=goal, url=url, content=page)
        completion = self.summarizer.chat([[Message("user", prompt)]], self.summary_params)[0]
        if completion.finish_reason == "error" or not completion.text.strip():
            return (f"{header}\n(The page could not be summarized; here is the start of it.)\n"
                    f"{truncate(content, self.fallback_chars)}")
        return f"{header}\n{completion.text.strip()}"


def truncate(text: str, max_chars: int) -> str:
    """``text`` cut to ``max_chars`` characters with a marker saying how much was dropped."""
    if len(text) <= max_chars:
        return text
    return f"{text[:max_chars]}\n[... {len(text) - max_chars} more characters not shown]"
