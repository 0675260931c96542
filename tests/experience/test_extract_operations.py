"""The deterministic reconciliation rules and how operations are applied to a pool."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from expint_jax.experience.bank import ExperiencePool
from expint_jax.experience.extract.operations import Operation, apply_operations, reconcile

POOL = ExperiencePool.from_mapping({"G0": "Alpha lesson.", "G1": "Beta lesson.", "G2": "Gamma lesson."},
                                   granularity="principle", iteration=0)


def kinds(notes):
    return [n.kind for n in notes]


def test_unknown_ids():
    ops, notes = reconcile([Operation("UPDATE", "G9", "New text.", ("t1",)), Operation("DELETE", "G8")], POOL)
    assert ops == (Operation("ADD", None, "New text.", ("t1",)),)
    assert kinds(notes) == ["unknown_id_update_as_add", "unknown_id_delete_ignored"]


def test_delete_beats_update_and_first_update_wins():
    ops, notes = reconcile([
        Operation("UPDATE", "G1", "Beta v1.", ("a",)),
        Operation("UPDATE", "G2", "Gamma v1.", ("a",)),
        Operation("UPDATE", "G2", "Gamma v2.", ("b",)),
        Operation("DELETE", "G1", None, ("c",)),
        Operation("NONE"),
    ], POOL)
    assert ops == (Operation("DELETE", "G1", None, ("c", "a")), Operation("UPDATE", "G2", "Gamma v1.", ("a", "b")))
    assert kinds(notes) == ["updates_merged", "delete_beats_update"]


def test_duplicate_adds_are_dropped_against_pool_updates_and_each_other():
    ops, notes = reconcile([
        Operation("ADD", None, "alpha   LESSON", ("a",)),  # the pool has it
        Operation("ADD", None, "Fresh idea.", ("a",)),
        Operation("ADD", None, "fresh idea", ("b",)),  # repeats the previous ADD
        Operation("UPDATE", "G2", "Gamma, sharper.", ("c",)),
        Operation("ADD", None, "Gamma lesson.", ("d",)),  # the old text of an updated item is free again
        Operation("ADD", None, "Gamma, sharper!", ("e",)),  # repeats the update
    ], POOL)
    assert ops == (Operation("UPDATE", "G2", "Gamma, sharper.", ("c",)), Operation("ADD", None, "Fresh idea.", ("a", "b")),
                   Operation("ADD", None, "Gamma lesson.", ("d",)))
    assert kinds(notes) == ["duplicate_add_dropped"] * 3


def test_apply_keeps_identity_and_appends_additions():
    ops, _ = reconcile([Operation("DELETE", "G0"), Operation("UPDATE", "G2", "Gamma v2.", ("t",)),
                        Operation("ADD", None, "Delta lesson.", ("t",))], POOL)
    pool = apply_operations(POOL, ops, granularity="principle", iteration=4)
    assert pool.as_mapping() == {"G1": "Beta lesson.", "G2": "Gamma v2.", "G3": "Delta lesson."}
    assert pool.get("G2").uid == POOL.get("G2").uid and pool.get("G2").iteration == 4
    assert pool.get("G3").source_task_ids == ("t",) and pool.get("G3").iteration == 4


@pytest.mark.parametrize("kwargs, match", [
    ({"kind": "MERGE"}, "not one of"),
    ({"kind": "ADD", "content": " "}, "non-empty content"),
    ({"kind": "DELETE"}, "target id"),
])
def test_operation_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Operation(**kwargs)


operations = st.lists(st.builds(
    lambda kind, target, text: Operation(kind, None if kind == "ADD" else target, text if kind in ("ADD", "UPDATE") else None),
    st.sampled_from(["ADD", "UPDATE", "DELETE", "NONE"]),
    st.sampled_from(["G0", "G1", "G2", "G7"]),
    st.sampled_from(["Alpha lesson.", "New one.", "new ONE", "Other."]),
), max_size=12)


@settings(max_examples=200, deadline=None)
@given(operations)
def test_any_operation_list_reconciles_into_a_valid_pool(ops):
    final, _ = reconcile(ops, POOL)
    assert reconcile(final, POOL)[0] == final  # idempotent
    pool = apply_operations(POOL, final, granularity="principle", iteration=1)
    keys = [" ".join(t.lower().strip(".").split()) for t in pool.as_mapping().values()]
    assert len(keys) == len(set(keys))  # no duplicate lesson survives
    assert len(pool.renumbered()) == len(pool)


def test_an_update_repeating_another_lesson_deletes_its_item():
    ops, notes = reconcile([Operation("UPDATE", "G1", "ALPHA lesson", ("a",)),
                            Operation("UPDATE", "G2", "Shared.", ("b",)), Operation("UPDATE", "G0", "shared", ("c",))],
                           POOL)
    # Pool order decides: G0 takes "shared" first, so G2 repeating it is deleted; G1 may take
    # G0's old text, which G0 gives up.
    assert ops == (Operation("DELETE", "G2", None, ("b",)), Operation("UPDATE", "G0", "shared", ("c",)),
                   Operation("UPDATE", "G1", "ALPHA lesson", ("a",)))
    assert kinds(notes) == ["update_repeats_lesson"]
