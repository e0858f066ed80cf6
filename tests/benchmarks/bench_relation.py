"""Memory and time of the `relation` distance against `mse`, at the image sizes of the benchmarks' 4B preset.

`relation` builds, per image, the token-to-token similarity matrix of each side, so its memory grows
with the square of one image's tokens; the other distances are linear in the tokens. This measures, on
CPU, for one image of the 4B preset (448² px: 196 merged tokens, 784 ViT patches) and larger ones, the
peak memory the distance allocates in forward and backward (torch's CPU memory profiler: the largest
amount of live memory allocated by the distance's operators over the call) and the time of forward +
backward, for the aligner output (width 2560, Qwen3-VL-4B's) and for the ViT patches (width 1024), in
the same run, interleaved. Run: `python tests/benchmarks/bench_relation.py --out docs/BENCHMARKS.md`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_startup import write_section

from vkd_shim import loss

MARK_BEGIN = "<!-- relation:begin -->"
MARK_END = "<!-- relation:end -->"
# (what, tokens of one image, feature width): the 4B preset's 448² image and two larger images.
CASES = (
    ("merger, 448² image (4B preset)", 196, 2560),
    ("vit, 448² image (4B preset)", 784, 1024),
    ("merger, 1344² image", 1764, 2560),
    ("vit, 896² image", 3136, 1024),
)


def peak_bytes(fn) -> int:
    """Largest live CPU memory allocated by the call's operators, from the profiler's memory events."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    # Self memory only: a parent operator's figure already includes its children's allocations.
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def step(distance: str, student: torch.Tensor, teacher: torch.Tensor, tokens: int):
    def run() -> None:
        value = loss.feature_distance(student, teacher, distance, [tokens] if distance == "relation" else None)
        value.backward()
        student.grad = None

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None)
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for what, tokens, width in CASES:
        student = torch.randn(tokens, width, requires_grad=True)
        teacher = torch.randn(tokens, width)
        runs = {d: step(d, student, teacher, tokens) for d in ("mse", "relation")}
        times: dict[str, list[float]] = {d: [] for d in runs}
        for _ in range(opts.rounds):  # interleaved
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
        memory = {d: peak_bytes(run) for d, run in runs.items()}
        median = {d: statistics.median(t) * 1e3 for d, t in times.items()}
        bound = 4 * min(tokens, loss.RELATION_BLOCK_ROWS) * tokens * 4
        rows.append(
            f"| {what} | {tokens} | {width} | {median['mse']:.2f} | {median['relation']:.2f} | "
            f"{median['relation'] / median['mse']:.2f} | {memory['mse'] / 2**20:.1f} | "
            f"{memory['relation'] / 2**20:.1f} | {bound / 2**20:.1f} |"
        )
    body = "\n".join(
        [
            "## `relation` against `mse`: memory and time per image (CPU)",
            "",
            f"Command: `python tests/benchmarks/bench_relation.py --rounds {opts.rounds}`; torch "
            f"{torch.__version__}, 1 thread, fp32; forward + backward of the distance alone, for one image; "
            "medians of interleaved rounds; peak = the largest live memory the distance's operators "
            "allocated (profiler). Bound = 4 × block rows × tokens fp32 values (the blocks' similarity "
            f"matrices, difference and square; block rows {loss.RELATION_BLOCK_ROWS}, recomputed in backward "
            f"above that). Images above {loss.MAX_RELATION_TOKENS} tokens are skipped with a `vkd.skip`.",
            "",
            "| features | tokens | width | mse (ms) | relation (ms) | ratio | mse peak (MiB) | relation peak (MiB) "
            "| bound (MiB) |",
            "|---|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    print(body)
    if opts.out is not None:
        write_section(opts.out, f"{MARK_BEGIN}\n{body}\n{MARK_END}", begin=MARK_BEGIN, end=MARK_END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
