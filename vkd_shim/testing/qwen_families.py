"""Tiny checkpoints of the other Qwen VLM families: Qwen3-VL-MoE, Qwen3.5, Qwen3.5-MoE and Qwen2.5-VL.

The shim finds its targets by module path and assumes one merger row per visual token; each family wires
its vision tower and language model differently (sparse experts, Gated-DeltaNet linear attention, no
deepstack, patch 14 with window attention). Real transformers classes with toy dimensions, saved as hub-like
directories that ``swift rlhf --rlhf_type gkd`` loads, let a test prove that on the real loaders, templates
and forwards instead of on a mock. Sizes, seeds and the vision geometry follow :mod:`vkd_shim.testing.models`
(whose tokenizer and processors the Qwen3-VL-derived families reuse), so one dataset fits every family.

Heavy imports stay inside the functions, so importing this module does not load torch.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vkd_shim.testing import models
from vkd_shim.testing.models import QWEN_ADDED_TOKENS, AssetError, _merged, _text_config
from vkd_shim.testing.tokenizers import TokenizerLayoutError, byte_level

QWEN3_5_VOCAB_SIZE = 248320

# Qwen3.5's added tokens: Qwen3's 26 markers in Qwen3's order moved to 248044.., then audio and TTS markers
# (the released tokenizer_config.json; transformers pins image/video pad and vision start/end in
# Qwen3_5Config, ms-swift's Qwen3_5Template hard-codes image pad 248056 and video pad 248057).
_QWEN3_5_FIRST_ID = 248044
_QWEN3_5_EXTRA_TOKENS = (
    ("<|audio_start|>", True),
    ("<|audio_end|>", True),
    ("<tts_pad>", True),
    ("<tts_text_bos>", True),
    ("<tts_text_eod>", True),
    ("<tts_text_bos_single>", True),
    ("<|audio_pad|>", True),
)
QWEN3_5_ADDED_TOKENS: dict[str, tuple[int, bool]] = {
    token: (_QWEN3_5_FIRST_ID + offset, special)
    for offset, (token, special) in enumerate(
        [
            *((token, special) for token, (_, special) in sorted(QWEN_ADDED_TOKENS.items(), key=lambda t: t[1][0])),
            *_QWEN3_5_EXTRA_TOKENS,
        ]
    )
}
QWEN3_5_IMAGE_PAD_ID = QWEN3_5_ADDED_TOKENS["<|image_pad|>"][0]
QWEN3_5_VIDEO_PAD_ID = QWEN3_5_ADDED_TOKENS["<|video_pad|>"][0]

# Sparse LM of both MoE families: 4 experts, 2 routed per token, every layer sparse (as released).
_MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64}

# Qwen3.5's hybrid LM: three Gated-DeltaNet layers to one full-attention layer in the released models; with
# three layers, two linear then one full keeps both kinds on every forward. Full-attention layers rotate
# only partial_rotary_factor (0.25, as released) of head_dim, so head_dim 32 gives 8 rotary dims, 4
# frequencies for the interleaved t/h/w mrope sections. No deepstack: Qwen3.5's tower has the merger only.
_QWEN3_5_TEXT: dict[str, Any] = {
    "vocab_size": QWEN3_5_VOCAB_SIZE,
    "head_dim": 32,
    "layer_types": ["linear_attention", "linear_attention", "full_attention"],
    "linear_conv_kernel_dim": 4,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "rope_parameters": {"rope_theta": 10000000.0, "mrope_section": [2, 1, 1], "partial_rotary_factor": 0.25},
    # The released text config's eos is <|endoftext|>; the generation config stops on either end marker.
    "bos_token_id": None,
    "eos_token_id": QWEN3_5_ADDED_TOKENS["<|endoftext|>"][0],
    "pad_token_id": QWEN3_5_ADDED_TOKENS["<|endoftext|>"][0],
}
_QWEN3_5_VISION = {k: v for k, v in models._VISION_CONFIG.items() if k != "deepstack_visual_indexes"}

# Qwen2.5-VL's processors: patch 14 and merge 2 make 28 px per merged token (64x64 -> 56x56 -> 4 tokens via
# qwen-vl-utils), normalized with OpenAI CLIP's mean and std as released.
_QWEN2_5_VL_MERGED_PIXELS = (14 * 2) ** 2


def _transformers_class(name: str) -> Any:
    """A transformers class this family needs, or AssetError on a release that predates the family."""
    import transformers

    try:
        return getattr(transformers, name)
    except AttributeError:
        raise AssetError(f"transformers {transformers.__version__} has no {name}") from None


@functools.cache
def qwen3_5_tokenizer() -> Any:
    """Byte-level tokenizer with Qwen3.5's added tokens at their ids and its 248320-id vocab."""
    end = "<|im_end|>"
    try:
        return byte_level(QWEN3_5_ADDED_TOKENS, QWEN3_5_VOCAB_SIZE, eos_token=end, pad_token="<|endoftext|>")
    except TokenizerLayoutError as exc:
        raise AssetError(str(exc)) from None


