"""Test harness only: make accelerate shard with FSDP2 on CPU gloo ranks, as it does on GPUs. Never in the product.

Put this directory on the PYTHONPATH of the `swift rlhf` child (vkd_shim's bootstrap chains to it; it chains
to the next sitecustomize on the path in turn) and set FSDP_CPU_HARNESS=1.

Why: `swift rlhf ... --use_cpu true --ddp_backend gloo --fsdp fsdp2` exits 0 and logs "Using FSDP2", yet trains
plain DDP. accelerate's AcceleratorState (accelerate/state.py) switches to DistributedType.FSDP, and keeps the
FullyShardedDataParallelPlugin, only inside the branch for GPU-like multi-device types (MULTI_GPU, MULTI_NPU,
MULTI_XPU, ...); MULTI_CPU never enters it. So `accelerator.is_fsdp2` is False, transformers'
`is_fsdp_enabled` is False, the student is wrapped in DistributedDataParallel, ms-swift's rollout mixin never
calls `prepare_fsdp` for the teacher, and the activation checkpointing ms-swift switched to (it turns
`--gradient_checkpointing` off in favour of fsdp_config.activation_checkpointing) is applied by nobody.

The override does, for MULTI_CPU, what that branch does for a GPU: when the state was built with an FSDP plugin
(transformers passes one whenever ms-swift set `--fsdp`), set `distributed_type = FSDP` and keep the plugin.
Everything after that is accelerate's and torch's own GPU code path: `fsdp2_prepare_model` (`fully_shard` per
`_no_split_modules` layer, DTensor parameters, checkpoint wrappers, rank 0's weights broadcast), FSDP's
sharded checkpoints, and ms-swift's `prepare_fsdp` for the teacher. torch's `fully_shard` builds a CPU device
mesh on gloo when no CUDA device is usable. tests/test_fsdp.py asserts all of it from inside the ranks (./tap).

A second, separate workaround, for an ms-swift 4.6.0 bug that is not CPU-specific (FSDP_CPU_HARNESS_SKIP=mixed
leaves it in place; tests/test_fsdp.py's strict xfail shows it): swift/model/models/qwen.py runs the Qwen3-VL
vision tower on a dummy image for a text-only micro-batch, and images and videos in one call, only when
`is_deepspeed_enabled()`. Under FSDP2 the vision blocks are FSDP units, so a text-only rank that skips the tower
issues other all-gathers than a rank with an image: a collective mismatch (gloo aborts, NCCL hangs). The
workaround makes that module's `is_deepspeed_enabled` also true under FSDP (ms-swift sets ACCELERATE_USE_FSDP
for `--fsdp`), so every rank takes the DeepSpeed path.
"""

import os
import sys

try:
    from vkd_shim.bootstrap import chain_user_sitecustomize

    chain_user_sitecustomize(__file__)  # the test's tap, later on PYTHONPATH
except Exception as exc:  # never break the child's start-up
    print(f"fsdp_cpu_harness: chaining failed: {exc!r}", file=sys.stderr, flush=True)


def _fsdp_on_multi_cpu(wrapped, instance, args, kwargs):
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    wrapped(*args, **kwargs)
    plugin = kwargs.get("fsdp_plugin")
    if plugin is None or instance.distributed_type is not DistributedType.MULTI_CPU:
        return
    instance.distributed_type = DistributedType.FSDP
    instance.fsdp_plugin = plugin
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    print(f"fsdp_cpu_harness: MULTI_CPU -> FSDP (fsdp_version {plugin.fsdp_version})", file=sys.stderr, flush=True)


def _on_accelerate_state(module):
    from wrapt import wrap_function_wrapper

    wrap_function_wrapper(module, "AcceleratorState.__init__", _fsdp_on_multi_cpu)


def _one_tower_call_under_fsdp(module):
    original = module.is_deepspeed_enabled

    def is_deepspeed_enabled():
        return original() or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"

    module.is_deepspeed_enabled = is_deepspeed_enabled
    print(f"fsdp_cpu_harness: {module.__name__} takes its DeepSpeed forward under FSDP", file=sys.stderr, flush=True)


if os.environ.get("FSDP_CPU_HARNESS") == "1":
    try:
        from wrapt import register_post_import_hook

        register_post_import_hook(_on_accelerate_state, "accelerate.state")
        if "mixed" not in os.environ.get("FSDP_CPU_HARNESS_SKIP", ""):
            register_post_import_hook(_one_tower_call_under_fsdp, "swift.model.models.qwen")
    except Exception as exc:  # never break the child's start-up
        print(f"fsdp_cpu_harness: not applied: {exc!r}", file=sys.stderr, flush=True)
