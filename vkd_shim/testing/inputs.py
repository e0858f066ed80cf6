"""Model inputs for in-memory forwards of the tiny models: pixels, grids and prompts with the exact
number of image and video pads, laid out as the Qwen processors lay them out."""

from __future__ import annotations

from typing import Any

import torch

from vkd_shim.testing.models import IMAGE_PAD_ID, VIDEO_PAD_ID, VISION_END_ID, VISION_START_ID

# Plain text ids well below the special-token range, so random prompts never contain a pad.
TEXT_ID_RANGE = (100, 5000)


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
    pixels, grid = _pixels(model_config, n_images, model_config.vision_config.temporal_patch_size, image_hw, seed)
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


def forward_inputs(model_config: Any, n_images: int = 1, n_videos: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
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
