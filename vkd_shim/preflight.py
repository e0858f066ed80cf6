"""Every refusal that the arguments and the models' ``config.json`` files can decide, before any load.

One function, :func:`check`, answers for both callers: the run (``SwiftRLHF._prepare_model_tokenizer``,
which stops at the first refusal) and ``vkd-shim doctor`` (which lists them all). Keeping the two on one
function is what makes the doctor's verdict the run's verdict. A mistake found here costs seconds;
found after loading a 4B/8B pair it costs minutes to hours.

Stdlib only: the arguments are read by attribute name (ms-swift's ``RLHFArguments`` after parsing), the
models by their ``config.json``, never their weights (ZeRO-3 partitions those).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

from vkd_shim.config import VisualKDConfig
from vkd_shim.swift_layouts import LAYOUTS, SwiftLayout, installed

RELATION_DISTANCES = ("relation",)


class Refusal(NamedTuple):
    reason: str
    fix: str


REMOTE_TEACHER = Refusal(
    "a remote teacher (teacher_model_server) returns logits only: no aligner features exist",
    "use a local --teacher_model, or unset VKD_ENABLE",
)
NO_TEACHER = Refusal(
    "no --teacher_model: the teacher is the student's own weights, so the term is zero by construction",
    "pass --teacher_model (the frozen Stage-2 model), or unset VKD_ENABLE",
)
FROZEN_VISION = Refusal(
    "nothing upstream of the captured aligner outputs is trainable (the aligner and the ViT are both frozen,"
    " ms-swift's defaults): the term would be a constant that moves nothing",
    "pass --freeze_aligner false (and/or --freeze_vit false), or unset VKD_ENABLE",
)
FROZEN_VIT = Refusal(
    "targets include vit, the ViT's patch embeddings entering the merger, but the ViT is frozen (ms-swift's"
    " --freeze_vit true default): no trainable parameter is upstream of that feature, so its term would be a"
    " constant (the merger's LoRA does not change the merger's input)",
    "pass --freeze_vit false, or drop vit from custom.visual_kd.targets",
)
FSDP1 = Refusal(
    "FSDP1 (fsdp_version 1): ms-swift's GKD trainer prepares its teacher for FSDP2 only and stops an FSDP1 run"
    " after both models have loaded",
    "use --fsdp fsdp2 (or fsdp_version: 2 in your FSDP config), DeepSpeed, or unset VKD_ENABLE",
)
SHARDED_LORA_RESUME = Refusal(
    "resuming LoRA from an FSDP SHARDED_STATE_DICT checkpoint (pytorch_model_fsdp_0, no adapter_config.json):"
    " ms-swift 4.6 reloads the adapter from the checkpoint's adapter files, which that state-dict type never"
    " writes (plain ms-swift then trains 0 parameters and stops in SwiftModel.load_state_dict)",
    "save LoRA runs with state_dict_type FULL_STATE_DICT in your FSDP config (its checkpoints hold the adapter"
    " and resume), or resume without VKD_ENABLE",
)
NOT_RLHF = Refusal(
    "this launch trains without a teacher (swift sft / swift pt): vision KD distils a student's vision pathway"
    " towards a teacher's, in swift rlhf --rlhf_type gkd",
    "launch swift rlhf --rlhf_type gkd with --teacher_model, or unset VKD_ENABLE for this run",
)


def frozen(names: list[str], every: bool) -> Refusal:
    """The exact check at trainer construction: targets (by name) whose feature no trainable parameter feeds."""
    if every and "vit" not in names:
        return FROZEN_VISION
    if names == ["vit"]:
        return FROZEN_VIT
    return Refusal(
        f"nothing upstream of the target(s) {', '.join(names)} is trainable: their terms would be constants",
        "unfreeze what feeds them (--freeze_vit false, --freeze_aligner false), or drop them from"
        " custom.visual_kd.targets",
    )


#: Fields that decide which visual tokens an image becomes; they must agree for any distance.
GEOMETRY = ("patch_size", "spatial_merge_size", "temporal_patch_size")


def _model_config(path: Any) -> dict[str, Any] | None:
    """A local model's config.json, or None (a hub id, or a directory without one)."""
    file = os.path.join(path, "config.json") if isinstance(path, str) else ""
    if not os.path.isfile(file):
        return None
    with open(file, encoding="utf-8") as handle:
        return json.load(handle)


def _vision(document: dict[str, Any]) -> dict[str, Any] | None:
    return document.get("vision_config") or None


def _deepstack_count(vision: dict[str, Any]) -> int:
    return len(vision.get("deepstack_visual_indexes") or ())


