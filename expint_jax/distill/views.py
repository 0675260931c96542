"""Teacher and student token layouts of one trajectory, aligned position by position.

The student sees the conversation as stored (no experience). The teacher sees, for each
assistant turn k, ``context_before_turn(trajectory, k)``: the same history with the global block
in the system prompt and turn k's step-wise block at the end of the last user message. Both are
tokenized with ``ChatFormat.encode``, so each side is exactly what a model would have seen.

Teacher packing (one forward pass scores every turn):
  * the **trunk** is the conversation with only the global injection (identical to the student
    sequence when there is none);
  * each turn with a non-empty step-wise block gets a **branch**: the tokens of its own context
    from the first token where that context differs from the trunk (inside the last user
    message: tokenizer merges at the join are handled because the divergence point is found on
    token ids, not on text) through the end of turn k (its ``<|im_end|>``);
  * a branch token sees the trunk up to its attach point and the earlier tokens of its own branch
    (``tree_attention_mask``); its position id continues from the attach point, so every branch
    token has exactly the position and the visible context it has in its own turn's sequence.

Alignment: for every token the agent wrote (``loss_mask``; its content and ``<|im_end|>``), the
student index and the teacher index *of the position that predicts it* (one before the token),
and the target id. Turns that do not fit the length budget are cut whole from the end
(``overflow="truncate"``) or the example is dropped (``overflow="drop"``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from expint_jax.experience.inject import context_before_turn, inject
from expint_jax.models.chat import ChatFormat, EncodedChat
from expint_jax.records import Trajectory


class ViewError(ValueError):
    """A trajectory whose teacher and student views cannot be aligned; names task and turn."""


@dataclasses.dataclass(frozen=True)
class DistillExample:
    """One trajectory's aligned layouts. Arrays are unpadded numpy; the data pipeline pads them."""

    task_id: str
    student_ids: np.ndarray  # [Ls] int32; positions are 0..Ls-1 with plain causal attention
    teacher_ids: np.ndarray  # [Lt] int32
    teacher_positions: np.ndarray  # [Lt] int32 position ids (RoPE)
    teacher_branch: np.ndarray  # [Lt] int32: 0 on the trunk, b >= 1 on branch b
    teacher_attach: np.ndarray  # [Lt] int32: last trunk index visible to the token (trunk: itself)
    student_loss_index: np.ndarray  # [N] int32: student positions whose logits predict `targets`
    teacher_loss_index: np.ndarray  # [N] int32: the teacher positions predicting the same tokens
    targets: np.ndarray  # [N] int32
    loss_turn: np.ndarray  # [N] int32: assistant turn of each target
    num_turns: int  # assistant turns kept
    truncated_turns: int  # assistant turns cut to fit the budget
    # The teacher's distribution at each loss position as its rollout recorded it (top-k + tail),
    # set by ``teacher_signal.align_signal``; None when the example carries no rollout signal.
    teacher_top_ids: np.ndarray | None = None  # [N, k] int32
    teacher_top_logprobs: np.ndarray | None = None  # [N, k] float32, descending
    teacher_tail_logmass: np.ndarray | None = None  # [N] float32

    @property
    def num_loss_tokens(self) -> int:
        return int(self.targets.shape[0])

    @property
    def signal_k(self) -> int:
        """k of the rollout signal; 0 when the example has none."""
        return 0 if self.teacher_top_ids is None else int(self.teacher_top_ids.shape[1])


@dataclasses.dataclass(frozen=True)
class ViewBudget:
    max_student_tokens: int = 32768
    max_teacher_tokens: int = 65536
    overflow: Literal["truncate", "drop"] = "truncate"

    def __post_init__(self) -> None:
        if self.overflow not in ("truncate", "drop"):
            raise ValueError(f"ViewBudget.overflow={self.overflow!r}; choose 'truncate' or 'drop'")


def _assistant_token_indices(encoded: EncodedChat, turn: int) -> np.ndarray:
    return np.flatnonzero(encoded.loss_mask & (encoded.turn_index == turn))


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


def _keep_turns(trajectory: Trajectory, turns: int) -> Trajectory:
    """The trajectory cut right after its ``turns``-th assistant message."""
    positions = [i for i, m in enumerate(trajectory.messages) if m.role == "assistant"]
    end = positions[turns - 1] + 1
    return dataclasses.replace(
        trajectory,
        messages=trajectory.messages[:end],
        step_injections=trajectory.step_injections[:turns],
        step_experience_ids=trajectory.step_experience_ids[:turns],
    )


def build_example(trajectory: Trajectory, chat: ChatFormat, budget: ViewBudget = ViewBudget()) -> DistillExample | None:
    """Aligned views of ``trajectory``; ``None`` when it has no assistant turn or cannot fit."""
    total = trajectory.num_assistant_turns
    for turns in range(total, 0, -1):
        example = _build(_keep_turns(trajectory, turns), chat, truncated=total - turns)
        fits = (len(example.student_ids) <= budget.max_student_tokens
                and len(example.teacher_ids) <= budget.max_teacher_tokens)
        if fits:
            return example
        if budget.overflow == "drop":
            return None
    return None


