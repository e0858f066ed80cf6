"""Every model family the kit builds, and how ``swift rlhf`` is pointed at it.

One table for the suite, the demo and the benchmarks: a test names a family (or a student and a teacher family)
and gets the saver, the ms-swift flags and whether the family trains video rows here, instead of each test
knowing one family's quirks (Qwen3.5, Qwen2.5-VL, Qwen2-VL and GLM-4.1V need ``--template`` because ms-swift has
two candidates for their local directories; InternVL's transformers-native checkpoints use ``internvl_hf``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from vkd_shim.testing import models, other_families, qwen_families


class Kit(NamedTuple):
    """What a test needs to build one family and launch ``swift rlhf`` on it."""

    #: ms-swift ``--model_type``.
    model_type: str
    #: ``save(out_dir, seed=0, **config_overrides) -> Path``: a hub-like directory ms-swift loads.
    save: Callable[..., Path]
    #: Whether ms-swift trains video rows of the kit's data on it (build the data with ``n_video=0`` otherwise).
    video: bool
    #: ``swift rlhf`` flags beyond ``--model_type`` / ``--teacher_model_type`` (the student's decide).
    argv: tuple[str, ...] = ()


KITS: dict[str, Kit] = {
    "qwen3_vl": Kit("qwen3_vl", models.save_qwen3_vl, video=True),
    "qwen3_vl_moe": Kit("qwen3_vl_moe", qwen_families.save_qwen3_vl_moe, video=True),
    "qwen3_5": Kit("qwen3_5", qwen_families.save_qwen3_5, video=True, argv=("--template", "qwen3_5")),
    "qwen3_5_moe": Kit("qwen3_5_moe", qwen_families.save_qwen3_5_moe, video=True, argv=("--template", "qwen3_5")),
    "qwen2_vl": Kit("qwen2_vl", qwen_families.save_qwen2_vl, video=True, argv=("--template", "qwen2_vl")),
    "qwen2_5_vl": Kit("qwen2_5_vl", qwen_families.save_qwen2_5_vl, video=True, argv=("--template", "qwen2_5_vl")),
    "gemma3_vision": Kit("gemma3_vision", other_families.save_gemma3_vision, video=False),
    "internvl": Kit("internvl", other_families.save_internvl, video=False, argv=("--template", "internvl_hf")),
    "llava1_5_hf": Kit("llava1_5_hf", other_families.save_llava, video=False),
    "glm4v": Kit("glm4v", other_families.save_glm4v, video=False, argv=("--template", "glm4v")),
}


def swift_argv(student: str, teacher: str | None = None) -> list[str]:
    """Flags that point a ``launch.gkd_command`` run at a student and a teacher family."""
    kit = KITS[student]
    return ["--model_type", kit.model_type, "--teacher_model_type", KITS[teacher or student].model_type, *kit.argv]
