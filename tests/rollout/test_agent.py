"""The ReAct agent on scripted model outputs: parsing, error observations, limits, injection, batching."""

import dataclasses
import json
import threading

import pytest

from expint_jax.experience.inject import (
    EXPERIENCE_HEADER,
    GLOBAL_HEADER,
    STEPWISE_SYSTEM_NOTE,
    GlobalInjection,
    StepwiseInjection,
    annotate_injections,
    context_before_turn,
    format_experience_block,
    format_global_block,
)
from expint_jax.experience.select import BM25Selector, Selection
from expint_jax.models.chat import format_tool_call, format_tool_response
from expint_jax.llm.base import per_conversation
from expint_jax.records import EXP_SELECTIONS, FORCED_ANSWER_TURN, Completion, Message, SamplingParams, Trajectory
from expint_jax.rollout import prompts
from expint_jax.rollout.agent import AgentConfig, ReActAgent, assistant_text, estimate_tokens
from expint_jax.rollout.envs.base import Task
from expint_jax.rollout.tools import ToolError, ToolSpec, require_str

POOL = {"G0": "When a page is missing, search again.", "G1": "When done, answer briefly.", "G2": "Verify numbers."}


def spec(name):
    return ToolSpec(name, f"The {name} tool.", {"type": "object", "properties": {"text": {"type": "string"}}})


class Echo:
    spec = spec("echo")

    def __call__(self, arguments):
        return "echo: " + require_str(arguments, "text", "echo")


class Missing:
    spec = spec("visit")

    def __call__(self, arguments):
        raise ToolError("page https://x.example/ does not exist")


class Buggy:
    spec = spec("buggy")

    def __call__(self, arguments):
        raise KeyError("internal")


class Big:
    spec = spec("big")

    def __call__(self, arguments):
        return "x" * 5000


class FakeEnv:
    name = "fake"

    def __init__(self, tools=(Echo, Missing, Buggy, Big)):
        self._tools = tools

    def tasks(self):
        return []

    def tools(self, task):
        return [t() for t in self._tools]

    def score(self, task, prediction):
        return float(prediction == task.answer)


def call(name, **arguments):
    return format_tool_call(name, arguments)


def question_of(conversation):
    return conversation[1].content.split("\n\n")[0]


def turn_of(conversation):
    return sum(m.role == "assistant" for m in conversation)


class ScriptedBackend:
    """``script(question, turn, conversation)`` gives the reply; every request is recorded."""

    def __init__(self, script):
        self.script = script
        self.calls = []  # (conversations, one SamplingParams per conversation) per backend.chat call

    def chat(self, conversations, params):
        self.calls.append((list(conversations), per_conversation(params, len(conversations))))
        out = []
        for conversation in conversations:
            reply = self.script(question_of(conversation), turn_of(conversation), conversation)
            out.append(reply if isinstance(reply, Completion) else Completion(reply))
        return out

    @property
    def requests(self):
        return [c for conversations, _ in self.calls for c in conversations]


def replies(*texts):
    return ScriptedBackend(lambda question, turn, conversation: texts[turn])


TASK = Task("t1", "What does echo say?", answer="echo: hi")


def run(backend, env=None, config=AgentConfig(), **kwargs):
    return ReActAgent(backend, config, **kwargs).run(TASK, env or FakeEnv())


