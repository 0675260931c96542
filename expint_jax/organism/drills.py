"""Skill drills: short conversations that practise the copying that acting on SimWeb takes.

Why: acting on SimWeb is mostly copying — a link's URL out of the page just read, a fact's value
out of an entity page. A network of the organism's size learns a copy mechanism only from many
copy events, and an agent trajectory holds a handful per thousand tokens; a drill is one page and
one copy, a few hundred tokens. Without them the bootstrap's networks learned the agent's format
and which section to open but recalled the names of their training sites instead of copying the
site in front of them (docs/organism.md records those runs).

Contract of ``drills(config)``:
  * Worlds: SimWeb ``split="train"`` worlds of ``config.seeds``, disjoint from the corpora's
    (``OrganismConfig`` checks) and from the loop's (``organism.check_unseen_world``).
  * Per page with links, ``per_page`` drills, each a two-message conversation: the user message is
    the page exactly as the agent sees a ``visit`` result (``format_tool_response(format_page)``)
    followed by one request; the assistant message is the agent's reply format:
      - link drill: "Open: {link title}" → the ``visit`` tool call with that link's URL;
      - fact drill (entity pages): "{label} of {page title}?" → ``<answer>{value}</answer>``;
      - repeat drill (a share ``repeat_share`` of all): "Repeat links {i}-{j}." → those link lines
        verbatim: every reply token is a copy of the token after an earlier occurrence of the
        previous one, the plain form of copying that the two lookups above build on;
      - search drill (a share ``search_share`` of all, drawn first): the user message is instead the
        world's search results for the page's title and one of its fact labels, as the agent sees a
        ``search`` result, and "Open: {page title}" → the ``visit`` call with the page's URL (the
        agent's first hop copies a URL out of search results, not out of a page's link list); a
        page its search does not find gives no drill in that slot.
  * Deterministic: the same config gives the same drills in the same order.
"""

from __future__ import annotations

import dataclasses
import random

from expint_jax.models.chat import format_tool_call, format_tool_response
from expint_jax.records import Message, Trajectory
from expint_jax.rollout.envs.simweb.env import SimWebConfig, SimWebEnv
from expint_jax.rollout.envs.simweb.reference_agent import read_facts
from expint_jax.rollout.envs.simweb.tasks import URL_STYLES, UrlStyle
from expint_jax.rollout.envs.simweb.tools import format_page, link_lines
from expint_jax.rollout.envs.web import format_search_results


@dataclasses.dataclass(frozen=True)
class DrillConfig:
    # org6's recipe (docs/organism.md): drills from 12 worlds copied links where 6 worlds seen twice did not.
    seeds: tuple[int, ...] = tuple(range(301, 313))
    levels: tuple[str, ...] = ("easy", "medium")
    tasks_per_level: int = 60  # sizes each world (SimWeb builds the sites its tasks need)
    tasks_per_site: int = 2
    per_page: int = 1
    fact_share: float = 0.35  # of the drills on entity pages, the share that asks for a fact
    repeat_share: float = 0.4  # of all drills, the share that repeats link lines verbatim
    repeat_lines: int = 3
    search_share: float = 0.0  # of all drills, the share that opens a page from search results
    url_style: UrlStyle = "path"  # SimWebConfig.url_style of the drills' worlds

    def __post_init__(self) -> None:
        if (not self.seeds or self.per_page < 1 or self.repeat_lines < 1
                or not all(0.0 <= x <= 1.0 for x in (self.fact_share, self.repeat_share, self.search_share))
                or self.url_style not in URL_STYLES):
            raise ValueError(f"DrillConfig needs seeds, per_page >= 1, repeat_lines >= 1, shares in [0, 1] and a "
                             f"url_style in {URL_STYLES}; "
                             f"got {self}")


def drills(config: DrillConfig) -> list[Trajectory]:
    out: list[Trajectory] = []
    for seed in config.seeds:
        env = SimWebEnv(SimWebConfig(seed=seed, split="train", tasks_per_level=config.tasks_per_level,
                                     levels=config.levels, tasks_per_site=config.tasks_per_site,
                                     url_style=config.url_style))
        rng = random.Random(f"drills:{seed}")
        for site in env.world.sites:
            for page in site.pages:
                if not page.links:
                    continue
                shown_page = format_tool_response(format_page(page))
                facts = read_facts(page.text)
                lines = link_lines(page)
                for k in range(config.per_page):
                    # No draw when an option is off, so the other drills do not depend on it.
                    context = shown_page
                    if config.search_share and rng.random() < config.search_share:
                        kind = "search"
                        query = f"{page.title} {rng.choice(sorted(facts)).lower()}" if facts else page.title
                        hits = env.world.search(query, env.config.search_top_k)  # as its search tool lists them
                        if page.url not in {hit.url for hit in hits}:
                            continue
                        context = format_tool_response(format_search_results(query, hits))
                        request, reply = f"Open: {page.title}", format_tool_call("visit", {"url": page.url})
                    elif config.repeat_share and rng.random() < config.repeat_share:
                        kind, first = "repeat", rng.randrange(len(lines))
                        shown = lines[first:first + config.repeat_lines]
                        request, reply = f"Repeat links {first + 1}-{first + len(shown)}.", "\n".join(shown)
                    elif facts and rng.random() < config.fact_share:
                        kind, label = "fact", rng.choice(sorted(facts))
                        request, reply = f"{label} of {page.title}?", f"<answer>{facts[label]}</answer>"
                    else:
                        kind, link = "link", rng.choice(page.links)
                        request, reply = f"Open: {link.title}", format_tool_call("visit", {"url": link.url})
                    out.append(Trajectory(
                        task_id=f"drill:{seed}:{page.url}:{k}",
                        messages=(Message("user", f"{context}\n\n{request}"), Message("assistant", reply)),
                        metadata={"drill": kind}))
    return out
