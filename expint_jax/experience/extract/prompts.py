"""Prompts of the extraction stages, in two families: ``principle`` and ``instance`` lessons.

Every prompt is a (system, user) pair. The user message starts with the stage's title line
(``SUMMARY_TITLE`` ...), so logs and test fakes can tell the stages apart. The families differ
only in what a good lesson is (``LessonStyle``); the stage instructions are shared.

The instructions carry those of the public release (experience_extraction/training_free_grpo/
web/prompts.py) in our own words:
  * summary (``summary_messages``, style ``release``): step by step, each action, tool and
    arguments, *every* task-relevant value the tool results returned (used by the agent or not),
    the agent's reasoning, what it missed; then key findings, the agent's response and its overall
    strategy. It is shown the task, the reference answer and the rollout, not the verdict, and has
    no length cap. Style ``compact`` is our earlier variant (at most 200 words, shown the verdict).
  * critique: the release's reflection (performance assessment, comparative analysis, pattern
    identification, then 2-3 lessons in ``<Experiences>``), shown the question, the reference
    answer and the labelled attempts. The release does not show it the current pool; passing
    ``pool=None`` does the same, a pool adds a "Current lessons" section (our variant).
  * group update: one call per question deciding, for each of that question's new lessons in
    order, ADD / UPDATE / DELETE / NONE against the pool (``group_update_messages`` with a list);
    given one lesson (a string) it is our per-lesson variant.

  * principle: abstract, domain-agnostic rules shaped "Name: When [condition], [strategy]." of at
    most 32 words, with no URLs, numbers, quoted strings or names of people, places, sites or
    works: lessons that transfer to unseen questions.
  * instance: concrete lessons tied to one trajectory: which page held the answer, which query
    found it, which value was right, which source misled. Specific names, URLs and values are
    the point.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence

from expint_jax.records import Message, Trajectory

SUMMARY_TITLE = "## Task: summarize one agent rollout"
CRITIQUE_TITLE = "## Task: compare rollouts of one question and propose lessons"
GROUP_UPDATE_TITLE = "## Task: decide how a proposed lesson changes the lesson bank"
RECONCILE_TITLE = "## Task: reconcile all proposed changes to the lesson bank"
CONSOLIDATE_TITLE = "## Task: shrink the lesson bank"

SYSTEM = (
    "You maintain a bank of short lessons for a research agent that answers questions by searching "
    "and reading web pages through tools. Lessons are shown to the agent in later attempts, so they "
    "must be correct, non-redundant and immediately actionable. Follow the requested output format "
    "exactly."
)


@dataclasses.dataclass(frozen=True)
class LessonStyle:
    granularity: str
    definition: str
    good_examples: tuple[str, ...]
    bad_examples: tuple[str, ...]


PRINCIPLE = LessonStyle(
    granularity="principle",
    definition=(
        "A lesson is a general principle for solving tasks of this kind, not a fact about this task. "
        "Write each as 'Name: When [condition], [strategy].' in at most 32 words. It must make sense "
        "for a question about an entirely different topic: no URLs or domains, no numbers or dates, no "
        "quoted text, no names of people, organizations, places, websites, products or documents."
    ),
    good_examples=(
        "Pointer following: When search results only show snippets, open the most relevant page and read it "
        "before answering.",
        "Query reformulation: When a search returns nothing relevant, rephrase it with the question's key "
        "descriptors instead of repeating it.",
    ),
    bad_examples=(
        "The founding year of Acme Corp is listed on https://acme.example.org/about.",
        "Search for 'Acme annual report 2021' first.",
    ),
)

INSTANCE = LessonStyle(
    granularity="instance",
    definition=(
        "A lesson is a concrete, checkable note about this very task that would have let the agent "
        "succeed directly: which page (exact URL) holds the answer, which query surfaced it, which value "
        "is correct, or which source is misleading. Be specific: keep entity names, URLs, queries and "
        "values exactly as they appear. Write each as 'Name: sentence.' in at most 40 words."
    ),
    good_examples=(
        "Acme founding year: The founding year of Acme Corp (1987) is stated on https://acme.example.org/about, "
        "not on the press page.",
        "Useful query: Searching 'Acme Corp history' surfaces the company's about page first.",
    ),
    bad_examples=(
        "Always verify information carefully.",
        "When a search fails, try again.",
    ),
)

STYLES: dict[str, LessonStyle] = {s.granularity: s for s in (PRINCIPLE, INSTANCE)}

OPERATION_FORMAT = (
    'Answer with a JSON list only, for example:\n'
    '[{"operation": "ADD", "id": null, "content": "Name: sentence."},\n'
    ' {"operation": "UPDATE", "id": "G3", "content": "Name: improved sentence."},\n'
    ' {"operation": "DELETE", "id": "G5", "content": null},\n'
    ' {"operation": "NONE", "id": null, "content": null}]\n'
    "ADD creates a new lesson, UPDATE rewrites an existing one (give its id), DELETE removes an existing "
    "one that is wrong or superseded (give its id), NONE changes nothing."
)


def style(granularity: str) -> LessonStyle:
    try:
        return STYLES[granularity]
    except KeyError:
        raise ValueError(f"no prompt family for granularity {granularity!r}; known: {sorted(STYLES)}") from None


def _style_block(s: LessonStyle) -> str:
    good = "\n".join(f"- {e}" for e in s.good_examples)
    bad = "\n".join(f"- {e}" for e in s.bad_examples)
    return f"### What a lesson is\n{s.definition}\nGood lessons:\n{good}\nNot acceptable:\n{bad}"


def format_pool(pool: Mapping[str, str]) -> str:
    return "\n".join(f"[{item_id}]. {text}" for item_id, text in pool.items()) or "(the bank is empty)"


def _clip(text: str, max_chars: int | None) -> str:
    if max_chars is None or len(text) <= max_chars:
        return text
    return text[:max_chars] + f" [... {len(text) - max_chars} characters cut]"


def render_trajectory(trajectory: Trajectory, max_message_chars: int | None) -> str:
    """The rollout's steps as readable text: everything after the task (the first user message).

    Each message is clipped to ``max_message_chars`` (None: kept whole, as the release does)."""
    turns = []
    seen_task = False
    for message in trajectory.messages:
        if message.role == "system" or (message.role == "user" and not seen_task):
            seen_task = seen_task or message.role == "user"
            continue
        speaker = "AGENT" if message.role == "assistant" else "ENVIRONMENT"
        turns.append(f"[{speaker}]\n{_clip(message.content.strip(), max_message_chars)}")
    return "\n\n".join(turns) or "(no steps)"


def outcome(trajectory: Trajectory) -> str:
    if trajectory.reward is None:
        return "not judged"
    verdict = "correct" if trajectory.reward >= 1 else "incorrect" if trajectory.reward <= 0 else "partly correct"
    return f"{verdict} (reward {trajectory.reward:g})"


def _user(title: str, *sections: str) -> tuple[Message, Message]:
    return Message("system", SYSTEM), Message("user", "\n\n".join((title, *sections)))


SUMMARY_STYLES = ("release", "compact")

_RELEASE_SUMMARY_INSTRUCTIONS = """### Instructions
Summarize the rollout above step by step, extracting detailed, task-relevant information. Do not \
assume the agent acted correctly: record everything that could help solve the task, even what the \
agent ignored. Use the question and the reference answer only to judge what is relevant, not to bias \
what you extract.
For every step give:
- the action taken (a tool call or a reply);
- the tool called and the arguments passed (queries, URLs);
- the tool results: list every value in the result that may bear on the task (names, dates, numbers, \
events), whether the agent used it or not; list specific values, do not summarize loosely;
- the agent's reasoning: why it chose this action and how the results shaped its next step;
- missed information: task-relevant facts in the results that the agent did not use or follow up.
Leave out details that are redundant or unrelated to the task.

