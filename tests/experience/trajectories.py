"""Hand-written SimWeb-style rollouts (Qwen3 ReAct text format) for the experience tests.

Three tasks, three rollouts each:
  * ``founding``: one rollout visits the page and answers right; one answers from snippets
    after one search (wrong); one answers with no tool call (wrong)           -> mean 1/3
  * ``capital``: all three right                                              -> mean 1 (not informative)
  * ``director``: right after following a directory link to the item page; wrong after one
    search; wrong after a failed visit                                      -> mean 1/3
"""

from __future__ import annotations

import json

from expint_jax.records import Message, Trajectory

SYSTEM = "You are a web research agent. Use the tools, then answer inside <answer></answer>."


def call(name: str, **arguments: str) -> str:
    payload = json.dumps({"name": name, "arguments": arguments})
    return f"<think>I should use {name}.</think>\n<tool_call>\n{payload}\n</tool_call>"


def response(text: str) -> str:
    return f"<tool_response>\n{text}\n</tool_response>"


def results(*rows: tuple[str, str, str]) -> str:
    return response("\n".join(f"{k + 1}. {title} ({url})\nsnippet: {snippet}" for k, (title, url, snippet) in
                              enumerate(rows)))


def answer(text: str) -> str:
    return f"<think>Done.</think>\n<answer>{text}</answer>"


def rollout(task_id: str, question: str, steps: list[tuple[str, str]], final: str, gold: str, reward: float,
            termination: str = "answer") -> Trajectory:
    messages = [Message("system", SYSTEM), Message("user", question)]
    for assistant, observation in steps:
        messages += [Message("assistant", assistant), Message("user", observation)]
    messages.append(Message("assistant", answer(final)))
    return Trajectory(task_id=task_id, messages=tuple(messages), termination=termination,
                      num_tool_calls=len(steps), prediction=final, reward=reward, ground_truth=gold)


FOUNDING_Q = "In which year was the Harbor Lantern Society founded?"
FOUNDING_SEARCH = results(
    ("Harbor Lantern Society - Directory", "https://lantern.example.org/directory",
     "Societies and clubs of the harbor district."),
    ("Lantern festival 1999", "https://news.example.org/lantern-1999", "The festival drew crowds in 1999."),
)
FOUNDING_PAGE = response("Harbor Lantern Society\nThe society was founded in 1923 by local sailors.\n"
                         "[1] Members — https://lantern.example.org/members")

DIRECTOR_Q = "Who directs the Museum of Tides?"
DIRECTOR_SEARCH = results(
    ("Museums A-Z", "https://city.example.org/museums", "A directory of every museum in the city."),
)
DIRECTOR_DIRECTORY = response("Museums A-Z\n[1] Museum of Tides — https://city.example.org/museums/tides\n"
                              "[2] Museum of Salt — https://city.example.org/museums/salt")
DIRECTOR_PAGE = response("Museum of Tides\nDirector: Ada Moreno. Opened in 1961.")


def simweb_rollouts() -> list[Trajectory]:
    founding_search = (call("search", query="Harbor Lantern Society founded"), FOUNDING_SEARCH)
    founding_visit = (call("visit", url="https://lantern.example.org/directory"), FOUNDING_PAGE)
    capital_q = "What is the capital of the Republic of Ostra?"
    capital = [(call("search", query="capital of Ostra"),
                results(("Ostra", "https://ostra.example.org/", "Ostra's capital is Velm.")))]
    director_search = (call("search", query="Museum of Tides director"), DIRECTOR_SEARCH)
    return [
        rollout("founding", FOUNDING_Q, [founding_search, founding_visit], "1923", "1923", 1.0),
        rollout("founding", FOUNDING_Q, [founding_search], "1999", "1923", 0.0),
        rollout("founding", FOUNDING_Q, [], "1950", "1923", 0.0),
        *(rollout("capital", capital_q, capital, "Velm", "Velm", 1.0) for _ in range(3)),
        rollout("director", DIRECTOR_Q, [
            director_search,
            (call("visit", url="https://city.example.org/museums"), DIRECTOR_DIRECTORY),
            (call("visit", url="https://city.example.org/museums/tides"), DIRECTOR_PAGE),
        ], "Ada Moreno", "Ada Moreno", 1.0),
        rollout("director", DIRECTOR_Q, [director_search], "Museum of Salt", "Ada Moreno", 0.0),
        rollout("director", DIRECTOR_Q, [
            director_search,
            (call("visit", url="https://city.example.org/tides"), response("Error: no page at https://city.example.org/tides")),
        ], "unknown", "Ada Moreno", 0.0),
    ]
