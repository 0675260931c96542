"""What the agent can call: a tool is a named function of JSON arguments that returns text.

Contract:
  * ``Tool.spec`` describes it for the system prompt (name, description, JSON-schema parameters).
  * ``Tool.__call__(arguments)`` returns the observation text. Expected failures (bad arguments,
    a page that does not exist, a sandbox timeout, an HTTP error) raise ``ToolError`` with a
    message meant for the agent; the agent turns it into an observation, never a crash.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable


class ToolError(Exception):
    """A tool call failed in a way the agent should see and can react to."""


@dataclasses.dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    parameters: Mapping[str, Any]  # JSON schema of the arguments object

    def to_json(self) -> dict[str, Any]:
        """The OpenAI/Qwen function-schema form used in system prompts."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": dict(self.parameters)},
        }


@runtime_checkable
class Tool(Protocol):
    spec: ToolSpec

    def __call__(self, arguments: Mapping[str, Any]) -> str: ...


def require_str(arguments: Mapping[str, Any], key: str, tool: str) -> str:
    """Reads a required non-empty string argument or raises a ``ToolError`` the agent can act on."""
    value = arguments.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ToolError(f"{tool}: argument {key!r} must be a non-empty string, got {value!r}")
    return value
