"""Tiny, real Qwen-VL models and matching inputs for CPU tests.

The models are the real transformers classes with toy dimensions, so module paths, hook
behaviour and forward wiring are exactly those of production checkpoints. Vocabulary size and
special-token ids are Qwen's real ones because ms-swift's templates hard-code those ids.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

VOCAB_SIZE = 151936
VISION_START_ID = 151652
VISION_END_ID = 151653
IMAGE_PAD_ID = 151655
VIDEO_PAD_ID = 151656
# Plain text ids well below the special-token range, so random prompts never contain a pad.
TEXT_ID_RANGE = (100, 5000)

_SPECIAL_IDS = {
    "image_token_id": IMAGE_PAD_ID,
    "video_token_id": VIDEO_PAD_ID,
    "vision_start_token_id": VISION_START_ID,
    "vision_end_token_id": VISION_END_ID,
}

_QWEN3_VL_TEXT = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 4096,
    "rope_scaling": {"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True},
    "tie_word_embeddings": True,
}

_QWEN3_VL_VISION = {
    "depth": 3,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "out_hidden_size": 64,
    "patch_size": 16,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "num_position_embeddings": 64,
    "deepstack_visual_indexes": [0, 1],
}

_QWEN2_5_VL_TEXT = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "rope_scaling": {"rope_type": "default", "mrope_section": [2, 3, 3]},
}

# window_size 112 px = 4 merged tokens per side at patch 14 / merge 2: a 56x56 image fits in one
# window, so Qwen2.5-VL's window reordering is the identity for the default test image.
_QWEN2_5_VL_VISION = {
    "depth": 2,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "out_hidden_size": 64,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [1],
}


def qwen3_vl_config(**overrides: Any) -> Qwen3VLConfig:
    """Tiny Qwen3-VL config; `text_config` / `vision_config` overrides merge into the defaults."""
    text = {**copy.deepcopy(_QWEN3_VL_TEXT), **overrides.pop("text_config", {})}
    vision = {**copy.deepcopy(_QWEN3_VL_VISION), **overrides.pop("vision_config", {})}
    return Qwen3VLConfig(text_config=text, vision_config=vision, **{**_SPECIAL_IDS, **overrides})


def build_qwen3_vl(
    seed: int = 0, dtype: torch.dtype = torch.float32, config: Qwen3VLConfig | None = None
) -> Qwen3VLForConditionalGeneration:
    """Random-init tiny Qwen3-VL in eval mode; the seed makes two builds bit-identical."""
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config if config is not None else qwen3_vl_config())
    return model.to(dtype).eval()


def qwen2_5_vl_config() -> Qwen2_5_VLConfig:
    """Tiny Qwen2.5-VL config: a merger but no deepstack, for the "architecture lacks it" paths."""
    return Qwen2_5_VLConfig(
        text_config=copy.deepcopy(_QWEN2_5_VL_TEXT),
        vision_config=copy.deepcopy(_QWEN2_5_VL_VISION),
        **_SPECIAL_IDS,
    )


def build_qwen2_5_vl(seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    """Random-init tiny Qwen2.5-VL in eval mode."""
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(qwen2_5_vl_config()).eval()


def _patch_grid(vision_config: Any, frames: int, hw: tuple[int, int]) -> tuple[int, int, int]:
    """(t, h, w) patch grid as the Qwen processors compute it; rejects sizes they would resize."""
    patch = vision_config.patch_size
    unit = patch * vision_config.spatial_merge_size
    temporal = vision_config.temporal_patch_size
    height, width = hw
    if height % unit or width % unit or frames % temporal:
        raise ValueError(f"image {hw} must be a multiple of {unit} px and frames ({frames}) of {temporal}")
    return frames // temporal, height // patch, width // patch


def _pixels(
    model_config: Any, count: int, frames: int, hw: tuple[int, int], seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened patches [sum(t*h*w), C*T*P*P] and their grid, in the processor's layout."""
    vision = model_config.vision_config
    grid = _patch_grid(vision, frames, hw)
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    rows = count * grid[0] * grid[1] * grid[2]
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(rows, patch_dim, generator=generator)
    return pixels, torch.tensor([grid] * count, dtype=torch.long)