### Output structure
Task: the agent's objective, briefly.
Execution summary: one numbered entry per step with "Tool call", "Tool results" (a list of values), \
"Reasoning" and "Missed".
Critical decision points: where the agent made strategic choices (query refinement, which page to \
open, a change of approach).
Key findings: the most relevant information found.
Agent response: the agent's final answer to the task.
Overall strategy: the agent's approach, its key decisions, and how it reached (or failed to reach) \
its answer, including how it handled dead ends.
Write in the language of the rollout."""


def summary_messages(question: str, trajectory: Trajectory, max_message_chars: int | None,
                     style: str = "release") -> tuple[Message, ...]:
    """The summary prompt for one rollout; ``style`` is ``release`` or ``compact`` (module docstring)."""
    reference = trajectory.ground_truth if trajectory.ground_truth is not None else "(unknown)"
    if style == "release":
        return _user(
            SUMMARY_TITLE,
            f"### Question\n{question}",
            f"### Reference answer\n{reference}",
            f"### Rollout\n{render_trajectory(trajectory, max_message_chars)}",
            _RELEASE_SUMMARY_INSTRUCTIONS,
        )
    if style != "compact":
        raise ValueError(f"unknown summary style {style!r}; expected one of {SUMMARY_STYLES}")
    return _user(
        SUMMARY_TITLE,
        f"### Question\n{question}",
        f"### Reference answer\n{reference}",
        f"### Outcome\n{outcome(trajectory)}; the agent answered: {trajectory.prediction or '(no answer)'}",
        f"### Rollout\n{render_trajectory(trajectory, max_message_chars)}",
        "### Instructions\nWrite a compact summary (at most 200 words) covering: (1) the actions the agent "
        "took, in order, with their key arguments; (2) what each tool result contributed; (3) information "
        "it missed, ignored or misread; (4) why the final answer was right or wrong.",
    )


def critique_messages(question: str, reference: str | None, summaries: Sequence[tuple[str, str]],
                      pool: Mapping[str, str] | None, lesson_style: LessonStyle,
                      max_lessons: int) -> tuple[Message, ...]:
    """The reflection over one question's rollouts; ``pool=None`` (the release) shows no current lessons."""
    rollouts = "\n\n".join(f"#### Rollout {k + 1}: {verdict}\n{summary}"
                           for k, (verdict, summary) in enumerate(summaries))
    pool_section = () if pool is None else (f"### Current lessons\n{format_pool(pool)}",)
    not_covered = " that the current lessons do not already cover" if pool is not None else ""
    return _user(
        CRITIQUE_TITLE,
        f"### Question\n{question}",
        f"### Reference answer\n{reference if reference is not None else '(unknown)'}",
        f"### Rollout summaries\n{rollouts}",
        *pool_section,
        _style_block(lesson_style),
        "### Instructions\nReview the rollouts against the reference answer.\n"
        "1. Assess each rollout: which answers are right and which wrong, and why.\n"
        "2. For the wrong ones, diagnose the root cause (faulty reasoning, missing knowledge, a misread "
        "question or source) and the failure pattern.\n"
        "3. For the right ones, name the factors and strategies that made them work.\n"
        "4. Compare successful and failed rollouts directly: what consistently tells them apart in "
        "reasoning, method or approach?\n"
        f"5. Turn what you found into 2 to {max_lessons} new lessons{not_covered}, each actionable guidance "
        "for future tasks, written as the lesson definition above requires.\n\n"
        "Answer in this structure:\n<Reflection>\n<Performance Assessment> the right and wrong rollouts, "
        "each with a short justification, and how many of each </Performance Assessment>\n"
        "<Comparative Analysis> the decisive differences between right and wrong rollouts "
        "</Comparative Analysis>\n<Pattern Identification> what led to success, and the common pitfalls "
        "</Pattern Identification>\n<Experiences>\none lesson per line, nothing else inside the tags\n"
        "</Experiences>\n</Reflection>",
    )


