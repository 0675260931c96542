"""The extraction pipeline end to end, through the OpenAI-compatible backend and a fake server."""

import dataclasses
import json
import logging
import re

import pytest

from expint_jax.experience.bank import ExperiencePool, read_pool
from expint_jax.experience.extract import STAGES, ExtractionConfig, extract_experience, group_rollouts
from expint_jax.experience.extract.stages import WRITER
from expint_jax.experience.granularity import analyze_pool
from expint_jax.experience.release_format import read_release_rollouts
from expint_jax.records import SamplingParams
from expint_jax.llm.http import RetryPolicy
from expint_jax.llm.openai import OpenAICompatible
from tests.experience.fake_extractor import (
    SHARED_LESSON,
    TITLES,
    current_lessons,
    extractor_llm,
    fenced,
    good_group_update_ops,
    good_reconcile_ops,
    good_responders,
    task_prompt,
)
from tests.experience.trajectories import DIRECTOR_Q, FOUNDING_Q, simweb_rollouts
from tests.fakes.http_server import Reply, ScriptedServer

CONFIG = ExtractionConfig(granularity="principle", max_pool_size=50, max_retries=1, concurrency=4,
                          sampling=SamplingParams(temperature=0.0, max_tokens=512))
RETRY = RetryPolicy(max_attempts=2, timeout_s=2.0, backoff_s=0.001, max_backoff_s=0.002)
SEED_POOL = ExperiencePool.from_mapping(
    {"G0": "Query reformulation: When a search returns nothing relevant, rephrase it with different key terms.",
     "G1": "Answer discipline: When the evidence is incomplete, say so instead of guessing."},
    granularity="principle", iteration=0)


@pytest.fixture
def groups():
    return group_rollouts(simweb_rollouts())


@pytest.fixture(scope="module")
def server():
    # One server for the module (stopping one takes half a second); each run installs its script.
    with ScriptedServer(lambda request: Reply(status=500, text="no script installed")) as shared:
        yield shared


@pytest.fixture
def run(server):
    def extract(script, groups, workdir, pool=SEED_POOL, config=CONFIG, backend=None, **kwargs):
        server.handler = script
        backend = backend or OpenAICompatible(server.url, "fake", retry=RETRY, max_concurrency=4)
        return extract_experience(groups, pool, backend, config, workdir, iteration=1, **kwargs)

    return extract


def assert_valid(pool, cap):
    assert 0 <= len(pool) <= cap
    assert pool.ids == tuple(f"G{k}" for k in range(len(pool)))
    assert all(item.text.strip() and "\n" not in item.text for item in pool)


def fallbacks(caplog):
    return sorted({m.group(1) for r in caplog.records if (m := re.match(r"extraction fallback (\w+)", r.getMessage()))})


def stats(workdir):
    return json.loads((workdir / "stats.json").read_text())["runs"]


def test_well_behaved_llm(run, groups, tmp_path, caplog):
    script = extractor_llm()
    with caplog.at_level(logging.INFO):
        pool = run(script, groups, tmp_path)
    assert_valid(pool, CONFIG.max_pool_size)
    assert fallbacks(caplog) == []
    texts = [item.text for item in pool]
    # The seed pool first, then the shared lesson once (its duplicate ADD dropped), then one per topic.
    assert texts[:2] == [item.text for item in SEED_POOL]
    assert texts.count(SHARED_LESSON) == 1 and len(texts) == 5
    assert [item.uid for item in pool][:2] == [item.uid for item in SEED_POOL]
    shared = next(item for item in pool if item.text == SHARED_LESSON)
    assert shared.iteration == 1 and set(shared.source_task_ids) == {"founding", "director"}
    assert [item.writer for item in pool] == [None, None, WRITER, WRITER, WRITER]  # the seed's is unknown
    # "capital" (all correct) is not informative: 2 groups x 3 rollouts are summarized.
    run_stats = stats(tmp_path)[-1]
    # One group update per question covering all its lessons, as the release does.
    assert run_stats["calls"] == {"summary": 6, "critique": 2, "group_update": 2, "reconcile": 1}
    assert run_stats["groups_used"] == 2 and run_stats["notes"] == {"duplicate_add_dropped": 1}
    assert run_stats["granularity"] == analyze_pool(pool).to_json() and run_stats["granularity"]["items"] == 5
    assert read_pool(tmp_path / "pool.jsonl") == pool
    assert json.loads((tmp_path / "pool.json").read_text()) == pool.as_mapping()


