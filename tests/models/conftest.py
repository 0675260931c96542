import pytest

from expint_jax.models import ops


@pytest.fixture(params=["dense", "blocked"])
def attention_path(request, monkeypatch):
    """Runs a test through each attention path: blocks of 4 tokens make short test inputs blocked."""
    if request.param == "blocked":
        monkeypatch.setattr(ops, "ATTENTION_BLOCK", 4)
    return request.param
