"""tiny_assets for the ms-swift 3.12 stack: the same tiny Qwen3-VL teacher/student and data, saved in the
shape transformers 4.57 reads, and the `swift rlhf` argv spelled the way ms-swift 3.12 parses it.

Why a separate helper: under transformers 4.57 the Qwen3-VL text model takes its mrope sections from
`rope_scaling` (5.x moved them to `rope_parameters`, which 4.57 ignores, so the model would not build),
and `Qwen3VLProcessor` accepts only a `Qwen2TokenizerFast` (5.x takes any fast tokenizer); ms-swift
3.12 calls `--tuner_type` `--train_type`. Everything else (vocabulary and special-token ids, image and
video processors, images, videos, flags) is tiny_assets' own, so both stacks train on the same data.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import tiny_assets

# What 4.57 reads for the same rotary layout tiny_assets declares in 5.x's `rope_parameters`.
_ROPE = tiny_assets._TEXT_CONFIG["rope_parameters"]
TEXT_CONFIG_457 = {
    "rope_theta": _ROPE["rope_theta"],
    "rope_scaling": {key: value for key, value in _ROPE.items() if key != "rope_theta"},
}
# ms-swift 4.x name -> ms-swift 3.12 name of the same flag.
RENAMED_FLAGS = {"--tuner_type": "--train_type"}


@functools.cache
def _qwen2_tokenizer() -> Any:
    """tiny_assets' tokenizer (same vocabulary, same added tokens at Qwen's ids) as the class 4.57 wants."""
    from transformers import Qwen2TokenizerFast

    return Qwen2TokenizerFast(
        tokenizer_object=tiny_assets._tokenizer().backend_tokenizer,
        eos_token=tiny_assets.EOS_TOKEN,
        pad_token=tiny_assets.PAD_TOKEN,
        unk_token=None,
        model_max_length=2048,
    )


@contextmanager
def _qwen2_tokenizer_in_processor() -> Iterator[None]:
    """tiny_assets builds its processor around `_tokenizer()`; hand it the 4.57-compatible class instead."""
    original, tokenizer = tiny_assets._tokenizer, _qwen2_tokenizer()
    tiny_assets._tokenizer = lambda: tokenizer
    try:
        yield
    finally:
        tiny_assets._tokenizer = original


def build_all(out_dir: str | os.PathLike[str], seed: int = 0) -> dict[str, Any]:
    """Teacher (seed), student (seed + 1) and mixed image / video / text data, as tiny_assets.build_all."""
    root = Path(out_dir)
    with _qwen2_tokenizer_in_processor():
        teacher = tiny_assets.save_qwen3_vl(root / "teacher", seed=seed, text_config=TEXT_CONFIG_457)
        student = tiny_assets.save_qwen3_vl(root / "student", seed=seed + 1, text_config=TEXT_CONFIG_457)
    counts = {"image": 12, "text": 12, "video": 8}
    data = tiny_assets.build_dataset(
        root / "data", n_image=counts["image"], n_text=counts["text"], n_video=counts["video"], seed=seed
    )
    return {
        "teacher": str(teacher),
        "student": str(student),
        "train": str(data["train"]),
        "val": str(data["val"]),
        "seed": seed,
        "student_from_teacher": False,
        "rows": counts,
    }


def gkd_command(assets: Mapping[str, Any], output_dir: str | os.PathLike[str], *extra: str) -> list[str]:
    """tiny_assets.gkd_command with ms-swift 3.12's flag names."""
    return [RENAMED_FLAGS.get(item, item) for item in tiny_assets.gkd_command(assets, output_dir, *extra)]
