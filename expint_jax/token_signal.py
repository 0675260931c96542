"""The sampling model's own next-token distributions, kept from a rollout (top-k + tail), and their sidecar file.

Off-policy distillation trains the student toward the teacher's distribution at every token the
teacher wrote. The teacher computed exactly that distribution while it sampled, so an engine can
keep it (``SamplingParams.top_logprobs = k``) and the training step need not run the teacher
again (``distill.step.StepConfig(teacher="from_rollout")``).

Contract of ``TopLogprobs`` (one completion):
  * ``token_ids`` [n]: every token the engine generated, in order, *including* those its text
    leaves out (the eos token, the tokens of a stop string): the agent cuts and strips text, and
    the distillation views re-tokenize it, so alignment is decided on these ids, not on text.
  * ``top_ids`` / ``top_logprobs`` [m, k] (int32 / float32, log-probabilities in descending order)
    and ``tail_logmass`` [m] (float32, log of the probability outside the k tokens, computed
    without the cancellation of log(1 - sum)): row i is the distribution that predicted token i,
    given the prompt and ``token_ids[:i]``. ``m`` is ``n + 1`` when the engine also scored the
    position after its last token (the local engine does: that row is the teacher's distribution
    where the stored turn's ``<|im_end|>`` goes after a stop string or a length cut), else ``n``.
  * The distribution is the model's *unmodified* one (softmax of its fp32 logits: no temperature,
    penalties, top-k or top-p), the one a teacher-forced forward pass gives, whatever the rollout
    sampled with.

``TrajectorySignal``: one rollout's ``TopLogprobs`` per stored assistant turn, in turn order (None
for a turn whose backend returned none).

Sidecar: ``write_signals(path, signals)`` stores the signals of a trajectories file in one ``.npz``
(``signal_path("x.jsonl")`` is ``x.signal.npz``), entry i belonging to line i of the trajectories
file; ``read_signals(path)`` gives them back exactly (atomic write; a file of another format
version or with inconsistent offsets is a ``SignalFileError`` naming the file). Everything is
stored flat with offsets, so the file costs ``m * (8k + 4)`` bytes per turn and no JSON parsing.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from expint_jax import storage

FORMAT_VERSION = 1


class SignalFileError(ValueError):
    """A sidecar file that cannot be read as teacher signals; the message names the file."""


@dataclasses.dataclass(frozen=True, eq=False)
class TopLogprobs:
    """One completion's generated ids and top-k + tail distributions (see the module docstring)."""

    token_ids: np.ndarray  # [n] int32
    top_ids: np.ndarray  # [m, k] int32, m in {n, n + 1}
    top_logprobs: np.ndarray  # [m, k] float32, descending
    tail_logmass: np.ndarray  # [m] float32

    def __post_init__(self) -> None:
        n, (m, k) = len(self.token_ids), self.top_ids.shape
        if self.token_ids.ndim != 1 or self.top_logprobs.shape != (m, k) or self.tail_logmass.shape != (m,):
            raise ValueError(f"TopLogprobs: shapes token_ids {self.token_ids.shape}, top_ids {self.top_ids.shape}, "
                             f"top_logprobs {self.top_logprobs.shape}, tail_logmass {self.tail_logmass.shape}")
        if m not in (n, n + 1):
            raise ValueError(f"TopLogprobs: {m} distributions for {n} generated tokens (expected {n} or {n + 1})")

    @property
    def k(self) -> int:
        return int(self.top_ids.shape[1])

    @property
    def num_positions(self) -> int:
        return int(self.top_ids.shape[0])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TopLogprobs):
            return NotImplemented
        return all(np.array_equal(getattr(self, f.name), getattr(other, f.name)) for f in dataclasses.fields(self))


@dataclasses.dataclass(frozen=True)
class TrajectorySignal:
    """One rollout's signal: ``turns[k]`` for its k-th stored assistant turn (None: none was recorded)."""

    task_id: str
    turns: tuple[TopLogprobs | None, ...]

    @property
    def complete(self) -> bool:
        return all(t is not None for t in self.turns)