def _generation_config(added: Mapping[str, tuple[int, bool]]) -> Any:
    """Qwen3-VL Instruct's sampling settings with the family's ids; eos covers both end markers."""
    from transformers import GenerationConfig

    end_of_text, im_end = added["<|endoftext|>"][0], added["<|im_end|>"][0]
    return GenerationConfig(
        bos_token_id=end_of_text,
        pad_token_id=end_of_text,
        eos_token_id=[im_end, end_of_text],
        do_sample=True,
        temperature=0.7,
        top_p=0.8,
        top_k=20,
    )


def _save(
    out_dir: str | os.PathLike[str],
    model_class: str,
    config: Any,
    processor: Any,
    added: Mapping[str, tuple[int, bool]],
    seed: int,
) -> Path:
    """Write what a hub snapshot holds (config, safetensors, tokenizer, processors, generation config), so
    ms-swift's loader takes its normal path."""
    import torch

    path = Path(out_dir)
    torch.manual_seed(seed)
    _transformers_class(model_class)(config).eval().save_pretrained(path)
    processor.save_pretrained(path)
    _generation_config(added).save_pretrained(path)
    return path


def _sub_configs(text: Mapping[str, Any], vision: Mapping[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`text_config` / `vision_config` from `overrides` merged key by key into the family's defaults."""
    return {
        "text_config": _merged(text, overrides.pop("text_config", {})),
        "vision_config": _merged(vision, overrides.pop("vision_config", {})),
    }


def width_overrides(hidden_size: int) -> dict[str, Any]:
    """Overrides for a language width other than 64 (the merger projects into it), for `relation` tests.

    Qwen2.5-VL's attention ignores `head_dim` and splits the width into `num_attention_heads`, while its
    mrope sections are fixed for 16-wide heads; so the head count grows with the width (16 per head, 2 kv
    heads) and every family's rotary layout stays valid.
    """
    if hidden_size % 32:
        raise ValueError(f"hidden_size must be a multiple of 32 (16-wide heads, 2 kv heads), got {hidden_size}")
    text = {"hidden_size": hidden_size, "num_attention_heads": hidden_size // 16}
    return {"text_config": text, "vision_config": {"out_hidden_size": hidden_size}}


def qwen3_vl_moe_config(**overrides: Any) -> Any:
    """Tiny `Qwen3VLMoeConfig`: Qwen3-VL's tower (merger + 2 deepstack mergers) and a sparse LM."""
    config_class = _transformers_class("Qwen3VLMoeConfig")
    sub = _sub_configs({**_text_config(), **_MOE}, models._VISION_CONFIG, overrides)
    return config_class(**sub, tie_word_embeddings=False, **overrides)


def save_qwen3_vl_moe(out_dir: str | os.PathLike[str], seed: int = 0, **config_overrides: Any) -> Path:
    """Save a random-init tiny Qwen3-VL-MoE that ms-swift loads with `--model_type qwen3_vl_moe`."""
    config = qwen3_vl_moe_config(**config_overrides)
    return _save(out_dir, "Qwen3VLMoeForConditionalGeneration", config, models.processor(), QWEN_ADDED_TOKENS, seed)


def qwen3_5_processor() -> Any:
    """Qwen3VLProcessor (what AutoProcessor maps qwen3_5 to) over Qwen3-VL's image and video processors:
    Qwen3.5 shares Qwen3-VL's patch geometry and 0.5 normalization, only the tokenizer differs."""
    base = models.processor()
    return type(base)(
        image_processor=base.image_processor, video_processor=base.video_processor, tokenizer=qwen3_5_tokenizer()
    )


def _qwen3_5_text(moe: bool) -> dict[str, Any]:
    text = _merged(_text_config(), _QWEN3_5_TEXT)
    if not moe:
        return text
    # Qwen3.5-MoE has no dense MLP width; each sparse layer adds one shared expert beside the routed ones.
    dense = {k: v for k, v in text.items() if k != "intermediate_size"}
    return {**dense, **_MOE, "shared_expert_intermediate_size": _MOE["moe_intermediate_size"]}


def qwen3_5_config(**overrides: Any) -> Any:
    """Tiny `Qwen3_5Config`: merger-only tower, hybrid linear / full attention LM."""
    sub = _sub_configs(_qwen3_5_text(moe=False), _QWEN3_5_VISION, overrides)
    return _transformers_class("Qwen3_5Config")(**sub, tie_word_embeddings=False, **overrides)


def qwen3_5_moe_config(**overrides: Any) -> Any:
    """Tiny `Qwen3_5MoeConfig`: Qwen3.5's tower and hybrid attention with sparse MLPs."""
    sub = _sub_configs(_qwen3_5_text(moe=True), _QWEN3_5_VISION, overrides)
    return _transformers_class("Qwen3_5MoeConfig")(**sub, tie_word_embeddings=False, **overrides)


def save_qwen3_5(out_dir: str | os.PathLike[str], seed: int = 0, **config_overrides: Any) -> Path:
    """Save a random-init tiny Qwen3.5 that ms-swift loads with `--model_type qwen3_5 --template qwen3_5`."""
    config = qwen3_5_config(**config_overrides)
    return _save(out_dir, "Qwen3_5ForConditionalGeneration", config, qwen3_5_processor(), QWEN3_5_ADDED_TOKENS, seed)


def save_qwen3_5_moe(out_dir: str | os.PathLike[str], seed: int = 0, **config_overrides: Any) -> Path:
    """Save a random-init tiny Qwen3.5-MoE (`--model_type qwen3_5_moe --template qwen3_5`)."""
    config = qwen3_5_moe_config(**config_overrides)
    return _save(out_dir, "Qwen3_5MoeForConditionalGeneration", config, qwen3_5_processor(), QWEN3_5_ADDED_TOKENS, seed)


def qwen2_5_vl_config(**overrides: Any) -> Any:
    """`models.qwen2_5_vl_config()` (the in-memory tests' model) with key-by-key overrides."""
    base = models.qwen2_5_vl_config()
    return type(base).from_dict(_merged(base.to_dict(), overrides))


def qwen2_5_vl_processor(processor_class: str = "Qwen2_5_VLProcessor") -> Any:
    """Qwen2.5-VL's (or, by class name, Qwen2-VL's) processor: patch 14 / merge 2 image and video processors and
    CLIP normalization, the geometry both releases share."""
    import transformers
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    vision = models.qwen2_5_vl_config().vision_config
    geometry = {
        "patch_size": vision.patch_size,
        "temporal_patch_size": vision.temporal_patch_size,
        "merge_size": vision.spatial_merge_size,
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD),
    }
    # Bounds as in models.processor(): they matter only where a processor resizes by itself.
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": 4 * _QWEN2_5_VL_MERGED_PIXELS, "longest_edge": 16 * _QWEN2_5_VL_MERGED_PIXELS},
        **geometry,
    )
    video_processor = Qwen2VLVideoProcessor(
        size={"shortest_edge": 4 * _QWEN2_5_VL_MERGED_PIXELS, "longest_edge": 64 * _QWEN2_5_VL_MERGED_PIXELS},
        **geometry,
    )
    return getattr(transformers, processor_class)(
        image_processor=image_processor, tokenizer=models.tokenizer(), video_processor=video_processor
    )


def save_qwen2_5_vl(out_dir: str | os.PathLike[str], seed: int = 0, **config_overrides: Any) -> Path:
    """Save a random-init tiny Qwen2.5-VL that ms-swift loads with `--model_type qwen2_5_vl`."""
    config = qwen2_5_vl_config(**config_overrides)
    return _save(out_dir, "Qwen2_5_VLForConditionalGeneration", config, qwen2_5_vl_processor(), QWEN_ADDED_TOKENS, seed)


# Qwen2-VL's vision config names the ViT width embed_dim and the merger's output (the LM width) hidden_size.
_QWEN2_VL_VISION = {
    "depth": 2,
    "embed_dim": 32,
    "hidden_size": models._TEXT_CONFIG["hidden_size"],
    "mlp_ratio": 2,
    "num_heads": 2,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
}


def qwen2_vl_config(**overrides: Any) -> Any:
    """Tiny Qwen2-VL: Qwen2.5-VL's merger and geometry without window attention, the LM of Qwen2 with mrope."""
    from transformers import Qwen2VLConfig

    text = {k: v for k, v in models._TEXT_CONFIG.items() if k not in ("rope_parameters", "head_dim")}
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]}
    ids = {"image_token_id": models.IMAGE_PAD_ID, "video_token_id": models.VIDEO_PAD_ID}
    return Qwen2VLConfig(**_sub_configs(text, _QWEN2_VL_VISION, overrides), **ids, **overrides)


def save_qwen2_vl(out_dir: str | os.PathLike[str], seed: int = 0, **config_overrides: Any) -> Path:
    """Save a random-init tiny Qwen2-VL that ms-swift loads with `--model_type qwen2_vl`."""
    processor = qwen2_5_vl_processor("Qwen2VLProcessor")
    return _save(
        out_dir,
        "Qwen2VLForConditionalGeneration",
        qwen2_vl_config(**config_overrides),
        processor,
        QWEN_ADDED_TOKENS,
        seed,
    )
