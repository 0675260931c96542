"""A scripted SimWeb agent (no LLM): proves tasks solvable and writes ReAct-format trajectories.

The agent reads only the question text and tool observations, as a model would: it parses the
question (``tasks.parse_question``), searches, opens the entity's page when a result is that page,
otherwise opens directory pages (URLs ending in "/") of the question's site -- or the site's root
-- and follows links (exact entity name first, then the section for the entity's kind, then the
alphabetical range holding its initial), reads ``- Label: value`` facts, follows reference links
for multi-hop questions and combines values for compare/arithmetic questions.

Trajectories are built with the ReAct agent's own pieces -- ``prompts.system_prompt``,
``chat.format_tool_call`` / ``format_tool_response`` and ``agent.observe`` (tool execution and
error observations) -- so they are exactly what ``ReActAgent`` would store: assistant turns are
``<think>\\n…\\n</think>\\n\\n<tool_call>\\n{json}\\n</tool_call>``, tool results are user turns
``<tool_response>\\n…\\n</tool_response>``, the last turn ends with ``<answer>…</answer>``.

``Mistakes`` makes the agent imperfect with seeded probabilities, so groups of rollouts of one
task can have 0 < mean reward < 1:
  * ``answer_early`` -- after the first search, answer from the snippets without opening a page;
  * ``wrong_link``   -- when a near-miss name (one word different) is on offer, take it for the
                        target and read its page;
  * ``skip_hop``     -- in multi-source questions, answer after the first page (the intermediate
                        entity, or the first of two values).
Every rollout's random stream is ``random.Random(f"{seed}:{task_id}:{member}")``.

Experience sensitivity (opt-in, ``ReferenceAgentConfig.sensitivity``): with a ``Sensitivity``,
the lessons in the current request's context move these rates -- each mistake falls when the
lesson preventing it is shown, a long block dilutes every lesson, and the finishing lesson shown
before any page is read makes the agent answer prematurely. The designed effects are written down
in ``sensitivity.py`` (``designed_effects()``). They act through requests, so only
``ReferencePolicy`` (inside ``ReActAgent`` with an injection) sees experience; the standalone
``ReferenceAgent`` has none in its context. With ``sensitivity=None`` (the default) experience is
ignored and every rollout is what it was before sensitivity existed.

``ReferencePolicy`` is the same agent as a ``ChatBackend``: it lets the real ``ReActAgent`` (and
everything built on it) run offline on SimWeb with a deterministic, partly successful "model".
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import re
import threading
from collections import deque
from collections.abc import Callable, Sequence

from expint_jax.models.chat import format_tool_call, format_tool_response
from expint_jax.records import Completion, Message, Trajectory
from expint_jax.rollout import prompts
from expint_jax.rollout.agent import observe
from expint_jax.rollout.envs.base import Environment, Task
from expint_jax.rollout.envs.simweb.names import is_near_miss
from expint_jax.rollout.envs.simweb.sensitivity import (
    BLOCK_HEADER,
    EMPTY,
    Context,
    Sensitivity,
    mistake_rate,
    premature_rate,
    request_context,
)
from expint_jax.rollout.envs.simweb.site import RELATIONS, SECTION_TITLES, format_number
from expint_jax.rollout.envs.simweb.tasks import ParsedQuestion, find_question, parse_question
from expint_jax.rollout.envs.simweb.tools import VisitedPage, parse_page
from expint_jax.rollout.envs.web import SearchHit, parse_search_results
from expint_jax.llm.base import SamplingSpec, per_conversation
from expint_jax.rollout.judge import extract_numbers, parse_number

AGENT_NAME = "simweb-reference"
UNKNOWN = "unknown"
_FACT = re.compile(r"^- (?P<label>[^:\n]+): (?P<value>.+)$", re.M)
_RANGE = re.compile(r"^(?P<section>\w+) (?P<first>[A-Z])(?:–(?P<last>[A-Z]))? \|")
_NUMERIC_LABELS = {"Founded", "Born", "Released", "Staff", "Attendance", "Units sold", "Annual budget", "Price"}
_PHRASES = {
    "Founded": "founding year", "Headquarters": "headquarters city", "Director": "director", "Staff": "staff count",
    "Annual budget": "annual budget", "Born": "birth year", "Hometown": "hometown", "Date": "date",
    "Venue": "venue city", "Organizer": "organizer", "Attendance": "attendance", "Released": "release year",
    "Maker": "maker", "Price": "price", "Units sold": "number of units sold",
}


@dataclasses.dataclass(frozen=True)
class Mistakes:
    answer_early: float = 0.0
    wrong_link: float = 0.0
    skip_hop: float = 0.0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            p = getattr(self, field.name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"Mistakes.{field.name} must be a probability in [0, 1], got {p}")


@dataclasses.dataclass(frozen=True)
class ReferenceAgentConfig:
    mistakes: Mistakes = Mistakes()
    think: bool = True  # write a <think> block before every action
    max_tool_calls: int = 20  # give up ("unknown") after this many calls
    instructions: str = prompts.DEFAULT_INSTRUCTIONS
    sensitivity: Sensitivity | None = None  # None: injected experience is ignored (sensitivity.py)


def read_facts(page_text: str) -> dict[str, str]:
    """The ``- Label: value`` facts of a page text."""
    return {m.group("label").strip(): m.group("value").strip() for m in _FACT.finditer(page_text)}


class _GiveUp(Exception):
    """The agent could not find what it needs within its budget."""


class _AnswerNow(Exception):
    """A mistake made the agent answer before it had the facts."""

    def __init__(self, answer: str, thought: str):
        super().__init__(answer)
        self.answer, self.thought = answer, thought


class _Episode:
    """One rollout: the conversation so far and how actions reach the tools.

    ``perform(reply) -> observation`` runs the tool call written in ``reply`` (the standalone agent
    calls the tools; ``ReferencePolicy`` replays observations the ReAct agent already recorded).
    ``context_at(k)`` is the experience context of the request behind assistant turn ``k``; a
    mistake drawn before the k-th tool call decides turn k, so it uses ``context_at(tool_calls)``.
    """

    def __init__(self, system: str, question: str, config: ReferenceAgentConfig, rng: random.Random,
                 perform: Callable[[str], str], context_at: Callable[[int], Context] = lambda turn: EMPTY,
                 side_seed: str = ""):
        self.config, self.rng, self.perform = config, rng, perform
        self.context_at, self.side_seed = context_at, side_seed
        self.pages_read = False
        self.messages = [Message("system", system), Message("user", question)]
        self.tool_calls = 0
        self.mistakes: list[str] = []
        self.known_links: dict[str, str] = {}  # anchor -> url, from every page seen
        self.searched = False

    def _turn(self, thought: str, body: str) -> str:
        return f"<think>\n{thought}\n</think>\n\n{body}" if self.config.think else body

    def call(self, thought: str, name: str, arguments: dict[str, str]) -> str:
        if self.tool_calls >= self.config.max_tool_calls:
            raise _GiveUp(f"tool budget of {self.config.max_tool_calls} calls used up")
        reply = self._turn(thought, format_tool_call(name, arguments))
        observation = self.perform(reply)
        self.tool_calls += 1
        self.messages += [Message("assistant", reply), Message("user", format_tool_response(observation))]
        return observation

    def visit(self, thought: str, url: str) -> VisitedPage | None:
        page = parse_page(self.call(thought, "visit", {"url": url}))
        if page is not None:
            self.pages_read = True
            self.known_links.update({link.title: link.url for link in page.links})
        return page

    def answer(self, thought: str, value: str) -> str:
        self.messages.append(Message("assistant", self._turn(thought, f"<answer>{value}</answer>")))
        return value

    def slip(self, kind: str) -> bool:
        """Draws whether the mistake ``kind`` happens now, and records it when it does."""
        rate = getattr(self.config.mistakes, kind)
        if self.config.sensitivity is not None:
            rate = mistake_rate(kind, rate, self.context_at(self.tool_calls), self.config.sensitivity,
                                pages_read=self.pages_read)
        if self.rng.random() < rate:  # one draw whatever the rate, so context never shifts the stream
            self.mistakes.append(kind)
            return True
        return False

    def premature(self) -> bool:
        """Whether the finishing lesson in the first request makes the agent answer with no tool call.

        Drawn from a stream of its own, so the main stream is the same with and without it."""
        p = premature_rate(self.context_at(0), self.config.sensitivity)
        if p > 0.0 and random.Random(f"{self.side_seed}:premature").random() < p:
            self.mistakes.append("premature")
            return True
        return False


class ReferenceAgent:
    """Solves SimWeb tasks with the environment's ``search`` and ``visit`` tools."""

    def __init__(self, env: Environment, config: ReferenceAgentConfig = ReferenceAgentConfig()):
        self.env, self.config = env, config

    def run(self, task: Task, seed: int = 0, member: int = 0) -> Trajectory:
        tools = {tool.spec.name: tool for tool in self.env.tools(task)}
        for needed in ("search", "visit"):
            if needed not in tools:
                raise ValueError(f"task {task.task_id!r}: the reference agent needs a {needed!r} tool")
        system = prompts.system_prompt([t.spec for t in tools.values()], self.config.instructions)
        stream = f"{seed}:{task.task_id}:{member}"
        episode = _Episode(system, task.question, self.config, random.Random(stream),
                           lambda reply: observe(reply, tools)[0], side_seed=stream)
        prediction = _play(episode, task.question)
        return Trajectory(
            task_id=task.task_id,
            messages=tuple(episode.messages),
            num_tool_calls=episode.tool_calls,
            prediction=prediction,
            reward=self.env.score(task, prediction),
            ground_truth=task.answer,
            metadata={"agent": AGENT_NAME, "seed": seed, "member": member, "mistakes": list(episode.mistakes),
                      "llm_calls": sum(m.role == "assistant" for m in episode.messages),
                      **{k: task.metadata[k] for k in ("level", "source", "style", "form") if k in task.metadata}},
        )

    def run_batch(self, tasks: Sequence[Task], n: int = 1, seed: int = 0) -> list[Trajectory]:
        """``n`` rollouts per task, task-major (all of task 0's rollouts first), like ``ReActAgent``."""
        if n < 1:
            raise ValueError(f"run_batch: n must be >= 1, got {n}")
        return [self.run(task, seed, member) for task in tasks for member in range(n)]


