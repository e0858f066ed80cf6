"""Tiny random-init checkpoints of four non-Qwen vision-language families, so vision KD meets aligners that are
not Qwen's merger: Gemma 3 (``gemma3_vision``), InternVL3 in its transformers-native form (``internvl``), GLM-4.1V
(``glm4v``) and LLaVA-1.5 (``llava1_5_hf``: CLIP, a two-layer MLP projector, Llama).

Chosen for what is distilled today and for the aligner shapes they cover: Gemma 3's 4B / 12B / 27B share a SigLIP
tower and a pooling projector emitting ``[images, 256, hidden]``; InternVL3 / 3.5's 1B..78B ladders share
InternViT and a pixel-shuffle MLP emitting ``[tiles, 256, hidden]`` (a varying number of tiles per image); GLM-4.1V
(and GLM-4.6V-Flash) has a Qwen-VL-like flat ``[tokens, hidden]`` merger under another tokenizer. In all three the
aligner's output rows are the rows the language model scatters into its image placeholders, in order
(tests/test_families_fit.py measures it); LLaVA-OneVision's are not (unpadded, then ``image_newline`` rows are added).

Each directory holds what a hub snapshot holds (config, safetensors, tokenizer, processor, generation config), the
family's special tokens at their real ids (ms-swift's templates hard-code some ids and emit the strings of the
others), and image processors shrunk so the 64x64 / 96x64 test images become a few tokens. Heavy imports stay
inside the functions.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

from vkd_shim.testing.models import QWEN_ADDED_TOKENS, AssetError, _merged
from vkd_shim.testing.tokenizers import AddedTokens, TokenizerLayoutError, byte_level

_SYMBOLS = 256  # byte_level's alphabet takes ids 0..255

# --- Gemma 3 ---------------------------------------------------------------------------------------------
# Real ids of google/gemma-3-*-it: the template emits <bos>, <start_of_turn>, <end_of_turn> and hard-codes the
# begin-of-image id 255999; the processor expands it to <image_soft_token> (262144, the config's image_token_index)
# and the generation config stops on <eos> and <end_of_turn>.
GEMMA3_VOCAB_SIZE = 262208
GEMMA3_ADDED_TOKENS: dict[str, tuple[int, bool]] = {
    "<pad>": (0, True),
    "<eos>": (1, True),
    "<bos>": (2, True),
    "<unk>": (3, True),
    "<mask>": (4, True),
    "<start_of_turn>": (105, True),
    "<end_of_turn>": (106, True),
    "<start_of_image>": (255999, True),
    "<end_of_image>": (256000, True),
    "<image_soft_token>": (262144, True),
}
# SigLIP at 32 px / patch 8 = 4x4 patches, average-pooled 2x2 to 4 soft tokens: Gemma resizes every image to
# one square, so each test image is 4 tokens whatever its shape (the real model: 896 px -> 64x64 -> 256).
_GEMMA3_IMAGE = 32
_GEMMA3_TOKENS = 4

# --- InternVL3 (-hf) -------------------------------------------------------------------------------------
# transformers' convert_internvl_weights_to_hf.py: Qwen2.5-VL's tokenizer (added tokens 151643..151664) plus
# nine InternVL tokens from 151665, so <IMG_CONTEXT> is 151667 (InternVLConfig.image_token_id); InternVL3-1B's
# text vocab is 151674. The template emits <img>, </img>, <IMG_CONTEXT> by string.
INTERNVL_VOCAB_SIZE = 151674
INTERNVL_ADDED_TOKENS: dict[str, tuple[int, bool]] = {
    **{token: spec for token, spec in QWEN_ADDED_TOKENS.items() if spec[0] < 151665},
    **{
        token: (151665 + offset, True)
        for offset, token in enumerate(
            ("<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")
        )
    },
}
# Named tokens InternVLProcessor reads off the tokenizer. "<video>" has no id in the real tokenizer.json either:
# transformers 5 appends it at load (id 151674, outside the model's vocab; ms-swift never feeds it).
_INTERNVL_NAMED = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>"}
_INTERNVL_NAMED["video_token"] = "<video>"
# InternViT at 32 px / patch 8 = 16 patches, pixel-shuffled (ratio 0.5) to 4 tokens per tile. Up to 2 tiles
# plus a thumbnail when tiled: 64x64 is one tile (4 tokens), 96x64 two tiles and a thumbnail (12 tokens).
_INTERNVL_TILE = 32
_INTERNVL_TOKENS = 4

# --- GLM-4.1V --------------------------------------------------------------------------------------------
# GLM-4.1V-9B's tokenizer: 16 added tokens from 151329 (<|endoftext|> .. <|video|>) over a 151329-entry BPE;
# the text vocab is 151552 (Glm4vTextConfig). ms-swift's glm4v template hard-codes 151339..151342 and emits
# [gMASK]<sop>, <|user|>, <|assistant|>, <|image|>, <|endoftext|> by string.
GLM4V_VOCAB_SIZE = 151552
GLM4V_ADDED_TOKENS: dict[str, tuple[int, bool]] = {
    token: (151329 + offset, True)
    for offset, token in enumerate(
        (
            "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
            "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
            "<|end_of_video|>", "<|image|>", "<|video|>",
        )
    )
}  # fmt: skip
# patch 16 x merge 2: one token per 32x32 px, so 64x64 -> 4 tokens and 96x64 -> 6 (as the Qwen3-VL kit).
_GLM4V_PATCH = 16
_GLM4V_MERGE = 2
# GLM rotates half of each head (16 wide here): 4 frequencies for t / h / w, as 32 split 8:12:12 in GLM-4.1V.
_GLM4V_ROPE = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5, "mrope_section": [1, 1, 2]}

_TINY_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "max_position_embeddings": 2048,
}
_TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2}


def _tokenizer(added: AddedTokens, vocab_size: int, **special: Any) -> Any:
    """`byte_level`, also for tokens below 256 (Gemma's <bos> 2, <end_of_turn> 106), where its byte alphabet sits.

    Those are built at free high ids and then swapped with the byte symbol at their real id: a BPE without merges
    encodes and decodes the same whatever id each symbol has.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    taken = {token_id for token_id, _ in added.values()}
    free = (i for i in range(vocab_size - 1, _SYMBOLS - 1, -1) if i not in taken)
    staged = {token: (next(free) if i < _SYMBOLS else i, flag) for token, (i, flag) in added.items()}
    try:
        fast = byte_level(staged, vocab_size, **special)
    except TokenizerLayoutError as exc:
        raise AssetError(str(exc)) from None
    if staged == dict(added):
        return fast
    state = json.loads(fast.backend_tokenizer.to_str())
    vocab = state["model"]["vocab"]
    symbol_at = {token_id: symbol for symbol, token_id in vocab.items() if token_id < _SYMBOLS}
    moved = {staged[token][0]: real for token, (real, _) in added.items() if real < _SYMBOLS}
    for token, (real, _) in added.items():
        if real < _SYMBOLS:
            vocab[symbol_at[real]], vocab[token] = staged[token][0], real
    for entry in state["added_tokens"]:
        entry["id"] = moved.get(entry["id"], entry["id"])
    backend = Tokenizer.from_str(json.dumps(state))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=2048, **special)
    misplaced = {t: i for t, (i, _) in added.items() if tokenizer.convert_tokens_to_ids(t) != i}
    if misplaced or len(tokenizer) != vocab_size:
        raise AssetError(f"relocated tokenizer differs from the family's: misplaced={misplaced}, size={len(tokenizer)}")
    return tokenizer


