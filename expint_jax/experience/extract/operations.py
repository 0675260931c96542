"""Pool edit operations and their deterministic reconciliation (pure functions, no LLM).

An ``Operation`` is what the group-update stage proposes: ``ADD`` a lesson, ``UPDATE`` the text
of an existing id, ``DELETE`` an id, or ``NONE``. ``reconcile`` turns any list of operations into
a consistent one against a pool; it is the fallback of the batch-reconcile LLM call and is also
applied to that call's answer, so the rules below always hold:

  1. ``NONE`` is dropped.
  2. An ``UPDATE`` of an id the pool does not have becomes an ``ADD`` of its content; a
     ``DELETE`` of an unknown id is ignored (notes ``unknown_id_update_as_add`` and
     ``unknown_id_delete_ignored``).
  3. ``DELETE`` beats ``UPDATE``: updates of an id that is also deleted are dropped.
  4. Several ``UPDATE``s of one id: the first in input order wins (an LLM would merge their texts;
     without one, any choice loses information, and the first is stable); sources are merged.
  5. An ``UPDATE`` whose new text equals (case, spacing and punctuation aside) another surviving
     lesson, or an earlier update's, turns into a ``DELETE`` of its id: the lesson lives on.
  6. An ``ADD`` whose text equals (case, spacing and punctuation aside) a surviving pool item, an
     updated text or an earlier ``ADD`` is dropped; its sources join the one it duplicates.

The result lists deletions, then updates (both in pool order), then additions (input order).
Every rule that fired is reported as a ``Note`` so that the caller can log and count it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from expint_jax.experience.bank import ExperiencePool, text_key

OPERATION_KINDS: tuple[str, ...] = ("ADD", "UPDATE", "DELETE", "NONE")


def describe(value: Any, limit: int = 60) -> str:
    """A short description of a value from model output, for error messages; never raises.

    A raw ``repr`` is not safe there: it may be huge, nest past the recursion limit, or refuse
    (Python will not print an integer of more than 4300 digits).
    """
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    if isinstance(value, str):
        return repr(value[:limit]) + ("..." if len(value) > limit else "")
    if isinstance(value, (int, float, bool, type(None))):
        return repr(value)
    return f"a {type(value).__name__}"


@dataclasses.dataclass(frozen=True)
class Operation:
    kind: str
    target_id: str | None = None
    content: str | None = None
    source_task_ids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Operations are built from model output and cached files: check types, not just values.
        if not isinstance(self.kind, str) or self.kind not in OPERATION_KINDS:
            raise ValueError(f"operation kind {describe(self.kind)} is not one of {OPERATION_KINDS}")
        for name in ("target_id", "content"):
            if not isinstance(getattr(self, name), (str, type(None))):
                raise ValueError(f"operation {name} must be a string or null, got {describe(getattr(self, name))}")
        if not isinstance(self.source_task_ids, tuple) or not all(isinstance(s, str) for s in self.source_task_ids):
            raise ValueError("operation source_task_ids must be a tuple of strings")
        if self.kind in ("ADD", "UPDATE") and not (self.content or "").strip():
            raise ValueError(f"{self.kind} operation needs non-empty content")
        if self.kind in ("UPDATE", "DELETE") and not self.target_id:
            raise ValueError(f"{self.kind} operation needs a target id")

    def with_sources(self, task_ids: Iterable[str]) -> Operation:
        return dataclasses.replace(self, source_task_ids=tuple(dict.fromkeys((*self.source_task_ids, *task_ids))))

    def to_json(self) -> dict[str, Any]:
        return {"operation": self.kind, "id": self.target_id, "content": self.content,
                "source_task_ids": list(self.source_task_ids)}

    @classmethod
    def from_json(cls, obj: Any, where: str) -> Operation:
        """The inverse of ``to_json``; anything malformed is a ``ValueError`` naming ``where``."""
        if not isinstance(obj, Mapping):
            raise ValueError(f"{where}: an operation must be an object, got {describe(obj)}")
        sources = obj.get("source_task_ids", [])
        if not isinstance(sources, list):
            raise ValueError(f"{where}: 'source_task_ids' must be a list of strings, got {describe(sources)}")
        try:
            return cls(obj.get("operation"), obj.get("id"), obj.get("content"), tuple(sources))
        except ValueError as e:
            raise ValueError(f"{where}: malformed operation: {e}") from None


@dataclasses.dataclass(frozen=True)
class Note:
    """A reconciliation rule that fired: ``kind`` is stable (for counters), ``detail`` is for logs."""

    kind: str
    detail: str


def reconcile(operations: Sequence[Operation], pool: ExperiencePool) -> tuple[tuple[Operation, ...], tuple[Note, ...]]:
    notes: list[Note] = []
    known = set(pool.ids)
    deletes: dict[str, Operation] = {}
    updates: dict[str, Operation] = {}
    adds: list[Operation] = []
    for op in operations:
        if op.kind == "NONE":
            continue
        if op.kind == "DELETE":
            if op.target_id not in known:
                notes.append(Note("unknown_id_delete_ignored", f"DELETE of unknown id {op.target_id!r} ignored"))
                continue
            previous = deletes.get(op.target_id)
            deletes[op.target_id] = previous.with_sources(op.source_task_ids) if previous else op
        elif op.kind == "UPDATE" and op.target_id not in known:
            notes.append(Note("unknown_id_update_as_add", f"UPDATE of unknown id {op.target_id!r} becomes ADD"))
            adds.append(Operation("ADD", None, op.content, op.source_task_ids))
        elif op.kind == "UPDATE":
            previous = updates.get(op.target_id)
            if previous is not None:
                notes.append(Note("updates_merged", f"second UPDATE of {op.target_id} dropped; the first wins"))
            updates[op.target_id] = previous.with_sources(op.source_task_ids) if previous else op
        else:
            adds.append(op)
    for target in [t for t in updates if t in deletes]:
        notes.append(Note("delete_beats_update", f"UPDATE of {target} dropped: it is deleted"))
        deletes[target] = deletes[target].with_sources(updates.pop(target).source_task_ids)

    seen: dict[str, int] = {}  # text key -> index in kept_adds, or -1 for pool/updated texts
    for item in pool:
        if item.id not in deletes and item.id not in updates:
            seen[text_key(item.text)] = -1
    for target, op in sorted(updates.items(), key=lambda entry: pool.ids.index(entry[0])):
        key = text_key(op.content or "")
        if key in seen:
            notes.append(Note("update_repeats_lesson", f"UPDATE of {target} repeats another lesson; {target} is deleted"))
            deletes[target] = Operation("DELETE", target, None, updates.pop(target).source_task_ids)
        else:
            seen[key] = -1
    kept_adds: list[Operation] = []
    for op in adds:
        key = text_key(op.content or "")
        if key in seen:
            notes.append(Note("duplicate_add_dropped", f"ADD duplicates an existing lesson: {op.content!r}"))
            if seen[key] >= 0:
                kept_adds[seen[key]] = kept_adds[seen[key]].with_sources(op.source_task_ids)
            continue
        seen[key] = len(kept_adds)
        kept_adds.append(op)

    order = {item_id: k for k, item_id in enumerate(pool.ids)}
    ordered = sorted(deletes.values(), key=lambda o: order[o.target_id])
    ordered += sorted(updates.values(), key=lambda o: order[o.target_id])
    return tuple(ordered + kept_adds), tuple(notes)


def apply_operations(pool: ExperiencePool, operations: Sequence[Operation], *, granularity: str,
                     iteration: int | None, writer: str | None = None) -> ExperiencePool:
    """Applies reconciled operations; ids refer to ``pool`` as given (nothing is renumbered here)."""
    for op in operations:
        if op.kind == "DELETE":
            pool = pool.delete(op.target_id)
        elif op.kind == "UPDATE":
            pool = pool.update(op.target_id, op.content, iteration=iteration, source_task_ids=op.source_task_ids,
                               writer=writer)
        elif op.kind == "ADD":
            pool = pool.add(op.content, granularity=granularity, iteration=iteration,
                            source_task_ids=op.source_task_ids, writer=writer)
    return pool
