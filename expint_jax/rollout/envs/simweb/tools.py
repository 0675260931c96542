"""SimWeb's ``search`` and ``visit`` tools and the text format of a visited page.

``search`` follows the shared search-result format of ``expint_jax.rollout.envs.web``. ``visit``
shows a page as ``Title:``/``URL:`` lines, the page text, then ``Links:`` with one
``[n] Title — URL`` line per link (``format_page``; ``parse_page`` reads it back). Both accept a
single string or a list (queries / URLs), like the paper's agent. A URL with no page raises
``ToolError`` telling the agent where valid URLs come from; in a list, a bad URL shows its error
in place and the others are still visited. ``visit`` ignores a ``goal`` argument (there is no
summarizer offline: the whole page is short).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from expint_jax.rollout.envs.simweb.site import Link, Page
from expint_jax.rollout.envs.simweb.world import World
from expint_jax.rollout.envs.web import (
    answer_each,
    format_search_results,
    read_one_or_many,
    search_spec,
    visit_spec,
)
from expint_jax.rollout.tools import ToolError


def link_lines(page: Page) -> list[str]:
    """The page's ``[n] Title — URL`` lines, as ``format_page`` shows them."""
    return [f"[{i}] {link.title} — {link.url}" for i, link in enumerate(page.links, start=1)]


def format_page(page: Page) -> str:
    links = "\n".join(link_lines(page))
    return f"Title: {page.title}\nURL: {page.url}\n\n{page.text}\n\nLinks:\n{links or '(none)'}"


@dataclasses.dataclass(frozen=True)
class VisitedPage:
    title: str
    url: str
    text: str
    links: tuple[Link, ...]


_PAGE = re.compile(r"^Title: (?P<title>.*)\nURL: (?P<url>\S+)\n\n(?P<text>.*?)\n\nLinks:\n(?P<links>.*)$", re.S)
_LINK = re.compile(r"^\[\d+\] (?P<title>.*) — (?P<url>\S+)$", re.M)


def parse_page(observation: str) -> VisitedPage | None:
    """The page shown by one ``visit`` observation, or None if the text is not a page."""
    match = _PAGE.match(observation.strip())
    if not match:
        return None
    links = tuple(Link(m.group("title"), m.group("url")) for m in _LINK.finditer(match.group("links")))
    return VisitedPage(match.group("title"), match.group("url"), match.group("text"), links)


class SimSearch:
    """Search over the world's indexed pages."""

    def __init__(self, world: World, top_k: int = 5, max_queries: int = 5):
        if top_k < 1 or max_queries < 1:
            raise ValueError(f"SimSearch: top_k and max_queries must be >= 1, got {top_k}, {max_queries}")
        self.world, self.top_k, self.max_queries = world, top_k, max_queries
        self.spec = search_spec(
            f"Search the web. Returns the top {top_k} results (title, URL, snippet) for each query. "
            f"'query' may be a string or a list of up to {max_queries} strings."
        )

    def __call__(self, arguments: Mapping[str, Any]) -> str:
        queries = read_one_or_many(arguments, "query", "search", self.max_queries)
        return answer_each(queries, lambda q: format_search_results(q, self.world.search(q, self.top_k)))


class SimVisit:
    """Opens pages of the world by URL."""

    def __init__(self, world: World, max_urls: int = 5):
        if max_urls < 1:
            raise ValueError(f"SimVisit: max_urls must be >= 1, got {max_urls}")
        self.world, self.max_urls = world, max_urls
        self.spec = visit_spec(
            "Open web page(s) and return the page text followed by its numbered links. "
            f"'url' may be a string or a list of up to {max_urls} URLs.", with_goal=False)

    def __call__(self, arguments: Mapping[str, Any]) -> str:
        return answer_each(read_one_or_many(arguments, "url", "visit", self.max_urls), self._visit)

    def _visit(self, url: str) -> str:
        page = self.world.page(url)
        if page is None:
            raise ToolError(f"visit: there is no page at {url!r}. Use a URL exactly as it appears in search "
                            "results or in the link list of a visited page.")
        return format_page(page)
