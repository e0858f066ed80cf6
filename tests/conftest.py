"""Shared fixtures for tests that drive real `swift rlhf` runs.

Building the tiny Qwen3-VL teacher, student and the image / video / text data takes several seconds on
2 cores; every end-to-end test reads the same files and none writes into them, so they are built once
per session.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from e2e_support import PROBE_SITECUSTOMIZE

from vkd_shim.testing import launch as kit


@pytest.fixture(scope="session")
def gkd_assets(tmp_path_factory) -> dict:
    """Teacher and student (different seeds), train/val jsonl with image, video and text-only rows."""
    return kit.build_all(tmp_path_factory.mktemp("gkd_assets"))


@pytest.fixture(scope="session")
def swift_cache(tmp_path_factory):
    """Where the `swift` children keep their run-time caches (datasets, matplotlib), off the home dir."""
    return tmp_path_factory.mktemp("swift_cache")


@pytest.fixture(scope="session")
def probe_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("user_site")
    (path / "sitecustomize.py").write_text(PROBE_SITECUSTOMIZE, encoding="utf-8")
    return path