class _Emit(Exception):
    """Policy mode: the episode reached the turn the ReAct agent asked for."""

    def __init__(self, reply: str):
        super().__init__(reply)
        self.reply = reply


class _Diverged(Exception):
    """Policy mode: the recorded conversation is not one this policy would have written."""


class _Replay:
    """``perform`` for policy mode: recorded observations for recorded replies, then emit."""

    def __init__(self, replies: list[str], observations: list[str]):
        self.replies, self.observations, self.index = replies, observations, 0

    def __call__(self, reply: str) -> str:
        if self.index == len(self.replies):
            raise _Emit(reply)
        if reply != self.replies[self.index]:
            raise _Diverged()
        self.index += 1
        return self.observations[self.index - 1]


_TOOL_RESPONSE = re.compile(r"<tool_response>\n(.*)\n</tool_response>", re.S)
_GIVE_UP_REPLY = "<answer>unknown</answer>"


def _without_experience(content: str) -> str:
    """A tool-response message without a step-wise block appended after the response."""
    end = content.find("\n</tool_response>")
    header = BLOCK_HEADER.search(content, end) if end >= 0 else None
    return content[: header.start()] if header is not None else content


class ReferencePolicy:
    """A ``ChatBackend`` that plays the reference agent inside ``ReActAgent`` on SimWeb.

    An offline, deterministic stand-in for a model: the real agent loop (prompting, injection,
    tool execution, limits) runs unchanged, and with ``Mistakes`` the rollouts of a group differ.
    Each request is answered by replaying the episode from its start against the conversation:
    the policy's earlier replies must equal the recorded assistant turns and the recorded tool
    responses are fed back as observations; the next reply answers the request. Only the question
    (found by ``tasks.find_question`` whatever text surrounds it) and the text inside
    ``<tool_response>`` are read as the task. Experience text is ignored unless
    ``config.sensitivity`` is set; then the request's context (``sensitivity.request_context``)
    sets the rates of the mistake that decides this reply, and each earlier turn keeps the context
    its own request had (remembered with the rollout's stream; when not remembered, the request's
    global block stands in). A conversation it did not write, a nudge or a forced-answer request
    gets ``<answer>unknown</answer>``. A rollout's random stream is seeded by its first request's
    ``SamplingParams.seed`` (a call counter when that is None) and carried to its later requests,
    keyed by the conversation so far.
    """

    def __init__(self, config: ReferenceAgentConfig = ReferenceAgentConfig()):
        self.config = config
        # (question, replies so far) -> rollouts waiting there: (stream, context of each turn)
        self._seeds: dict[tuple[str, tuple[str, ...]], list[tuple[int, tuple[Context, ...]]]] = {}
        self._lock = threading.Lock()
        self._counter = itertools.count()

    def chat(self, conversations: Sequence[Sequence[Message]], params: SamplingSpec) -> list[Completion]:
        each = per_conversation(params, len(conversations))
        return [Completion(text=self._reply(list(messages), p.seed)) for messages, p in zip(conversations, each)]

    def _reply(self, messages: list[Message], seed: int | None) -> str:
        users = [i for i, m in enumerate(messages) if m.role == "user"]
        if not users:
            return _GIVE_UP_REPLY
        first = messages[users[0]].content
        question = find_question(first) or first.split("\n\n", 1)[0]
        replies, observations = [], []
        for message in messages[users[0] + 1:]:
            if message.role == "assistant":
                replies.append(message.content)
                continue
            response = _TOOL_RESPONSE.search(_without_experience(message.content))
            if response is None:  # a nudge or a forced-answer request
                return _GIVE_UP_REPLY
            observations.append(response.group(1))
        if len(observations) != len(replies):
            return _GIVE_UP_REPLY
        stream, earlier = self._stream(question, replies, seed)
        contexts = self._contexts(messages, question, earlier, len(replies))
        replay = _Replay(replies, observations)
        episode = _Episode("", question, self.config, random.Random(f"{stream}:{question}"), replay,
                           context_at=lambda turn: contexts[min(turn, len(contexts) - 1)],
                           side_seed=f"{stream}:{question}")
        try:
            _play(episode, question)
        except _Emit as step:
            with self._lock:
                self._seeds.setdefault((question, (*replies, step.reply)), []).append((stream, contexts))
            return step.reply
        except _Diverged:
            return _GIVE_UP_REPLY
        return episode.messages[-1].content if replay.index == len(replies) else _GIVE_UP_REPLY

    def _contexts(self, messages: list[Message], question: str, earlier: tuple[Context, ...],
                  turns: int) -> tuple[Context, ...]:
        """The experience context of each turn so far and of the one asked for now (the last)."""
        if self.config.sensitivity is None:
            return (EMPTY,)
        parsed = parse_question(question)
        names = parsed.names if parsed is not None else ()
        if len(earlier) != turns:  # not remembered: the global block is all the request still shows
            earlier = (request_context(messages, names, step=False),) * turns
        return (*earlier, request_context(messages, names))

    def _stream(self, question: str, replies: list[str], seed: int | None) -> tuple[int, tuple[Context, ...]]:
        with self._lock:
            if not replies:
                return (seed if seed is not None else next(self._counter)), ()
            waiting = self._seeds.get((question, tuple(replies)))
            if not waiting:
                return 0, ()
            stream = waiting.pop(0)
            if not waiting:
                del self._seeds[(question, tuple(replies))]
            return stream


