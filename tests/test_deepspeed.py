"""DeepSpeed ZeRO-2 / ZeRO-3 on two CPU ranks: plain ms-swift GKD is faithful to DDP, and vision KD on it.

Why: users run Stage-3 GKD under DeepSpeed and CI has no GPU, and a DeepSpeed run on CPU that "exits 0"
proved nothing: with DeepSpeed 0.18.9 plain ms-swift logged loss 0.0 / grad_norm 1.0 (a NaN loss hidden
by `logging_nan_inf_filter`; the causes are in docs/DISTRIBUTED.md). Every run is a real
`swift rlhf --rlhf_type gkd` launch with NPROC_PER_NODE=2, `--use_cpu true --ddp_backend gloo`, 3 steps,
the kit's image / video / text rows (with seed 42 one rank's micro-batch is text-only while the other's has
images, so under DeepSpeed ms-swift runs the vision tower on its dummy image there); the launch, the
tolerances and the DDP baselines are tests/two_ranks.py's. Off-policy unless a test says otherwise.

DeepSpeed 0.19.8 (pinned in requirements/swift46.txt and swift312.txt); ms-swift's own `--teacher_deepspeed`
bug is worked around in the children only (tests/ds_cpu_harness), and a strict xfail shows it without the
workaround. Configs: tests/ds_configs (ms-swift's zero2/zero3 with fp16/bf16 disabled, no train_batch_size).

Cost on 2 CPU cores: 10 two-rank runs, 20-60 s each, plus one build of DeepSpeed's CPU comm op (cached), and
the two DDP baselines this suite shares with tests/test_fsdp.py (session fixtures in conftest.py).
The ms-swift 3.12 stack runs the full fine-tuning test only (`make test312`).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from two_ranks import (
    ABS,
    ALIGNER,
    COLLECTIVE_MISMATCH,
    DISTANCES,
    KD_KEYS,
    REL,
    SAVE_AT_2,
    STEPS,
    Run,
    UpstreamFailure,
    assert_same,
    assert_vision_kd_ran,
    numbers,
    probe_checkpoint,
    run_two_ranks,
)

from vkd_shim import patches

pytestmark = [pytest.mark.deepspeed, pytest.mark.e2e]

TESTS = Path(__file__).resolve().parent
HARNESS_DIR = TESTS / "ds_cpu_harness"
ZERO2, ZERO3 = TESTS / "ds_configs" / "ds_zero2_cpu.json", TESTS / "ds_configs" / "ds_zero3_cpu.json"


def run_gkd(assets: dict, cache: Path, out: Path, *extra: str, harness_skip: str = "", **kwargs) -> Run:
    """A 2-rank run (tests/two_ranks.py) on DeepSpeed's CPU accelerator, with tests/ds_cpu_harness's ms-swift
    workaround on unless `harness_skip` names it."""
    env = {"DS_ACCELERATOR": "cpu", "DS_CPU_HARNESS": "1", "DS_CPU_HARNESS_SKIP": harness_skip}
    return run_two_ranks(assets, cache, out, *extra, harness=[HARNESS_DIR], env=env, **kwargs)


def deepspeed(student: Path, teacher: Path | None = None) -> tuple[str, ...]:
    flags = ("--deepspeed", str(student), "--fp16", "false", "--bf16", "false")
    return (*flags, "--teacher_deepspeed", str(teacher)) if teacher else flags


@pytest.fixture(scope="module")
def zero2_plain(gkd_assets, swift_cache, tmp_path_factory) -> Run:
    out = tmp_path_factory.mktemp("zero2") / "out"
    return run_gkd(gkd_assets, swift_cache, out, *deepspeed(ZERO2)).trained()


@pytest.fixture(scope="module")
def zero3_vkd(gkd_assets, swift_cache, tmp_path_factory) -> Run:
    """ZeRO-3 student (LoRA, aligner unfrozen) and ZeRO-3 teacher, vision KD on, a checkpoint at step 2."""
    out = tmp_path_factory.mktemp("zero3_vkd") / "out"
    return run_gkd(gkd_assets, swift_cache, out, *deepspeed(ZERO3, ZERO3), *SAVE_AT_2, vkd=True).trained()


# --- the harness is faithful: plain ms-swift under ZeRO equals plain DDP ------------------------------


def test_plain_gkd_under_zero2_matches_ddp(zero2_plain, ddp_plain):
    """Same data, seed and optimizer steps as DDP: per-step loss and grad_norm, and the eval loss, agree."""
    assert_same(zero2_plain.train, ddp_plain.train, ("loss", "grad_norm"))
    assert zero2_plain.evals[0]["eval_loss"] == pytest.approx(ddp_plain.evals[0]["eval_loss"], rel=REL, abs=ABS)


def test_plain_gkd_under_zero3_with_a_zero3_teacher_matches_ddp(ddp_plain, gkd_assets, swift_cache, tmp_path):
    run = run_gkd(gkd_assets, swift_cache, tmp_path / "out", *deepspeed(ZERO3, ZERO3)).trained()
    assert_same(run.train, ddp_plain.train, ("loss", "grad_norm"))
    assert run.evals[0]["eval_loss"] == pytest.approx(ddp_plain.evals[0]["eval_loss"], rel=REL, abs=ABS)


def test_switched_off_shim_under_zero2_is_the_plain_run_exactly(zero2_plain, gkd_assets, swift_cache, tmp_path):
    """The bootstrap on PYTHONPATH with VKD_ENABLE unset: every logged number equals the plain run's,
    bit for bit, and the shim never starts (no event file)."""
    run = run_gkd(gkd_assets, swift_cache, tmp_path / "out", *deepspeed(ZERO2), gate_off=True).trained()
    assert numbers(run.train) == numbers(zero2_plain.train) and len(run.train) == STEPS
    assert numbers(run.evals) == numbers(zero2_plain.evals) and run.evals
    assert not any(k.startswith("vision_kd") for r in run.train + run.evals for k in r)
    assert not (tmp_path / "events.jsonl").exists()


# --- vision KD under ZeRO ----------------------------------------------------------------------------


def test_vision_kd_under_zero3_matches_ddp_from_the_first_step(zero3_vkd, ddp_vkd, ddp_plain):
    """ZeRO-3 student and ZeRO-3 teacher: the hooks see full, gathered outputs (not partitions), so every
    target's distance equals DDP's from step 1, the text-only rank's dummy-image features never count,
    and the term's gradient reaches the student: grad_norm equals the vision-KD DDP run's, and differs from
    plain GKD's exactly where the warm-up lets the term in (step 1 has weight 0, so it equals plain)."""
    assert_vision_kd_ran(zero3_vkd)
    assert_same(zero3_vkd.train, ddp_vkd.train, ("loss", "grad_norm", *KD_KEYS))
    for key in ("eval_loss", *(f"eval_{k}" for k in KD_KEYS)):
        assert zero3_vkd.evals[0][key] == pytest.approx(ddp_vkd.evals[0][key], rel=REL, abs=ABS), key
    first, later = zero3_vkd.train[0], zero3_vkd.train[1:]
    assert first["grad_norm"] == pytest.approx(ddp_plain.train[0]["grad_norm"], rel=REL, abs=ABS)
    for row, plain in zip(later, ddp_plain.train[1:], strict=True):
        assert row["grad_norm"] != pytest.approx(plain["grad_norm"], rel=1e-3), (row, plain)


