"""Distillation data: counts, deterministic shuffling, length buckets, per-process split, resumable state."""

import dataclasses
import json
import logging

import numpy as np
import pytest

from expint_jax import storage
from expint_jax.distill import pipeline as data_module
from expint_jax.distill.batch import bucket_shape, padding_row
from expint_jax.distill.batch import batch_shape, bucket_length
from expint_jax.distill.pipeline import BatchIterator, BatchingConfig, ExampleCounts, ExampleSet, build_examples, load_examples
from expint_jax.distill.views import DistillExample, ViewBudget, ViewError
from expint_jax.records import Message, RecordError, Trajectory
from tests.distill.conftest import SYSTEM, make_trajectory


def fake_example(task_id: str, student: int, teacher: int, loss: int) -> DistillExample:
    """An example with the given lengths (a global-injection layout: teacher = prefix + student)."""
    prefix = teacher - student
    targets = (np.arange(loss, dtype=np.int32) * 7 + len(task_id)) % 97
    return DistillExample(
        task_id=task_id, student_ids=np.arange(student, dtype=np.int32) % 89,
        teacher_ids=np.arange(teacher, dtype=np.int32) % 83, teacher_positions=np.arange(teacher, dtype=np.int32),
        teacher_branch=np.zeros(teacher, np.int32), teacher_attach=np.arange(teacher, dtype=np.int32),
        student_loss_index=np.arange(student - loss, student, dtype=np.int32) - 1,
        teacher_loss_index=np.arange(student - loss, student, dtype=np.int32) - 1 + prefix,
        targets=targets, loss_turn=np.zeros(loss, np.int32), num_turns=1, truncated_turns=0)


