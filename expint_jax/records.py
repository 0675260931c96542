"""Records that flow between the stages: rollout -> experience -> distill -> loop.

Contract:
  * Every record is a small frozen dataclass with ``to_json()`` / ``from_json()`` that round-trip
    exactly through ``json.dumps``/``json.loads``.
  * ``from_json`` rejects malformed input with a ``RecordError`` naming the field (and the source,
    when the caller passes ``where=``, e.g. ``"rollouts.jsonl:17"``).
  * A ``Trajectory`` stores the conversation *without* any experience text. What was injected is
    kept beside it (``global_injection``, ``step_injections``) so that teacher and student views
    can both be rebuilt from the same record.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from expint_jax.token_signal import TopLogprobs

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")
INJECTIONS: tuple[str, ...] = ("none", "global", "stepwise")
TERMINATIONS: tuple[str, ...] = (
    "answer",  # the agent wrote <answer>...</answer>
    "max_calls",  # hit the LLM-call budget without answering
    "max_context",  # context budget exhausted; a forced-answer request followed
    "no_action",  # the model wrote neither a tool call nor an answer and stopped
    "backend_error",  # the LLM backend failed after its retries
)


# ``Trajectory.metadata`` keys that more than one stage reads.
FORCED_ANSWER_TURN = "forced_answer_turn"  # index of the assistant turn that answered a forced-answer request
EXP_SELECTIONS = "exp_selections"  # step-wise: [{"round", "selected_ids", "rationale"}], as the release logs it


class RecordError(ValueError):
    """A record could not be parsed; the message names the field and the source."""


def _fail(where: str | None, field: str, problem: str) -> RecordError:
    prefix = f"{where}: " if where else ""
    return RecordError(f"{prefix}field {field!r}: {problem}")


def _require(obj: Mapping[str, Any], key: str, types: type | tuple[type, ...], where: str | None) -> Any:
    if not isinstance(obj, Mapping):
        raise _fail(where, key, f"expected an object, got {type(obj).__name__}")
    if key not in obj:
        raise _fail(where, key, "missing")
    value = obj[key]
    if not isinstance(value, types):
        names = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
        raise _fail(where, key, f"expected {names}, got {type(value).__name__}")
    return value


@dataclasses.dataclass(frozen=True)
class Message:
    """One chat message. Tool calls and tool results are plain text inside ``content``."""

    role: Role
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise RecordError(f"message role {self.role!r} is not one of {ROLES}")
        if not isinstance(self.content, str):
            raise RecordError(f"message content must be str, got {type(self.content).__name__}")

    def to_json(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], where: str | None = None) -> Message:
        role = _require(obj, "role", str, where)
        content = obj.get("content")
        if content is None:  # OpenAI-style assistant messages may carry content=None
            content = ""
        if not isinstance(content, str):
            raise _fail(where, "content", f"expected str, got {type(content).__name__}")
        if role not in ROLES:
            hint = (" (OpenAI-style tool messages are converted by "
                    "expint_jax.experience.release_format.messages_from_release)" if role == "tool" else "")
            raise _fail(where, "role", f"{role!r} is not one of {ROLES}{hint}")
        return cls(role=role, content=content)


def messages_from_json(items: Sequence[Any], where: str | None = None) -> tuple[Message, ...]:
    if not isinstance(items, (list, tuple)):
        raise _fail(where, "messages", f"expected a list, got {type(items).__name__}")
    return tuple(Message.from_json(m, f"{where or ''}[{i}]".lstrip()) for i, m in enumerate(items))


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample one completion. ``temperature == 0`` means greedy.

    ``presence_penalty`` and ``frequency_penalty`` follow the OpenAI / vLLM definition: before
    temperature and filtering, token j's logit becomes
    ``logit_j - frequency_penalty * c_j - presence_penalty * (c_j > 0)``, where ``c_j`` counts
    how often j occurs among the tokens generated so far in this completion (prompt tokens do not
    count). Both lie in [-2, 2]; 0 is off. The release's agent samples with presence 1.1.

    ``top_logprobs = k > 0`` asks the backend to keep, at every generated token, the model's
    unmodified top-k log-probabilities and the tail's log mass (``Completion.top_logprobs``,
    see ``expint_jax.token_signal``): the teacher signal of off-policy distillation.
    """

    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_tokens: int = 1024
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    top_logprobs: int = 0  # 0 = off

    def __post_init__(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"SamplingParams.{name} must be in [-2, 2], got {value}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0, got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be >= 1, got {self.max_tokens}")
        if self.top_logprobs < 0:
            raise ValueError(f"SamplingParams.top_logprobs must be >= 0 (0 = off), got {self.top_logprobs}")


