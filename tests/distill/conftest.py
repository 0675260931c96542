"""Shared fixtures for the distillation tests: the real offline Qwen3 tokenizer and trajectories."""

import pytest

from expint_jax.experience.inject import format_experience_block
from expint_jax.models.chat import ChatFormat
from expint_jax.models.tokenizer import load_tokenizer
from expint_jax.records import Message, Trajectory

SYSTEM = "You are a web agent. Use tools, then answer inside <answer></answer>."
LESSONS = {
    "G0": "When a search result is a directory page, visit it before answering.",
    "G1": "When two sources disagree, prefer the page that the question names.",
    "G2": "If a visit fails, search again with the entity name and its site.",
    "G3": "When the question asks for a year, copy the year exactly as the page states it.",
}


@pytest.fixture(scope="session")
def chat() -> ChatFormat:
    return ChatFormat(load_tokenizer(None))


def make_trajectory(turns: int, injection: str = "stepwise", task_id: str = "t") -> Trajectory:
    """A ReAct trajectory with ``turns`` assistant turns: tool calls, tool responses, an answer."""
    messages = [Message("system", SYSTEM), Message("user", "When was the Riverside Film Society founded?")]
    for k in range(turns - 1):
        messages.append(Message("assistant", f"<think>step {k}: look further</think>\n<tool_call>\n"
                                             f'{{"name": "search", "arguments": {{"query": "riverside film {k}"}}}}\n'
                                             "</tool_call>"))
        messages.append(Message("user", f"<tool_response>\n[{k}] Riverside page {k} — https://rfs.example.org/p{k}\n"
                                        f"Founded in 19{k}0, says page {k}.  \n</tool_response>"))
    messages.append(Message("assistant", "<think>found it</think>\n<answer>1950</answer>"))
    pool_items = list(LESSONS.items())
    step = ()
    global_block = ""
    if injection == "stepwise":
        step = tuple("" if k % 3 == 2 else format_experience_block(dict(pool_items[k % 4:k % 4 + 2]))
                     for k in range(turns))
    elif injection == "global":
        global_block = format_experience_block(LESSONS)
    return Trajectory(task_id=task_id, messages=tuple(messages), injection=injection, global_injection=global_block,
                      step_injections=step)
