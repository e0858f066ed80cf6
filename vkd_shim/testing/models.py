"""The tiny Qwen3-VL of the test suite, the demo and the benchmarks: real transformers classes with toy
dimensions, so module paths, hook behaviour and forward wiring are those of production checkpoints.

Built locally from fixed seeds (no hub access): a Qwen-compatible tokenizer whose special tokens sit at
Qwen's real ids (ms-swift's templates hard-code them), the model config, and a saved model directory
that ms-swift loads with ``--model_type qwen3_vl``. One kit for every tested stack: under transformers
4.x the text model reads its mrope sections from ``rope_scaling`` and the processor wants a
``Qwen2TokenizerFast``; 5.x reads ``rope_parameters`` and takes any fast tokenizer.

Heavy imports stay inside the functions, so importing this module does not load torch.
"""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from vkd_shim.testing.tokenizers import TokenizerLayoutError, byte_level

VOCAB_SIZE = 151936

# Qwen3 / Qwen3-VL added tokens at their real ids. ms-swift's Qwen templates hard-code several of these ids
# (image pad 151655, video pad 151656) and emit the strings of the others (chat markers, vision start/end,
# object refs and boxes, <think>, <tool_call>, <tool_response>), so each must tokenize to exactly its real
# id. The bool is Qwen's own "special" flag: think/tool markers are plain added tokens, not special ones.
QWEN_ADDED_TOKENS: dict[str, tuple[int, bool]] = {
    "<|endoftext|>": (151643, True),
    "<|im_start|>": (151644, True),
    "<|im_end|>": (151645, True),
    "<|object_ref_start|>": (151646, True),
    "<|object_ref_end|>": (151647, True),
    "<|box_start|>": (151648, True),
    "<|box_end|>": (151649, True),
    "<|quad_start|>": (151650, True),
    "<|quad_end|>": (151651, True),
    "<|vision_start|>": (151652, True),
    "<|vision_end|>": (151653, True),
    "<|vision_pad|>": (151654, True),
    "<|image_pad|>": (151655, True),
    "<|video_pad|>": (151656, True),
    "<tool_call>": (151657, False),
    "</tool_call>": (151658, False),
    "<|fim_prefix|>": (151659, True),
    "<|fim_middle|>": (151660, True),
    "<|fim_suffix|>": (151661, True),
    "<|fim_pad|>": (151662, True),
    "<|repo_name|>": (151663, True),
    "<|file_sep|>": (151664, True),
    "<tool_response>": (151665, False),
    "</tool_response>": (151666, False),
    "<think>": (151667, False),
    "</think>": (151668, False),
}
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"

# Vision geometry shared by the model config and both processors: one merged token covers a
# (PATCH_SIZE * SPATIAL_MERGE) ** 2 = 32 x 32 pixel square, so a 64 x 64 image is 2 x 2 = 4 tokens.
PATCH_SIZE = 16
SPATIAL_MERGE = 2
TEMPORAL_PATCH = 2
_MERGED_PIXELS = (PATCH_SIZE * SPATIAL_MERGE) ** 2

# Dimensions small enough for 2 CPU cores, shaped like the real model: GQA (4 query / 2 kv heads), mrope
# sections summing to head_dim / 2, and two deepstack layers so `deepstack_merger_list` has 2 modules.
# Deepstack feature i is added to the output of text layer i at the visual positions only, so with 2 text
# layers deepstack 1 would feed the last layer and reach no response logit: its merger would get no GKD
# gradient at all. A third text layer keeps every deepstack merger on the loss path, as in the real model.
_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 2048,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 5000000.0,
        "mrope_section": [2, 3, 3],
        "mrope_interleaved": True,
    },
    "bos_token_id": QWEN_ADDED_TOKENS[PAD_TOKEN][0],
    "eos_token_id": QWEN_ADDED_TOKENS[EOS_TOKEN][0],
    "pad_token_id": QWEN_ADDED_TOKENS[PAD_TOKEN][0],
    "tie_word_embeddings": False,
}
_VISION_CONFIG: dict[str, Any] = {
    "depth": 3,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "out_hidden_size": 64,
    "patch_size": PATCH_SIZE,
    "spatial_merge_size": SPATIAL_MERGE,
    "temporal_patch_size": TEMPORAL_PATCH,
    "num_position_embeddings": 64,
    "deepstack_visual_indexes": [0, 1],
}

VISION_START_ID = QWEN_ADDED_TOKENS["<|vision_start|>"][0]
VISION_END_ID = QWEN_ADDED_TOKENS["<|vision_end|>"][0]
IMAGE_PAD_ID = QWEN_ADDED_TOKENS["<|image_pad|>"][0]
VIDEO_PAD_ID = QWEN_ADDED_TOKENS["<|video_pad|>"][0]


class AssetError(RuntimeError):
    """An asset cannot be built or used in this environment; the message says what is missing."""


def transformers_major() -> int:
    return int(metadata.version("transformers").split(".")[0])


@functools.cache
def tokenizer() -> Any:
    """The tokenizer, as the class the installed transformers' Qwen3VLProcessor accepts."""
    fast = _fast_tokenizer()
    if transformers_major() >= 5:
        return fast
    from transformers import Qwen2TokenizerFast

    return Qwen2TokenizerFast(
        tokenizer_object=fast.backend_tokenizer,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=None,
        model_max_length=2048,
    )


