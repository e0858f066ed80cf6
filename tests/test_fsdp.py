"""FSDP2 on two CPU ranks: a harness that really shards, plain ms-swift GKD on it equal to DDP, and vision KD.

Why: ms-swift 4.6 recommends `--fsdp fsdp2` for multi-GPU training, and on CPU gloo ranks that flag alone
"works" without sharding anything: accelerate selects DistributedType.FSDP only for GPU-like devices, so the
run exits 0, logs "Using FSDP2" and trains plain DDP. tests/fsdp_cpu_harness makes accelerate take its own GPU
FSDP branch on MULTI_CPU (and works around an ms-swift 4.6.0 bug that otherwise kills mixed image / text
micro-batches under FSDP2, shown by a strict xfail); its tap records from inside each rank what was built, so
the first test can assert that the student is `fully_shard`ed per layer with DTensor shards, resharded after
forward and activation-checkpointed as ms-swift's fsdp2.json asks, and that the teacher went through
ms-swift's `prepare_fsdp`. See docs/DISTRIBUTED.md for the recipe, the traps and their causes.

Every run is tests/two_ranks.py's real 2-rank `swift rlhf --rlhf_type gkd` launch (3 steps, off-policy, seed
42: at step 1 one rank's micro-batch is text-only while the other's has images), compared with the DDP
baselines that suite shares with tests/test_deepspeed.py, to logging.jsonl's 8 decimals (two units of the
last one, or 1e-4 relative; measured: equal to all 8 decimals for every value).

Cost on 2 shared CPU cores: 6 two-rank FSDP runs of 40-90 s (one of them the xfail, which dies at step 1),
2 single-process launches that stop before loading, one checkpoint probe, and the two shared DDP baselines.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
from e2e_support import (
    LOADER_MARKER,
    PROBE_FILE_ENV,
    VKD_SHIM,
    launch,
    named,
    read_jsonl,
    report,
    swift_env,
)
from two_ranks import (
    ALIGNER,
    COLLECTIVE_MISMATCH,
    DISTANCES,
    KD_KEYS,
    REL,
    SAVE_AT_2,
    SHIPPED_CONFIGS,
    STEPS,
    Run,
    UpstreamFailure,
    assert_same,
    assert_vision_kd_ran,
    numbers,
    probe_checkpoint,
    run_two_ranks,
)

from vkd_shim.bootstrap import BOOTSTRAP_DIR
from vkd_shim.testing import launch as kit

pytestmark = [pytest.mark.fsdp, pytest.mark.e2e]

HARNESS = Path(__file__).resolve().parent / "fsdp_cpu_harness"
TAP = HARNESS / "tap"
SHARD = "(Shard(dim=0),)"


def swift_fsdp2(directory: Path, **changes: Any) -> Path:
    """ms-swift's own `--fsdp fsdp2` preset (swift/config/fsdp2.json) with `fsdp_config` keys changed, as the
    JSON file `--fsdp` also takes."""
    preset = json.loads(preset_file().read_text(encoding="utf-8"))
    preset["fsdp_config"].update(changes)
    path = directory / f"fsdp2_{'_'.join(f'{k}-{v}' for k, v in changes.items())}.json"
    path.write_text(json.dumps(preset), encoding="utf-8")
    return path


def preset_file() -> Path:
    return Path(importlib.util.find_spec("swift").origin).parent / "config" / "fsdp2.json"


def run_fsdp(
    assets: dict, cache: Path, out: Path, *extra: str, fsdp: str | Path = "fsdp2", harness_skip: str = "", **kwargs
) -> Run:
    """A 2-rank run under `--fsdp` with the harness and its tap on (the tap writes beside `out`)."""
    tap_dir = out.parent / "tap"
    tap_dir.mkdir(parents=True, exist_ok=True)
    env = {"FSDP_CPU_HARNESS": "1", "FSDP_CPU_HARNESS_SKIP": harness_skip, "FSDP_TAP_DIR": str(tap_dir)}
    return run_two_ranks(assets, cache, out, "--fsdp", str(fsdp), *extra, harness=[HARNESS, TAP], env=env, **kwargs)


def tapped(run: Run, event: str) -> dict[int, list[dict]]:
    """The tap's records of one kind, by torch.distributed rank."""
    out = {}
    for rank in (0, 1):
        records = read_jsonl(run.out.parent / "tap" / f"rank{rank}.jsonl")
        out[rank] = [r for r in records if r["event"] == event]
    return out


def layout(run: Run) -> dict[int, dict]:
    found = tapped(run, "layout")
    assert all(len(records) == 1 for records in found.values()), found
    return {rank: records[0] for rank, records in found.items()}


