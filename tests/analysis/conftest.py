"""The analysis tests score the distillation tests' trajectories with the same real tokenizer."""

from tests.distill.conftest import chat  # noqa: F401  (a fixture, found by pytest through this import)
