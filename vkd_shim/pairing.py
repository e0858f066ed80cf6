"""What the models' ``config.json`` files decide before any load: the targets a student-teacher pair has, and the
pairs that cannot work.

A model's ``config.json`` says which architecture it is (:mod:`vkd_shim.families`: whether its aligner output
fits), which vision geometry turns an image into visual tokens, how wide its aligner is, and how many deepstack
mergers it has. :mod:`vkd_shim.preflight` asks this module about the models and the arguments about the rest;
the runtime asks it again about the loaded models' configs, so both decide alike.

No torch and no ms-swift, like the preflight: it reads files and numbers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

from vkd_shim import families
from vkd_shim.config import VisualKDConfig

RELATION_DISTANCES = ("relation",)


#: The fix of a target the model lacks, wherever that is found (preflight, trainer construction, the doctor).
MISSING_TARGET_FIX = (
    "choose targets the architecture has (custom.visual_kd.targets), or list the ones it may lack in"
    " custom.visual_kd.optional_targets"
)


class Refusal(NamedTuple):
    reason: str
    fix: str


#: Fields that decide which visual tokens an image becomes; they must agree for any distance.
GEOMETRY = ("patch_size", "spatial_merge_size", "temporal_patch_size", "image_size")


def read_config(path: Any) -> dict[str, Any] | None:
    """A local model's config.json, or None (a hub id, or a directory without one)."""
    file = os.path.join(path, "config.json") if isinstance(path, str) else ""
    if not os.path.isfile(file):
        return None
    with open(file, encoding="utf-8") as handle:
        return json.load(handle)


def vision(document: dict[str, Any]) -> dict[str, Any] | None:
    return document.get("vision_config") or None


def _deepstack_count(vision: dict[str, Any]) -> int:
    return len(vision.get("deepstack_visual_indexes") or ())


def unconsumed_deepstack(document: Mapping[str, Any]) -> list[int]:
    """Indices of the deepstack mergers whose output the model's language stack never reads.

    Qwen3-VL's text model adds deepstack feature ``i`` to the hidden states after decoder layer ``i``, for
    ``i`` below the number of layers only (transformers' ``Qwen3VLTextModel.forward``: ``layer_idx in
    range(len(deepstack_visual_embeds))``), so with fewer text layers than deepstack mergers the last
    mergers run and are dropped. Real checkpoints never have that shape; toy and pruned ones can.
    """
    layers = (document.get("text_config") or {}).get("num_hidden_layers")
    count = _deepstack_count(vision(document) or {})
    return list(range(layers, count)) if isinstance(layers, int) else []


def deepstack_plan(
    config: VisualKDConfig, documents: Mapping[str, Mapping[str, Any]]
) -> tuple[tuple[int, ...] | None, list[int], Refusal | None]:
    """``(deepstack layers to capture, merger indices left out, refusal)`` for the models' configs by role.

    A merger whose output the language model of either side never reads (:func:`unconsumed_deepstack`) is
    left out of "every deepstack merger" (``deepstack_layers: null``), and the run says so in its
    ``vkd.attach`` event, rather than refused: its feature moves nothing the model computes, so a term on it
    would train weights that nothing reads, and under DDP (``find_unused_parameters``, set for PEFT models)
    it kills the backward: DDP marks those weights unused when the forward ends, and the term's gradient
    then marks them ready a second time. Named in ``deepstack_layers``, such a merger is refused, like an
    index that does not exist: the user asked for that one.
    """
    if "deepstack" not in target_plan(config, documents)[0]:
        return config.deepstack_layers, [], None
    dropped = sorted({i for document in documents.values() for i in unconsumed_deepstack(document)})
    if not dropped:
        return config.deepstack_layers, [], None
    if config.deepstack_layers is not None:
        named = [layer for layer in config.deepstack_layers if layer in dropped]
        if not named:
            return config.deepstack_layers, [], None
        layers = {role: (d.get("text_config") or {}).get("num_hidden_layers") for role, d in documents.items()}
        reason = (
            f"deepstack_layers {named} name deepstack mergers whose output the language model never reads"
            f" (text layers: {', '.join(f'{role} {n}' for role, n in layers.items())}; deepstack feature i is"
            " added after text layer i)"
        )
        keep = [layer for layer in config.deepstack_layers if layer not in dropped] or "null"
        return config.deepstack_layers, [], Refusal(reason, f"set custom.visual_kd.deepstack_layers to {keep}")
    count = min(_deepstack_count(vision(d) or {}) for d in documents.values())
    return tuple(i for i in range(count) if i not in dropped), dropped, None


