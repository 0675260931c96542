"""The experience-sensitive SimWeb reference agent: the designed effects of ``sensitivity.py``, measured.

Each test runs ``ReferencePolicy`` inside the real ``ReActAgent`` (so injection is the injection
module's own) and checks one designed effect: prevention, dilution, premature answering under
the finishing lesson, instance lessons acting only on their own task, per-turn contexts, and
question finding that survives any injected text.
"""

import dataclasses

import pytest

from expint_jax.experience import inject as inject_module
from expint_jax.experience.inject import GlobalInjection, NoInjection, StepwiseInjection, format_experience_block
from expint_jax.experience.select import AllSelector, Selection
from expint_jax.records import Message
from expint_jax.rollout.agent import ReActAgent
from expint_jax.rollout.envs.simweb import SimWebConfig, SimWebEnv
from expint_jax.rollout.envs.simweb.lessons import FINISHING, LESSONS_BY_KEY, MISTAKE_LESSONS
from expint_jax.rollout.envs.simweb.reference_agent import Mistakes, ReferenceAgentConfig, ReferencePolicy
from expint_jax.rollout.envs.simweb.sensitivity import (
    Context,
    Sensitivity,
    designed_effects,
    experience_items,
    mistake_rate,
    premature_rate,
    read_context,
    request_context,
)
from expint_jax.rollout.envs.simweb.tasks import find_question

SENSITIVE = Sensitivity()  # guided 0.05, premature 0.6, attention span 4
LESSON = {key: lesson.text for key, lesson in LESSONS_BY_KEY.items()}
UNRELATED = LESSON["gave_up"]  # a lesson with no designed effect
GIVE_UP = "<answer>unknown</answer>"  # the policy's reply to a conversation it did not write


@pytest.fixture(scope="module")
def env():
    return SimWebEnv(SimWebConfig(seed=11, tasks_per_level=20))


def rollouts(env, injection=NoInjection(), *, mistakes: Mistakes, sensitivity=SENSITIVE, n=4, tasks=None):
    policy = ReferencePolicy(ReferenceAgentConfig(mistakes=mistakes, sensitivity=sensitivity))
    return ReActAgent(policy, injection=injection).run_batch(list(env.tasks() if tasks is None else tasks), env, n=n,
                                                             seed=0)


def accuracy(runs) -> float:
    return sum(t.reward for t in runs) / len(runs)


def messages(runs):
    return [t.messages for t in runs]


@dataclasses.dataclass(frozen=True)
class Shows:
    """A selector for tests: ``ids`` at the listed assistant turns (all when None), optionally only once a page was read."""

    ids: tuple[str, ...]
    turns: tuple[int, ...] | None = None
    after_page: bool = False
    name: str = "shows"

    def select(self, history, pool):
        return self.select_batch([history], pool)[0]

    def select_batch(self, histories, pool):
        out = []
        for history in histories:
            turn = sum(m.role == "assistant" for m in history)
            page_read = any("Key facts:" in m.content for m in history if m.role == "user")
            show = (self.turns is None or turn in self.turns) and (page_read or not self.after_page)
            out.append(Selection(self.ids if show else ()))
        return out


def test_designed_rates():
    one, diluted, other = Context(1, frozenset({"answered_from_snippets"})), Context(8, frozenset(
        {"answered_from_snippets"})), Context(1, frozenset({"gave_up"}))
    assert mistake_rate("answer_early", 0.35, one, SENSITIVE, pages_read=False) == pytest.approx(0.05)
    assert mistake_rate("answer_early", 0.35, diluted, SENSITIVE, pages_read=False) == pytest.approx(0.35 - 0.3 / 2)
    assert mistake_rate("answer_early", 0.35, other, SENSITIVE, pages_read=False) == 0.35
    assert mistake_rate("answer_early", 0.35, one, None, pages_read=False) == 0.35  # not sensitive
    assert mistake_rate("wrong_link", 0.02, Context(1, frozenset({"picked_lookalike"})), SENSITIVE,
                        pages_read=False) == 0.02  # a lesson never raises a rate above its base
    finishing = Context(2, frozenset({FINISHING}))
    assert premature_rate(finishing, SENSITIVE) == pytest.approx(0.6)
    assert premature_rate(Context(8, frozenset({FINISHING})), SENSITIVE) == pytest.approx(0.3)
    assert premature_rate(finishing, None) == 0.0 and premature_rate(one, SENSITIVE) == 0.0
    assert mistake_rate("answer_early", 0.35, finishing, SENSITIVE, pages_read=False) == pytest.approx(
        0.35 + 0.65 * 0.6)
    assert mistake_rate("answer_early", 0.35, finishing, SENSITIVE, pages_read=True) == 0.35
    assert mistake_rate("skip_hop", 0.35, finishing, SENSITIVE, pages_read=False) == 0.35
    with pytest.raises(ValueError, match="attention_span"):
        Sensitivity(attention_span=0)
    with pytest.raises(ValueError, match="guided"):
        Sensitivity(guided=1.5)