def fake_set(n: int, seed: int = 0, max_len: int = 3000) -> ExampleSet:
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(n):
        student = int(rng.integers(40, max_len))
        examples.append(fake_example(f"task{i}", student, student + int(rng.integers(0, 200)),
                                     int(rng.integers(1, student // 2))))
    return ExampleSet(tuple(examples), ExampleCounts(records=n, kept=n))


def _run(data: ExampleSet, config: BatchingConfig, epochs: int = 1, **kwargs):
    return list(BatchIterator(data, config, epochs, process_index=0, process_count=1, **kwargs))


def _same_batches(a, b) -> bool:
    return len(a) == len(b) and all(
        x.task_ids == y.task_ids and all(np.array_equal(u, v) for u, v in zip(
            dataclasses.astuple(x.batch), dataclasses.astuple(y.batch))) for x, y in zip(a, b))


# ---------------------------------------------------------------- views and counts


def test_counts_say_what_happened_to_every_record(chat, monkeypatch, caplog):
    # Tool-call turns are longer than the final answer, so a 5-turn trajectory fits this budget with 2 turns.
    limit = len(build_examples([("a", make_trajectory(3))], chat).examples[0].student_ids)
    budget = ViewBudget(max_student_tokens=limit, max_teacher_tokens=10 * limit)
    no_assistant = Trajectory(task_id="silent", messages=(Message("system", SYSTEM), Message("user", "Hi?")))
    records = [make_trajectory(1, task_id="one"), make_trajectory(2, task_id="two"),
               make_trajectory(5, task_id="five"), make_trajectory(4, "global", task_id="four"),
               no_assistant, make_trajectory(2, task_id="unaligned")]
    real_build = data_module.build_example

    def build_or_fail(trajectory, chat, budget):
        if trajectory.task_id == "unaligned":
            raise ViewError("trajectory 'unaligned', turn 1: the assistant tokens differ")
        return real_build(trajectory, chat, budget)

    monkeypatch.setattr(data_module, "build_example", build_or_fail)
    with caplog.at_level(logging.WARNING, logger=data_module.__name__):
        truncating = build_examples([(f"rollouts.jsonl:{i + 1}", t) for i, t in enumerate(records)], chat, budget)
        dropping = build_examples([("x", t) for t in records], chat, dataclasses.replace(budget, overflow="drop"))

    assert truncating.counts == ExampleCounts(records=6, kept=4, truncated=2, turns_cut=3 + 2, skipped_no_loss=1,
                                              skipped_unaligned=1)
    assert [e.task_id for e in truncating.examples] == ["one", "two", "five", "four"]
    assert [e.num_turns for e in truncating.examples] == [1, 2, 2, 2]
    assert all(len(e.student_ids) <= limit for e in truncating.examples)
    assert dropping.counts == ExampleCounts(records=6, kept=2, dropped_too_long=2, skipped_no_loss=1,
                                            skipped_unaligned=1)
    assert "rollouts.jsonl:6" in caplog.text and "'unaligned'" in caplog.text


def test_an_empty_assistant_turn_still_has_a_loss_token(chat):
    """Every assistant turn carries at least its <|im_end|>: a kept example always has loss tokens,
    so "no loss token" means "no assistant turn" (the only skip build_examples needs)."""
    empty = Trajectory(task_id="empty", messages=(Message("system", SYSTEM), Message("user", "Hi?"),
                                                  Message("assistant", "")))
    data = build_examples([("x", empty)], chat)
    assert data.counts == ExampleCounts(records=1, kept=1)
    (example,) = data.examples
    assert example.num_loss_tokens == 1 and example.targets[0] == chat.im_end_id


def test_load_examples_reads_files_in_order_and_names_a_bad_line(chat, tmp_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    storage.write_jsonl(first, [make_trajectory(1, task_id="a0").to_json(), make_trajectory(2, task_id="a1").to_json()])
    storage.write_jsonl(second, [make_trajectory(3, "global", task_id="b0").to_json()])
    loaded = load_examples([first, second], chat)
    assert [e.task_id for e in loaded.examples] == ["a0", "a1", "b0"] and loaded.counts.records == 3

    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(make_trajectory(1).to_json()) + "\n\n" + '{"task_id": "x", "messages": 3}\n')
    with pytest.raises(RecordError, match=r"broken\.jsonl:3.*messages"):
        load_examples([broken], chat)
    no_user = Trajectory(task_id="nouser", messages=(Message("system", SYSTEM), Message("assistant", "Hi.")),
                         injection="stepwise", step_injections=("\n\n**Relevant experiences:**\n[G0]. x",))
    storage.write_jsonl(broken, [make_trajectory(1).to_json(), no_user.to_json()])
    with pytest.raises(ValueError, match=r"broken\.jsonl:2: trajectory 'nouser': step-wise injection needs a user"):
        load_examples([broken], chat)
    with pytest.raises(TypeError, match="sequence of paths"):
        load_examples(first, chat)


# ---------------------------------------------------------------- order and shapes


def test_same_seed_same_batches_and_every_epoch_reshuffles():
    data = fake_set(37)
    config = BatchingConfig(rows=4, seed=5, sort_window=2)
    run = _run(data, config, epochs=3)
    assert _same_batches(run, _run(data, config, epochs=3))
    assert not _same_batches(run, _run(data, dataclasses.replace(config, seed=6), epochs=3))
    per_epoch = [[b.task_ids for b in run if b.epoch == e] for e in range(3)]
    assert per_epoch[0] != per_epoch[1] and per_epoch[1] != per_epoch[2]
    assert [b.index for b in run] == list(range(len(run)))
    for epoch in per_epoch:  # every example exactly once per epoch; 37 = 9 full batches + a padded one of 1
        assert sorted(t for ids in epoch for t in ids) == sorted(e.task_id for e in data.examples)
        assert [len(ids) for ids in epoch] == [4] * 9 + [1]
    partial = [b for b in run if len(b.task_ids) == 1][0].batch
    assert partial.weights[1:].sum() == 0 and not partial.student_valid[1:].any()
    np.testing.assert_array_equal(partial.teacher_attach[3], padding_row(partial.shape)["teacher_attach"])

    dropped = _run(data, dataclasses.replace(config, drop_remainder=True), epochs=3)
    assert len(dropped) == 27 and all(len(b.task_ids) == 4 for b in dropped)


def test_ladder_rungs():
    assert [bucket_length(n, 128) for n in (1, 128, 129, 192, 193, 300, 384, 385, 5000)] == \
        [128, 128, 192, 192, 256, 384, 384, 512, 6144]
    assert [bucket_length(n, 64) for n in (65, 97, 129)] == [96, 128, 192]


def test_ladder_bounds_shapes_and_sorted_windows_cut_padding():
    data = fake_set(400, seed=1)  # lengths spread evenly over ~6 octaves: a hard case for bucketing
    by_id = {e.task_id: e for e in data.examples}
    ladder = {bucket_length(n, 128) for n in range(1, 3400)}

    def run(sort_window):
        return _run(data, BatchingConfig(rows=8, seed=0, sort_window=sort_window), epochs=2)

    def teacher_padding(batches):
        return 1 - sum(b.batch.teacher_valid.sum() for b in batches) / sum(b.batch.teacher_valid.size for b in batches)

    sorted_run, shuffled_run = run(sort_window=25), run(sort_window=1)
    shapes = {b.batch.shape for b in sorted_run}
    for shape in shapes | {b.batch.shape for b in shuffled_run}:
        assert {shape.student_tokens, shape.teacher_tokens, shape.loss_tokens} <= ladder
    # the same batches padded to multiples of 128 (batch.bucket_shape) would compile many more programs
    multiples = {bucket_shape([by_id[t] for t in b.task_ids], 8, bucket=128, loss_bucket=128) for b in sorted_run}
    assert len(shapes) <= len(sorted_run) // 4 and 2 * len(shapes) < len(multiples), (len(shapes), len(multiples))
    assert teacher_padding(sorted_run) < 0.25 < 0.4 < teacher_padding(shuffled_run)


def test_batch_shape_holds_its_longest_members():
    examples = [fake_example("a", 100, 300, 20), fake_example("b", 700, 710, 150)]
    shape = batch_shape(examples, rows=2, min_bucket=128)
    assert (shape.student_tokens, shape.teacher_tokens, shape.loss_tokens) == (768, 768, 192)


# ---------------------------------------------------------------- processes and state


@pytest.mark.parametrize("processes", [2, 4])
def test_processes_split_every_global_row_exactly_once(processes):
    data = fake_set(30, seed=2, max_len=600)
    config = BatchingConfig(rows=8, seed=3)
    whole = _run(data, config, epochs=2)
    parts = [list(BatchIterator(data, config, 2, process_index=p, process_count=processes))
             for p in range(processes)]
    for step, global_batch in enumerate(whole):
        local = [part[step] for part in parts]
        assert all(b.task_ids == global_batch.task_ids and b.batch.shape.rows == 8 // processes for b in local)
        for field in dataclasses.fields(global_batch.batch):
            joined = np.concatenate([getattr(b.batch, field.name) for b in local])
            np.testing.assert_array_equal(joined, getattr(global_batch.batch, field.name), err_msg=field.name)


def test_rows_must_divide_among_processes():
    with pytest.raises(ValueError, match="rows=6 is not divisible by the 4 processes"):
        BatchIterator(fake_set(8), BatchingConfig(rows=6), 1, process_index=0, process_count=4)
    with pytest.raises(ValueError, match="no training examples"):
        BatchIterator(ExampleSet((), ExampleCounts(records=3, dropped_too_long=3)), BatchingConfig(rows=2), 1)


def test_iterator_state_round_trip_continues_with_the_next_batch():
    data = fake_set(22, seed=4, max_len=800)
    config = BatchingConfig(rows=4, seed=9, sort_window=2)
    original = BatchIterator(data, config, 2, process_index=0, process_count=1)
    for _ in range(7):  # into the second epoch (6 batches per epoch)
        next(original)
    state = json.loads(json.dumps(original.get_state()))
    expected = list(original)

    restored = BatchIterator(data, config, 2, process_index=0, process_count=1)
    restored.set_state(state)
    assert expected[0].index == 7 and expected[0].epoch == 1
    assert _same_batches(list(restored), expected)

    other = BatchIterator(data, dataclasses.replace(config, seed=10), 2, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="other data or batching"):
        other.set_state(state)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="BatchingConfig.rows"):
        BatchingConfig(rows=0)
    with pytest.raises(ValueError, match="BatchingConfig.min_bucket"):
        BatchingConfig(rows=2, min_bucket=0)