def test_prompts_follow_the_granularity(run, groups, tmp_path):
    captured = []
    script = extractor_llm(critique=lambda m: captured.append(task_prompt(m)) or "<Experiences>\nx\n</Experiences>")
    run(script, groups, tmp_path / "instance", config=ExtractionConfig(
        granularity="instance", max_retries=0, sampling=CONFIG.sampling))
    assert captured and all("exact URL" in p and "When [condition]" not in p for p in captured)
    questions = sorted(re.search(r"### Question\n(.*)", p).group(1) for p in captured)
    assert questions == sorted([DIRECTOR_Q, FOUNDING_Q])


def test_python_style_fenced_json_needs_no_fallback(run, groups, tmp_path, caplog):
    script = extractor_llm(group_update=fenced(good_group_update_ops), reconcile=fenced(good_reconcile_ops))
    with caplog.at_level(logging.INFO):
        pool = run(script, groups, tmp_path)
    assert fallbacks(caplog) == []
    assert stats(tmp_path)[-1]["retries"] == {}
    with caplog.at_level(logging.INFO):
        reference = run(extractor_llm(), groups, tmp_path / "plain")
    assert pool == reference


@pytest.mark.parametrize("stage, reply, expected", [
    ("group_update", "I think we should add it. {oops", ["group_update_as_add"]),
    ("group_update", "", ["group_update_as_add"]),
    ("group_update", Reply(status=500, text="down"), ["group_update_as_add"]),
    ("reconcile", "[{'operation': 'ADD', 'content': ", ["reconcile_deterministic"]),
    ("reconcile", '[{"operation": "MERGE", "id": "G0"}]', ["reconcile_deterministic"]),
    ("summary", Reply(status=503, text="busy"), ["summary_from_trajectory"]),
    ("critique", "no tags here", ["critique_no_lessons"]),
    ("critique", Reply(text="<html>gateway</html>"), ["critique_no_lessons"]),
])
def test_bad_answers_fall_back_and_are_logged(run, groups, tmp_path, caplog, stage, reply, expected):
    script = extractor_llm(**{stage: reply})
    with caplog.at_level(logging.INFO):
        pool = run(script, groups, tmp_path)
    assert_valid(pool, CONFIG.max_pool_size)
    assert fallbacks(caplog) == expected
    run_stats = stats(tmp_path)[-1]
    assert set(run_stats["fallbacks"]) == set(expected)
    assert run_stats["retries"][stage] == run_stats["calls"][stage] // 2  # one retry each (max_retries=1)
    assert [item.text for item in pool][:2] == [item.text for item in SEED_POOL]
    if stage in ("group_update", "reconcile"):  # the proposals still arrive, deduplicated
        assert [item.text for item in pool].count(SHARED_LESSON) == 1 and len(pool) == 5


def test_a_retry_with_the_reason_fixes_a_bad_answer(run, groups, tmp_path, caplog):
    def first_bad(messages):
        if len(messages) == 2:  # the first attempt; a retry carries the bad answer and the reason
            return "ADD it please"
        assert "could not be used" in messages[-1]["content"]
        return json.dumps(good_group_update_ops(messages))

    with caplog.at_level(logging.INFO):
        pool = run(extractor_llm(group_update=first_bad), groups, tmp_path)
    assert fallbacks(caplog) == []
    assert stats(tmp_path)[-1]["retries"] == {"group_update": 2}
    assert pool == run(extractor_llm(), groups, tmp_path / "plain")


