"""``python -m vkd_shim.demo``: the main job end to end, and a check that vision KD works on this stack.

Builds a tiny Qwen3-VL teacher and student and image / video / text data locally, launches a real
``swift rlhf --rlhf_type gkd`` exactly as a user would (``vkd-run`` + the shipped configs), prints the
per-step ``vision_kd_loss`` read back from ms-swift's ``logging.jsonl`` and a count of the shim's JSON
events, and exits non-zero when vision KD did not show up in the metrics.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

from vkd_shim import examples
from vkd_shim.testing import launch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vkd_shim.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=".work/demo", help="scratch directory (models, data, run output)")
    parser.add_argument("--configs", default=str(examples.config_dir()), help="directory holding the shipped configs")
    opts = parser.parse_args(argv)
    work = Path(opts.work).resolve()
    shutil.rmtree(work / "run", ignore_errors=True)
    assets = launch.build_all(work / "assets")
    events = work / "run" / "vkd_events.jsonl"
    configs = [Path(opts.configs) / name for name in examples.STAGE3]
    command = [
        str(Path(sys.executable).with_name("vkd-run")),
        "--config",
        ":".join(str(c) for c in configs),
        "--log-file",
        str(events),
        *launch.gkd_command(assets, work / "run" / "output"),
    ]
    print("$ " + " ".join(command), flush=True)
    proc = subprocess.run(command, env=launch.gkd_env(), check=False)
    if proc.returncode != 0:
        print(f"demo: swift rlhf exited with {proc.returncode}", file=sys.stderr)
        return proc.returncode
    rows = launch.read_logging_jsonl(work / "run" / "output")
    print_table(rows)
    counts: dict[str, int] = {}
    for line in events.read_text(encoding="utf-8").splitlines():
        if line.strip():
            name = json.loads(line)["event"]
            counts[name] = counts.get(name, 0) + 1
    print(f"\nshim events ({events}): {json.dumps(counts, sort_keys=True)}")
    return verdict(rows)


def print_table(rows: list[dict]) -> None:
    """Per logged step; an empty cell is a value ms-swift did not log, never a non-finite one."""
    print("\nstep        loss      vision_kd_loss  eval_vision_kd_loss  note")
    for row in rows:
        if not any(k in row for k in ("loss", "eval_loss")):
            continue
        step = str(row.get("global_step/max_steps", "?"))
        cells = [_cell(row.get(k)) for k in ("loss", "vision_kd_loss", "eval_vision_kd_loss")]
        print(f"{step:<11} {cells[0]:<9} {cells[1]:<15} {cells[2]:<20} {_note(row)}")


def _cell(value: object) -> str:
    return "—" if value is None else f"{value:.6f}"


def _note(row: dict) -> str:
    if "eval_loss" in row:
        return "evaluation"
    if "vision_kd_loss" not in row:
        return "no visual token in this step's batch: text-only steps carry no term"
    if row["vision_kd_loss"] == 0:
        return "0: warm-up starts at weight 0 (warmup_steps in the Stage-3 overlay)"
    return ""


def verdict(rows: list[dict]) -> int:
    """OK only when the term was logged in train and eval, finite, and non-zero after warm-up."""
    train = [r["vision_kd_loss"] for r in rows if "vision_kd_loss" in r]
    evals = [r["eval_vision_kd_loss"] for r in rows if "eval_vision_kd_loss" in r]
    problems = []
    if not train or not evals:
        problems.append("vision_kd_loss is missing from logging.jsonl (train or eval)")
    if not all(math.isfinite(v) for v in train + evals):
        problems.append("a logged vision_kd_loss is not finite")
    if train and not any(v > 0 for v in train):
        problems.append("vision_kd_loss stayed 0 in every train step")
    if problems:
        print("demo: " + "; ".join(problems), file=sys.stderr)
        return 1
    print(f"\nOK: {len(train)} train and {len(evals)} eval logs carry a finite vision_kd_loss")
    return 0


if __name__ == "__main__":
    sys.exit(main())