def test_designed_effects_are_written_down_in_one_table():
    table = designed_effects()
    for kind, key in MISTAKE_LESSONS.items():
        assert kind in table and LESSONS_BY_KEY[key].label in table
    assert LESSONS_BY_KEY[FINISHING].label in table and "premature" in table and "min(1, 4 / n)" in table
    assert "0.05" in table and "0.6" in table


def test_experience_items_read_what_the_injection_module_writes():
    pool = {"G0": LESSON["answered_from_snippets"], "G1": UNRELATED, "G2": "Some lesson without a known label."}
    step = format_experience_block({"G0": pool["G0"], "G2": pool["G2"]})
    assert experience_items("tool output" + step) == [pool["G0"], pool["G2"]]
    system = "You are an agent.\n\n# Tools\n..." + GlobalInjection(pool).block
    assert experience_items(system) == list(pool.values())
    assert experience_items("**Relevant experiences:**\n[G4]. " + UNRELATED) == [UNRELATED]  # the older format
    note = getattr(inject_module, "STEPWISE_SYSTEM_NOTE", "")
    assert experience_items("You are an agent." + ("\n\n" + note if note else "")) == []
    request = [Message("system", system), Message("user", "question"), Message("assistant", "call"),
               Message("user", "<tool_response>\nresults\n</tool_response>" + step)]
    assert request_context(request, ["X"]) == Context(5, frozenset({"answered_from_snippets", "gave_up"}))
    assert request_context(request, ["X"], step=False) == Context(3, frozenset({"answered_from_snippets", "gave_up"}))


def test_without_experience_the_sensitive_agent_is_the_plain_one(env):
    mistakes = Mistakes(0.35, 0.35, 0.35)
    plain = rollouts(env, mistakes=mistakes, sensitivity=None)
    assert messages(rollouts(env, mistakes=mistakes)) == messages(plain)
    # And without sensitivity, experience in context changes nothing, whatever it says.
    pool = {f"G{k}": text for k, text in enumerate(LESSON.values())}
    for injection in (GlobalInjection(pool), StepwiseInjection(pool, AllSelector())):
        assert messages(rollouts(env, injection, mistakes=mistakes, sensitivity=None)) == messages(plain)


@pytest.mark.parametrize("kind", ["answer_early", "wrong_link", "skip_hop"])
def test_each_mistake_falls_when_its_lesson_is_in_context(env, kind):
    mistakes = Mistakes(**{kind: 0.5})
    none = rollouts(env, mistakes=mistakes)
    lesson = {"G0": LESSON[MISTAKE_LESSONS[kind]]}
    helped = {name: rollouts(env, injection, mistakes=mistakes) for name, injection in
              (("global", GlobalInjection(lesson)), ("stepwise", StepwiseInjection(lesson, AllSelector())))}
    unrelated = rollouts(env, GlobalInjection({"G0": UNRELATED}), mistakes=mistakes)
    assert messages(unrelated) == messages(none)  # another lesson: the same rollouts
    failures = 1 - accuracy(none)
    assert failures > 0.1, kind
    for name, runs in helped.items():
        # 0.5 -> 0.05: failures from this mistake fall to about a tenth
        assert 1 - accuracy(runs) < 0.35 * failures, (kind, name, accuracy(none), accuracy(runs))
    # A lesson that prevents another mistake does not help with this one.
    other = next(key for k, key in MISTAKE_LESSONS.items() if k != kind)
    assert messages(rollouts(env, GlobalInjection({"G0": LESSON[other]}), mistakes=mistakes)) == messages(none)


def test_a_long_block_dilutes_every_lesson(env):
    mistakes = Mistakes(answer_early=0.5)
    fillers = {f"G{k}": f"Note {k}: a remark of no use here." for k in range(1, 12)}
    alone = accuracy(rollouts(env, GlobalInjection({"G0": LESSON["answered_from_snippets"]}), mistakes=mistakes))
    diluted = accuracy(rollouts(env, GlobalInjection({"G0": LESSON["answered_from_snippets"], **fillers}),
                                mistakes=mistakes))  # 12 items: w = 1/3, rate 0.5 -> 0.35
    none = accuracy(rollouts(env, mistakes=mistakes))
    assert none + 0.03 < diluted < alone - 0.05, (none, diluted, alone)
    # With a wider attention span the same block acts fully.
    wide = rollouts(env, GlobalInjection({"G0": LESSON["answered_from_snippets"], **fillers}), mistakes=mistakes,
                    sensitivity=Sensitivity(attention_span=12))
    assert accuracy(wide) == alone


