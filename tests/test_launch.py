"""launch/*.sh: ``bash -n`` clean (and ``shellcheck`` clean where it is installed); ``--dry-run``
prints the exact commands and runs none; an API key's value never appears, only its name."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))
SECRET = "launch-test-secret-value"
TINY = "--config=configs/loop_tiny.py"


def _dry_run(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    environ.update(env or {}, TMPDIR="/tmp")
    return subprocess.run(["bash", str(LAUNCH / script), "--dry-run", *args], capture_output=True, text=True,
                          env=environ, timeout=60, cwd=ROOT)


def _commands(out: str) -> list[str]:
    return [line for line in out.splitlines() if line and not line.startswith("#")]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_scripts_are_shellcheck_clean():
    subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS)], check=True, cwd=ROOT)


def test_local_dry_run():
    done = _dry_run("local.sh", "--setup", "--extra", "cuda", "--config=configs/paper/qwen3_4b.py:8xh100",
                    "--config.iterations=1", env={"DEEPSEEK_API_KEY": SECRET})
    assert done.returncode == 0, done.stderr
    assert _commands(done.stdout) == [
        f"cd {ROOT}",
        "python3 -m venv .venv",
        ".venv/bin/pip install -e '.[cuda]'",
        ".venv/bin/expint doctor --config=configs/paper/qwen3_4b.py:8xh100 --config.iterations=1",
        ".venv/bin/expint run --config=configs/paper/qwen3_4b.py:8xh100 --config.iterations=1",
    ]
    assert "# SERPER_API_KEY is not set here" in done.stdout and SECRET not in done.stdout + done.stderr
    default = _dry_run("local.sh")
    assert _commands(default.stdout)[-1] == f".venv/bin/expint run {TINY}"


def test_tpu_vm_dry_run_creates_ships_installs_and_runs_on_every_worker():
    done = _dry_run("tpu_vm.sh", "--name", "exp", "--zone", "us-east5-a", "--project", "proj", "--type", "v5p-32",
                    "--queued", "--config=configs/paper/qwen3_4b.py:v5p-32", "--config.name=it's",
                    env={"DEEPSEEK_API_KEY": SECRET, "SERPER_API_KEY": SECRET, "JINA_API_KEY": SECRET})
    assert done.returncode == 0, done.stderr
    where = "--zone=us-east5-a --project=proj"
    run_args = "--config=configs/paper/qwen3_4b.py:v5p-32 '--config.name=it'\\''s'"
    commands = _commands(done.stdout)
    assert commands[0] == (f"gcloud compute tpus queued-resources create exp --node-id=exp {where} "
                           "--accelerator-type=v5p-32 --runtime-version=v2-alpha-tpuv5")
    assert commands[1] == f"gcloud compute tpus queued-resources describe exp {where} '--format=value(state.state)'"
    assert commands[2] == (f"tar -czf /tmp/expint-src.tar.gz -C {ROOT} --exclude=./.git --exclude=./.venv "
                           "--exclude=./runs --exclude=__pycache__ .")
    assert commands[3] == f"gcloud compute tpus tpu-vm scp /tmp/expint-src.tar.gz 'exp:~/expint-src.tar.gz' {where} --worker=all"
    assert commands[4].startswith(f"gcloud compute tpus tpu-vm ssh exp {where} --worker=all '--command=mkdir -p ~/expint")
    assert "pip install --quiet -e '\\''.[tpu]'\\''" in commands[4]
    assert commands[5] == f"gcloud compute tpus tpu-vm scp \"$ENV_FILE\" 'exp:~/.expint_env' {where} --worker=all"
    assert commands[6] == (f"gcloud compute tpus tpu-vm ssh exp {where} --worker=all '--command=cd ~/expint && "
                           "chmod 600 ~/.expint_env && . ~/.expint_env && "
                           f"python3 -m expint_jax.cli doctor {run_args} && python3 -m expint_jax.cli run {run_args}'"
                           .replace(run_args, run_args.replace("'", "'\\''")))
    assert len(commands) == 7
    assert "DEEPSEEK_API_KEY SERPER_API_KEY JINA_API_KEY" in done.stdout and SECRET not in done.stdout + done.stderr
    direct = _commands(_dry_run("tpu_vm.sh", "--name", "exp", "--zone", "z", "--type", "v4-8", "--spot", TINY).stdout)
    assert direct[0] == ("gcloud compute tpus tpu-vm create exp --zone=z --accelerator-type=v4-8 "
                         "--version=tpu-ubuntu2204-base --spot")
    detached = _commands(_dry_run("tpu_vm.sh", "--name", "exp", "--zone", "z", "--detach", TINY).stdout)[-1]
    assert f"&& nohup python3 -m expint_jax.cli run {TINY} > ~/expint/launch.log 2>&1 < /dev/null &'" in detached


def test_slurm_dry_run_writes_one_process_per_node_with_a_coordinator():
    done = _dry_run("slurm.sh", "--setup", "--nodes", "2", "--partition", "gpu", "--account", "acct",
                    "--config=configs/paper/qwen3_8b.py:8xh100", env={"SERPER_API_KEY": SECRET})
    assert done.returncode == 0, done.stderr
    venv = f"{ROOT}/.venv"
    lines = done.stdout.splitlines()
    assert _commands(done.stdout)[:3] == [f"python3 -m venv {venv}", f"{venv}/bin/pip install -e '{ROOT}[cuda]'",
                                          f"mkdir -p {ROOT}/runs/slurm"]
    assert lines[-1] == f"sbatch {ROOT}/runs/slurm/expint.sbatch"
    batch = done.stdout.split("<<'SBATCH'\n", 1)[1].split("\nSBATCH\n", 1)[0]
    for directive in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--partition=gpu", "--account=acct",
                      "--export=ALL"):
        assert f"#SBATCH {directive}\n" in batch
    assert 'export EXPINT_COORDINATOR="$head_node:12321"' in batch and 'EXPINT_NUM_PROCESSES="$SLURM_NNODES"' in batch
    assert ("srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c 'EXPINT_PROCESS_ID=$SLURM_PROCID exec \"$@\"' "
            'each_node "$@"') in batch
    assert batch.rstrip().splitlines()[-2:] == [
        f"each_node {venv}/bin/expint doctor --config=configs/paper/qwen3_8b.py:8xh100",
        f"each_node {venv}/bin/expint run --config=configs/paper/qwen3_8b.py:8xh100"]
    assert SECRET not in done.stdout + done.stderr
    parsed = subprocess.run(["bash", "-n"], input=batch, text=True, capture_output=True)
    assert parsed.returncode == 0, parsed.stderr


@pytest.mark.parametrize("script, args, message", [
    ("tpu_vm.sh", ["--zone", "z", TINY], "--name NAME is required"),
    ("tpu_vm.sh", ["--name", "n", "--zone", "z"], "give the expint run arguments"),
    ("slurm.sh", [TINY], "--nodes N is required"),
    ("local.sh", ["--extra", "rocm"], "--extra rocm: choose tpu, cuda or none"),
])
def test_missing_or_bad_options_are_one_line_with_status_2(script, args, message):
    done = _dry_run(script, *args)
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1
