"""End to end: real `swift rlhf --rlhf_type gkd` subprocesses on the tiny local Qwen3-VL, launched the
ways users launch them (`vkd-run --config ... swift rlhf ...`, `VKD_ENABLE=1` with the bootstrap on
PYTHONPATH, `swift rlhf x.yaml` with an inline `custom.visual_kd` block), and judged only by what users
see: the exit code and stderr, ms-swift's `logging.jsonl` and output directory, and the shim's JSON event
lines (read from `VKD_LOG_FILE`: on stderr they can be glued to tqdm bars).

Why subprocesses: activation crosses `swift`'s re-exec, the model loader, the trainer factory and
ms-swift's metric plumbing; only a real launch proves that the term reaches `logging.jsonl`, that a bad
setup stops before any model loads, and that the switched-off path trains bit for bit as before.

Cost: 13 training runs (the knob-off equality test runs four: plain, switch off, weight 0, monitored and
fed non-finite features; monitoring text-only data two; a share one), 14 launches that stop before any
model loads (each also asks the doctor), one checkpoint load through ms-swift's loader. Measured on 2 CPU
cores shared with a niced experiment (load average about 2.3): 20-35 s per training run, 18-21 s per early
stop; the whole file about 9 minutes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from e2e_support import (
    FAIL_FAST_TIMEOUT_S,
    GKD_MODULE,
    LOADER_MARKER,
    POISON_HARNESS,
    PROBE_FILE_ENV,
    SHIPPED_CONFIGS,
    VKD_RUN,
    VKD_SHIM,
    eval_rows,
    launch,
    named,
    numbers,
    read_jsonl,
    report,
    run_dir,
    swift_env,
    train_rows,
    trained,
    trajectory,
    without,
    write_config,
)

from vkd_shim.bootstrap import BOOTSTRAP_DIR
from vkd_shim.runtime import MONITOR_GOES_ON
from vkd_shim.testing import kits
from vkd_shim.testing import launch as kit

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
PIPELINE_POINT = "swift.pipelines.train.rlhf:SwiftRLHF._prepare_model_tokenizer"
TRAINER_POINTS = {f"{GKD_MODULE}:GKDTrainer.{name}" for name in ("__init__", "compute_loss", "log")}
TARGETS = ["merger", "deepstack_0", "deepstack_1"]
METRIC_KEYS = (
    "vision_kd_loss",
    *(f"vision_kd/{t}" for t in TARGETS),
    "vision_kd/tokens",
    "vision_kd/skipped",
)

# Checks, in a process without the shim, that ms-swift's own loader (the calls `swift infer --adapters`
# makes) restores every adapter tensor of a checkpoint written under vision KD, bit for bit.
CHECKPOINT_PROBE = REPO / "tests" / "checkpoint_probe.py"


def unweighted(row: dict, prefix: str, target_weights: dict[str, float]) -> float:
    """Σ target_weight × per-target distance, from the per-target metrics of one log row."""
    return sum(target_weights[t.split("_")[0]] * row[f"{prefix}vision_kd/{t}"] for t in TARGETS)


def assert_finite_metrics(row: dict, prefix: str = "") -> None:
    for key in METRIC_KEYS:
        assert f"{prefix}{key}" in row, f"{prefix}{key} missing from {row}"
        assert math.isfinite(row[f"{prefix}{key}"]), row
    assert row[f"{prefix}vision_kd/tokens"] > 0, row
    assert row[f"{prefix}vision_kd/skipped"] == 0, row


# --- 1. the default path ---------------------------------------------------------------------------


def test_default_gkd_run_logs_the_weighted_term_on_visual_steps_only(gkd_assets, swift_cache, probe_dir, tmp_path):
    """Default lmbda (on-policy generation on some steps), image + video + text-only rows, the shipped
    base + Stage-3 overlay (weight 0.1, merger 1.0, deepstack 0.5, warmup 2), launched through vkd-run.

    The metrics must appear exactly on the steps whose micro-batch carried pixels, hold the weighted
    term (weight × warmup × Σ target weight × distance: the value added to the loss, not a raw
    distance), ramp from an exact 0 at step 1, and show up in eval; the events must say what was
    patched and attached, once.
    """
    out, events_file, probe_file = tmp_path / "out", tmp_path / "events.jsonl", tmp_path / "probe.jsonl"
    argv = [
        VKD_RUN,
        "--config",
        os.pathsep.join(map(str, SHIPPED_CONFIGS)),
        "--log-file",
        events_file,
        *kit.gkd_command(gkd_assets, out),
    ]
    proc = launch(argv, swift_env(swift_cache, probe_dir, **{PROBE_FILE_ENV: probe_file}))
    trained(proc)
    rows, events, calls = kit.read_logging_jsonl(out), read_jsonl(events_file), read_jsonl(probe_file)

    # Ground truth from the probe: one compute_loss per optimizer step (gradient accumulation 1).
    train_calls = {c["step"] + 1: c for c in calls if c["mode"] == "train"}
    assert sorted(train_calls) == list(range(1, kit.DEFAULT_MAX_STEPS + 1)), calls
    assert {c["source"] for c in train_calls.values()} == {"student", "dataset"}, "lmbda 0.5 mixes both"
    visual = {step for step, c in train_calls.items() if c["image"] or c["video"]}
    assert 1 in visual and visual != set(train_calls), f"need a visual step 1 and a text-only step: {calls}"
    assert any(c["video"] for c in calls), f"no micro-batch carried a video: {calls}"
    assert any(train_calls[s]["source"] == "student" for s in visual), "no on-policy step carried pixels"

    train = train_rows(rows)
    assert sorted(train) == sorted(train_calls)
    assert {s for s, r in train.items() if "vision_kd_loss" in r} == visual
    for step, row in train.items():
        if step in visual:
            assert_finite_metrics(row)
        else:  # text-only: no update reaches MeanMetric, so ms-swift drops every key of ours
            assert not any(k.startswith("vision_kd") for k in row), row

    # Warmup over 2 optimizer steps, read at the step the micro-batch ran: 0 at step 1, then > 0.
    weights = {"merger": 1.0, "deepstack": 0.5}
    assert train[1]["vision_kd_loss"] == 0.0
    assert all(train[s]["vision_kd_loss"] > 0 for s in visual - {1})
    for step in sorted(visual - {1}):
        warmup = min(1.0, (step - 1) / 2)
        expected = 0.1 * warmup * unweighted(train[step], "", weights)
        assert train[step]["vision_kd_loss"] == pytest.approx(expected, rel=2e-3), (step, train[step])

    evaluated = eval_rows(rows)
    assert sorted(evaluated) == [3, 6]
    for row in evaluated.values():
        assert_finite_metrics(row, "eval_")
        assert row["eval_vision_kd_loss"] == pytest.approx(0.1 * unweighted(row, "eval_", weights), rel=2e-3)

    # Events: a launcher process (swift's CLI) and one training process.
    trainer_pids = {e["pid"] for e in named(events, "vkd.attach")}
    assert len(trainer_pids) == 1, events
    (trainer_pid,) = trainer_pids
    launcher = [e for e in events if e["pid"] != trainer_pid]
    assert {e["pid"] for e in launcher} and len({e["pid"] for e in launcher}) == 1, events
    (config_event,) = named(events, "vkd.config")
    assert config_event["pid"] == trainer_pid
    patches = named(events, "vkd.patch")
    assert {e["status"] for e in patches} == {"applied"}, patches
    assert {e["target"] for e in patches if e["pid"] == trainer_pid} >= {PIPELINE_POINT, *TRAINER_POINTS}
    assert [e["target"] for e in patches if e["pid"] != trainer_pid] == ["swift.cli.main:parse_yaml_args"]
    (attach,) = named(events, "vkd.attach")
    assert attach["targets"] == TARGETS and attach["shared_modules"] is False
    assert not [e for e in events if e["level"] in ("warning", "error")], events
    assert config_event["config"]["weight"] == 0.1 and config_event["files"] == [str(p) for p in SHIPPED_CONFIGS]

    saved = json.loads((run_dir(out) / "vision_kd_config.json").read_text(encoding="utf-8"))
    assert saved == {k: config_event[k] for k in ("config", "sources", "files", "notes", "digest")}

    # The probe announces loader entries (positive control for the fail-fast test's "never loaded").
    assert proc.stderr.count(LOADER_MARKER) >= 3, "probe saw no model load: its absence proves nothing"

    # TensorBoard, where users watch it: train/ and eval/ scalars with the logged values.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(run_dir(out) / "runs")).Reload()
    scalars = board.Tags()["scalars"]
    assert {"train/vision_kd_loss", "train/vision_kd/merger", "eval/vision_kd_loss"} <= set(scalars), scalars
    logged = {e.step: e.value for e in board.Scalars("train/vision_kd_loss")}
    assert logged.keys() == visual
    last = max(visual)
    assert logged[last] == pytest.approx(train[last]["vision_kd_loss"], rel=1e-4)


# --- 2. student initialized from the teacher ---------------------------------------------------------


def test_byte_copied_student_starts_at_zero_with_the_inline_yaml_block(gkd_assets, swift_cache, tmp_path):
    """`swift rlhf x.yaml` whose YAML carries the swift arguments and a `custom.visual_kd` block, with
    VKD_ENABLE=1 and the bootstrap on PYTHONPATH; the student is a byte copy of the teacher, loaded as a
    separate model. Before any update the two aligners are identical, so step 1's term is exactly 0
    (LoRA's B starts at zero); anything else means the hooks compare different passes or tensors.
    """
    student = tmp_path / "student_copy"
    shutil.copytree(gkd_assets["teacher"], student)
    assets = {**gkd_assets, "student": str(student)}
    out, events_file = tmp_path / "out", tmp_path / "events.jsonl"
    argv = kit.gkd_command(assets, out, "--max_steps", "3", "--eval_strategy", "no", "--save_strategy", "no")
    document = dict(zip(argv[2::2], argv[3::2], strict=True))
    document = {flag.removeprefix("--"): value for flag, value in document.items()}
    block = {"weight": 1.0, "warmup_steps": 0, "distance": "mse"}
    document["custom"] = {"visual_kd": block}
    config_yaml = tmp_path / "gkd_vkd.yaml"
    config_yaml.write_text(yaml.safe_dump(document), encoding="utf-8")

    env = swift_env(swift_cache, BOOTSTRAP_DIR, VKD_ENABLE="1", VKD_LOG_FILE=events_file)
    proc = launch([argv[0], "rlhf", config_yaml], env)
    trained(proc)
    train, events = train_rows(kit.read_logging_jsonl(out)), read_jsonl(events_file)

    assert "vision_kd_loss" in train[1], f"step 1 must carry pixels for this check: {train[1]}"
    assert_finite_metrics(train[1])
    assert train[1]["vision_kd_loss"] == 0.0
    assert all(train[1][f"vision_kd/{t}"] == 0.0 for t in TARGETS), train[1]

    (config_event,) = named(events, "vkd.config")
    assert config_event["files"] == []
    assert {k: config_event["sources"][k] for k in block} == {k: f"inline:{config_yaml}" for k in block}
    assert config_event["config"]["weight"] == 1.0
    (attach,) = named(events, "vkd.attach")
    assert attach["shared_modules"] is False

    # The doctor, given the same YAML launch, shows the inline block where the run took it from.
    verdict = launch([VKD_SHIM, "doctor", "--", argv[0], "rlhf", config_yaml], env, FAIL_FAST_TIMEOUT_S)
    assert verdict.returncode == 0, verdict.stdout + verdict.stderr
    assert f"weight: 1.0  <- inline:{config_yaml}" in verdict.stdout


def test_lora_self_distillation_shares_modules_and_still_distills(gkd_assets, swift_cache, tmp_path):
    """`--model T --teacher_model T` with LoRA: ms-swift drops the teacher model and runs the teacher
    pass as the student with adapters disabled, so student and teacher share every aligner module.

    The shim must attribute the two passes (no skip, finite term). Step 1 is exactly 0 (B = 0, adapters
    change nothing yet); once the adapters have moved (sft_alpha gives them a gradient, a large learning
    rate makes it visible) the term is > 0, which can only happen if the adapter-disabled pass was
    recorded as the teacher and the adapter-enabled pass as the student.
    """
    assets = {**gkd_assets, "student": gkd_assets["teacher"]}
    config = write_config(tmp_path / "vkd.yaml", weight=1.0, warmup_steps=0)
    out, events_file = tmp_path / "out", tmp_path / "events.jsonl"
    extra = ("--max_steps", "4", "--eval_strategy", "no", "--save_strategy", "no")
    argv = [
        VKD_RUN,
        "--config",
        config,
        "--log-file",
        events_file,
        *kit.gkd_command(assets, out, *extra, "--sft_alpha", "1", "--learning_rate", "1e-2"),
    ]
    proc = launch(argv, swift_env(swift_cache))
    trained(proc)
    assert "using disable_adapter() for fixed teacher" in proc.stdout + proc.stderr, report(proc)
    train, events = train_rows(kit.read_logging_jsonl(out)), read_jsonl(events_file)

    (attach,) = named(events, "vkd.attach")
    assert attach["shared_modules"] is True and attach["targets"] == TARGETS
    assert not named(events, "vkd.skip"), named(events, "vkd.skip")
    visual = sorted(s for s, r in train.items() if "vision_kd_loss" in r)
    assert visual and visual[0] == 1, train
    for step in visual:
        assert_finite_metrics(train[step])
    assert train[1]["vision_kd_loss"] == 0.0
    assert any(train[s]["vision_kd_loss"] > 0 for s in visual[1:]), train


# --- 3 and 7. bf16, frozen aligner -------------------------------------------------------------------


def test_bf16_with_a_frozen_aligner_and_a_trainable_vit_logs_finite_metrics(gkd_assets, swift_cache, tmp_path):
    """bf16 on CPU keeps every metric finite (distances are computed in fp32). `--freeze_aligner true`
    with `--freeze_vit false` is legal: the captured outputs still depend on trainable ViT weights (the
    refusal cases cover aligner and ViT both frozen, ms-swift's defaults).
    """
    config = write_config(tmp_path / "vkd.yaml", weight=0.1, warmup_steps=0)
    out, events_file = tmp_path / "out", tmp_path / "events.jsonl"
    extra = ("--torch_dtype", "bfloat16", "--use_cpu", "true", "--freeze_aligner", "true", "--freeze_vit", "false")
    # No eval here: bf16 generation on CPU makes an eval pass cost more than the whole training.
    extra += ("--max_steps", "3", "--save_strategy", "no", "--eval_strategy", "no")
    argv = [
        VKD_RUN,
        "--config",
        config,
        "--log-file",
        events_file,
        *kit.gkd_command(gkd_assets, out, *extra),
    ]
    proc = launch(argv, swift_env(swift_cache))
    trained(proc)
    rows, events = kit.read_logging_jsonl(out), read_jsonl(events_file)

    assert not named(events, "vkd.refuse")
    train = train_rows(rows)
    visual = [s for s, r in train.items() if "vision_kd_loss" in r]
    assert visual, train
    for step in visual:
        assert_finite_metrics(train[step])
        assert train[step]["vision_kd_loss"] > 0  # different seeds: the aligners differ
        assert math.isfinite(train[step]["loss"])


# --- 4. save and resume ------------------------------------------------------------------------------


def test_resume_follows_the_restored_step_and_plain_swift_loads_the_checkpoint(gkd_assets, swift_cache, tmp_path):
    """Warmup is a function of the optimizer step, so a resumed run must ramp on from the restored
    step (the ratio logged term / Σ distances equals weight × step/warmup_steps), not restart at 0 and
    silently under-weight the term after every preemption. The checkpoint written under vision KD must
    stay an ordinary ms-swift checkpoint: a process without the shim restores it exactly.
    """
    config = write_config(tmp_path / "vkd.yaml", weight=1.0, warmup_steps=8)
    out = tmp_path / "out"
    weights = {"merger": 1.0, "deepstack": 1.0}
    head = [VKD_RUN, "--config", config, "--log-file", tmp_path / "events.jsonl"]
    first = launch(
        [
            *head,
            *kit.gkd_command(gkd_assets, out, "--max_steps", "4", "--save_steps", "4", "--eval_strategy", "no"),
        ],
        swift_env(swift_cache),
    )
    trained(first)
    checkpoint = run_dir(out, 0) / "checkpoint-4"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 4

    second = launch(
        [
            *head,
            *kit.gkd_command(
                gkd_assets,
                out,
                "--max_steps",
                "6",
                "--eval_strategy",
                "no",
                "--resume_from_checkpoint",
                checkpoint,
            ),
        ],
        swift_env(swift_cache),
    )
    trained(second)

    def ratios(rows: list[dict]) -> dict[int, float]:
        return {
            s: r["vision_kd_loss"] / unweighted(r, "", weights)
            for s, r in train_rows(rows).items()
            if "vision_kd_loss" in r
        }

    before = ratios(json.loads(line) for line in (run_dir(out, 0) / "logging.jsonl").read_text().splitlines())
    after = ratios(kit.read_logging_jsonl(out))
    assert sorted(train_rows(kit.read_logging_jsonl(out))) == [5, 6]
    assert before and after, (before, after)
    for step, ratio in {**before, **after}.items():
        assert ratio == pytest.approx((step - 1) / 8, rel=2e-3, abs=1e-9), (step, before, after)

    loader = launch([sys.executable, CHECKPOINT_PROBE, gkd_assets["student"], checkpoint], swift_env(swift_cache))
    assert loader.returncode == 0, report(loader)
    loaded = json.loads(loader.stdout.strip().splitlines()[-1])
    assert loaded["vkd_shim_imported"] is False and loaded["model"] == "PeftModelForCausalLM"
    assert loaded["saved"] > 0 and len(loaded["restored_exactly"]) == loaded["saved"], loaded
    aligner_b = [k for k in loaded["nonzero_lora_b"] if ".visual.merger." in k or ".deepstack_merger_list." in k]
    assert {k.split(".visual.")[1].split(".linear")[0] for k in aligner_b} == {
        "merger",
        "deepstack_merger_list.0",
        "deepstack_merger_list.1",
    }, loaded


# --- 5. backwards compatibility ----------------------------------------------------------------------


def test_switched_off_and_monitored_paths_train_bit_for_bit_like_plain_swift(gkd_assets, swift_cache, tmp_path):
    """Same seed, default lmbda (sampling included), four launches: plain `swift rlhf` without the
    bootstrap; the bootstrap on PYTHONPATH with VKD_ENABLE unset; vkd-run with `weight: 0`; vkd-run with
    `VKD_MODE=monitor` on a config whose weight is 1, whose non-finite policies are both `raise`, with a
    share asked for too, and fed non-finite features on both sides (tests/poison_harness: what the shim
    reads, not what the model computes). The logged loss, grad_norm and learning rate of every step and the
    saved adapter must be identical: neither the switched-off nor the monitoring shim may consume
    randomness, reorder work, touch the loss, or stop a run plain ms-swift finishes. The monitored run logs
    each target's distance and relative drift (and no vision_kd_loss: nothing was added), and reports the
    non-finite rows instead of applying the policies.
    """
    extra = ("--max_steps", "3", "--save_steps", "3", "--eval_strategy", "no")
    names = ("plain", "gate_off", "weight_0", "monitor")
    outs = [tmp_path / f"out_{name}" for name in names]
    gate_off_events, weight_0_events, monitor_events = (tmp_path / f"{n}.jsonl" for n in names[1:])
    config = write_config(tmp_path / "vkd.yaml", weight=0)
    monitored = write_config(tmp_path / "monitor.yaml", weight=1.0, nonfinite="raise", teacher_nonfinite="raise")
    monitor_env = swift_env(swift_cache, POISON_HARNESS, VKD_MODE="monitor", VKD_SHARE="0.1", E2E_POISON_FEATURES="1")
    launches = [
        (kit.gkd_command(gkd_assets, outs[0], *extra), swift_env(swift_cache)),
        (
            kit.gkd_command(gkd_assets, outs[1], *extra),
            swift_env(swift_cache, BOOTSTRAP_DIR, VKD_LOG_FILE=gate_off_events),
        ),
        (
            [VKD_RUN, "--config", config, "--log-file", weight_0_events, *kit.gkd_command(gkd_assets, outs[2], *extra)],
            swift_env(swift_cache),
        ),
        (
            [
                VKD_RUN,
                "--config",
                monitored,
                "--log-file",
                monitor_events,
                *kit.gkd_command(gkd_assets, outs[3], *extra),
            ],
            monitor_env,
        ),
    ]
    for argv, env in launches:
        trained(launch(argv, env))

    plain = trajectory(outs[0])
    assert [s for s, *_ in plain] == [1, 2, 3]
    for out in outs[1:]:
        assert trajectory(out) == plain, out.name
    adapters = [(run_dir(o) / "checkpoint-3" / "adapter_model.safetensors").read_bytes() for o in outs]
    assert all(adapter == adapters[0] for adapter in adapters[1:])

    for out in outs[:3]:
        assert not any(k.startswith("vision_kd") for row in kit.read_logging_jsonl(out) for k in row)
    assert not gate_off_events.exists(), "with VKD_ENABLE unset the shim must not even start"
    events = read_jsonl(weight_0_events)
    (note,) = named(events, "vkd.config.note")
    assert "weight = 0" in note["note"]
    assert not named(events, "vkd.attach")

    visual = [r for r in train_rows(kit.read_logging_jsonl(outs[3])).values() if "vision_kd/tokens" in r]
    assert visual, "the monitored run saw no visual step"
    for row in visual:
        assert "vision_kd_loss" not in row and "vision_kd/scale" not in row
        for target in TARGETS:  # the poisoned rows are masked out of the measurement
            assert math.isfinite(row[f"vision_kd/{target}"]) and math.isfinite(row[f"vision_kd/drift/{target}"])
        assert any(row[f"vision_kd/drift/{t}"] > 0 for t in TARGETS)  # different seeds: the aligners differ
    events = read_jsonl(monitor_events)
    (attach,) = named(events, "vkd.attach")
    assert attach["mode"] == "monitor"
    nonfinite = named(events, "vkd.nonfinite")
    assert {(e["side"], e["target"]) for e in nonfinite} == {("teacher", "merger"), ("student", "deepstack_0")}
    assert all(e["policy"] == "raise" and e["decision"] == MONITOR_GOES_ON for e in nonfinite), nonfinite
    (summary,) = named(events, "vkd.summary")
    assert summary["mode"] == "monitor" and set(summary["mean_drift_per_target"]["train"]) == set(TARGETS)
    assert summary["nonfinite_rows"] == {"train/teacher/merger": len(visual), "train/student/deepstack_0": len(visual)}
    assert not named(events, "vkd.monitor_error") and not named(events, "vkd.refuse")


def test_a_share_holds_the_term_at_that_fraction_of_the_gkd_part(gkd_assets, swift_cache, tmp_path):
    """`VKD_SHARE=0.1` on the shipped configs (weight 0.1, unused now; merger 1 + deepstack 0.5; a 2-step
    warm-up), default on-policy lmbda: on every visual step after the warm-up the logged term is 10 % of the
    GKD part (`loss` - `vision_kd_loss`), half that on the warm-up's middle step and 0 on its first; the
    logged `vision_kd/scale` times the weighted distances is the term. Tolerance: 1e-5 relative, the
    8-decimal rounding of logging.jsonl. The doctor states the share."""
    out, events = tmp_path / "out", tmp_path / "events.jsonl"
    argv = kit.gkd_command(gkd_assets, out, "--max_steps", "5", "--eval_steps", "5", "--save_strategy", "no")
    env = swift_env(swift_cache, VKD_SHARE="0.1", VKD_CONFIG=os.pathsep.join(map(str, SHIPPED_CONFIGS)))
    verdict = launch([VKD_SHIM, "doctor", "--", *argv], env, FAIL_FAST_TIMEOUT_S)
    assert verdict.returncode == 0 and "share: 0.1  <- env:VKD_SHARE" in verdict.stdout, verdict.stdout
    assert "SHARE: the term is held at 10% of the GKD part" in verdict.stdout, verdict.stdout
    trained(launch([VKD_RUN, "--log-file", events, *argv], env))

    rows = {s: r for s, r in train_rows(kit.read_logging_jsonl(out)).items() if r.get("vision_kd/tokens", 0) > 0}
    assert set(rows) >= {1, 3}, rows  # the kit's seed puts images into these steps
    for step, row in rows.items():
        warmup = min(1.0, (step - 1) / 2)
        gkd = row["loss"] - row["vision_kd_loss"]
        assert row["vision_kd_loss"] == pytest.approx(0.1 * warmup * gkd, rel=1e-5, abs=1e-8), (step, row)
        weighted = row["vision_kd/merger"] + 0.5 * (row["vision_kd/deepstack_0"] + row["vision_kd/deepstack_1"])
        assert row["vision_kd/scale"] * weighted == pytest.approx(row["vision_kd_loss"], rel=1e-5, abs=1e-8)
    assert any(row["vision_kd_loss"] > 0 for row in rows.values())
    # Eval computes the term the same way and reports it beside ms-swift's own eval_loss.
    (evaluated,) = eval_rows(kit.read_logging_jsonl(out)).values()
    assert evaluated["eval_vision_kd/scale"] > 0 and 0 < evaluated["eval_vision_kd_loss"] < evaluated["eval_loss"]
    (config,) = named(read_jsonl(events), "vkd.config")
    assert config["config"]["share"] == 0.1 and config["sources"]["share"] == "env:VKD_SHARE"


def test_monitoring_a_run_without_visual_tokens_trains_like_plain_and_exits_0(gkd_assets, swift_cache, tmp_path):
    """Text-only data, where an anchoring run stops (`no_visual: raise`, after a 1-step stretch and at the
    end): plain ms-swift finishes, so `VKD_MODE=monitor` must too, bit for bit, and say what it saw."""
    rows = [json.loads(x) for x in Path(gkd_assets["train"]).read_text(encoding="utf-8").splitlines()]
    text = tmp_path / "text_only.jsonl"
    text.write_text("".join(json.dumps(r) + "\n" for r in rows if not r.get("images") and not r.get("videos")))
    extra = ("--dataset", str(text), "--val_dataset", str(text), "--max_steps", "3", "--eval_strategy", "no")
    extra += ("--save_steps", "3")
    config = write_config(tmp_path / "vkd.yaml", weight=1.0, no_visual="raise", no_visual_steps=1)
    events = tmp_path / "events.jsonl"
    outs = {name: tmp_path / f"out_{name}" for name in ("plain", "monitor")}
    trained(launch(kit.gkd_command(gkd_assets, outs["plain"], *extra), swift_env(swift_cache)))
    monitored = [
        VKD_RUN,
        "--config",
        config,
        "--log-file",
        events,
        *kit.gkd_command(gkd_assets, outs["monitor"], *extra),
    ]
    trained(launch(monitored, swift_env(swift_cache, VKD_MODE="monitor")))

    # Every logged value but the clocks (the last row's log_history repeats them) and the runs' own paths.
    plain, monitor = (
        [r for r in numbers(kit.read_logging_jsonl(out)) if "log_history" not in r] for out in outs.values()
    )
    assert len([r for r in plain if "loss" in r]) == 3 and monitor == plain
    adapters = [(run_dir(o) / "checkpoint-3" / "adapter_model.safetensors").read_bytes() for o in outs.values()]
    assert adapters[0] == adapters[1]
    lines = read_jsonl(events)
    no_visual = named(lines, "vkd.no_visual")
    assert [e["level"] for e in no_visual] == ["warning", "warning"], no_visual  # the stretch, then the whole run
    assert all(e["policy"] == "raise" and e["decision"] == MONITOR_GOES_ON for e in no_visual)
    (summary,) = named(lines, "vkd.summary")
    assert summary["visual_tokens"] == {} and summary["last_visual_step"] is None


# --- 6. refusals before any model loads ----------------------------------------------------------------


def model_variant(gkd_assets: dict, path: Path, vision: dict | None, **top) -> str:
    """A model directory holding only a config.json derived from the teacher's: enough for every check
    that must happen before loading (a run that got past them would fail at the load, loudly)."""
    document = json.loads((Path(gkd_assets["teacher"]) / "config.json").read_text(encoding="utf-8"))
    if vision is None:
        document.pop("vision_config")
    else:
        document["vision_config"].update(vision)
    document.update(top)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(document), encoding="utf-8")
    return str(path)


REFUSALS = {
    # case: (config block, flags to drop, flags to add, extra env, what the error must name)
    "typo_in_config": ({"wieght": 0.1}, (), (), {}, ("custom.visual_kd.wieght", "{config}", "weight")),
    "weight_overflows_fp32": ({"weight": 1.0e38}, (), (), {}, ("custom.visual_kd.weight", "from 0 to 10000")),
    "remote_teacher": (
        {},
        ("--teacher_model", "--teacher_model_type"),
        ("--teacher_model_server", "http://127.0.0.1:9", "--gkd_logits_topk", "5"),
        {},
        ("teacher_model_server", "--teacher_model"),
    ),
    "dpo": ({}, (), ("--rlhf_type", "dpo"), {}, ("'dpo'", "--rlhf_type gkd")),
    "no_teacher": (
        {},
        ("--teacher_model", "--teacher_model_type"),
        (),
        {},
        ("no --teacher_model", "pass --teacher_model"),
    ),
    "aligner_and_vit_frozen": ({}, (), ("--freeze_aligner", "true"), {}, ("both frozen", "--freeze_aligner false")),
    # The merger's LoRA trains, but nothing feeds the ViT output entering it (ms-swift's --freeze_vit true).
    "vit_behind_a_frozen_vit": (
        {"targets": {"merger": 1.0, "vit": 1.0}},
        (),
        (),
        {},
        ("targets include vit", "--freeze_vit false"),
    ),
    "deepstack_layer_out_of_range": ({"deepstack_layers": [5]}, (), (), {}, ("[5]", "0..1")),
    "teacher_with_more_deepstack_mergers": (
        {},
        ("--teacher_model",),
        ("--teacher_model", "{deep_teacher}"),
        {},
        ("2 and 3 deepstack mergers", "deepstack_layers"),
    ),
    "teacher_without_a_vision_tower": (
        {},
        ("--teacher_model",),
        ("--teacher_model", "{text_teacher}"),
        {},
        ("no vision tower", "Qwen3-VL"),
    ),
    "switch_neither_on_nor_off": ({}, (), (), {"VKD_ENABLE": "2"}, ("VKD_ENABLE = '2'", "allowed values")),
    # A pair across tokenizers: GKD compares the next-token distributions id by id.
    "teacher_of_another_vocabulary": (
        {},
        ("--teacher_model",),
        ("--teacher_model", "{qwen3_5_moe}"),
        {},
        ("vocabularies differ (vocab_size 151936 vs 248320)", "share a tokenizer"),
    ),
    # An aligner whose rows are not the visual tokens the language model reads.
    "teacher_whose_aligner_does_not_fit": (
        {},
        ("--teacher_model",),
        ("--teacher_model", "{llava_onevision}"),
        {},
        ("is a LlavaOnevisionForConditionalGeneration", "image_newline", "Model families"),
    ),
    # The shipped configs leave deepstack optional; a user who names it asks for it, and Qwen3.5 has none.
    "deepstack_named_on_a_merger_only_family": (
        {"targets": ["merger", "deepstack"]},
        ("--model", "--teacher_model", "--model_type", "--teacher_model_type"),
        ("--model", "{qwen3_5}", "--teacher_model", "{qwen3_5_moe}", *kits.swift_argv("qwen3_5", "qwen3_5_moe")),
        {},
        ("Qwen3_5ForConditionalGeneration) has no deepstack mergers", "optional_targets"),
    ),
}


@pytest.fixture(scope="module")
def variants(gkd_assets, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("variants")
    return {
        "deep_teacher": model_variant(gkd_assets, root / "deep", {"deepstack_visual_indexes": [0, 1, 2]}),
        "text_teacher": model_variant(gkd_assets, root / "text", None),
        **{family: config_only(root / family, family) for family in ("qwen3_5", "qwen3_5_moe")},
        "llava_onevision": architecture_only(root / "llava_onevision", "LlavaOnevision"),
    }


def architecture_only(path: Path, name: str) -> str:
    """transformers' default config of an architecture, as its checkpoint's config.json names it."""
    import transformers

    config = getattr(transformers, f"{name}Config")()
    config.architectures = [f"{name}ForConditionalGeneration"]
    config.save_pretrained(path)
    return str(path)


def config_only(path: Path, family: str) -> str:
    """A kit family's checkpoint directory without the weights: its config.json, tokenizer and processor."""
    kits.KITS[family].save(path)
    (path / "model.safetensors").unlink()
    return str(path)


def refusal_launch(case: str, gkd_assets: dict, variants: dict, tmp_path: Path) -> tuple[list, dict, tuple]:
    block, drop, add, env_extra, names = REFUSALS[case]
    config = write_config(tmp_path / "vkd.yaml", **{"weight": 0.1, **block})
    add = tuple(item.format(**variants) for item in add)
    argv = without(kit.gkd_command(gkd_assets, tmp_path / "out"), *drop) + list(add)
    env = {"VKD_CONFIG": str(config), **env_extra}
    return argv, env, tuple(name.format(config=config) for name in names)


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusal_stops_before_any_model_loads_and_the_doctor_says_so_first(
    case, gkd_assets, variants, swift_cache, probe_dir, tmp_path
):
    """A mistake must cost seconds, not a model load: the run exits non-zero with the shim's one-line
    reason and fix (in the events and at the end of stderr), and the probe, a user sitecustomize chained
    after the bootstrap, never sees ms-swift's model loader start. `vkd-shim doctor -- <the same launch>`
    gives the same verdict, with the same reason, before anything runs.
    """
    argv, env_extra, names = refusal_launch(case, gkd_assets, variants, tmp_path)
    events_file = tmp_path / "events.jsonl"
    env = swift_env(swift_cache, probe_dir, **{PROBE_FILE_ENV: tmp_path / "probe.jsonl", **env_extra})
    env.setdefault("VKD_ENABLE", "1")
    env["PYTHONPATH"] = os.pathsep.join([BOOTSTRAP_DIR, env["PYTHONPATH"]])
    env["VKD_LOG_FILE"] = str(events_file)
    proc = launch(argv, env, timeout=FAIL_FAST_TIMEOUT_S)
    assert proc.returncode != 0, report(proc)
    assert LOADER_MARKER not in proc.stderr, report(proc)
    last_line = proc.stderr.strip().splitlines()[-1]
    for name in names:
        assert name in last_line, report(proc)
    if case != "switch_neither_on_nor_off":
        (refuse,) = named(read_jsonl(events_file), "vkd.refuse")
        message = f"vision KD refused: {refuse['reason']}. Fix: {refuse['fix']}."
        assert "\n" not in message
        assert last_line == f"vkd_shim.errors.RefusedError: {message}", report(proc)
    if case == "typo_in_config":
        (invalid,) = named(read_jsonl(events_file), "vkd.config.invalid")
        assert (invalid["field"], invalid["source"]) == ("custom.visual_kd.wieght", env_extra["VKD_CONFIG"])
        assert "weight" in invalid["allowed"].split(", ")

    verdict = launch([VKD_SHIM, "doctor", "--", *argv], env, timeout=FAIL_FAST_TIMEOUT_S)
    assert verdict.returncode == 1, verdict.stdout + verdict.stderr
    problems = [line for line in verdict.stdout.splitlines() if "PROBLEM:" in line]
    assert any(all(name in line for name in names) for line in problems), verdict.stdout


def test_valid_setup_passes_the_preflight_and_reaches_the_loader(gkd_assets, swift_cache, probe_dir, tmp_path):
    """Positive control for the refusal tests: with a valid config the preflight lets the run through
    and the probe does see the loader start (here a teacher dir holding only config.json makes the load
    itself fail fast), so the marker's absence above really means "stopped before loading".
    """
    teacher = tmp_path / "teacher_without_weights"
    teacher.mkdir()
    shutil.copy(Path(gkd_assets["teacher"]) / "config.json", teacher)
    config = write_config(tmp_path / "vkd.yaml", weight=0.1)
    events_file = tmp_path / "events.jsonl"
    argv = kit.gkd_command({**gkd_assets, "teacher": str(teacher)}, tmp_path / "out")
    proc = launch(
        [VKD_RUN, "--config", config, "--log-file", events_file, *argv],
        swift_env(swift_cache, probe_dir, **{PROBE_FILE_ENV: tmp_path / "probe.jsonl"}),
        timeout=FAIL_FAST_TIMEOUT_S,
    )
    assert proc.returncode != 0, report(proc)
    assert LOADER_MARKER in proc.stderr, report(proc)
    events = read_jsonl(events_file)
    assert named(events, "vkd.config") and not named(events, "vkd.refuse"), events

    verdict = launch(
        [VKD_RUN, "--config", config, VKD_SHIM, "doctor", "--", *argv], swift_env(swift_cache), FAIL_FAST_TIMEOUT_S
    )
    assert verdict.returncode == 0, verdict.stdout + verdict.stderr
    assert f"weight: 0.1  <- {config}" in verdict.stdout and "freeze_aligner: False" in verdict.stdout


# --- 8. a teacher of another width ---------------------------------------------------------------------


def test_a_wider_teacher_distils_through_relation_and_mse_is_refused_before_loading(
    gkd_assets, swift_cache, probe_dir, tmp_path
):
    """GKD's usual pair: a bigger Qwen3-VL-MoE teacher for a dense Qwen3-VL student, its language model, and so
    its aligner output, wider (96) than the student's (64), with the same ViT and token geometry. `relation` on
    merger, deepstack and vit trains with finite metrics in train and eval, no parameter added; `mse` on the same
    pair is refused before any model loads, with a fix that names `relation`."""
    from vkd_shim.testing import qwen_families

    wide = qwen_families.save_qwen3_vl_moe(tmp_path / "wide_teacher", seed=0, **qwen_families.width_overrides(96))
    assets = {**gkd_assets, "teacher": str(wide), "families": {"student": "qwen3_vl", "teacher": "qwen3_vl_moe"}}
    events_file = tmp_path / "events.jsonl"

    mse = write_config(tmp_path / "mse.yaml", weight=0.1, distance="mse")
    env = swift_env(swift_cache, probe_dir, **{PROBE_FILE_ENV: tmp_path / "probe.jsonl"})
    proc = launch([VKD_RUN, "--config", mse, *kit.gkd_command(assets, tmp_path / "out_mse")], env, FAIL_FAST_TIMEOUT_S)
    assert proc.returncode != 0 and LOADER_MARKER not in proc.stderr, report(proc)
    assert "64 vs 96" in proc.stderr and "distance: relation" in proc.stderr.strip().splitlines()[-1], report(proc)

    targets = {"merger": 1.0, "deepstack": 0.5, "vit": 1.0}
    relation = write_config(tmp_path / "relation.yaml", weight=1.0, distance="relation", targets=targets)
    out = tmp_path / "out"
    # vit needs a trainable ViT upstream of it (a frozen one, ms-swift's default, is refused on its own).
    argv = kit.gkd_command(
        assets, out, "--max_steps", "3", "--eval_steps", "3", "--save_strategy", "no", "--freeze_vit", "false"
    )
    trained(launch([VKD_RUN, "--config", relation, "--log-file", events_file, *argv], swift_env(swift_cache)))
    rows = kit.read_logging_jsonl(out)
    names = ["vision_kd_loss", "vision_kd/merger", "vision_kd/deepstack_0", "vision_kd/deepstack_1", "vision_kd/vit"]
    visual = [r for r in train_rows(rows).values() if "vision_kd_loss" in r]
    assert visual, rows
    for row in visual:
        assert all(math.isfinite(row[k]) for k in names), row
        assert row["vision_kd/merger"] > 0  # different seeds and widths: the similarity structures differ
    (evaluated,) = eval_rows(rows).values()
    assert all(math.isfinite(evaluated[f"eval_{k}"]) for k in names), evaluated
    (attach,) = named(read_jsonl(events_file), "vkd.attach")
    assert attach["targets"] == ["merger", "vit", "deepstack_0", "deepstack_1"] and attach["distance"] == "relation"
    assert attach["families"] == {"student": "Qwen3-VL", "teacher": "Qwen3-VL-MoE"}
