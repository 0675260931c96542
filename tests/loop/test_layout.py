"""Stage folders: published whole, keyed, stale configurations caught, restarts clean."""

import pytest

from expint_jax.loop.layout import StageDir, StageId, StaleStageError, differing_keys, restart


def test_a_stage_is_partial_until_published_and_its_key_is_checked(tmp_path):
    stage = StageDir(tmp_path, StageId(1, "extract"))
    key = {"extract": {"samples": 4, "writer": "offline"}, "rollouts": "abc"}
    work = stage.begin(key)
    assert work == tmp_path / "iter_001" / "extract.partial" and not stage.is_done()
    (work / "pool.jsonl").write_text("{}\n")
    with pytest.raises(StaleStageError, match=r"iter_001/extract \(partial.*differing keys extract.samples"):
        stage.begin({**key, "extract": {"samples": 8, "writer": "offline"}})
    stage.publish(key, {"pool_size": 1})
    assert stage.is_done() and not stage.partial.exists() and (stage.final / "pool.jsonl").exists()
    assert stage.marker()["summary"] == {"pool_size": 1}
    stage.check(key)
    with pytest.raises(StaleStageError, match=r"finished.*differing keys extract.writer, rollouts; rerun with "
                                              r"--restart-from extract"):
        stage.check({"extract": {"samples": 4, "writer": "llm"}, "rollouts": "xyz"})
    assert restart(tmp_path, [StageId(1, "extract"), StageId(1, "data")]) == [StageId(1, "extract")]
    assert not stage.final.exists() and not (tmp_path / ".trash").exists()


def test_differing_keys_walks_nested_mappings():
    assert differing_keys({"a": {"b": 1, "c": 2}, "d": 3}, {"a": {"b": 1, "c": 5}, "e": 3}) == ["a.c", "d", "e"]
    assert differing_keys({"a": 1}, {"a": 1}) == []
