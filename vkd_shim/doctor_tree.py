"""What ``vkd-shim doctor`` judges on the student's module tree, built from its ``config.json`` on the meta device
(no weights, no memory): the module each target resolves to, and whether names or regexes that choose the trainable
parameters leave every target something to move. The run decides both after loading; the doctor before.

Called by :mod:`vkd_shim.doctor` only, inside the command: it imports torch, transformers, peft and ms-swift.
"""

from __future__ import annotations

from typing import Any


def _meta_student(args: Any) -> Any:
    """The student's module tree on the meta device, carrying ms-swift's registry entry as a loaded model does."""
    import torch
    import transformers

    path = getattr(args, "model_dir", None) or getattr(args, "model", None)
    with torch.device("meta"):
        model = transformers.AutoModelForImageTextToText.from_config(transformers.AutoConfig.from_pretrained(path))
    model.model_meta = getattr(args, "model_meta", None)
    return model


def targets(report: Any, args: Any, config: Any) -> None:
    """Each model's family, the aligner ms-swift's registry names, the targets that apply to the pair, and the
    student module each one resolves to."""
    from vkd_shim import families, pairing, preflight, swift_layouts
    from vkd_shim import targets as resolving

    documents = preflight.model_documents(args)
    for role, label in pairing.labels(documents).items():
        report.line(f"family: {role} {label} ({families.architecture(documents[role])})")
    report.line(f"aligner (ms-swift registry): {preflight.registry_aligner(args) or 'none recorded'}")
    applied, left_out = pairing.target_plan(config, documents)
    report.line(f"TARGETS: {', '.join(applied) or 'none'}" + (f"; left out: {', '.join(left_out)}" if left_out else ""))
    try:
        model = _meta_student(args)
        layers, _, _ = pairing.deepstack_plan(config, documents)
        paths = resolving.target_paths(model, applied, layers, swift_layouts.aligner_paths(model))
    except Exception as exc:
        report.line(
            f"modules: cannot be resolved before loading ({type(exc).__name__}: {exc}); the run resolves them on the"
            " loaded models and stops there if a target is absent"
        )
        return
    report.line("modules: " + ", ".join(f"{target.name} -> {path}" for target, path in paths.items()))


def trainable_by_name(report: Any, args: Any, config: Any, chosen: dict[str, Any]) -> None:
    """Trainability chosen by name or regex: the run's exact check at trainer construction, run before any load.

    The student's module tree is built from its ``config.json`` on the meta device (no weights, no memory);
    ms-swift's own functions (full tuning) or peft's target matching (LoRA ``target_regex``) set
    ``requires_grad`` as the run will; then :func:`vkd_shim.targets.frozen_targets` decides, as at trainer
    construction. Where the tree cannot be built (a hub id, an architecture transformers does not know), the
    doctor says it cannot tell, and the run decides after both models load.
    """
    from vkd_shim import pairing, preflight, swift_layouts
    from vkd_shim import targets as resolving

    shown = ", ".join(f"{name}={value!r}" for name, value in chosen.items())
    try:
        model = _meta_student(args)
        _set_trainable_as_ms_swift(model, args)
        documents = preflight.model_documents(args)
        layers, _, _ = pairing.deepstack_plan(config, documents)
        aligner = swift_layouts.aligner_paths(model)
        found = resolving.resolve_targets(model, pairing.target_plan(config, documents)[0], layers, aligner)
        frozen = resolving.frozen_targets(model, found, aligner, swift_layouts.vision_tower_paths(model))
    except Exception as exc:
        report.line(
            f"trainability chosen by name ({shown}): cannot be told before loading ({type(exc).__name__}: {exc});"
            " the run checks it after both models load and stops there if no target can move"
        )
        return
    if frozen:
        refusal = preflight.frozen([t.name for t in frozen], every=len(frozen) == len(found))
        report.problem(f"vision KD refused: {refusal.reason} (with {shown}). Fix: {refusal.fix}.")
    else:
        report.line(f"trainability chosen by name ({shown}): every target has a trainable parameter upstream")


def _set_trainable_as_ms_swift(model: Any, args: Any) -> None:
    """``requires_grad`` as ms-swift's tuner sets it: its own freeze/activate functions under full tuning; under
    LoRA the modules peft would adapt (``target_regex``, matched by peft) and ``modules_to_save``."""
    import torch
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    from swift.utils.transformers_utils import activate_parameters, freeze_parameters

    tuner = getattr(args, "tuner_type", None) or getattr(args, "train_type", None)
    if tuner == "full":
        model.requires_grad_(True)
        freeze_parameters(model, args.freeze_parameters_ratio, args.freeze_parameters, args.freeze_parameters_regex)
        activate_parameters(model, args.trainable_parameters, args.trainable_parameters_regex)
        return
    model.requires_grad_(False)
    lora = LoraConfig(target_modules=args.target_regex)
    adaptable = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    saved = tuple(getattr(args, "modules_to_save", None) or ())
    for name, module in model.named_modules():
        if (isinstance(module, adaptable) and check_target_module_exists(lora, name)) or (
            saved and name.endswith(saved)
        ):
            module.requires_grad_(True)