@functools.cache
def gemma3_tokenizer() -> Any:
    """Gemma 3's layout; Gemma3Processor reads boi/eoi/image tokens off the tokenizer by name."""
    named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    special = {f"{name}_token": f"<{name}>" for name in ("bos", "eos", "pad", "unk", "mask")}
    return _tokenizer(GEMMA3_ADDED_TOKENS, GEMMA3_VOCAB_SIZE, **special, extra_special_tokens=named)


@functools.cache
def internvl_tokenizer() -> Any:
    special = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    tokenizer = _tokenizer(INTERNVL_ADDED_TOKENS, INTERNVL_VOCAB_SIZE, **special)
    # Named after the build, as the real tokenizer_config.json names them: named in the constructor, "<video>"
    # would be appended to the vocab.
    tokenizer._set_model_specific_special_tokens(special_tokens=_INTERNVL_NAMED)
    return tokenizer


@functools.cache
def glm4v_tokenizer() -> Any:
    return _tokenizer(GLM4V_ADDED_TOKENS, GLM4V_VOCAB_SIZE, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def gemma3_config(**overrides: Any) -> Any:
    """Tiny `Gemma3Config`; `text_config` / `vision_config` overrides are merged key by key."""
    from transformers import Gemma3Config

    ids = {f"{name}_token_id": GEMMA3_ADDED_TOKENS[f"<{name}>"][0] for name in ("bos", "eos", "pad")}
    text = {
        **_TINY_TEXT,
        **ids,
        "vocab_size": GEMMA3_VOCAB_SIZE,
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "sliding_window": 64,
        # One local and one global layer, as Gemma 3 interleaves them (5:1 in the real model).
        "layer_types": ["sliding_attention", "full_attention"],
    }
    vision = {**_TINY_VISION, "image_size": _GEMMA3_IMAGE, "patch_size": 8, "vision_use_head": False}
    return Gemma3Config(
        text_config=_merged(text, overrides.pop("text_config", {})),
        vision_config=_merged(vision, overrides.pop("vision_config", {})),
        mm_tokens_per_image=_GEMMA3_TOKENS,
        boi_token_index=GEMMA3_ADDED_TOKENS["<start_of_image>"][0],
        eoi_token_index=GEMMA3_ADDED_TOKENS["<end_of_image>"][0],
        image_token_index=GEMMA3_ADDED_TOKENS["<image_soft_token>"][0],
        **overrides,
    )


def internvl_config(**overrides: Any) -> Any:
    """Tiny `InternVLConfig` (Qwen2 text, InternViT vision); sub-config overrides are merged key by key."""
    from transformers import InternVLConfig

    eos, pad = INTERNVL_ADDED_TOKENS["<|im_end|>"][0], INTERNVL_ADDED_TOKENS["<|endoftext|>"][0]
    text = {
        **_TINY_TEXT,
        "model_type": "qwen2",
        "vocab_size": INTERNVL_VOCAB_SIZE,
        "tie_word_embeddings": True,
        "bos_token_id": pad,
        "eos_token_id": eos,
        "pad_token_id": pad,
    }
    tile = [_INTERNVL_TILE, _INTERNVL_TILE]
    vision = {**_TINY_VISION, "image_size": tile, "patch_size": [8, 8], "use_absolute_position_embeddings": True}
    return InternVLConfig(
        text_config=_merged(text, overrides.pop("text_config", {})),
        vision_config=_merged(vision, overrides.pop("vision_config", {})),
        image_token_id=INTERNVL_ADDED_TOKENS["<IMG_CONTEXT>"][0],
        image_seq_length=_INTERNVL_TOKENS,
        downsample_ratio=0.5,
        **overrides,
    )


def glm4v_config(**overrides: Any) -> Any:
    """Tiny `Glm4vConfig`; sub-config overrides are merged key by key."""
    from transformers import Glm4vConfig

    eos = GLM4V_ADDED_TOKENS["<|endoftext|>"][0]
    text = {
        **_TINY_TEXT,
        "vocab_size": GLM4V_VOCAB_SIZE,
        "rope_parameters": _GLM4V_ROPE,
        "eos_token_id": eos,
        "pad_token_id": eos,
    }
    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "image_size": 64}
    vision |= {"patch_size": _GLM4V_PATCH, "spatial_merge_size": _GLM4V_MERGE, "temporal_patch_size": 2}
    vision["out_hidden_size"] = _TINY_TEXT["hidden_size"]
    return Glm4vConfig(
        text_config=_merged(text, overrides.pop("text_config", {})),
        vision_config=_merged(vision, overrides.pop("vision_config", {})),
        **overrides,
    )


