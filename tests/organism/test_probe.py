"""The copy probe counts exact replies per drill kind, greedily, on drills of the asked world."""

import dataclasses

import pytest

from expint_jax.organism.drills import DrillConfig, drills
from expint_jax.organism.probe import (copy_probe, format_probe, format_turn_losses, scripted_conversations,
                                       turn_losses, turn_probe)
from expint_jax.rollout.envs.simweb.env import SimWebConfig, SimWebEnv

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


@pytest.fixture(scope="module")
def world():
    env = SimWebEnv(SimWebConfig(seed=399, split="train", tasks_per_level=3, levels=("easy", "medium")))
    return env, scripted_conversations(env, count=4)


def test_the_agent_layout_probe_scores_the_script_itself_exactly_and_counts_visits_to_real_pages(world):
    from expint_jax.rollout.envs.simweb.reference_agent import ReferenceAgentConfig, ReferencePolicy

    env, conversations = world
    assert len(conversations) == 4
    script = turn_probe(ReferencePolicy(ReferenceAgentConfig(think=False)), env, conversations)
    assert script.exact == script.total and not script.examples
    assert all(script.total[k] for k in ("search", "visit from search", "visit from page", "answer"))
    assert script.total["real page"] == script.total["visit from search"] + script.total["visit from page"]
    page = env.world.sites[0].pages[0]
    lost = turn_probe(_Fixed(f'<tool_call>\n{{"name": "visit", "arguments": {{"url": "{page.url}"}}}}\n</tool_call>'),
                      env, conversations)
    # a real page, but not the one the script opens: copied, not chosen
    assert lost.exact["real page"] == lost.total["real page"] and lost.exact["visit from page"] == 0
    assert lost.exact["answer"] == 0 and lost.examples
    assert "  real page: " in format_probe(lost, "pi0")
    with pytest.raises(ValueError, match="count"):
        scripted_conversations(env, count=0)


def test_turn_losses_split_every_token_of_the_turns_by_part_and_by_embedding_row(world):
    import numpy as np

    from expint_jax.models.chat import ChatFormat
    from expint_jax.models.config import tiny
    from expint_jax.models.init import init_model
    from expint_jax.models.tokenizer import load_tokenizer

    _, conversations = world
    chat = ChatFormat(load_tokenizer(None))
    model = init_model(tiny(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                            head_dim=8), seed=0)
    encoded = [chat.encode(t.messages) for t in conversations]
    written = np.concatenate([e.token_ids[e.loss_mask] for e in encoded])
    weak_ids = np.unique(chat.text_ids("https://example.org"))  # the URL scaffolding: in every visit
    rows = model.embed[...] / np.linalg.norm(model.embed[...], axis=1, keepdims=True)  # one norm for all rows
    model.embed[...] = rows.at[weak_ids].set(0.0)
    losses = turn_losses(model, chat, conversations, bucket=256)
    assert set(losses.parts) == {"url", "query", "answer", "other"}
    assert sum(n for _, n in losses.parts.values()) == sum(n for _, n in losses.rows.values()) == len(written)
    assert losses.rows["weak row"][1] == int(np.isin(written, weak_ids).sum()) > 0
    assert losses.parts["url"][1] > losses.parts["answer"][1] > 0
    assert all(loss > 0 for loss, _ in losses.parts.values())  # a random network
    text = format_turn_losses(losses)
    assert "by part: url " in text and "weak row" in text
