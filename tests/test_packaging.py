"""``pip install expint-jax[tpu]`` / ``[cuda]`` resolve against PyPI: jax with its TPU runtime
(libtpu) or its CUDA 12 plugin at jax's own version. A dry run resolves and reads metadata but
installs nothing (``--ignore-installed``: as on a fresh VM). Slow: it needs PyPI and takes minutes
(alone on the shared 2-core machine: 75 s for tpu, 186 s for cuda; this test runs both side by side)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = {"tpu": {"libtpu"}, "cuda": {"jax-cuda12-plugin", "jax-cuda12-pjrt"}}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.mark.slow
def test_the_accelerator_extras_resolve_on_pypi():
    runs = {extra: subprocess.Popen([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
                                     "--quiet", "--report", "-", f"{ROOT}[{extra}]"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for extra in EXTRAS}
    for extra, run in runs.items():
        out, err = run.communicate(timeout=1200)
        assert run.returncode == 0, f"pip could not resolve .[{extra}]:\n{err[-3000:]}"
        versions = {_canonical(item["metadata"]["name"]): item["metadata"]["version"]
                    for item in json.loads(out)["install"]}
        assert EXTRAS[extra] <= versions.keys(), f".[{extra}] resolved without {EXTRAS[extra] - versions.keys()}"
        jax = versions["jax"]
        assert Version(jax) >= Version("0.10.2") and versions["jaxlib"] == jax
        for plugin in EXTRAS[extra] - {"libtpu"}:  # libtpu has its own version line, pinned by jax
            assert versions[plugin] == jax, (plugin, versions[plugin], jax)
