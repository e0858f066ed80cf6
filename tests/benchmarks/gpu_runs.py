"""Real tiny ``swift rlhf --rlhf_type gkd`` runs with vision KD on one device, plain and combined with what
users combine it with: DeepSpeed ZeRO-3, the Liger kernel, padding-free batches, teacher offload.

Each run goes through ``vkd-run`` with the shipped configs (``configs/visual_kd_base.yaml:
configs/stage3_visual_kd.yaml``) on the tiny assets of ``vkd_shim.testing``, and is recorded as either
a finite vision-KD term (every logged train step carries a finite ``vision_kd_loss``) or the exact error
(the last exception line of its log, or why its package could not be installed). Writes
``<out>/runs.json`` and ``<out>/RUNS.md``. Usage::

    python tests/benchmarks/gpu_runs.py --device cuda --out OUT     # bf16 on GPU 0
    python tests/benchmarks/gpu_runs.py --device cpu --out OUT      # dry run: fp32, 3 steps

Exit status 0 when the plain run has a finite term (the variants may fail: their outcome is the result).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from vkd_shim.testing import launch

REPO = Path(__file__).resolve().parents[2]
CONFIGS = (REPO / "configs" / "visual_kd_base.yaml", REPO / "configs" / "stage3_visual_kd.yaml")
METRIC = "vision_kd_loss"
INSTALL_TIMEOUT = 60
MIN_RUN_SECONDS = 30

#: name -> (extra swift flags, module that must import, pip requirement to try when it does not)
VARIANTS: dict[str, tuple[tuple[str, ...], str | None, str | None]] = {
    "plain": ((), None, None),
    "offload_teacher": (("--offload_teacher_model", "true"), None, None),
    # One GPU: a one-process torchrun job (NPROC_PER_NODE=1), so DeepSpeed finds its process group.
    "zero3": (("--deepspeed", "zero3"), "deepspeed", "deepspeed==0.18.9"),
    "liger": (("--use_liger_kernel", "true"), "liger_kernel", "liger-kernel>=0.7.0"),
    # flash-attn ships no wheel on PyPI: binary only, so a missing wheel fails in seconds, not a long build.
    "padding_free": (
        ("--padding_free", "true", "--attn_impl", "flash_attn"),
        "flash_attn",
        "flash-attn --only-binary flash-attn",
    ),
}
_ERROR_LINE = re.compile(r"^\s*(?:[\w.]+\.)?\w*(?:Error|Exception|Interrupt)\b.*$|^\s*AssertionError.*$")


def available(module: str | None, requirement: str | None, install: bool, log: Path) -> str | None:
    """None when the variant can run; else why not (the exact pip failure when an install was tried)."""
    if module is None or importlib.util.find_spec(module) is not None:
        return None
    if not install or requirement is None:
        return f"{module} is not installed"
    with log.open("w", encoding="utf-8") as sink:
        try:
            code = subprocess.run(
                [sys.executable, "-m", "pip", "install", "--retries", "0", "--timeout", "10", *requirement.split()],
                stdout=sink,
                stderr=subprocess.STDOUT,
                timeout=INSTALL_TIMEOUT,
                check=False,
            ).returncode
        except subprocess.TimeoutExpired:
            return f"pip install {requirement} did not finish in {INSTALL_TIMEOUT} s"
    importlib.invalidate_caches()
    if code == 0 and importlib.util.find_spec(module) is not None:
        return None
    return f"pip install {requirement} failed (exit {code}): {last_error(log)}"


def last_error(log: Path) -> str:
    lines = [line.rstrip() for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    errors = [line.strip() for line in lines if _ERROR_LINE.match(line)]
    return (errors or lines or ["(empty log)"])[-1][:400]


def run_variant(name: str, flags: tuple[str, ...], assets: dict, opts, work: Path) -> dict:
    out = work / name
    events = out / "vkd_events.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    steps = str(opts.steps)
    swift = launch.gkd_command(
        assets,
        out / "output",
        *("--torch_dtype", opts.dtype, "--max_steps", steps, "--eval_steps", steps),
        *("--save_strategy", "no", "--report_to", "none"),
        *flags,
    )
    argv = [
        str(Path(sys.executable).with_name("vkd-run")),
        *("--config", os.pathsep.join(str(c) for c in CONFIGS), "--log-file", str(events), "--"),
        *swift,
    ]
    env = {k: v for k, v in launch.gkd_env(cache_dir=work / "cache").items() if not k.startswith("VKD_")}
    if opts.device == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = opts.gpu
    if name == "zero3":
        env.update(NPROC_PER_NODE="1", MASTER_PORT=str(29500 + os.getpid() % 1000))
    log = out / "launcher.log"
    start = time.perf_counter()
    with log.open("w", encoding="utf-8") as sink:
        try:
            code = subprocess.run(
                argv, env=env, stdout=sink, stderr=subprocess.STDOUT, timeout=opts.run_timeout, check=False
            ).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    record = {"variant": name, "argv": argv, "exit": code, "seconds": round(time.perf_counter() - start, 1)}
    record.update(read_outcome(out / "output", events, log, code))
    return record


def read_outcome(output: Path, events: Path, log: Path, code) -> dict:
    counts: dict[str, int] = {}
    if events.exists():
        for line in events.read_text(encoding="utf-8").splitlines():
            if line.strip():
                event = json.loads(line).get("event", "?")
                counts[event] = counts.get(event, 0) + 1
    try:
        rows = launch.read_logging_jsonl(output)
    except FileNotFoundError:
        rows = []
    train = [row for row in rows if "loss" in row and "eval_loss" not in row]
    # A logged step without the key had no visual micro-batch (text-only rows): nothing to add, no value.
    terms = [row.get(METRIC) for row in train]
    present = [v for v in terms if v is not None]
    evals = [row[f"eval_{METRIC}"] for row in rows if f"eval_{METRIC}" in row]
    finite = bool(present) and all(isinstance(v, (int, float)) and math.isfinite(v) for v in present + evals)
    if code == 0 and finite:
        outcome = f"finite term ({len(present)} of {len(train)} logged steps had visual inputs)"
    elif code == 0:
        outcome = f"no finite term: {METRIC} per train step = {terms}, eval {evals}"
    else:
        outcome = f"error: {last_error(log)}"
    return {"outcome": outcome, METRIC: terms, f"eval_{METRIC}": evals, "events": counts, "log": str(log)}


def render(records: list[dict], opts) -> str:
    lines = [
        f"## Tiny `swift rlhf --rlhf_type gkd` runs with vision KD ({opts.device}, {opts.dtype}, {opts.steps} steps)",
        "",
        "| variant | flags | exit | wall (s) | outcome | vision_kd_loss per logged step | eval |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        flags = " ".join(VARIANTS[r["variant"]][0]) or "—"
        terms, evals = (
            ", ".join(f"{v:.4g}" if isinstance(v, (int, float)) else "—" for v in r.get(key, [])) or "—"
            for key in (METRIC, f"eval_{METRIC}")
        )
        outcome = r["outcome"].replace("|", "\\|")
        lines.append(f"| {r['variant']} | `{flags}` | {r['exit']} | {r['seconds']} | {outcome} | {terms} | {evals} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    # The shipped stage-3 overlay ramps the weight over 2 steps: step 0's term is 0 by design.
    parser.add_argument("--steps", type=int, default=None, help="max_steps (cuda 6, cpu 3)")
    parser.add_argument("--dtype", default=None, help="--torch_dtype (cuda bfloat16, cpu float32)")
    parser.add_argument("--gpu", default="0", help="CUDA_VISIBLE_DEVICES for the runs")
    parser.add_argument("--timeout", type=int, default=240, help="seconds per run")
    parser.add_argument("--no-install", action="store_true", help="never pip install a missing package")
    parser.add_argument("--budget", type=int, default=None, help="seconds for everything; later variants are skipped")
    opts = parser.parse_args()
    started = time.monotonic()
    opts.run_timeout = opts.timeout
    opts.steps = opts.steps or (6 if opts.device == "cuda" else 3)
    opts.dtype = opts.dtype or ("bfloat16" if opts.device == "cuda" else "float32")
    work = opts.out.resolve() / "runs"
    work.mkdir(parents=True, exist_ok=True)
    os.environ.update(HF_HUB_OFFLINE="1", MODELSCOPE_OFFLINE="1")
    # Videos only where a reader can decode them (gkd_command refuses video rows otherwise).
    n_video = 8 if launch.video_reader() is not None else 0
    assets = launch.build_all(work / "assets", seed=0, n_video=n_video)
    records = []
    deadline = None if opts.budget is None else started + opts.budget
    for name in opts.variants:
        flags, module, requirement = VARIANTS[name]
        why = available(module, requirement, not opts.no_install, work / f"pip-{name}.log")
        left = None if deadline is None else deadline - time.monotonic()
        if why is not None:
            records.append({"variant": name, "exit": "skipped", "seconds": 0, "outcome": f"error: {why}"})
        elif left is not None and left < MIN_RUN_SECONDS:
            records.append({"variant": name, "exit": "not run", "seconds": 0, "outcome": "not run: time budget spent"})
        else:
            if left is not None:
                opts.run_timeout = max(1, min(opts.timeout, int(left)))
            records.append(run_variant(name, flags, assets, opts, work))
        print(f"{name}: {records[-1]['outcome']}", flush=True)
        # Written after every variant: a suite that is cut short keeps what finished.
        (opts.out / "runs.json").write_text(json.dumps(records, indent=2, default=str), encoding="utf-8")
        (opts.out / "RUNS.md").write_text(render(records, opts), encoding="utf-8")
    print(render(records, opts))
    plain = next((r for r in records if r["variant"] == "plain"), None)
    return 0 if plain is None or plain["outcome"].startswith("finite term") else 1


if __name__ == "__main__":
    sys.exit(main())
