"""Tests of the ms-swift 3.12 layout (ms-swift 3.12, transformers 4.57): run them with `.venv312`.

They import ms-swift 3.x modules by their 3.x paths, so under any other ms-swift they could only fail
for the wrong reason: collecting them there is a usage error, said once, up front, instead of a page
of ImportErrors (the 4.6 suite runs with `--ignore=tests/swift312`).
"""

from __future__ import annotations

import pytest

from vkd_shim import swift_layouts
from vkd_shim.testing import launch as kit

_INSTALLED = swift_layouts.installed_version()
if not swift_layouts.SWIFT_3_12.matches(_INSTALLED or ""):
    raise pytest.UsageError(
        f"tests/swift312 needs ms-swift 3.12.x (found {_INSTALLED or 'none'}): run them with "
        ".venv312/bin/python -m pytest tests/swift312 (pyproject.toml keeps it out of the default run)"
    )


@pytest.fixture(scope="session")
def assets_312(tmp_path_factory) -> dict:
    """Teacher and student saved the way transformers 4.57 reads them (the kit follows the installed stack)."""
    return kit.build_all(tmp_path_factory.mktemp("assets_312"))