def test_resume_under_zero3_continues_the_same_run_and_plain_swift_loads_the_checkpoint(
    zero3_vkd, gkd_assets, swift_cache, tmp_path
):
    """Resuming from the step-2 ZeRO-3 checkpoint (partitioned optimizer states, DeepSpeed's own format)
    gives step 3 exactly as the uninterrupted run logged it, vision-KD term and warm-up included; the
    adapter it saved loads in a process without the shim, every saved tensor in full (not a ZeRO-3
    partition), and its aligner adapters moved."""
    checkpoint = zero3_vkd.checkpoint(2)
    flags = (*deepspeed(ZERO3, ZERO3), "--resume_from_checkpoint", str(checkpoint))
    resumed = run_gkd(gkd_assets, swift_cache, tmp_path / "out", *flags, vkd=True).trained()
    assert_same(resumed.train, zero3_vkd.train[2:], ("loss", "grad_norm", *KD_KEYS), steps=1)
    assert sorted(e["rank"] for e in resumed.named("vkd.attach")) == [0, 1] and not resumed.named("vkd.skip")
    loaded = probe_checkpoint(gkd_assets["student"], checkpoint, swift_cache)
    moved = {k.split(".visual.")[1].split(".linear")[0] for k in loaded["nonzero_lora_b"] if ".visual." in k}
    assert moved == ALIGNER, loaded