def _play(ep: _Episode, question: str) -> str:
    """Runs the whole episode; returns the prediction (the agent's last turn is its answer)."""
    parsed = parse_question(question)
    if parsed is None:
        return ep.answer("I cannot tell what this question asks for.", UNKNOWN)
    if ep.premature():
        guess = parsed.names[0] if parsed.form.style == "compare" else UNKNOWN
        return ep.answer(f"I should answer at once; my answer is {guess}.", guess)
    try:
        return _solve(ep, parsed)
    except _AnswerNow as early:
        return ep.answer(early.thought, early.answer)
    except _GiveUp as reason:
        return ep.answer(f"I could not find the information ({reason}).", UNKNOWN)


# --- solving: the agent's strategy, shared by ReferenceAgent and ReferencePolicy -------------


def _solve(ep: _Episode, q: ParsedQuestion) -> str:
    form = q.form
    if form.style in ("lookup", "chain"):
        return _follow_path(ep, q, q.names[0])
    label = form.path[-1]
    values = []
    for i, name in enumerate(q.names):
        values.append(_fact_of(ep, q, name, form.kind, label))
        if i == 0 and ep.slip("skip_hop"):
            guess = name if form.style == "compare" else values[0]
            return ep.answer(f"{name} has {label}: {values[0]}. That should settle it; the answer is {guess}.",
                             guess)
    return ep.answer(*_combine(q, label, values))


