"""End to end under ms-swift 3.12: real `swift rlhf --rlhf_type gkd` subprocesses on the tiny Qwen3-VL
saved for transformers 4.57, judged by what users see (exit code, `logging.jsonl`, the output directory
and the shim's event lines from `VKD_LOG_FILE`).

Why: only a real 3.x launch proves the whole 3.x path (the `--config` YAML entry and the re-exec, the
pipeline in `swift.llm.train`, the trainer in `swift.trainers.rlhf_trainer`, a batch without
`model_inputs`, 3.x's metric plumbing) and that the switched-off shim leaves 3.x training untouched.

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

from vkd_shim.bootstrap import BOOTSTRAP_DIR
from vkd_shim.testing import launch as kit

pytestmark = pytest.mark.e2e

VKD_RUN = Path(sys.executable).with_name("vkd-run")
TRAIN_TIMEOUT_S = 600
GKD_MODULE = "swift.trainers.rlhf_trainer.gkd_trainer"
TARGETS = ("merger", "deepstack_0", "deepstack_1")
THREE_STEPS = ("--max_steps", "3", "--save_strategy", "no")


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


def test_vkd_run_with_inline_config_block_logs_the_weighted_term(assets_312, tmp_path_factory, tmp_path):
    """vkd-run, and the vision-KD block inline in the YAML given to `swift rlhf --config` (3.x's YAML
    entry): every step's `vision_kd_loss` is the weighted sum of its per-target distances, eval rows carry
    the `eval_` keys, and the patch events name the 3.x patch points."""
    config = tmp_path / "gkd.yaml"
    block = {"weight": 0.5, "targets": {"merger": 1.0, "deepstack": 0.5}}
    config.write_text(yaml.safe_dump({"custom": {"visual_kd": block}}), encoding="utf-8")
    events_file, out = tmp_path / "events.jsonl", tmp_path / "out"
    argv = kit.gkd_command(assets_312, out, *THREE_STEPS, "--eval_steps", "3", "--config", config)
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
    assert applied == {
        "swift.cli.main:prepare_config_args",
        "swift.llm.train.rlhf:SwiftRLHF._prepare_model_tokenizer",
        *(f"{GKD_MODULE}:GKDTrainer.{name}" for name in ("__init__", "compute_loss", "log")),
    }
    assert {e["swift_layout"] for e in events if e["event"] == "vkd.activate"} == {"3.12"}
    assert not [e for e in events if e["level"] != "info"], [e for e in events if e["level"] != "info"]


def test_switched_off_and_weight_zero_train_identically(assets_312, tmp_path_factory, tmp_path):
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
        kit.gkd_command(assets_312, outs["gate_off"], *extra),
        swift_env(cache, PYTHONPATH=BOOTSTRAP_DIR, VKD_LOG_FILE=logs["gate_off"]),
    )
    launch(
        [
            VKD_RUN,
            "--config",
            config,
            "--log-file",
            logs["weight_0"],
            *kit.gkd_command(assets_312, outs["weight_0"], *extra),
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
