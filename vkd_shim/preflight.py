"""Every refusal that the arguments and the models' ``config.json`` files can decide, before any load.

One function, :func:`check`, answers for both callers: the run (``SwiftRLHF._prepare_model_tokenizer``,
which stops at the first refusal) and ``vkd-shim doctor`` (which lists them all). Keeping the two on one
function is what makes the doctor's verdict the run's verdict. A mistake found here costs seconds;
found after loading a 4B/8B pair it costs minutes to hours.

Stdlib only: the arguments are read by attribute name (ms-swift's ``RLHFArguments`` after parsing), the
models by their ``config.json``, never their weights (ZeRO-3 partitions those).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from vkd_shim import pairing
from vkd_shim.config import VisualKDConfig
from vkd_shim.pairing import Refusal
from vkd_shim.swift_layouts import LAYOUTS, SwiftLayout, installed

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
        return Refusal(
            f"nothing upstream of the captured aligner outputs ({', '.join(names)}) is trainable: the term would be a"
            " constant that moves nothing (a frozen aligner and ViT; or, under LoRA, an aligner without Linear"
            " layers, such as Gemma 3's projector matrix, which gets no adapter even with --freeze_aligner false)",
            "unfreeze what feeds them (--freeze_vit false, --freeze_aligner false, or --modules_to_save for an aligner"
            " LoRA cannot adapt), or unset VKD_ENABLE",
        )
    if names == ["vit"]:
        return FROZEN_VIT
    return Refusal(
        f"nothing upstream of the target(s) {', '.join(names)} is trainable: their terms would be constants",
        "unfreeze what feeds them (--freeze_vit false, --freeze_aligner false), or drop them from"
        " custom.visual_kd.targets",
    )


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


def notes(args: Any, config: VisualKDConfig) -> list[str]:
    """What the run will decide by itself and say at attach (the doctor prints these beside the refusals)."""
    return pairing.plan_notes(config, model_documents(args))


def model_documents(args: Any) -> dict[str, dict[str, Any]]:
    """Both models' config.json by role, where they are local directories."""
    paths = {"student": getattr(args, "model_dir", None) or getattr(args, "model", None)}
    paths["teacher"] = getattr(args, "teacher_model", None)
    documents = {role: pairing.read_config(path) for role, path in paths.items()}
    return {role: document for role, document in documents.items() if document is not None}


def _sharded_checkpoint_without_adapter(checkpoint: Any) -> bool:
    """A directory FSDP's SHARDED_STATE_DICT wrote (DCP shards of the model) with no adapter files beside them."""
    if not isinstance(checkpoint, str):
        return False
    shards = os.path.isdir(os.path.join(checkpoint, "pytorch_model_fsdp_0"))
    return shards and not os.path.isfile(os.path.join(checkpoint, "adapter_config.json"))


def registry_aligner(args: Any) -> list[str] | None:
    """The student's aligner paths in ms-swift's registry (``args.model_meta.model_arch``), where parsed."""
    arch = getattr(getattr(args, "model_meta", None), "model_arch", None)
    if arch is None:
        return None
    aligner = getattr(arch, "aligner", None) or []
    return [aligner] if isinstance(aligner, str) else list(aligner)


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
    documents = {"student": (student_path, pairing.read_config(student_path))}
    if teacher_path is not None:
        documents["teacher"] = (teacher_path, pairing.read_config(teacher_path))
    aligner = registry_aligner(args)
    for role, (path, document) in documents.items():
        if document is not None:
            out += pairing.one_model(role, path, document, config, aligner if role == "student" else None)
    student, teacher = (documents.get(role, (None, None))[1] for role in ("student", "teacher"))
    if student is not None and teacher is not None and pairing.vision(student) and pairing.vision(teacher):
        out += pairing.pair(student, teacher, config)
    refusal = pairing.deepstack_plan(config, {role: d for role, (_, d) in documents.items() if d is not None})[2]
    return [*out, refusal] if refusal else out