def _follow_path(ep: _Episode, q: ParsedQuestion, name: str) -> str:
    kind = q.form.kind
    for step, label in enumerate(q.form.path):
        value = _fact_of(ep, q, name, kind, label)
        if step == len(q.form.path) - 1:
            return ep.answer(f"The page of {name} gives {label}: {value}. So the answer is {value}.", value)
        if ep.slip("skip_hop"):
            return ep.answer(f"The {_PHRASES[label]} of {name} is {value}. That answers the question.", value)
        name, kind = value, RELATIONS[label]
    raise AssertionError("unreachable: a question path is never empty")


def _fact_of(ep: _Episode, q: ParsedQuestion, name: str, kind: str, label: str) -> str:
    page = _locate(ep, q, name, kind, label)
    facts = read_facts(page.text)
    if label not in facts:
        raise _GiveUp(f"the page {page.url} does not list {label}")
    return facts[label]


def _combine(q: ParsedQuestion, label: str, values: list[str]) -> tuple[str, str]:
    a, b = q.names
    x, y = (parse_number(v) for v in values)
    if x is None or y is None:
        raise _GiveUp(f"{label} values {values} are not numbers")
    read = f"{a} has {label}: {values[0]}; {b} has {label}: {values[1]}."
    combine = q.form.combine
    if combine in ("earliest", "smallest", "largest"):
        pick_a = (x < y) if combine != "largest" else (x > y)
        winner = a if pick_a else b
        return f"{read} So the answer is {winner}.", winner
    result = {"sum": x + y, "difference": x - y, "gap": abs(x - y)}[combine]
    text = format_number(label, result)
    return f"{read} The {combine} is {text}.", text


