"""Distillation data: trajectory records -> aligned views -> length-bucketed, static-shape batches.

Contract:
  * ``load_examples(paths, chat, budget)`` reads ``Trajectory`` JSONL files (a malformed line is
    an error naming file:line) and builds every trajectory's teacher/student views once
    (``build_examples`` does the same for ``(where, trajectory)`` records already in memory):
    tokenization is the expensive part, so the views stay in memory for the whole run. Nothing is
    lost silently: ``ExampleCounts`` says how many records were read, kept, truncated (and how
    many turns were cut), dropped for length, skipped for having no loss token (no assistant
    turn; every assistant turn has at least its ``<|im_end|>`` to learn), and skipped because
    their views could not be aligned (``ViewError``; a warning names the task).
  * Teacher signal from the rollout (``build_examples(..., signals=...)``, ``load_examples(...,
    with_signal=True)`` reading each file's ``token_signal.signal_path`` sidecar): every example
    gets its trajectory's signal at its loss positions (``teacher_signal.align_signal``). An example
    whose signal does not align with its views is skipped and counted (``skipped_no_signal``, a
    warning names the task and turn): with ``teacher="from_rollout"`` there is no teacher to fall
    back on, and mixing in recomputed targets would need one. ``ExampleCounts.skipped_no_signal``
    is the share to watch; when it is large, train with ``teacher="recompute"``.
  * ``BatchIterator`` yields ``HostBatch``es (numpy, host side) for a fixed number of epochs. The
    sequence is a pure function of the examples, the ``BatchingConfig`` and the epoch count, so
    the same seed gives the same batches and every epoch is shuffled differently.
  * Checkpointing: ``get_state()`` is a small JSON-able dict; ``set_state`` on an iterator over
    the same data continues with exactly the next batch. A state from other data or another
    batching configuration is rejected (a fingerprint of both is part of the state).
  * Per-process split: a batch has ``rows`` global rows; process ``p`` of ``P`` gets rows
    ``[p*rows/P, (p+1)*rows/P)`` collated to the global batch's shape, ready for
    ``jax.make_array_from_process_local_data``. ``HostBatch.task_ids`` lists the tasks of the
    whole global batch on every process, so an error can name them anywhere.

Batching policy (few distinct shapes, little padding, no data dropped unless asked):
  1. Each epoch the examples are shuffled (grain's index shuffle; a new permutation per epoch).
  2. The epoch's last ``len % rows`` examples (a random subset) form its one partial batch, the
     epoch's last, completed with all-padding rows (weight 0), or dropped when ``drop_remainder``.
  3. The rest is cut into windows of ``sort_window`` batches; each window is sorted by length
     (teacher, then student, then loss tokens) and chunked, so a batch holds similar lengths.
  4. The order of the epoch's batches is shuffled (grain, a separate seed), so long batches do
     not arrive at fixed positions.
  5. Each dimension of a batch is padded to a rung of the ladder ``min_bucket * {1, 1.5, 2, 3,
     4, 6, ...}`` (rounding wastes at most a third): two values per octave and dimension, so the
     number of compiled programs is bounded by the rung combinations the data reaches, not by
     its number of distinct lengths. ``sort_window`` trades padding for shapes: 1 keeps the
     shuffled order (fewest shapes, most padding); a long window sorts more (less padding, more
     shapes: on lengths spread over six octaves, 21 shapes and 19% teacher padding vs 13 and 49%).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import grain
import jax
import numpy as np

from expint_jax.distill.batch import DistillBatch, batch_shape, collate
from expint_jax.distill.teacher_signal import SignalMismatch, align_signal
from expint_jax.distill.views import DistillExample, ViewBudget, ViewError, build_example, build_lm_example
from expint_jax.models.chat import ChatFormat
from expint_jax.records import Trajectory, read_jsonl
from expint_jax.token_signal import TrajectorySignal, read_signals, signal_path

log = logging.getLogger(__name__)

# Collation runs one batch ahead in a grain thread; the views are already in memory.
_READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)


@dataclasses.dataclass(frozen=True)
class ExampleCounts:
    """What happened to every record on its way to a training example."""

    records: int = 0  # trajectories read
    kept: int = 0  # examples available for batching
    truncated: int = 0  # kept, with assistant turns cut from the end to fit the budget
    turns_cut: int = 0  # assistant turns removed by those truncations
    dropped_too_long: int = 0  # no prefix fits the budget (or overflow="drop")
    skipped_no_loss: int = 0  # no assistant token to learn from
    skipped_unaligned: int = 0  # views could not be aligned (ViewError)
    skipped_no_signal: int = 0  # signals were given and this example's does not align with its views

    def to_json(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ExampleSet:
    examples: tuple[DistillExample, ...]
    counts: ExampleCounts

    def __len__(self) -> int:
        return len(self.examples)


    @property
    def signal_k(self) -> int:
        """k of the examples' rollout signal (0: none carries one); an error if they differ."""
        ks = {e.signal_k for e in self.examples}
        if len(ks) > 1:
            raise ValueError(f"the examples carry rollout signals of different k {sorted(ks)}")
        return ks.pop() if ks else 0


