"""Tests of a side stack's layout, run with that stack's venv (`make test312`, `make test45`, ...).

They prove a release other than the main one (4.6) end to end, so they are collected only where the
installed ms-swift is a side stack of the matrix (pyproject.toml keeps this directory out of the main run).
"""

from __future__ import annotations

import pytest

from vkd_shim import patches, swift_layouts
from vkd_shim.testing import launch as kit

if patches.LAYOUT is swift_layouts.SWIFT_4_6 or swift_layouts.version_problem():
    raise pytest.UsageError(
        f"tests/stacks runs under a side stack of the matrix (found ms-swift {swift_layouts.installed_version()}): "
        "use .venv312, .venv45 or .venv44 (`make test312` ...); the main stack has tests/test_e2e.py"
    )


@pytest.fixture(scope="session")
def stack_assets(tmp_path_factory) -> dict:
    """Teacher, student and data saved the way the installed transformers reads them."""
    return kit.build_all(tmp_path_factory.mktemp("stack_assets"))
