"""Student targets that cite the experience (issue 12, item 8): find the citations, scrub them, count them.

A teacher that saw experience in its context often says so ("Following G3, I will open the
page", "as the relevant experiences suggest", or a lesson quoted word for word). The student
never sees the experience; trained on that text, it learns to cite items that are not there.

The rule, applied to assistant turns only:
  * A *reference* is one of
      (a) an id of the pool as a word (``G3``, ``[G3]``): ids outside the pool (``G20 summit``
          with a pool of G0..G9) are ordinary text;
      (b) a phrase naming injected experience: ``experience(s)`` / ``lesson(s)`` / ``insight(s)``
          right after one of relevant, accumulated, provided, given, selected, injected, retrieved,
          listed, above, these, those, past, earlier, previous, prior (``EXPERIENCE_PHRASE``);
      (c) a quote: ``quote_words`` (8) or more consecutive words of one pool item, compared on
          lowercased word tokens.
  * Inside ``<think>…</think>`` every sentence (split at ``.``, ``!``, ``?`` or a line break)
    holding a reference is deleted; a think block left with nothing in it is removed with its tags.
  * A reference outside the think blocks (the visible reply, a tool call, the answer) is part of
    what the agent did and cannot be cut out: the trajectory is dropped.
  * ``ScrubReport`` counts the trajectories seen, the turns rewritten, the sentences removed and
    the trajectories dropped (by task id), for the caller to report. A rewritten trajectory's
    metadata records ``scrubbed_experience_refs`` (its removed sentences).

The distillation data pipeline is meant to call ``scrub_experience_refs`` on teacher targets
(config key ``distill.scrub_experience_refs``, default on); messages that a teacher scores are
rewritten before the views are built, so teacher and student see the same target tokens.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

from expint_jax.records import Message, Trajectory

EXPERIENCE_PHRASE = re.compile(
    r"\b(?:relevant|accumulated|provided|given|selected|injected|retrieved|listed|above|these|those|past|earlier"
    r"|previous|prior)\s+(?:experiences?|lessons?|insights?)\b",
    re.IGNORECASE,
)
_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"[a-z0-9']+")
METADATA_KEY = "scrubbed_experience_refs"


@dataclasses.dataclass(frozen=True)
class ScrubReport:
    trajectories: int = 0
    rewritten_turns: int = 0
    removed_sentences: int = 0
    dropped: tuple[str, ...] = ()  # task ids of the trajectories dropped

    def to_json(self) -> dict[str, object]:
        return {"trajectories": self.trajectories, "rewritten_turns": self.rewritten_turns,
                "removed_sentences": self.removed_sentences, "dropped": len(self.dropped),
                "dropped_task_ids": list(self.dropped)}


class ReferenceFinder:
    """Whether a text refers to the experience of ``pool`` (rules (a)-(c) of the module docstring)."""

    def __init__(self, pool: Mapping[str, str], quote_words: int = 8):
        if quote_words < 3:
            raise ValueError(f"quote_words must be >= 3, got {quote_words}")
        self.quote_words = quote_words
        ids = sorted(pool, key=len, reverse=True)
        self._ids = re.compile(r"(?<![\w-])\[?(?:" + "|".join(map(re.escape, ids)) + r")\]?(?![\w-])") if ids else None
        self._quotes = {gram for text in pool.values() for gram in self._grams(text)}

    def _grams(self, text: str) -> set[tuple[str, ...]]:
        words = _WORD.findall(text.lower())
        n = self.quote_words
        return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}

    def refers(self, text: str) -> bool:
        if self._ids is not None and self._ids.search(text):
            return True
        if EXPERIENCE_PHRASE.search(text):
            return True
        return bool(self._quotes) and not self._quotes.isdisjoint(self._grams(text))


def _scrub_thought(thought: str, finder: ReferenceFinder) -> tuple[str, int]:
    """The thought without its referring sentences, and how many were removed."""
    removed = 0
    lines = []
    for line in thought.split("\n"):
        sentences = _SENTENCE_END.split(line)
        kept = [s for s in sentences if not finder.refers(s)]
        removed += len(sentences) - len(kept)
        if len(kept) == len(sentences):
            lines.append(line)
        elif any(s.strip() for s in kept):
            lines.append(" ".join(kept))
    return "\n".join(lines), removed


def scrub_turn(text: str, finder: ReferenceFinder) -> tuple[str, int] | None:
    """``(text without referring sentences in its think blocks, sentences removed)``, or ``None``
    when a reference sits outside the think blocks (the trajectory must be dropped)."""
    if finder.refers(_THINK.sub(" ", text)):
        return None
    removed = 0

    def replace(match: re.Match[str]) -> str:
        nonlocal removed
        thought, count = _scrub_thought(match.group(1), finder)
        removed += count
        if count == 0:
            return match.group(0)
        return f"<think>{thought}</think>" if thought.strip() else ""

    scrubbed = _THINK.sub(replace, text)
    return (scrubbed.strip() if removed else text), removed


def scrub_experience_refs(trajectories: Sequence[Trajectory], pool: Mapping[str, str],
                          quote_words: int = 8) -> tuple[list[Trajectory], ScrubReport]:
    """The trajectories with citations of ``pool`` scrubbed (or dropped), and the counts."""
    finder = ReferenceFinder(pool, quote_words)
    kept: list[Trajectory] = []
    dropped: list[str] = []
    rewritten_turns = removed_sentences = 0
    for trajectory in trajectories:
        messages, removed_here, turns_here, drop = [], 0, 0, False
        for message in trajectory.messages:
            if message.role != "assistant":
                messages.append(message)
                continue
            result = scrub_turn(message.content, finder)
            if result is None:
                drop = True
                break
            text, removed = result
            if removed:
                if not text.strip():  # the whole turn was citation: nothing left to train on
                    drop = True
                    break
                turns_here += 1
                removed_here += removed
                message = Message("assistant", text)
            messages.append(message)
        if drop:
            dropped.append(trajectory.task_id)
            continue
        if removed_here:
            metadata = {**trajectory.metadata, METADATA_KEY: removed_here}
            trajectory = dataclasses.replace(trajectory, messages=tuple(messages), metadata=metadata)
            rewritten_turns += turns_here
            removed_sentences += removed_here
        kept.append(trajectory)
    report = ScrubReport(len(trajectories), rewritten_turns, removed_sentences, tuple(dropped))
    return kept, report
