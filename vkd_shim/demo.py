"""``python -m vkd_shim.demo``: the main job end to end, and a check that vision KD works on this stack.

Builds a tiny Qwen3-VL teacher and student and image / video / text data locally, launches a real
``swift rlhf --rlhf_type gkd`` exactly as a user would (``vkd-run`` + the shipped configs), prints the
per-step ``vision_kd_loss`` read back from ms-swift's ``logging.jsonl`` and a count of the shim's JSON
events, and exits non-zero when vision KD did not show up in the metrics.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from vkd_shim.testing import launch

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vkd_shim.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=".work/demo", help="scratch directory (models, data, run output)")
    parser.add_argument("--configs", default=str(CONFIGS), help="directory holding the shipped config files")
    opts = parser.parse_args(argv)
    work = Path(opts.work).resolve()
    shutil.rmtree(work / "run", ignore_errors=True)
    assets = launch.build_all(work / "assets")
    events = work / "run" / "vkd_events.jsonl"
    configs = [Path(opts.configs) / "visual_kd_base.yaml", Path(opts.configs) / "stage3_visual_kd.yaml"]
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
    print("\nstep        vision_kd_loss  eval_vision_kd_loss")
    nan = float("nan")
    for row in rows:
        if "vision_kd_loss" in row or "eval_vision_kd_loss" in row:
            step = row.get("global_step/max_steps", "?")
            train, evaluated = row.get("vision_kd_loss", nan), row.get("eval_vision_kd_loss", nan)
            print(f"{step:<11} {train:<15.6f} {evaluated:.6f}")
    counts: dict[str, int] = {}
    for line in events.read_text(encoding="utf-8").splitlines():
        if line.strip():
            name = json.loads(line)["event"]
            counts[name] = counts.get(name, 0) + 1
    print(f"\nshim events ({events}): {json.dumps(counts, sort_keys=True)}")
    train = [r["vision_kd_loss"] for r in rows if "vision_kd_loss" in r]
    evals = [r["eval_vision_kd_loss"] for r in rows if "eval_vision_kd_loss" in r]
    if not train or not evals:
        print("demo: vision_kd_loss missing from logging.jsonl", file=sys.stderr)
        return 1
    print(f"\nOK: {len(train)} train and {len(evals)} eval logs carry vision_kd_loss")
    return 0


if __name__ == "__main__":
    sys.exit(main())
