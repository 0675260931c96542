"""Host work done once under multi-controller JAX (``parallel.coordination``), with real processes."""

import json

import pytest

from expint_jax.parallel.coordination import Processes
from tests.multiprocess import run_processes


def test_one_process_runs_the_work_itself():
    assert Processes().leader_runs("anything", lambda: {"x": 1}) == {"x": 1}


@pytest.fixture(scope="module")
def two_processes():
    done = run_processes(["-m", "tests.parallel.coordination_worker"], count=2, devices=1,
                         extra_env={"EXPINT_START_TIMEOUT_S": "3"}, timeout=300)
    for process in done:
        assert process.returncode == 0, process.stderr[-3000:]
    return [json.loads(process.stdout.strip().splitlines()[-1]) for process in done]


def test_process_zero_runs_the_work_once_and_every_process_gets_its_result(two_processes):
    leader, other = two_processes
    assert (leader["index"], other["index"], leader["count"]) == (0, 1, 2)
    assert leader["value"] == other["value"] == {"pool": ["G0", "G1"]}
    assert (leader["ran"], other["ran"]) == (1, 0)


def test_a_failure_on_process_zero_reaches_the_others_as_one_line(two_processes):
    leader, other = two_processes
    assert leader["failing"] == "ValueError: bad record at tasks.jsonl:3"
    assert other["failing"] == ("LeaderFailed: process 1: process 0 failed at failing: "
                                "ValueError: bad record at tasks.jsonl:3")


def test_a_process_waiting_for_a_call_process_zero_never_makes_times_out_naming_both(two_processes):
    leader, other = two_processes
    assert "desync" not in leader
    assert other["desync"].startswith("WaitTimeout: process 1: waited 3 s for process 0 to reach expected (call 3); "
                                      "process 0 last announced 'other' (call 3).")
    assert "EXPINT_START_TIMEOUT_S" in other["desync"]
