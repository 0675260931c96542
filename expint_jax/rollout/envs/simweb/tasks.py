"""SimWeb questions: the question forms, the seeded task generator and the question parser.

A ``QuestionForm`` is a template plus a recipe: start at the entity (or two entities) named in
the question, follow ``path`` (fact labels; all but the last are references to other entities),
then ``combine`` the values. Styles:

* ``lookup``     -- one fact of one entity (single-source);
* ``chain``      -- follow references across 2-3 pages ("the director of the organization that
                    organized X"; multi-source);
* ``compare``    -- which of two entities is earlier/larger/smaller (answer: a name; multi-source);
* ``arithmetic`` -- sum / difference / gap of two entities' numbers (multi-source).

Every question starts with ``QUESTION_PREFIX`` (site name and root URL, as WebWalkerQA gives the
root URL). ``parse_question`` inverts the rendering; it is how the scripted reference agent reads
a question, so the agent never looks at answers or metadata.

Answers are short strings formatted like the page values ("1,240", "$4,200,000", "14 March 2011",
a name); ``expint_jax.rollout.judge`` compares numbers numerically and dates as dates.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
from collections.abc import Sequence
from typing import Any, Literal, get_args

from expint_jax.rollout.envs.base import Task
from expint_jax.rollout.envs.simweb.names import NameRegistry
from expint_jax.rollout.envs.simweb.site import (
    LEVELS,
    RELATIONS,
    Entity,
    Site,
    format_number,
    generate_site,
    with_short_urls,
)
from expint_jax.rollout.judge import parse_number

STYLES = ("lookup", "chain", "compare", "arithmetic")
QUESTION_PREFIX = "According to the {site} website ({root}), "
STYLE_WEIGHTS = {
    "easy": {"lookup": 0.55, "chain": 0.15, "compare": 0.15, "arithmetic": 0.15},
    "medium": {"lookup": 0.45, "chain": 0.25, "compare": 0.15, "arithmetic": 0.15},
    "hard": {"lookup": 0.35, "chain": 0.35, "compare": 0.15, "arithmetic": 0.15},
}
# With near-miss twins on the site, this share of questions is about an entity that has a twin.
_TWIN_TARGET_SHARE = 0.7


@dataclasses.dataclass(frozen=True)
class QuestionForm:
    key: str
    template: str  # names the entities as {a} (and {b})
    kind: str  # the kind of the named entities
    path: tuple[str, ...]  # fact labels followed from the named entity
    combine: str  # lookup | earliest | largest | smallest | sum | difference | gap
    levels: tuple[str, ...] = LEVELS

    @property
    def style(self) -> str:
        if self.combine == "lookup":
            return "lookup" if len(self.path) == 1 else "chain"
        return "compare" if self.combine in ("earliest", "largest", "smallest") else "arithmetic"

    @property
    def source(self) -> str:
        return "single_source" if self.style == "lookup" else "multi_source"

    @property
    def pattern(self) -> re.Pattern[str]:
        body = re.escape(self.template).replace(r"\{a\}", "(?P<a>.+?)").replace(r"\{b\}", "(?P<b>.+?)")
        return re.compile(f"^{body}$", re.IGNORECASE)


def _form(key: str, template: str, kind: str, path: tuple[str, ...], combine: str = "lookup",
          levels: tuple[str, ...] = LEVELS) -> QuestionForm:
    return QuestionForm(key, template, kind, path, combine, levels)


FORMS: tuple[QuestionForm, ...] = (
    _form("org_founded", "In what year was {a} founded?", "organization", ("Founded",)),
    _form("org_headquarters", "In which city is {a} headquartered?", "organization", ("Headquarters",)),
    _form("org_director", "Who is the director of {a}?", "organization", ("Director",)),
    _form("org_staff", "How many staff does {a} employ?", "organization", ("Staff",)),
    _form("org_budget", "What is the annual budget of {a}?", "organization", ("Annual budget",)),
    _form("person_born", "In what year was {a} born?", "person", ("Born",)),
    _form("person_hometown", "What is the hometown of {a}?", "person", ("Hometown",)),
    _form("event_date", "On what date was {a} held?", "event", ("Date",)),
    _form("event_venue", "In which city was {a} held?", "event", ("Venue",)),
    _form("event_organizer", "Which organization organized {a}?", "event", ("Organizer",)),
    _form("event_attendance", "How many people attended {a}?", "event", ("Attendance",)),
    _form("product_released", "In what year was {a} released?", "product", ("Released",)),
    _form("product_maker", "Which organization makes {a}?", "product", ("Maker",)),
    _form("product_price", "What is the price of {a}?", "product", ("Price",)),
    _form("product_units", "How many units of {a} were sold?", "product", ("Units sold",)),
    _form("event_organizer_director", "Who is the director of the organization that organized {a}?", "event",
          ("Organizer", "Director")),
    _form("event_organizer_founded", "In what year was the organization that organized {a} founded?", "event",
          ("Organizer", "Founded")),
    _form("product_maker_headquarters", "In which city is the maker of {a} headquartered?", "product",
          ("Maker", "Headquarters")),
    _form("org_director_born", "In what year was the director of {a} born?", "organization", ("Director", "Born")),
    _form("org_director_hometown", "What is the hometown of the director of {a}?", "organization",
          ("Director", "Hometown")),
    _form("event_organizer_director_born",
          "In what year was the director of the organization that organized {a} born?", "event",
          ("Organizer", "Director", "Born"), levels=("hard",)),
    _form("product_maker_director_hometown",
          "What is the hometown of the director of the organization that makes {a}?", "product",
          ("Maker", "Director", "Hometown"), levels=("hard",)),
    _form("org_founded_earlier", "Which was founded earlier, {a} or {b}?", "organization", ("Founded",), "earliest"),
    _form("person_born_earlier", "Who was born earlier, {a} or {b}?", "person", ("Born",), "earliest"),
    _form("event_larger", "Which event had the larger attendance, {a} or {b}?", "event", ("Attendance",),
          "largest"),
    _form("product_more_units", "Which product sold more units, {a} or {b}?", "product", ("Units sold",),
          "largest"),
    _form("product_cheaper", "Which product is cheaper, {a} or {b}?", "product", ("Price",), "smallest"),
    _form("org_staff_sum", "What is the combined staff of {a} and {b}?", "organization", ("Staff",), "sum"),
    _form("event_attendance_difference", "How many more people attended {a} than {b}?", "event",
          ("Attendance",), "difference"),
    _form("org_founded_gap", "How many years apart were {a} and {b} founded?", "organization", ("Founded",),
          "gap"),
    _form("product_price_sum", "What is the total price of one {a} and one {b}?", "product", ("Price",), "sum"),
)
FORMS_BY_KEY = {form.key: form for form in FORMS}
# Longest literal text first, so "the director of the organization that organized {a}" is tried
# before "the director of {a}" (whose {a} would otherwise swallow the longer phrase).
_FORMS_FOR_PARSING = sorted(FORMS, key=lambda f: -len(re.sub(r"\{[ab]\}", "", f.template)))
_PREFIX = re.compile(r"^According to the (?P<site>.+?) website \((?P<root>https?://[^\s)]+)\), (?P<rest>.+)$", re.S)


def render_question(form: QuestionForm, site: Site, a: str, b: str | None = None) -> str:
    body = form.template.format(a=a, b=b)
    return QUESTION_PREFIX.format(site=site.name, root=site.root_url) + body[0].lower() + body[1:]


@dataclasses.dataclass(frozen=True)
class ParsedQuestion:
    form: QuestionForm
    names: tuple[str, ...]
    site_name: str
    root_url: str


def parse_question(question: str) -> ParsedQuestion | None:
    """The form, entity names and site of a SimWeb question; None if it is not one."""
    prefix = _PREFIX.match(question.strip())
    if not prefix:
        return None
    for form in _FORMS_FOR_PARSING:
        match = form.pattern.match(prefix.group("rest"))
        if match:
            names = tuple(match.group(g) for g in ("a", "b") if g in match.groupdict())
            return ParsedQuestion(form, names, prefix.group("site"), prefix.group("root"))
    return None


def find_question(text: str) -> str | None:
    """The SimWeb question in a message that may carry any other text (injected experience, notes).

    Lines are tried in order (injection appends blocks on lines of their own, so the question's
    line comes first); within a line, its text up to the first ``?`` first (a question ends at its
    only ``?``: entity names have none, so text appended on the question's line is cut off), then
    up to each later ``?``, then the whole line. The first that ``parse_question`` accepts wins;
    None when no part of ``text`` is a SimWeb question.
    """
    for line in (line.strip() for line in text.split("\n")):
        cuts = [line[: m.end()] for m in re.finditer(r"\?", line)]
        for candidate in (*cuts, line):
            if candidate and parse_question(candidate) is not None:
                return candidate
    return None


# ---------------------------------------------------------------------------------------------
# Answers
# ---------------------------------------------------------------------------------------------


def follow(site: Site, start: Entity, path: Sequence[str]) -> tuple[str, list[Entity]]:
    """The value at the end of ``path`` and the entities whose pages hold the facts used."""
    entity, visited = start, [start]
    for label in path[:-1]:
        if label not in RELATIONS:
            raise ValueError(f"fact {label!r} is not a reference and cannot be followed")
        entity = site.entity(entity.value(label))
        visited.append(entity)
    return entity.value(path[-1]), visited


def _number(value: str) -> float:
    number = parse_number(value)
    if number is None:
        raise ValueError(f"SimWeb value {value!r} is not a number")
    return number


def _combine(form: QuestionForm, a: Entity, b: Entity) -> str | None:
    """The answer of a two-entity question, or None when the two values tie."""
    label = form.path[-1]
    x, y = _number(a.value(label)), _number(b.value(label))
    if x == y:
        return None
    if form.combine == "earliest" or form.combine == "smallest":
        return a.name if x < y else b.name
    if form.combine == "largest":
        return a.name if x > y else b.name
    if form.combine == "sum":
        return format_number(label, x + y)
    if form.combine == "difference":  # the question says "more ... {a} than {b}": a is the larger
        return format_number(label, x - y) if x > y else None
    if form.combine == "gap":
        return format_number(label, abs(x - y))
    raise ValueError(f"unknown combine {form.combine!r} in form {form.key!r}")


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


def _golden_path(site: Site, url: str) -> str:
    pages = {p.url: p for p in site.pages}
    titles = []
    page = pages[url]
    while page.parent is not None:
        titles.append(page.title.split(" | ")[0])
        page = pages[page.parent]
    return "->".join(["root"] + titles[::-1])


def _pick(rng: random.Random, entities: list[Entity], count: int, prefer_twinned: bool) -> list[Entity]:
    twinned_names = {e.twin_of for e in entities if e.twin_of}
    twinned = [e for e in entities if e.name in twinned_names or e.twin_of]
    pool = twinned if prefer_twinned and len(twinned) >= count and rng.random() < _TWIN_TARGET_SHARE else entities
    return rng.sample(pool, count)


def draw_task(rng: random.Random, site: Site) -> tuple[str, str, dict[str, Any]] | None:
    """One (question, answer, metadata) about ``site``, or None if the draw gave a tie."""
    weights = STYLE_WEIGHTS[site.level]
    style = rng.choices(STYLES, weights=[weights[s] for s in STYLES])[0]
    form = rng.choice([f for f in FORMS if f.style == style and site.level in f.levels])
    candidates = site.of_kind(form.kind)
    twins = site.level != "easy"
    if style in ("lookup", "chain"):
        (start,) = _pick(rng, candidates, 1, twins)
        answer, used = follow(site, start, form.path)
        names = [start.name]
    else:
        a, b = _pick(rng, candidates, 2, twins)
        if form.combine == "difference" and _number(a.value(form.path[-1])) < _number(b.value(form.path[-1])):
            a, b = b, a
        answer = _combine(form, a, b)
        if answer is None:
            return None
        used, names = [a, b], [a.name, b.name]
    metadata = {
        "level": site.level,
        "source": form.source,
        "style": style,
        "form": form.key,
        "site": site.name,
        "root_url": site.root_url,
        "entities": names,
        "answer_urls": [e.url for e in used],
        "golden_paths": [_golden_path(site, e.url) for e in used],
    }
    if style == "compare":
        metadata["options"] = names
    return render_question(form, site, *names), answer, metadata


def draw_site_tasks(rng: random.Random, site: Site, count: int) -> list[tuple[str, str, dict[str, Any]]]:
    """Up to ``count`` distinct questions about one site."""
    drawn: dict[str, tuple[str, str, dict[str, Any]]] = {}
    for _ in range(20 * count):
        if len(drawn) == count:
            break
        task = draw_task(rng, site)
        if task is not None and task[0] not in drawn:
            drawn[task[0]] = task
    return list(drawn.values())


UrlStyle = Literal["path", "short"]
URL_STYLES: tuple[str, ...] = get_args(UrlStyle)


def generate(
    seed: int, split: str, tasks_per_level: int, levels: Sequence[str], tasks_per_site: int,
    url_style: UrlStyle = "path",
) -> tuple[list[Site], list[Task]]:
    """Sites and tasks of one SimWeb configuration; every site gets its own seeded stream.

    ``url_style``: ``"path"`` (URLs spell the site's and the page's names) or ``"short"``
    (``site.with_short_urls``: the same sites and questions, URLs numbered by site and page)."""
    for level in levels:
        if level not in LEVELS:
            raise ValueError(f"SimWeb level must be one of {LEVELS}, got {level!r}")
    if url_style not in URL_STYLES:
        raise ValueError(f"SimWeb url_style must be one of {URL_STYLES}, got {url_style!r}")
    if tasks_per_level < 1 or tasks_per_site < 1:
        raise ValueError(f"tasks_per_level and tasks_per_site must be >= 1, got {tasks_per_level}, {tasks_per_site}")
    names = NameRegistry()
    sites: list[Site] = []
    tasks: list[Task] = []
    for level in levels:
        drawn: list[tuple[str, str, dict[str, Any]]] = []
        for index in range(math.ceil(tasks_per_level / tasks_per_site) * 4):
            if len(drawn) >= tasks_per_level:
                break
            rng = random.Random(f"simweb:{seed}:{split}:{level}:{index}")
            site = generate_site(rng, level, names)
            if url_style == "short":
                site = with_short_urls(site, len(sites))
            sites.append(site)
            drawn += draw_site_tasks(rng, site, min(tasks_per_site, tasks_per_level - len(drawn)))
        for i, (question, answer, metadata) in enumerate(drawn):
            tasks.append(Task(f"simweb-{split}-{seed}-{level}-{i:05d}", question, answer, metadata))
    return sites, tasks
