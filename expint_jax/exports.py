"""Curated package APIs that cost nothing until used.

Contract: a package ``__init__`` calls ``public_api(__name__, {name: "submodule", ...})`` and
assigns the result to ``__getattr__, __dir__, __all__``. ``from expint_jax.models import Qwen3``
then imports ``expint_jax.models.qwen3`` on first use (PEP 562), so ``import expint_jax.rollout``
stays cheap (a command such as ``expint granularity`` imports package ``__init__``s and must
not pay for JAX), and a package ``__init__`` never closes an import circle with its own modules.
An unknown name is the usual ``AttributeError``. An exported name must not be a submodule's name
(importing the submodule would set the package attribute to the module).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def public_api(package: str, names: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``(__getattr__, __dir__, __all__)`` for ``package`` exporting each name from its submodule.

    Args:
      package: the package's ``__name__``.
      names: exported name -> module path relative to the package (``"qwen3"``, ``"envs.simweb"``).
    """
    exported = dict(names)

    def getattr_(name: str) -> Any:
        if name not in exported:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{exported[name]}"), name)

    def dir_() -> list[str]:
        return sorted(exported)

    return getattr_, dir_, sorted(exported)
