"""Loop test helpers: ``loop_config(tmp_path, **overrides)`` is ``configs/loop_tiny.py`` with
dotted-key overrides, bound and checked like the command line does."""

from pathlib import Path

import pytest

from expint_jax.config import bind, load_config_file
from expint_jax.loop.config import LoopConfig, check_config

TINY = Path(__file__).resolve().parents[2] / "configs" / "loop_tiny.py"


def loop_config(runs_dir, **overrides) -> LoopConfig:
    c = load_config_file(TINY)
    c.runs_dir = str(runs_dir)
    for dotted, value in overrides.items():
        section = c
        *parents, leaf = dotted.split("__")
        for name in parents:
            section = section[name]
        section[leaf] = value
    config = bind(LoopConfig, c)
    check_config(config)
    return config



@pytest.fixture(scope="session", autouse=True)
def shared_compilation_cache(tmp_path_factory):
    """A persistent XLA cache for the loop tests: each trainer run builds its step anew, and the
    cache (keyed by the program, not the Python function) turns a repeated compile into a load."""
    import jax

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    saved = {name: getattr(jax.config, name) for name in names}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield
    for name, value in saved.items():
        jax.config.update(name, value)
