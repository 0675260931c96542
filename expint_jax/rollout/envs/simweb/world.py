"""A SimWeb world: many generated sites, one URL table and one search engine over them all.

Contract: ``World.page(url)`` finds a page under lenient URL spelling (``canonical_url``: scheme,
host case, trailing slash, fragment and surrounding quotes do not matter). ``World.search`` is
BM25 (``expint_jax.retrieval``) over the title and text of the *indexed* pages only, ranked by
score with ties broken by page order, so the same world and query always give the same results.
The index is built on the first search, so generating a world does not pay for it, and exactly
once even when the tool threads of an agent step search at the same time.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from typing import Any

from expint_jax.retrieval import BM25Index
from expint_jax.rollout.envs.simweb.site import Page, Site
from expint_jax.rollout.envs.web import SearchHit

_SNIPPET_CHARS = 200


def canonical_url(url: str) -> str:
    """The lookup key of a URL: https, lowercase host, no fragment, no trailing slash."""
    url = url.strip().strip("<>\"'`").strip()
    url = url.split("#", 1)[0]
    match = re.match(r"^(?:(?P<scheme>[a-z][a-z0-9+.-]*)://)?(?P<host>[^/?]*)(?P<rest>.*)$", url, re.I)
    host, rest = match.group("host").lower(), match.group("rest")
    return f"https://{host}{rest.rstrip('/')}"


def snippet(page: Page) -> str:
    """What a search result shows of a page: its first paragraph, cut at a word boundary."""
    first = page.text.split("\n", 1)[0].strip()
    if len(first) <= _SNIPPET_CHARS:
        return first
    return first[:_SNIPPET_CHARS].rsplit(" ", 1)[0] + " ..."


class World:
    """Read-only collection of sites; see the module docstring."""

    def __init__(self, sites: Sequence[Site]):
        self.sites = tuple(sites)
        self._pages: dict[str, Page] = {}
        for site in self.sites:
            for page in site.pages:
                key = canonical_url(page.url)
                if key in self._pages:
                    raise ValueError(f"two SimWeb pages share the URL {page.url!r}")
                self._pages[key] = page
        self._index: tuple[BM25Index, tuple[Page, ...]] | None = None
        self._index_lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._pages)

    def page(self, url: str) -> Page | None:
        return self._pages.get(canonical_url(url))

    def site(self, root_url: str) -> Site:
        key = canonical_url(root_url)
        for site in self.sites:
            if canonical_url(site.root_url) == key:
                return site
        raise KeyError(f"no SimWeb site with root URL {root_url!r}")

    def _search_index(self) -> tuple[BM25Index, tuple[Page, ...]]:
        # A lock, not functools.cached_property: since Python 3.12 that no longer locks, and
        # concurrent first searches would each build the whole index.
        if self._index is None:
            with self._index_lock:
                if self._index is None:
                    pages = tuple(p for site in self.sites for p in site.pages if p.indexed)
                    self._index = BM25Index([f"{p.title}\n{p.text}" for p in pages]), pages
        return self._index

    def search(self, query: str, k: int) -> list[SearchHit]:
        index, pages = self._search_index()
        return [SearchHit(pages[i].title, pages[i].url, snippet(pages[i])) for i, _ in index.top_k(query, k)]

    def to_json(self) -> dict[str, Any]:
        return {"sites": [site.to_json() for site in self.sites]}
