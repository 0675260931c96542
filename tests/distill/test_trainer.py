"""The distillation trainer: SIGKILL and resume equals an uninterrupted run bitwise, metrics without
duplicates, TensorBoard events, non-finite stops that keep the last good checkpoint, exact eval."""

import dataclasses
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec
from tensorboardX.proto import event_pb2

from expint_jax.distill.batch import collate
from expint_jax.distill.batch import batch_shape
from expint_jax.distill.pipeline import BatchIterator, BatchingConfig, ExampleSet, build_examples
from expint_jax.distill.losses import Divergence
from expint_jax.distill.metrics_log import MetricsLog, read_metrics
from expint_jax.distill.optim import MasterWeightsState, OptimizerConfig
from expint_jax.distill.step import StepConfig, make_eval_step
from expint_jax.parallel.placement import shard_batch
from expint_jax.distill.trainer import TrainerConfig, TrainingDiverged, train
from expint_jax.models.config import DTypePolicy, tiny
from expint_jax.models.qwen3 import Qwen3
from expint_jax.parallel.mesh import MeshConfig, make_mesh
from tests.distill.conftest import make_trajectory

REPO = Path(__file__).resolve().parents[2]
VOCAB = 512  # real token ids folded into a small vocabulary: the layouts stay real, steps stay cheap
MODEL = tiny(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
             head_dim=8)
STEPS = 9  # 12 examples, 4 rows, 3 epochs
BATCHES_PER_EPOCH = 3
TIMING = ("loss_tokens_per_second", "student_tokens_per_second", "step_seconds")


def _small_vocab(data: ExampleSet) -> ExampleSet:
    fold = lambda e: dataclasses.replace(e, student_ids=e.student_ids % VOCAB,  # noqa: E731
                                         teacher_ids=e.teacher_ids % VOCAB, targets=e.targets % VOCAB)
    return ExampleSet(tuple(fold(e) for e in data.examples), data.counts)


@pytest.fixture(scope="module")
def data(chat):
    kinds = ("stepwise", "global", "none")
    train_set = [(f"train:{i}", make_trajectory(1 + i % 3, kinds[i % 3], task_id=f"train{i}")) for i in range(12)]
    eval_set = [(f"eval:{i}", make_trajectory(1 + i % 3, kinds[(i + 1) % 3], task_id=f"eval{i}")) for i in range(6)]
    return _small_vocab(build_examples(train_set, chat)), _small_vocab(build_examples(eval_set, chat))


def _config(**overrides) -> TrainerConfig:
    base = dict(step=StepConfig(Divergence("forward_kl"), chunk_size=256, micro_batches=2),
                # one bucket (512) holds every example: one compiled train program, one eval program
                batching=BatchingConfig(rows=4, seed=3, min_bucket=512),
                # checkpoints at steps 2, 4, 6, 8, 9: three of them mid-epoch (3 batches per epoch)
                optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=2), epochs=3, checkpoint_every=2,
                keep_checkpoints=2, eval_every=4, log_every=1, progress_bar=False)
    return TrainerConfig(**{**base, **overrides})


def _checkpoint_steps(run_dir: Path) -> list[int]:
    directory = run_dir / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.exists() else []


def _logged_steps(path: Path) -> list[int]:
    return [row["step"] for row in read_metrics(path, allow_partial_last_line=True)] if path.exists() else []