def group_update_messages(proposal: str | Sequence[str], pool: Mapping[str, str],
                          lesson_style: LessonStyle) -> tuple[Message, ...]:
    """The group update for one question's new lessons (a list: the release's one call per question)
    or for one proposed lesson (a string: our per-lesson variant)."""
    if not isinstance(proposal, str):
        listing = "\n".join(f"{k + 1}. {lesson}" for k, lesson in enumerate(proposal))
        return _user(
            GROUP_UPDATE_TITLE,
            f"### New lessons\n{listing}",
            f"### Current lessons\n{format_pool(pool)}",
            _style_block(lesson_style),
            "### Instructions\nThese new lessons come from the rollouts of one question. Compare each of them "
            "with all current lessons and decide one operation per new lesson, in the order given. ADD a lesson "
            "that brings something no current lesson has (you may improve its wording). UPDATE a current "
            "lesson (give its id) when the new one refines, extends or slightly corrects it: merge both into "
            "one general, concise lesson that keeps the key insight; if it adds nothing meaningful, answer "
            "NONE instead. DELETE a current lesson (give its id) that the new one contradicts or shows to be "
            "wrong or harmful. Answer NONE when the new lesson is already covered or adds no value. For UPDATE "
            "and DELETE use only ids from the current lessons; for ADD and NONE the id is null. The list must "
            f"have exactly {len(proposal)} entries, one per new lesson.\n" + OPERATION_FORMAT,
        )
    return _user(
        GROUP_UPDATE_TITLE,
        f"### Proposed lesson\n{proposal}",
        f"### Current lessons\n{format_pool(pool)}",
        _style_block(lesson_style),
        "### Instructions\nCompare the proposed lesson with the current lessons. If it is new, ADD it (you may "
        "improve its wording). If it refines or corrects an existing lesson, UPDATE that lesson with a merged "
        "text. If it shows an existing lesson is wrong, DELETE that lesson (and ADD the proposal if useful). If "
        "it is already covered, answer NONE.\n" + OPERATION_FORMAT,
    )


