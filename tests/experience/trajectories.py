"""Hand-written SimWeb rollouts (Qwen3 ReAct text, SimWeb's observation formats) for the experience tests.

Three tasks, three rollouts each:
  * ``founding``: one rollout visits the page and answers right; one answers from snippets
    after one search (wrong); one answers with no tool call (wrong)           -> mean 1/3
  * ``capital``: all three right                                              -> mean 1 (not informative)
  * ``director``: right after following a directory link to the item page; wrong after one
    search; wrong after a failed visit                                      -> mean 1/3
"""

from __future__ import annotations

from expint_jax.models.chat import format_tool_call, format_tool_response
from expint_jax.records import Message, Trajectory
from expint_jax.rollout.envs.simweb.site import Link, Page
from expint_jax.rollout.envs.simweb.tools import format_page
from expint_jax.rollout.envs.web import SearchHit, format_search_results

SYSTEM = "You are a web research agent. Use the tools, then answer inside <answer></answer>."


def call(name: str, **arguments: str) -> str:
    return f"<think>\nI should use {name}.\n</think>\n\n{format_tool_call(name, arguments)}"


def results(query: str, *rows: tuple[str, str, str]) -> str:
    return format_tool_response(format_search_results(query, [SearchHit(*row) for row in rows]))


def page(url: str, title: str, text: str, *links: tuple[str, str]) -> str:
    shown = Page(url, title, text, tuple(Link(*link) for link in links), indexed=True, role="item", parent=None)
    return format_tool_response(format_page(shown))


def answer(text: str) -> str:
    return f"<think>\nDone.\n</think>\n\n<answer>{text}</answer>"


def rollout(task_id: str, question: str, steps: list[tuple[str, str]], final: str, gold: str, reward: float,
            termination: str = "answer") -> Trajectory:
    messages = [Message("system", SYSTEM), Message("user", question)]
    for assistant, observation in steps:
        messages += [Message("assistant", assistant), Message("user", observation)]
    messages.append(Message("assistant", answer(final)))
    return Trajectory(task_id=task_id, messages=tuple(messages), termination=termination,
                      num_tool_calls=len(steps), prediction=final, reward=reward, ground_truth=gold)


FOUNDING_Q = "In which year was the Harbor Lantern Society founded?"
FOUNDING_URL = "https://lantern.example.org/society.html"
FOUNDING_SEARCH = results(
    "Harbor Lantern Society founded",
    ("Harbor Lantern Society", FOUNDING_URL, "A society of the harbor district."),
    ("Lantern festival 1999", "https://news.example.org/lantern-1999.html", "The festival drew crowds in 1999."),
)
FOUNDING_PAGE = page(FOUNDING_URL, "Harbor Lantern Society", "Key facts:\n- Founded: 1923",
                     ("Members", "https://lantern.example.org/members.html"))

DIRECTOR_Q = "Who directs the Museum of Tides?"
DIRECTORY_URL = "https://city.example.org/museums/"
DIRECTOR_URL = "https://city.example.org/museums/tides.html"
DIRECTOR_SEARCH = results("Museum of Tides director",
                          ("Museums A-Z", DIRECTORY_URL, "A directory of every museum in the city."))
DIRECTOR_DIRECTORY = page(DIRECTORY_URL, "Museums A-Z", "Every museum of the city.",
                          ("Museum of Tides", DIRECTOR_URL), ("Museum of Salt", "https://city.example.org/museums/salt.html"))
DIRECTOR_PAGE = page(DIRECTOR_URL, "Museum of Tides", "Key facts:\n- Director: Ada Moreno\n- Opened: 1961")


def simweb_rollouts() -> list[Trajectory]:
    founding_search = (call("search", query="Harbor Lantern Society founded"), FOUNDING_SEARCH)
    founding_visit = (call("visit", url=FOUNDING_URL), FOUNDING_PAGE)
    capital_q = "What is the capital of the Republic of Ostra?"
    capital = [(call("search", query="capital of Ostra"),
                results("capital of Ostra", ("Ostra", "https://ostra.example.org/", "Ostra's capital is Velm.")))]
    director_search = (call("search", query="Museum of Tides director"), DIRECTOR_SEARCH)
    return [
        rollout("founding", FOUNDING_Q, [founding_search, founding_visit], "1923", "1923", 1.0),
        rollout("founding", FOUNDING_Q, [founding_search], "1999", "1923", 0.0),
        rollout("founding", FOUNDING_Q, [], "1950", "1923", 0.0),
        *(rollout("capital", capital_q, capital, "Velm", "Velm", 1.0) for _ in range(3)),
        rollout("director", DIRECTOR_Q, [
            director_search,
            (call("visit", url=DIRECTORY_URL), DIRECTOR_DIRECTORY),
            (call("visit", url=DIRECTOR_URL), DIRECTOR_PAGE),
        ], "Ada Moreno", "Ada Moreno", 1.0),
        rollout("director", DIRECTOR_Q, [director_search], "Museum of Salt", "Ada Moreno", 0.0),
        rollout("director", DIRECTOR_Q, [
            director_search,
            (call("visit", url="https://city.example.org/tides"),
             format_tool_response("Error: visit: there is no page at 'https://city.example.org/tides'.")),
        ], "unknown", "Ada Moreno", 0.0),
    ]
