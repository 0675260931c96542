"""The analysis tests score the distillation tests' trajectories with the same real tokenizer, and
share the loop tests' persistent XLA cache (the notebooks' loop run trains twice)."""

from tests.distill.conftest import chat  # noqa: F401  (fixtures, found by pytest through these imports)
from tests.loop.conftest import shared_compilation_cache  # noqa: F401