def build_lm_example(trajectory: Trajectory, chat: ChatFormat, budget: ViewBudget = ViewBudget()) -> DistillExample | None:
    """Language modelling on the stored conversation: every token after the first is a target
    (system prompt, question, tool results and the agent's turns alike), no experience anywhere, the
    teacher layout equal to the student's. A conversation over ``budget.max_student_tokens`` keeps
    its first tokens (``overflow="drop"``: None). Trajectories carrying experience are refused: their
    behaviour was shaped by text this view does not show."""
    if trajectory.global_injection or any(block.strip() for block in trajectory.step_injections):
        raise ValueError(f"trajectory {trajectory.task_id!r} carries experience; a language-modelling example "
                         "shows the stored conversation only")
    ids = chat.encode(trajectory.messages).token_ids.astype(np.int32)
    if len(ids) > budget.max_student_tokens:
        if budget.overflow == "drop":
            return None
        ids = ids[:budget.max_student_tokens]
    if len(ids) < 2:
        return None
    index = np.arange(len(ids) - 1, dtype=np.int32)
    return DistillExample(
        task_id=trajectory.task_id, student_ids=ids, teacher_ids=ids, teacher_positions=np.arange(len(ids), dtype=np.int32),
        teacher_branch=np.zeros(len(ids), np.int32), teacher_attach=np.arange(len(ids), dtype=np.int32),
        student_loss_index=index, teacher_loss_index=index, targets=ids[1:], loss_turn=np.zeros(len(index), np.int32),
        num_turns=trajectory.num_assistant_turns, truncated_turns=0)


def _build(trajectory: Trajectory, chat: ChatFormat, truncated: int) -> DistillExample:
    student = chat.encode(trajectory.messages)
    trunk = chat.encode(inject(trajectory.messages, trajectory.global_injection, ""))
    ids = [trunk.token_ids]
    positions = [np.arange(len(trunk), dtype=np.int32)]
    branch = [np.zeros(len(trunk), np.int32)]
    attach = [np.arange(len(trunk), dtype=np.int32)]
    student_index, teacher_index, targets, turn_of = [], [], [], []
    offset = len(trunk)

    for k in range(trajectory.num_assistant_turns):
        s_idx = _assistant_token_indices(student, k)
        step_block = trajectory.step_injections[k] if trajectory.step_injections else ""
        if step_block:
            own = chat.encode(context_before_turn(trajectory, k) + (_assistant_message(trajectory, k),))
            t_own = _assistant_token_indices(own, k)
            split = _common_prefix(own.token_ids, trunk.token_ids)
            if split == 0 or (t_own.size and split > t_own[0] - 1):
                raise ViewError(f"trajectory {trajectory.task_id!r}, turn {k}: the step-wise context does not "
                                f"diverge from the trunk before the turn (split at token {split})")
            end = (t_own[-1] + 1) if t_own.size else len(own)
            piece = own.token_ids[split:end]
            ids.append(piece)
            positions.append(np.arange(split, end, dtype=np.int32))
            branch.append(np.full(len(piece), k + 1, np.int32))
            attach.append(np.full(len(piece), split - 1, np.int32))
            t_idx = offset + (t_own - split)
            t_tokens = own.token_ids[t_own]
            offset += len(piece)
        else:
            t_own = _assistant_token_indices(trunk, k)
            t_idx, t_tokens = t_own, trunk.token_ids[t_own]
        s_tokens = student.token_ids[s_idx]
        if len(s_tokens) != len(t_tokens) or not np.array_equal(s_tokens, t_tokens):
            raise ViewError(f"trajectory {trajectory.task_id!r}, turn {k}: the assistant tokens differ between the "
                            f"student ({len(s_tokens)} tokens) and teacher ({len(t_tokens)} tokens) views")
        student_index.append(s_idx - 1)
        teacher_index.append(t_idx - 1)
        targets.append(s_tokens)
        turn_of.append(np.full(len(s_idx), k, np.int32))

    def cat(parts: Sequence[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)

    return DistillExample(
        task_id=trajectory.task_id,
        student_ids=student.token_ids.astype(np.int32),
        teacher_ids=cat(ids),
        teacher_positions=cat(positions),
        teacher_branch=cat(branch),
        teacher_attach=cat(attach),
        student_loss_index=cat(student_index),
        teacher_loss_index=cat(teacher_index),
        targets=cat(targets),
        loss_turn=cat(turn_of),
        num_turns=trajectory.num_assistant_turns,
        truncated_turns=truncated,
    )


def _assistant_message(trajectory: Trajectory, k: int):
    return [m for m in trajectory.messages if m.role == "assistant"][k]


def tree_attention_mask(branch: jax.Array, attach: jax.Array, valid: jax.Array) -> jax.Array:
    """Boolean [B, T, T] mask: query i sees key j when j is a trunk token with j <= attach[i], or
    j is in i's own branch with j <= i. ``valid`` [B, T] removes padding on both sides."""
    index = jnp.arange(branch.shape[-1])
    sees_trunk = (branch[:, None, :] == 0) & (index[None, None, :] <= attach[:, :, None])
    own_branch = ((branch[:, :, None] == branch[:, None, :]) & (branch[:, :, None] != 0)
                  & (index[None, None, :] <= index[None, :, None]))
    return (sees_trunk | own_branch) & valid[:, :, None] & valid[:, None, :]
