"""Static-shape batches of aligned views: padding, shape buckets, the pytree the step consumes.

Contract: ``collate(examples, shape)`` pads every field to ``shape`` (right padding; padded
tokens are invalid and padded loss slots have weight 0 and target 0), so a jitted step compiles
once per ``BatchShape``. Examples carrying the rollout's teacher signal (``DistillExample.signal_k
> 0``, all the same k) collate into a ``SignalBatch``: a ``DistillBatch`` with ``teacher_top_ids`` /
``teacher_top_logprobs`` / ``teacher_tail_logmass`` besides (padded loss slots: id 0, log-prob 0,
weight 0).

This module owns the shape policy: ``batch_shape`` (every dimension padded to a rung of a ladder
of two lengths per octave, ``bucket_length``) is what training and evaluation use.
``bucket_shape`` / ``round_up`` (lengths rounded up to multiples of a fixed size) are simple
helpers for tests and benchmarks (``benchmarks/bench_stepwise_scoring.py``) that need one fixed,
predictable shape; they are not the training policy. Which examples form a batch, and in which
order, is the pipeline's job (``pipeline.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from expint_jax.distill.views import DistillExample


@dataclasses.dataclass(frozen=True)
class BatchShape:
    rows: int
    student_tokens: int
    teacher_tokens: int
    loss_tokens: int
    signal_k: int = 0  # k of the rollout's teacher signal; 0 = the batch carries none


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DistillBatch:
    """Leading axis = rows. Works with numpy (host) or jax arrays (device)."""

    student_ids: np.ndarray  # [B, Ls] int32
    student_valid: np.ndarray  # [B, Ls] bool
    teacher_ids: np.ndarray  # [B, Lt] int32
    teacher_positions: np.ndarray  # [B, Lt] int32
    teacher_branch: np.ndarray  # [B, Lt] int32
    teacher_attach: np.ndarray  # [B, Lt] int32
    teacher_valid: np.ndarray  # [B, Lt] bool
    student_loss_index: np.ndarray  # [B, N] int32
    teacher_loss_index: np.ndarray  # [B, N] int32
    targets: np.ndarray  # [B, N] int32
    weights: np.ndarray  # [B, N] float32

    @property
    def shape(self) -> BatchShape:
        rows, student = self.student_ids.shape
        return BatchShape(rows, student, self.teacher_ids.shape[1], self.targets.shape[1])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SignalBatch(DistillBatch):
    """A batch carrying the teacher's distribution at every loss slot, as its rollout recorded it."""

    teacher_top_ids: np.ndarray  # [B, N, k] int32
    teacher_top_logprobs: np.ndarray  # [B, N, k] float32, descending
    teacher_tail_logmass: np.ndarray  # [B, N] float32

    @property
    def shape(self) -> BatchShape:
        return dataclasses.replace(super().shape, signal_k=self.teacher_top_ids.shape[2])


SIGNAL_FIELDS = tuple(f.name for f in dataclasses.fields(SignalBatch) if f.name not in
                      {g.name for g in dataclasses.fields(DistillBatch)})


def round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def bucket_shape(examples: Sequence[DistillExample], rows: int, bucket: int = 256, loss_bucket: int = 128) -> BatchShape:
    """The smallest shape with lengths in multiples of ``bucket`` (``loss_bucket`` for loss tokens)
    that holds every example (tests and benchmarks; training uses ``batch_shape``)."""
    return BatchShape(
        rows=rows,
        student_tokens=round_up(max(len(e.student_ids) for e in examples), bucket),
        teacher_tokens=round_up(max(len(e.teacher_ids) for e in examples), bucket),
        loss_tokens=round_up(max(e.num_loss_tokens for e in examples), loss_bucket),
        signal_k=signal_k(examples),
    )


def signal_k(examples: Sequence[DistillExample]) -> int:
    """The k of the examples' rollout signal (0 when none has one); all or none must carry it, with one k."""
    ks = {e.signal_k for e in examples}
    if len(ks) > 1:
        raise ValueError(f"examples {[e.task_id for e in examples]} mix rollout signals of k {sorted(ks)} "
                         "(0 = no signal): a batch carries one k for all its rows or none")
    return ks.pop() if ks else 0


def _pad(values: np.ndarray, length: int, what: str, task_id: str) -> np.ndarray:
    if len(values) > length:
        raise ValueError(f"example {task_id!r}: {what} has {len(values)} entries, more than the batch's {length}")
    return np.pad(values, [(0, length - len(values))] + [(0, 0)] * (values.ndim - 1))


