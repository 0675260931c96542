"""How concrete a pool is: the paper's granularity statistics, by transparent text heuristics.

For each item, four yes/no features; a report gives the share of items with each one. The paper
reports 74.4 % URLs/domains, 57.3 % numbers, 93.9 % entities and 3.7 % strategy statements for
instance-level pools, and 84.0 % strategy statements for principle-level pools. Its detector is
not published; these are ours, so compare pools measured here with each other, and the paper's
figures only as a rough scale.

Heuristics (an item may have several features):
  * url: ``http(s)://...``, ``www.``, or a bare domain: dot-separated labels ending in a
    lower-case top-level label of 2 to 24 letters (``jetcraft.com``, ``en.wikipedia.org``,
    ``ciga.me``, ``sandbox.game``, ``www2.scut.edu.cn/cs``). Any such label counts, since new
    TLDs keep appearing; what looks like a domain but is not is excluded: a last label that is a
    common file extension (``page.html``, ``notes.md``, ``Node.js``; the file reading wins where
    the extension is also a TLD, as ``.md`` and ``.py`` are), one followed by a call's
    parenthesis (``os.path.join(...)``), or capitalized (a missing space: ``found.The``);
    abbreviations (``e.g.``, ``i.e.``, ``U.S.``) and version numbers (``v1.2.3``) never match,
    having one-letter or numeric labels. A dotted code name without parentheses (``np.array``)
    still counts as a domain.
  * number: a digit anywhere outside URLs (years, counts, prices, ordinals like ``11th``).
    Number words ("two sources") are generic and do not count.
  * entity: outside URLs, any of
      - a capitalized word that does not start a sentence (after ``.``, ``!``, ``?``, ``:``,
        ``;``, a line break, or the item start): proper nouns and multi-word names. An item's
        leading ``Label:`` (up to six words before a colon, the release's naming convention)
        counts as a sentence of its own, so the capitalized word after it starts a sentence.
        The pronoun "I" and format acronyms (URL, PDF, HTML, API, JSON, ID, FAQ, CSV) do not count;
      - a quoted string of two or more characters ("...", '...', “...”, ‘...’, `...`);
      - an identifier mixing letters and digits (``Q42``, ``A320``), ordinals (``11th``) aside.
  * strategy: some sentence (label removed) gives advice, in any of the shapes people write it:
      - a conditional opening -- When, Whenever, If, Once, Before, After, While, Unless, Upon,
        In case, As soon as -- followed later by a comma (the "When [condition], [strategy]" rule);
      - an imperative: the sentence, or its main clause after a leading scope or purpose clause
        ("For date questions, ...", "To find a role, ...", "Rather than guessing, ...", "Instead
        of ..., ..."), opens with a verb of ``IMPERATIVE_VERBS`` in its base form, possibly after
        an adverb or a negation ("Always verify", "Never trust", "Do not infer", "First locate").
        A verb that is also a noun does not count when the next word shows the noun ("Search
        results show ...", "Use of the archive ...", "Report is ...");
      - a modal instruction: should, must, ought to, need(s) to, has/have to followed by such a
        verb ("The agent should verify ..."), or "it is better/best/important/... to";
      - a gerund with its benefit: "Verifying each hop prevents ..." (helps, avoids, prevents,
        ensures, improves, reduces, saves, catches; "is key/essential/safer ...").
    Statements of fact, reports of what happened and pointers ("See the 11th edition.", "Stanford
    lists it.", "Searching 'acme history' finds the about page.") are not strategies. The
    release's principle-level example pool scores 100 % (every item is an imperative or a
    conditional); the hand-labelled cases in the tests hold the rest of the contract.

Where reports go: ``expint granularity POOL...`` prints them; ``bank.write_pool_files`` stores a
pool's as ``granularity.json`` beside it (the loop: ``iter_<k>/extract/``); the extraction
pipeline adds the final pool's to its ``stats.json``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from expint_jax import storage


_FILE_EXTENSIONS = ("html?|xhtml|php|aspx?|jsp|cgi|pdf|txt|csv|tsv|jsonl?|xml|ya?ml|toml|ini|cfg|md|rst|tex|py|ipynb|"
                    "js|ts|css|sh|rb|rs|go|java|cpp|docx?|xlsx?|pptx?|odt|png|jpe?g|gif|svg|webp|bmp|mp[34]|wav|"
                    "zip|gz|tgz|tar|rar|exe|dmg|bin|log|bak|tmp|db|sqlite")
# ASCII-only neighbours: in Chinese prose a domain is often written with no space around it.
_DOMAIN = (r"(?<![A-Za-z0-9_.-])(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+"
           rf"(?!(?:{_FILE_EXTENSIONS})(?![a-z]))[a-z]{{2,24}}(?![A-Za-z0-9_-]|\.?[A-Za-z0-9_.-]*\()(?:/\S*)?")
_URL = re.compile(rf"(?i:https?://\S+|\bwww\.\S+)|{_DOMAIN}")
_DIGIT = re.compile(r"\d")
_LABEL = re.compile(r"^\s*[^\s:.!?][^:.!?\n]{0,60}?:\s+")
_SENTENCE_BREAK = re.compile(r"(?<=[.!?:;])\s+|\n+")
_WORD = re.compile(r"[^\W\d_][\w'’-]*", re.UNICODE)
_QUOTED = re.compile(r"\"[^\"\n]{2,}\"|“[^”\n]{2,}”|‘[^’\n]{2,}’|`[^`\n]{2,}`|(?<!\w)'[^'\n]{2,}'(?!\w)")
_IDENTIFIER = re.compile(r"\b(?!\d+(?:st|nd|rd|th)\b)(?=[A-Za-z0-9]*[A-Za-z])(?=[A-Za-z0-9]*\d)[A-Za-z0-9]{2,}\b")
_CONDITIONAL = re.compile(r"^[\"'“(]*(?:when|whenever|if|once|before|after|while|unless|upon|in case|as soon as)\b"
                          r"[^,]*\S,", re.IGNORECASE)
_GENERIC_CAPITALS = frozenset({"I", "URL", "URLs", "PDF", "HTML", "API", "JSON", "ID", "IDs", "FAQ", "CSV"})

# Verbs that open advice in agent lessons (base form). "See", "answer", "plan" and "record" are left
# out: as first words they are mostly pointers or nouns ("See the 11th edition.", "Answer found.").
IMPERATIVE_VERBS = frozenset("""
    abandon accept account adapt add adjust align allocate anchor apply ask assume attempt avoid base be break
    browse broaden budget calculate call cap capture check choose cite clarify click collect combine compare
    compute confirm consider consult construct continue convert correct count cross-check cross-reference decompose
    default defer derive describe determine disambiguate discard distinguish divide do document double-check drop
    ensure escalate establish estimate exclude expand explore extract fall favor favour filter find finish flag
    focus follow form formulate frame gather give go handle identify ignore include infer inspect interpret
    interrogate investigate isolate keep label leave limit list locate look make map match mirror move narrow
    navigate note obtain open parse persist pick pivot plan prefer prepare preserve prioritize prioritise probe
    proceed provide prune pursue query question quote re-check re-run read reason recheck reconcile reconsider
    refine reformulate reject rely remember repeat rephrase report request rerun reserve resolve restate restrict
    retry return reuse review revise revisit rewrite scan scope scroll search seek select separate settle show
    simplify skim skip sort specify split start state stay stick stop structure summarize summarise supplement
    switch synthesize take target test track translate treat trust try use validate verify visit weigh write
