"""SimWeb sites: records (pages, links, entities, facts) and the seeded site generator.

A site has a root page, one directory ("section") page per entity kind, item pages that state an
entity's facts as ``- Label: value`` lines, and news pages with near-miss facts. The level sets how
hard it is to reach an item page:

* ``easy``   -- every page is in the search index, so searching an entity's name finds its page;
* ``medium`` -- item pages are not indexed: search finds the section page that lists the entity,
                and near-miss "twin" entities (one word of the name swapped, nearby facts) exist;
* ``hard``   -- like medium, but each section splits its entries alphabetically into sub-directory
                pages that are not indexed and do not name the entities on the section page, so
                the agent must walk root -> section -> letter range -> item.

Contract: ``generate_site(rng, level, names)`` draws only from ``rng`` and ``names``, so the same
seed gives byte-identical sites (``Site.to_json``) in every process. ``with_short_urls(site, n)``
renames every URL of a finished site to a short one (``https://s<n>.example.org/<i>``, directories
keeping their trailing ``/``) and changes nothing else: the same site for an agent that copies
20-token URLs poorly (the model organism, ``SimWebConfig.url_style="short"``).
"""

from __future__ import annotations

import dataclasses
import datetime
import random
from typing import Any

from expint_jax.rollout.envs.simweb.names import (
    FIRST_NAMES,
    SEASONS,
    THEMES,
    NameRegistry,
    Theme,
    city_name,
    event_name,
    organization_name,
    person_name,
    product_name,
    root_word,
    slugify,
    swap_one_word,
)

LEVELS = ("easy", "medium", "hard")
KINDS = ("organization", "person", "event", "product")
SECTION_TITLES = {"organization": "Organizations", "person": "People", "event": "Events", "product": "Products"}
SECTION_SLUGS = {"organization": "organizations", "person": "people", "event": "events", "product": "products"}
# Facts whose value names another entity on the same site, and the kind of that entity.
RELATIONS = {"Director": "person", "Organizer": "organization", "Maker": "organization"}
ROLES = ("root", "section", "bucket", "item", "news")

_COUNTS = {"organization": 5, "person": 8, "event": 5, "product": 5}  # people: 5 directors + 3 others
_TWINS_PER_KIND = 2
_NEWS_PER_SITE = 3
_BUCKETS = 3
_MONTH_NAMES = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
                "October", "November", "December")


@dataclasses.dataclass(frozen=True)
class Link:
    title: str
    url: str


@dataclasses.dataclass(frozen=True)
class Page:
    url: str
    title: str
    text: str
    links: tuple[Link, ...]
    indexed: bool  # whether the search engine knows this page
    role: str  # one of ROLES
    parent: str | None  # the directory page that links here (None for the root)

    def to_json(self) -> dict[str, Any]:
        return {"url": self.url, "title": self.title, "text": self.text, "role": self.role,
                "indexed": self.indexed, "parent": self.parent,
                "links": [[link.title, link.url] for link in self.links]}


@dataclasses.dataclass(frozen=True)
class Fact:
    label: str
    value: str  # as displayed on the page ("1,240", "$4,200,000", "14 March 2011", a name)
    ref: str | None = None  # for RELATIONS: the name of the entity the value refers to


@dataclasses.dataclass(frozen=True)
class Entity:
    kind: str
    name: str
    url: str
    facts: tuple[Fact, ...]
    twin_of: str | None = None  # the entity this near-miss twin imitates

    def value(self, label: str) -> str:
        for fact in self.facts:
            if fact.label == label:
                return fact.value
        raise KeyError(f"entity {self.name!r} ({self.kind}) has no fact {label!r}")

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "url": self.url, "twin_of": self.twin_of,
                "facts": [[f.label, f.value, f.ref] for f in self.facts]}


@dataclasses.dataclass(frozen=True)
class Site:
    name: str
    root_url: str
    level: str
    theme: str
    pages: tuple[Page, ...]
    entities: tuple[Entity, ...]

    def entity(self, name: str) -> Entity:
        for entity in self.entities:
            if entity.name == name:
                return entity
        raise KeyError(f"site {self.name!r} has no entity {name!r}")

    def of_kind(self, kind: str) -> list[Entity]:
        return [e for e in self.entities if e.kind == kind]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "root_url": self.root_url, "level": self.level, "theme": self.theme,
                "pages": [p.to_json() for p in self.pages], "entities": [e.to_json() for e in self.entities]}


