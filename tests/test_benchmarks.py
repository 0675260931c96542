"""The benchmark harness: script and worker environment, and one script end to end at a tiny shape."""

import os
import subprocess
import sys
from pathlib import Path

from benchmarks.common import worker_environment

REPO = Path(__file__).resolve().parents[1]


def test_huge_page_malloc_only_when_asked_and_other_tunables_kept(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert "GLIBC_TUNABLES" not in worker_environment(huge_pages=False)
    assert worker_environment(huge_pages=True)["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    assert worker_environment(True)["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")  # the caller's choice wins
    assert worker_environment(True)["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=0"
    assert worker_environment(False)["PYTHONUNBUFFERED"] == "1"


def _prepared_environment(code: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "OMP_WAIT_POLICY")}
    return subprocess.run([sys.executable, "-c", "from benchmarks.common import prepare_environment\n" + code],
                          cwd=REPO, env={**clean, **env}, capture_output=True, text=True, timeout=120)


def test_prepare_environment_sets_defaults_keeps_callers_and_refuses_after_jax():
    show = "import os; print(os.environ.get('JAX_PLATFORMS'), os.environ.get('OMP_WAIT_POLICY'))"
    assert _prepared_environment(f"prepare_environment()\n{show}").stdout.split() == ["cpu", "None"]
    assert _prepared_environment(f"prepare_environment(passive_openmp=True)\n{show}").stdout.split() == [
        "cpu", "PASSIVE"]
    kept = _prepared_environment(f"prepare_environment(passive_openmp=True)\n{show}", JAX_PLATFORMS="gpu",
                                 OMP_WAIT_POLICY="ACTIVE")
    assert kept.stdout.split() == ["gpu", "ACTIVE"]
    late = _prepared_environment("import jax\nprepare_environment()")
    assert late.returncode != 0 and "before jax is imported" in late.stderr


def test_train_step_benchmark_runs_both_sides_at_a_tiny_shape():
    out = subprocess.run(
        [sys.executable, "benchmarks/bench_train_step.py", "--hidden", "64", "--layers", "1", "--vocab", "512",
         "--seq", "64", "--prefix", "8", "--rounds", "1", "--repeats", "1", "--huge-pages"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ours") or line.startswith("| torch")]
    assert len(rows) == 2, out.stdout
    assert rows[1].split("|")[4].strip() == "1.00x"  # the reference's own ratio
    assert "GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in out.stdout