@pytest.mark.parametrize("reply", [
    "[]",
    '[{"operation": "NONE", "id": null, "content": null}]',
    '[{"operation": "DELETE", "id": "G0", "content": null}]',
])
def test_a_reconcile_dropping_every_proposal_is_not_applied(run, groups, tmp_path, caplog, reply):
    with caplog.at_level(logging.INFO):
        pool = run(extractor_llm(reconcile=reply), groups, tmp_path)
    assert fallbacks(caplog) == ["reconcile_dropped_all"]
    assert stats(tmp_path)[-1]["fallbacks"] == {"reconcile_dropped_all": 1}
    assert json.loads((tmp_path / "reconcile.json").read_text())["fallback"] is True
    # The proposals arrive as with a well-behaved reconcile (deterministic rules on all of them).
    assert pool == run(extractor_llm(), groups, tmp_path / "plain")


def test_a_reconcile_of_deletions_only_may_answer_nothing(run, groups, tmp_path, caplog):
    delete_g1 = json.dumps([{"operation": "DELETE", "id": "G1", "content": None}])
    with caplog.at_level(logging.INFO):
        pool = run(extractor_llm(group_update=delete_g1, reconcile="[]"), groups, tmp_path)
    assert fallbacks(caplog) == []  # no ADD/UPDATE was proposed: [] is a judgement, kept
    assert pool == SEED_POOL.renumbered()


def test_unknown_ids_update_becomes_add_delete_is_ignored(run, groups, tmp_path, caplog):
    def unknown(messages):
        proposal = good_group_update_ops(messages)[0]["content"]
        return json.dumps([{"operation": "UPDATE", "id": "G99", "content": proposal},
                           {"operation": "DELETE", "id": "G77", "content": None},
                           {"operation": "NONE", "id": None, "content": None},
                           {"operation": "UPDATE", "content": "no id"}])

    with caplog.at_level(logging.INFO):
        pool = run(extractor_llm(group_update=unknown), groups, tmp_path)
    assert fallbacks(caplog) == ["invalid_operation_dropped", "unknown_id_delete_ignored", "unknown_id_update_as_add"]
    assert_valid(pool, CONFIG.max_pool_size)
    assert len(pool) == 3  # both questions' UPDATE of G99 became the same ADD


def test_updates_and_deletes_of_known_ids(run, groups, tmp_path):
    def edit(messages):
        proposal = good_group_update_ops(messages)[0]["content"]
        if proposal == SHARED_LESSON:
            return json.dumps([{"operation": "UPDATE", "id": "G0", "content": "Query reformulation: When a search "
                                "fails, rephrase it."}, {"operation": "DELETE", "id": "G1", "content": None}])
        return json.dumps([{"operation": "UPDATE", "id": "G1", "content": "Overwritten."}])

    pool = run(extractor_llm(group_update=edit), groups, tmp_path)
    assert [item.text for item in pool] == ["Query reformulation: When a search fails, rephrase it."]
    assert pool.items[0].uid == SEED_POOL.items[0].uid and pool.items[0].iteration == 1


def test_pool_over_the_cap_is_consolidated(run, groups, tmp_path, caplog):
    config = ExtractionConfig(max_pool_size=3, max_retries=1, sampling=CONFIG.sampling)
    with caplog.at_level(logging.INFO):
        pool = run(extractor_llm(), groups, tmp_path, config=config)
    assert_valid(pool, 3)
    assert fallbacks(caplog) == []
    assert stats(tmp_path)[-1]["calls"]["consolidate"] == 1
    assert [item.uid for item in pool] == [item.uid for item in SEED_POOL] + [pool.items[2].uid]
    assert (tmp_path / "consolidated_pool.jsonl").exists()


