"""Tests of the ms-swift 3.12 layout (ms-swift 3.12, transformers 4.57): run them with `.venv312`.

They import ms-swift 3.x modules by their 3.x paths, so under any other ms-swift they could only fail
for the wrong reason: collecting them there is a usage error, said once, up front, instead of a page
of ImportErrors (pyproject.toml keeps the directory out of the main run).
"""

from __future__ import annotations

import pytest

from vkd_shim import swift_layouts

_INSTALLED = swift_layouts.installed_version()
if not swift_layouts.SWIFT_3_12.matches(_INSTALLED or ""):
    raise pytest.UsageError(
        f"tests/swift312 needs ms-swift 3.12.x (found {_INSTALLED or 'none'}): run them with "
        ".venv312/bin/python -m pytest tests/swift312 (pyproject.toml keeps it out of the default run)"
    )