def _locate(ep: _Episode, q: ParsedQuestion, name: str, kind: str, label: str) -> VisitedPage:
    """Opens the page of entity ``name``; see the module docstring for the strategy."""
    wanted = f"the {_PHRASES[label]} of {name}"
    url = _choose(ep, name, ep.known_links)
    if url is not None:
        return _open(ep, name, url, f"I need {wanted}. A page I saw links to it; I'll open it.")
    hits = _search(ep, name, label, wanted)
    url = _choose(ep, name, {h.title: h.url for h in hits})
    if url is not None:
        return _open(ep, name, url, f'The result "{name}" is the page of {name} itself; I\'ll open it.')
    directories = [h for h in hits if h.url.startswith(q.root_url) and h.url.endswith("/") and h.url != q.root_url]
    frontier = deque((h.url, f'No result is the page of {name} itself, but "{h.title}" is a directory page '
                             f"on the site; I'll open it and look for a link to {name}.") for h in directories)
    frontier.append((q.root_url, f"The search did not lead to a page about {name}. I'll start from the site's "
                                 f"home page {q.root_url} and navigate to it."))
    seen: set[str] = set()
    while frontier:
        url, thought = frontier.popleft()
        if url in seen:
            continue
        seen.add(url)
        page = ep.visit(thought, url)
        if page is None:
            continue
        target = _choose(ep, name, {link.title: link.url for link in page.links})
        if target is not None:
            return _open(ep, name, target, f"This page links to {name}; I'll open it.")
        for next_url, next_thought in _directory_links(page, q.root_url, name, kind):
            frontier.appendleft((next_url, next_thought))
    raise _GiveUp(f"no page about {name} was found on {q.root_url}")