@functools.cache
def _fast_tokenizer() -> Any:
    """Build the tokenizer once per process: wrapping a 151936-entry vocab takes about a second."""
    try:
        return byte_level(QWEN_ADDED_TOKENS, VOCAB_SIZE, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)
    except TokenizerLayoutError as exc:
        raise AssetError(str(exc)) from None


def build_tokenizer(out_dir: str | os.PathLike[str]) -> Path:
    """Write the tokenizer into `out_dir` and return it; model dirs get the same files via the processor."""
    path = Path(out_dir)
    tokenizer().save_pretrained(path)
    return path


def _merged(defaults: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Overlay `overrides` on `defaults`, recursing into nested dicts (so one rope key can change)."""
    result = copy.deepcopy(dict(defaults))
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(result.get(key), Mapping):
            result[key] = _merged(result[key], value)
        else:
            result[key] = value
    return result


def _text_config() -> dict[str, Any]:
    if transformers_major() >= 5:
        return _TEXT_CONFIG
    # What 4.x reads for the same rotary layout: rope_theta beside rope_scaling.
    text = {k: v for k, v in _TEXT_CONFIG.items() if k != "rope_parameters"}
    rope = _TEXT_CONFIG["rope_parameters"]
    return {
        **text,
        "rope_theta": rope["rope_theta"],
        "rope_scaling": {k: v for k, v in rope.items() if k != "rope_theta"},
    }


def qwen3_vl_config(**overrides: Any) -> Any:
    """The tiny `Qwen3VLConfig`; `text_config` / `vision_config` overrides are merged key by key."""
    from transformers import Qwen3VLConfig

    text = _merged(_text_config(), overrides.pop("text_config", {}))
    vision = _merged(_VISION_CONFIG, overrides.pop("vision_config", {}))
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **overrides)


def processor() -> Any:
    """Qwen3VLProcessor whose image and video processors share the model's patch geometry."""
    from transformers import Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    geometry = {"patch_size": PATCH_SIZE, "temporal_patch_size": TEMPORAL_PATCH, "merge_size": SPATIAL_MERGE}
    # Qwen3-VL normalizes with mean = std = 0.5. ms-swift resizes through qwen-vl-utils and calls the
    # processors with do_resize=False; these small bounds matter where a processor resizes by itself
    # (ms-swift's dummy image for text-only batches under DeepSpeed is 32x32 -> 64x64 -> 4 tokens).
    normalize = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": 4 * _MERGED_PIXELS, "longest_edge": 16 * _MERGED_PIXELS},
        **geometry,
        **normalize,
    )
    # cap_pixels_per_frame=True is qwen-vl-utils' behaviour (and the transformers default from 5.22);
    # setting it also silences transformers' per-run warning about the change.
    video_processor = Qwen3VLVideoProcessor(
        size={"shortest_edge": 4 * _MERGED_PIXELS, "longest_edge": 64 * _MERGED_PIXELS},
        cap_pixels_per_frame=True,
        **geometry,
        **normalize,
    )
    return Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer(), video_processor=video_processor)


def save_qwen3_vl(out_dir: str | os.PathLike[str], seed: int = 0, **config_overrides: Any) -> Path:
    """Save a random-init tiny Qwen3-VL that ms-swift loads with `--model_type qwen3_vl`.

    The directory holds what a hub snapshot holds (config, safetensors weights, tokenizer, processor
    config with image and video processors, generation config), so the loader takes its normal path.
    """
    import torch
    from transformers import GenerationConfig, Qwen3VLForConditionalGeneration

    path = Path(out_dir)
    config = qwen3_vl_config(**config_overrides)
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).eval()
    model.save_pretrained(path)
    processor().save_pretrained(path)
    # Sampling settings of the released Qwen3-VL Instruct checkpoints; eos covers both end markers.
    GenerationConfig(
        bos_token_id=QWEN_ADDED_TOKENS[PAD_TOKEN][0],
        pad_token_id=QWEN_ADDED_TOKENS[PAD_TOKEN][0],
        eos_token_id=[QWEN_ADDED_TOKENS[EOS_TOKEN][0], QWEN_ADDED_TOKENS[PAD_TOKEN][0]],
        do_sample=True,
        temperature=0.7,
        top_p=0.8,
        top_k=20,
    ).save_pretrained(path)
    return path


def build_qwen3_vl(seed: int = 0, dtype: Any = None, config: Any = None) -> Any:
    """Random-init tiny Qwen3-VL in eval mode, in memory; the seed makes two builds bit-identical."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config if config is not None else qwen3_vl_config())
    return model.to(dtype or torch.float32).eval()


# window_size 112 px = 4 merged tokens per side at patch 14 / merge 2: a 56x56 image fits in one window,
# so Qwen2.5-VL's window reordering is the identity for the default test image.
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


def qwen2_5_vl_config() -> Any:
    """Tiny Qwen2.5-VL config: a merger but no deepstack, for the "architecture lacks it" paths."""
    from transformers import Qwen2_5_VLConfig

    text = {k: v for k, v in _TEXT_CONFIG.items() if k not in ("rope_parameters", "head_dim")}
    text["rope_scaling"] = {"rope_type": "default", "mrope_section": [2, 3, 3]}
    ids = {"image_token_id": IMAGE_PAD_ID, "video_token_id": VIDEO_PAD_ID}
    return Qwen2_5_VLConfig(text_config=text, vision_config=copy.deepcopy(_QWEN2_5_VL_VISION), **ids)


def build_qwen2_5_vl(seed: int = 0) -> Any:
    """Random-init tiny Qwen2.5-VL in eval mode."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(qwen2_5_vl_config()).eval()
