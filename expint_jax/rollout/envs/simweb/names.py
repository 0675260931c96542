"""Procedural names for SimWeb: places, people, organizations, events, products and site themes.

Contract: every function draws only from the ``random.Random`` it is given, so a seeded generator
gives the same names in every process. ``NameRegistry`` keeps names unique across a whole world
(case-insensitive); near-miss "twins" are built by swapping exactly one word of a name, so a twin
never contains the original as a token run (a contained name would pass substring matching).
"""

from __future__ import annotations

import dataclasses
import random
import re

_ONSETS = ("b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "cl", "dr", "gr", "st", "tr", "th", "sh", "fr", "pl")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ea", "ou")
_CODAS = ("", "", "l", "n", "r", "s", "m", "rd", "nt", "st", "x", "ck")
_CITY_SUFFIXES = ("ton", "ford", "haven", "mere", "wick", "stead", "field", "bury", "dale", "mouth")
_SURNAME_SUFFIXES = ("son", "berg", "ley", "ov", "ini", "ez", "quist", "mann", "ard", "ell", "worth", "ani")
FIRST_NAMES = (
    "Ada", "Adele", "Alma", "Anton", "Bea", "Bruno", "Carla", "Cyril", "Dara", "Dmitri", "Edda", "Elias",
    "Flora", "Felix", "Greta", "Gideon", "Hana", "Hugo", "Ines", "Ivo", "Jana", "Jonas", "Kira", "Kofi",
    "Lena", "Leon", "Mara", "Milo", "Nadia", "Nico", "Olga", "Omar", "Petra", "Pavel", "Rosa", "Ravi",
    "Sofia", "Soren", "Talia", "Tomas", "Uma", "Ulric", "Vera", "Viktor", "Wanda", "Wim", "Yara", "Yusuf",
    "Zora", "Zeno",
)
SEASONS = ("Winter", "Spring", "Summer", "Autumn", "Harbour", "Northern", "Grand", "Twilight")


@dataclasses.dataclass(frozen=True)
class Theme:
    """The vocabulary of one kind of site."""

    noun: str  # "Science Network" -> site "Kessa Valley Science Network"
    fields: tuple[str, ...]
    org_types: tuple[str, ...]
    event_types: tuple[str, ...]
    product_models: tuple[str, ...]
    roles: tuple[str, ...]  # positions of people who direct nothing


THEMES = (
    Theme("Science Network", ("Robotics", "Genomics", "Optics", "Materials", "Climate", "Neuroscience"),
          ("Institute", "Laboratory", "Society", "Foundation", "Centre"),
          ("Symposium", "Conference", "Workshop", "Forum"),
          ("Aero", "Pulse", "Vector", "Quanta", "Prism", "Nova"),
          ("Chief Scientist", "Lab Manager", "Research Fellow")),
    Theme("Arts Council", ("Theatre", "Dance", "Film", "Sculpture", "Choral", "Print"),
          ("Company", "Collective", "Guild", "Academy", "Trust"),
          ("Festival", "Biennale", "Showcase", "Gala"),
          ("Easel", "Canvas", "Aria", "Folio", "Lumen", "Tempo"),
          ("Curator", "Programme Manager", "Resident Artist")),
    Theme("Sports League", ("Rowing", "Cycling", "Fencing", "Climbing", "Sailing", "Athletics"),
          ("Club", "Association", "Federation", "Union", "Academy"),
          ("Regatta", "Cup", "Championship", "Games"),
          ("Stride", "Apex", "Glide", "Sprint", "Summit", "Torque"),
          ("Head Coach", "Team Physician", "Club Secretary")),
    Theme("Trade Association", ("Textile", "Shipping", "Timber", "Coffee", "Ceramics", "Printing"),
          ("Company", "Cooperative", "Works", "Guild", "Bureau"),
          ("Fair", "Expo", "Market", "Summit"),
          ("Loom", "Crest", "Keystone", "Mariner", "Forge", "Anchor"),
          ("Chief Buyer", "Treasurer", "Logistics Lead")),
)


def root_word(rng: random.Random) -> str:
    """A pronounceable invented word such as "Kessa" or "Drommel"."""
    syllables = rng.choice((1, 2, 2, 2))
    word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)) + rng.choice(_CODAS)
    return word.capitalize()


def city_name(rng: random.Random) -> str:
    root = root_word(rng)
    form = rng.randrange(4)
    if form == 0:
        return f"Port {root}"
    if form == 1:
        return f"{root} Falls"
    return root + rng.choice(_CITY_SUFFIXES)


def person_name(rng: random.Random) -> str:
    return f"{rng.choice(FIRST_NAMES)} {root_word(rng)}{rng.choice(_SURNAME_SUFFIXES)}"


def organization_name(rng: random.Random, theme: Theme) -> str:
    return f"{root_word(rng)} {rng.choice(theme.fields)} {rng.choice(theme.org_types)}"


def event_name(rng: random.Random, theme: Theme) -> str:
    return f"{root_word(rng)} {rng.choice(SEASONS)} {rng.choice(theme.event_types)}"


def product_name(rng: random.Random, theme: Theme) -> str:
    return f"{root_word(rng)} {rng.choice(theme.product_models)}"


def slugify(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


class NameRegistry:
    """Hands out names that are unique within one world (case-insensitive)."""

    def __init__(self) -> None:
        self._taken: set[str] = set()

    def claim(self, make, attempts: int = 200) -> str:
        """Calls ``make()`` until it returns a free name, then reserves it."""
        for _ in range(attempts):
            name = make()
            if name.lower() not in self._taken:
                self._taken.add(name.lower())
                return name
        raise RuntimeError(f"could not find a free name after {attempts} attempts (last: {name!r})")


def swap_one_word(rng: random.Random, name: str, position: int, choices: tuple[str, ...]) -> str:
    """``name`` with the word at ``position`` replaced by a different word from ``choices``."""
    words = name.split()
    alternatives = [c for c in choices if c != words[position]]
    words[position] = rng.choice(alternatives)
    return " ".join(words)


def is_near_miss(candidate: str, name: str) -> bool:
    """Same number of words as ``name`` and exactly one of them different."""
    a, b = candidate.split(), name.split()
    return len(a) == len(b) and sum(x != y for x, y in zip(a, b, strict=True)) == 1