def grads(run: Run) -> list[dict]:
    """Per step, the squared gradient norms of the aligner, the language model and the rest (all ranks)."""
    per_rank = tapped(run, "grads")
    values = [[{k: v for k, v in r.items() if k not in ("pid", "rank")} for r in per_rank[rank]] for rank in (0, 1)]
    assert values[0] == values[1] and len(values[0]) == STEPS, per_rank  # an all-reduce: every rank has the sum
    return values[0]


def assert_mixed_first_step(run: Run) -> None:
    """At step 1 exactly one rank's micro-batch carried pixels: the case that must neither hang nor count."""
    batches = tapped(run, "batch")
    first = [[b["visual"] for b in batches[rank] if b["step"] == 1] for rank in (0, 1)]
    assert sorted(first) == [[False], [True]], batches


@pytest.fixture(scope="module")
def fsdp_plain(gkd_assets, swift_cache, tmp_path_factory) -> Run:
    """Plain ms-swift GKD under `--fsdp fsdp2` (LoRA, ms-swift's preset: activation checkpointing on)."""
    return run_fsdp(gkd_assets, swift_cache, tmp_path_factory.mktemp("fsdp") / "out").trained()


@pytest.fixture(scope="module")
def fsdp_vkd(gkd_assets, swift_cache, tmp_path_factory) -> Run:
    """The same with vision KD on (the shipped configs), a SHARDED_STATE_DICT checkpoint at step 2."""
    out = tmp_path_factory.mktemp("fsdp_vkd") / "out"
    return run_fsdp(gkd_assets, swift_cache, out, *SAVE_AT_2, vkd=True).trained()


# --- the harness is faithful ---------------------------------------------------------------------------


def test_the_harness_shards_student_and_teacher_as_accelerate_does_on_gpus(fsdp_plain, gkd_assets):
    """Seen from inside each rank: accelerate's distributed type is FSDP with ms-swift's FSDP2 plugin; the
    student is `fully_shard`ed per vision block and per decoder layer (the model's `_no_split_modules`), each
    unit resharded after forward and wrapped for activation checkpointing, every parameter a DTensor of which
    this rank holds one half; the teacher went through ms-swift's `prepare_fsdp` (sharded the same way, frozen,
    no checkpointing). Not DDP that logs "Using FSDP2"."""
    preset = json.loads(preset_file().read_text(encoding="utf-8"))["fsdp_config"]
    config = json.loads((Path(gkd_assets["student"]) / "config.json").read_text(encoding="utf-8"))
    blocks, layers = config["vision_config"]["depth"], config["text_config"]["num_hidden_layers"]
    for rank, seen in layout(fsdp_plain).items():
        assert (seen["distributed_type"], seen["is_fsdp2"], seen["trainer_is_fsdp_enabled"]) == (
            "DistributedType.FSDP",
            True,
            True,
        ), seen
        plugin = seen["fsdp_plugin"]
        assert plugin["fsdp_version"] == preset["fsdp_version"] == 2
        assert plugin["reshard_after_forward"] is preset["reshard_after_forward"] is True
        assert plugin["activation_checkpointing"] is preset["activation_checkpointing"] is True
        assert plugin["state_dict_type"].endswith(preset["state_dict_type"])
        assert seen["gradient_checkpointing"] is False  # ms-swift switched to the FSDP config's checkpointing

        student = seen["student"]
        wanted = [f".visual.blocks.{i}" for i in range(blocks)] + [f".language_model.layers.{i}" for i in range(layers)]
        for suffix in wanted:
            (unit,) = [u for u in student["units"] if u["name"].endswith(suffix)]
            assert unit["reshard_after_forward"] is True, unit
        assert student["is_fsdp_module"] and student["class"].startswith("FSDP"), student
        assert sorted(student["checkpointed"]) == sorted(
            ["Qwen3VLVisionBlock"] * blocks + ["Qwen3VLTextDecoderLayer"] * layers
        )
        assert student["placements"] == [SHARD]
        assert student["dtensor_params"] == student["sharded"] == student["params"] > 0
        assert student["trainable_dtensors"] == student["trainable"] > 0

        (prepared,) = tapped(fsdp_plain, "prepare_fsdp")[rank]
        assert prepared["given"] == "Qwen3VLForConditionalGeneration", prepared
        teacher = prepared["returned"]
        assert teacher == seen["teacher"] and teacher["is_fsdp_module"], teacher
        assert teacher["dtensor_params"] == teacher["sharded"] == teacher["params"] > 0
        assert teacher["trainable"] == 0 and teacher["checkpointed"] == []
    assert_mixed_first_step(fsdp_plain)