def fsdp_version(args: Any) -> int | None:
    """The FSDP version of the run, or None without FSDP.

    ms-swift's ``--fsdp fsdp2`` (or a JSON file) leaves ``fsdp_config['fsdp_version']``; transformers strips
    the ``fsdp_`` prefix (``version``) once it has parsed them; both default to 2.
    """
    if not getattr(args, "fsdp", None):
        return None
    options = getattr(args, "fsdp_config", None)
    options = options if isinstance(options, Mapping) else {}
    return int(options.get("fsdp_version", options.get("version", 2)))


def unconsumed_deepstack(document: Mapping[str, Any]) -> list[int]:
    """Indices of the deepstack mergers whose output the model's language stack never reads.

    Qwen3-VL's text model adds deepstack feature ``i`` to the hidden states after decoder layer ``i``, for
    ``i`` below the number of layers only (transformers' ``Qwen3VLTextModel.forward``: ``layer_idx in
    range(len(deepstack_visual_embeds))``), so with fewer text layers than deepstack mergers the last
    mergers run and are dropped. Real checkpoints never have that shape; toy and pruned ones can.
    """
    layers = (document.get("text_config") or {}).get("num_hidden_layers")
    count = _deepstack_count(_vision(document) or {})
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
    if "deepstack" not in config.kinds:
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
    count = min(_deepstack_count(_vision(d) or {}) for d in documents.values())
    return tuple(i for i in range(count) if i not in dropped), dropped, None


def left_out_note(dropped: list[int]) -> str:
    """The one sentence the run's ``vkd.attach`` event and the doctor print for :func:`deepstack_plan`'s left-outs."""
    names = ", ".join(f"deepstack_{i}" for i in dropped)
    return (
        f"{names} left out of the deepstack targets: the language model has fewer layers than there are deepstack"
        " mergers and never reads their output"
    )


def notes(args: Any, config: VisualKDConfig) -> list[str]:
    """What the run will decide by itself and say at attach (the doctor prints these beside the refusals)."""
    _, dropped, _ = deepstack_plan(config, model_documents(args))
    return [left_out_note(dropped)] if dropped else []


def model_documents(args: Any) -> dict[str, dict[str, Any]]:
    """Both models' config.json by role, where they are local directories."""
    paths = {"student": getattr(args, "model_dir", None) or getattr(args, "model", None)}
    paths["teacher"] = getattr(args, "teacher_model", None)
    documents = {role: _model_config(path) for role, path in paths.items()}
    return {role: document for role, document in documents.items() if document is not None}


def _sharded_checkpoint_without_adapter(checkpoint: Any) -> bool:
    """A directory FSDP's SHARDED_STATE_DICT wrote (DCP shards of the model) with no adapter files beside them."""
    if not isinstance(checkpoint, str):
        return False
    shards = os.path.isdir(os.path.join(checkpoint, "pytorch_model_fsdp_0"))
    return shards and not os.path.isfile(os.path.join(checkpoint, "adapter_config.json"))


def chosen_by_name(args: Any) -> dict[str, Any]:
    """The arguments that choose trainable parameters by name or regex, where set.

    ms-swift applies ``trainable_parameters(_regex)`` under full tuning only (it adds the aligner there for
    ``--freeze_aligner false``, so only the user's own additions count); LoRA reads ``target_regex``.
    """
    tuner = getattr(args, "tuner_type", None) or getattr(args, "train_type", None)
    names = ("trainable_parameters_regex",) if tuner == "full" else ("target_regex",)
    chosen = {name: getattr(args, name, None) for name in names if getattr(args, name, None)}
    aligner = set(getattr(getattr(getattr(args, "model_meta", None), "model_arch", None), "aligner", None) or ())
    if tuner == "full":
        extra = [p for p in getattr(args, "trainable_parameters", None) or () if p not in aligner]
        if extra:
            chosen["trainable_parameters"] = extra
    return chosen


def _training(args: Any, config: VisualKDConfig) -> list[Refusal]:
    if not hasattr(args, "rlhf_type"):
        return [NOT_RLHF]
    out = []
    if args.rlhf_type != "gkd":
        out.append(
            Refusal(f"rlhf_type is {args.rlhf_type!r}; vision KD works with --rlhf_type gkd", "unset VKD_ENABLE")
        )
    if getattr(args, "teacher_model_server", None):
        out.append(REMOTE_TEACHER)
    elif getattr(args, "teacher_model", None) is None and not getattr(args, "_teacher_use_disable_adapter", False):
        out.append(NO_TEACHER)
    if fsdp_version(args) == 1:
        out.append(FSDP1)
    tuner = getattr(args, "tuner_type", None) or getattr(args, "train_type", None)
    if tuner != "full" and _sharded_checkpoint_without_adapter(getattr(args, "resume_from_checkpoint", None)):
        out.append(SHARDED_LORA_RESUME)
    if config.monitor or chosen_by_name(args):
        # Monitoring moves nothing; names can unfreeze anything: checked exactly at trainer init, and by the
        # doctor on the model's module tree built on the meta device (no weights).
        return out
    freeze_vit = getattr(args, "freeze_vit", False)
    if getattr(args, "freeze_aligner", False) and freeze_vit:
        out.append(FROZEN_VISION)
    elif freeze_vit and "vit" in config.kinds:
        out.append(FROZEN_VIT)
    return out


