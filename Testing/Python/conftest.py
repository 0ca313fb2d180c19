"""Shared pytest fixtures: the real data folder and deterministic phantoms."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
#: Real CT data (../shared/data beside the checkout); tests using it skip when it is absent.
DATA_DIR = REPO.parent / "shared" / "data"


def data_path(*parts: str) -> Path:
    """Path under the shared real-data folder, or skip the test when it is not there."""
    path = DATA_DIR.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path}")
    return path


@pytest.fixture(scope="session")
def small_phantom():
    """A small deterministic chest phantom (seed 0) with default nodules, shared by tests."""
    from LungGradCAMLib import phantom

    return phantom.chest_ct(seed=0, shape=(48, 96, 96), spacing_mm=(3.0, 3.0, 5.0))
