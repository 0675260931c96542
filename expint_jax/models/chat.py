"""Qwen3's chat format: conversation text, token ids with loss masks, and the tool-call protocol.

A conversation is rendered as ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message; the
generation prompt is ``<|im_start|>assistant\\n``. Inside assistant content the agent writes
``<think>...</think>``, ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` and
``<answer>...</answer>``; a tool result comes back as a user turn
``<tool_response>\\n...\\n</tool_response>``.

Contract of ``ChatFormat.encode``:
  * Each message is tokenized as three segments, header ``<|im_start|>{role}\\n``, content, and
    footer ``<|im_end|>\\n``, so no token straddles a header or an ``<|im_end|>``. The ids equal
    tokenizing ``render(messages)`` in one piece, except when a content's leading whitespace
    holds a line break: the pre-tokenizer then joins the header's ``\\n`` with it (``"\\n" + "\\n"``
    becomes the single token ``"\\n\\n"``). Per-segment ids are what the model sees when it
    generates after the generation prompt, so they are the ones to train on. Special tokens
    already split the text, so no merge crosses ``<|im_start|>`` or ``<|im_end|>``.
  * ``loss_mask`` is True exactly on assistant content tokens and the assistant's ``<|im_end|>``.
  * ``turn_index`` is k on the header, content and ``<|im_end|>`` of the k-th assistant turn
    (0-based) and -1 elsewhere; the generation prompt counts as the header of the next turn.
  * Content is tokenized as stored: ``<think>`` blocks of earlier turns are kept, unlike Qwen3's
    Jinja template, which drops them before the last user query (an agent's history is what it
    was).
  * Thinking off (``enable_thinking=False``, Qwen3's switch for its hybrid-thinking models such
    as Qwen3-8B): the assistant header is ``<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n``,
    in the generation prompt (as the template's ``enable_thinking=False`` writes it) and in every
    rendered assistant turn. The empty block is prompt, not output: the model never samples it, so
    it is not trained (no loss mask), it is not stored in the turn's content (which stays exactly
    the sampled text, so a recorded teacher signal still aligns), and the prefix each turn is
    trained after is the prompt it was generated from. The template itself keeps the empty block
    only in the last assistant turn; earlier turns keep it here, as generated. Special-token strings inside content (e.g. a web page quoting ``<|im_end|>``) become
    those tokens, as in the released Qwen3 pipeline; masks and spans stay correct regardless.
    Text is NFC-normalized by the tokenizer, so decoding returns the NFC form.

Pad and eos: ``pad_id`` is ``<|endoftext|>``, which is also one of ``eos_ids``. Never derive an
attention or loss mask from ``token_ids != pad_id``; carry explicit lengths or masks.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from expint_jax.records import ROLES, Message

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
END_OF_TEXT = "<|endoftext|>"
THINK_START, THINK_END = "<think>", "</think>"
TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
TOOL_RESPONSE_START, TOOL_RESPONSE_END = "<tool_response>", "</tool_response>"
ANSWER_START, ANSWER_END = "<answer>", "</answer>"
EMPTY_THINK = f"{THINK_START}\n\n{THINK_END}\n\n"  # opens every assistant turn when thinking is off


@dataclasses.dataclass(frozen=True)
class EncodedChat:
    """A tokenized conversation; all arrays have one entry per token."""

    token_ids: np.ndarray  # [T] int32
    loss_mask: np.ndarray  # [T] bool: tokens the assistant wrote (content and its <|im_end|>)
    turn_index: np.ndarray  # [T] int32: k on the k-th assistant turn's tokens, -1 elsewhere
    message_spans: tuple[tuple[int, int], ...]  # [start, end) per message, header to trailing "\n"

    def __post_init__(self) -> None:
        shapes = {name: getattr(self, name).shape for name in ("token_ids", "loss_mask", "turn_index")}
        if len(set(shapes.values())) != 1 or len(shapes["token_ids"]) != 1:
            raise ValueError(f"EncodedChat arrays must be 1-D and of equal length, got shapes {shapes}")

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])


class ChatFormat:
    """Renders and tokenizes conversations in Qwen3's format with a given tokenizer.

    ``enable_thinking=False``: Qwen3's thinking-off mode (module docstring); models without a
    thinking mode (e.g. Qwen3-4B-Instruct-2507) keep the default."""

    def __init__(self, tokenizer: Any, *, enable_thinking: bool = True):
        self.tokenizer = tokenizer
        self.enable_thinking = enable_thinking
        self.im_start_id = self._special_id(IM_START)
        self.im_end_id = self._special_id(IM_END)
        self.endoftext_id = self._special_id(END_OF_TEXT)
        # Encoding needs none of the ids below (the tokenizer maps tags in message text itself).
        # They are looked up so that a tokenizer without Qwen3's tags as single tokens fails here
        # rather than mid-rollout, and are public for code that parses model output.
        self.think_start_id = self._special_id(THINK_START)
        self.think_end_id = self._special_id(THINK_END)
        self.tool_call_start_id = self._special_id(TOOL_CALL_START)
        self.tool_call_end_id = self._special_id(TOOL_CALL_END)
        self.tool_response_start_id = self._special_id(TOOL_RESPONSE_START)
        self.tool_response_end_id = self._special_id(TOOL_RESPONSE_END)
        self._header_texts = {role: f"{role}\n" for role in ROLES}  # after <|im_start|>
        if not enable_thinking:
            self._header_texts["assistant"] += EMPTY_THINK
        self._headers = {role: (self.im_start_id, *self.text_ids(text)) for role, text in self._header_texts.items()}
        self._newline = tuple(self.text_ids("\n"))

    def _special_id(self, token: str) -> int:
        ids = self.tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1 or self.tokenizer.decode(ids) != token:  # decode catches an unknown-token id
            raise ValueError(
                f"tokenizer {type(self.tokenizer).__name__} has no single token for {token!r} "
                f"(it encodes to {ids}); ChatFormat needs a Qwen3 tokenizer"
            )
        return int(ids[0])

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Generation stops at either; ``<|im_end|>`` ends a turn, ``<|endoftext|>`` a document."""
        return (self.im_end_id, self.endoftext_id)

    @property
    def pad_id(self) -> int:
        """``<|endoftext|>``, which is also an eos id: see the module docstring."""
        return self.endoftext_id

    def text_ids(self, text: str) -> list[int]:
        """Token ids of plain text (no chat structure added)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def message_prefix_ids(self, role: str) -> tuple[int, ...]:
        """``<|im_start|>{role}\\n`` (an assistant's with the empty think block when thinking is off)."""
        if role not in self._headers:
            raise ValueError(f"role {role!r} is not one of {ROLES}")
        return self._headers[role]

    def message_suffix_ids(self) -> tuple[int, ...]:
        """``<|im_end|>\\n``."""
        return (self.im_end_id, *self._newline)

    def generation_prompt_ids(self) -> tuple[int, ...]:
        return self._headers["assistant"]

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = False) -> str:
        """The exact text of the conversation."""
        parts = [f"{IM_START}{self._header_texts[m.role]}{m.content}{IM_END}\n" for m in _checked(messages)]
        if add_generation_prompt:
            parts.append(f"{IM_START}{self._header_texts['assistant']}")
        return "".join(parts)

    def encode(self, messages: Sequence[Message], *, add_generation_prompt: bool = False) -> EncodedChat:
        messages = _checked(messages)
        contents = self._batch_text_ids([m.content for m in messages])
        ids: list[int] = []
        mask: list[bool] = []
        turns: list[int] = []
        spans = []
        assistant_turns = 0
        for message, content in zip(messages, contents, strict=True):
            start = len(ids)
            header, body, newline = self._headers[message.role], [*content, self.im_end_id], self._newline
            ids += [*header, *body, *newline]
            is_assistant = message.role == "assistant"
            mask += [False] * len(header) + [is_assistant] * len(body) + [False] * len(newline)
            turn = assistant_turns if is_assistant else -1
            turns += [turn] * (len(header) + len(body)) + [-1] * len(newline)
            assistant_turns += is_assistant
            spans.append((start, len(ids)))
        if add_generation_prompt:
            prompt = self.generation_prompt_ids()
            ids += prompt
            mask += [False] * len(prompt)
            turns += [assistant_turns] * len(prompt)
        return EncodedChat(
            token_ids=np.asarray(ids, dtype=np.int32),
            loss_mask=np.asarray(mask, dtype=bool),
            turn_index=np.asarray(turns, dtype=np.int32),
            message_spans=tuple(spans),
        )

    def encode_prompt(self, messages: Sequence[Message]) -> np.ndarray:
        """The conversation followed by the generation prompt (``<|im_start|>assistant\\n``, and the
        empty think block when thinking is off): the input for generation."""
        return self.encode(messages, add_generation_prompt=True).token_ids

    def _batch_text_ids(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        # One batched call: the Rust backend tokenizes the messages in parallel.
        return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _checked(messages: Sequence[Message]) -> tuple[Message, ...]:
    messages = tuple(messages)
    for i, message in enumerate(messages):
        if not isinstance(message, Message):
            raise TypeError(f"messages[{i}] is a {type(message).__name__}, expected expint_jax.records.Message")
    return messages


# --- the text protocol inside turns ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """A tool call read from assistant text."""

    name: str
    arguments: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class ToolCallError:
    """Why no tool call could be read; ``message`` is written for the agent to see."""

    reason: Literal["missing", "unclosed", "invalid_json", "not_an_object", "missing_name", "bad_arguments"]
    message: str

    def __str__(self) -> str:
        return self.message


def parse_tool_call(text: str) -> ToolCall | ToolCallError:
    """The first ``<tool_call>...</tool_call>`` block of ``text``; never raises on any string.

    A missing ``"arguments"`` key reads as no arguments.
    """
    start = text.find(TOOL_CALL_START)
    if start < 0:
        return ToolCallError("missing", f"no {TOOL_CALL_START} block found")
    body_start = start + len(TOOL_CALL_START)
    end = text.find(TOOL_CALL_END, body_start)
    if end < 0:
        return ToolCallError("unclosed", f"{TOOL_CALL_START} is never closed by {TOOL_CALL_END}")
    body = text[body_start:end].strip()
    try:
        call = json.loads(body)
    except json.JSONDecodeError as e:
        where = f"line {e.lineno}, column {e.colno}"
        return ToolCallError("invalid_json", f"the tool call is not valid JSON: {e.msg} ({where})")
    except (ValueError, RecursionError) as e:  # e.g. integers too long, nesting too deep
        return ToolCallError("invalid_json", f"the tool call is not valid JSON: {e}")
    if not isinstance(call, dict):
        return ToolCallError("not_an_object", f"the tool call must be a JSON object, got {_json_type(call)}")
    name = call.get("name")
    if not isinstance(name, str) or not name.strip():
        return ToolCallError("missing_name", 'the tool call needs a non-empty string "name"')
    arguments = call.get("arguments", {})
    if not isinstance(arguments, dict):
        return ToolCallError(
            "bad_arguments", f'"arguments" of tool {name!r} must be a JSON object, got {_json_type(arguments)}'
        )
    return ToolCall(name=name, arguments=arguments)


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    names |= {int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def format_tool_call(name: str, arguments: Mapping[str, Any]) -> str:
    """The block the agent writes to call ``name``; ``parse_tool_call`` reads it back.

    ``</`` inside JSON strings is written ``<\\/`` (a JSON escape for the same text), so that a
    string such as ``"</tool_call>"`` cannot close the block early.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"tool name must be a non-empty string, got {name!r}")
    if not isinstance(arguments, Mapping):
        raise TypeError(f"arguments of tool {name!r} must be a mapping, got {type(arguments).__name__}")
    try:
        body = json.dumps({"name": name, "arguments": dict(arguments)}, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"arguments of tool {name!r} are not JSON-serializable: {e}") from None
    body = body.replace("</", "<\\/")
    return f"{TOOL_CALL_START}\n{body}\n{TOOL_CALL_END}"


def format_tool_response(text: str) -> str:
    """The content of the user turn that returns a tool's output."""
    return f"{TOOL_RESPONSE_START}\n{text}\n{TOOL_RESPONSE_END}"


def parse_answer(text: str) -> str | None:
    """The stripped content of the last closed ``<answer>...</answer>``, or None."""
    end = text.rfind(ANSWER_END)
    start = text.rfind(ANSWER_START, 0, end) if end >= 0 else -1
    if start < 0:
        return None
    return text[start + len(ANSWER_START) : end].strip()


def strip_think(text: str) -> str:
    """``text`` without its reasoning: closed ``<think>`` blocks, everything before a lone
    ``</think>`` (the opening tag was in the prompt), and an unclosed ``<think>`` to the end."""
    kept = []
    position = 0
    while (start := text.find(THINK_START, position)) >= 0:
        end = text.find(THINK_END, start)
        kept.append(text[position:start])
        if end < 0:
            position = len(text)
            break
        position = end + len(THINK_END)
    kept.append(text[position:])
    remainder = "".join(kept)
    if THINK_END in remainder:
        remainder = remainder.rsplit(THINK_END, 1)[1]
    return remainder.lstrip("\n") if remainder != text else text
