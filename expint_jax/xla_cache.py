"""The persistent XLA compilation cache: a rerun or a resumed run skips recompiling its programs.

``enable()`` points JAX at ``$JAX_COMPILATION_CACHE_DIR`` when set (JAX reads it itself), else at
``$EXPINT_CACHE_DIR/xla`` or ``~/.cache/expint_jax/xla``. Commands call it once, before compiling.
"""

from __future__ import annotations

import os
from pathlib import Path


def enable() -> Path:
    """Turns the cache on; returns its directory."""
    import jax

    configured = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if configured:
        return Path(configured)
    root = os.environ.get("EXPINT_CACHE_DIR") or str(Path.home() / ".cache" / "expint_jax")
    directory = Path(root) / "xla"
    jax.config.update("jax_compilation_cache_dir", str(directory))
    return directory