def test_the_finishing_lesson_before_any_page_makes_it_answer_early(env):
    mistakes = Mistakes(0.1, 0.1, 0.1)
    finishing = {"G0": LESSON[FINISHING]}
    none = rollouts(env, mistakes=mistakes)
    global_ = rollouts(env, GlobalInjection(finishing), mistakes=mistakes)
    no_tool = sum(t.num_tool_calls == 0 for t in global_) / len(global_)
    assert all(t.num_tool_calls > 0 for t in none)
    assert 0.45 < no_tool < 0.75, no_tool  # premature 0.6 at full attention
    assert accuracy(global_) < accuracy(none) - 0.3
    # Step-wise, shown only once a page has been read, it has no effect at all ...
    late = rollouts(env, StepwiseInjection(finishing, Shows(("G0",), after_page=True)), mistakes=mistakes)
    assert messages(late) == messages(none)
    assert any(t.step_injections and any(t.step_injections) for t in late)
    # ... and shown at every step (before any page too) it harms like global.
    early = rollouts(env, StepwiseInjection(finishing, AllSelector()), mistakes=mistakes)
    assert sum(t.num_tool_calls == 0 for t in early) / len(early) > 0.45


def test_instance_lessons_act_only_on_the_task_they_name(env):
    tasks = list(env.tasks())
    target = next(t for t in tasks if t.metadata["style"] == "lookup")
    others = [t for t in tasks if not set(t.metadata["entities"]) & set(target.metadata["entities"])][:20]
    lesson = {"G0": f'Answer source: The answer to "{target.question}" is {target.answer}, stated on '
                    f'{target.metadata["answer_urls"][0]} ({target.metadata["entities"][0]}).'}
    mistakes = Mistakes(answer_early=0.6)
    own_none = rollouts(env, mistakes=mistakes, tasks=[target], n=40)
    own_helped = rollouts(env, GlobalInjection(lesson), mistakes=mistakes, tasks=[target], n=40)
    assert accuracy(own_helped) > accuracy(own_none) + 0.3
    assert messages(rollouts(env, GlobalInjection(lesson), mistakes=mistakes, tasks=others)) == messages(
        rollouts(env, mistakes=mistakes, tasks=others))
    assert read_context(list(lesson.values()), ["Someone Else"]) == Context(1, frozenset())


def test_each_turn_keeps_the_context_of_its_own_request(env):
    """A lesson shown at one step only acts there; replaying later requests must not re-decide that step."""
    mistakes = Mistakes(answer_early=0.5)
    lesson = {"G0": LESSON["answered_from_snippets"]}
    at_turn_1 = StepwiseInjection(lesson, Shows(("G0",), turns=(1,)))  # the decision after the first search
    runs = rollouts(env, at_turn_1, mistakes=mistakes)
    assert not any(m.content == GIVE_UP for t in runs for m in t.messages if m.role == "assistant")
    assert accuracy(runs) > accuracy(rollouts(env, mistakes=mistakes)) + 0.2
    at_turn_0 = StepwiseInjection(lesson, Shows(("G0",), turns=(0,)))  # too early: no decision is made there
    assert messages(rollouts(env, at_turn_0, mistakes=mistakes)) == messages(rollouts(env, mistakes=mistakes))


QUESTION = ("According to the Lumen Bay Arts Council website (https://lumen-bay-arts-council.example.org/), in what "
            "year was Saplen Print Collective founded?")
OTHER = ("According to the Other Site website (https://other-site.example.org/), who is the director of Bruzail "
         "Film Collective?")


@pytest.mark.parametrize("text", [
    QUESTION,
    QUESTION + format_experience_block({"G0": f'Answer source: The answer to "{OTHER}" is Ada Kell.'}),
    QUESTION + "\n\n**Relevant experiences:**\n[G0]. " + OTHER,
    QUESTION + " Think step by step, and remember: " + OTHER,
    QUESTION + "\nPS: the answer is not 1999?",
    QUESTION + " Or was Bruzail Film Collective founded?",  # the whole line also parses, with a wrong name
    "Note: use the tools.\n" + QUESTION + "\n\n" + UNRELATED,
])
def test_question_finding_survives_injected_text(text):
    assert find_question(text) == QUESTION


def test_question_finding_rejects_non_questions():
    assert find_question("What is the meaning of life?") is None
    assert find_question(format_experience_block({"G0": UNRELATED})) is None


def test_policy_reads_the_question_through_any_step_block(env):
    """Step-wise blocks land in the question message at turn 0; noise must not change the task read."""
    mistakes = Mistakes(0.35, 0.35, 0.35)
    noise = {"G0": f'Answer source: The answer to "{OTHER}" is 1999.', "G1": OTHER, "G2": "? ) According to the"}
    for sensitivity in (None, SENSITIVE):
        plain = rollouts(env, mistakes=mistakes, sensitivity=sensitivity)
        noisy = rollouts(env, StepwiseInjection(noise, AllSelector()), mistakes=mistakes, sensitivity=sensitivity)
        assert messages(noisy) == messages(plain)
    assert all(t.step_injections[0] and OTHER in t.step_injections[0] for t in noisy)
