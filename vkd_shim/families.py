"""Which vision-language architectures vision KD serves, what each one's targets are, and why the rest are refused.

ms-swift's model-architecture registry (``MultiModelKeys`` in ``swift/model/model_arch.py``) names the aligner of
every multimodal architecture it trains: the modules ``--freeze_aligner`` acts on. The shim hooks that module as
the ``merger`` target. Whether its output can be compared between a student and a teacher is a property of the
modeling code, not of the registry: the aligner must emit one feature row per visual token, in the order the
language model reads them. Projectors whose rows are unpadded or interleaved with newline rows afterwards,
resamplers that emit learned queries, and audio projectors do not; an architecture nobody has checked is not
assumed to. This table is that knowledge, keyed by the transformers architecture a ``config.json`` names, so the
preflight can decide before any model loads.

Stdlib only: the preflight and the doctor read it without importing torch or swift.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import NamedTuple

#: The token geometry shared by every Qwen VLM here (patch and merge size are then checked field by field).
QWEN = "qwen"


class Family(NamedTuple):
    """One architecture whose aligner output fits, as README's and REFERENCE's tables list it."""

    #: The name users know (Qwen3-VL, Gemma 3, ...).
    label: str
    #: ms-swift ``--model_type`` values of the family that were run here.
    model_types: tuple[str, ...]
    #: Target kinds the architecture has (``deepstack`` only where ``deepstack_merger_list`` exists).
    kinds: tuple[str, ...]
    #: Architectures of one group can pair up as student and teacher (same visual tokens for an image).
    group: str
    #: How the fit was proven here (README's Supported table).
    proof: str
    #: The ``vision_config`` field holding the width of what ``vit`` reads (the aligner's input).
    vit_width: str = "hidden_size"


_E2E = "real swift rlhf GKD runs in make test (tests/test_families.py)"

#: transformers architecture -> family, for every architecture whose aligner output fits and was run here.
FITS: Mapping[str, Family] = MappingProxyType(
    {
        "Qwen3VLForConditionalGeneration": Family(
            "Qwen3-VL", ("qwen3_vl",), ("merger", "deepstack", "vit"), QWEN, "real runs on every engine and stack"
        ),
        "Qwen3VLMoeForConditionalGeneration": Family(
            "Qwen3-VL-MoE", ("qwen3_vl_moe",), ("merger", "deepstack", "vit"), QWEN, _E2E
        ),
        "Qwen3_5ForConditionalGeneration": Family("Qwen3.5", ("qwen3_5",), ("merger", "vit"), QWEN, _E2E),
        "Qwen3_5MoeForConditionalGeneration": Family("Qwen3.5-MoE", ("qwen3_5_moe",), ("merger", "vit"), QWEN, _E2E),
        "Qwen2_5_VLForConditionalGeneration": Family("Qwen2.5-VL", ("qwen2_5_vl",), ("merger", "vit"), QWEN, _E2E),
        # Its vision_config calls the ViT's width embed_dim (hidden_size is the merger's output, the LM's width).
        "Qwen2VLForConditionalGeneration": Family(
            "Qwen2-VL", ("qwen2_vl",), ("merger", "vit"), QWEN, _E2E, vit_width="embed_dim"
        ),
        # Pools the ViT's patches to a fixed 256 soft tokens per image ([images, 256, hidden]), read in order.
        "Gemma3ForConditionalGeneration": Family("Gemma 3", ("gemma3_vision",), ("merger", "vit"), "gemma3", _E2E),
        # Pixel-shuffle MLP over every tile ([tiles, 256, hidden]); the LM reads tile by tile, in order.
        "InternVLForConditionalGeneration": Family("InternVL", ("internvl",), ("merger", "vit"), "internvl", _E2E),
        # One projector row per CLIP patch, scattered in order into the <image> placeholders by the modeling code
        # itself (transformers raises on a count mismatch): LLaVA-1.5 and every other LlavaForConditionalGeneration.
        "LlavaForConditionalGeneration": Family("LLaVA", ("llava1_5_hf",), ("merger", "vit"), "llava", _E2E),
        # Qwen-VL-shaped merger under GLM's tokenizer (GLM-4.1V, GLM-4.6V-Flash); a downsampling convolution
        # before the merger already maps the ViT's patches to out_hidden_size.
        "Glm4vForConditionalGeneration": Family(
            "GLM-4.1V", ("glm4v",), ("merger", "vit"), "glm4v", _E2E, vit_width="out_hidden_size"
        ),
    }
)

_UNPADDED = (
    "its projector's rows are unpadded and interleaved with image_newline rows before the language model reads"
    " them, so they are not one row per visual token in reading order"
)

#: transformers architecture -> why its aligner output does not fit, for architectures whose code was read.
UNFIT: Mapping[str, str] = MappingProxyType(
    {
        "LlavaOnevisionForConditionalGeneration": _UNPADDED,
        "LlavaNextForConditionalGeneration": _UNPADDED,
        "LlavaNextVideoForConditionalGeneration": _UNPADDED,
        "MiniCPMV": "its aligner is a resampler: it emits a fixed set of learned queries per image, not visual tokens",
        "Qwen2AudioForConditionalGeneration": "its aligner projects an audio tower: there is no vision pathway",
    }
)

#: Words in a registry aligner path that give its kind away, for architectures outside both tables.
_PATH_KINDS = (
    (("resampler", "perceive", "perceiver"), "its aligner {path!r} is a resampler: it emits learned queries per image"),
    (("audio", "speech"), "its aligner {path!r} projects an audio tower"),
)


def architecture(document: Mapping[str, object] | None) -> str | None:
    """The transformers architecture a ``config.json`` names (its first ``architectures`` entry)."""
    names = (document or {}).get("architectures") or ()
    return str(names[0]) if isinstance(names, (list, tuple)) and names else None


def family(name: str | None) -> Family | None:
    return FITS.get(name) if name else None


def unfit_reason(name: str | None, aligner: Sequence[str] | None = None) -> str | None:
    """Why the architecture's aligner output cannot be distilled, or None when it fits.

    ``aligner`` is ms-swift's registry entry for it, where known: it names the resampler or audio projector
    of an architecture outside the tables, and its absence is a reason of its own.
    """
    if family(name) is not None:
        return None
    if name in UNFIT:
        return UNFIT[name]
    if aligner is not None and not aligner:
        return "ms-swift records no aligner for it (swift/model/model_arch.py), so there is no module to anchor"
    for path in aligner or ():
        for words, reason in _PATH_KINDS:
            if any(word in path.rsplit(".", 1)[-1].lower() for word in words):
                return reason.format(path=path)
    shown = f" ({', '.join(aligner)})" if aligner else ""
    return (
        f"vkd_shim has not verified that its aligner{shown} emits one feature row per visual token in the order the"
        " language model reads them"
    )


def supported_text() -> str:
    return ", ".join(f.label for f in FITS.values())
