"""The loop under multi-controller JAX equals the loop in one process (issue 15, item 3).

One iteration of ``configs/loop_tiny.py`` runs twice: as 2 processes with 2 fake CPU devices each
(``jax.distributed`` on localhost, gloo collectives) and as 1 process with 4 devices, both on the
mesh (data=1, fsdp=4), in four cases (``CASES``): ``policy.backend='reference'`` makes every stage
see real data (a pool of lessons, accepted teacher rollouts, a trained step); the default local
backend (the tiny random network acts through the local engine; its groups are uninformative, so
the policy is kept); the on-policy regime over two rounds (process 0 samples the student between
them); and a policy server (a scripted stand-in process 0 starts for each acting stage, serving
π_0 that process 0 exported alone).

What must be equal:
  * bitwise: every file the acting stages wrote (rollouts, pool, diff, granularity, base
    evaluation, held-out and accepted teacher rollouts, acceptance), every non-float field of the
    train and eval stages' files (the student's samples, the evaluation rollouts), every accuracy
    figure of both evaluations, the set of files in the run; only wall-clock fields (``elapsed_s``, ``seconds``, ``finished_at``, the trainer's throughput)
    and the ``runs_dir`` in ``config.json`` are left out;
  * to float32 tolerance: the trained parameters (the two runs differ by at most 1 % of how far
    training moved the parameters from π_0) and the floats of the train and eval stages' files
    (relative 1e-5: the trainer's losses and KL). Bitwise equality is not expected there: sums over
    the 4 devices (the gradient, the loss) run inside one process in one case and through gloo
    across two in the other, in another order (the first step's summed loss already differs in its
    last bit in ``on_policy``), and Adam's update m / (sqrt(v) + eps) turns the last-bit
    differences of gradient entries near zero into larger parameter differences, which later
    steps carry on. Measured: after the one step of ``reference``, 963 of 9.8M parameters differ,
    by at most 4.4e-6 (the step moved them by up to 1e-3); after the four steps of ``on_policy``,
    by at most 1.6e-5, and the held-out KL after training by 1.0e-6 relative.

And process 1 writes nothing under the runs directory: its file-system writes, recorded through
Python's audit events (``multihost_worker``), are empty apart from the trainer's orbax checkpoint,
which orbax writes collectively (each process its own array shards); process 0's are not.

These runs take minutes (``slow``); the start-up checks of ``loop.hosts`` are fast tests here, and
``tests/parallel/test_coordination.py`` runs the waits between real processes in seconds.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from expint_jax.config import ConfigError
from expint_jax.loop import hosts
from expint_jax.parallel.coordination import Processes
from tests.loop.conftest import loop_config
from tests.multiprocess import REPO, run_processes, single_env

ARGS = ["--config", "configs/loop_tiny.py", "--config.mesh.devices=0", "--config.mesh.fsdp=-1"]
VOLATILE = {"elapsed_s", "seconds", "finished_at", "loss_tokens_per_second", "student_tokens_per_second",
            "step_seconds"}
SCRIPTED_SERVER = ("{python} -m tests.fakes.policy_server --scripted --checkpoint {checkpoint} --host {host} "
                   "--port {port} --model-name {model_name}")
CASES = {  # extra arguments of each compared pair of runs
    "reference": ["--config.policy.backend=reference"],
    "local": ["--config.policy.backend=local"],
    # two rounds: process 0 samples round 1 with the student that round 0 exported
    "on_policy": ["--config.policy.backend=reference", "--config.distill.regime=on_policy",
                  "--config.trainer.epochs=2"],
    # process 0 exports π_0 alone and serves it (a scripted server: always wrong, so π_0 is kept)
    "server": ["--config.policy.backend=server", f"--config.policy.server.command={SCRIPTED_SERVER}"],
}
TRAINS = {"reference": True, "local": False, "on_policy": True, "server": False}  # else the policy is kept
ORBAX = "/trainer/checkpoints/"
# Floats of these stages come after a training step: compared to float tolerance, the rest bitwise.
TRAINED = ("iter_000/train/", "iter_000/eval/")


def _run_both(root: Path, case: str) -> dict[str, Path]:
    import subprocess
    import sys

    args = [*ARGS, *CASES[case]]
    cache = {"EXPINT_CACHE_DIR": str(root / "cache")}
    dirs = {name: root / name for name in ("single", "multi", "single_writes", "multi_writes")}
    for d in dirs.values():
        d.mkdir()
    single = subprocess.run([sys.executable, "-m", "tests.loop.multihost_worker", str(dirs["single_writes"]),
                             str(dirs["single"]), *args], cwd=REPO, env=single_env(4, cache), capture_output=True,
                            text=True, timeout=1200)
    assert single.returncode == 0, single.stderr[-4000:]
    multi = run_processes(["-m", "tests.loop.multihost_worker", str(dirs["multi_writes"]), str(dirs["multi"]), *args],
                          count=2, devices=2, extra_env=cache, timeout=1800)
    for index, process in enumerate(multi):
        assert process.returncode == 0, f"process {index}:\n{process.stderr[-4000:]}"
    assert "process 1 of 2: process 0 acts and writes the run" in multi[1].stdout
    assert "iter_000/train:" in multi[0].stdout and "iter_000/train:" not in multi[1].stdout
    return dirs


@pytest.fixture(scope="module", params=list(CASES))
def runs(request, tmp_path_factory):
    return request.param, _run_both(tmp_path_factory.mktemp(f"multihost_{request.param}"), request.param)


def _files(run_dir: Path) -> set[str]:
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*")
            if p.is_file() and ORBAX not in f"/{p.relative_to(run_dir)}" and "tfevents" not in p.name}


def _records(path: Path) -> list:
    text = path.read_text()
    rows = [json.loads(text)] if path.suffix == ".json" else [json.loads(line) for line in text.splitlines()]
    return [_stable(row) for row in rows]


def _stable(value):
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in VOLATILE and k != "runs_dir"}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def _close(a, b, where: str, rel: float) -> list[str]:
    """Paths where ``a`` and ``b`` differ: floats beyond ``rel``, anything else at all."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{where}: keys {sorted(set(a) ^ set(b))}"]
        return [d for k in a for d in _close(a[k], b[k], f"{where}.{k}", rel)]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} vs {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _close(x, y, f"{where}[{i}]", rel)]
    if isinstance(a, float) and isinstance(b, float) and rel:
        return [] if math.isclose(a, b, rel_tol=rel, abs_tol=1e-12) else [f"{where}: {a} vs {b}"]
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]


