"""The offline SimWeb writer: traces, principle and instance lessons, determinism, granularity."""

import pytest

from expint_jax.experience.bank import ExperiencePool
from expint_jax.experience.extract import group_rollouts
from expint_jax.experience.granularity import analyze, analyze_pool
from expint_jax.rollout.envs.simweb.lessons import (
    FINISHING,
    INSTANCE_LABELS,
    MISTAKE_LESSONS,
    PRINCIPLE_LESSONS,
    Recognised,
    names_entity,
    recognise,
)
from expint_jax.rollout.envs.simweb.sensitivity import read_context
from expint_jax.rollout.envs.simweb.writer import (
    PRINCIPLES,
    WRITER,
    OfflineWriterConfig,
    instance_lessons,
    principle_lessons,
    trace_rollout,
    write_iteration,
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
        'Useful query: For "In which year was the Harbor Lantern Society founded?", searching "Harbor Lantern Society '
        f'founded" lists {FOUNDING_URL} (Harbor Lantern Society) among the results.',
        'Wrong answer: For "In which year was the Harbor Lantern Society founded?", 1950 is wrong; the right answer '
        "is 1923.",  # 1950 and 1999 tie once each: the smaller string is reported
    ]
    director = instance_lessons(groups["director"])
    assert director[1] == (f'Navigation: For "Who directs the Museum of Tides?", Museum of Tides ({DIRECTOR_URL}) is '
                           f"linked from Museums A-Z ({DIRECTORY_URL}).")
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


# --- coverage: every mistake's lesson, the finishing lesson, lessons the agent recognises -----------------------


@pytest.fixture(scope="module")
def mixed_groups():
    """Partly right groups on every level, every mistake on: the writer's full repertoire."""
    env = SimWebEnv(SimWebConfig(seed=5, tasks_per_level=12))
    mistakes = Mistakes(answer_early=0.3, wrong_link=0.35, skip_hop=0.35)
    return env, group_rollouts(run_reference_agent(env, n=5, seed=2, mistakes=mistakes))


def test_principle_pool_covers_every_mistake_and_the_finishing_lesson(mixed_groups):
    _, groups = mixed_groups
    pool = write_offline(groups, ExperiencePool(), OfflineWriterConfig(), iteration=0)
    keys = {recognise(item.text).key for item in pool}
    assert set(MISTAKE_LESSONS) == {"answer_early", "wrong_link", "skip_hop"}
    assert set(MISTAKE_LESSONS.values()) | {FINISHING} <= keys
    assert all(recognise(item.text).granularity == "principle" for item in pool)


def test_every_principle_text_is_a_recognised_principle_rule():
    assert [key for key, _, _ in PRINCIPLES] == [lesson.key for lesson in PRINCIPLE_LESSONS]
    for key, text, _ in PRINCIPLES:
        assert recognise(text) == Recognised(key, "principle")
        assert recognise(text.upper()) == Recognised(key, "principle")  # labels match case-insensitively
    report = analyze(text for _, text, _ in PRINCIPLES)
    assert report.strategy_share == 1.0 and report.url_share == report.number_share == report.entity_share == 0.0


def test_instance_lessons_are_tied_to_one_task_and_site(mixed_groups):
    env, groups = mixed_groups
    tasks = {t.task_id: t for t in env.tasks()}
    labels = set()
    for group in (g for g in groups if g.is_informative):
        task = tasks[group.task_id]
        for text in instance_lessons(group):
            labels.add(text.split(":", 1)[0])
            assert names_entity(text, task.metadata["entities"]), text
            assert task.metadata["site"] in text and task.metadata["root_url"] in text
            lesson = recognise(text)
            assert lesson is None or lesson.granularity == "instance"
        answer_source = instance_lessons(group)[0]
        assert answer_source.startswith("Answer source:") and task.metadata["site"] in answer_source
        assert any(url in answer_source for url in task.metadata["answer_urls"])
    assert {"Answer source", "Look-alike", "Every part", "Wrong answer"} <= labels
    assert labels <= set(INSTANCE_LABELS)


def test_instance_lessons_are_inert_on_tasks_of_other_sites(mixed_groups):
    env, groups = mixed_groups
    pool = write_offline(groups, ExperiencePool(), OfflineWriterConfig("instance"))
    held_out = SimWebEnv(SimWebConfig(seed=5, split="test", tasks_per_level=4))
    for task in held_out.tasks():
        context = read_context([item.text for item in pool], task.metadata["entities"])
        assert context.keys == frozenset() and context.shown == len(pool)
    own = next(g for g in groups if g.is_informative)
    context = read_context(instance_lessons(own), {t.task_id: t for t in env.tasks()}[own.task_id].metadata["entities"])
    assert MISTAKE_LESSONS["answer_early"] in context.keys


def test_pool_gains_and_loses_lessons_as_mistakes_fade():
    """Mistake rates halve each iteration (as if internalized): new lessons come, faded ones go."""
    env = SimWebEnv(SimWebConfig(seed=4, tasks_per_level=10))
    config = OfflineWriterConfig(retire_unsupported=True)
    pool, steps = ExperiencePool(), []
    schedule = [Mistakes(answer_early=0.4, wrong_link=0.0, skip_hop=0.0),
                Mistakes(answer_early=0.2, wrong_link=0.4, skip_hop=0.4),
                Mistakes(answer_early=0.0, wrong_link=0.2, skip_hop=0.2),
                Mistakes(answer_early=0.0, wrong_link=0.0, skip_hop=0.0)]
    for iteration, mistakes in enumerate(schedule):
        groups = group_rollouts(run_reference_agent(env, n=4, seed=iteration, mistakes=mistakes))
        step = write_iteration(groups, pool, config, iteration=iteration)
        assert step.pool == write_offline(groups, pool, config, iteration=iteration)
        assert step.granularity == analyze_pool(step.pool) and str(iteration) in step.summary()
        steps.append(step)
        pool = step.pool
    keys = [{recognise(item.text).key for item in step.pool} for step in steps]
    assert MISTAKE_LESSONS["answer_early"] in keys[0] and MISTAKE_LESSONS["wrong_link"] not in keys[0]
    assert {MISTAKE_LESSONS["wrong_link"], MISTAKE_LESSONS["skip_hop"]} <= keys[1]
    assert MISTAKE_LESSONS["answer_early"] not in keys[2]  # faded: retired
    assert len(steps[3].pool) == 0 and steps[3].lost  # nothing left to teach
    assert steps[1].gained and steps[2].lost
    # Without retirement the pool only grows.
    kept = OfflineWriterConfig()
    grown = write_offline(group_rollouts(run_reference_agent(env, n=4, seed=3, mistakes=schedule[3])), steps[2].pool,
                          kept, iteration=3)
    assert [i.text for i in grown] == [i.text for i in steps[2].pool]
