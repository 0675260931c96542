"""The ``expint`` dispatcher (multi-host start-up included) and the ``check-model`` command."""

import sys
import types

import jax
import pytest

from expint_jax import cli


def test_help_lists_commands(capsys):
    assert cli.main(["--help"]) == 0
    assert "check-model" in capsys.readouterr().out


def test_unknown_command_is_an_error(capsys):
    assert cli.main(["train-everything"]) == 2
    assert "unknown command 'train-everything'" in capsys.readouterr().err


@pytest.fixture
def fake_commands(monkeypatch):
    """Two commands, one using devices; each records whether JAX was initialized when it ran."""
    events = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: events.append(("initialize", kwargs)))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: any(e[0] == "initialize" for e in events))
    for name, uses_devices in [("device-job", True), ("host-job", False)]:
        module = types.ModuleType(f"fake_{name}")
        module.main = lambda argv, name=name: events.append((name, argv)) or 0
        monkeypatch.setitem(sys.modules, module.__name__, module)
        monkeypatch.setitem(cli.COMMANDS, name, cli.Command(module.__name__, "test", uses_devices=uses_devices))
    for var in ("EXPINT_COORDINATOR", "EXPINT_NUM_PROCESSES", "EXPINT_PROCESS_ID", "SLURM_NTASKS",
                "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(var, raising=False)
    return events


def test_multi_process_start_up_runs_before_a_device_command(fake_commands, monkeypatch):
    monkeypatch.setenv("EXPINT_COORDINATOR", "10.0.0.1:1234")
    monkeypatch.setenv("EXPINT_NUM_PROCESSES", "2")
    monkeypatch.setenv("EXPINT_PROCESS_ID", "1")
    assert cli.main(["device-job", "--x"]) == 0
    assert fake_commands == [
        ("initialize", dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1)),
        ("device-job", ["--x"]),
    ]


def test_single_process_start_up_is_a_no_op_and_host_commands_skip_it(fake_commands, monkeypatch):
    assert cli.main(["device-job"]) == 0
    assert fake_commands == [("device-job", [])]
    monkeypatch.setenv("EXPINT_NUM_PROCESSES", "2")  # incomplete: would be an error if it were read
    assert cli.main(["host-job"]) == 0
    assert fake_commands[-1] == ("host-job", [])


def test_check_model_on_a_2x2x2_mesh_reports_shardings_and_parity(capsys):
    assert cli.main(["check-model", "--mesh", "2,2,2", "--tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2}" in out
    assert "P(None, 'fsdp', 'tensor', None)" in out  # q_proj
    assert "max |logit diff|" in out and out.rstrip().endswith("OK")


def test_check_model_without_torch(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails, as without the extra
    assert cli.main(["check-model", "--mesh", "1,-1,1", "--no-parity"]) == 0
    out = capsys.readouterr().out
    assert "tiny random Qwen3 (built offline)" in out and "layers/q_proj" in out
    assert cli.main(["check-model", "--mesh", "1,-1,1"]) == 2
    assert "pip install 'expint-jax[parity]'" in capsys.readouterr().err