def test_plain_gkd_under_fsdp2_matches_ddp(fsdp_plain, ddp_plain):
    """Same rows, seed and optimizer steps as DDP: per-step loss and grad_norm, and the eval loss, agree;
    the tap's own gradient norm (summed over both ranks' shards) is the one ms-swift logs."""
    assert_same(fsdp_plain.train, ddp_plain.train, ("loss", "grad_norm"))
    assert fsdp_plain.evals[0]["eval_loss"] == pytest.approx(ddp_plain.evals[0]["eval_loss"], rel=REL)
    for row, step in zip(fsdp_plain.train, grads(fsdp_plain), strict=True):
        total = math.sqrt(step["aligner"] + step["language"] + step["other"])
        assert total == pytest.approx(row["grad_norm"], rel=REL), (row, step)


def test_switched_off_shim_under_fsdp2_is_the_plain_run_exactly(fsdp_plain, gkd_assets, swift_cache, tmp_path):
    """The bootstrap on PYTHONPATH with VKD_ENABLE unset: every logged number equals the plain FSDP2 run's,
    bit for bit, and the shim never starts (no event file)."""
    run = run_fsdp(gkd_assets, swift_cache, tmp_path / "out", gate_off=True).trained()
    assert numbers(run.train) == numbers(fsdp_plain.train) and len(run.train) == STEPS
    assert numbers(run.evals) == numbers(fsdp_plain.evals) and run.evals
    assert not any(k.startswith("vision_kd") for r in run.train + run.evals for k in r)
    assert not (tmp_path / "events.jsonl").exists()


@pytest.mark.xfail(
    reason="ms-swift 4.6.0 swift/model/models/qwen.py: the Qwen3-VL forward runs the vision tower on a dummy "
    "image for a text-only micro-batch, and images and videos in one call, only under DeepSpeed "
    "(is_deepspeed_enabled()); under FSDP2 a text-only rank skips the tower, whose blocks are FSDP units, "
    "so the ranks issue different all-gathers: gloo 'Received data size doesn't match expected size', a hang "
    "on NCCL. tests/fsdp_cpu_harness takes the DeepSpeed path under FSDP too.",
    raises=UpstreamFailure,
    strict=True,
)
def test_mixed_micro_batches_without_the_harness_workaround(ddp_plain, gkd_assets, swift_cache, tmp_path):
    run = run_fsdp(gkd_assets, swift_cache, tmp_path / "out", harness_skip="mixed")
    run = run.unless_upstream(*COLLECTIVE_MISMATCH).trained()
    assert_same(run.train, ddp_plain.train, ("loss", "grad_norm"))


# --- vision KD under FSDP2 -----------------------------------------------------------------------------


def test_vision_kd_under_fsdp2_matches_ddp_and_its_gradient_reaches_the_aligner(fsdp_vkd, fsdp_plain, ddp_vkd):
    """LoRA student (aligner unfrozen) with activation checkpointing, sharded teacher: every step's loss,
    gradient norm, `vision_kd_loss` and per-target distance equal the DDP vision-KD run's from step 1, train
    and eval (the hooks see full outputs, not shards; the text-only rank of step 1 neither hangs nor
    counts), events come from both ranks. The term's gradient reaches the aligner and only the vision side:
    at step 1 (warm-up weight 0) every gradient equals plain FSDP2's; at step 2 (same weights, weight 0.5)
    the language model's gradient still does while the aligner's differs."""
    assert_vision_kd_ran(fsdp_vkd)
    assert_same(fsdp_vkd.train, ddp_vkd.train, ("loss", "grad_norm", *KD_KEYS, "vision_kd/tokens"))
    for key in ("eval_loss", *(f"eval_{k}" for k in KD_KEYS)):
        assert fsdp_vkd.evals[0][key] == pytest.approx(ddp_vkd.evals[0][key], rel=REL), key
    assert all(seen["student"]["checkpointed"] for seen in layout(fsdp_vkd).values())
    assert_mixed_first_step(fsdp_vkd)

    with_term, plain = grads(fsdp_vkd), grads(fsdp_plain)
    for key in ("aligner", "language"):
        assert with_term[0][key] == pytest.approx(plain[0][key], rel=1e-9), (with_term[0], plain[0])
    assert with_term[1]["language"] == pytest.approx(plain[1]["language"], rel=1e-9), (with_term[1], plain[1])
    assert with_term[1]["aligner"] != pytest.approx(plain[1]["aligner"], rel=1e-3), (with_term[1], plain[1])