@pytest.mark.parametrize("reply", [
    lambda m: json.dumps([text for _, text in current_lessons(task_prompt(m))]),  # every lesson: over the cap
    "",
    Reply(status=500, text="err"),
    "[]",
])
def test_failed_consolidation_truncates(run, groups, tmp_path, caplog, reply):
    config = ExtractionConfig(max_pool_size=3, max_retries=1, sampling=CONFIG.sampling)
    with caplog.at_level(logging.INFO):
        pool = run(extractor_llm(consolidate=reply), groups, tmp_path, config=config)
    assert fallbacks(caplog) == ["consolidate_truncate"]
    # The release keeps the first items: the seed pool, then the first new lesson.
    assert [item.text for item in pool] == [item.text for item in SEED_POOL] + [SHARED_LESSON]
    assert_valid(pool, 3)
    # Our switch: the seed pool was internalized already, so keep this run's three new lessons.
    with caplog.at_level(logging.INFO):
        ours = run(extractor_llm(consolidate=reply), groups, tmp_path / "new_first",
                   config=dataclasses.replace(config, truncation="new_first"))
    assert [item.text for item in ours][0] == SHARED_LESSON and len(ours) == 3
    assert all(item.iteration == 1 and item.writer == WRITER for item in ours)


def test_an_input_pool_over_a_lowered_cap_is_brought_under_it(run, groups, tmp_path):
    pool = run(extractor_llm(critique="no lessons"), groups, tmp_path,
               config=ExtractionConfig(max_pool_size=1, max_retries=0, sampling=CONFIG.sampling))
    assert [item.text for item in pool] == [SEED_POOL.items[0].text]


