"""The two prompt families: each states its rules, its examples obey them, and every stage that
writes lessons carries the family's rules."""

import pytest

from expint_jax.experience.extract import prompts
from expint_jax.experience.extract.prompts import INSTANCE, PRINCIPLE
from expint_jax.experience.granularity import item_features

POOL = {"G0": "Query reformulation: When a search returns nothing relevant, rephrase it."}


def lesson_prompts(style):
    """The user message of every stage that writes or rewrites lessons, in the given family."""
    return {
        "critique": prompts.critique_messages("Q?", "A", [("correct (reward 1)", "s")], POOL, style, 3),
        "group_update": prompts.group_update_messages("Name: lesson.", POOL, style),
        "reconcile": prompts.reconcile_messages([{"operation": "ADD", "id": None, "content": "x"}], POOL, style, 50),
        "consolidate": prompts.consolidate_messages(POOL, style, 50),
    }


def test_principle_family_states_its_rules():
    rules = PRINCIPLE.definition
    assert "'Name: When [condition], [strategy].'" in rules and "at most 32 words" in rules
    for banned in ("no URLs", "no numbers", "no quoted text", "no names of people, organizations, places, websites"):
        assert banned in rules
    assert "entirely different topic" in rules  # domain-agnostic


def test_instance_family_asks_for_concrete_pages_values_and_queries():
    rules = INSTANCE.definition
    for concrete in ("which page (exact URL)", "which query", "which value",
                     "keep entity names, URLs, queries and values"):
        assert concrete in rules
    assert "When [condition]" not in rules


def test_principle_examples_obey_the_rules_and_the_bad_ones_break_them():
    for example in PRINCIPLE.good_examples:
        features = item_features(example)
        assert len(example.split()) <= 32, example
        assert (features.url, features.number, features.entity, features.strategy) == (False, False, False, True)
    for example in PRINCIPLE.bad_examples:
        features = item_features(example)
        assert features.url or features.number or features.entity, example


def test_instance_examples_are_concrete_and_the_bad_ones_generic():
    for example in INSTANCE.good_examples:
        features = item_features(example)
        assert features.entity and len(example.split()) <= 40, example
    assert any(item_features(e).url for e in INSTANCE.good_examples)
    for example in INSTANCE.bad_examples:
        features = item_features(example)
        assert not (features.url or features.number or features.entity), example


@pytest.mark.parametrize("style, other", [(PRINCIPLE, INSTANCE), (INSTANCE, PRINCIPLE)])
def test_every_lesson_writing_stage_carries_its_familys_rules(style, other):
    for stage, (system, user) in lesson_prompts(style).items():
        assert system.content == prompts.SYSTEM
        assert style.definition in user.content, stage
        assert other.definition not in user.content, stage
        assert all(example in user.content for example in style.good_examples + style.bad_examples), stage


def test_style_lookup():
    assert prompts.style("principle") is PRINCIPLE and prompts.style("instance") is INSTANCE
    with pytest.raises(ValueError, match="no prompt family for granularity 'coarse'"):
        prompts.style("coarse")