def test_tool_call_then_answer():
    backend = replies("<think>use echo</think>\n" + call("echo", text="hi"), "<answer>echo: hi</answer>")
    traj = run(backend)
    system = traj.messages[0].content
    assert "# Tools" in system and "<tools>" in system and json.dumps(Echo.spec.to_json()) in system
    assert '{"name": <function-name>, "arguments": <args-json-object>}' in system and "<answer>" in system
    assert [m.role for m in traj.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert traj.messages[1].content == TASK.question
    assert traj.messages[3].content == "<tool_response>\necho: hi\n</tool_response>"
    assert (traj.termination, traj.prediction, traj.reward, traj.ground_truth) == ("answer", "echo: hi", 1.0, "echo: hi")
    assert traj.num_tool_calls == 1 and traj.injection == "none" and traj.step_injections == ()
    assert traj.metadata["llm_calls"] == 2 and traj.metadata["tool_errors"] == 0
    assert Trajectory.from_json(json.loads(json.dumps(traj.to_json()))) == traj
    params = backend.calls[0][1][0]
    assert "<tool_response>" in params.stop and "</tool_call>" in params.stop and params.temperature == 0.7


@pytest.mark.parametrize(
    "reply, expected",
    [
        ('<tool_call>\n{"name": "echo", "arguments": {"text": "hi"}\n</tool_call>', "could not be parsed (the tool call is not valid JSON"),
        ('<tool_call>\n{"arguments": {"text": "hi"}}\n</tool_call>', 'needs a non-empty string "name"'),
        ('<tool_call>\n{"name": "echo", "arguments": ["hi"]}\n</tool_call>', "must be a JSON object, got an array"),
        ("<tool_call>\n" + '{"name": "search", "arguments": {}}' + "\n</tool_call>", "there is no tool named 'search'. Available tools: big, buggy, echo, visit."),
        (call("visit", text="x"), "Error: page https://x.example/ does not exist"),
        (call("buggy", text="x"), "Error: tool 'buggy' failed internally (KeyError: 'internal')"),
        (call("echo", text=""), "Error: echo: argument 'text' must be a non-empty string"),
    ],
    ids=["invalid-json", "no-name", "array-arguments", "unknown-tool", "tool-error", "tool-bug", "bad-argument"],
)
def test_bad_calls_become_observations(reply, expected):
    traj = run(replies(reply, "<answer>done</answer>"))
    observation = traj.messages[3].content
    assert observation.startswith("<tool_response>\n") and expected in observation
    assert traj.termination == "answer" and traj.prediction == "done"
    assert traj.metadata["tool_errors"] == 1 and traj.num_tool_calls == 1


UNCLOSED = '<tool_call>\n{"name": "echo", "arguments": {"text": "hi"}}\n'


@pytest.mark.parametrize(
    "completion, executed",
    [
        (Completion(UNCLOSED, stop_string="</tool_call>"), True),  # the backend removed the stop string
        (Completion(UNCLOSED, stop_string=None), True),  # backend cannot tell which stop fired
        (Completion(UNCLOSED, stop_string="<tool_response>"), False),  # the model skipped </tool_call>
        (Completion(UNCLOSED, finish_reason="length"), False),
        (Completion('<tool_call>\n{"name": "echo", "argu', stop_string=None), False),
    ],
)
def test_missing_closing_tag(completion, executed):
    traj = run(replies(completion, "<answer>ok</answer>"))
    observation = traj.messages[3].content
    if executed:
        assert traj.messages[2].content == UNCLOSED + "</tool_call>"
        assert observation == format_tool_response("echo: hi")
    else:
        assert "could not be parsed" in observation


def test_reply_is_cut_at_invented_tool_response_and_after_the_call():
    invented = call("echo", text="hi") + "\n<tool_response>\nmade up\n</tool_response>\n<answer>x</answer>"
    assert assistant_text(Completion(invented), ()) == call("echo", text="hi")
    two_calls = call("echo", text="a") + "\n" + call("echo", text="b")
    assert assistant_text(Completion(two_calls), ()) == call("echo", text="a")
    traj = run(replies(invented, "<answer>echo: hi</answer>"))
    assert traj.messages[2].content == call("echo", text="hi") and traj.messages[3].content.endswith("echo: hi\n</tool_response>")


def test_answer_wins_over_a_tool_call_in_the_same_reply():
    traj = run(replies("<answer>42</answer>\n" + call("echo", text="hi")))
    assert (traj.termination, traj.prediction, traj.num_tool_calls, len(traj.messages)) == ("answer", "42", 0, 3)


def test_no_action_nudges_then_stops():
    traj = run(replies("Let me think.", "Still thinking.", "Hmm."), config=AgentConfig(max_no_action_turns=3))
    assert [m.role for m in traj.messages] == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    assert traj.messages[3].content == traj.messages[5].content == prompts.NO_ACTION_NUDGE
    assert (traj.termination, traj.prediction, traj.reward) == ("no_action", None, 0.0)


def test_no_action_streak_resets_after_a_tool_call():
    script = ("hmm", call("echo", text="a"), "hmm", "<answer>echo: hi</answer>")
    traj = run(replies(*script), config=AgentConfig(max_no_action_turns=2))
    assert traj.termination == "answer"


def test_max_calls_without_answer():
    backend = ScriptedBackend(lambda q, turn, c: call("echo", text=f"step {turn}"))
    traj = run(backend, config=AgentConfig(max_llm_calls=3))
    assert (traj.termination, traj.prediction, traj.num_tool_calls) == ("max_calls", None, 3)
    assert len(backend.requests) == 3 and traj.metadata["llm_calls"] == 3
    assert traj.messages[-1].content == format_tool_response("echo: step 2")


def chars(messages):
    return sum(len(m.content) for m in messages)


def test_context_overflow_forces_one_answer():
    backend = replies(call("echo", text="a"), call("big", text="b"), "<answer>echo: hi</answer>", "unused")
    budget = 2500  # the 5000-character observation of `big` overflows it
    traj = run(backend, config=AgentConfig(max_context_tokens=budget), count_tokens=chars)
    forced = backend.requests[-1]
    assert len(backend.requests) == 3 and chars(backend.requests[1]) <= budget
    assert forced[-1] == Message("user", prompts.FORCED_ANSWER)
    assert (traj.termination, traj.prediction, traj.reward) == ("max_context", "echo: hi", 1.0)
    assert "x" * 5000 not in "".join(m.content for m in traj.messages)  # replaced, as the paper does
    assert context_before_turn(traj, 2) == forced
    assert traj.metadata["context_tokens"] == chars(forced)


def test_forced_answer_without_an_answer_tag_and_when_the_question_overflows():
    backend = replies("I give up.")
    traj = run(backend, config=AgentConfig(max_context_tokens=10), count_tokens=chars)
    assert backend.requests[0][1].content == f"{TASK.question}\n\n{prompts.FORCED_ANSWER}"
    assert (traj.termination, traj.prediction, traj.num_assistant_turns) == ("max_context", None, 1)


def test_default_token_estimate_is_conservative():
    messages = [Message("user", "a" * 300)]
    assert estimate_tokens(messages) >= 100 + 5
    assert estimate_tokens(messages + messages) > estimate_tokens(messages)


def test_backend_errors_are_retried_then_give_up():
    attempts = []

    def flaky(question, turn, conversation):
        attempts.append(turn)
        return Completion("", "error", error="HTTP 503") if len(attempts) <= 2 else "<answer>echo: hi</answer>"

    traj = run(ScriptedBackend(flaky), config=AgentConfig(max_backend_retries=2))
    assert traj.termination == "answer" and traj.metadata["backend_failures"] == 2 and traj.metadata["llm_calls"] == 1

    dead = ScriptedBackend(lambda q, t, c: Completion("", "error", error="HTTP 500"))
    traj = run(dead, config=AgentConfig(max_backend_retries=2))
    assert (traj.termination, traj.prediction, len(dead.requests)) == ("backend_error", None, 3)
    assert traj.metadata["last_backend_error"] == "HTTP 500" and traj.num_assistant_turns == 0
    assert dead.requests[0] == dead.requests[2]  # the same request is resent


class TurnSelector:
    """Picks G{turn}; remembers what it was shown."""

    name = "turn"

    def __init__(self):
        self.seen = []

    def select(self, history, pool):
        return self.select_batch([history], pool)[0]

    def select_batch(self, histories, pool):
        self.seen.append([tuple(h) for h in histories])
        return [Selection((f"G{turn_of(h) % len(pool)}",), fallback="bm25" if turn_of(h) == 1 else None) for h in histories]


def three_turns(question, turn, conversation):
    return [call("echo", text="a"), call("visit", text="b"), "<answer>echo: hi</answer>"][turn]


def test_stepwise_injection_only_in_the_last_user_message_of_each_call():
    backend, selector = ScriptedBackend(three_turns), TurnSelector()
    traj = run(backend, injection=StepwiseInjection(POOL, selector, system_note=""))
    assert traj.injection == "stepwise" and traj.global_injection == ""
    assert traj.step_experience_ids == (("G0",), ("G1",), ("G2",))
    assert len(backend.requests) == 3
    for k, request in enumerate(backend.requests):
        block = format_experience_block({f"G{k}": POOL[f"G{k}"]})
        assert traj.step_injections[k] == block
        assert request[-1].role == "user" and request[-1].content.endswith(block)
        assert sum(EXPERIENCE_HEADER in m.content for m in request) == 1
        assert context_before_turn(traj, k) == request
    assert not any(EXPERIENCE_HEADER in m.content for m in traj.messages)
    assert not any(EXPERIENCE_HEADER in m.content for histories in selector.seen for h in histories for m in h)
    assert traj.metadata["selector_fallbacks"] == 1


def test_stepwise_with_the_bm25_selector():
    pool = {"G0": "Echo tools repeat the text exactly.", "G1": "Visit pages that exist.", "G2": "Answer briefly."}
    backend, selector = ScriptedBackend(three_turns), BM25Selector(k=1, k_min=1)
    traj = run(backend, injection=StepwiseInjection(pool, selector))
    turn_starts = [i for i, m in enumerate(traj.messages) if m.role == "assistant"]
    for k, ids in enumerate(traj.step_experience_ids):
        assert ids == selector.select(traj.messages[: turn_starts[k]], pool).ids
        assert context_before_turn(traj, k) == backend.requests[k]
    assert traj.step_experience_ids[0] == ("G0",)  # "What does echo say?" matches the echo lesson


def test_global_injection_in_the_system_prompt_of_every_call():
    backend = ScriptedBackend(three_turns)
    traj = run(backend, injection=GlobalInjection(POOL))
    block = format_global_block(POOL)
    assert traj.global_injection == block and traj.step_injections == ()
    assert not traj.messages[0].content.endswith(block)
    for k, request in enumerate(backend.requests):
        assert request[0].content == traj.messages[0].content + block
        assert sum(GLOBAL_HEADER in m.content for m in request) == 1
        assert context_before_turn(traj, k) == request


def test_context_before_turn_matches_requests_across_a_batch_with_retries_and_nudges():
    failed = set()

    def script(question, turn, conversation):
        n = int(question.split()[-1])
        if n == 2 and turn == 1 and question not in failed:
            failed.add(question)
            return Completion("", "error", error="timeout")  # resent at the next step
        if turn == 1 and len(conversation) % 2 == 0:
            return "hmm"  # a nudge follows
        return call("echo", text="x") if turn < n else "<answer>done</answer>"

    tasks = [Task(f"t{n}", f"Question {n}") for n in (1, 2, 3)]
    backend = ScriptedBackend(script)
    agent = ReActAgent(backend, injection=StepwiseInjection(POOL, TurnSelector()))
    trajectories = agent.run_batch(tasks, FakeEnv())
    assert [t.metadata["backend_failures"] for t in trajectories] == [0, 1, 0]
    assert all(prompts.NO_ACTION_NUDGE in [m.content for m in t.messages] for t in trajectories)
    for traj in trajectories:
        mine = [r for r in backend.requests if question_of(r) == traj.messages[1].content]
        if traj.metadata["backend_failures"]:
            mine.remove(mine[1])  # the failed attempt, identical to its resend
        assert [context_before_turn(traj, k) for k in range(traj.num_assistant_turns)] == mine


def test_lockstep_batching_and_order():
    def script(question, turn, conversation):
        n = int(question.split()[-1])
        return call("echo", text="x") if turn < n else f"<answer>{n}</answer>"

    tasks = [Task(f"t{n}", f"Question {n}") for n in (0, 2, 1)]
    selector = TurnSelector()
    backend = ScriptedBackend(script)
    trajectories = ReActAgent(backend, injection=StepwiseInjection(POOL, selector)).run_batch(tasks, FakeEnv())
    assert [len(conversations) for conversations, _ in backend.calls] == [3, 2, 1]
    assert [len(histories) for histories in selector.seen] == [3, 2, 1]  # one selector batch per step
    assert [t.task_id for t in trajectories] == ["t0", "t2", "t1"]
    assert [t.prediction for t in trajectories] == ["0", "2", "1"]
    assert [t.num_tool_calls for t in trajectories] == [0, 2, 1]


def test_groups_get_distinct_reproducible_seeds():
    def script(question, turn, conversation):
        return "<answer>a</answer>" if turn == 1 else call("echo", text="x")

    tasks = [Task("a", "Question a"), Task("b", "Question b")]

    def seeds(seed):
        backend = ScriptedBackend(script)
        trajectories = ReActAgent(backend).run_batch(tasks, FakeEnv(), n=3, seed=seed)
        assert [(t.task_id, t.metadata["rollout_index"]) for t in trajectories] == [
            ("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1), ("b", 2)
        ]
        return [[p.seed for p in params] for _, params in backend.calls]

    seeded = seeds(7)
    assert [len(step) for step in seeded] == [6, 6]  # one batched call per step, 2 tasks x 3 members
    assert len({s for step in seeded for s in step}) == 12  # no two requests share a seed
    assert seeds(7) == seeded and seeds(8) != seeded
    assert seeds(None) == [[None] * 6, [None] * 6]


def test_tool_calls_of_a_step_run_concurrently():
    barrier = threading.Barrier(3, timeout=10)

    class Rendezvous:
        spec = spec("meet")

        def __call__(self, arguments):
            barrier.wait()  # only returns once all three calls are running at the same time
            return "met"

    def script(question, turn, conversation):
        return call("meet") if turn == 0 else "<answer>met</answer>"

    tasks = [Task(f"t{i}", f"Question {i}", answer="met") for i in range(3)]
    trajectories = ReActAgent(ScriptedBackend(script)).run_batch(tasks, FakeEnv((Rendezvous,)))
    assert [t.messages[3].content for t in trajectories] == [format_tool_response("met")] * 3
    assert [t.reward for t in trajectories] == [1.0] * 3


def test_tools_function_instead_of_environment():
    traj = ReActAgent(replies(call("echo", text="hi"), "<answer>echo: hi</answer>")).run(TASK, lambda task: [Echo()])
    assert traj.prediction == "echo: hi" and traj.reward is None
    with pytest.raises(TypeError, match="Environment or a function"):
        ReActAgent(replies()).run(TASK, 42)


def test_configuration_errors():
    with pytest.raises(ValueError, match="max_llm_calls"):
        AgentConfig(max_llm_calls=0)
    with pytest.raises(ValueError, match="max_backend_retries"):
        AgentConfig(max_backend_retries=-1)
    with pytest.raises(ValueError, match="two tools are named 'echo'"):
        run(replies("<answer>a</answer>"), env=FakeEnv((Echo, Echo)))
    with pytest.raises(ValueError, match="n must be >= 1"):
        ReActAgent(replies()).run_batch([TASK], FakeEnv(), n=0)


def test_sampling_keeps_user_stop_strings():
    config = AgentConfig(sampling=SamplingParams(temperature=0.0, stop=("Observation:",)))
    backend = replies("<answer>x</answer>")
    run(backend, config=config)
    params = backend.calls[0][1][0]
    assert params.stop == ("Observation:", "<tool_response>", "</tool_call>") and params.temperature == 0.0


def refuses_long_prompts(limit, reply):
    """A backend that, like ``LocalEngine``, refuses prompts over ``limit`` characters with length + error."""

    def script(question, turn, conversation):
        if chars(conversation) > limit:
            return Completion("", "length", error=f"the prompt is {chars(conversation)} long, no room in {limit}")
        return reply(turn)

    return ScriptedBackend(script)


def test_prompt_refused_by_the_backend_forces_one_answer():
    script = [call("big", text="b"), "<answer>echo: hi</answer>"]
    backend = refuses_long_prompts(2500, lambda turn: script[min(turn, 1)])
    traj = run(backend)  # our own estimate does not see the overflow coming: the backend reports it
    refused, forced = backend.requests[1], backend.requests[2]
    assert "x" * 5000 in refused[-1].content and forced[-1] == Message("user", prompts.FORCED_ANSWER)
    assert (traj.termination, traj.prediction, traj.num_assistant_turns) == ("max_context", "echo: hi", 2)
    assert all(m.content for m in traj.messages if m.role == "assistant")  # no empty turn was stored
    assert traj.metadata["llm_calls"] == 2 and "no room in 2500" in traj.metadata["last_backend_error"]
    assert context_before_turn(traj, 1) == forced


def test_forced_answer_refused_by_the_backend_ends_with_max_context():
    backend = refuses_long_prompts(10, lambda turn: "<answer>never sent</answer>")
    traj = run(backend)
    assert len(backend.requests) == 2 and backend.requests[1][-1].content.endswith(prompts.FORCED_ANSWER)
    assert (traj.termination, traj.prediction, traj.num_assistant_turns) == ("max_context", None, 0)
    assert traj.metadata["llm_calls"] == 0 and "no room in 10" in traj.metadata["last_backend_error"]


def test_the_backends_token_counter_is_used_when_it_has_one():
    backend = replies(call("big", text="b"), "<answer>echo: hi</answer>", "unused")
    backend.count_tokens = chars
    agent = ReActAgent(backend, AgentConfig(max_context_tokens=2500))
    assert agent.count_tokens is chars
    traj = agent.run(TASK, FakeEnv())
    assert traj.termination == "max_context" and traj.metadata["context_tokens"] == chars(backend.requests[-1])
    assert ReActAgent(replies()).count_tokens is estimate_tokens
    assert ReActAgent(backend, count_tokens=len).count_tokens is len  # an explicit counter wins


def test_failing_python_code_becomes_an_observation_and_the_agent_goes_on():
    from expint_jax.rollout.python_tool import PythonTool
    from expint_jax.rollout.sandbox import Sandbox, SandboxLimits

    tool = PythonTool(Sandbox(SandboxLimits(wall_time_s=20.0, cpu_time_s=1)))
    backend = replies(
        call("python", code="while True:\n    pass"),
        call("python", code="import urllib.request\nurllib.request.urlopen('http://example.com')"),
        call("python", code="print(6 * 7)"),
        "<answer>42</answer>",
    )
    traj = ReActAgent(backend).run(Task("py", "What is 6 * 7?", answer="42"), lambda task: [tool])
    loop, network, fine = (traj.messages[i].content for i in (3, 5, 7))
    assert loop.startswith("<tool_response>\nError: ") and "more than 1 s of CPU time" in loop
    assert "Error: " in network and "sandbox: network access is disabled" in network
    assert fine == format_tool_response("42")
    assert (traj.termination, traj.prediction, traj.num_tool_calls) == ("answer", "42", 3)
    assert traj.metadata["tool_errors"] == 2


def test_stepwise_calls_carry_the_system_note_which_stays_out_of_the_stored_history():
    # The release's step-wise system prompt tells the agent that experiences chosen for the current
    # step come before each reply; teacher-only, like the blocks (issue 12, item 1).
    backend = ScriptedBackend(three_turns)
    traj = run(backend, injection=StepwiseInjection(POOL, TurnSelector()))
    note = "\n\n" + STEPWISE_SYSTEM_NOTE
    assert traj.global_injection == note
    assert all(request[0].content == traj.messages[0].content + note for request in backend.requests)
    assert not any(STEPWISE_SYSTEM_NOTE in m.content for m in traj.messages)
    assert [context_before_turn(traj, k) for k in range(3)] == backend.requests


class RationaleSelector(TurnSelector):
    def select_batch(self, histories, pool):
        return [dataclasses.replace(s, rationale=f"turn {turn_of(h)}")
                for s, h in zip(super().select_batch(histories, pool), histories)]


def test_stepwise_selections_and_their_rationale_are_logged_per_turn():
    traj = run(ScriptedBackend(three_turns), injection=StepwiseInjection(POOL, RationaleSelector()))
    assert traj.metadata[EXP_SELECTIONS] == [
        {"round": 1, "selected_ids": ["G0"], "rationale": "turn 0"},
        {"round": 2, "selected_ids": ["G1"], "rationale": "turn 1", "fallback": "bm25"},
        {"round": 3, "selected_ids": ["G2"], "rationale": "turn 2"},
    ]
    assert EXP_SELECTIONS not in run(ScriptedBackend(three_turns)).metadata


def test_the_forced_answer_turn_is_marked_and_annotation_gives_it_no_block():
    # issue 12, item 9: the forced-answer request carries no step-wise block; annotate_injections,
    # which rebuilds teacher contexts for recorded rollouts, must give that turn none either.
    backend = replies(call("echo", text="a"), call("big", text="b"), "<answer>echo: hi</answer>", "unused")
    selector = TurnSelector()
    traj = run(backend, config=AgentConfig(max_context_tokens=2500), count_tokens=chars,
               injection=StepwiseInjection(POOL, selector))
    assert traj.termination == "max_context" and traj.metadata[FORCED_ANSWER_TURN] == 2
    assert traj.step_injections[2] == "" and traj.step_experience_ids[2] == ()
    assert EXPERIENCE_HEADER not in backend.requests[-1][-1].content
    assert [e["round"] for e in traj.metadata[EXP_SELECTIONS]] == [1, 2]
    plain = dataclasses.replace(traj, injection="none", global_injection="", step_injections=(),
                                step_experience_ids=())
    [annotated] = annotate_injections([plain], StepwiseInjection(POOL, TurnSelector()))
    assert annotated.step_injections == traj.step_injections
    assert [context_before_turn(annotated, k) for k in range(3)] == backend.requests


def test_default_sampling_is_the_releases():
    # evaluation/react_agent.py: top_p 0.95, presence_penalty 1.1 (temperature 0.7 is the paper's).
    sampling = AgentConfig().sampling
    assert (sampling.temperature, sampling.top_p, sampling.presence_penalty) == (0.7, 0.95, 1.1)
    backend = replies("<answer>a</answer>")
    run(backend)
    [(_, [params])] = backend.calls
    assert params.presence_penalty == 1.1 and params.top_p == 0.95


def test_run_batch_with_signal_keeps_each_stored_turns_top_logprobs():
    import numpy as np

    from expint_jax.token_signal import TopLogprobs

    def signal(first_id):
        return TopLogprobs(np.arange(first_id, first_id + 3, dtype=np.int32), np.zeros((4, 2), np.int32),
                           np.zeros((4, 2), np.float32), np.zeros(4, np.float32))

    script = {0: Completion(call("echo", text="hi"), top_logprobs=signal(10)),
              1: Completion("", finish_reason="error", error="flaky"),  # not a stored turn: no signal kept
              2: Completion("<answer>echo: hi</answer>", top_logprobs=signal(20))}
    attempts = iter([0, 1, 2])
    backend = ScriptedBackend(lambda question, turn, conversation: script[next(attempts)])
    config = AgentConfig(sampling=SamplingParams(top_logprobs=2))
    ((trajectory, recorded),) = ReActAgent(backend, config).run_batch_with_signal([TASK], FakeEnv())
    assert all(p.top_logprobs == 2 for _, params in backend.calls for p in params)  # asked of the backend
    assert trajectory.num_assistant_turns == 2 and recorded.task_id == "t1"
    assert recorded.turns == (signal(10), signal(20)) and recorded.complete
    plain = ReActAgent(replies(call("echo", text="hi"), "<answer>echo: hi</answer>")).run_batch_with_signal(
        [TASK], FakeEnv())
    assert plain[0][1].turns == (None, None) and not plain[0][1].complete
