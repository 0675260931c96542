"""Lenient parsers for the extraction LLM's answers.

Contract: every public parser either returns a well-typed value or raises ``ParseError`` with a
short reason (the reason is fed back to the model on a retry). No other exception escapes, for
any input string; the property tests check this on arbitrary text.

Bounds: an answer is cut at ``MAX_ANSWER_CHARS``, and an integer of more than ``MAX_INT_DIGITS``
digits makes its candidate invalid (no id, count or year is that long; it is a runaway
generation, and Python refuses to print integers past 4300 digits, so it would otherwise fail
far from here). Error messages describe values with ``operations.describe``, never a raw repr.

Leniency, in the order tried: the contents of each Markdown code fence, the whole answer, then
each balanced ``[...]`` / ``{...}`` span in the text (prose around the JSON is ignored). Each
candidate is decoded as strict JSON first, then as a Python-style literal, which accepts single
quotes, trailing commas, ``True``/``None`` as well as ``true``/``null``.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import json
import re
import tokenize
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from expint_jax.experience.extract.operations import OPERATION_KINDS, Operation, describe

T = TypeVar("T")

MAX_ANSWER_CHARS = 200_000  # longer answers are cut: a runaway generation, not a pool
MAX_INT_DIGITS = 64  # longer integers invalidate their candidate (see the module docstring)
_INT_LIMIT = 10**MAX_INT_DIGITS
_MAX_SPANS = 16  # bracketed spans tried per answer
_FENCE = re.compile(r"```[ \t]*[A-Za-z0-9_+-]*[ \t]*\n?(.*?)```", re.DOTALL)
_EXPERIENCES = re.compile(r"<experiences?>(.*?)(?:</experiences?>|\Z)", re.DOTALL | re.IGNORECASE)
_BULLET = re.compile(r"^\s*(?:[-*•]+\s*|#+\s*|(?:\d{1,2}[.)]|\(\d{1,2}\)|\[\d{1,2}\]\.?)\s+)")
_LITERAL_NAMES = {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}


class ParseError(ValueError):
    """The answer does not contain what was asked for; ``str(e)`` says what is wrong."""


def clean_text(text: str) -> str:
    """One line, single spaces, no list marker or wrapping quotes."""
    text = " ".join(str(text).split())
    text = _BULLET.sub("", text, count=1).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
        text = text[1:-1].strip()
    return text


def loads_lenient(answer: str) -> Any:
    """The first JSON-like value found in ``answer``."""
    return _first_valid(answer, lambda value: value)


def json_values(answer: str) -> Iterator[Any]:
    """Every JSON-like value found in ``answer``, most likely first (see the module docstring)."""
    if not isinstance(answer, str):
        raise ParseError(f"expected text, got {type(answer).__name__}")
    for candidate in _candidates(answer[:MAX_ANSWER_CHARS]):
        try:
            yield _decode(candidate)
        except ParseError:
            continue


def _first_valid(answer: str, interpret: Callable[[Any], T]) -> T:
    """``interpret`` of the first value it accepts; prose may hold bracketed text like "[1]"."""
    first_error: ParseError | None = None
    for value in json_values(answer):
        try:
            return interpret(value)
        except ParseError as e:
            first_error = first_error or e
    raise first_error or ParseError("no JSON value found in the answer")


def _candidates(answer: str) -> Iterator[str]:
    for match in _FENCE.finditer(answer):
        yield match.group(1)
    yield answer
    yield from _bracketed_spans(answer)


def _bracketed_spans(text: str) -> Iterator[str]:
    """Balanced ``[...]``/``{...}`` spans, quotes respected, from the first few openers."""
    closer = {"[": "]", "{": "}"}
    starts = [i for i, ch in enumerate(text) if ch in closer][:_MAX_SPANS]
    for start in starts:
        stack: list[str] = []
        quote: str | None = None
        escaped = False
        for i in range(start, len(text)):
            ch = text[i]
            if quote:
                if escaped:
                    escaped = False
                elif ch == "\\":
                    escaped = True
                elif ch == quote:
                    quote = None
            elif ch in "\"'":
                quote = ch
            elif ch in closer:
                stack.append(closer[ch])
            elif ch in "]}":
                if not stack or stack.pop() != ch:
                    break
                if not stack:
                    yield text[start : i + 1]
                    break


def _decode(candidate: str) -> Any:
    candidate = candidate.strip()
    if not candidate:
        raise ParseError("empty")
    try:
        return json.loads(candidate, parse_int=_bounded_int)
    except (ValueError, RecursionError):  # ValueError covers JSONDecodeError and over-long integers
        pass
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences such as JSON's "\/"
            source = candidate.replace("\\/", "/")
            tree = ast.parse(source, mode="eval")
        if _has_comment(source):  # "0 # [1]" parses as 0: prose after a '#' is not part of a value
            raise ValueError("a comment in the literal")
        return _literal(tree.body)
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError) as e:
        raise ParseError(f"not a literal: {type(e).__name__}") from None


def _has_comment(source: str) -> bool:
    try:
        return any(t.type == tokenize.COMMENT for t in tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, SyntaxError):
        return True


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise ParseError(f"an integer of {len(digits)} digits")
    return int(digits)


def _literal(node: ast.AST) -> Any:
    """Like ``ast.literal_eval`` for containers and constants, plus JSON's true/false/null."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (str, int, float, bool, type(None))):
        if isinstance(node.value, int) and abs(node.value) >= _INT_LIMIT:  # e.g. a long hex literal
            raise ValueError("integer too long")
        return node.value
    if isinstance(node, ast.Name) and node.id in _LITERAL_NAMES:
        return _LITERAL_NAMES[node.id]
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):  # a ** expansion
            raise ValueError("dict expansion")
        return {_hashable(_literal(k)): _literal(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _literal(node.operand)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return -value if isinstance(node.op, ast.USub) else value
    raise ValueError(f"unsupported {type(node).__name__}")


def _hashable(key: Any) -> Any:
    if isinstance(key, (list, dict)):
        raise ValueError("unhashable key")
    return key


def parse_experiences(answer: str, max_items: int) -> list[str]:
    """Lessons inside ``<Experiences>...</Experiences>``, one per line (or a JSON list of strings)."""
    if not isinstance(answer, str):
        raise ParseError(f"expected text, got {type(answer).__name__}")
    match = _EXPERIENCES.search(answer[:MAX_ANSWER_CHARS])
    if match is None:
        raise ParseError("no <Experiences>...</Experiences> block")
    body = match.group(1)
    lines: list[Any]
    try:
        value = loads_lenient(body)
        lines = value if isinstance(value, list) and all(isinstance(v, str) for v in value) else body.splitlines()
    except ParseError:
        lines = body.splitlines()
    lessons = [clean_text(line) for line in lines]
    lessons = [lesson for lesson in lessons if lesson]
    if not lessons:
        raise ParseError("the <Experiences> block is empty")
    return list(dict.fromkeys(lessons))[:max_items]


@dataclasses.dataclass(frozen=True)
class ParsedOperations:
    operations: tuple[Operation, ...]
    rejected: tuple[str, ...]  # why each dropped element was dropped


def parse_operations(answer: str) -> ParsedOperations:
    """A list of ``{"operation", "id", "content"}``; malformed elements are dropped and reported.

    An empty list is a valid answer (nothing to change). A list whose elements are all malformed
    is a ``ParseError``, so that the caller retries.
    """
    return _first_valid(answer, _operations)


def _operations(value: Any) -> ParsedOperations:
    if isinstance(value, dict):
        value = value.get("operations", [value]) if "operation" not in value else [value]
    if not isinstance(value, list):
        raise ParseError(f"expected a JSON list of operations, got {type(value).__name__}")
    operations: list[Operation] = []
    rejected: list[str] = []
    for index, element in enumerate(value):
        try:
            operations.append(_operation(element))
        except ParseError as e:
            rejected.append(f"element {index}: {e}")
    if value and not operations:
        raise ParseError("no valid operation in the list (" + "; ".join(rejected)[:300] + ")")
    return ParsedOperations(tuple(operations), tuple(rejected))


def _operation(element: Any) -> Operation:
    if not isinstance(element, dict):
        raise ParseError(f"expected an object, got {type(element).__name__}")
    kind = element.get("operation", element.get("op"))
    if not isinstance(kind, str) or kind.strip().upper() not in OPERATION_KINDS:
        raise ParseError(f"'operation' must be one of {OPERATION_KINDS}, got {describe(kind)}")
    kind = kind.strip().upper()
    target = normalize_id(element.get("id"))
    content = element.get("content")
    content = clean_text(content) if isinstance(content, str) else None
    if kind in ("ADD", "UPDATE") and not content:
        raise ParseError(f"{kind} needs a non-empty 'content'")
    if kind in ("UPDATE", "DELETE") and target is None:
        raise ParseError(f"{kind} needs an 'id'")
    return Operation(kind, target if kind != "ADD" else None, content if kind in ("ADD", "UPDATE") else None)


def normalize_id(value: Any) -> str | None:
    """``"G3"``, ``"[G3]"``, ``"g3"`` and ``3`` all name ``G3``; other text stays as written.

    Not an id (``None``): null, booleans, negative numbers, integers of more than
    ``MAX_INT_DIGITS`` digits, and anything that is neither text nor an integer. Over-long digit
    runs in text stay as written too: an unknown id, which reconciliation handles.
    """
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return f"G{value}" if 0 <= value < _INT_LIMIT else None
    if not isinstance(value, str):
        return None
    text = value.strip().strip("[]().").strip()
    if not text or text.lower() in ("null", "none"):
        return None
    match = re.fullmatch(rf"[Gg]?(\d{{1,{MAX_INT_DIGITS}}})", text)
    return f"G{int(match.group(1))}" if match else text


def parse_pool_rewrite(answer: str) -> list[tuple[str | None, str]]:
    """A rewritten pool as ``(id it continues or None, text)`` pairs, in order.

    Accepts ``{"G0": "text", ...}``, ``["text", ...]`` or ``[{"id": ..., "content": ...}, ...]``.
    """
    return _first_valid(answer, _pool_pairs)


def _pool_pairs(value: Any) -> list[tuple[str | None, str]]:
    pairs: list[tuple[str | None, str]] = []
    for source, text in _pool_entries(value):
        if not isinstance(text, str) or not clean_text(text):
            raise ParseError(f"every lesson must be a non-empty string, got {describe(text)}")
        pairs.append((source, clean_text(text)))
    if not pairs:
        raise ParseError("the rewritten pool is empty")
    return pairs


def _pool_entries(value: Any) -> list[tuple[str | None, Any]]:
    if isinstance(value, dict) and isinstance(value.get("pool"), (list, dict)):
        value = value["pool"]  # an object wrapping the pool
    if isinstance(value, dict):
        return [(normalize_id(k), v) for k, v in value.items()]
    if isinstance(value, list):
        return [
            (normalize_id(e.get("id")), e.get("content", e.get("text"))) if isinstance(e, dict) else (None, e)
            for e in value
        ]
    raise ParseError(f"expected a JSON object or list of lessons, got {type(value).__name__}")
