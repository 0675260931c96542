"""The texts the ReAct agent writes into a conversation: system prompt, nudges and error observations.

Contract: every function here is pure and returns plain text. The tools section follows Qwen3's
function-calling format (``# Tools`` with one JSON schema per line inside ``<tools>``, calls as
``<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>``), which is what Qwen3 models
were trained on; the rest is our own wording of the paper's evaluation agent.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from expint_jax.rollout.tools import ToolSpec

DEFAULT_INSTRUCTIONS = (
    "You are a research assistant. Solve the user's task step by step: gather the facts you need "
    "with the tools below, check them, and reason carefully. You may think inside <think></think> "
    "before each action. Call at most one tool per turn and wait for its result. When you have "
    "enough information, give the final answer inside <answer></answer>; keep it short and exact."
)

TOOLS_SECTION = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{schemas}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""

NO_ACTION_NUDGE = (
    "Your last reply contained neither a tool call nor a final answer. Call a tool in the "
    "<tool_call></tool_call> format, or give your final answer inside <answer></answer>."
)

FORCED_ANSWER = (
    "You have reached the maximum context length. Stop calling tools. Based on everything above, "
    "think once more and give the answer you consider most likely, in this format: "
    "<think>your final thinking</think>\n<answer>your answer</answer>"
)


def system_prompt(tools: Sequence[ToolSpec], instructions: str = DEFAULT_INSTRUCTIONS) -> str:
    """Instructions followed by the Qwen3 tools section (omitted when there are no tools)."""
    if not tools:
        return instructions
    schemas = "\n".join(json.dumps(spec.to_json(), ensure_ascii=False) for spec in tools)
    return f"{instructions}\n\n{TOOLS_SECTION.format(schemas=schemas)}"


def malformed_call_observation(problem: str) -> str:
    return (
        f"Error: the tool call could not be parsed ({problem}). A tool call must be exactly "
        '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )


def unknown_tool_observation(name: str, available: Sequence[str]) -> str:
    return f"Error: there is no tool named {name!r}. Available tools: {', '.join(available) or 'none'}."


def tool_error_observation(message: str) -> str:
    """A ``ToolError`` as the agent sees it; tools name themselves in their messages."""
    return f"Error: {message}"


def tool_failure_observation(name: str, error: BaseException) -> str:
    return f"Error: tool {name!r} failed internally ({type(error).__name__}: {error}). Try another approach."
