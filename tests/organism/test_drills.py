"""Copy drills: each reply is a copy of something in its own page, in the agent's reply format."""

import dataclasses
import json

import pytest

from expint_jax.organism.bootstrap import OrganismConfig, Phase
from expint_jax.organism.drills import DrillConfig, drills
from expint_jax.organism.data import CorpusConfig
from expint_jax.rollout.envs.simweb.tools import parse_page

SMALL = DrillConfig(seeds=(301,), levels=("easy",), tasks_per_level=2, tasks_per_site=1, per_page=2, fact_share=0.5,
                    repeat_share=0.2)


def test_every_reply_copies_a_link_or_a_fact_of_its_page():
    made = drills(SMALL)
    assert made == drills(SMALL)  # deterministic
    kinds = {t.metadata["drill"] for t in made}
    assert kinds == {"link", "fact", "repeat"}
    for t in made:
        user, reply = t.messages[0].content, t.messages[1].content
        observation = user.split("<tool_response>\n", 1)[1].rsplit("\n</tool_response>", 1)[0]
        page = parse_page(observation)
        assert page is not None, t.task_id
        request = user.rsplit("\n\n", 1)[1]
        if t.metadata["drill"] == "repeat":
            first, last = map(int, request.removeprefix("Repeat links ").removesuffix(".").split("-"))
            assert [line.split("] ", 1)[1] for line in reply.split("\n")] == [
                f"{link.title} — {link.url}" for link in page.links[first - 1:last]]
            assert 1 <= first <= last <= len(page.links)
        elif t.metadata["drill"] == "link":
            url = json.loads(reply.split("<tool_call>\n", 1)[1].split("\n</tool_call>")[0])["arguments"]["url"]
            assert request == "Open: " + next(link.title for link in page.links if link.url == url)
        else:
            label, value = request.removesuffix(f" of {page.title}?"), reply.removeprefix("<answer>").removesuffix("</answer>")
            assert f"- {label}: {value}" in page.text


def test_drill_worlds_must_be_their_own():
    with pytest.raises(ValueError, match=r"seeds \[301\] are in both drills and corpus"):
        OrganismConfig(drills=DrillConfig(seeds=(301,)), corpus=CorpusConfig(seeds=(301, 302)))
    skipped = OrganismConfig(drills=DrillConfig(seeds=(301,)), corpus=CorpusConfig(seeds=(301, 302)),
                             drill=Phase(epochs=0, learning_rate=1e-3))
    assert skipped.corpus.seeds == (301, 302)  # a skipped phase's worlds are not read, so not in the way
    with pytest.raises(ValueError, match="per_page"):
        DrillConfig(per_page=0)


def test_repeats_are_a_share_of_the_drills():
    plain, mixed = drills(dataclasses.replace(SMALL, repeat_share=0.0)), drills(SMALL)
    assert {t.metadata["drill"] for t in plain} == {"link", "fact"}
    assert len(plain) == len(mixed)  # one drill per page and slot, whatever its kind
    share = sum(t.metadata["drill"] == "repeat" for t in mixed) / len(mixed)
    assert 0.1 < share < 0.3


def test_a_search_drill_opens_its_page_from_the_search_results_the_agent_would_see():
    from expint_jax.rollout.envs.simweb.env import SimWebConfig, SimWebEnv
    from expint_jax.rollout.envs.web import format_search_results, parse_search_results

    config = dataclasses.replace(SMALL, search_share=0.5)
    made = drills(config)
    searched = [t for t in made if t.metadata["drill"] == "search"]
    assert len(searched) > 0.3 * len(made)
    world = SimWebEnv(SimWebConfig(seed=301, split="train", tasks_per_level=2, levels=("easy",),
                                   tasks_per_site=1)).world
    for t in searched:
        user, reply = t.messages[0].content, t.messages[1].content
        observation = user.split("<tool_response>\n", 1)[1].rsplit("\n</tool_response>", 1)[0]
        query = observation.split('"', 2)[1]
        assert observation == format_search_results(query, world.search(query, 5))  # what the search tool returns
        url = json.loads(reply.split("<tool_call>\n", 1)[1].split("\n</tool_call>")[0])["arguments"]["url"]
        title = user.rsplit("\n\n", 1)[1].removeprefix("Open: ")
        assert (title, url) in {(hit.title, hit.url) for hit in parse_search_results(observation)}
        assert query.startswith(title)
    assert drills(dataclasses.replace(config, search_share=0.0)) == drills(SMALL)  # off: no draw spent on it
    with pytest.raises(ValueError, match="shares in"):
        DrillConfig(search_share=1.5)