def test_every_stage_failing_still_yields_the_input_pool(run, groups, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        pool = run(lambda request: Reply(status=500, text="all down"), groups, tmp_path)
    assert pool == SEED_POOL.renumbered()
    assert fallbacks(caplog) == ["critique_no_lessons", "summary_from_trajectory"]


def test_all_correct_groups_are_skipped_unless_asked(run, tmp_path):
    capital = [g for g in group_rollouts(simweb_rollouts()) if g.task_id == "capital"]
    script = extractor_llm()
    assert run(script, capital, tmp_path / "skip") == SEED_POOL.renumbered()
    assert sum(script.hits.values()) == 0
    config = ExtractionConfig(informative_groups_only=False, sampling=CONFIG.sampling)
    assert len(run(script, capital, tmp_path / "all", config=config)) == 4


class Crash(Exception):
    pass


@pytest.mark.parametrize("crash_after", ["summary", "critique", "group_update", "reconcile", "consolidate"])
def test_a_rerun_after_a_crash_redoes_nothing_and_ends_the_same(run, groups, tmp_path, crash_after):
    config = ExtractionConfig(max_pool_size=4, max_retries=1, concurrency=4, sampling=CONFIG.sampling)
    reference_script = extractor_llm()
    reference = run(reference_script, groups, tmp_path / "reference", config=config)

    def crash(stage):
        if stage == crash_after:
            raise Crash(stage)

    script = extractor_llm()
    with pytest.raises(Crash):
        run(script, groups, tmp_path / "work", config=config, on_stage_done=crash)
    first = dict(script.hits)
    resumed = run(script, groups, tmp_path / "work", config=config)
    assert resumed == reference
    done = STAGES[: STAGES.index(crash_after) + 1]
    for stage, title in TITLES.items():
        expected_calls = reference_script.hits[title]
        assert script.hits[title] == expected_calls, stage  # over both runs, each call was made once
        if stage in done:
            assert first.get(title, 0) == expected_calls, stage
    # The finished work directory answers without any call.
    before = sum(script.hits.values())
    assert run(script, groups, tmp_path / "work", config=config) == reference
    assert sum(script.hits.values()) == before


def test_damaged_stage_files_are_redone_and_logged(run, groups, tmp_path, caplog):
    config = ExtractionConfig(max_pool_size=4, max_retries=0, sampling=CONFIG.sampling)
    reference = run(extractor_llm(), groups, tmp_path / "reference", config=config)

    def crash(stage):
        if stage == "consolidate":
            raise Crash(stage)

    with pytest.raises(Crash):
        run(extractor_llm(), groups, tmp_path / "work", config=config, on_stage_done=crash)
    work = tmp_path / "work"
    summary = sorted((work / "summaries").rglob("*.json"))[0]
    damaged = {
        summary: '{"summary": 3}',
        sorted((work / "critiques").glob("*.json"))[0]: "{not json",
        sorted((work / "group_updates").rglob("*.json"))[0]: '{"operations": [{"operation": "ADD", "content": 7}]}',
        work / "reconcile.json": '{"operations": "none"}',
        work / "consolidated_pool.jsonl": '{"id": "G0"}\n',
    }
    for path, text in damaged.items():
        path.write_text(text)
    script = extractor_llm()
    with caplog.at_level(logging.INFO):
        resumed = run(script, groups, work, config=config)
    assert resumed == reference
    assert fallbacks(caplog) == ["cache_damaged_redone"]
    logged = " ".join(r.getMessage() for r in caplog.records if "cache_damaged_redone" in r.getMessage())
    assert all(str(path) in logged for path in damaged)
    # Exactly the damaged items were asked again, and their files rewritten.
    assert {stage: script.hits[title] for stage, title in TITLES.items()} == {
        "summary": 1, "critique": 1, "group_update": 1, "reconcile": 1, "consolidate": 1}
    assert json.loads(summary.read_text())["summary"].startswith("The agent searched")
    assert stats(work)[-1]["fallbacks"] == {"cache_damaged_redone": 5}


def test_saved_reconcile_operations_must_fit_the_pool(run, groups, tmp_path, caplog):
    def crash(stage):
        if stage == "reconcile":
            raise Crash(stage)

    with pytest.raises(Crash):
        run(extractor_llm(), groups, tmp_path, on_stage_done=crash)
    saved = json.loads((tmp_path / "reconcile.json").read_text())
    saved["operations"].append({"operation": "DELETE", "id": "G9", "content": None})  # would raise KeyError
    (tmp_path / "reconcile.json").write_text(json.dumps(saved))
    with caplog.at_level(logging.INFO):
        pool = run(extractor_llm(), groups, tmp_path)
    assert fallbacks(caplog) == ["cache_damaged_redone"]
    assert pool == run(extractor_llm(), groups, tmp_path / "plain")


def test_a_crash_inside_a_stage_loses_only_the_batch_in_flight(run, server, groups, tmp_path):
    config = ExtractionConfig(concurrency=2, max_retries=0, sampling=CONFIG.sampling)
    reference = run(extractor_llm(), groups, tmp_path / "reference", config=config)

    class CrashOnSecondBatch:
        def __init__(self, inner):
            self.inner, self.calls = inner, 0

        def chat(self, conversations, params):
            self.calls += 1
            if self.calls == 2:
                raise Crash("killed mid-stage")
            return self.inner.chat(conversations, params)

    script = extractor_llm()
    backend = CrashOnSecondBatch(OpenAICompatible(server.url, "fake", retry=RETRY))
    with pytest.raises(Crash):
        run(script, groups, tmp_path / "work", config=config, backend=backend)
    assert len(list((tmp_path / "work" / "summaries").rglob("*.json"))) == 2  # the first batch of 2 persisted
    resumed = run(script, groups, tmp_path / "work", config=config)
    assert script.hits[TITLES["summary"]] == 6  # 2 before the crash + 4 after
    assert resumed == reference


def test_a_work_directory_refuses_different_inputs(run, groups, tmp_path):
    run(extractor_llm(), groups, tmp_path)
    with pytest.raises(ValueError, match="different inputs"):
        run(extractor_llm(), groups[:1], tmp_path)
    # Retries and batch size do not change what is asked: the same directory is accepted.
    run(extractor_llm(), groups, tmp_path, config=ExtractionConfig(
        max_retries=3, concurrency=1, sampling=CONFIG.sampling))


def test_groups_must_have_distinct_task_ids(run, groups, tmp_path):
    with pytest.raises(ValueError, match=r"share task ids \['founding'\]"):
        run(extractor_llm(), [groups[0], groups[0]], tmp_path)


def test_release_rollouts_feed_the_pipeline(run, tmp_path, release_file):
    groups = group_rollouts(read_release_rollouts(release_file("official_rollout_example.jsonl")))
    script = extractor_llm()
    # Both example tasks failed every rollout (mean reward 0): not informative by default.
    assert run(script, groups, tmp_path / "informative") == SEED_POOL.renumbered()
    assert sum(script.hits.values()) == 0
    config = ExtractionConfig(informative_groups_only=False, sampling=CONFIG.sampling)
    pool = run(script, groups, tmp_path / "all", config=config)
    assert len(pool) == 5 and {s for item in pool for s in item.source_task_ids} == {"3", "52"}


# --- the release's mechanics (issue 12, item 5) and our switches -------------------------------

def prompts_of(stage):
    """A good responder for ``stage`` that also records each prompt it answers."""
    captured = []
    good = good_responders()[stage]
    return captured, lambda messages: captured.append(task_prompt(messages)) or good(messages)


def test_the_experience_llm_samples_as_the_release_does():
    sampling = ExtractionConfig().sampling  # training_free_grpo/llm.py: temperature 0, max_tokens 8192
    assert (sampling.temperature, sampling.max_tokens) == (0.0, 8192)
    defaults = ExtractionConfig()
    assert (defaults.summary, defaults.critique_sees_pool, defaults.group_update, defaults.truncation,
            defaults.max_message_chars) == ("release", False, "per_query", "first", None)
    for bad in (dict(summary="short"), dict(group_update="per_batch"), dict(truncation="last")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ExtractionConfig(**bad)


def test_the_summary_is_not_shown_the_verdict_and_keeps_every_tool_result(run, groups, tmp_path):
    captured, summary = prompts_of("summary")
    run(extractor_llm(summary=summary), groups, tmp_path, config=dataclasses.replace(CONFIG, max_message_chars=None))
    assert len(captured) == 6
    for prompt in captured:
        assert "### Outcome" not in prompt and "reward" not in prompt and "200 words" not in prompt
        assert "### Reference answer" in prompt and "whether the agent used it or not" in prompt
        assert "characters cut" not in prompt  # messages are shown whole
    compact, summary = prompts_of("summary")
    run(extractor_llm(summary=summary), groups, tmp_path / "compact",
        config=dataclasses.replace(CONFIG, summary="compact"))
    assert all("### Outcome" in p and "200 words" in p for p in compact)


def test_the_critique_does_not_see_the_pool_unless_asked(run, groups, tmp_path):
    captured, critique = prompts_of("critique")
    run(extractor_llm(critique=critique), groups, tmp_path)
    assert captured and all("### Current lessons" not in p and SEED_POOL.items[0].text not in p for p in captured)
    assert all("<Reflection>" in p and "Comparative Analysis" in p for p in captured)
    ours, critique = prompts_of("critique")
    run(extractor_llm(critique=critique), groups, tmp_path / "ours",
        config=dataclasses.replace(CONFIG, critique_sees_pool=True))
    assert all(SEED_POOL.items[0].text in p for p in ours)


def test_group_update_is_one_call_per_query_covering_its_lessons(run, groups, tmp_path):
    captured, group_update = prompts_of("group_update")
    pool = run(extractor_llm(group_update=group_update), groups, tmp_path)
    assert len(captured) == 2 and all("### New lessons\n1. " in p and "exactly 2 entries" in p for p in captured)
    saved = sorted((tmp_path / "group_updates").glob("*.json"))
    assert len(saved) == 2 and all(len(json.loads(f.read_text())["proposals"]) == 2 for f in saved)
    per_lesson, group_update = prompts_of("group_update")
    ours = run(extractor_llm(group_update=group_update), groups, tmp_path / "ours",
               config=dataclasses.replace(CONFIG, group_update="per_lesson"))
    assert len(per_lesson) == 4 and all("### Proposed lesson" in p for p in per_lesson)
    assert [item.text for item in ours] == [item.text for item in pool]


def test_a_failed_per_query_group_update_adds_all_its_lessons(run, groups, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        pool = run(extractor_llm(group_update="no json"), groups, tmp_path)
    assert fallbacks(caplog) == ["group_update_as_add"]
    assert stats(tmp_path)[-1]["fallbacks"] == {"group_update_as_add": 2}
    assert len(pool) == 5 and [item.text for item in pool].count(SHARED_LESSON) == 1
