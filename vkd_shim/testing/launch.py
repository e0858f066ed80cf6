"""Real ``swift rlhf --rlhf_type gkd`` runs on the tiny assets: build teacher, student and data, the
argv and environment of the run (offline, CPU, single process), and its ``logging.jsonl`` rows.

``python -m vkd_shim.testing.launch OUT_DIR [--seed N] [--student-from-teacher]`` builds everything
under OUT_DIR and prints a JSON summary.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import sys
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from vkd_shim.testing.data import build_dataset
from vkd_shim.testing.kits import KITS, swift_argv
from vkd_shim.testing.models import AssetError

_VIDEO_READERS = ("decord", "torchcodec")
# ms-swift 4.x name -> ms-swift 3.x name of the same flag.
_RENAMED_FLAGS_3X = {"--tuner_type": "--train_type"}
# ms-swift reads these through qwen-vl-utils. Its video default is 128 tokens minimum per frame pair, which
# would upscale each 64x64 frame to about 370x370; 4..16 keeps a 4-frame 64x64 clip at 2 x 4 = 8 tokens.
_VIDEO_TOKEN_ENV = {"VIDEO_MIN_TOKEN_NUM": "4", "VIDEO_MAX_TOKEN_NUM": "16"}
# Launcher and rank variables that would turn the child into (part of) a distributed job.
_DISTRIBUTED_ENV = (
    "NPROC_PER_NODE",
    "NNODES",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
)

DEFAULT_MAX_STEPS = 6
DEFAULT_EVAL_STEPS = 3
DEFAULT_SEED = 42


def build_all(
    out_dir: str | os.PathLike[str],
    seed: int = 0,
    *,
    student_from_teacher: bool = False,
    n_image: int = 12,
    n_text: int = 12,
    n_video: int = 8,
    family: str = "qwen3_vl",
    teacher_family: str | None = None,
    teacher_overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Build teacher, student and data under `out_dir`; return a JSON-ready summary `gkd_command` accepts.

    The student uses `seed + 1` so that teacher and student logits differ and the GKD loss has a gradient.
    With `student_from_teacher` it is a byte copy of the teacher in its own directory: ms-swift compares
    the `--model` and `--teacher_model` strings, and the same path with LoRA would switch to
    self-distillation through `disable_adapter()` with no separate teacher model. `family` and `teacher_family`
    name kits (:data:`vkd_shim.testing.kits.KITS`); `teacher_overrides` change the teacher's config (a wider
    teacher: ``qwen_families.width_overrides(96)``).
    """
    root = Path(out_dir)
    teacher_family = teacher_family or family
    teacher = KITS[teacher_family].save(root / "teacher", seed=seed, **dict(teacher_overrides or {}))
    student = root / "student"
    if student_from_teacher:
        shutil.copytree(teacher, student, dirs_exist_ok=True)
    else:
        KITS[family].save(student, seed=seed + 1)
    if not (KITS[family].video and KITS[teacher_family].video):
        n_video = 0
    data = build_dataset(root / "data", n_image=n_image, n_text=n_text, n_video=n_video, seed=seed)
    return {
        "teacher": str(teacher),
        "student": str(student),
        "train": str(data["train"]),
        "val": str(data["val"]),
        "seed": seed,
        "student_from_teacher": student_from_teacher,
        "rows": {"image": n_image, "text": n_text, "video": n_video},
        "families": {"student": family, "teacher": teacher_family},
    }


def video_reader() -> str | None:
    """The video backend qwen-vl-utils can use here, or None when video rows cannot be decoded."""
    return next((name for name in _VIDEO_READERS if importlib.util.find_spec(name) is not None), None)


def _swift_executable() -> Path:
    """The `swift` console script of the interpreter running the tests, so the child uses the same venv."""
    script = Path(sys.executable).with_name("swift")
    if not script.is_file():
        raise AssetError(f"no `swift` console script next to {sys.executable}; is ms-swift installed there?")
    return script


