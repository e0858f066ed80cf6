"""Test-harness-only workaround for an ms-swift 4.6.0 bug under `--teacher_deepspeed`. Never in the product.

Put this directory on the PYTHONPATH of the `swift rlhf` child (vkd_shim's bootstrap chains to it; it chains to
the next sitecustomize on the path in turn) and set DS_CPU_HARNESS=1; DS_CPU_HARNESS_SKIP=teacher leaves the bug
in place (tests/test_deepspeed.py's strict xfail shows it).

The bug (not CPU-specific; on NCCL it hangs; the same code in ms-swift 3.12's
swift/trainers/rlhf_trainer/utils.py): swift/rlhf_trainers/utils.py prepare_deepspeed(...,
deepspeed_config=...) wraps the teacher's dict in a local HfTrainerDeepSpeedConfig, whose __init__ calls
transformers' set_hf_deepspeed_config(self) (transformers/integrations/deepspeed.py): the module-global
weakref now points at that local object, which dies when prepare_deepspeed returns. From then on
is_deepspeed_zero3_enabled() is False, so ms-swift's is_deepspeed_enabled() is False and its Qwen3-VL
forward (swift/model/models/qwen.py) skips the vision tower on a text-only micro-batch instead of running
it on the dummy image. A ZeRO-3 rank with a text-only batch then gathers other parameters than a rank with
an image: "collective mismatch" on gloo. The workaround restores the previous weakref after
prepare_deepspeed returns.

DeepSpeed bugs met on CPU with 0.18.9 (ZeRO-3 weights loaded wrong, ZeRO-2's "Output 0 of Split is a
view", on-policy ZeRO-3's "pop from an empty deque") are fixed in 0.19.8, which the test stack pins; see
docs/DISTRIBUTED.md.
"""

import os
import sys

try:
    from vkd_shim.bootstrap import chain_user_sitecustomize

    chain_user_sitecustomize(__file__)  # the next sitecustomize on PYTHONPATH (tests/rank_exit)
except Exception as exc:  # never break the child's start-up
    print(f"ds_cpu_harness: chaining failed: {exc!r}", file=sys.stderr, flush=True)

# Where ms-swift's GKD path calls prepare_deepspeed for the teacher, imported there by name.
CALLERS = (
    "swift.rlhf_trainers.rollout_mixin",  # ms-swift 4.4+: RolloutTrainerMixin._setup_teacher
    "swift.trainers.rlhf_trainer.gkd_trainer",  # ms-swift 3.x: GKDTrainer.__init__
)


def _keep_hf_deepspeed_config(module):
    import transformers.integrations.deepspeed as hf_ds

    original = module.prepare_deepspeed

    def prepare_deepspeed(*args, **kwargs):
        saved = hf_ds._hf_deepspeed_config_weak_ref
        try:
            return original(*args, **kwargs)
        finally:
            hf_ds._hf_deepspeed_config_weak_ref = saved

    module.prepare_deepspeed = prepare_deepspeed
    print(f"ds_cpu_harness: kept the HF deepspeed config across {module.__name__}.prepare_deepspeed", flush=True)


if os.environ.get("DS_CPU_HARNESS") == "1" and "teacher" not in os.environ.get("DS_CPU_HARNESS_SKIP", ""):
    try:
        from wrapt import register_post_import_hook

        for caller in CALLERS:
            register_post_import_hook(_keep_hf_deepspeed_config, caller)
    except Exception as exc:  # never break the child's start-up
        print(f"ds_cpu_harness: not applied: {exc!r}", flush=True)
