"""A test's view from inside each `swift rlhf` rank of an FSDP run: what accelerate built, per rank, as JSON lines.

Chained after tests/fsdp_cpu_harness (later on PYTHONPATH; it chains to the next one in turn); active when
FSDP_TAP_DIR is set. It watches from
outside the shim and changes nothing, so the test can assert that the student really is `fully_shard`ed
(not DDP that logs "Using FSDP2") and what reached the aligner. One file per torch.distributed rank,
`rank<r>.jsonl`, with records:

- `prepare_fsdp`: every call of ms-swift's `prepare_fsdp` (the teacher's), with what it returned;
- `layout` (once, at the first training `compute_loss`): accelerate's distributed type, `is_fsdp2`, the
  trainer's `is_fsdp_enabled`, and for the student and the teacher: the class of the model handed to the
  loss, every `FSDPModule` (its class, `reshard_after_forward`), every activation-checkpoint wrapper (what
  it wraps), and how many parameters are DTensors with the placements they have and whether this rank
  holds part of each (a shard, not a copy);
- `batch` (every training `compute_loss`): the step and whether this rank's micro-batch had pixels;
- `grads` (after every training step's backward): the squared L2 norm of the gradients of the aligner
  (merger and deepstack mergers), the language model, and the rest, summed over ranks' local shards
  (an all-reduce that every rank issues at the same point).
"""

import json
import os
import sys

try:
    from vkd_shim.bootstrap import chain_user_sitecustomize

    chain_user_sitecustomize(__file__)  # the next sitecustomize on PYTHONPATH (tests/rank_exit)
except Exception as exc:  # never break the child's start-up
    print(f"fsdp tap: chaining failed: {exc!r}", file=sys.stderr, flush=True)

TAP_DIR_ENV = "FSDP_TAP_DIR"
ALIGNER = ("visual.merger.", "visual.deepstack_merger_list.")


def _emit(record):
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else -1
    with open(os.path.join(os.environ[TAP_DIR_ENV], f"rank{rank}.jsonl"), "a", encoding="utf-8") as sink:
        sink.write(json.dumps({"pid": os.getpid(), "rank": rank, **record}) + "\n")


def _structure(model):
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    units, wrappers = [], []
    for name, module in model.named_modules():
        if isinstance(module, FSDPModule):
            group = module._get_fsdp_state()._fsdp_param_group
            reshard = None if group is None else group.post_forward_mesh_info is not None
            units.append({"name": name, "class": type(module).__name__, "reshard_after_forward": reshard})
        inner = getattr(module, "_checkpoint_wrapped_module", None)
        if inner is not None:
            wrappers.append(type(inner).__name__)
    params = list(model.parameters())
    dtensors = [p for p in params if isinstance(p, DTensor)]
    return {
        "class": type(model).__name__,
        "is_fsdp_module": isinstance(model, FSDPModule),
        "units": units,
        "checkpointed": wrappers,
        "params": len(params),
        "dtensor_params": len(dtensors),
        "placements": sorted({str(p.placements) for p in dtensors}),
        "sharded": sum(1 for p in dtensors if p.to_local().numel() < p.numel()),
        "trainable_dtensors": sum(1 for p in dtensors if p.requires_grad),
        "trainable": sum(1 for p in params if p.requires_grad),
    }


def _layout(trainer, model):
    state = trainer.accelerator.state
    return {
        "event": "layout",
        "distributed_type": str(state.distributed_type),
        "is_fsdp2": bool(getattr(trainer.accelerator, "is_fsdp2", False)),
        "trainer_is_fsdp_enabled": bool(getattr(trainer, "is_fsdp_enabled", False)),
        "fsdp_plugin": None
        if getattr(state, "fsdp_plugin", None) is None
        else {
            "fsdp_version": state.fsdp_plugin.fsdp_version,
            "reshard_after_forward": state.fsdp_plugin.reshard_after_forward,
            "activation_checkpointing": state.fsdp_plugin.activation_checkpointing,
            "state_dict_type": str(state.fsdp_plugin.state_dict_type),
        },
        "student": _structure(model),
        "teacher": None if trainer.teacher_model is None else _structure(trainer.teacher_model),
        "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
    }


def _group(name):
    if any(part in name for part in ALIGNER):
        return "aligner"
    return "language" if "language_model" in name else "other"


def _grads(trainer, model):
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    squares = {"aligner": 0.0, "language": 0.0, "other": 0.0}
    for name, param in model.named_parameters():
        if param.grad is not None:
            grad = param.grad.to_local() if isinstance(param.grad, DTensor) else param.grad
            squares[_group(name)] += float(grad.detach().double().pow(2).sum())
    totals = torch.tensor([squares[k] for k in squares], dtype=torch.float64)
    dist.all_reduce(totals)
    _emit({"event": "grads", "step": trainer.state.global_step + 1, **dict(zip(squares, totals.tolist(), strict=True))})


if os.environ.get(TAP_DIR_ENV):
    from wrapt import when_imported, wrap_function_wrapper

    _seen = set()

    def _prepare_fsdp(wrapped, instance, args, kwargs):
        given = type(args[0]).__name__
        result = wrapped(*args, **kwargs)
        _emit({"event": "prepare_fsdp", "given": given, "returned": _structure(result)})
        return result

    def _compute_loss(wrapped, instance, args, kwargs):
        if instance.model.training:
            model = args[0]
            if "layout" not in _seen:
                _seen.add("layout")
                _emit(_layout(instance, model))
            inputs = args[1] if len(args) > 1 else kwargs["inputs"]
            model_inputs = inputs.get("model_inputs", inputs)
            pixels = any(model_inputs.get(k) is not None for k in ("pixel_values", "pixel_values_videos"))
            _emit({"event": "batch", "step": instance.state.global_step + 1, "visual": pixels})
        return wrapped(*args, **kwargs)

    def _training_step(wrapped, instance, args, kwargs):
        result = wrapped(*args, **kwargs)
        _grads(instance, args[0])
        return result

    @when_imported("swift.rlhf_trainers.rollout_mixin")
    def _on_rollout(module):
        wrap_function_wrapper(module, "prepare_fsdp", _prepare_fsdp)

    @when_imported("swift.rlhf_trainers.gkd_trainer")
    def _on_trainer(module):
        wrap_function_wrapper(module, "GKDTrainer.compute_loss", _compute_loss)
        wrap_function_wrapper(module, "GKDTrainer.training_step", _training_step)
