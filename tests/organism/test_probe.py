"""The copy probe counts exact replies per drill kind, greedily, on drills of the asked world."""

import dataclasses

import pytest

from expint_jax.organism.drills import DrillConfig, drills
from expint_jax.organism.probe import copy_probe, format_probe

WORLD = DrillConfig(seeds=(399,), levels=("easy",), tasks_per_level=2, tasks_per_site=1, repeat_share=0.3,
                    search_share=0.3)


@dataclasses.dataclass
class _Reply:
    text: str


class _Oracle:
    """Answers every drill right except those whose request starts with ``wrong``."""

    def __init__(self, wrong: str = "\0"):
        self.wrong, self.calls = wrong, []
        self.answers = {t.messages[0].content: t.messages[1].content for t in drills(WORLD)}

    def chat(self, conversations, params):
        self.calls.append(params)
        return [_Reply("nope" if c[0].content.rsplit("\n\n", 1)[1].startswith(self.wrong) else self.answers[c[0].content])
                for c in conversations]


def test_a_perfect_copier_scores_every_drill_and_misses_are_shown():
    oracle = _Oracle()
    result = copy_probe(oracle, WORLD, count=30)
    assert oracle.calls[0].temperature == 0.0
    assert sum(result.total.values()) == 30 and result.exact == result.total and not result.examples
    assert all(result.total[k] for k in ("link", "repeat", "search"))
    missed = copy_probe(_Oracle(wrong="Open: "), WORLD, count=30)
    assert missed.exact["link"] == missed.exact["search"] == 0 and missed.rate("link") == 0.0
    assert missed.exact["repeat"] == missed.total["repeat"]
    assert missed.examples[0][1] == "nope" and missed.examples[0][0].startswith("<tool_call>")
    text = format_probe(missed, "pi0")
    assert f"  link: 0/{missed.total['link']}" in text and "  got:    nope" in text
    with pytest.raises(ValueError, match="count"):
        copy_probe(oracle, WORLD, count=0)
