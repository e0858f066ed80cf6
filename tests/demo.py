"""The main job, end to end: a real ``swift rlhf --rlhf_type gkd`` run with vision KD on a
locally built tiny Qwen3-VL, launched exactly as a user would (``vkd-run`` + a config).

Prints the per-step ``vision_kd_loss`` read back from ms-swift's ``logging.jsonl`` and a summary
of the shim's JSON events, and exits non-zero when vision KD did not show up in the metrics.
"""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tiny_assets

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=".work/demo", help="scratch directory (models, data, run output)")
    opts = parser.parse_args()
    work = Path(opts.work).resolve()
    shutil.rmtree(work / "run", ignore_errors=True)
    assets = tiny_assets.build_all(work / "assets")
    events = work / "run" / "vkd_events.jsonl"
    configs = [REPO / "configs" / "visual_kd_base.yaml", REPO / "configs" / "stage3_visual_kd.yaml"]
    vkd_run = Path(sys.executable).with_name("vkd-run")
    argv = [
        str(vkd_run),
        "--config",
        ":".join(str(c) for c in configs),
        "--log-file",
        str(events),
        *tiny_assets.gkd_command(assets, work / "run" / "output"),
    ]
    print("$ " + " ".join(argv), flush=True)
    proc = subprocess.run(argv, env=tiny_assets.gkd_env(), check=False)
    if proc.returncode != 0:
        print(f"demo: swift rlhf exited with {proc.returncode}", file=sys.stderr)
        return proc.returncode

    rows = tiny_assets.read_logging_jsonl(work / "run" / "output")
    print("\nstep        vision_kd_loss  eval_vision_kd_loss")
    nan = float("nan")
    for row in rows:
        if "vision_kd_loss" in row or "eval_vision_kd_loss" in row:
            step = row.get("global_step/max_steps", "?")
            train, evaluated = row.get("vision_kd_loss", nan), row.get("eval_vision_kd_loss", nan)
            print(f"{step:<11} {train:<15.6f} {evaluated:.6f}")
    lines = [json.loads(x) for x in events.read_text().splitlines() if x.strip()]
    counts: dict[str, int] = {}
    for line in lines:
        counts[line["event"]] = counts.get(line["event"], 0) + 1
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