def gkd_command(assets: Mapping[str, Any], output_dir: str | os.PathLike[str], *extra: str) -> list[str]:
    """argv of a real `swift rlhf --rlhf_type gkd` run on the assets; 25-35 s wall on 2 CPU cores.

    `extra` is appended last, so it overrides any flag here (argparse keeps the last value), e.g.
    `"--max_steps", "8", "--resume_from_checkpoint", ckpt`. lmbda is left at its default (0.5) so that the
    on-policy generation path runs. Raises AssetError when the data has video rows but no video reader is
    installed: ms-swift would otherwise log "Encoding failed for one sample; will resample" and silently
    train without videos.
    """
    if assets["rows"]["video"] and video_reader() is None:
        raise AssetError(
            "the dataset has video rows but neither decord nor torchcodec is importable; ms-swift would "
            "drop every video row. Install decord, or build the assets with n_video=0."
        )
    argv = [
        str(_swift_executable()), "rlhf",
        "--rlhf_type", "gkd",
        "--model", str(assets["student"]),
        "--teacher_model", str(assets["teacher"]),
        "--torch_dtype", "float32",
        "--dataset", str(assets["train"]),
        "--val_dataset", str(assets["val"]),
        "--tuner_type", "lora",
        # ms-swift freezes the aligner by default; unfrozen under LoRA, the merger and every deepstack
        # merger get LoRA adapters on their linear layers.
        "--freeze_aligner", "false",
        "--max_steps", str(DEFAULT_MAX_STEPS),
        # Without it ms-swift picks 16 / batch size = 8 micro-batches (and 8 generations) per step.
        "--gradient_accumulation_steps", "1",
        "--per_device_train_batch_size", "2",
        "--per_device_eval_batch_size", "2",
        "--max_completion_length", "8",
        "--logging_steps", "1",
        "--eval_strategy", "steps",
        "--eval_steps", str(DEFAULT_EVAL_STEPS),
        "--save_strategy", "steps",
        "--save_steps", str(DEFAULT_MAX_STEPS),
        "--report_to", "tensorboard",
        "--dataloader_num_workers", "0",
        # ms-swift 4.5.3 defaults persistent workers to True without 4.6's num_workers == 0 guard.
        "--dataloader_persistent_workers", "false",
        "--seed", str(DEFAULT_SEED),
        "--data_seed", str(DEFAULT_SEED),
        # The trainer otherwise asks the ModelScope hub whether the local model is current: offline, that
        # costs about 7 s of retries.
        "--check_model", "false",
        "--output_dir", str(output_dir),
        *swift_argv(**assets.get("families", {"student": "qwen3_vl"})),
        *extra,
    ]  # fmt: skip
    if int(metadata.version("ms-swift").split(".")[0]) < 4:
        argv = [_RENAMED_FLAGS_3X.get(item, item) for item in argv]
    return argv


def gkd_env(
    base_env: Mapping[str, str] | None = None, *, cache_dir: str | os.PathLike[str] | None = None
) -> dict[str, str]:
    """Environment for the `swift rlhf` child: offline, CPU only, single process, unbuffered output.

    `cache_dir` keeps what ms-swift caches at run time (the datasets json cache, matplotlib's font list)
    out of the home directory.
    """
    env = dict(os.environ if base_env is None else base_env)
    for name in (*_DISTRIBUTED_ENV, "TENSORBOARD_LOGGING_DIR"):
        env.pop(name, None)
    bin_dir = str(Path(sys.executable).parent)
    env.update(
        {
            "PATH": os.pathsep.join([bin_dir, env.get("PATH", "")]),
            "HF_HUB_OFFLINE": "1",
            "MODELSCOPE_OFFLINE": "1",
            "CUDA_VISIBLE_DEVICES": "",
            "TOKENIZERS_PARALLELISM": "false",
            # Unbuffered: with stderr merged into stdout, log dicts, ms-swift logs and our JSON lines
            # keep the order in which they were written.
            "PYTHONUNBUFFERED": "1",
            **_VIDEO_TOKEN_ENV,
        }
    )
    if cache_dir is not None:
        env["MODELSCOPE_CACHE"] = str(Path(cache_dir) / "modelscope")
        env["MPLCONFIGDIR"] = str(Path(cache_dir) / "matplotlib")
    return env


def _version_number(run_dir: Path) -> int:
    match = re.match(r"v(\d+)-", run_dir.name)
    return int(match.group(1)) if match else -1


def read_logging_jsonl(output_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows of `<output_dir>/v<N>-<timestamp>/logging.jsonl` for the newest run (highest N).

    ms-swift adds one such version directory per launch under the same `--output_dir` (a resumed run gets
    the next N), so the newest is the run that just finished.
    """
    files = sorted(Path(output_dir).glob("v*-*/logging.jsonl"), key=lambda path: _version_number(path.parent))
    if not files:
        raise FileNotFoundError(f"no v*-*/logging.jsonl under {output_dir}")
    lines = files[-1].read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--student-from-teacher", action="store_true")
    args = parser.parse_args(argv)
    summary = build_all(args.out_dir, seed=args.seed, student_from_teacher=args.student_from_teacher)
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
