"""``kill -9`` at seven points over both iterations of a 2-iteration run: it completes, no finished
stage is redone, and pools, evaluations and parameters equal an uninterrupted run's bitwise."""

import pytest

from tests.loop import kill_resume


@pytest.mark.slow  # ten loop processes (~10 min on a shared 2-core CPU)
def test_a_run_killed_at_every_stage_ends_as_an_uninterrupted_one(tmp_path):
    result = kill_resume.check(tmp_path)
    assert len(result["kills"]) >= 5, result
    assert result["redone"] == [] and result["differing"] == [] and result["files_compared"] >= 8, result