""".split()) - {"plan"}
_LEADING_ADVERBS = frozenset({"always", "never", "first", "then", "next", "finally", "only", "also", "just", "still",
                              "carefully", "explicitly", "directly", "systematically", "consistently", "proactively",
                              "immediately", "quickly", "actively", "instead", "please", "do", "don't", "dont", "not"})
# Verbs that are also nouns ("Search results show ...", "Use of the archive ...") and the next words
# that show the noun.
_ALSO_NOUNS = frozenset({"search", "query", "report", "use", "list", "count", "start", "return", "test", "note",
                         "map", "call", "check", "match", "filter", "track", "visit", "review", "state", "label",
                         "sort", "scan", "quote", "show", "cap", "scope", "focus", "structure", "form"})
_NOUN_MARKERS = frozenset({"of", "is", "are", "was", "were", "has", "have", "had", "can", "could", "will", "would",
                           "may", "might", "results", "result", "engine", "engines", "bar", "box", "page", "pages",
                           "date", "dates", "value", "values", "data", "history", "terms", "queries", "time",
                           "times", "rate", "list", "lists", "count"})
_SCOPE_OPENING = re.compile(r"^[\"'“(]*(?:for|to|in|on|with|without|rather than|instead of|during|given|"
                            r"throughout|across)\b[^,]{1,120},\s*", re.IGNORECASE)
_MODAL = re.compile(r"\b(?:should|must|ought to|needs? to|has to|have to)\s+(?:not\s+|always\s+|never\s+|first\s+|"
                    r"also\s+)?(?P<verb>[a-z][a-z-]*)", re.IGNORECASE)
_NORMATIVE = re.compile(r"\bit(?:'s|’s| is) (?:better|best|safer|important|essential|crucial|advisable|necessary|"
                        r"wise|worth)\b", re.IGNORECASE)
_BENEFIT = re.compile(r"\b(?:helps?|avoids?|prevents?|ensures?|improves?|reduces?|saves?|catches|guards? against|"
                      r"pays off|works better|is (?:key|essential|crucial|important|necessary|more reliable|safer|"
                      r"faster|better|the best))\b", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class ItemFeatures:
    url: bool
    number: bool
    entity: bool
    strategy: bool


def _label_and_body(text: str) -> str:
    match = _LABEL.match(text)
    if match and len(match.group(0).split()) <= 6:
        return text[match.end():]
    return text


def _sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_BREAK.split(text) if s.strip()]


def _has_entity(prose: str) -> bool:
    if _QUOTED.search(prose) or _IDENTIFIER.search(prose):
        return True
    for sentence in _sentences(prose):
        words = _WORD.findall(sentence)
        if any(w[0].isupper() and w not in _GENERIC_CAPITALS for w in words[1:]):
            return True
    return False


def item_features(text: str) -> ItemFeatures:
    prose = _URL.sub(" ", text)
    body = _label_and_body(prose)
    return ItemFeatures(
        url=bool(_URL.search(text)),
        number=bool(_DIGIT.search(prose)),
        entity=_has_entity(body),
        strategy=any(_is_strategy(s.strip()) for s in _sentences(body)),
    )


def _is_strategy(sentence: str) -> bool:
    """Whether one sentence gives advice (see the module docstring for the shapes)."""
    if _CONDITIONAL.match(sentence) or _NORMATIVE.search(sentence):
        return True
    if any(m["verb"].lower() in IMPERATIVE_VERBS for m in _MODAL.finditer(sentence)):
        return True
    main_clause = _SCOPE_OPENING.sub("", sentence, count=1)
    return _opens_with_imperative(sentence) or (main_clause != sentence and _opens_with_imperative(main_clause))


def _opens_with_imperative(clause: str) -> bool:
    words = [w.lower().replace("’", "'") for w in _WORD.findall(clause)[:6]]
    while words and words[0] in _LEADING_ADVERBS:
        words = words[1:]
    if not words:
        return False
    first, following = words[0], words[1] if len(words) > 1 else ""
    if first in IMPERATIVE_VERBS:
        return first not in _ALSO_NOUNS or following not in _NOUN_MARKERS
    # "Verifying each hop prevents wrong answers.": a gerund of such a verb with what it achieves.
    return first.endswith("ing") and _gerund_stem(first) and bool(_BENEFIT.search(clause))


def _gerund_stem(word: str) -> bool:
    stem = word[:-3]
    return any(candidate in IMPERATIVE_VERBS for candidate in (stem, stem + "e", stem[:-1]))


@dataclasses.dataclass(frozen=True)
class GranularityReport:
    items: int
    url_share: float
    number_share: float
    entity_share: float
    strategy_share: float

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: Any, where: str = "granularity report") -> GranularityReport:
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected an object, got {type(obj).__name__}")
        values = {}
        for field in dataclasses.fields(cls):
            value = obj.get(field.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{where}: key {field.name!r} must be a number, got {value!r}")
            values[field.name] = value
        return cls(**values)


def analyze(texts: Iterable[str]) -> GranularityReport:
    features = [item_features(t) for t in texts]
    n = len(features)

    def share(name: str) -> float:
        return sum(getattr(f, name) for f in features) / n if n else 0.0

    return GranularityReport(n, share("url"), share("number"), share("entity"), share("strategy"))


class _HasText(Protocol):
    text: str


def analyze_pool(pool: Iterable[_HasText]) -> GranularityReport:
    """The report of a pool's items (anything that iterates over objects with a ``text``, e.g. an ``ExperiencePool``)."""
    return analyze(item.text for item in pool)


def write_report(path: str | Path, report: GranularityReport) -> None:
    """Stores a report as JSON (e.g. ``<iteration dir>/granularity.json``), atomically."""
    storage.write_json(path, report.to_json())


def read_report(path: str | Path) -> GranularityReport:
    """Reads a stored report; bad content is a ``ValueError`` naming the file and key."""
    return GranularityReport.from_json(storage.read_json(path), where=str(path))


def format_table(rows: Sequence[tuple[str, GranularityReport]]) -> str:
    header = ("pool", "items", "URL/domain", "numbers", "entities", "strategy")
    lines = [[name, str(r.items), *(f"{100 * v:.1f}%" for v in
                                    (r.url_share, r.number_share, r.entity_share, r.strategy_share))]
             for name, r in rows]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(row, widths))) for row in [header, *lines])
