"""The experience bank: identity across edits, diffs, files in both formats, validation."""

import json

import pytest

from expint_jax.experience.bank import (
    DEFAULT_MAX_POOL_SIZE,
    ExperienceItem,
    ExperiencePool,
    PoolError,
    diff_pools,
    read_pool,
    write_pool,
    write_pool_files,
)
from expint_jax.experience.extract import ExtractionConfig
from expint_jax.experience import granularity
from expint_jax.experience.granularity import analyze_pool
from expint_jax.rollout.envs.simweb.writer import OfflineWriterConfig


def pool_of(*texts, iteration=1):
    pool = ExperiencePool()
    for text in texts:
        pool = pool.add(text, granularity="principle", iteration=iteration, source_task_ids=["t"])
    return pool


def test_edits_are_pure_and_keep_uids_across_renumbering():
    pool = pool_of("a lesson", "b lesson", "c lesson")
    assert pool.ids == ("G0", "G1", "G2")
    edited = pool.delete("G0").update("G2", "c lesson, refined", iteration=2, source_task_ids=["u"])
    assert pool.ids == ("G0", "G1", "G2")  # the original is untouched
    assert edited.ids == ("G1", "G2")
    renumbered = edited.add("d lesson", granularity="principle", iteration=2).renumbered()
    assert renumbered.ids == ("G0", "G1", "G2")
    assert [i.uid for i in renumbered][:2] == [i.uid for i in pool][1:]
    refined = renumbered.get("G1")
    assert (refined.text, refined.iteration, refined.source_task_ids) == ("c lesson, refined", 2, ("t", "u"))
    assert renumbered.as_mapping() == {"G0": "b lesson", "G1": "c lesson, refined", "G2": "d lesson"}


def test_add_uses_the_next_free_display_id():
    pool = pool_of("a", "b", "c").delete("G1")
    assert pool.add("d", granularity="instance").ids == ("G0", "G2", "G3")


def test_uids_are_deterministic_and_unique_for_repeated_text():
    first, second = pool_of("same", "same"), pool_of("same", "same")
    assert [i.uid for i in first] == [i.uid for i in second]
    assert len({i.uid for i in first}) == 2


def test_diff_tracks_identity_not_display_ids():
    before = pool_of("keep", "change", "drop")
    after = before.delete("G2").update("G1", "changed", iteration=2).add("new", granularity="principle", iteration=2)
    after = after.delete("G0").add("keep again", granularity="principle").renumbered()  # ids all shift
    diff = diff_pools(before, after)
    assert [i.text for i in diff.added] == ["new", "keep again"]
    assert [(b.text, a.text) for b, a in diff.updated] == [("change", "changed")]
    assert [i.text for i in diff.deleted] == ["keep", "drop"]
    assert diff.unchanged == ()
    assert diff.summary() == "+2 added, ~1 updated, -2 deleted, 0 unchanged"
    assert json.loads(json.dumps(diff.to_json()))["updated"][0]["after"]["text"] == "changed"
    assert diff_pools(after, after).unchanged == after.items


def test_rewritten_continues_named_items_and_numbers_in_order():
    pool = pool_of("a", "b", "c")
    rewritten = pool.rewritten([("G2", "c"), ("G0", "a and b merged"), (None, "fresh"), ("G0", "dup claim")],
                               granularity="principle", iteration=5)
    assert rewritten.ids == ("G0", "G1", "G2", "G3")
    uids = {i.text: i.uid for i in pool}
    assert rewritten.items[0].uid == uids["c"] and rewritten.items[0].iteration == 1  # unchanged text
    assert rewritten.items[1].uid == uids["a"] and rewritten.items[1].iteration == 5
    assert rewritten.items[2].uid not in uids.values() and rewritten.items[3].uid != uids["a"]


def test_truncated_keeps_pool_order():
    assert pool_of("a", "b", "c").truncated(2).as_mapping() == {"G0": "a", "G1": "b"}


def test_truncated_after_an_edit_keeps_new_and_rewritten_lessons_first():
    before = pool_of("a", "b", "c", iteration=0)
    after = before.update("G1", "b2", iteration=1).add("d", granularity="principle", iteration=1)
    after = after.add("e", granularity="principle", iteration=1)
    # Rewritten b2 and additions d, e win over the unchanged a and c; pool order is kept.
    assert list(after.truncated(3, previous=before).as_mapping().values()) == ["b2", "d", "e"]
    assert list(after.truncated(4, previous=before).as_mapping().values()) == ["a", "b2", "d", "e"]
    # More new lessons than room: the first of them in pool order.
    assert list(after.truncated(2, previous=before).as_mapping().values()) == ["b2", "d"]
    # Nothing new: the first items, as without ``previous``.
    assert before.truncated(2, previous=before) == before.truncated(2)


