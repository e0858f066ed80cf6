"""End to end under each side stack (ms-swift 3.12, 4.5, 4.4; the main 4.6 stack has tests/test_e2e.py):
real `swift rlhf --rlhf_type gkd` subprocesses on the tiny Qwen3-VL saved the way the installed
transformers reads it, judged by what users see (exit code, `logging.jsonl`, the output directory and the
shim's event lines from `VKD_LOG_FILE`).

Why: only a real launch proves a release's whole path (its YAML entry and the re-exec, the pipeline, the
trainer, its batch layout, its metric plumbing) and that the switched-off shim leaves its training
untouched. Everything release-specific comes from the installed layout (`patches.LAYOUT`).

Cost on 2 shared CPU cores: 3 training runs of 3 steps, about 40-60 s each.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vkd_shim import patches, swift_layouts
from vkd_shim.bootstrap import BOOTSTRAP_DIR
from vkd_shim.testing import launch as kit

pytestmark = pytest.mark.e2e

VKD_RUN = Path(sys.executable).with_name("vkd-run")
TRAIN_TIMEOUT_S = 600
LAYOUT = patches.LAYOUT
TARGETS = ("merger", "deepstack_0", "deepstack_1")
# ms-swift 4.4's own on-policy bug (see swift_layouts.SWIFT_4_4): off-policy there.
THREE_STEPS = ("--max_steps", "3", "--save_strategy", "no", *(("--lmbda", "0") if LAYOUT.series == "4.4" else ()))


def yaml_launch(argv: list[str], block: dict, path: Path) -> list[str]:
    """The same run with its vision-KD block inline in the YAML, through the release's YAML entry."""
    if LAYOUT.config_flag is not None:  # 3.x: `swift rlhf ... --config x.yaml`
        path.write_text(yaml.safe_dump({"custom": {"visual_kd": block}}), encoding="utf-8")
        return [*argv, LAYOUT.config_flag, str(path)]
    flags = dict(zip(argv[2::2], argv[3::2], strict=True))  # 4.x: `swift rlhf x.yaml` holds everything
    document = {flag.removeprefix("--"): value for flag, value in flags.items()}
    path.write_text(yaml.safe_dump({**document, "custom": {"visual_kd": block}}), encoding="utf-8")
    return [argv[0], "rlhf", str(path)]


def swift_env(cache: Path, **extra: str | os.PathLike[str]) -> dict:
    """the kit's offline single-process env, minus anything of ours the test process may carry."""
    env = kit.gkd_env(cache_dir=cache)
    for name in [k for k in env if k.startswith("VKD_")] + ["PYTHONPATH"]:
        env.pop(name, None)
    env.update({name: str(value) for name, value in extra.items()})
    return env