def vision_inputs(
    model_config: Any, n_images: int = 1, image_hw: tuple[int, int] = (64, 64), seed: int = 0
) -> dict[str, torch.Tensor]:
    """`pixel_values` + `image_grid_thw` for `n_images` still images (one temporal patch each)."""
    pixels, grid = _pixels(
        model_config, n_images, model_config.vision_config.temporal_patch_size, image_hw, seed
    )
    return {"pixel_values": pixels, "image_grid_thw": grid}


def video_inputs(
    model_config: Any,
    n_videos: int = 1,
    frames: int = 4,
    frame_hw: tuple[int, int] = (64, 64),
    seed: int = 1,
) -> dict[str, torch.Tensor]:
    """`pixel_values_videos` + `video_grid_thw` for `n_videos` clips of `frames` frames each."""
    pixels, grid = _pixels(model_config, n_videos, frames, frame_hw, seed)
    return {"pixel_values_videos": pixels, "video_grid_thw": grid}


def merged_tokens(model_config: Any, grid_thw: torch.Tensor) -> int:
    """Visual tokens the language model receives for `grid_thw` (what the merger emits)."""
    return int(grid_thw.prod(-1).sum()) // model_config.vision_config.spatial_merge_size**2


def _grids(grid_thw: torch.Tensor | None) -> list[list[int]]:
    return [] if grid_thw is None else grid_thw.tolist()


def token_inputs(
    model_config: Any,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    text_len: int = 3,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """One-row prompt with the exact number of image/video pads, plus `mm_token_type_ids`.

    Layout: text, then each image as <vision_start> pads <vision_end>, then each video, then text.
    Qwen3-VL gives every video frame its own vision_start/end group (its processor separates
    frames with timestamps), Qwen2.5-VL one group per video; rope indexing relies on this.
    """
    merge = model_config.vision_config.spatial_merge_size**2
    per_frame_groups = model_config.model_type == "qwen3_vl"
    generator = torch.Generator().manual_seed(seed)

    def text(n: int) -> list[tuple[int, int]]:
        return [(int(i), 0) for i in torch.randint(*TEXT_ID_RANGE, (n,), generator=generator)]

    def group(pad_id: int, pad_type: int, count: int) -> list[tuple[int, int]]:
        return [(VISION_START_ID, 0), *[(pad_id, pad_type)] * count, (VISION_END_ID, 0)]

    tokens = text(text_len)
    for t, h, w in _grids(image_grid_thw):
        tokens += group(IMAGE_PAD_ID, 1, t * h * w // merge)
    for t, h, w in _grids(video_grid_thw):
        groups = [h * w // merge] * t if per_frame_groups else [t * h * w // merge]
        for count in groups:
            tokens += group(VIDEO_PAD_ID, 2, count)
    tokens += text(text_len)

    input_ids = torch.tensor([[token for token, _ in tokens]], dtype=torch.long)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": torch.tensor([[kind for _, kind in tokens]], dtype=torch.int32),
    }


def forward_inputs(
    model_config: Any, n_images: int = 1, n_videos: int = 0, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Everything `model(**inputs)` needs for a full multimodal forward with labels."""
    inputs: dict[str, torch.Tensor] = {}
    if n_images:
        inputs.update(vision_inputs(model_config, n_images=n_images, seed=seed))
    if n_videos:
        inputs.update(video_inputs(model_config, n_videos=n_videos, seed=seed + 1))
    inputs.update(
        token_inputs(
            model_config,
            image_grid_thw=inputs.get("image_grid_thw"),
            video_grid_thw=inputs.get("video_grid_thw"),
            seed=seed,
        )
    )
    inputs["labels"] = inputs["input_ids"].clone()
    return inputs
