"""Counters and log lines of one extraction run: LLM calls, retries, cache hits, fallbacks.

Every fallback and reconciliation rule has a stable ``kind`` (listed in ``FALLBACKS`` and
``operations``' notes). Each occurrence is counted and logged as
``"extraction fallback <kind>: <detail>"`` (WARNING) or ``"extraction note <kind>: <detail>"``
(INFO), so a run's log can be grepped for exactly what fired. ``RunStats.to_json`` is what the
pipeline writes to ``stats.json`` in its work directory after every stage.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

log = logging.getLogger("expint_jax.experience.extract")

FALLBACKS: dict[str, str] = {
    "summary_from_trajectory": "a rollout summary failed; a digest of the trajectory text is used instead",
    "critique_no_lessons": "a group critique failed; the group proposes no lesson",
    "group_update_as_add": "a group update failed; its proposals are added as plain ADDs",
    "invalid_operation_dropped": "an element of an operation list was malformed and dropped",
    "reconcile_deterministic": "the batch reconcile failed; the deterministic rules are applied to all operations",
    "reconcile_dropped_all": "the batch reconcile kept none of the proposed ADD/UPDATE operations; the "
                             "deterministic rules are applied to all operations",
    "consolidate_truncate": "consolidation failed; the pool is cut to max_pool_size items (the first ones, or "
                            "this run's new and rewritten lessons first, by ExtractionConfig.truncation)",
    "cache_damaged_redone": "a stage output on disk did not read back; its item is computed again",
    "unknown_id_update_as_add": "an UPDATE named an id the pool does not have; it became an ADD",
    "unknown_id_delete_ignored": "a DELETE named an id the pool does not have; it was ignored",
}


class RunStats:
    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()  # LLM requests sent, per stage
        self.retries: Counter[str] = Counter()  # requests that repeated an earlier one, per stage
        self.failures: Counter[str] = Counter()  # failed answers (errors, empty, unparseable), per stage
        self.cached: Counter[str] = Counter()  # items found on disk and not recomputed, per stage
        self.fallbacks: Counter[str] = Counter()
        self.notes: Counter[str] = Counter()
        self.info: dict[str, Any] = {}

    def fallback(self, kind: str, detail: str) -> None:
        if kind not in FALLBACKS:
            raise KeyError(f"unknown fallback kind {kind!r}; known: {sorted(FALLBACKS)}")
        self.fallbacks[kind] += 1
        log.warning("extraction fallback %s: %s", kind, detail)

    def note(self, kind: str, detail: str) -> None:
        """A rule that fired; the unknown-id rules are fallbacks, the rest is routine."""
        if kind in FALLBACKS:
            self.fallback(kind, detail)
            return
        self.notes[kind] += 1
        log.info("extraction note %s: %s", kind, detail)

    def to_json(self) -> dict[str, Any]:
        return {
            "calls": dict(self.calls),
            "retries": dict(self.retries),
            "failures": dict(self.failures),
            "cached": dict(self.cached),
            "fallbacks": dict(self.fallbacks),
            "notes": dict(self.notes),
            **self.info,
        }