def _one_model(role: str, path: str, document: dict[str, Any], config: VisualKDConfig) -> list[Refusal]:
    vision = _vision(document)
    if vision is None:
        return [
            Refusal(
                f"the {role} {path} has no vision tower (config.json has no vision_config; model_type "
                f"{document.get('model_type')!r})",
                "vision KD needs a Qwen3-VL (or Qwen2.5-VL) student and teacher, or unset VKD_ENABLE",
            )
        ]
    if "deepstack" not in config.kinds:
        return []
    count = _deepstack_count(vision)
    if count == 0:
        return [
            Refusal(
                f"targets include deepstack but the {role} {path} ({document.get('model_type')}) has no deepstack"
                " mergers (vision_config.deepstack_visual_indexes is empty or absent)",
                "set custom.visual_kd.targets: [merger]",
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


def _pair(student: dict[str, Any], teacher: dict[str, Any], config: VisualKDConfig) -> list[Refusal]:
    s_vision, t_vision = _vision(student), _vision(teacher)
    out = []
    differ = [f"{f} {s_vision.get(f)} vs {t_vision.get(f)}" for f in GEOMETRY if s_vision.get(f) != t_vision.get(f)]
    if differ:
        out.append(
            Refusal(
                f"student and teacher turn an image into different visual tokens (vision_config {', '.join(differ)})",
                "distil between models of one family (same patch, merge and temporal patch size), or unset VKD_ENABLE",
            )
        )
    if config.distance not in RELATION_DISTANCES:
        out += _widths(s_vision, t_vision, config)
    counts = (_deepstack_count(s_vision), _deepstack_count(t_vision))
    if "deepstack" in config.kinds and counts[0] != counts[1] and config.deepstack_layers is None:
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


def _widths(s_vision: dict[str, Any], t_vision: dict[str, Any], config: VisualKDConfig) -> list[Refusal]:
    """Element-wise distances need equal widths: the aligner's output, and the ViT's for ``vit``."""
    out = []
    checks = [("out_hidden_size", "aligners", [k for k in config.kinds if k != "vit"])]
    checks.append(("hidden_size", "ViTs", [k for k in config.kinds if k == "vit"]))
    for field, what, kinds in checks:
        widths = (s_vision.get(field), t_vision.get(field))
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


def fsdp2_unproven(layout: SwiftLayout) -> Refusal:
    proven = ", ".join(f"{other.series}.x" for other in LAYOUTS if other.fsdp2)
    return Refusal(
        f"FSDP2 under vision KD is proven on ms-swift {proven} only (really sharded ranks against DDP), not on the"
        f" installed {layout.series}.x",
        f"use DeepSpeed ZeRO-2/3 or DDP on ms-swift {layout.series}, upgrade ms-swift to {proven}, or unset VKD_ENABLE",
    )


def check(args: Any, config: VisualKDConfig, layout: SwiftLayout | None = None) -> list[Refusal]:
    """Every refusal for this run on ms-swift's ``layout`` (default: the installed one's); empty when vision KD
    can work. Only call with ``config.active``."""
    out = _training(args, config)
    layout = installed() if layout is None else layout
    if fsdp_version(args) == 2 and not layout.fsdp2:
        out.append(fsdp2_unproven(layout))
    if any(r in (REMOTE_TEACHER, NOT_RLHF) for r in out):
        return out
    student_path = getattr(args, "model_dir", None) or getattr(args, "model", None)
    teacher_path = getattr(args, "teacher_model", None)
    documents = {"student": (student_path, _model_config(student_path))}
    if teacher_path is not None:
        documents["teacher"] = (teacher_path, _model_config(teacher_path))
    for role, (path, document) in documents.items():
        if document is not None:
            out += _one_model(role, path, document, config)
    student, teacher = (documents.get(role, (None, None))[1] for role in ("student", "teacher"))
    if student is not None and teacher is not None and _vision(student) and _vision(teacher):
        out += _pair(student, teacher, config)
    refusal = deepstack_plan(config, {role: d for role, (_, d) in documents.items() if d is not None})[2]
    return [*out, refusal] if refusal else out
