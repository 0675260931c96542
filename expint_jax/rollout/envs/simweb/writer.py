"""SimWeb's offline experience writer: deterministic lessons from scored trajectories, no LLM.

This is the testbed's writer, so that the whole self-evolution loop runs offline; it is not a
replacement for the LLM pipeline (``expint_jax.experience.extract``), and it only understands
SimWeb's tool protocol: ``search`` / ``visit`` calls with ``{"query"}`` / ``{"url"}`` arguments
(a string or a list), search results and pages in the formats of ``expint_jax.rollout.envs.web``
and ``expint_jax.rollout.envs.simweb.tools``.

Each rollout is reduced to a ``RolloutTrace`` (queries, search hits, pages opened, failed visits,
links followed). Within each informative group (0 < mean reward < 1 when judged), successes
(reward >= 0.5) are contrasted with failures:

  * principle lessons: fixed, abstract "Label: When [condition], [strategy]." rules, one per
    behavioural pattern that separates the two (``PRINCIPLES``: answered without tools, answered
    from snippets, gave up, followed a directory, skipped an entity's page, picked a look-alike
    page, rephrased the query, hit a broken link, ran out of calls, and the finishing lesson:
    successes answered as soon as a page stated the fact while failures answered before reading
    any). Every mistake the reference agent makes (``reference_agent.Mistakes``) has its rule:
    answer_early -> answered_from_snippets, wrong_link -> picked_lookalike, skip_hop ->
    read_every_entity. A rule is written once however many groups show it; rules are ordered by
    the number of groups that show them, then by their order in ``PRINCIPLES``.
  * instance lessons: concrete notes from the group's first success, tied to that task (each
    quotes the question, which names the site, its root URL and the entities): its answer and the
    URL of the page stating it; the query whose results listed that page, or the page linking to it; the look-alike page a
    failure read instead of the target's ("Look-alike"); the pages a multi-part question needs when
    a failure read fewer ("Every part"); and a wrong answer a failure gave, if any.

The texts and labels come from ``lessons.py``, the table the experience-sensitive reference agent
reads lessons by, so every lesson written here is one the agent recognises.

New lessons are appended to the pool unless their wording is already there, with
``writer=WRITER`` so that a pool says which lessons this testbed writer produced. With
``retire_unsupported`` a lesson this writer wrote earlier that no group of the batch shows any
more is deleted first (the mistake it addressed has faded), so the pool follows the policy: it
gains lessons for new mistakes and loses those for mistakes gone. When the pool is over
``max_pool_size`` it is cut like the LLM pipeline's truncation fallback
(``ExperiencePool.truncated`` with ``previous``): this batch's lessons first, in the order above
(most supported principles first), then the earlier pool's. The result is renumbered ``G0..``.
``write_iteration`` does the same and returns the pool with its diff against the previous one
and its granularity report (``expint_jax.experience.granularity``): one ``PoolStep`` per iteration.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

from expint_jax.experience.bank import (
    DEFAULT_MAX_POOL_SIZE,
    ExperiencePool,
    PoolDiff,
    check_granularity,
    diff_pools,
    text_key,
)
from expint_jax.experience.extract.groups import RolloutGroup
from expint_jax.experience.granularity import GranularityReport, analyze_pool
from expint_jax.models.chat import TOOL_RESPONSE_END, TOOL_RESPONSE_START, ToolCall, parse_tool_call
from expint_jax.records import Trajectory
from expint_jax.rollout.envs.simweb.lessons import LESSONS_BY_KEY
from expint_jax.rollout.envs.simweb.names import is_near_miss
from expint_jax.rollout.envs.simweb.tools import VisitedPage, parse_page
from expint_jax.rollout.envs.web import SEPARATOR, SearchHit, parse_search_results

_TOOL_RESPONSE = re.compile(re.escape(TOOL_RESPONSE_START) + r"\n?(.*?)\n?" + re.escape(TOOL_RESPONSE_END), re.S)
_FACT = re.compile(r"^- [^:\n]+: .+$", re.M)
_NO_ANSWER = frozenset({"", "unknown", "none", "n/a", "not found", "i don't know"})
SUCCESS_REWARD = 0.5
WRITER = "simweb_offline_writer"  # ``ExperienceItem.writer`` of the lessons written here


@dataclasses.dataclass(frozen=True)
class RolloutTrace:
    """What one rollout did with the tools, read from its messages."""

    question: str
    queries: tuple[str, ...]
    hits: tuple[tuple[str, SearchHit], ...]  # (query, hit), in order
    pages: tuple[VisitedPage, ...]  # pages opened, in order
    failed_visits: tuple[str, ...]  # URLs that could not be opened
    linked_pages: tuple[tuple[VisitedPage, VisitedPage], ...]  # (page, earlier page that linked to it)
    tool_calls: int
    prediction: str | None
    reward: float | None
    termination: str
    last_call: str | None = None  # the name of the last tool called

    @property
    def succeeded(self) -> bool:
        return self.reward is not None and self.reward >= SUCCESS_REWARD

    @property
    def gave_up(self) -> bool:
        return (self.prediction or "").strip().lower() in _NO_ANSWER

    @property
    def content_pages(self) -> tuple[VisitedPage, ...]:
        """Pages opened that the agent did not merely pass through to another page."""
        sources = {parent.url for _, parent in self.linked_pages}
        return tuple(p for p in self.pages if p.url not in sources)

    @property
    def fact_pages(self) -> tuple[VisitedPage, ...]:
        """Distinct pages opened that list ``- Label: value`` facts (entity pages, not directories)."""
        seen: dict[str, VisitedPage] = {}
        for page in self.pages:
            if _FACT.search(page.text):
                seen.setdefault(page.url, page)
        return tuple(seen.values())

    @property
    def answered_on_fact(self) -> bool:
        """Answered right after opening a page that states the answer."""
        answer = (self.prediction or "").strip().lower()
        return bool(answer) and not self.gave_up and bool(self.pages) and self.last_call == "visit" \
            and answer in self.pages[-1].text.lower()

    @property
    def answered_unread(self) -> bool:
        """Gave an answer (not a give-up) without having opened any page that lists facts."""
        return not self.gave_up and not self.fact_pages and self.termination == "answer"


def _as_list(value: object) -> list[str]:
    items = value if isinstance(value, list) else [value]
    return [v for v in items if isinstance(v, str) and v.strip()]


def trace_rollout(trajectory: Trajectory) -> RolloutTrace:
    question = next((m.content for m in trajectory.messages if m.role == "user"), "")
    queries: list[str] = []
    hits: list[tuple[str, SearchHit]] = []
    pages: list[VisitedPage] = []
    failed: list[str] = []
    linked: list[tuple[VisitedPage, VisitedPage]] = []
    pending: ToolCall | None = None
    last: str | None = None
    calls = 0
    for message in trajectory.messages:
        if message.role == "assistant":
            call = parse_tool_call(message.content)
            pending = call if isinstance(call, ToolCall) else None
            calls += pending is not None
            last = pending.name if pending is not None else last
            continue
        if message.role != "user" or pending is None:
            continue
        observation = "\n".join(_TOOL_RESPONSE.findall(message.content)) or message.content
        if pending.name == "search":
            asked = _as_list(pending.arguments.get("query"))
            queries += asked
            parts = observation.split(SEPARATOR)
            labels = asked if len(parts) == len(asked) else [""] * len(parts)  # one part per query
            hits += [(query, hit) for query, part in zip(labels, parts) for hit in parse_search_results(part)]
        elif pending.name == "visit":
            opened = [p for p in (parse_page(part) for part in observation.split(SEPARATOR)) if p is not None]
            for page in opened:
                parent = next((p for p in reversed(pages) if any(link.url == page.url for link in p.links)), None)
                if parent is not None:
                    linked.append((page, parent))
                pages.append(page)
            opened_urls = {p.url for p in opened}
            failed += [url for url in _as_list(pending.arguments.get("url")) if url not in opened_urls]
        pending = None
    return RolloutTrace(question, tuple(queries), tuple(hits), tuple(pages), tuple(failed), tuple(linked), calls,
                        trajectory.prediction, trajectory.reward, trajectory.termination, last)


Contrast = Callable[[Sequence[RolloutTrace], Sequence[RolloutTrace]], bool]  # (successes, failures)


def _pages(t: RolloutTrace) -> int:
    return len(t.pages)


def _lookalikes(successes: Sequence[RolloutTrace], failures: Sequence[RolloutTrace]) -> list[tuple[VisitedPage, VisitedPage]]:
    """(look-alike page a failure read, the success's page whose title it resembles), in order."""
    targets = {p.title: p for t in successes for p in t.fact_pages}
    found = []
    for trace in failures:
        for page in trace.fact_pages:
            target = next((targets[title] for title in targets if is_near_miss(page.title, title)), None)
            if target is not None and page.title not in targets:
                found.append((page, target))
    return found


def _skipped_part(successes: Sequence[RolloutTrace], failures: Sequence[RolloutTrace]) -> bool:
    """Every success read >= 2 entity pages and some failure answered after reading fewer (but some)."""
    need = min((len(t.fact_pages) for t in successes), default=0)
    return need >= 2 and any(0 < len(t.fact_pages) < need and not t.gave_up for t in failures)


_CONTRASTS: dict[str, Contrast] = {
    "answered_without_tools": lambda s, f: any(t.tool_calls == 0 for t in f) and any(t.tool_calls > 0 for t in s),
    "answered_from_snippets":
        lambda s, f: any(t.queries and not t.pages and not t.failed_visits for t in f) and any(map(_pages, s)),
    "gave_up": lambda s, f: any(t.gave_up for t in f) and any(map(_pages, s)),
    "followed_directory": lambda s, f: any(t.linked_pages for t in s) and not all(t.linked_pages for t in f),
    "read_every_entity": _skipped_part,
    "picked_lookalike": lambda s, f: bool(_lookalikes(s, f)),
    "rephrased_query":
        lambda s, f: any(len(set(t.queries)) >= 2 for t in s) and all(len(set(t.queries)) <= 1 for t in f),
    "broken_link": lambda s, f: any(t.failed_visits for t in f) and not any(t.failed_visits for t in s),
    "ran_out_of_calls": lambda s, f: any(t.termination in ("max_calls", "max_context") for t in f),
    # The finishing lesson: the successes stopped as soon as a page stated the fact; some failure
    # answered before reading any page at all.
    "answer_promptly": lambda s, f: any(t.answered_on_fact for t in s) and any(t.answered_unread for t in f),
}
# (key, lesson text, contrast), in the order of ``lessons.PRINCIPLE_LESSONS``.
PRINCIPLES: tuple[tuple[str, str, Contrast], ...] = tuple(
    (key, LESSONS_BY_KEY[key].text, contrast) for key, contrast in
    sorted(_CONTRASTS.items(), key=lambda kv: list(LESSONS_BY_KEY).index(kv[0])))


@dataclasses.dataclass(frozen=True)
class OfflineWriterConfig:
    granularity: str = "principle"
    max_pool_size: int = DEFAULT_MAX_POOL_SIZE
    informative_groups_only: bool = True
    # Delete this writer's earlier lessons that no group of the batch shows any more.
    retire_unsupported: bool = False

    def __post_init__(self) -> None:
        check_granularity(self.granularity, "OfflineWriterConfig.granularity")
        if self.max_pool_size < 1:
            raise ValueError(f"OfflineWriterConfig.max_pool_size must be >= 1, got {self.max_pool_size}")


def _split(group: RolloutGroup) -> tuple[list[RolloutTrace], list[RolloutTrace]]:
    traces = [trace_rollout(t) for t in group.trajectories]
    return [t for t in traces if t.succeeded], [t for t in traces if not t.succeeded]


def principle_lessons(groups: Sequence[RolloutGroup]) -> list[tuple[str, tuple[str, ...]]]:
    """(lesson, task ids showing it), most supported first."""
    support: dict[str, list[str]] = {}
    for group in groups:
        successes, failures = _split(group)
        if not successes or not failures:
            continue
        for name, _, shows in PRINCIPLES:
            if shows(successes, failures):
                support.setdefault(name, []).append(group.task_id)
    order = {name: k for k, (name, _, _) in enumerate(PRINCIPLES)}
    text = {name: lesson for name, lesson, _ in PRINCIPLES}
    ranked = sorted(support, key=lambda name: (-len(support[name]), order[name]))
    return [(text[name], tuple(support[name])) for name in ranked]


def _answer_page(trace: RolloutTrace) -> VisitedPage | None:
    """The entity page stating the answer (its own page when the answer is a name), else the last page read."""
    answer = (trace.prediction or "").strip().lower()
    stating = [p for p in trace.fact_pages if answer and answer in p.text.lower()]
    titled = [p for p in stating if p.title.strip().lower() == answer]
    return (titled or stating or list(trace.fact_pages) or list(trace.pages) or [None])[-1]


def instance_lessons(group: RolloutGroup) -> list[str]:
    successes, failures = _split(group)
    if not successes:
        return []
    best = successes[0]
    question = " ".join(best.question.split())
    page = _answer_page(best)
    if page is None:
        return []
    lessons = [f'Answer source: The answer to "{question}" is {best.prediction}, stated on {page.url} ({page.title}).']
    query = next((q for q, hit in best.hits if hit.url == page.url and q), None)
    parent = next((p for child, p in best.linked_pages if child.url == page.url), None)
    if query is not None:
        lessons.append(f'Useful query: For "{question}", searching "{query}" lists {page.url} ({page.title}) among '
                       "the results.")
    elif parent is not None:
        lessons.append(f'Navigation: For "{question}", {page.title} ({page.url}) is linked from {parent.title} '
                       f"({parent.url}).")
    for twin, target in _lookalikes([best], failures)[:1]:
        lessons.append(f'Look-alike: For "{question}", {twin.title} ({twin.url}) is a different entity; the page '
                       f"of {target.title} is {target.url}.")
    if _skipped_part([best], failures):
        needed = ", ".join(f"{p.title} ({p.url})" for p in best.fact_pages)
        lessons.append(f'Every part: "{question}" needs the pages {needed}; the answer is {best.prediction}.')
    wrong = Counter(t.prediction.strip() for t in failures if t.prediction and not t.gave_up)
    if wrong:
        value = sorted(wrong, key=lambda v: (-wrong[v], v))[0]
        lessons.append(f'Wrong answer: For "{question}", {value} is wrong; the right answer is {best.prediction}.')
    return lessons


def write_offline(groups: Iterable[RolloutGroup], pool: ExperiencePool, config: OfflineWriterConfig, *,
                  iteration: int | None = None) -> ExperiencePool:
    """The next pool: ``pool`` plus this batch's lessons, capped and renumbered."""
    groups = [g for g in groups if g.is_informative or not config.informative_groups_only]
    if config.granularity == "principle":
        lessons = principle_lessons(groups)
    else:
        lessons = [(text, (g.task_id,)) for g in groups for text in instance_lessons(g)]
    updated = pool
    if config.retire_unsupported:
        shown = {text_key(text) for text, _ in lessons}
        for item in pool:
            if item.writer == WRITER and item.granularity == config.granularity and text_key(item.text) not in shown:
                updated = updated.delete(item.id)
    known = {text_key(item.text) for item in updated}
    for text, sources in lessons:
        if text_key(text) in known:
            continue
        known.add(text_key(text))
        updated = updated.add(text, granularity=config.granularity, iteration=iteration, source_task_ids=sources,
                              writer=WRITER)
    return updated.truncated(config.max_pool_size, previous=pool).renumbered()


@dataclasses.dataclass(frozen=True)
class PoolStep:
    """One iteration of the writer: the pool, what changed since the previous one, its granularity."""

    iteration: int | None
    pool: ExperiencePool
    diff: PoolDiff
    granularity: GranularityReport

    @property
    def gained(self) -> tuple[str, ...]:
        return tuple(item.text for item in self.diff.added)

    @property
    def lost(self) -> tuple[str, ...]:
        return tuple(item.text for item in self.diff.deleted)

    def summary(self) -> str:
        g = self.granularity
        return (f"iteration {self.iteration}: {len(self.pool)} items ({self.diff.summary()}); "
                f"URL {100 * g.url_share:.0f}%, numbers {100 * g.number_share:.0f}%, "
                f"entities {100 * g.entity_share:.0f}%, strategy {100 * g.strategy_share:.0f}%")


def write_iteration(groups: Iterable[RolloutGroup], pool: ExperiencePool, config: OfflineWriterConfig, *,
                    iteration: int | None = None) -> PoolStep:
    """``write_offline`` plus the diff against ``pool`` and the new pool's granularity report."""
    updated = write_offline(groups, pool, config, iteration=iteration)
    return PoolStep(iteration, updated, diff_pools(pool, updated), analyze_pool(updated))