def test_default_cap_is_the_papers_fifty():
    assert DEFAULT_MAX_POOL_SIZE == 50
    assert ExtractionConfig().max_pool_size == OfflineWriterConfig().max_pool_size == 50


def test_release_pool_round_trips_byte_for_byte(tmp_path, release_file):
    release_pool = release_file("official_experiences_example.json")
    pool = read_pool(release_pool)
    assert len(pool) == 15 and pool.ids == tuple(f"G{k}" for k in range(15))
    assert all(item.granularity == "principle" and item.iteration is None for item in pool)
    out = tmp_path / "out.json"
    write_pool(out, pool)
    assert out.read_bytes() == release_pool.read_bytes()


def test_our_jsonl_round_trips_everything(tmp_path):
    pool = pool_of("a", "ünïcödé — lesson").update("G0", "a2", iteration=3, source_task_ids=["x"], writer="w")
    assert pool.items[0].writer == "w" and pool.items[1].writer is None
    write_pool(tmp_path / "p.jsonl", pool)
    assert read_pool(tmp_path / "p.jsonl") == pool
    # Files written before items had a writer still read (writer unknown).
    (tmp_path / "old.jsonl").write_text('{"id": "G0", "text": "t", "granularity": "principle", "uid": "u"}\n')
    assert read_pool(tmp_path / "old.jsonl").items[0].writer is None
    write_pool(tmp_path / "empty.jsonl", ExperiencePool())
    assert read_pool(tmp_path / "empty.jsonl") == ExperiencePool()


def test_flat_import_keeps_key_order_and_granularity(tmp_path):
    path = tmp_path / "pool.json"
    path.write_text('{"G10": "x", "G2": "y", "custom": "z"}')
    pool = read_pool(path, granularity="instance")
    assert pool.ids == ("G10", "G2", "custom") and pool.items[0].granularity == "instance"
    assert pool.renumbered().as_mapping() == {"G0": "x", "G1": "y", "G2": "z"}


@pytest.mark.parametrize("content, match", [
    ('{"G0": "a", "G0": "b"}', "'G0' appears twice"),
    ('{"G0": 3}', "key 'G0'"),
    ('{"G0": "  "}', "key 'G0'"),
    ('["a"]', "expected a JSON object"),
    ('{"G0": "a",}', "not valid JSON"),
])
def test_bad_flat_pools_name_file_and_key(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as info:
        read_pool(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("line, match", [
    ("not json", r"bad.jsonl:2: not valid JSON"),
    ('{"id": "G1", "text": "t", "granularity": "coarse", "uid": "u2"}', r"bad.jsonl:2: .*'coarse'"),
    ('{"id": "G1", "text": "t", "granularity": "principle"}', r"bad.jsonl:2: key 'uid'"),
    ('{"id": "G1", "text": "t", "granularity": "principle", "uid": "u2", "iteration": "1"}', "'iteration'"),
    ('{"id": "G1", "text": "t", "granularity": "principle", "uid": "u2", "writer": 7}', "'writer'"),
    ('{"id": "G0", "text": "t", "granularity": "principle", "uid": "u2"}', "two items with id 'G0'"),
    ('{"id": "G1", "text": "t", "granularity": "principle", "uid": "u1"}', "two items with uid 'u1'"),
])
def test_bad_jsonl_pools_name_file_line_and_key(tmp_path, line, match):
    path = tmp_path / "bad.jsonl"
    good = '{"id": "G0", "text": "t", "granularity": "principle", "uid": "u1"}'
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(PoolError, match=match):
        read_pool(path)


def test_missing_file_and_unknown_suffix_are_clear(tmp_path):
    with pytest.raises(PoolError, match="does not exist"):
        read_pool(tmp_path / "none.jsonl")
    with pytest.raises(PoolError, match=r"\.jsonl .* or \.json"):
        write_pool(tmp_path / "pool.txt", ExperiencePool())


def test_item_validation():
    with pytest.raises(PoolError, match="text must be a non-empty string"):
        ExperienceItem("G0", " ", "principle", "u")
    with pytest.raises(KeyError, match="no experience item with id 'G9'"):
        pool_of("a").get("G9")


def test_pool_files_hold_both_formats_and_the_granularity_report(tmp_path):
    pool = ExperiencePool.from_mapping({"G0": "When a page fails, go back.", "G1": "The answer is on ciga.me."},
                                       granularity="instance", iteration=1)
    path = write_pool_files(tmp_path / "extract", pool)
    assert path == tmp_path / "extract" / "pool.jsonl" and read_pool(path) == pool
    assert json.loads((tmp_path / "extract" / "pool.json").read_text()) == pool.as_mapping()
    assert granularity.read_report(tmp_path / "extract" / "granularity.json") == analyze_pool(pool)
    assert json.loads((tmp_path / "extract" / "granularity.json").read_text())["url_share"] == 0.5
