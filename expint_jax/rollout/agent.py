"""The ReAct agent of the paper's evaluation, batched: rollouts of many tasks advance in lockstep.

Contract of one rollout:
  * History starts as [system prompt with the tool schemas, the task question]. Each step sends
    one request: the history with the experience of the injection spec (``inject`` from
    ``expint_jax.experience.inject``; the spec's ``system_block`` in the system prompt of every
    call: the pool block for global, the release's note announcing per-step experiences for
    stepwise; stepwise also puts the selector's block in the last user message of this call only).
    The stored history never contains experience text; what was injected is recorded beside it
    (``global_injection`` holds the ``system_block``). Step-wise selections are logged per turn in
    ``metadata["exp_selections"]`` (``{"round", "selected_ids", "rationale"}``, as the release does).
  * Sampling stops at ``<tool_response>`` (the model must not invent tool results) and at
    ``</tool_call>`` (one call per turn). The reply is cut before any ``<tool_response>`` and after
    the first ``</tool_call>``; a ``</tool_call>`` removed by the backend as a stop string is put
    back. The result, stripped of surrounding whitespace, is the stored assistant turn.
  * ``<answer>…</answer>`` ends the rollout (termination ``answer``; an answer wins over a tool
    call in the same reply). A tool call runs the tool and appends a user turn
    ``<tool_response>\\n{observation}\\n</tool_response>``. A malformed call, an unknown tool, a
    ``ToolError`` or any other tool failure becomes an error observation; it never raises.
    ``num_tool_calls`` counts the replies that attempted a call, well-formed or not.
  * A reply with neither a tool call nor an answer: the paper's agent simply asks again. We ask
    again with a short nudge user turn (so the history keeps alternating user/assistant) and stop
    with ``no_action`` after ``max_no_action_turns`` such replies in a row.
  * ``max_llm_calls`` answered calls without an answer: ``max_calls``. A request whose token count
    (``count_tokens``, injected text included) exceeds ``max_context_tokens`` is replaced by ONE
    forced-answer request: as in the paper, the last observation (what overflowed the context) is
    replaced in the stored history by the forced-answer instruction (appended to the question when
    there is no observation yet); no step-wise block is added and no selection is made, and
    ``metadata["forced_answer_turn"]`` records its turn. It ends with ``max_context`` and
    the prediction is its ``<answer>`` (``None`` when it has none). ``count_tokens`` is the
    backend's own ``count_tokens`` when it has one (the local engine's counts the exact prompt
    it would generate from), else the deliberately high ``estimate_tokens``.
  * A completion with ``finish_reason="length"`` and an ``error`` is a prompt the backend refused
    as too long for its context (the local engine does this): it is handled like our own limit,
    with ONE forced-answer request; when the backend refuses that too, the rollout ends with
    ``max_context``, no answer and no empty assistant turn stored. Either way ``last_backend_error``
    in the metadata says what the backend reported.
  * A completion with ``finish_reason="error"`` is resent unchanged up to ``max_backend_retries``
    times (the backend does its own back-off); then ``backend_error``. Failed calls do not count
    toward ``max_llm_calls``. A ``BackendError`` raised by the backend itself propagates.

Teacher signal: with ``AgentConfig.sampling.top_logprobs = k``, ``run_batch_with_signal`` returns
each trajectory with its ``TrajectorySignal``: the backend's ``Completion.top_logprobs`` of every
stored assistant turn, in turn order (``expint_jax.token_signal``; None where the backend gave
none). The signal keeps every generated id; the cuts above (stop strings, text after
``</tool_call>``, stripped whitespace) are reconciled with it when the distillation views are built
(``distill.teacher_signal``).

Batching: each step sends every pending request in one ``backend.chat`` call; tool calls of a
step run concurrently in a thread pool, as does scoring. With ``seed`` set, every request carries
its own seed derived from ``(seed, task id, member r, step)`` (one ``SamplingParams`` per
conversation in the same call), so the members of a group differ, no two rows share a random
stream, and reruns repeat.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from expint_jax.experience.inject import InjectionSpec, NoInjection, StepwiseInjection, inject, selection_log
from expint_jax.experience.select import Selection
from expint_jax.models.chat import (
    TOOL_CALL_END,
    TOOL_CALL_START,
    TOOL_RESPONSE_START,
    ToolCallError,
    format_tool_response,
    parse_answer,
    parse_tool_call,
)
from expint_jax.records import EXP_SELECTIONS, FORCED_ANSWER_TURN, Completion, Message, SamplingParams, Trajectory
from expint_jax.rollout import prompts
from expint_jax.rollout.envs.base import Environment, Task
from expint_jax.llm.base import ChatBackend
from expint_jax.rollout.tools import Tool, ToolError
from expint_jax.token_signal import TopLogprobs, TrajectorySignal

logger = logging.getLogger(__name__)

TokenCounter = Callable[[Sequence[Message]], int]
ToolsForTask = Callable[[Task], Sequence[Tool]]


def estimate_tokens(messages: Sequence[Message]) -> int:
    """A deliberately high token estimate (3 characters per token, plus the chat-template overhead).

    Qwen's tokenizer averages about 4 characters per token on English text, so this errs towards
    forcing an answer early rather than overflowing the model's context.
    """
    return sum(math.ceil(len(m.content) / 3) + 5 for m in messages) + 3


# The release's agent samples with top_p 0.95 and presence_penalty 1.1 (evaluation/react_agent.py);
# temperature 0.7 is the paper's. The release allows 10,000 new tokens and a ~110K-token context
# (max_tokens=10000, max_context_tokens=110 * 1024); the paper trains and evaluates at 32K, so the
# defaults below budget for a 32K context instead.
RELEASE_SAMPLING = SamplingParams(temperature=0.7, top_p=0.95, presence_penalty=1.1, max_tokens=4096)


@dataclasses.dataclass(frozen=True)
class AgentConfig:
    """Limits and sampling of the agent. Defaults follow the paper (≤ 100 calls, T = 0.7, 32K context)
    and the release's sampling (top_p 0.95, presence penalty 1.1), see ``RELEASE_SAMPLING``."""

    max_llm_calls: int = 100
    max_context_tokens: int = 28 * 1024  # prompt budget; leaves room for max_tokens in a 32K context
    max_backend_retries: int = 3
    max_no_action_turns: int = 3
    sampling: SamplingParams = RELEASE_SAMPLING
    stop: tuple[str, ...] = (TOOL_RESPONSE_START, TOOL_CALL_END)
    instructions: str = prompts.DEFAULT_INSTRUCTIONS
    tool_workers: int = 8

    def __post_init__(self) -> None:
        for name in ("max_llm_calls", "max_context_tokens", "max_no_action_turns", "tool_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"AgentConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_backend_retries < 0:
            raise ValueError(f"AgentConfig.max_backend_retries must be >= 0, got {self.max_backend_retries}")


@dataclasses.dataclass(frozen=True)
class _Request:
    messages: tuple[Message, ...]
    step_block: str = ""
    experience_ids: tuple[str, ...] = ()
    selector_fallback: str | None = None
    rationale: str | None = None
    forced: bool = False


@dataclasses.dataclass
class _Rollout:
    """Mutable state of one running rollout; frozen into a ``Trajectory`` when it ends."""

    task: Task
    member: int
    tools: Mapping[str, Tool]
    messages: list[Message]
    step_blocks: list[str] = dataclasses.field(default_factory=list)
    step_ids: list[tuple[str, ...]] = dataclasses.field(default_factory=list)
    turn_signals: list[TopLogprobs | None] = dataclasses.field(default_factory=list)  # per stored turn
    selections: list[tuple[int, Selection]] = dataclasses.field(default_factory=list)  # (turn, selection)
    forced_turn: int | None = None
    request: _Request | None = None
    llm_calls: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    backend_failures: int = 0  # consecutive, for the current request
    backend_failures_total: int = 0
    last_backend_error: str | None = None
    no_action_streak: int = 0
    selector_fallbacks: int = 0
    completion_tokens: int | None = None
    context_tokens: int = 0
    termination: str | None = None
    prediction: str | None = None
    elapsed_s: float = 0.0

    def finish(self, termination: str, started: float, prediction: str | None = None) -> None:
        self.termination, self.prediction = termination, prediction
        self.elapsed_s = time.monotonic() - started


def _tool_map(task: Task, tools: Sequence[Tool]) -> dict[str, Tool]:
    by_name: dict[str, Tool] = {}
    for tool in tools:
        if tool.spec.name in by_name:
            raise ValueError(f"task {task.task_id!r}: two tools are named {tool.spec.name!r}")
        by_name[tool.spec.name] = tool
    return by_name


def _environment(env: Environment | ToolsForTask) -> tuple[ToolsForTask, Callable[[Task, str | None], float] | None]:
    if hasattr(env, "tools") and hasattr(env, "score"):
        return env.tools, env.score
    if callable(env):
        return env, None
    raise TypeError(f"expected an Environment or a function task -> tools, got {type(env).__name__}")


def _stopped_at_call_end(completion: Completion, text: str, stop: Sequence[str]) -> bool:
    """Whether the backend removed a closing ``</tool_call>`` as a stop string."""
    if completion.stop_string is not None:
        return completion.stop_string == TOOL_CALL_END
    # Backends that cannot say which stop string fired: an unclosed call whose JSON body is
    # complete can only have ended at our stop string (or at EOS right where it would go).
    body = text[text.rfind(TOOL_CALL_START) + len(TOOL_CALL_START) :].rstrip()
    return completion.finish_reason == "stop" and TOOL_CALL_END in stop and body.endswith("}")


def assistant_text(completion: Completion, stop: Sequence[str]) -> str:
    """The assistant turn to store for ``completion`` (see the module docstring)."""
    text = completion.text
    cut = text.find(TOOL_RESPONSE_START)
    if cut >= 0:
        text = text[:cut]
    close = text.find(TOOL_CALL_END)
    if close >= 0:
        text = text[: close + len(TOOL_CALL_END)]
    elif TOOL_CALL_START in text and _stopped_at_call_end(completion, text, stop):
        text = text.rstrip() + "\n" + TOOL_CALL_END
    return text.strip()


def observe(reply: str, tools: Mapping[str, Tool]) -> tuple[str, bool]:
    """Runs the tool call in ``reply``; returns (observation text, whether it is an error)."""
    call = parse_tool_call(reply)
    if isinstance(call, ToolCallError):
        return prompts.malformed_call_observation(str(call)), True
    tool = tools.get(call.name)
    if tool is None:
        return prompts.unknown_tool_observation(call.name, sorted(tools)), True
    try:
        result = tool(call.arguments)
        if not isinstance(result, str):
            raise TypeError(f"tool returned {type(result).__name__}, not text")
        return result, False
    except ToolError as e:
        return prompts.tool_error_observation(str(e)), True
    except Exception as e:  # a buggy tool must not sink a whole batch of rollouts
        logger.exception("tool %r raised on arguments %r", call.name, call.arguments)
        return prompts.tool_failure_observation(call.name, e), True


def _with_forced_answer(messages: Sequence[Message]) -> list[Message]:
    out = list(messages)
    last = out[-1]
    if last.role != "user":
        raise AssertionError(f"the history must end with a user turn before a request, not {last.role!r}")
    if any(m.role == "assistant" for m in out):
        out[-1] = Message("user", prompts.FORCED_ANSWER)
    else:
        out[-1] = Message("user", f"{last.content}\n\n{prompts.FORCED_ANSWER}")
    return out


def _call_seed(seed: int | None, task_id: str, member: int, step: int) -> int | None:
    if seed is None:
        return None
    return int(np.random.SeedSequence([seed, zlib.crc32(task_id.encode()), member, step]).generate_state(1)[0])


class ReActAgent:
    """Runs rollouts of ``backend`` on tasks under one injection spec.

    ``count_tokens`` measures a request; by default the backend's own counter when it has one
    (``LocalEngine.count_tokens``: its tokenizer and chat template), else ``estimate_tokens``.
    """

    def __init__(
        self,
        backend: ChatBackend,
        config: AgentConfig = AgentConfig(),
        injection: InjectionSpec = NoInjection(),
        count_tokens: TokenCounter | None = None,
    ):
        self.backend, self.config, self.injection = backend, config, injection
        self.count_tokens: TokenCounter = count_tokens or getattr(backend, "count_tokens", None) or estimate_tokens
        self._global_block = injection.system_block
        stop = dict.fromkeys(config.sampling.stop + config.stop)
        self._sampling = dataclasses.replace(config.sampling, stop=tuple(stop))

    def system_prompt(self, tools: Mapping[str, Tool]) -> str:
        return prompts.system_prompt([t.spec for t in tools.values()], self.config.instructions)

    def run(self, task: Task, env: Environment | ToolsForTask, seed: int | None = None) -> Trajectory:
        return self.run_batch([task], env, n=1, seed=seed)[0]

    def run_batch(
        self, tasks: Sequence[Task], env: Environment | ToolsForTask, n: int = 1, seed: int | None = None
    ) -> list[Trajectory]:
        """``n`` rollouts per task; the result lists task 0's rollouts first, then task 1's, and so on."""
        return [trajectory for trajectory, _ in self.run_batch_with_signal(tasks, env, n, seed)]

    def run_batch_with_signal(
        self, tasks: Sequence[Task], env: Environment | ToolsForTask, n: int = 1, seed: int | None = None
    ) -> list[tuple[Trajectory, TrajectorySignal]]:
        """``run_batch``, each trajectory with its teacher signal (module docstring; all turns None
        unless ``AgentConfig.sampling.top_logprobs`` asked the backend for one)."""
        if n < 1:
            raise ValueError(f"run_batch: n must be >= 1, got {n}")
        tools_for, score = _environment(env)
        started = time.monotonic()
        rollouts = []
        for task in tasks:
            tools = _tool_map(task, tools_for(task))
            history = [Message("system", self.system_prompt(tools)), Message("user", task.question)]
            rollouts.extend(_Rollout(task, member, tools, list(history)) for member in range(n))
        with ThreadPoolExecutor(self.config.tool_workers) as pool:
            step = 0
            while live := [r for r in rollouts if r.termination is None]:
                for r in live:
                    if r.request is None and r.llm_calls >= self.config.max_llm_calls:
                        r.finish("max_calls", started)
                live = [r for r in live if r.termination is None]
                self._prepare_requests([r for r in live if r.request is None])
                acting = []
                for r, completion in self._send(live, seed, step):
                    if self._take_reply(r, completion, started):
                        acting.append(r)
                observations = pool.map(lambda r: observe(r.messages[-1].content, r.tools), acting)
                for r, (observation, is_error) in zip(acting, observations, strict=True):
                    r.tool_errors += is_error
                    r.messages.append(Message("user", format_tool_response(observation)))
                step += 1
            rewards = list(pool.map(lambda r: None if score is None else score(r.task, r.prediction), rollouts))
        return [(self._trajectory(r, reward, seed), TrajectorySignal(r.task.task_id, tuple(r.turn_signals)))
                for r, reward in zip(rollouts, rewards, strict=True)]

    def _prepare_requests(self, rollouts: Sequence[_Rollout]) -> None:
        stepwise = self.injection if isinstance(self.injection, StepwiseInjection) else None
        selections = [Selection(())] * len(rollouts)
        if stepwise is not None and rollouts:
            selections = stepwise.selector.select_batch([r.messages for r in rollouts], stepwise.pool)
        for r, selection in zip(rollouts, selections, strict=True):
            block = stepwise.block_for(selection.ids) if stepwise is not None else ""
            if stepwise is not None:
                logger.info("task %s member %d turn %d: experiences %s (%s)", r.task.task_id, r.member,
                            len(r.step_blocks) + 1, list(selection.ids), selection.rationale or selection.fallback)
            request = _Request(inject(r.messages, self._global_block, block), block, selection.ids,
                               selection.fallback, selection.rationale)
            tokens = self.count_tokens(request.messages)
            if tokens > self.config.max_context_tokens:
                self._force_answer(r)
            else:
                r.request, r.context_tokens = request, tokens

    def _force_answer(self, r: _Rollout) -> None:
        """Replaces the rollout's next request by the one forced-answer request (module docstring)."""
        r.messages = _with_forced_answer(r.messages)
        r.request = _Request(inject(r.messages, self._global_block), forced=True)
        r.context_tokens = self.count_tokens(r.request.messages)

    def _send(self, rollouts: Sequence[_Rollout], seed: int | None, step: int) -> list[tuple[_Rollout, Completion]]:
        params = [dataclasses.replace(self._sampling, seed=_call_seed(seed, r.task.task_id, r.member, step))
                  for r in rollouts]
        completions = self.backend.chat([r.request.messages for r in rollouts], params)  # type: ignore[union-attr]
        if len(completions) != len(rollouts):
            raise RuntimeError(f"backend returned {len(completions)} completions for {len(rollouts)} conversations")
        return list(zip(rollouts, completions))

    def _take_reply(self, r: _Rollout, completion: Completion, started: float) -> bool:
        """Records the reply; returns whether a tool call in it should run."""
        request = r.request
        assert request is not None
        if completion.finish_reason == "error":
            r.backend_failures += 1
            r.backend_failures_total += 1
            r.last_backend_error = completion.error
            if r.backend_failures > self.config.max_backend_retries:
                r.finish("backend_error", started)
            return False
        if completion.finish_reason == "length" and completion.error is not None:  # the prompt did not fit
            r.last_backend_error, r.backend_failures = completion.error, 0
            if request.forced:
                r.finish("max_context", started)
            else:
                self._force_answer(r)
            return False
        r.request, r.backend_failures = None, 0
        r.llm_calls += 1
        if completion.token_ids is not None:
            r.completion_tokens = (r.completion_tokens or 0) + len(completion.token_ids)
        text = assistant_text(completion, self._sampling.stop)
        r.messages.append(Message("assistant", text))
        r.turn_signals.append(completion.top_logprobs)
        turn = len(r.step_blocks)
        r.step_blocks.append(request.step_block)
        r.step_ids.append(request.experience_ids)
        r.selector_fallbacks += request.selector_fallback is not None
        if request.forced:
            r.forced_turn = turn
        elif isinstance(self.injection, StepwiseInjection):
            r.selections.append((turn, Selection(request.experience_ids, request.selector_fallback, request.rationale)))
        answer = parse_answer(text)
        if request.forced:
            r.finish("max_context", started, answer)
        elif answer is not None:
            r.finish("answer", started, answer)
        elif TOOL_CALL_START in text:
            r.tool_calls += 1
            r.no_action_streak = 0
            return True
        else:
            r.no_action_streak += 1
            if r.no_action_streak >= self.config.max_no_action_turns:
                r.finish("no_action", started)
            else:
                r.messages.append(Message("user", prompts.NO_ACTION_NUDGE))
        return False

    def _trajectory(self, r: _Rollout, reward: float | None, seed: int | None) -> Trajectory:
        assert r.termination is not None, "every rollout has ended before trajectories are built"
        stepwise = isinstance(self.injection, StepwiseInjection)
        metadata: dict[str, Any] = {
            "rollout_index": r.member,
            "seed": seed,
            "llm_calls": r.llm_calls,
            "tool_errors": r.tool_errors,
            "backend_failures": r.backend_failures_total,
            "selector_fallbacks": r.selector_fallbacks,
            "context_tokens": r.context_tokens,
            "elapsed_s": round(r.elapsed_s, 3),
        }
        if r.completion_tokens is not None:
            metadata["completion_tokens"] = r.completion_tokens
        if r.last_backend_error is not None:
            metadata["last_backend_error"] = r.last_backend_error
        if r.forced_turn is not None:
            metadata[FORCED_ANSWER_TURN] = r.forced_turn
        if stepwise:
            metadata[EXP_SELECTIONS] = selection_log(r.selections)
        return Trajectory(
            task_id=r.task.task_id,
            messages=tuple(r.messages),
            injection=self.injection.kind,
            global_injection=self._global_block,
            step_injections=tuple(r.step_blocks) if stepwise else (),
            step_experience_ids=tuple(r.step_ids) if stepwise else (),
            termination=r.termination,
            num_tool_calls=r.tool_calls,
            prediction=r.prediction,
            reward=reward,
            ground_truth=r.task.answer,
            metadata=metadata,
        )
