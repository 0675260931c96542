"""The rollout's teacher signal aligned with a distillation example's loss positions.

``StepConfig(teacher="from_rollout")`` trains on the top-k + tail distributions the teacher's
engine recorded while it wrote the trajectory (``expint_jax.token_signal``) instead of running the
teacher. The views re-tokenize the stored text, and the agent cut and stripped what the engine
generated, so the signal of a turn is used only where both sides provably agree:

  * The loss targets of assistant turn k are its content ids ``c`` followed by ``<|im_end|>``.
    Position i of the turn is predicted from ``context + c[:i]``; the engine's row i was computed
    from ``context + g[:i]`` (``g`` = every id it generated). So the turn is aligned when ``c`` is
    a prefix of ``g`` (a cut at a stop string or after ``</tool_call>``, or trailing whitespace
    stripped, keeps this) and the engine has a row at ``len(c)``, the ``<|im_end|>`` position.
    That row is the teacher's distribution after the kept text whatever the engine sampled next
    (an eos, the stop string's tokens, the cut text, or nothing: the local engine scores the
    position after its last token), which is exactly what a teacher forward would give there.
  * Anything else (no signal for the turn, text re-tokenized differently from how it was sampled,
    leading whitespace stripped, a ``</tool_call>`` put back by the agent, no row at ``<|im_end|>``)
    and the example has no signal. ``align_signal`` says why; ``pipeline.build_examples`` then
    skips the example and counts it (``ExampleCounts.skipped_no_signal``): a from-rollout run
    never mixes in examples whose teacher distribution it does not know.

The teacher context itself (system prompt, injected experience) is the one the agent sent, which
the views rebuild exactly (``views`` and ``experience.inject.context_before_turn``).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from expint_jax.distill.views import DistillExample
from expint_jax.token_signal import TrajectorySignal


@dataclasses.dataclass(frozen=True)
class SignalMismatch:
    """Why an example cannot use its rollout signal (names the turn)."""

    turn: int
    reason: str

    def __str__(self) -> str:
        return f"turn {self.turn}: {self.reason}"


def align_signal(example: DistillExample, signal: TrajectorySignal) -> DistillExample | SignalMismatch:
    """``example`` with ``teacher_top_ids`` / ``teacher_top_logprobs`` / ``teacher_tail_logmass`` at
    its loss positions, or why not (module docstring). Turns cut by the length budget are ignored."""
    if len(signal.turns) < example.num_turns:
        return SignalMismatch(len(signal.turns), f"the signal covers {len(signal.turns)} turns, the example "
                                                 f"{example.num_turns}")
    ks = {t.k for t in signal.turns[:example.num_turns] if t is not None}
    if len(ks) > 1:
        return SignalMismatch(0, f"turns recorded with different k {sorted(ks)}")
    ids, logprobs, tails = [], [], []
    for k in range(example.num_turns):
        turn = signal.turns[k]
        if turn is None:
            return SignalMismatch(k, "no signal was recorded for it")
        targets = example.targets[example.loss_turn == k]
        content = targets[:-1]  # the last target is the turn's <|im_end|>
        generated = turn.token_ids[:len(content)]
        if len(generated) < len(content) or not np.array_equal(generated, content):
            differ = int(np.flatnonzero(np.append(generated != content[:len(generated)], True))[0])
            return SignalMismatch(k, f"the stored text's tokens differ from the generated ones at token {differ} "
                                     f"of {len(content)} (re-tokenized or edited text)")
        if turn.num_positions < len(targets):
            return SignalMismatch(k, f"no distribution at its <|im_end|> (position {len(content)}; the engine "
                                     f"reported {turn.num_positions})")
        ids.append(turn.top_ids[:len(targets)])
        logprobs.append(turn.top_logprobs[:len(targets)])
        tails.append(turn.tail_logmass[:len(targets)])
    return dataclasses.replace(
        example,
        teacher_top_ids=np.concatenate(ids).astype(np.int32),
        teacher_top_logprobs=np.concatenate(logprobs).astype(np.float32),
        teacher_tail_logmass=np.concatenate(tails).astype(np.float32),
    )
