"""Each package's curated API: every exported name resolves, and importing a package stays cheap."""

import importlib
import subprocess
import sys

import pytest

PACKAGES = ("expint_jax.models", "expint_jax.llm", "expint_jax.rollout", "expint_jax.experience", "expint_jax.distill")


@pytest.mark.parametrize("package", PACKAGES)
def test_every_exported_name_resolves(package):
    module = importlib.import_module(package)
    assert module.__all__ and dir(module) == sorted(module.__all__)
    for name in module.__all__:
        assert getattr(module, name).__name__ == name, f"{package}.{name}"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        module.nope  # noqa: B018


def test_importing_the_packages_does_not_import_jax():
    code = f"import sys\nimport {', '.join(PACKAGES)}\nprint('jax' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