def _gemma3_processor() -> Any:
    from transformers import Gemma3ImageProcessor, Gemma3Processor

    size = {"height": _GEMMA3_IMAGE, "width": _GEMMA3_IMAGE}
    image = Gemma3ImageProcessor(size=size, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return Gemma3Processor(image_processor=image, tokenizer=gemma3_tokenizer(), image_seq_length=_GEMMA3_TOKENS)


def _internvl_processor() -> Any:
    from transformers import GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor

    tile = {"height": _INTERNVL_TILE, "width": _INTERNVL_TILE}
    normalize = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
    image = GotOcr2ImageProcessor(size=tile, crop_to_patches=False, min_patches=1, max_patches=2, **normalize)
    video = InternVLVideoProcessor(size=tile, **normalize)
    tokenizer, tokens = internvl_tokenizer(), _INTERNVL_TOKENS
    return InternVLProcessor(image_processor=image, tokenizer=tokenizer, video_processor=video, image_seq_length=tokens)


def _glm4v_processor() -> Any:
    from transformers import Glm4vImageProcessor, Glm4vProcessor, Glm4vVideoProcessor

    merged = (_GLM4V_PATCH * _GLM4V_MERGE) ** 2
    geometry = {"patch_size": _GLM4V_PATCH, "temporal_patch_size": 2, "merge_size": _GLM4V_MERGE}
    normalize = {"image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
    # Bounds count pixels of the 2-frame image stack: 4..32 merged tokens per image.
    size = {"shortest_edge": 2 * 4 * merged, "longest_edge": 2 * 32 * merged}
    image = Glm4vImageProcessor(size=size, **geometry, **normalize)
    video = Glm4vVideoProcessor(size=size, **geometry, **normalize)
    return Glm4vProcessor(image_processor=image, tokenizer=glm4v_tokenizer(), video_processor=video)


def _save(path: Path, model: Any, processor: Any, **generation: Any) -> Path:
    from transformers import GenerationConfig

    model.save_pretrained(path)
    processor.save_pretrained(path)
    GenerationConfig(**generation).save_pretrained(path)
    return path


def save_gemma3_vision(out_dir: str | os.PathLike[str], seed: int = 0, **config_overrides: Any) -> Path:
    """Save a random-init tiny Gemma 3 that ms-swift loads with `--model_type gemma3_vision`.

    transformers zero-initialises the projector's matrix (a bare parameter, not a Linear): left so, every image
    feature would be zero on both sides and the vision KD term zero whatever the student learns.
    """
    import torch
    from transformers import Gemma3ForConditionalGeneration

    config = gemma3_config(**config_overrides)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=config.initializer_range)
    ids = GEMMA3_ADDED_TOKENS
    # The released -it checkpoints stop on <eos> and <end_of_turn>.
    eos = [ids["<eos>"][0], ids["<end_of_turn>"][0]]
    return _save(
        Path(out_dir), model, _gemma3_processor(), bos_token_id=ids["<bos>"][0], pad_token_id=ids["<pad>"][0],
        eos_token_id=eos, do_sample=True, top_k=64, top_p=0.95,
    )  # fmt: skip


def save_internvl(out_dir: str | os.PathLike[str], seed: int = 0, **config_overrides: Any) -> Path:
    """Save a random-init tiny InternVL3-hf that ms-swift loads with `--model_type internvl` (the model type has
    one template, internvl_hf, so none needs naming)."""
    import torch
    from transformers import InternVLForConditionalGeneration

    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(internvl_config(**config_overrides)).eval()
    eos, pad = INTERNVL_ADDED_TOKENS["<|im_end|>"][0], INTERNVL_ADDED_TOKENS["<|endoftext|>"][0]
    return _save(Path(out_dir), model, _internvl_processor(), bos_token_id=pad, pad_token_id=pad, eos_token_id=eos)


def save_glm4v(out_dir: str | os.PathLike[str], seed: int = 0, **config_overrides: Any) -> Path:
    """Save a random-init tiny GLM-4.1V that ms-swift loads with `--model_type glm4v --template glm4v` (the model
    type also lists glm4_5v, so ms-swift cannot pick the template of a local directory by itself)."""
    import torch
    from transformers import Glm4vForConditionalGeneration

    torch.manual_seed(seed)
    model = Glm4vForConditionalGeneration(glm4v_config(**config_overrides)).eval()
    ids = GLM4V_ADDED_TOKENS
    # The three stop words of ms-swift's GLM-4 templates: end of text, the next user turn, a tool observation.
    eos = [ids[token][0] for token in ("<|endoftext|>", "<|user|>", "<|observation|>")]
    return _save(Path(out_dir), model, _glm4v_processor(), pad_token_id=eos[0], eos_token_id=eos, do_sample=False)


# --- LLaVA-1.5 (-hf) -------------------------------------------------------------------------------------
# llava-hf/llava-1.5-7b-hf (transformers' convert_llava_weights_to_hf.py): Vicuna's Llama tokenizer (<unk> 0,
# <s> 1, </s> 2) plus <image> at 32000 (LlavaConfig's image_token_index default) and <pad> at 32001, the text
# vocab padded to 32064. ms-swift's llava1_5_hf template emits <s>, </s> and <image> by string.
LLAVA_VOCAB_SIZE = 32064
LLAVA_ADDED_TOKENS: dict[str, tuple[int, bool]] = {
    "<unk>": (0, True), "<s>": (1, True), "</s>": (2, True), "<image>": (32000, True), "<pad>": (32001, True),
}  # fmt: skip
# CLIP at 32 px / patch 8 = 16 patches plus CLS; the 'default' strategy drops CLS, so every image is 16 tokens
# (the processor resizes the shortest edge to 32 and centre-crops, as the real one does at 336 px -> 576 tokens).
_LLAVA_IMAGE = 32
_LLAVA_PATCH = 8
_LLAVA_SPECIAL = {"bos": "<s>", "eos": "</s>", "pad": "<pad>"}


def _llava_ids() -> dict[str, int]:
    """bos / eos / pad ids as the real text config and generation config hold them."""
    return {f"{name}_token_id": LLAVA_ADDED_TOKENS[token][0] for name, token in _LLAVA_SPECIAL.items()}


@functools.cache
def llava_tokenizer() -> Any:
    special = {f"{name}_token": token for name, token in _LLAVA_SPECIAL.items()}
    return _tokenizer(LLAVA_ADDED_TOKENS, LLAVA_VOCAB_SIZE, unk_token="<unk>", **special)


def llava_config(**overrides: Any) -> Any:
    """Tiny `LlavaConfig` (Llama text, CLIP vision, the real -2 feature layer); sub-configs merge key by key."""
    from transformers import LlavaConfig

    text = {**_TINY_TEXT, **_llava_ids(), "model_type": "llama", "vocab_size": LLAVA_VOCAB_SIZE}
    vision = {**_TINY_VISION, "model_type": "clip_vision_model", "image_size": _LLAVA_IMAGE, "patch_size": _LLAVA_PATCH}
    return LlavaConfig(
        text_config=_merged(text, overrides.pop("text_config", {})),
        vision_config=_merged(vision, overrides.pop("vision_config", {})),
        image_token_index=LLAVA_ADDED_TOKENS["<image>"][0],
        image_seq_length=(_LLAVA_IMAGE // _LLAVA_PATCH) ** 2,
        vision_feature_select_strategy="default",
        **overrides,
    )


def _llava_processor() -> Any:
    """ms-swift counts placeholders from the processor (patches + num_additional_image_tokens - 1 for 'default'):
    with CLIP's CLS counted in and dropped again, they equal the projector's rows."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    normalize = {"image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
    crop = {"height": _LLAVA_IMAGE, "width": _LLAVA_IMAGE}
    image = CLIPImageProcessor(size={"shortest_edge": _LLAVA_IMAGE}, crop_size=crop, **normalize)
    geometry = {"patch_size": _LLAVA_PATCH, "vision_feature_select_strategy": "default"}
    return LlavaProcessor(image_processor=image, tokenizer=llava_tokenizer(), num_additional_image_tokens=1, **geometry)


def save_llava(out_dir: str | os.PathLike[str], seed: int = 0, **config_overrides: Any) -> Path:
    """Save a random-init tiny LLaVA-1.5-hf that ms-swift loads with `--model_type llava1_5_hf` (its one template
    is llava1_5_hf)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(llava_config(**config_overrides)).eval()
    return _save(Path(out_dir), model, _llava_processor(), **_llava_ids())