def collate(examples: Sequence[DistillExample], shape: BatchShape) -> DistillBatch | SignalBatch:
    """Pads ``examples`` (at most ``shape.rows``; missing rows are all padding) into one batch."""
    if len(examples) > shape.rows:
        raise ValueError(f"collate: {len(examples)} examples for a batch of {shape.rows} rows")
    if examples and signal_k(examples) != shape.signal_k:
        raise ValueError(f"collate: the examples carry signals of k {signal_k(examples)}, the shape {shape.signal_k}")
    kind = SignalBatch if shape.signal_k else DistillBatch
    rows = {f.name: [] for f in dataclasses.fields(kind)}
    for e in examples:
        ls, lt, n = shape.student_tokens, shape.teacher_tokens, shape.loss_tokens
        rows["student_ids"].append(_pad(e.student_ids, ls, "student_ids", e.task_id))
        rows["student_valid"].append(_pad(np.ones(len(e.student_ids), bool), ls, "student_ids", e.task_id))
        rows["teacher_ids"].append(_pad(e.teacher_ids, lt, "teacher_ids", e.task_id))
        rows["teacher_positions"].append(_pad(e.teacher_positions, lt, "teacher_ids", e.task_id))
        rows["teacher_branch"].append(_pad(e.teacher_branch, lt, "teacher_ids", e.task_id))
        # Padding tokens attach to themselves like trunk tokens; they are masked out anyway.
        attach = np.arange(lt, dtype=np.int32)
        attach[: len(e.teacher_attach)] = e.teacher_attach
        rows["teacher_attach"].append(attach)
        rows["teacher_valid"].append(_pad(np.ones(len(e.teacher_ids), bool), lt, "teacher_ids", e.task_id))
        rows["student_loss_index"].append(_pad(e.student_loss_index, n, "targets", e.task_id))
        rows["teacher_loss_index"].append(_pad(e.teacher_loss_index, n, "targets", e.task_id))
        rows["targets"].append(_pad(e.targets, n, "targets", e.task_id))
        rows["weights"].append(_pad(np.ones(e.num_loss_tokens, np.float32), n, "targets", e.task_id))
        if shape.signal_k:
            for name in SIGNAL_FIELDS:
                rows[name].append(_pad(getattr(e, name), n, "targets", e.task_id))
    for _ in range(shape.rows - len(examples)):
        empty = padding_row(shape)
        for name in rows:
            rows[name].append(empty[name])
    dtypes = {"student_valid": bool, "teacher_valid": bool, "weights": np.float32,
              "teacher_top_logprobs": np.float32, "teacher_tail_logmass": np.float32}
    return kind(**{name: np.stack(v).astype(dtypes.get(name, np.int32)) for name, v in rows.items()})


def padding_row(shape: BatchShape) -> dict[str, np.ndarray]:
    """One all-padding row (no valid token, no loss weight)."""
    ls, lt, n, k = shape.student_tokens, shape.teacher_tokens, shape.loss_tokens, shape.signal_k
    zeros = np.zeros
    signal = {} if not k else {"teacher_top_ids": zeros((n, k), np.int32),
                               "teacher_top_logprobs": zeros((n, k), np.float32),
                               "teacher_tail_logmass": zeros(n, np.float32)}
    return signal | {
        "student_ids": zeros(ls, np.int32), "student_valid": zeros(ls, bool),
        "teacher_ids": zeros(lt, np.int32), "teacher_positions": zeros(lt, np.int32),
        "teacher_branch": zeros(lt, np.int32), "teacher_attach": np.arange(lt, dtype=np.int32),
        "teacher_valid": zeros(lt, bool), "student_loss_index": zeros(n, np.int32),
        "teacher_loss_index": zeros(n, np.int32), "targets": zeros(n, np.int32), "weights": zeros(n, np.float32),
    }


def bucket_length(length: int, min_bucket: int) -> int:
    """The smallest rung of ``min_bucket * {1, 1.5, 2, 3, 4, 6, 8, ...}`` that holds ``length``."""
    rung = min_bucket
    while True:
        if length <= rung:
            return rung
        if length <= rung + rung // 2:
            return rung + rung // 2
        rung *= 2


def batch_shape(examples: Sequence[DistillExample], rows: int, min_bucket: int) -> BatchShape:
    """The ladder shape that holds every example of a (global) batch."""
    return BatchShape(
        rows=rows,
        student_tokens=bucket_length(max(len(e.student_ids) for e in examples), min_bucket),
        teacher_tokens=bucket_length(max(len(e.teacher_ids) for e in examples), min_bucket),
        loss_tokens=bucket_length(max(e.num_loss_tokens for e in examples), min_bucket),
        signal_k=signal_k(examples),
    )