def _search(ep: _Episode, name: str, label: str, wanted: str) -> list[SearchHit]:
    query = f"{name} {_PHRASES[label]}"
    hits = parse_search_results(ep.call(f"I need {wanted}. I'll search for it.", "search", {"query": query}))
    first_search, ep.searched = not ep.searched, True
    if first_search and ep.slip("answer_early"):
        guess = _guess_from_snippets(hits, label)
        raise _AnswerNow(guess, f"The search results already mention {name}; from the snippets the answer "
                                f"seems to be {guess}.")
    return hits


def _choose(ep: _Episode, name: str, links: dict[str, str]) -> str | None:
    """Among ``links`` (title -> URL), the one to open for ``name``: its exact title, or -- on a
    ``wrong_link`` slip, when a near-miss title is on offer -- the first near miss."""
    near = [title for title in links if is_near_miss(title, name)]
    if near and ep.slip("wrong_link"):
        return links[near[0]]
    return links.get(name)


def _open(ep: _Episode, name: str, url: str, thought: str) -> VisitedPage:
    page = ep.visit(thought, url)
    if page is None:
        raise _GiveUp(f"the page of {name} at {url} could not be opened")
    return page


def _directory_links(page: VisitedPage, root_url: str, name: str, kind: str) -> list[tuple[str, str]]:
    """Directory links worth following towards ``name``, best last (they are pushed on a stack)."""
    section = SECTION_TITLES[kind]
    found = []
    for link in page.links:
        if not (link.url.startswith(root_url) and link.url.endswith("/")) or link.url == root_url:
            continue
        letters = _RANGE.match(link.title)
        if letters and letters.group("section") == section:
            if letters.group("first") <= name[0].upper() <= (letters.group("last") or letters.group("first")):
                found.append((link.url, f'This directory splits entries alphabetically; {name} starts with '
                                        f'"{name[0].upper()}", so I\'ll open "{link.title}".'))
        elif link.title.startswith(f"{section} |"):
            found.append((link.url, f'{name} should be listed under "{link.title}"; I\'ll open it.'))
    return found


def _guess_from_snippets(hits: list[SearchHit], label: str) -> str:
    text = " ".join(h.snippet for h in hits)
    if label in _NUMERIC_LABELS:
        numbers = extract_numbers(text)
        if not numbers:
            return UNKNOWN
        return str(int(numbers[0])) if numbers[0].is_integer() else str(numbers[0])
    return hits[0].title if hits else UNKNOWN


def run_reference_agent(
    env: Environment,
    tasks: Sequence[Task] | None = None,
    *,
    n: int = 1,
    seed: int = 0,
    mistakes: Mistakes = Mistakes(),
    think: bool = True,
) -> list[Trajectory]:
    """Trajectories of the reference agent on ``tasks`` (default: all of ``env``'s tasks)."""
    agent = ReferenceAgent(env, ReferenceAgentConfig(mistakes=mistakes, think=think))
    return agent.run_batch(env.tasks() if tasks is None else tasks, n=n, seed=seed)