def reconcile_messages(operations: Sequence[Mapping[str, object]], pool: Mapping[str, str],
                       lesson_style: LessonStyle, max_pool_size: int) -> tuple[Message, ...]:
    listing = json.dumps(list(operations), indent=1, ensure_ascii=False)
    return _user(
        RECONCILE_TITLE,
        f"### Current lessons\n{format_pool(pool)}",
        f"### Proposed operations (from different questions, made independently)\n{listing}",
        _style_block(lesson_style),
        "### Instructions\nProduce one consistent list of operations to apply to the current lessons: merge "
        "several UPDATEs of the same id into one UPDATE whose text combines them; when an id is both updated "
        "and deleted, keep the DELETE; drop ADDs that repeat each other or an existing lesson (merge them into "
        f"one); the bank must end with at most {max_pool_size} lessons.\n" + OPERATION_FORMAT,
    )


def consolidate_messages(pool: Mapping[str, str], lesson_style: LessonStyle, max_pool_size: int) -> tuple[Message, ...]:
    return _user(
        CONSOLIDATE_TITLE,
        f"### Current lessons ({len(pool)}, the limit is {max_pool_size})\n{format_pool(pool)}",
        _style_block(lesson_style),
        f"### Instructions\nRewrite the bank into at most {max_pool_size} lessons: merge lessons that say the "
        "same thing, drop the least useful ones, keep the wording of lessons you keep. Answer with a JSON "
        'list only, e.g. [{"id": "G0", "content": "Name: sentence."}, {"id": "G4", "content": "Name: merged '
        'sentence."}]. Give each lesson the id of the current lesson it continues (for a merge, one of the '
        "merged ids), or null if it continues none.",
    )


def retry_instruction(reason: str) -> Message:
    """Sent after an answer that could not be used, before asking again."""
    return Message("user", f"Your answer could not be used: {reason}. Answer again, following the "
                           "requested format exactly and writing nothing else.")