def test_full_fine_tuning_without_activation_checkpointing_resumes_and_loads(
    ddp_vkd, gkd_assets, swift_cache, tmp_path
):
    """Full fine-tuning (every LLM and aligner weight trained, ViT frozen) with ms-swift's preset minus
    activation checkpointing: no checkpoint wrapper anywhere, the term finite in train and eval on both
    ranks, and step 1's distances equal DDP's (the same initial weights: LoRA starts as the base model).
    Resuming from the step-2 SHARDED_STATE_DICT checkpoint (DCP shards of model and optimizer) gives step 3
    exactly as the uninterrupted run logged it, warm-up included; the final checkpoint, merged the way
    accelerate documents for sharded checkpoints, loads through ms-swift's own loader with exactly the
    student's keys and shapes, its aligner weights moved."""
    preset = swift_fsdp2(tmp_path, activation_checkpointing=False)
    flags = ("--tuner_type", "full", *SAVE_AT_2)
    run = run_fsdp(gkd_assets, swift_cache, tmp_path / "run" / "out", *flags, fsdp=preset, vkd=True).trained()
    assert_vision_kd_ran(run)
    for rank, seen in layout(run).items():
        assert seen["fsdp_plugin"]["activation_checkpointing"] is False, rank
        assert seen["student"]["checkpointed"] == [] and seen["student"]["units"], seen["student"]
        assert seen["student"]["dtensor_params"] == seen["student"]["sharded"] == seen["student"]["params"]
    for key in (*DISTANCES, "vision_kd/tokens"):
        assert run.train[0][key] == pytest.approx(ddp_vkd.train[0][key], rel=REL), key

    resume = ("--resume_from_checkpoint", str(run.checkpoint(2)))
    out = tmp_path / "resumed" / "out"
    resumed = run_fsdp(gkd_assets, swift_cache, out, *flags, *resume, fsdp=preset, vkd=True).trained()
    assert_same(resumed.train, run.train[2:], ("loss", "grad_norm", *KD_KEYS), steps=1)
    assert sorted(e["rank"] for e in resumed.named("vkd.attach")) == [0, 1] and not resumed.named("vkd.skip")

    loaded = probe_checkpoint(gkd_assets["student"], run.checkpoint(STEPS), swift_cache)
    assert loaded["merged_from"] == "pytorch_model_fsdp_0", loaded
    assert loaded["extra_keys"] == loaded["missing_keys"] == loaded["reshaped"] == [], loaded
    assert {k.split("visual.")[1].split(".linear")[0].split(".norm")[0] for k in loaded["changed_aligner"]} == ALIGNER


# --- refused before loading, and what the doctor says ------------------------------------------------------


@pytest.mark.parametrize("case", ["fsdp1", "lora_resume_from_sharded"])
def test_what_cannot_work_under_fsdp_is_refused_before_loading_and_the_doctor_agrees(
    case, fsdp_vkd, gkd_assets, swift_cache, probe_dir, tmp_path
):
    """FSDP1 (ms-swift's GKD trainer stops it only after both models loaded) and a LoRA resume from the
    SHARDED_STATE_DICT checkpoint the vision-KD run above wrote (ms-swift 4.6 finds no adapter in it and
    trains nothing): the run stops before ms-swift's model loader with the reason and the fix, and
    `vkd-shim doctor -- <the same launch>` names the engine and gives the same verdict."""
    if case == "fsdp1":
        extra = ("--fsdp", str(swift_fsdp2(tmp_path, fsdp_version=1)))
        names, engine = ("FSDP1", "--fsdp fsdp2"), "engine: FSDP1 (fsdp='full_shard auto_wrap'"
    else:
        extra = ("--fsdp", "fsdp2", "--resume_from_checkpoint", str(fsdp_vkd.checkpoint(2)))
        names = ("SHARDED_STATE_DICT checkpoint", "FULL_STATE_DICT")
        engine = (
            "engine: FSDP2 (fsdp='full_shard auto_wrap'; reshard_after_forward=True, activation_checkpointing=True,"
            " state_dict_type=SHARDED_STATE_DICT)"
        )
    events_file = tmp_path / "events.jsonl"
    argv = kit.gkd_command(gkd_assets, tmp_path / "out", *extra)
    env = swift_env(swift_cache, BOOTSTRAP_DIR, probe_dir, **{PROBE_FILE_ENV: tmp_path / "probe.jsonl"})
    env.update(VKD_ENABLE="1", VKD_CONFIG=os.pathsep.join(map(str, SHIPPED_CONFIGS)), VKD_LOG_FILE=str(events_file))
    proc = launch(argv, env)
    assert proc.returncode != 0 and LOADER_MARKER not in proc.stderr, report(proc)
    (refuse,) = named(read_jsonl(events_file), "vkd.refuse")
    last_line = proc.stderr.strip().splitlines()[-1]
    message = f"vision KD refused: {refuse['reason']}. Fix: {refuse['fix']}."
    assert last_line == f"vkd_shim.errors.RefusedError: {message}" and all(n in last_line for n in names), last_line

    verdict = launch([VKD_SHIM, "doctor", "--", *argv], env)
    assert verdict.returncode == 1, verdict.stdout + verdict.stderr
    assert engine in verdict.stdout, verdict.stdout
    assert f"PROBLEM: {message}" in verdict.stdout, verdict.stdout
