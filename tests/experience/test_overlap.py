"""The task-overlap rule (issue 12, item 10): evaluation apart always, extraction and teacher apart for instance."""

import pytest

from expint_jax.experience.overlap import TaskOverlapError, check_task_overlap


def test_principle_pools_may_share_extraction_and_teacher_tasks():
    check_task_overlap(["a", "b"], ["b", "c"], ["z"], granularity="principle")


def test_instance_pools_may_not_unless_asked():
    with pytest.raises(TaskOverlapError, match=r"extraction and teacher tasks share 1 ids \(b\).*answer"):
        check_task_overlap(["a", "b"], ["b", "c"], ["z"], granularity="instance")
    check_task_overlap(["a", "b"], ["b", "c"], ["z"], granularity="instance", allow_instance_overlap=True)


@pytest.mark.parametrize("granularity", ["principle", "instance"])
def test_evaluation_never_overlaps(granularity):
    with pytest.raises(TaskOverlapError, match="evaluation and extraction tasks share 1 ids \\(a\\); "
                                               "evaluation and teacher tasks share 1 ids \\(c\\)"):
        check_task_overlap(["a"], ["c"], ["a", "c"], granularity=granularity, allow_instance_overlap=True)
    many = [str(i) for i in range(12)]
    with pytest.raises(TaskOverlapError, match=r"share 12 ids \(0, 1, 10, 11, 2, 3, 4, 5, 6, 7, \.\.\.\)"):
        check_task_overlap(many, [], many, granularity=granularity)
    with pytest.raises(ValueError, match="granularity"):
        check_task_overlap([], [], [], granularity="coarse")
