"""Shared fixtures for tests that drive real `swift rlhf` runs.

Building the tiny Qwen3-VL teacher, student and the image / video / text data takes several seconds on
2 cores; every end-to-end test reads the same files and none writes into them, so they are built once
per session.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from e2e_support import PROBE_SITECUSTOMIZE
from two_ranks import Run, run_two_ranks

from vkd_shim.testing import launch as kit

#: What the shell exported under VKD_* (a user's own settings, a run left half-configured): taken out of this
#: process, and so out of every child it starts, before any test reads it. Each test sets what it checks.
EXPORTED = {name: os.environ.pop(name) for name in [k for k in os.environ if k.startswith("VKD_")]}


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


@pytest.fixture(scope="session")
def ddp_plain(gkd_assets, swift_cache, tmp_path_factory) -> Run:
    """Plain ms-swift GKD under 2-rank DDP: the baseline every engine suite must equal (tests/two_ranks.py)."""
    run = run_two_ranks(gkd_assets, swift_cache, tmp_path_factory.mktemp("ddp") / "out").trained()
    assert all(r["loss"] > 0 and r["grad_norm"] > 0 for r in run.train), run.train
    return run


@pytest.fixture(scope="session")
def ddp_vkd(gkd_assets, swift_cache, tmp_path_factory) -> Run:
    """The same run with vision KD on (the shipped configs): the baseline of the engines' vision-KD runs."""
    return run_two_ranks(gkd_assets, swift_cache, tmp_path_factory.mktemp("ddp_vkd") / "out", vkd=True).trained()