@pytest.mark.xfail(
    patches.LAYOUT.series == "3.12",
    reason="ms-swift 3.12.6 / transformers 4.57.6 under DeepSpeed ZeRO-2 with LoRA, plain ms-swift too: the "
    "trainer builds its lr scheduler on its own optimizer, whose no-weight-decay group is empty under LoRA; "
    "deepspeed.initialize then drops empty param groups (runtime/engine.py _configure_optimizer), and "
    "torch 2.14's LRScheduler._update_lr (zip strict) fails at step 1: 'zip() argument 2 is longer than "
    "argument 1'. Full fine-tuning (both groups non-empty) trains.",
    raises=UpstreamFailure,
    strict=True,
)
def test_vision_kd_under_zero2_with_a_zero3_teacher_matches_ddp(ddp_vkd, gkd_assets, swift_cache, tmp_path):
    """ZeRO-2 LoRA student (whole parameters on every rank; gradients and optimizer states partitioned)
    with a ZeRO-3 teacher: every step's loss, gradient norm and distances equal the DDP vision-KD run's."""
    run = run_gkd(gkd_assets, swift_cache, tmp_path / "out", *deepspeed(ZERO2, ZERO3), vkd=True)
    run = run.unless_upstream("zip() argument 2 is longer than argument 1").trained()
    assert_vision_kd_ran(run)
    assert_same(run.train, ddp_vkd.train, ("loss", "grad_norm", *KD_KEYS))


@pytest.mark.parametrize("student", [ZERO2, ZERO3], ids=["zero2", "zero3"])
def test_full_fine_tuning_with_a_plain_teacher(student, gkd_assets, swift_cache, tmp_path):
    """Full fine-tuning (every LLM and aligner weight trained, ViT frozen), the teacher without
    --teacher_deepspeed (ms-swift gives it a stage-0 engine, a full copy per rank): the term is finite and
    non-zero in train and eval on both ranks, and the saved model is an ordinary checkpoint: exactly the
    student's keys and shapes (under ZeRO-3, gathered, not partitions), loaded by ms-swift's own loader,
    aligner weights moved."""
    run = run_gkd(
        gkd_assets, swift_cache, tmp_path / "out", *deepspeed(student), "--tuner_type", "full",
        "--save_strategy", "steps", "--save_steps", str(STEPS), vkd=True,
    ).trained()  # fmt: skip
    assert_vision_kd_ran(run)
    loaded = probe_checkpoint(gkd_assets["student"], run.checkpoint(STEPS), swift_cache)
    assert loaded["extra_keys"] == loaded["missing_keys"] == loaded["reshaped"] == [], loaded
    assert {k.split("visual.")[1].split(".linear")[0].split(".norm")[0] for k in loaded["changed_aligner"]} == ALIGNER


def test_on_policy_zero3_generation_leaves_the_hooks_in_place(zero3_vkd, gkd_assets, swift_cache, tmp_path):
    """Every step generates (`--lmbda 1`; the default 0.5 draws per step): trl removes and re-adds
    DeepSpeed's ZeRO-3 hooks around `generate`, and the tower runs inside generation too. The shim's hooks
    must still fire in the next loss window, and only there: step 1's distances (the same images through
    the same, not yet updated weights; the sampled text never enters the tower) equal the off-policy
    run's, and every later step has a finite term with nothing skipped."""
    flags = (*deepspeed(ZERO3, ZERO3), "--lmbda", "1")
    run = run_gkd(gkd_assets, swift_cache, tmp_path / "out", *flags, vkd=True).trained()
    assert_vision_kd_ran(run)
    for key in (*DISTANCES, "vision_kd/tokens"):
        assert run.train[0][key] == pytest.approx(zero3_vkd.train[0][key], rel=REL, abs=ABS), key
    # The sampled completions are what the loss sees: step 1's gradient differs (identical batches agree to 1e-4).
    assert run.train[0]["grad_norm"] != pytest.approx(zero3_vkd.train[0]["grad_norm"], rel=1e-2), "nothing sampled"


@pytest.mark.xfail(
    reason="ms-swift 4.6.0 swift/rlhf_trainers/utils.py prepare_deepspeed: its local HfTrainerDeepSpeedConfig "
    "re-points transformers' global deepspeed-config weakref, which dies on return; is_deepspeed_enabled() "
    "turns False, the Qwen3-VL forward skips the vision tower on the text-only rank, and the ZeRO-3 ranks "
    "issue different all-gathers (collective mismatch).",
    raises=UpstreamFailure,
    strict=True,
)
def test_zero3_teacher_without_the_ms_swift_workaround(ddp_plain, gkd_assets, swift_cache, tmp_path):
    flags = deepspeed(ZERO3, ZERO3)
    run = run_gkd(gkd_assets, swift_cache, tmp_path / "out", *flags, harness_skip="teacher")
    run = run.unless_upstream(*COLLECTIVE_MISMATCH).trained()
    assert_same(run.train, ddp_plain.train, ("loss", "grad_norm"))
