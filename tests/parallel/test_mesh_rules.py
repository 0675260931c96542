"""Mesh construction from config and the logical-axis rule resolution."""

import jax
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from expint_jax.parallel import distributed
from expint_jax.parallel.mesh import MeshConfig, make_mesh
from expint_jax.parallel.rules import DEFAULT_RULES, logical_to_spec, rules_from_config


def test_minus_one_takes_the_remaining_devices():
    assert MeshConfig(data=2, fsdp=-1, tensor=2).resolve(8) == (2, 2, 2)
    assert MeshConfig(data=-1, fsdp=1, tensor=4).resolve(8) == (2, 1, 4)
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=2))
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert all(t == AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize("config, message", [
    (MeshConfig(data=-1, fsdp=-1), "at most one axis may be -1"),
    (MeshConfig(data=3, fsdp=-1), "do not divide"),
    (MeshConfig(data=2, fsdp=2, tensor=1), "= 4 but 8 devices"),
    (MeshConfig(data=0), "sizes are positive"),
])
def test_bad_mesh_configs_are_explained(config, message):
    with pytest.raises(ValueError, match=message):
        config.resolve(8)


def test_rules_map_names_and_use_each_mesh_axis_once():
    mesh_shape = {"data": 2, "fsdp": 2, "tensor": 2}
    assert logical_to_spec(("embed", "mlp"), DEFAULT_RULES, mesh_shape, (64, 128)) == P("fsdp", "tensor")
    assert logical_to_spec(("batch", "seq", "act_embed"), DEFAULT_RULES, mesh_shape, (8, 16, 64)) == P(("data", "fsdp"), None, None)
    # heads and mlp both want "tensor": the second one loses it
    assert logical_to_spec(("heads", "mlp"), DEFAULT_RULES, mesh_shape, (4, 8)) == P("tensor", None)


def test_indivisible_dimensions_fall_back_to_replication():
    mesh_shape = {"data": 1, "fsdp": 1, "tensor": 4}
    assert logical_to_spec(("embed", "kv_heads", "head_dim"), DEFAULT_RULES, mesh_shape, (64, 2, 16)) == P(None, None, None)
    assert logical_to_spec(("embed", "kv_heads", "head_dim"), DEFAULT_RULES, mesh_shape, (64, 8, 16)) == P(None, "tensor", None)


def test_rule_overrides_and_unknown_names():
    rules = rules_from_config({"seq": "tensor", "batch": ["data"]})
    assert dict(rules)["seq"] == "tensor" and dict(rules)["batch"] == ("data",)
    with pytest.raises(KeyError, match="unknown logical axis 'sequence'"):
        rules_from_config({"sequence": "tensor"})
    with pytest.raises(KeyError, match="no sharding rule"):
        logical_to_spec(("nonsense",), DEFAULT_RULES)


def test_single_process_initialize_is_a_no_op(monkeypatch):
    for var in ("EXPINT_COORDINATOR", "EXPINT_NUM_PROCESSES", "EXPINT_PROCESS_ID", "SLURM_NTASKS",
                "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.initialize() is False
    assert jax.process_count() == 1
    monkeypatch.setenv("EXPINT_NUM_PROCESSES", "2")
    with pytest.raises(ValueError, match="coordinator_address, num_processes and process_id together"):
        distributed.initialize()
    monkeypatch.setenv("EXPINT_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="EXPINT_NUM_PROCESSES='two' is not an integer"):
        distributed.initialize()


def _clear_launcher_env(monkeypatch):
    for var in ("EXPINT_COORDINATOR", "EXPINT_NUM_PROCESSES", "EXPINT_PROCESS_ID", "SLURM_NTASKS",
                "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(var, raising=False)


def _record_initialize(monkeypatch) -> list[dict]:
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: bool(calls))
    return calls


def test_multi_process_initialize_passes_the_environment_to_jax(monkeypatch):
    _clear_launcher_env(monkeypatch)
    calls = _record_initialize(monkeypatch)
    monkeypatch.setenv("EXPINT_COORDINATOR", "10.0.0.1:1234")
    monkeypatch.setenv("EXPINT_NUM_PROCESSES", "4")
    monkeypatch.setenv("EXPINT_PROCESS_ID", "3")
    assert distributed.initialize() is True
    assert calls == [dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3)]
    assert distributed.initialize() is True and len(calls) == 1  # a second call does not re-initialize


def test_a_cluster_launcher_lets_jax_find_the_coordinator(monkeypatch):
    _clear_launcher_env(monkeypatch)
    calls = _record_initialize(monkeypatch)
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert distributed.initialize() is False and calls == []
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert distributed.initialize() is True
    assert calls == [{}]  # JAX's own SLURM detection supplies the addresses