def with_short_urls(site: Site, number: int) -> Site:
    """``site`` with every URL renamed to ``https://s<number>.example.org/<page index>`` (see the module docstring)."""
    root = f"https://s{number}.example.org/"
    renamed = {site.root_url: root}
    for index, page in enumerate(site.pages):
        if page.url != site.root_url:
            renamed[page.url] = f"{root}{index}/" if page.url.endswith("/") else f"{root}{index}"

    def link(old: Link) -> Link:
        return Link(old.title, renamed[old.url])

    pages = tuple(dataclasses.replace(page, url=renamed[page.url], links=tuple(map(link, page.links)),
                                      parent=None if page.parent is None else renamed[page.parent])
                  for page in site.pages)
    entities = tuple(dataclasses.replace(entity, url=renamed[entity.url]) for entity in site.entities)
    return dataclasses.replace(site, root_url=root, pages=pages, entities=entities)


# ---------------------------------------------------------------------------------------------
# Fact values
# ---------------------------------------------------------------------------------------------


YEAR_LABELS = ("Founded", "Born", "Released")


def format_number(label: str, number: float) -> str:
    """A numeric value as pages show it: "$1,249.99" prices, "$4,200,000" budgets, "1,240" counts,
    plain years (and spans of years)."""
    if label == "Price":
        cents = round(number * 100)
        return f"${cents // 100:,}.{cents % 100:02d}"
    if label == "Annual budget":
        return f"${round(number):,}"
    if label in YEAR_LABELS:
        return str(round(number))
    return f"{round(number):,}"


def _date(day: datetime.date) -> str:
    return f"{day.day} {_MONTH_NAMES[day.month - 1]} {day.year}"


def _near(rng: random.Random, value: int, low: int, high: int) -> int:
    """A different integer within ``[value - high, value + high]`` but at least ``low`` away."""
    return value + rng.choice((-1, 1)) * rng.randint(low, high)


def _near_count(rng: random.Random, value: int) -> int:
    return max(1, value + rng.choice((-1, 1)) * max(1, int(value * rng.uniform(0.08, 0.3))))


def _random_date(rng: random.Random, first_year: int, last_year: int) -> datetime.date:
    start = datetime.date(first_year, 1, 1).toordinal()
    return datetime.date.fromordinal(rng.randint(start, datetime.date(last_year, 12, 31).toordinal()))


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Draft:
    """An entity while its site is being built (facts still mutable)."""

    kind: str
    name: str
    facts: dict[str, Fact]
    twin_of: str | None = None


def generate_site(rng: random.Random, level: str, names: NameRegistry) -> Site:
    """One site of the given level; see the module docstring."""
    if level not in LEVELS:
        raise ValueError(f"SimWeb level must be one of {LEVELS}, got {level!r}")
    theme = rng.choice(THEMES)
    region = rng.choice(("Valley", "Coast", "Highlands", "Bay", "Plains", "Lakes"))
    site_name = names.claim(lambda: f"{root_word(rng)} {region} {theme.noun}")
    root_url = f"https://{slugify(site_name)}.example.org/"
    cities = [names.claim(lambda: city_name(rng)) for _ in range(4)]
    drafts = _draft_entities(rng, theme, cities, names)
    if level != "easy":
        drafts += _draft_twins(rng, theme, cities, drafts, names)
    urls = {d.name: f"{root_url}{SECTION_SLUGS[d.kind]}/{slugify(d.name)}.html" for d in drafts}
    entities = tuple(
        Entity(d.kind, d.name, urls[d.name], tuple(d.facts.values()), d.twin_of)
        for d in sorted(drafts, key=lambda d: (KINDS.index(d.kind), d.name))
    )
    pages = _build_pages(rng, site_name, root_url, level, theme, entities)
    return Site(site_name, root_url, level, theme.noun, pages, entities)