def build_examples(records: Iterable[tuple[str, Trajectory]], chat: ChatFormat,
                   budget: ViewBudget = ViewBudget(),
                   signals: Iterable[TrajectorySignal] | None = None,
                   targets: Literal["assistant", "all"] = "assistant") -> ExampleSet:
    """Views of ``(where, trajectory)`` pairs; ``where`` (e.g. ``"file:line"``) goes into warnings.

    ``signals`` (one per record, same order): attach each trajectory's rollout signal; examples
    whose signal does not align are skipped and counted (module docstring). ``targets="all"``:
    language modelling on every token of the stored conversation (``views.build_lm_example``;
    trajectories without experience only, no signals)."""
    if targets == "all" and signals is not None:
        raise ValueError("build_examples: targets='all' (language modelling) takes no teacher signals")
    examples: list[DistillExample] = []
    counts = dict.fromkeys((f.name for f in dataclasses.fields(ExampleCounts)), 0)
    paired = ((r, None) for r in records) if signals is None else zip(records, signals, strict=True)
    for (where, trajectory), signal in paired:
        counts["records"] += 1
        if signal is not None and signal.task_id != trajectory.task_id:
            raise ValueError(f"{where}: the teacher signal is for task {signal.task_id!r}, the trajectory is "
                             f"{trajectory.task_id!r}: the signal file does not belong to these trajectories")
        if trajectory.num_assistant_turns == 0:
            counts["skipped_no_loss"] += 1
            continue
        try:
            example = (build_lm_example if targets == "all" else build_example)(trajectory, chat, budget)
        except ViewError as e:
            log.warning("%s: skipping task %r, its views cannot be aligned: %s", where, trajectory.task_id, e)
            counts["skipped_unaligned"] += 1
            continue
        except ValueError as e:  # e.g. a step-wise trajectory with no user message to inject into
            raise ValueError(f"{where}: trajectory {trajectory.task_id!r}: {e}") from e
        if example is None:  # with at least one assistant turn, None means it cannot fit
            counts["dropped_too_long"] += 1
            continue
        if signals is not None:
            aligned = align_signal(example, signal)
            if isinstance(aligned, SignalMismatch):
                log.warning("%s: skipping task %r, its rollout signal does not align: %s", where, trajectory.task_id,
                            aligned)
                counts["skipped_no_signal"] += 1
                continue
            example = aligned
        examples.append(example)  # every assistant turn has a loss token (at least its <|im_end|>)
        counts["kept"] += 1
        counts["truncated"] += example.truncated_turns > 0
        counts["turns_cut"] += example.truncated_turns
    return ExampleSet(tuple(examples), ExampleCounts(**counts))


def load_examples(paths: Sequence[str | Path], chat: ChatFormat, budget: ViewBudget = ViewBudget(), *,
                  with_signal: bool = False) -> ExampleSet:
    """Views of every ``Trajectory`` in the JSONL files ``paths``, in file and line order.

    ``with_signal``: attach the rollout signal from each file's sidecar (``signal_path``), which
    must hold one entry per line of the file."""
    if isinstance(paths, (str, Path)):
        raise TypeError(f"load_examples takes a sequence of paths, got the single path {str(paths)!r}")
    records = [(where, Trajectory.from_json(obj, where)) for path in paths for where, obj in read_jsonl(path)]
    signals = None
    if with_signal:
        signals = []
        for path in paths:
            sidecar = signal_path(path)
            if not sidecar.is_file():
                raise FileNotFoundError(f"{path}: no teacher-signal file {sidecar} beside it (write it with "
                                        "token_signal.write_signals, or train with teacher='recompute')")
            signals += read_signals(sidecar)
        if len(signals) != len(records):
            raise ValueError(f"{len(signals)} teacher signals in the sidecars of {[str(p) for p in paths]} for "
                             f"{len(records)} trajectories")
    return build_examples(records, chat, budget, signals)