@dataclasses.dataclass(frozen=True)
class Completion:
    """One generated assistant message.

    ``finish_reason``: ``"stop"`` (EOS or a stop string; the stop string itself is not in ``text``),
    ``"length"`` (hit ``max_tokens`` or the context), or ``"error"`` (``error`` says why).
    ``token_ids`` / ``logprobs`` are filled by backends that can (the local engine does).
    ``top_logprobs``: the per-token top-k + tail distributions, when ``SamplingParams.top_logprobs``
    asked for them and the backend can (the local engine; vLLM through ``OpenAICompatible``).
    """

    text: str
    finish_reason: Literal["stop", "length", "error"] = "stop"
    token_ids: tuple[int, ...] | None = None
    logprobs: tuple[float, ...] | None = None
    stop_string: str | None = None
    error: str | None = None
    top_logprobs: TopLogprobs | None = None


@dataclasses.dataclass(frozen=True)
class Trajectory:
    """One agent rollout on one task.

    ``messages`` is the conversation as stored: system prompt (without experience), the task,
    assistant turns and tool responses. ``global_injection`` is the text that was appended to the
    system prompt ("" if none). ``step_injections[k]`` is the text appended to the last user
    message before the k-th assistant turn ("" if none); it has one entry per assistant turn
    whenever ``injection == "stepwise"``. ``step_experience_ids[k]`` are the pool ids behind it.
    Under step-wise injection ``global_injection`` holds the teacher-only system note announcing
    the per-step experiences (``experience.inject.STEPWISE_SYSTEM_NOTE``), "" when it is off.
    ``metadata[FORCED_ANSWER_TURN]`` is the index of the turn that answered a forced-answer
    request (no step-wise block, no selection), when there was one.
    """

    task_id: str
    messages: tuple[Message, ...]
    injection: str = "none"
    global_injection: str = ""
    step_injections: tuple[str, ...] = ()
    step_experience_ids: tuple[tuple[str, ...], ...] = ()
    termination: str = "answer"
    num_tool_calls: int = 0
    prediction: str | None = None
    reward: float | None = None
    ground_truth: str | None = None
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.injection not in INJECTIONS:
            raise RecordError(f"trajectory {self.task_id!r}: injection {self.injection!r} not in {INJECTIONS}")
        if self.termination not in TERMINATIONS:
            raise RecordError(
                f"trajectory {self.task_id!r}: termination {self.termination!r} not in {TERMINATIONS}"
            )
        if self.step_injections and len(self.step_injections) != self.num_assistant_turns:
            raise RecordError(
                f"trajectory {self.task_id!r}: {len(self.step_injections)} step_injections for "
                f"{self.num_assistant_turns} assistant turns"
            )

    @property
    def num_assistant_turns(self) -> int:
        return sum(m.role == "assistant" for m in self.messages)

    def to_json(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "messages": [m.to_json() for m in self.messages],
            "injection": self.injection,
            "global_injection": self.global_injection,
            "step_injections": list(self.step_injections),
            "step_experience_ids": [list(ids) for ids in self.step_experience_ids],
            "termination": self.termination,
            "num_tool_calls": self.num_tool_calls,
            "prediction": self.prediction,
            "reward": self.reward,
            "ground_truth": self.ground_truth,
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], where: str | None = None) -> Trajectory:
        task_id = _require(obj, "task_id", (str, int), where)
        messages = messages_from_json(_require(obj, "messages", list, where), f"{where or ''} messages".strip())
        step_injections = obj.get("step_injections", [])
        if not isinstance(step_injections, list) or not all(isinstance(s, str) for s in step_injections):
            raise _fail(where, "step_injections", "expected a list of strings")
        ids = obj.get("step_experience_ids", [])
        if not isinstance(ids, list) or not all(isinstance(x, list) for x in ids):
            raise _fail(where, "step_experience_ids", "expected a list of lists of ids")
        reward = obj.get("reward")
        if reward is not None and not isinstance(reward, (int, float)):
            raise _fail(where, "reward", f"expected a number or null, got {type(reward).__name__}")
        try:
            return cls(
                task_id=str(task_id),
                messages=messages,
                injection=obj.get("injection", "none"),
                global_injection=obj.get("global_injection", "") or "",
                step_injections=tuple(step_injections),
                step_experience_ids=tuple(tuple(str(i) for i in x) for x in ids),
                termination=obj.get("termination", "answer"),
                num_tool_calls=int(obj.get("num_tool_calls", 0)),
                prediction=obj.get("prediction"),
                reward=None if reward is None else float(reward),
                ground_truth=obj.get("ground_truth"),
                metadata=dict(obj.get("metadata") or {}),
            )
        except RecordError as e:
            raise RecordError(f"{where}: {e}" if where else str(e)) from None


def read_jsonl(path: str | Path) -> Iterator[tuple[str, Any]]:
    """Yields ``(where, obj)`` per non-blank line; ``where`` is ``"path:lineno"`` for error messages."""
    path = Path(path)
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None


def read_trajectories(path: str | Path) -> list[Trajectory]:
    return [Trajectory.from_json(obj, where) for where, obj in read_jsonl(path)]