def signal_path(trajectories_path: str | Path) -> Path:
    """The sidecar beside a trajectories file: ``dir/name.jsonl`` -> ``dir/name.signal.npz``."""
    path = Path(trajectories_path)
    return path.with_name(f"{path.name.removesuffix('.jsonl')}.signal.npz")


def write_signals(path: str | Path, signals: Sequence[TrajectorySignal]) -> None:
    """Writes ``signals`` (entry i for line i of the trajectories file) atomically to ``path``."""
    turns = [t for s in signals for t in s.turns]
    present = [t for t in turns if t is not None]
    ks = {t.k for t in present}
    if len(ks) > 1:
        raise ValueError(f"write_signals: the turns were recorded with different k {sorted(ks)}; use one k per file")
    k = ks.pop() if ks else 0
    empty = TopLogprobs(np.zeros(0, np.int32), np.zeros((0, k), np.int32), np.zeros((0, k), np.float32),
                        np.zeros(0, np.float32))
    filled = [t if t is not None else empty for t in turns]
    arrays = {
        "version": np.asarray(FORMAT_VERSION),
        "task_ids": np.asarray([s.task_id for s in signals], dtype=str),
        "trajectory_turns": _offsets([len(s.turns) for s in signals]),
        "turn_present": np.asarray([t is not None for t in turns], bool),
        "turn_tokens": _offsets([len(t.token_ids) for t in filled]),
        "turn_positions": _offsets([t.num_positions for t in filled]),
        "token_ids": _concat([t.token_ids for t in filled], np.int32, (0,)),
        "top_ids": _concat([t.top_ids for t in filled], np.int32, (0, k)),
        "top_logprobs": _concat([t.top_logprobs for t in filled], np.float32, (0, k)),
        "tail_logmass": _concat([t.tail_logmass for t in filled], np.float32, (0,)),
    }
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    storage.write_bytes(path, buffer.getvalue())


def read_signals(path: str | Path) -> list[TrajectorySignal]:
    """The signals ``write_signals`` stored in ``path``, in order."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError) as e:
        raise SignalFileError(f"{path}: not a teacher-signal file ({e})") from None
    version = arrays.get("version")
    if version is None or int(version) != FORMAT_VERSION:
        raise SignalFileError(f"{path}: format version {None if version is None else int(version)}, "
                              f"expected {FORMAT_VERSION}")
    try:
        return _unpack(arrays)
    except (KeyError, IndexError, ValueError) as e:
        raise SignalFileError(f"{path}: inconsistent teacher-signal arrays ({type(e).__name__}: {e})") from None


def _unpack(arrays: dict[str, np.ndarray]) -> list[TrajectorySignal]:
    tokens, positions = arrays["turn_tokens"], arrays["turn_positions"]
    if tokens[-1] != len(arrays["token_ids"]) or positions[-1] != len(arrays["top_ids"]):
        raise ValueError("the offsets do not cover the stored arrays")
    turns = []
    for i, present in enumerate(arrays["turn_present"]):
        t0, t1, p0, p1 = tokens[i], tokens[i + 1], positions[i], positions[i + 1]
        turns.append(TopLogprobs(arrays["token_ids"][t0:t1], arrays["top_ids"][p0:p1],
                                 arrays["top_logprobs"][p0:p1], arrays["tail_logmass"][p0:p1]) if present else None)
    bounds = arrays["trajectory_turns"]
    if bounds[-1] != len(turns):
        raise ValueError(f"{bounds[-1]} turns listed, {len(turns)} stored")
    return [TrajectorySignal(str(task), tuple(turns[bounds[i]:bounds[i + 1]]))
            for i, task in enumerate(arrays["task_ids"])]


def _offsets(sizes: Sequence[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(np.asarray(sizes, np.int64))]).astype(np.int64)


def _concat(parts: Sequence[np.ndarray], dtype, empty_shape: tuple[int, ...]) -> np.ndarray:
    return np.concatenate([np.asarray(p, dtype) for p in parts]) if parts else np.zeros(empty_shape, dtype)