@dataclasses.dataclass(frozen=True)
class BatchingConfig:
    rows: int = 8  # global rows per batch (all processes together)
    seed: int = 0
    sort_window: int = 16  # batches per length-sorted window; 1 keeps the shuffled order
    min_bucket: int = 128  # smallest padded length of every dimension
    drop_remainder: bool = False

    def __post_init__(self) -> None:
        for name in ("rows", "sort_window", "min_bucket"):
            if getattr(self, name) < 1:
                raise ValueError(f"BatchingConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise ValueError(f"BatchingConfig.seed must be >= 0, got {self.seed}")


def _derived_seed(seed: int, stream: int) -> int:
    return int(np.random.SeedSequence((seed, stream)).generate_state(1)[0]) % 2**31


def _permutation(size: int, seed: int, epoch: int) -> np.ndarray:
    """grain's index shuffle of ``range(size)``; every epoch draws a new permutation."""
    shuffled = grain.MapDataset.range(size).shuffle(seed=seed).repeat()
    return np.fromiter(shuffled[epoch * size:(epoch + 1) * size], dtype=np.int64, count=size)


def epoch_batches(lengths: np.ndarray, config: BatchingConfig, epoch: int) -> list[tuple[int, ...]]:
    """Example indices of every batch of ``epoch``, in the order they are trained on.

    ``lengths`` is ``[num_examples, 3]``: teacher, student and loss tokens per example.
    """
    n, rows = len(lengths), config.rows
    order = _permutation(n, _derived_seed(config.seed, 0), epoch)
    full = n - n % rows
    batches: list[tuple[int, ...]] = []
    window = config.sort_window * rows
    for start in range(0, full, window):
        members = order[start:min(start + window, full)]
        by_length = members[np.lexsort(lengths[members].T[::-1])]  # teacher first, then student, loss
        batches.extend(tuple(int(i) for i in by_length[b:b + rows]) for b in range(0, len(by_length), rows))
    if batches:
        batch_order = _permutation(len(batches), _derived_seed(config.seed, 1), epoch)
        batches = [batches[i] for i in batch_order]
    if full < n and not config.drop_remainder:
        batches.append(tuple(int(i) for i in order[full:]))
    return batches


@dataclasses.dataclass(frozen=True)
class HostBatch:
    """One step's input on this process, with what the host needs to report on it."""

    batch: DistillBatch  # this process's rows, collated to the global batch's shape
    task_ids: tuple[str, ...]  # the real examples of the global batch, in row order
    epoch: int
    index: int  # position in the run's sequence of batches (0-based)


@dataclasses.dataclass(frozen=True)
class _PlannedBatch:
    index: int
    epoch: int
    members: tuple[int, ...]


class BatchIterator:
    """Checkpointable iterator over ``epochs`` epochs of batches (see the module docstring)."""

    def __init__(self, data: ExampleSet, config: BatchingConfig, epochs: int, *,
                 process_index: int | None = None, process_count: int | None = None):
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        if not data.examples:
            raise ValueError(f"no training examples to batch (counts: {data.counts.to_json()})")
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(f"process_index={self.process_index} is outside [0, process_count={self.process_count})")
        if config.rows % self.process_count:
            raise ValueError(f"BatchingConfig.rows={config.rows} is not divisible by the {self.process_count} "
                             "processes; every process must hold the same number of rows")
        self.config = config
        self.epochs = epochs
        self._examples = data.examples
        self._local_rows = config.rows // self.process_count
        lengths = np.array([(len(e.teacher_ids), len(e.student_ids), e.num_loss_tokens) for e in data.examples])
        plan = [(epoch, members) for epoch in range(epochs) for members in epoch_batches(lengths, config, epoch)]
        if not plan:
            raise ValueError(f"{len(data.examples)} examples make no batch of {config.rows} rows with "
                             "drop_remainder=True")
        self._plan = [_PlannedBatch(i, epoch, members) for i, (epoch, members) in enumerate(plan)]
        self.fingerprint = _fingerprint(data.examples, config, epochs)
        self._dataset = grain.MapDataset.source(self._plan).map(self._assemble).to_iter_dataset(_READ_OPTIONS)
        self._iterator = iter(self._dataset)

    def __len__(self) -> int:
        """Batches in the whole run (all epochs), consumed or not."""
        return len(self._plan)

    @property
    def batches_per_epoch(self) -> int:
        return len(self._plan) // self.epochs

    def __iter__(self) -> Iterator[HostBatch]:
        return self

    def __next__(self) -> HostBatch:
        return next(self._iterator)

    def get_state(self) -> dict[str, Any]:
        return {"iterator": self._iterator.get_state(), "num_batches": len(self._plan),
                "fingerprint": self.fingerprint}

    def set_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or not {"iterator", "fingerprint"} <= state.keys():
            raise ValueError(f"data iterator state must hold 'iterator' and 'fingerprint', got {state!r}")
        if state["fingerprint"] != self.fingerprint:
            raise ValueError(
                f"data iterator state was saved for other data or batching (fingerprint {state['fingerprint']}, "
                f"{state.get('num_batches')} batches) than this run's ({self.fingerprint}, {len(self._plan)} "
                "batches); resume with the same records, BatchingConfig and epochs")
        self._iterator.set_state(state["iterator"])

    def _assemble(self, planned: _PlannedBatch) -> HostBatch:
        members = [self._examples[i] for i in planned.members]
        shape = batch_shape(members, self._local_rows, self.config.min_bucket)
        start = self.process_index * self._local_rows
        local = members[start:start + self._local_rows]
        return HostBatch(batch=collate(local, shape), task_ids=tuple(e.task_id for e in members),
                         epoch=planned.epoch, index=planned.index)


def _fingerprint(examples: Sequence[DistillExample], config: BatchingConfig, epochs: int) -> str:
    digest = hashlib.sha256(json.dumps([dataclasses.asdict(config), epochs]).encode())
    for e in examples:
        digest.update(f"{e.task_id}\0{len(e.student_ids)}\0{len(e.teacher_ids)}\0{e.num_loss_tokens}\n".encode())
        if e.signal_k:  # data with a rollout signal is other data (fingerprints of data without stay as they were)
            digest.update(f"signal k={e.signal_k}\n".encode())
    return digest.hexdigest()[:16]
