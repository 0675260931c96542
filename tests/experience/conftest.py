"""Fixtures of the experience tests: the public release's example files in ../shared/data/."""

from pathlib import Path

import pytest

RELEASE_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture
def release_file():
    def path(name: str) -> Path:
        found = RELEASE_DATA / name
        if not found.exists():
            pytest.skip(f"release example {found} is not available on this machine")
        return found

    return path
