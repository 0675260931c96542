"""The three distillation regimes of the paper, as small strategy objects.

A ``Regime`` says who acts to make the distillation data, with which experience, what is kept,
which per-token loss trains the student, and when the data are refreshed:

  ============  ======================  ======================  ====================  ==========
  regime        who rolls out           kept                    loss                  refresh
  ============  ======================  ======================  ====================  ==========
  off_policy    teacher: π_k + E_k      judged correct only     trainer's divergence  never
                                        (rejection sampling)    (forward KL default)
  on_policy     the current student,    every rollout; the      reverse KL or the     every
                no experience           teacher's contexts are  sampled-token         ``refresh_every``
                                        attached to its own     estimator             optimizer steps
                                        prefixes                                      (default: epoch)
  sft           teacher: π_k + E_k      judged correct only     NLL                   never
  ============  ======================  ======================  ====================  ==========

``acceptance`` is the rejection-sampling filter with its per-task and total acceptance rates;
``round_steps`` splits an on-policy run into sampling rounds.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from expint_jax.distill.step import StepConfig
from expint_jax.loop.config import LoopConfig
from expint_jax.records import Trajectory


@dataclasses.dataclass(frozen=True)
class Regime:
    name: str
    teacher_acts: bool  # the teacher (π_k with E_k) rolls out; else the student without experience
    filters: bool  # keep only judged-correct rollouts
    loss: str  # a ``Divergence`` kind
    refresh_every: int | None = None  # on-policy: optimizer steps per sampling round (0 = one epoch)

    def step(self, base: StepConfig) -> StepConfig:
        """The trainer's step with this regime's loss (other settings of ``base`` kept)."""
        return dataclasses.replace(base, divergence=dataclasses.replace(base.divergence, kind=self.loss))


def make_regime(config: LoopConfig) -> Regime:
    d = config.distill
    if d.regime == "off_policy":
        return Regime("off_policy", teacher_acts=True, filters=True, loss=config.trainer.step.divergence.kind)
    if d.regime == "on_policy":
        return Regime("on_policy", teacher_acts=False, filters=False, loss=d.on_policy.loss,
                      refresh_every=d.on_policy.refresh_every)
    if d.regime == "sft":
        return Regime("sft", teacher_acts=True, filters=True, loss="nll")
    raise ValueError(f"config.distill.regime: unknown regime {d.regime!r}")


@dataclasses.dataclass(frozen=True)
class Acceptance:
    accepted: tuple[Trajectory, ...]
    per_task: dict[str, float]  # task id -> share of its rollouts kept
    rate: float  # kept / all

    def to_json(self) -> dict[str, Any]:
        return {"accepted": len(self.accepted), "rate": self.rate, "per_task": self.per_task}


def acceptance(trajectories: Sequence[Trajectory], min_reward: float) -> Acceptance:
    """Rejection sampling: the rollouts judged correct (``reward >= min_reward``), with the rates."""
    per_task: dict[str, list[bool]] = {}
    kept = []
    for t in trajectories:
        ok = t.reward is not None and t.reward >= min_reward
        per_task.setdefault(t.task_id, []).append(ok)
        if ok:
            kept.append(t)
    rates = {task: sum(flags) / len(flags) for task, flags in per_task.items()}
    return Acceptance(tuple(kept), rates, len(kept) / len(trajectories) if trajectories else 0.0)


def round_steps(total_steps: int, refresh_every: int, steps_per_epoch: int) -> list[int]:
    """Optimizer steps of each on-policy sampling round: ``refresh_every`` each (0: one epoch each),
    the last round taking what remains of ``total_steps``."""
    if total_steps < 1 or steps_per_epoch < 1:
        raise ValueError(f"round_steps: total_steps={total_steps} and steps_per_epoch={steps_per_epoch} must be >= 1")
    per_round = refresh_every or steps_per_epoch
    rounds = math.ceil(total_steps / per_round)
    return [min(per_round, total_steps - r * per_round) for r in range(rounds)]

