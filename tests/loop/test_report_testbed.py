"""The report says what a SimWeb testbed builds in: the scripted agent's designed effects, or the organism's record."""

from expint_jax import storage
from expint_jax.loop.report import describe_testbed


def test_reference_policy_states_its_designed_effects():
    note = describe_testbed({"env": "simweb", "policy": {"backend": "reference", "reference_mistake_rate": 0.3,
                                                     "reference_sensitive": True}})
    assert "never acts" in note and "Open the source" in note and "Answer promptly" in note
    insensitive = describe_testbed({"env": "simweb", "policy": {"backend": "reference", "reference_sensitive": False}})
    assert "ignores experience" in insensitive and "Open the source" not in insensitive


def test_the_organism_names_what_is_designed_and_what_emerges(tmp_path):
    storage.write_json(tmp_path / "organism.json", {"command": ["expint", "organism", "bootstrap", "--out", "x"]})
    note = describe_testbed({"env": "simweb", "policy": {"backend": "local"}, "model": {"checkpoint": str(tmp_path)}})
    assert "model organism" in note and "expint organism bootstrap --out x" in note
    assert "Designed in" in note and "Not designed" in note


def test_other_runs_have_no_note(tmp_path):
    assert describe_testbed(None) == ""
    assert describe_testbed({"env": "webwalker", "policy": {"backend": "local"}}) == ""
    assert describe_testbed({"env": "simweb", "policy": {"backend": "local"}, "model": {"checkpoint": ""}}) == ""
    assert describe_testbed({"env": "simweb", "policy": {"backend": "local"}, "model": {"checkpoint": str(tmp_path)}}) == ""