def launch(argv: list, env: dict) -> None:
    proc = subprocess.run(
        [str(a) for a in argv], env=env, capture_output=True, text=True, timeout=TRAIN_TIMEOUT_S, check=False
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def read_events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def step_of(row: dict) -> int:
    return int(row["global_step/max_steps"].split("/")[0])


def test_vkd_run_with_inline_config_block_logs_the_weighted_term(stack_assets, tmp_path_factory, tmp_path):
    """vkd-run, and the vision-KD block inline in the YAML given to `swift rlhf` through the release's
    YAML entry: every step's `vision_kd_loss` is the weighted sum of its per-target distances, eval rows
    carry the `eval_` keys, and the patch events name the release's patch points."""
    config = tmp_path / "gkd.yaml"
    block = {"weight": 0.5, "targets": {"merger": 1.0, "deepstack": 0.5}}
    events_file, out = tmp_path / "events.jsonl", tmp_path / "out"
    argv = yaml_launch(kit.gkd_command(stack_assets, out, *THREE_STEPS, "--eval_steps", "3"), block, config)
    launch([VKD_RUN, "--log-file", events_file, *argv], swift_env(tmp_path_factory.mktemp("cache")))

    rows = kit.read_logging_jsonl(out)
    train = {step_of(r): r for r in rows if "loss" in r}
    assert sorted(train) == [1, 2, 3]
    for row in train.values():  # every step of this seed has an image or a video in it
        per_target = {t: row[f"vision_kd/{t}"] for t in TARGETS}
        assert all(math.isfinite(v) and v > 0 for v in per_target.values()), row
        weighted = 0.5 * (per_target["merger"] + 0.5 * (per_target["deepstack_0"] + per_target["deepstack_1"]))
        assert row["vision_kd_loss"] == pytest.approx(weighted, rel=1e-4)
        assert row["vision_kd/tokens"] > 0 and row["vision_kd/skipped"] == 0
    (evaluated,) = [r for r in rows if "eval_loss" in r]
    assert math.isfinite(evaluated["eval_vision_kd_loss"]) and evaluated["eval_vision_kd/tokens"] > 0

    (run_dir,) = out.glob("v0-*")
    saved = json.loads((run_dir / "vision_kd_config.json").read_text())
    assert saved["config"]["weight"] == 0.5 and saved["sources"]["weight"] == f"inline:{config}"
    events = read_events(events_file)
    applied = {e["target"] for e in events if e["event"] == "vkd.patch" and e["status"] == "applied"}
    optional = swift_layouts.MEGATRON_PREFLIGHT
    assert applied == {f"{module}:{name}" for role, (module, name) in LAYOUT.points.items() if role != optional}
    assert {e["swift_layout"] for e in events if e["event"] == "vkd.activate"} == {LAYOUT.series}
    assert not [e for e in events if e["level"] != "info"], [e for e in events if e["level"] != "info"]


def test_switched_off_and_weight_zero_train_identically(stack_assets, tmp_path_factory, tmp_path):
    """The bootstrap on PYTHONPATH with VKD_ENABLE unset, and vkd-run with `weight: 0`: same seed, default
    lmbda (sampling included), the same loss, grad_norm and learning rate at every step, and no
    vision-KD key anywhere. The shim must not consume randomness, reorder work or touch the loss."""
    cache = tmp_path_factory.mktemp("cache")
    outs = {name: tmp_path / name for name in ("gate_off", "weight_0")}
    logs = {name: tmp_path / f"{name}.jsonl" for name in outs}
    config = tmp_path / "vkd.yaml"
    config.write_text(yaml.safe_dump({"custom": {"visual_kd": {"weight": 0}}}), encoding="utf-8")
    extra = (*THREE_STEPS, "--eval_strategy", "no")
    launch(
        kit.gkd_command(stack_assets, outs["gate_off"], *extra),
        swift_env(cache, PYTHONPATH=BOOTSTRAP_DIR, VKD_LOG_FILE=logs["gate_off"]),
    )
    launch(
        [
            VKD_RUN,
            "--config",
            config,
            "--log-file",
            logs["weight_0"],
            *kit.gkd_command(stack_assets, outs["weight_0"], *extra),
        ],
        swift_env(cache),
    )

    def trajectory(out: Path) -> list[tuple]:
        rows = [r for r in kit.read_logging_jsonl(out) if "loss" in r]
        assert not [k for r in rows for k in r if k.startswith("vision_kd")]
        return [(step_of(r), r["loss"], r["grad_norm"], r["learning_rate"]) for r in rows]

    gate_off = trajectory(outs["gate_off"])
    assert [step for step, *_ in gate_off] == [1, 2, 3]
    assert trajectory(outs["weight_0"]) == gate_off
    assert not logs["gate_off"].exists(), "with VKD_ENABLE unset the shim must not even start"
    events = read_events(logs["weight_0"])
    (note,) = [e for e in events if e["event"] == "vkd.config.note"]
    assert "weight = 0" in note["note"]
    assert not [e for e in events if e["event"] == "vkd.attach"]


def test_fsdp2_is_refused_before_loading_where_it_is_not_proven(stack_assets, tmp_path_factory, tmp_path):
    """FSDP2 under vision KD is proven on ms-swift 4.6 only (tests/test_fsdp.py, really sharded ranks against
    DDP). On this release a launch that asks for it stops in the preflight, before any model loads, with the
    reason and the fix; the doctor says the same first. (One process: the refusal reads the arguments.)"""
    assert not LAYOUT.fsdp2
    out, events_file = tmp_path / "out", tmp_path / "events.jsonl"
    # A config file, as users write one (3.12.6's wheel lacks the `fsdp2` preset's JSON: plain ms-swift fails there).
    fsdp = tmp_path / "fsdp2.json"
    fsdp.write_text(json.dumps({"fsdp": "full_shard auto_wrap", "fsdp_config": {"fsdp_version": 2}}), encoding="utf-8")
    argv = kit.gkd_command(stack_assets, out, *THREE_STEPS, "--fsdp", str(fsdp))
    env = swift_env(tmp_path_factory.mktemp("cache"))
    verdict = subprocess.run(
        [str(a) for a in [VKD_RUN, VKD_RUN.with_name("vkd-shim"), "doctor", "--", *argv]],
        env=env, capture_output=True, text=True, timeout=TRAIN_TIMEOUT_S, check=False,
    )  # fmt: skip
    assert verdict.returncode == 1 and f"installed {LAYOUT.series}.x" in verdict.stdout, verdict.stdout[-3000:]
    proc = subprocess.run(
        [str(a) for a in [VKD_RUN, "--log-file", events_file, *argv]],
        env=env, capture_output=True, text=True, timeout=TRAIN_TIMEOUT_S, check=False,
    )  # fmt: skip
    assert proc.returncode != 0, proc.stderr[-3000:]
    events = read_events(events_file)
    (refusal,) = [e for e in events if e["event"] == "vkd.refuse"]
    assert "FSDP2 under vision KD is proven on ms-swift 4.6.x only" in refusal["reason"], refusal
    assert f"use DeepSpeed ZeRO-2/3 or DDP on ms-swift {LAYOUT.series}" in refusal["fix"], refusal
    assert not [e for e in events if e["event"] == "vkd.attach"] and not list(out.glob("v*/vision_kd_config.json"))