@pytest.mark.slow
def test_multi_process_run_equals_the_single_process_run(runs):
    case, dirs = runs
    single, multi = dirs["single"] / "loop_tiny", dirs["multi"] / "loop_tiny"
    files = _files(single)
    assert files == _files(multi)
    assert {"iter_000/extract/pool.jsonl", "iter_000/eval/eval.json", "iter_000/train/policy/model.safetensors"} <= files
    if case == "reference":  # every stage saw real data
        assert "iter_000/data/accepted.jsonl" in files and (single / "iter_000/extract/pool.jsonl").read_text()
        assert (single / "iter_000/data/accepted.jsonl").read_text()
    differences = []
    for name in sorted(f for f in files if f.endswith((".json", ".jsonl"))):
        rel = 1e-5 if name.startswith(TRAINED) else 0.0
        differences += _close(_records(single / name), _records(multi / name), name, rel)
    assert differences == []
    for name in ("iter_000/base_eval/eval.json", "iter_000/eval/eval.json"):  # accuracy figures: bitwise
        a, b = _records(single / name)[0], _records(multi / name)[0]
        assert {m: a[m] for m in ("none", "global", "stepwise")} == {m: b[m] for m in ("none", "global", "stepwise")}
    if case == "on_policy":  # process 0 sampled both rounds, the second with round 0's student
        assert {"iter_000/train/round_000/annotated.jsonl", "iter_000/train/round_001/annotated.jsonl"} <= files
    assert any(f.endswith("metrics/train.jsonl") for f in files) == TRAINS[case]
    if case == "server":
        assert any(f.startswith("base_policy_") for f in files) and "iter_000/rollouts/server.log" in files


@pytest.mark.slow
def test_multi_process_policy_equals_the_single_process_policy(runs, tmp_path):
    from safetensors.numpy import load_file

    from expint_jax.models.hf import save_checkpoint
    from expint_jax.models.source import build_model

    case, dirs = runs
    single, multi = (load_file(d / "loop_tiny/iter_000/train/policy/model.safetensors")
                     for d in (dirs["single"], dirs["multi"]))
    assert single.keys() == multi.keys()
    status = json.loads((dirs["single"] / "loop_tiny/iter_000/train/done.json").read_text())["summary"]["status"]
    assert status == ("trained" if TRAINS[case] else "kept_policy")
    worst = max(float(np.max(np.abs(single[k] - multi[k]))) for k in single)
    if status == "kept_policy":  # π_0 re-exported: gathered across processes, bitwise
        assert worst == 0.0
        return
    base = load_file(save_checkpoint(build_model(loop_config(tmp_path).model), tmp_path / "pi_0") / "model.safetensors")
    moved = max(float(np.max(np.abs(single[k] - base[k]))) for k in single)
    assert moved > 5e-4 and worst <= 0.01 * moved, (worst, moved)  # trained, and the runs agree to 1 % of that


