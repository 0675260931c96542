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


class _Fixed:
    def __init__(self, text: str):
        self.text = text

    def chat(self, conversations, params):
        return [_Reply(self.text) for _ in conversations]


def test_the_agent_layout_probe_scores_the_script_itself_exactly_and_counts_visits_to_real_pages():
    from expint_jax.organism.probe import turn_probe
    from expint_jax.rollout.envs.simweb.env import SimWebConfig, SimWebEnv
    from expint_jax.rollout.envs.simweb.reference_agent import ReferenceAgentConfig, ReferencePolicy

    env = SimWebEnv(SimWebConfig(seed=399, split="train", tasks_per_level=3, levels=("easy", "medium")))
    script = turn_probe(ReferencePolicy(ReferenceAgentConfig(think=False)), env, count=4)
    assert script.exact == script.total and not script.examples
    assert all(script.total[k] for k in ("search", "visit from search", "visit from page", "answer"))
    assert script.total["real page"] == script.total["visit from search"] + script.total["visit from page"]
    page = env.world.sites[0].pages[0]
    lost = turn_probe(_Fixed(f'<tool_call>\n{{"name": "visit", "arguments": {{"url": "{page.url}"}}}}\n</tool_call>'),
                      env, count=4)
    # a real page, but not the one the script opens: copied, not chosen
    assert lost.exact["real page"] == lost.total["real page"] and lost.exact["visit from page"] == 0
    assert lost.exact["answer"] == 0 and lost.examples
    assert "  real page: " in format_probe(lost, "pi0")
    with pytest.raises(ValueError, match="count"):
        turn_probe(_Fixed(""), env, count=0)