def left_out_note(dropped: list[int]) -> str:
    """The one sentence the run's ``vkd.attach`` event and the doctor print for :func:`deepstack_plan`'s left-outs."""
    names = ", ".join(f"deepstack_{i}" for i in dropped)
    return (
        f"{names} left out of the deepstack targets: the language model has fewer layers than there are deepstack"
        " mergers and never reads their output"
    )


def available(document: Mapping[str, Any]) -> tuple[str, ...]:
    """The target kinds a model's ``config.json`` says it has: every kind the shim knows on a vision tower, but
    deepstack only where ``vision_config.deepstack_visual_indexes`` names layers."""
    tower = vision(document)
    if tower is None:
        return ()
    return ("merger", "vit", *(("deepstack",) if _deepstack_count(tower) else ()))


def target_plan(
    config: VisualKDConfig, documents: Mapping[str, Mapping[str, Any]]
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(kinds applied, optional kinds left out)`` for the models' configs by role: an optional kind applies
    only where every model has it; a required one stays (and is refused where a model lacks it)."""
    have = set(config.kinds)
    for document in documents.values():
        have &= set(available(document))
    left_out = tuple(k for k in config.kinds if k in config.optional_targets and k not in have)
    return tuple(k for k in config.kinds if k not in left_out), left_out


def optional_note(left_out: tuple[str, ...], documents: Mapping[str, Mapping[str, Any]]) -> str:
    """The sentence the run's ``vkd.attach`` event and the doctor print for :func:`target_plan`'s left-outs."""
    lacking = [
        f"{role} {families.architecture(d) or d.get('model_type')}"
        for role, d in documents.items()
        if not set(left_out) <= set(available(d))
    ]
    verb = "have" if len(lacking) > 1 else "has"
    return (
        f"optional target(s) {', '.join(left_out)} left out: {' and '.join(lacking) or 'a model'} {verb} none"
        " (custom.visual_kd.optional_targets)"
    )


def one_model(
    role: str, path: str, document: dict[str, Any], config: VisualKDConfig, aligner: list[str] | None
) -> list[Refusal]:
    tower = vision(document)
    name = families.architecture(document)
    if tower is None:
        return [
            Refusal(
                f"the {role} {path} has no vision tower (config.json has no vision_config; architecture {name!r})",
                f"vision KD needs a vision-language student and teacher ({families.supported_text()}), or unset"
                " VKD_ENABLE",
            )
        ]
    # A config.json without `architectures` (hand-written, very old) names nothing to judge; the run then
    # resolves the targets on the loaded modules and refuses there if they are absent.
    unfit = families.unfit_reason(name, aligner) if name else None
    if unfit:
        return [
            Refusal(
                f"the {role} {path} is a {name}: {unfit}",
                f"distil a family whose aligner fits ({families.supported_text()}; docs/REFERENCE.md, 'Model"
                " families'), or unset VKD_ENABLE",
            )
        ]
    if "deepstack" not in config.kinds:
        return []
    count = _deepstack_count(tower)
    if count == 0 and "deepstack" not in config.required:
        return []  # left out, and said so (plan_notes)
    if count == 0:
        return [
            Refusal(
                f"targets include deepstack but the {role} {path} ({name}) has no deepstack mergers"
                " (vision_config.deepstack_visual_indexes is empty or absent)",
                "set custom.visual_kd.targets: [merger], or list deepstack in custom.visual_kd.optional_targets",
            )
        ]
    wrong = [layer for layer in config.deepstack_layers or () if layer >= count]
    if wrong:
        return [
            Refusal(
                f"deepstack_layers {wrong} do not exist in the {role} {path}: it has {count} deepstack mergers",
                f"set custom.visual_kd.deepstack_layers to indices in 0..{count - 1} (or null for all)",
            )
        ]
    return []


def _text(document: Mapping[str, Any], field: str) -> Any:
    return (document.get("text_config") or {}).get(field, document.get(field))


def pair(student: dict[str, Any], teacher: dict[str, Any], config: VisualKDConfig) -> list[Refusal]:
    s_vision, t_vision = vision(student), vision(teacher)
    names = [families.family(families.architecture(d)) for d in (student, teacher)]
    if None not in names and names[0].group != names[1].group:
        return [
            Refusal(
                f"the student is a {names[0].label} and the teacher a {names[1].label}: their vision towers turn an"
                " image into different visual tokens, so no feature row has a partner",
                "distil within one family (docs/REFERENCE.md, 'Model families'), or unset VKD_ENABLE",
            )
        ]
    out = []
    vocab = (_text(student, "vocab_size"), _text(teacher, "vocab_size"))
    if None not in vocab and vocab[0] != vocab[1]:
        out.append(
            Refusal(
                f"student and teacher vocabularies differ (vocab_size {vocab[0]} vs {vocab[1]}): GKD compares their"
                " next-token distributions id by id, so the run would crash at the first loss",
                "distil between models that share a tokenizer (Qwen3-VL with Qwen3-VL-MoE, Qwen3.5 with"
                " Qwen3.5-MoE), or unset VKD_ENABLE",
            )
        )
    differ = [f"{f} {s_vision.get(f)} vs {t_vision.get(f)}" for f in GEOMETRY if s_vision.get(f) != t_vision.get(f)]
    if differ:
        out.append(
            Refusal(
                f"student and teacher turn an image into different visual tokens (vision_config {', '.join(differ)})",
                "distil between models of one family (same patch, merge and temporal patch size), or unset VKD_ENABLE",
            )
        )
    if config.distance not in RELATION_DISTANCES:
        out += _widths(student, teacher, config)
    counts = (_deepstack_count(s_vision), _deepstack_count(t_vision))
    applied = target_plan(config, {"student": student, "teacher": teacher})[0]
    if "deepstack" in applied and counts[0] != counts[1] and config.deepstack_layers is None:
        common = min(counts)
        out.append(
            Refusal(
                f"student and teacher have {counts[0]} and {counts[1]} deepstack mergers: 'every deepstack"
                " merger' pairs nothing up",
                f"set custom.visual_kd.deepstack_layers to the indices to pair (0..{common - 1} exist in both),"
                " or drop deepstack from targets",
            )
        )
    return out


def _widths(student: dict[str, Any], teacher: dict[str, Any], config: VisualKDConfig) -> list[Refusal]:
    """Element-wise distances need equal widths: the aligner's output (``out_hidden_size``, else the language
    model's width, which every other family's projector maps to), and the ViT's for ``vit``."""
    out = []
    pairs = [(d, vision(d)) for d in (student, teacher)]
    out_width = [
        _text(d, "hidden_size") if v.get("out_hidden_size") is None else v["out_hidden_size"] for d, v in pairs
    ]
    checks = [("out_hidden_size", "aligners", [k for k in config.kinds if k != "vit"], out_width)]
    found = [families.family(families.architecture(d)) for d in (student, teacher)]
    fields = [getattr(family, "vit_width", "hidden_size") for family in found]
    vit_width = [v.get(field) for (_, v), field in zip(pairs, fields, strict=True)]
    checks.append(("/".join(dict.fromkeys(fields)), "ViT outputs", [k for k in config.kinds if k == "vit"], vit_width))
    for field, what, kinds, widths in checks:
        if kinds and None not in widths and widths[0] != widths[1]:
            out.append(
                Refusal(
                    f"student and teacher {what} differ in width (vision_config.{field} {widths[0]} vs {widths[1]}):"
                    f" distance {config.distance!r} compares {', '.join(kinds)} features element by element",
                    "set custom.visual_kd.distance: relation (it compares token-to-token similarities and needs no"
                    " equal width), or distil between models of one width",
                )
            )
    return out


def plan_notes(config: VisualKDConfig, documents: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """What a run decides by itself about its targets, as its ``vkd.attach`` event and the doctor say it."""
    _, left_out = target_plan(config, documents)
    _, dropped, _ = deepstack_plan(config, documents)
    return [*([optional_note(left_out, documents)] if left_out else []), *([left_out_note(dropped)] if dropped else [])]


def labels(documents: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """role -> the family name users know (Qwen3-VL, Gemma 3), else the architecture, for events and the doctor."""
    out = {}
    for role, document in documents.items():
        name = families.architecture(document)
        found = families.family(name)
        out[role] = found.label if found else str(name or document.get("model_type"))
    return out