def _draft_entities(rng: random.Random, theme: Theme, cities: list[str], names: NameRegistry) -> list[_Draft]:
    orgs = [names.claim(lambda: organization_name(rng, theme)) for _ in range(_COUNTS["organization"])]
    people = [names.claim(lambda: person_name(rng)) for _ in range(_COUNTS["person"])]
    events = [names.claim(lambda: event_name(rng, theme)) for _ in range(_COUNTS["event"])]
    products = [names.claim(lambda: product_name(rng, theme)) for _ in range(_COUNTS["product"])]
    directors = dict(zip(orgs, people, strict=False))
    drafts = []
    for org in orgs:
        drafts.append(_Draft("organization", org, {
            "Founded": Fact("Founded", str(rng.randint(1890, 2015))),
            "Headquarters": Fact("Headquarters", rng.choice(cities)),
            "Director": Fact("Director", directors[org], ref=directors[org]),
            "Staff": Fact("Staff", format_number("Staff", rng.randint(8, 4800))),
            "Annual budget": Fact("Annual budget", format_number("Annual budget", 1000 * rng.randint(40, 90000))),
        }))
    led = {person: org for org, person in directors.items()}
    for person in people:
        role = Fact("Role", f"Director of {led[person]}", ref=led[person]) if person in led \
            else Fact("Role", rng.choice(theme.roles))
        drafts.append(_Draft("person", person, {
            "Born": Fact("Born", str(rng.randint(1938, 1996))),
            "Hometown": Fact("Hometown", rng.choice(cities)),
            "Role": role,
        }))
    for event in events:
        organizer = rng.choice(orgs)
        drafts.append(_Draft("event", event, {
            "Date": Fact("Date", _date(_random_date(rng, 1988, 2023))),
            "Venue": Fact("Venue", rng.choice(cities)),
            "Organizer": Fact("Organizer", organizer, ref=organizer),
            "Attendance": Fact("Attendance", format_number("Attendance", rng.randint(40, 60000))),
        }))
    for product in products:
        maker = rng.choice(orgs)
        drafts.append(_Draft("product", product, {
            "Released": Fact("Released", str(rng.randint(1985, 2023))),
            "Maker": Fact("Maker", maker, ref=maker),
            "Price": Fact("Price", format_number("Price", rng.randint(5, 2400) + rng.choice((0, 50, 95, 99)) / 100)),
            "Units sold": Fact("Units sold", format_number("Units sold", rng.randint(120, 900000))),
        }))
    return drafts


def _draft_twins(
    rng: random.Random, theme: Theme, cities: list[str], drafts: list[_Draft], names: NameRegistry
) -> list[_Draft]:
    """Near-miss entities: one word of the name swapped, every fact slightly different."""
    by_kind = {kind: [d for d in drafts if d.kind == kind] for kind in KINDS}
    orgs = [d.name for d in by_kind["organization"]]
    swaps = {
        "organization": (2, theme.org_types),
        "person": (0, FIRST_NAMES),
        "event": (1, SEASONS),
        "product": (1, theme.product_models),
    }
    free_people = [d for d in by_kind["person"] if d.facts["Role"].ref is None]
    twins = []
    for kind in KINDS:
        for original in rng.sample(by_kind[kind], _TWINS_PER_KIND):
            position, choices = swaps[kind]
            name = names.claim(lambda: swap_one_word(rng, original.name, position, choices))
            facts = {label: _perturb(rng, fact, cities, orgs, theme) for label, fact in original.facts.items()}
            if kind == "organization":  # a twin is led by someone who leads nothing else, and says so
                director = free_people.pop(rng.randrange(len(free_people)))
                facts["Director"] = Fact("Director", director.name, ref=director.name)
                director.facts["Role"] = Fact("Role", f"Director of {name}", ref=name)
            twins.append(_Draft(kind, name, facts, twin_of=original.name))
    return twins