# ---------------------------------------------------------------- kill and resume


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """An uninterrupted run, and a run SIGKILLed after a mid-epoch checkpoint (with rows logged past
    it), then resumed: the resumed run must restore a data iterator stopped inside an epoch."""
    root = tmp_path_factory.mktemp("kill_resume")
    spec = root / "spec.pkl"
    spec.write_bytes(pickle.dumps({"config": _config(), "model": MODEL, "train": data[0], "eval": data[1]}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_COMPILATION_CACHE_DIR": str(root / "xla_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    command = [sys.executable, "-m", "tests.distill.trainer_subprocess", str(spec)]

    def run_to_end(run_dir: Path) -> str:
        done = subprocess.run(command + [str(run_dir)], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    reference = root / "reference"
    run_to_end(reference)  # also fills the compilation cache the next two processes share

    killed = root / "killed"
    process = subprocess.Popen(command + [str(killed), "0.4"], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while True:
        saved = _checkpoint_steps(killed)
        mid_epoch = bool(saved) and saved[-1] % BATCHES_PER_EPOCH != 0
        if mid_epoch and max(_logged_steps(killed / "metrics" / "train.jsonl"), default=0) > saved[-1]:
            break
        assert process.poll() is None, f"the run ended before it could be killed: {process.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint appeared in time"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    at_kill = {"returncode": process.returncode, "checkpoints": _checkpoint_steps(killed),
               "logged": _logged_steps(killed / "metrics" / "train.jsonl"),
               "finished": (killed / "final_params.npz").exists()}
    resumed_stdout = run_to_end(killed)
    return reference, killed, at_kill, resumed_stdout


def _params(run_dir: Path) -> dict[str, np.ndarray]:
    with np.load(run_dir / "final_params.npz") as f:
        return {key: f[key] for key in f.files}


def test_killed_and_resumed_run_ends_bitwise_equal_to_an_uninterrupted_one(runs):
    reference, killed, at_kill, resumed_stdout = runs
    assert at_kill["returncode"] == -signal.SIGKILL and not at_kill["finished"]
    resumed_from = int(resumed_stdout.split("resumed_from=")[1].split()[0])
    assert 2 <= resumed_from < STEPS and resumed_from in at_kill["checkpoints"]
    assert resumed_from % BATCHES_PER_EPOCH != 0  # the iterator state restored was inside an epoch
    assert max(at_kill["logged"]) > resumed_from  # rows past the checkpoint existed and had to go
    expected, actual = _params(reference), _params(killed)
    assert expected.keys() == actual.keys() and len(expected) > 5
    for key in expected:
        assert expected[key].dtype == actual[key].dtype and expected[key].tobytes() == actual[key].tobytes(), key
    assert _checkpoint_steps(killed) == [8, 9]  # keep_checkpoints=2, the final step saved


def test_metrics_have_one_row_per_step_equal_to_the_uninterrupted_run(runs):
    reference, killed, _, _ = runs
    for split, steps in (("train", list(range(1, STEPS + 1))), ("eval", [4, 8, 9])):
        expected = read_metrics(reference / "metrics" / f"{split}.jsonl")
        actual = read_metrics(killed / "metrics" / f"{split}.jsonl")
        assert [r["step"] for r in expected] == [r["step"] for r in actual] == steps
        for e, a in zip(expected, actual):
            assert {k: v for k, v in e.items() if k not in TIMING} == {k: v for k, v in a.items() if k not in TIMING}
    train_rows = read_metrics(reference / "metrics" / "train.jsonl")
    assert {"loss", "kl", "tokens", "grad_norm", "learning_rate", "epoch", *TIMING} <= train_rows[0].keys()
    assert train_rows[0]["learning_rate"] == 0.0 and train_rows[-1]["epoch"] == 2  # warm-up starts at 0
    assert all(0 < r["loss_tokens_per_second"] < r["student_tokens_per_second"] and r["loss"] > 0 for r in train_rows)
    assert all(r["tokens"] < r["student_tokens"] for r in train_rows)  # loss tokens are a part of the student's
    counts = json.loads((reference / "data_counts.json").read_text())
    assert counts["train"]["kept"] == 12 and counts["eval"]["kept"] == 6


def _events(path: Path) -> list[event_pb2.Event]:
    """TFRecord framing: u64 length, u32 masked CRC, payload, u32 masked CRC."""
    raw, pos, events = path.read_bytes(), 0, []
    while pos < len(raw):
        (length,) = struct.unpack("<Q", raw[pos:pos + 8])
        events.append(event_pb2.Event.FromString(raw[pos + 12:pos + 12 + length]))
        pos += 12 + length + 4
    return events


def _scalars(events, tag: str) -> dict[int, float]:
    return {e.step: v.simple_value for e in events for v in e.summary.value if v.tag == tag}


def test_tensorboard_events_parse_and_the_resumed_file_purges_what_follows_the_checkpoint(runs):
    _, killed, _, resumed_stdout = runs
    resumed_from = int(resumed_stdout.split("resumed_from=")[1].split()[0])
    files = sorted((killed / "metrics" / "tensorboard").glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    assert len(files) == 2  # the killed process's and the resumed one's
    first, second = (_events(f) for f in files)
    purges = [e.step for e in second if e.HasField("session_log") and e.session_log.status == e.session_log.START]
    assert purges == [resumed_from + 1]
    assert set(_scalars(first, "train/loss")) >= set(range(1, resumed_from + 1))
    assert sorted(_scalars(second, "train/loss")) == list(range(resumed_from + 1, STEPS + 1))
    jsonl = {r["step"]: r["loss"] for r in read_metrics(killed / "metrics" / "train.jsonl")}
    visible = {**{s: v for s, v in _scalars(first, "train/loss").items() if s <= resumed_from},
               **_scalars(second, "train/loss")}
    np.testing.assert_allclose([visible[s] for s in sorted(jsonl)], [jsonl[s] for s in sorted(jsonl)], rtol=1e-6)
    assert sorted(_scalars(second, "eval/loss")) == [s for s in (4, 8, 9) if s > resumed_from]


def test_eval_loss_is_exact_over_all_eval_examples(runs, data):
    reference, _, _, _ = runs
    final_eval = read_metrics(reference / "metrics" / "eval.jsonl")[-1]
    student, teacher = Qwen3(MODEL, rngs=nnx.Rngs(0)), Qwen3(MODEL, rngs=nnx.Rngs(1))
    graphdef, params = nnx.split(student, nnx.Param)
    trained = _params(reference)
    params = jax.tree_util.tree_map_with_path(lambda p, x: trained[jax.tree_util.keystr(p)], params)
    examples = data[1].examples
    one_batch = collate(examples, batch_shape(examples, rows=len(examples), min_bucket=512))
    metrics = make_eval_step(graphdef, _config().step)(params, nnx.state(teacher, nnx.Param),
                                                                shard_batch(one_batch, None))
    assert final_eval["tokens"] == float(metrics["tokens"]) and final_eval["sequences"] == 6
    np.testing.assert_allclose(final_eval["loss"], float(metrics["loss"]), rtol=1e-5)
    np.testing.assert_allclose(final_eval["kl"], float(metrics["kl"]), rtol=1e-5)


def test_calling_train_on_a_finished_run_restores_it_without_training(runs, data):
    reference, _, _, _ = runs
    student = Qwen3(MODEL, rngs=nnx.Rngs(0))
    result = train(_config(), student, Qwen3(MODEL, rngs=nnx.Rngs(1)), data[0], data[1], output_dir=reference)
    assert (result.resumed_from, result.steps, result.stop_reason) == (STEPS, STEPS, "completed")
    assert result.train_metrics == {} and result.data_counts.kept == 12
    expected = _params(reference)
    for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(student, nnx.Param)):
        np.testing.assert_array_equal(np.asarray(leaf), expected[jax.tree_util.keystr(path)])
    assert _logged_steps(reference / "metrics" / "train.jsonl") == list(range(1, STEPS + 1))


@pytest.mark.slow  # a sharded compile over 8 fake devices: ~30 s on a shared 2-core CPU
def test_training_on_a_mesh_matches_the_single_device_run_and_restores_sharded(runs, data, tmp_path):
    reference, _, _, _ = runs
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    config = _config(max_steps=6)  # the schedule still spans 9 steps, as in the reference run

    def run():
        return train(config, Qwen3(MODEL, rngs=nnx.Rngs(0)), Qwen3(MODEL, rngs=nnx.Rngs(1)), data[0],
                     output_dir=tmp_path, mesh=mesh)

    result = run()
    assert (result.steps, result.stop_reason) == (6, "max_steps")
    expected = read_metrics(reference / "metrics" / "train.jsonl")[:6]
    actual = read_metrics(tmp_path / "metrics" / "train.jsonl")
    assert [r["step"] for r in actual] == [r["step"] for r in expected]
    for name in ("loss", "grad_norm", "tokens"):
        np.testing.assert_allclose([r[name] for r in actual], [r[name] for r in expected], rtol=1e-4, err_msg=name)
    gate = lambda r: r.state.params["layers"]["gate_proj"].get_value()  # noqa: E731
    assert gate(result).sharding.spec == PartitionSpec(None, "fsdp", "tensor")

    again = run()  # restores the sharded checkpoint into the mesh layout; nothing left to train
    assert again.resumed_from == 6 and gate(again).sharding.is_equivalent_to(gate(result).sharding, 3)
    np.testing.assert_array_equal(np.asarray(gate(again)), np.asarray(gate(result)))



def test_bfloat16_parameters_train_with_float32_master_weights_that_checkpoint_and_restore(data, tmp_path):
    bf16 = DTypePolicy("bfloat16", "float32")
    config = _config(epochs=1, eval_every=0, checkpoint_every=1, max_steps=2)

    def run():
        return train(config, Qwen3(MODEL, policy=bf16, rngs=nnx.Rngs(0)), Qwen3(MODEL, rngs=nnx.Rngs(1)), data[0],
                     output_dir=tmp_path)

    first = run()
    master = first.state.opt_state.master
    assert isinstance(first.state.opt_state, MasterWeightsState) and first.steps == 2
    for m, p in zip(jax.tree.leaves(master), jax.tree.leaves(first.state.params)):
        assert m.dtype == jnp.float32 and p.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(p), np.asarray(m.astype(jnp.bfloat16)))
    again = run()  # restores the checkpoint, master weights included
    assert again.resumed_from == 2
    for a, b in zip(jax.tree.leaves(again.state.opt_state.master), jax.tree.leaves(master)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

# ---------------------------------------------------------------- failures and validation


def test_non_finite_loss_stops_naming_step_and_tasks_and_keeps_the_last_good_checkpoint(data, tmp_path):
    config = _config(optimizer=OptimizerConfig(learning_rate=1e30), epochs=1, checkpoint_every=1, eval_every=0)
    second_batch = list(BatchIterator(data[0], config.batching, 1, process_index=0, process_count=1))[1]
    with pytest.raises(TrainingDiverged) as caught:  # step 1 moves every weight by ~1e30; step 2 overflows
        train(config, Qwen3(MODEL, rngs=nnx.Rngs(0)), Qwen3(MODEL, rngs=nnx.Rngs(1)), data[0], output_dir=tmp_path)
    message = str(caught.value)
    assert message.startswith("step 2 (epoch 0, batch 1): non-finite loss=")
    assert all(task in message for task in second_batch.task_ids) and "last checkpoint on disk is step 1" in message
    assert _checkpoint_steps(tmp_path) == [1]
    assert _logged_steps(tmp_path / "metrics" / "train.jsonl") == [1]


def test_config_and_input_errors_are_named(data, tmp_path):
    with pytest.raises(ValueError, match="TrainerConfig.checkpoint_every"):
        _config(checkpoint_every=0)
    with pytest.raises(ValueError, match="rows=4 does not split into step.micro_batches=3"):
        _config(step=StepConfig(Divergence("forward_kl"), micro_batches=3))
    with pytest.raises(ValueError, match="TrainerConfig.max_steps"):
        _config(max_steps=0)
    student = Qwen3(MODEL, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="'forward_kl' needs a teacher"):
        train(_config(), student, None, data[0], output_dir=tmp_path)
    with pytest.raises(ValueError, match="warmup_steps=50 exceeds the run's 9 steps"):
        train(_config(optimizer=OptimizerConfig(warmup_steps=50, total_steps=100)), student, student, data[0],
              output_dir=tmp_path)
    no_eval = ExampleSet((), dataclasses.replace(data[1].counts, kept=0, dropped_too_long=6))
    with pytest.raises(ValueError, match=r"eval set holds no example \(counts: .*'dropped_too_long': 6"):
        train(_config(), student, student, data[0], no_eval, output_dir=tmp_path / "empty_eval")
    assert not (tmp_path / "empty_eval").exists()  # refused before any work


def test_metrics_log_truncates_to_the_checkpoint_and_drops_a_torn_last_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    with MetricsLog(tmp_path, resume_step=3) as log:
        log.write("train", 4, {"loss": np.float32(0.25)})
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.25)]
    path.write_text('{"step": 1}\n{"step": 2\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"train\.jsonl:2: not valid JSON"):
        MetricsLog(tmp_path, resume_step=1)
    with MetricsLog(tmp_path / "other", enabled=False) as silent:
        silent.write("train", 1, {"loss": 1.0})
    assert not (tmp_path / "other").exists()
