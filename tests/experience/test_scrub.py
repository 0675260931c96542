"""Scrubbing teacher targets that cite the experience (issue 12, item 8): the rule and its counts."""

import pytest

from expint_jax.experience.scrub import ReferenceFinder, scrub_experience_refs, scrub_turn
from expint_jax.records import Message, Trajectory

POOL = {
    "G0": "Pointer following: When search results only show snippets, open the most relevant page before answering.",
    "G3": "Query reformulation: When a search returns nothing relevant, rephrase it with the key descriptors.",
}
CALL = '<tool_call>\n{"name": "search", "arguments": {"query": "harbor society"}}\n</tool_call>'


def trajectory(*assistant_turns: str, task_id: str = "t") -> Trajectory:
    messages = [Message("system", "s"), Message("user", "When was the Harbor Society founded?")]
    for k, text in enumerate(assistant_turns):
        messages.append(Message("assistant", text))
        if k < len(assistant_turns) - 1:
            messages.append(Message("user", "<tool_response>\nresults\n</tool_response>"))
    return Trajectory(task_id=task_id, messages=tuple(messages))


def test_id_phrase_and_quote_references_are_found():
    finder = ReferenceFinder(POOL)
    assert finder.refers("Following G3, I will rephrase.") and finder.refers("as [G0] says")
    assert finder.refers("The relevant experiences suggest opening the page.")
    assert finder.refers("Since results only show snippets, open the most relevant page first.")  # 8 words of G0
    assert not finder.refers("I should open the most relevant page before answering")  # 7 words: no quote
    assert not finder.refers("The G20 summit was held in 2009.")  # not a pool id
    assert not finder.refers("I will open the page and read it.")
    assert not finder.refers("G30 and XG3 are other names.")


def test_citing_sentences_in_thoughts_are_removed_and_the_action_is_kept():
    text = f"<think>Following G3, I should rephrase the query. The key term is the society's name.</think>\n{CALL}"
    scrubbed, removed = scrub_turn(text, ReferenceFinder(POOL))
    assert removed == 1
    assert scrubbed == f"<think>The key term is the society's name.</think>\n{CALL}"


def test_a_thought_that_was_only_citation_disappears_with_its_tags():
    scrubbed, removed = scrub_turn(f"<think>As the relevant experiences say, search first.</think>\n{CALL}",
                                   ReferenceFinder(POOL))
    assert (scrubbed, removed) == (CALL, 1)


def test_trajectories_are_rewritten_dropped_or_left_alone_and_counted():
    clean = trajectory(f"<think>Search first.</think>\n{CALL}", "<answer>1923</answer>", task_id="clean")
    cited = trajectory(f"<think>Per G0, open the page. Then read it.</think>\n{CALL}",
                       "<think>These lessons helped.\nThe page says 1923.</think>\n<answer>1923</answer>",
                       task_id="cited")
    in_answer = trajectory(CALL, "<answer>1923 (following G3)</answer>", task_id="answer")
    only_citation = trajectory("<think>Following G3.</think>", task_id="empty")
    kept, report = scrub_experience_refs([clean, cited, in_answer, only_citation], POOL)
    assert [t.task_id for t in kept] == ["clean", "cited"] and kept[0] is clean
    assert report.dropped == ("answer", "empty")
    assert (report.trajectories, report.rewritten_turns, report.removed_sentences) == (4, 2, 2)
    assistant = [m.content for m in kept[1].messages if m.role == "assistant"]
    assert assistant == [f"<think>Then read it.</think>\n{CALL}",
                         "<think>The page says 1923.</think>\n<answer>1923</answer>"]
    assert kept[1].metadata["scrubbed_experience_refs"] == 2
    assert report.to_json()["dropped"] == 2
    with pytest.raises(ValueError, match="quote_words"):
        ReferenceFinder(POOL, quote_words=2)
