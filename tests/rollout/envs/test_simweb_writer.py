"""The offline SimWeb writer: traces, principle and instance lessons, determinism, granularity."""

import pytest

from expint_jax.experience.bank import ExperiencePool
from expint_jax.experience.extract import group_rollouts
from expint_jax.experience.granularity import analyze_pool
from expint_jax.rollout.envs.simweb.writer import (
    PRINCIPLES,
    WRITER,
    OfflineWriterConfig,
    instance_lessons,
    principle_lessons,
    trace_rollout,
    write_offline,
)
from expint_jax.rollout.envs.simweb import SimWebConfig, SimWebEnv
from expint_jax.rollout.envs.simweb.reference_agent import Mistakes, run_reference_agent
from tests.experience.trajectories import DIRECTOR_URL, DIRECTORY_URL, FOUNDING_URL, simweb_rollouts

LESSON = {name: text for name, text, _ in PRINCIPLES}


@pytest.fixture(scope="module")
def simweb_groups():
    env = SimWebEnv(SimWebConfig(seed=3, tasks_per_level=6))
    mistakes = Mistakes(answer_early=0.25, wrong_link=0.25, skip_hop=0.25)
    return group_rollouts(run_reference_agent(env, n=5, seed=1, mistakes=mistakes))


def test_trace_reads_calls_pages_links_and_failures():
    rollouts = simweb_rollouts()
    success = rollouts[0]
    director_ok, director_snippets, director_broken = rollouts[6:]
    trace = trace_rollout(director_ok)
    assert trace.queries == ("Museum of Tides director",) and trace.tool_calls == 3
    assert [p.url for p in trace.pages] == [DIRECTORY_URL, DIRECTOR_URL]
    assert [(child.url, parent.url) for child, parent in trace.linked_pages] == [(DIRECTOR_URL, DIRECTORY_URL)]
    assert [p.url for p in trace.content_pages] == [DIRECTOR_URL]
    assert [(q, h.url) for q, h in trace.hits] == [("Museum of Tides director", DIRECTORY_URL)]
    assert trace_rollout(director_broken).failed_visits == ("https://city.example.org/tides",)
    assert trace_rollout(director_broken).gave_up and not trace_rollout(director_snippets).gave_up
    assert [p.url for p in trace_rollout(success).pages] == [FOUNDING_URL]


def test_principles_from_hand_written_groups():
    lessons = principle_lessons(group_rollouts(simweb_rollouts()))
    assert lessons == [
        (LESSON["answered_from_snippets"], ("founding", "director")),
        (LESSON["answer_promptly"], ("founding", "director")),
        (LESSON["answered_without_tools"], ("founding",)),
        (LESSON["gave_up"], ("director",)),
        (LESSON["followed_directory"], ("director",)),
        (LESSON["broken_link"], ("director",)),
    ]


def test_instances_from_hand_written_groups():
    groups = {g.task_id: g for g in group_rollouts(simweb_rollouts())}
    assert instance_lessons(groups["founding"]) == [
        f'Answer source: The answer to "In which year was the Harbor Lantern Society founded?" is 1923, stated on '
        f"{FOUNDING_URL} (Harbor Lantern Society).",
        f'Useful query: Searching "Harbor Lantern Society founded" lists {FOUNDING_URL} (Harbor Lantern Society) '
        "among the results.",
        'Wrong answer: For "In which year was the Harbor Lantern Society founded?", 1950 is wrong; the right answer '
        "is 1923.",  # 1950 and 1999 tie once each: the smaller string is reported
    ]
    director = instance_lessons(groups["director"])
    assert director[1] == f"Navigation: Museum of Tides ({DIRECTOR_URL}) is linked from Museums A-Z ({DIRECTORY_URL})."
    assert "Museum of Salt is wrong" in director[2]


def test_pool_update_keeps_old_items_dedupes_and_caps():
    groups = group_rollouts(simweb_rollouts())
    seed = ExperiencePool().add(LESSON["gave_up"].upper(), granularity="principle", iteration=0)
    pool = write_offline(groups, seed, OfflineWriterConfig(), iteration=1)
    assert pool.items[0] == seed.items[0] and len(pool) == 6  # the seeded lesson is not written twice
    assert pool.ids == tuple(f"G{k}" for k in range(6))
    assert all(item.iteration == 1 and item.writer == WRITER for item in pool.items[1:])
    assert pool.items[0].writer is None  # the seed was not written here
    # Over the cap, this batch's most supported lessons win over the (internalized) seed.
    capped = write_offline(groups, seed, OfflineWriterConfig(max_pool_size=2), iteration=1)
    assert [i.text for i in capped] == [LESSON["answered_from_snippets"], LESSON["answer_promptly"]]
    assert capped.ids == ("G0", "G1")
    uninformative = [g for g in groups if g.task_id == "capital"]
    assert write_offline(uninformative, seed, OfflineWriterConfig(granularity="instance")) == seed.renumbered()


def test_writer_is_deterministic_on_simweb(simweb_groups):
    for granularity in ("principle", "instance"):
        config = OfflineWriterConfig(granularity=granularity)
        first = write_offline(simweb_groups, ExperiencePool(), config, iteration=1)
        assert first == write_offline(simweb_groups, ExperiencePool(), config, iteration=1)
        assert len(first) > 0


def test_granularity_separates_the_two_writers_on_simweb(simweb_groups):
    assert sum(g.is_informative for g in simweb_groups) >= 5
    principle = analyze_pool(write_offline(simweb_groups, ExperiencePool(), OfflineWriterConfig("principle")))
    instance = analyze_pool(write_offline(simweb_groups, ExperiencePool(), OfflineWriterConfig("instance")))
    assert principle.items >= 4 and instance.items >= 10
    assert principle.strategy_share == 1.0 and instance.strategy_share == 0.0
    assert principle.url_share == principle.entity_share == principle.number_share == 0.0
    assert instance.url_share == 1.0 and instance.entity_share == 1.0