def _perturb(rng: random.Random, fact: Fact, cities: list[str], orgs: list[str], theme: Theme) -> Fact:
    label, value = fact.label, fact.value
    if label in YEAR_LABELS:
        return Fact(label, str(_near(rng, int(value), 1, 6)))
    if label in ("Headquarters", "Hometown", "Venue"):
        return Fact(label, rng.choice([c for c in cities if c != value]))
    if label in ("Staff", "Attendance", "Units sold"):
        return Fact(label, format_number(label, _near_count(rng, int(value.replace(",", "")))))
    if label == "Annual budget":
        thousands = _near_count(rng, int(value[1:].replace(",", "")) // 1000)
        return Fact(label, format_number(label, 1000 * thousands))
    if label == "Price":
        cents = int(value[1:].replace(",", "").replace(".", ""))
        return Fact(label, format_number(label, max(100, cents + rng.choice((-1, 1)) * 100 * rng.randint(1, 40)) / 100))
    if label == "Date":
        day = datetime.datetime.strptime(value, "%d %B %Y").date()
        return Fact(label, _date(day + datetime.timedelta(days=rng.choice((-1, 1)) * rng.randint(3, 400))))
    if label == "Director":  # replaced by the caller: twins get a director of their own
        return fact
    if label in ("Organizer", "Maker"):
        other = rng.choice([o for o in orgs if o != fact.ref])
        return Fact(label, other, ref=other)
    if label == "Role":  # a twin directs nothing
        return Fact(label, rng.choice(theme.roles))
    raise ValueError(f"no perturbation rule for fact {label!r}")


# ---------------------------------------------------------------------------------------------
# Pages
# ---------------------------------------------------------------------------------------------


def _build_pages(
    rng: random.Random, site_name: str, root_url: str, level: str, theme: Theme, entities: tuple[Entity, ...]
) -> tuple[Page, ...]:
    items_indexed = level == "easy"
    root = Link(site_name, root_url)
    news_url = f"{root_url}news/"
    news_link = Link(f"News | {site_name}", news_url)
    section_links = {kind: Link(f"{SECTION_TITLES[kind]} | {site_name}", f"{root_url}{SECTION_SLUGS[kind]}/")
                     for kind in KINDS}
    pages = [Page(
        root_url, site_name,
        f"Welcome to the {site_name}, {_article(theme.noun)} {theme.noun.lower()} of {theme.fields[0].lower()}, "
        f"{theme.fields[1].lower()} and {theme.fields[2].lower()} groups. "
        f"Browse its sections: {', '.join(SECTION_TITLES[k] for k in KINDS)} and News.",
        tuple(section_links[k] for k in KINDS) + (news_link,), True, "root", None,
    )]
    parent_of: dict[str, Link] = {}
    by_name = {e.name: e for e in entities}
    for kind in KINDS:
        members = [e for e in entities if e.kind == kind]
        section = section_links[kind]
        plural = SECTION_TITLES[kind].lower()
        if level == "hard":
            buckets = _alphabetical_buckets(members)
            bucket_links = []
            for first, last, group in buckets:
                letters = first if first == last else f"{first}–{last}"
                link = Link(f"{SECTION_TITLES[kind]} {letters} | {site_name}",
                            f"{section.url}{first.lower()}-{last.lower()}/")
                bucket_links.append(link)
                pages.append(Page(
                    link.url, link.title,
                    f"{SECTION_TITLES[kind]} of the {site_name} whose names start with "
                    f"{first if first == last else f'{first} to {last}'}: "
                    + "; ".join(e.name for e in group) + ".",
                    (root, section) + tuple(Link(e.name, e.url) for e in group), False, "bucket", section.url,
                ))
                parent_of.update({e.name: link for e in group})
            ranges = ", ".join(first if first == last else f"{first}–{last}" for first, last, _ in buckets)
            pages.append(Page(
                section.url, section.title,
                f"Browse the {len(members)} {plural} of the {site_name} alphabetically: {ranges}.",
                (root,) + tuple(bucket_links), True, "section", root_url,
            ))
        else:
            pages.append(Page(
                section.url, section.title,
                f"Directory of the {plural} listed by the {site_name}: " + "; ".join(e.name for e in members) + ".",
                (root,) + tuple(Link(e.name, e.url) for e in members), True, "section", root_url,
            ))
            parent_of.update({e.name: section for e in members})
    for entity in entities:
        parent = parent_of[entity.name]
        related = [Link(f.ref, by_name[f.ref].url) for f in entity.facts if f.ref is not None]
        related += [Link(e.name, e.url) for e in entities
                    if any(f.ref == entity.name and f.label != "Director" for f in e.facts)]
        links = (root, parent) + tuple(dict.fromkeys(related))
        pages.append(Page(entity.url, entity.name, _item_text(rng, entity, site_name), links,
                          items_indexed, "item", parent.url))
    news = _news_pages(rng, site_name, root_url, entities, news_link)
    pages.append(Page(news_url, news_link.title,
                      f"Latest news from the {site_name}: " + "; ".join(p.title for p in news) + ".",
                      (root,) + tuple(Link(p.title, p.url) for p in news), True, "section", root_url))
    pages.extend(news)
    return tuple(pages)


def _article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def _alphabetical_buckets(members: list[Entity]) -> list[tuple[str, str, list[Entity]]]:
    """Up to ``_BUCKETS`` contiguous letter ranges; entries sharing an initial stay together."""
    by_initial: dict[str, list[Entity]] = {}
    for entity in sorted(members, key=lambda e: e.name):
        by_initial.setdefault(entity.name[0].upper(), []).append(entity)
    initials = sorted(by_initial)
    target = max(1, -(-len(members) // _BUCKETS))
    buckets: list[list[str]] = [[]]
    for initial in initials:
        if buckets[-1] and sum(len(by_initial[i]) for i in buckets[-1]) >= target:
            buckets.append([])
        buckets[-1].append(initial)
    return [(group[0], group[-1], [e for i in group for e in by_initial[i]]) for group in buckets]


_DESCRIPTIONS = {
    "organization": "{name} is a member organization of the {site}.",
    "person": "{name} is part of the {site} community.",
    "event": "{name} is an event in the calendar of the {site}.",
    "product": "{name} is a product in the catalogue of the {site}.",
}


def _item_text(rng: random.Random, entity: Entity, site_name: str) -> str:
    facts = "\n".join(f"- {f.label}: {f.value}" for f in entity.facts)
    return (f"{_DESCRIPTIONS[entity.kind].format(name=entity.name, site=site_name)}\n\n"
            f"Key facts:\n{facts}\n\n{_background(rng, entity)}")


def _background(rng: random.Random, entity: Entity) -> str:
    """A sentence with a near-miss fact: true, but not the answer to the obvious question."""
    if entity.kind == "organization":
        year = int(entity.value("Founded")) - rng.randint(2, 9)
        return f"An informal study group that later grew into {entity.name} first met in {year}."
    if entity.kind == "person":
        return f"{entity.name.split()[0]} spent several years working abroad before returning to the region."
    if entity.kind == "event":
        expected = _near_count(rng, int(entity.value("Attendance").replace(",", "")))
        return f"Before the event, organizers had planned for about {expected:,} visitors."
    year = int(entity.value("Released")) - rng.randint(1, 4)
    return f"A first prototype of {entity.name} was demonstrated in {year}."


def _news_pages(
    rng: random.Random, site_name: str, root_url: str, entities: tuple[Entity, ...], news_link: Link
) -> list[Page]:
    subjects = rng.sample([e for e in entities if e.kind != "person"], _NEWS_PER_SITE)
    pages = []
    for subject in subjects:
        if subject.kind == "organization":
            title = f"{subject.name} celebrates its roots"
            first = (f"{subject.name} marked the anniversary of the study group that preceded it, first "
                     f"convened in {int(subject.value('Founded')) - rng.randint(2, 9)}.")
        elif subject.kind == "event":
            title = f"Preview of {subject.name} draws a crowd"
            preview = _near_count(rng, int(subject.value("Attendance").replace(",", "")) // 3)
            first = f"A preview evening for {subject.name} drew {preview:,} visitors, organizers said."
        else:
            title = f"{subject.name} prototype shown"
            first = (f"An early prototype of {subject.name} was shown in "
                     f"{int(subject.value('Released')) - rng.randint(1, 4)}.")
        url = f"{root_url}news/{slugify(title)}.html"
        text = f"{first} The full record is kept in the directories of the {site_name}."
        pages.append(Page(url, title, text, (Link(site_name, root_url), news_link), True, "news", news_link.url))
    return pages
