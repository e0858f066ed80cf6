"""Where the shipped example configs are, in a wheel and in a checkout.

A wheel carries them as ``vkd_shim/example_configs/*.yaml`` (``setup.py`` copies the repository's
``configs/`` there); a checkout or an editable install reads ``configs/`` beside the package. Stdlib only.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The Stage-3 recipe, in merge order (``VKD_CONFIG`` lists files lowest precedence first).
STAGE3 = ("visual_kd_base.yaml", "stage3_visual_kd.yaml")


def config_dir() -> Path:
    packaged = Path(__file__).resolve().parent / "example_configs"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[1] / "configs"


def stage3_paths() -> list[Path]:
    """Absolute paths of the base config and its Stage-3 overlay."""
    return [config_dir() / name for name in STAGE3]


def stage3_value() -> str:
    """The shipped Stage-3 recipe as a ``VKD_CONFIG`` value: ``export VKD_CONFIG=$(vkd-shim configs)``."""
    return os.pathsep.join(str(path) for path in stage3_paths())