@pytest.mark.slow
def test_only_process_zero_writes_the_run(runs):
    _, dirs = runs
    logs = {p.name: json.loads(p.read_text()) for p in dirs["multi_writes"].iterdir()}
    assert set(logs) == {"process_0.json", "process_1.json"}
    others = [w for w in logs["process_1.json"]["writes"] if not any(ORBAX in path for path in w[1:])]
    assert others == []
    written = {Path(path).name for w in logs["process_0.json"]["writes"] for path in w[1:]}
    assert {"claim.json", "done.json", "pool.jsonl", "eval.json", "config.json", "report.md"} <= written


# ---------------------------------------------------------------- start-up checks (fast)


def _mesh(devices: int):
    from expint_jax.parallel.mesh import MeshConfig, make_mesh

    return make_mesh(MeshConfig(devices=devices))


def test_one_process_passes_every_check_and_acts_on_the_run_itself(tmp_path):
    config = loop_config(tmp_path, distill__regime="on_policy")
    hosts.check(config, _mesh(1), Processes())
    run = object()
    assert hosts.acting_run(run, Processes()) is run


@pytest.mark.parametrize("overrides, message", [
    ({"trainer__batching__rows": 4}, "config.trainer.batching.rows=4: every one of the 3 processes"),
    ({"trainer__batching__rows": 6}, r"config.mesh: the mesh uses the devices of processes \[0\] only, but 3 "),
])
def test_what_cannot_run_on_several_processes_is_refused_naming_the_key(tmp_path, overrides, message):
    config = loop_config(tmp_path, **overrides)
    with pytest.raises(ConfigError, match=message):
        hosts.check(config, _mesh(8), Processes(index=1, count=3))


def test_process_zero_acts_on_its_own_devices_with_the_runs_tensor_axis():
    import jax

    from expint_jax.parallel.mesh import MeshConfig

    mesh = hosts.acting_mesh(MeshConfig(data=2, fsdp=2, tensor=2), jax.devices()[:4])
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="do not divide"):
        hosts.acting_mesh(MeshConfig(tensor=3), jax.devices()[:4])


def test_a_stage_failing_on_process_zero_stops_every_process_with_one_line(tmp_path):
    """Process 0's writer endpoint is unreachable at ``extract``: it fails the stage as one process
    would, and process 1, waiting for that stage, stops at once with one line naming both."""
    args = [*ARGS, "--config.policy.backend=reference", "--config.extract.writer=llm",
            "--config.extract.endpoint.base_url=http://127.0.0.1:9/v1", "--config.extract.endpoint.model=writer-model",
            "--config.extract.endpoint.max_attempts=1", "--config.extract.endpoint.timeout_s=5",
            f"--config.runs_dir={tmp_path}"]
    leader, other = run_processes(["-m", "expint_jax.cli", "run", *args], count=2, devices=2, timeout=600)
    failure = "EndpointError: endpoint http://127.0.0.1:9/v1 (model writer-model)"
    lines = [line for line in leader.stderr.splitlines() if line.startswith("expint run:")]
    assert leader.returncode == 2 and len(lines) == 1 and lines[0].startswith(
        "expint run: endpoint http://127.0.0.1:9/v1 (model writer-model)"), leader.stderr[-3000:]
    lines = [line for line in other.stderr.splitlines() if line.startswith("expint run:")]
    assert other.returncode == 2 and len(lines) == 1, other.stderr[-3000:]
    assert lines[0].startswith(f"expint run: process 1: process 0 failed at iter_000/extract: {failure}")
    assert (tmp_path / "loop_tiny/iter_000/rollouts/done.json").exists()
    assert (tmp_path / "loop_tiny/iter_000/extract.partial").is_dir()  # left for a rerun to resume


def test_a_file_process_zero_wrote_is_awaited_until_this_host_sees_it(tmp_path, monkeypatch):
    import threading

    samples = tmp_path / "round_001" / "annotated.jsonl"
    samples.parent.mkdir()
    threading.Timer(0.6, samples.write_text, args=("{}\n",)).start()  # a shared file system showing it late
    hosts.await_visible(samples, Processes(index=1, count=2), what="train/round_001 (student samples)")
    assert samples.exists()
    monkeypatch.setattr(hosts, "VISIBLE_WAIT_S", 0.2)
    with pytest.raises(ConfigError, match=r"process 1: process 0 published train/round_002 \(student samples\) but "
                                          r".*round_002/annotated.jsonl is not visible here after 0 s"):
        hosts.await_visible(tmp_path / "round_002" / "annotated.jsonl", Processes(index=1, count=2),
                            what="train/round_002 (student samples)")
