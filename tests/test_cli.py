"""The ``expint`` dispatcher (multi-host start-up, one-line user errors, ``--help`` and ``--debug`` everywhere,
compile notices) and the ``check-model`` command."""

import json
import os
import subprocess
import sys
import time
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


# --- Trust (issue 13): one-line errors before any work, --help everywhere, --debug, compile notices.

def _one_line_error(capsys, command: str, *needles: str) -> str:
    captured = capsys.readouterr()
    err = captured.err
    assert err.count("\n") == 1 and err.startswith(f"expint {command}: "), err
    assert "Traceback" not in err + captured.out
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture
def corrupt_checkpoint(tmp_path):
    """A Hugging Face directory (config, tokenizer) whose safetensors file is not one."""
    from expint_jax.models.parity import build_tiny_checkpoint
    from expint_jax.models.tokenizer import build_offline_qwen3_tokenizer, save_tokenizer

    directory = build_tiny_checkpoint(tmp_path / "ckpt")
    save_tokenizer(build_offline_qwen3_tokenizer(), directory)
    (directory / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    return directory


def _trajectory_files(tmp_path):
    from expint_jax import storage
    from tests.distill.conftest import make_trajectory

    good = make_trajectory(1, task_id="a").to_json()
    missing = {k: v for k, v in good.items() if k != "messages"}
    files = {"malformed.jsonl": json.dumps(good) + "\n{\"task_id\": \"b\"\n", "empty.jsonl": "",
             "missing.jsonl": json.dumps(missing) + "\n"}
    for name, text in files.items():
        storage.write_text(tmp_path / name, text)
    return tmp_path


@pytest.mark.parametrize("probe, needles", [
    ("--config=/nonexistent/cfg.py", ["config file /nonexistent/cfg.py does not exist"]),
    ("--config.model.checkpoint=/nonexistent", ["config.model.checkpoint='/nonexistent'", "no config.json"]),
    ("--config.data.demo.granularity=principle", ["config.data.demo.granularity: unknown key",
                                                  "valid keys at config.data.demo: eval_tasks_per_level"]),
    ("--config.mesh.data=3", ["config.mesh:", "xla_force_host_platform_device_count"]),
    ("DATA/malformed.jsonl", ["malformed.jsonl:2: not valid JSON"]),
    ("DATA/empty.jsonl", ["empty.jsonl']: no trajectory records"]),
    ("DATA/missing.jsonl", ["missing.jsonl:1: field 'messages': missing"]),
    ("CORRUPT", ["model.safetensors: not a readable safetensors file"]),
])
def test_distill_probes_fail_on_one_line_before_writing(tmp_path, capsys, request, probe, needles):
    out = tmp_path / "out"
    if probe.startswith("DATA/"):
        probe = f"--config.data.train=('{_trajectory_files(tmp_path) / probe[5:]}',)"
    elif probe == "CORRUPT":
        probe = f"--config.model.checkpoint={request.getfixturevalue('corrupt_checkpoint')}"
    assert cli.main(["distill", probe, f"--config.output_dir={out}", "--config.trainer.progress_bar=False"]) == 2
    _one_line_error(capsys, "distill", *needles)
    assert not out.exists()


def test_run_names_an_unknown_key_by_its_full_path(tmp_path, capsys):
    assert cli.main(["run", "--config.bogus=1", f"--config.runs_dir={tmp_path}"]) == 2
    _one_line_error(capsys, "run", "config.bogus: unknown key; valid keys at config: ")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_command_answers_help(name, capsys):
    assert cli.main([name, "--help"]) == 0
    out = capsys.readouterr().out
    assert f"expint {name}" in out and len(out.splitlines()) > 3


def test_debug_keeps_the_traceback_and_bugs_always_do(fake_commands, monkeypatch, capsys):
    monkeypatch.setenv("EXPINT_DEBUG", "0")  # restored afterwards: --debug sets it for child processes
    with pytest.raises(Exception, match="config file /nonexistent.py does not exist"):
        cli.main(["distill", "--config=/nonexistent.py", "--debug"])
    monkeypatch.setenv("EXPINT_DEBUG", "0")

    def buggy(argv):
        raise RuntimeError("an index out of range in our code")

    sys.modules["fake_host-job"].main = buggy
    with pytest.raises(RuntimeError, match="our code"):
        cli.main(["host-job"])


def test_distill_show_config_lists_every_field(capsys):
    assert cli.main(["distill", "--show-config", "--config.trainer.epochs=3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "config.trainer.epochs = 3" in lines and "config.mesh.fsdp = -1" in lines
    assert "config.model.checkpoint = ''" in lines and "config.data.budget.max_student_tokens = 4096" in lines


def test_commands_silence_transformers_advisories(fake_commands, monkeypatch):
    monkeypatch.delenv("TRANSFORMERS_NO_ADVISORY_WARNINGS", raising=False)
    monkeypatch.setenv("TRANSFORMERS_NO_ADVISORY_WARNINGS", "")  # recorded, so the test leaves it as it was
    monkeypatch.delenv("TRANSFORMERS_NO_ADVISORY_WARNINGS")
    assert cli.main(["host-job"]) == 0
    assert os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] == "1"  # "PyTorch was not found" is an advisory


@pytest.mark.slow
def test_a_probe_as_a_user_runs_it_without_torch(tmp_path):
    """In a fresh process with PyTorch hidden: one line on stderr, no banner, exit status 2."""
    code = ("import importlib.util, sys; find = importlib.util.find_spec; "
            "importlib.util.find_spec = lambda name, *a, **k: None if name == 'torch' else find(name, *a, **k); "
            "from expint_jax import cli; "
            f"sys.exit(cli.main(['distill', '--config.model.checkpoint=/nonexistent', '--config.output_dir={tmp_path}/o']))")
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("expint distill: config.model.checkpoint='/nonexistent'")


def test_long_compiles_are_announced(capsys):
    from expint_jax.cli.compile_notice import announced_compiles

    lines = []
    with announced_compiles(after_s=0.0, echo=lines.append):
        jax.jit(lambda x: x * 3 + 1)(jax.numpy.ones(7))
        for _ in range(100):  # the notice is printed from a timer thread
            if any(line.startswith("compiled") for line in lines):
                break
            time.sleep(0.01)
    assert any(line.startswith("compiling jit(") and "with XLA (first call" in line for line in lines)
    assert any(line.startswith("compiled jit(") for line in lines)
    lines.clear()
    with announced_compiles(after_s=60.0, echo=lines.append):
        jax.jit(lambda x: x * 5 - 2)(jax.numpy.ones(7))
    assert lines == []  # short compiles stay silent


def test_check_model_mesh_and_checkpoint_mistakes_are_one_line(tmp_path, capsys):
    assert cli.main(["check-model", "--mesh", "2,2"]) == 2
    _one_line_error(capsys, "check-model", "--mesh must be three comma-separated integers")
    assert cli.main(["check-model", "--mesh", "3,-1,1", "--no-parity"]) == 2
    _one_line_error(capsys, "check-model", "--mesh 3,-1,1: mesh: 8 devices do not divide",
                    "xla_force_host_platform_device_count")
    assert cli.main(["check-model", "--checkpoint", str(tmp_path), "--no-parity"]) == 2
    _one_line_error(capsys, "check-model", f"--checkpoint {tmp_path}: no Hugging Face checkpoint there")
    assert cli.main(["check-model", "--tokens", "many"]) == 2
    _one_line_error(capsys, "check-model", "argument --tokens: invalid int value: 'many'; see expint check-model --help")


def test_run_show_config_lists_every_field(tmp_path, capsys):
    assert cli.main(["run", "--show-config", f"--config.runs_dir={tmp_path}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"config.runs_dir = '{tmp_path}'" in lines and any(line.startswith("config.iterations = ") for line in lines)
    assert not list(tmp_path.iterdir())
