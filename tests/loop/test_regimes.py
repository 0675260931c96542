"""The regimes' rules: who acts, what is kept, which loss, how on-policy rounds split the steps."""

import pytest

from expint_jax.loop.regimes import acceptance, make_regime, round_steps
from expint_jax.records import Message, Trajectory
from tests.loop.conftest import loop_config


def test_each_regime_states_its_data_and_loss(tmp_path):
    off = make_regime(loop_config(tmp_path))
    on = make_regime(loop_config(tmp_path, distill__regime="on_policy", distill__on_policy__loss="sampled",
                                 distill__on_policy__refresh_every=3))
    sft = make_regime(loop_config(tmp_path, distill__regime="sft"))
    assert (off.teacher_acts, off.filters, off.loss) == (True, True, "forward_kl")
    assert (on.teacher_acts, on.filters, on.loss, on.refresh_every) == (False, False, "sampled", 3)
    assert (sft.teacher_acts, sft.filters, sft.loss) == (True, True, "nll")
    base = loop_config(tmp_path).trainer.step
    assert sft.step(base).divergence.kind == "nll" and sft.step(base).chunk_size == base.chunk_size


def test_acceptance_keeps_judged_correct_rollouts_with_rates():
    def t(task, reward):
        return Trajectory(task, (Message("user", "q"),), reward=reward)

    kept = acceptance([t("a", 1.0), t("a", 0.0), t("b", 0.0), t("b", None), t("c", 1.0)], 1.0)
    assert [x.task_id for x in kept.accepted] == ["a", "c"]
    assert kept.per_task == {"a": 0.5, "b": 0.0, "c": 1.0} and kept.rate == pytest.approx(2 / 5)


def test_on_policy_rounds():
    assert round_steps(10, 0, 4) == [4, 4, 2]  # every epoch
    assert round_steps(10, 3, 4) == [3, 3, 3, 1]
    assert round_steps(2, 5, 4) == [2]
    with pytest.raises(ValueError):
        round_steps(0, 0, 4)
