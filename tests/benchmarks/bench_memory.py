"""Memory stays flat over a long run of the shim's real path, and nothing outlives a step.

A real ms-swift `GKDTrainer` with the shim active (built as in ``bench_step.py``) runs 1000 steps
of the patched ``compute_loss`` + backward + optimizer step on one fixed micro-batch, flushing the
metric buffer every 50 steps as ``trainer.log`` does. Checked every step: the capture store is
empty once the window has closed, and every feature tensor the window handed to the loss is dead
(weak references) once the step's own references are gone. Sampled every 50 steps: RSS, the bytes
held by live allocations, and the number of live torch tensors. Reported: least-squares slopes
after warm-up, beside the bytes of features one step captures (what a leak of one step's features
would add per step). A negative control then keeps every step's features, as a leak would, to
show that these checks catch one. Writes the memory section of ``docs/BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import gc
import re
import statistics
import sys
import tempfile
import weakref
from pathlib import Path

import bench_step
from bench_step import REPO, bench_startup

MARK_BEGIN = "<!-- memory:begin -->"
MARK_END = "<!-- memory:end -->"


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
            "keepcost",
        )
    ]  # fmt: skip


def memory_sample() -> tuple[int, int]:
    """(RSS, bytes in use by malloc), after handing the allocator's free pages back to the kernel.

    Each step allocates and frees hundreds of MiB; without malloc_trim the RSS depends on what glibc
    happens to keep cached and moves by tens of MiB between samples. mallinfo2 (glibc >= 2.33)
    counts the bytes actually held by live allocations: heap chunks in use plus mmapped blocks.
    """
    gc.collect()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc_trim(0)
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    status = Path("/proc/self/status").read_text()
    rss = int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE).group(1)) * 1024
    return rss, info.uordblks + info.hblkhd


def live_tensors(torch) -> int:
    # type() rather than isinstance(): some module objects warn when torch probes them.
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


def slope(points: list[tuple[int, int]]) -> float:
    """Least-squares slope of (step, bytes) points, in bytes per step."""
    xs, ys = [x for x, _ in points], [y for _, y in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)


class Tracker:
    """Wraps the capture's `take()` to hold weak references to every tensor it hands to the loss.

    With `keep`, it also keeps the tensors themselves: the negative control, a leak by construction.
    """

    def __init__(self, capture, keep: list | None = None) -> None:
        self.refs: list[weakref.ref] = []
        self.step_bytes = 0
        real_take = capture.take

        def take():
            features = real_take()
            tensors = [t for side in features.values() for t in side.values()]
            self.refs = [weakref.ref(t) for t in tensors]
            self.step_bytes = sum(t.numel() * t.element_size() for t in tensors)
            if keep is not None:
                keep.append(features)
            return features

        capture.take = take

    def alive(self) -> int:
        return sum(ref() is not None for ref in self.refs)


def run(h: bench_step.Harness, steps: int, every: int, warmup: int, keep: list | None = None) -> dict:
    torch = h.torch
    h.set_mode("shim")
    capture = h.kd.capture
    tracker = Tracker(capture, keep)
    try:
        return _run(h, tracker, steps, every, warmup, torch)
    finally:
        del capture.take  # back to the class's method


def _run(h: bench_step.Harness, tracker: Tracker, steps: int, every: int, warmup: int, torch) -> dict:
    capture = h.kd.capture
    samples, tensors = [], []
    leaked_steps, store_left, taken = 0, 0, 0
    for step in range(steps + 1):
        if step % every == 0:
            h.kd.flush("train")
            samples.append((step, *memory_sample()))
            tensors.append(live_tensors(torch))
        if step == steps:
            break
        tracker.refs = []
        h.step("shim", h.fresh())
        taken += len(tracker.refs) == 2 * len(h.targets)  # student + teacher, every target
        leaked_steps += tracker.alive() > 0
        store_left += capture.calls != {}
    if taken != steps:
        raise RuntimeError(
            f"the shim's window handed features to the loss in {taken} of {steps} steps: "
            "the run did not exercise vision KD"
        )
    fitted = [sample for sample in samples if sample[0] >= warmup]
    return {
        "samples": samples,
        "tensors": tensors,
        "rss_slope": slope([(step, rss) for step, rss, _ in fitted]),
        "heap_slope": slope([(step, heap) for step, _, heap in fitted]),
        "leaked_steps": leaked_steps,
        "store_left": store_left,
        "step_bytes": tracker.step_bytes,
    }


def render(opts, h: bench_step.Harness, info: dict, result: dict, control: dict) -> str:
    samples, tensors = result["samples"], result["tensors"]
    mib = 2**20
    at = {step: (rss, heap) for step, rss, heap in samples}
    marks = (0, opts.warmup, opts.steps)
    step_bytes = result["step_bytes"]
    # Flat: neither measure grows by a tenth of one step's features per step (a leak of them would be 100 %).
    flat = all(abs(result[k]) < 0.1 * step_bytes for k in ("rss_slope", "heap_slope"))
    clean = result["leaked_steps"] == 0 and result["store_left"] == 0
    after_warmup = [n for (step, _, _), n in zip(samples, tensors, strict=True) if step >= opts.warmup]
    # The control must be caught on both counts, or the checks above would prove nothing.
    caught = control["leaked_steps"] == opts.control_steps and control["heap_slope"] >= 0.5 * control["step_bytes"]

    def row(label: str, index: int, key: str) -> str:
        values = " / ".join(f"{at[m][index] / mib:.1f}" for m in marks)
        per_step = result[key]
        return (
            f"| {label} | {values} MiB | {per_step:+.1f} bytes/step ({per_step * 1000 / mib:+.3f} MiB per "
            f"1000 steps; {abs(per_step) / step_bytes * 100:.1f} % of one step's features) |"
        )

    return "\n".join(
        [
            MARK_BEGIN,
            "## Memory over a long run",
            "",
            f"Command: `python tests/benchmarks/bench_memory.py --steps {opts.steps}"
            f"{f' --threads {opts.threads}' if opts.threads else ''}`. "
            f"Date {datetime.datetime.now(datetime.timezone.utc).date()}.",
            f"Machine: {bench_step.machine(False)}; torch threads {h.torch.get_num_threads()}. "
            f"Versions: {bench_step.versions()}.",
            "A real ms-swift `GKDTrainer` with the shim active (tiny model, float32, LoRA, aligner "
            f"unfrozen); micro-batch of {info['rows']} row, {info['images']} image of {opts.image_px}² px, "
            f"{info['tokens']} tokens of which {info['visual_tokens']} visual; each step is the patched "
            f"`compute_loss` + backward + optimizer step; the metric buffer is flushed every {opts.every} "
            f"steps as `trainer.log` does. Every {opts.every} steps, after `gc.collect()` and "
            "`malloc_trim(0)`: RSS (`VmRSS`) and the bytes held by live allocations (glibc `mallinfo2`: "
            f"heap in use + mmapped). Slopes are least-squares fits over steps {opts.warmup}–{opts.steps} "
            "(the first steps create optimizer state and warm caches).",
            "",
            f"| | at step {' / '.join(map(str, marks))} | slope |",
            "|---|---|---|",
            row("RSS", 0, "rss_slope"),
            row("bytes held by live allocations", 1, "heap_slope"),
            "",
            f"- Features one step captures (student + teacher, every target): {step_bytes:,} bytes.",
            f"- Live torch tensors (gc): {tensors[0]} before the first step; between {min(after_warmup)} and "
            f"{max(after_warmup)} from step {opts.warmup} on; {tensors[-1]} at the end.",
            f"- Steps whose captured features were still alive after the step (weak references): "
            f"{result['leaked_steps']} of {opts.steps}.",
            f"- Steps after which the capture store was not empty: {result['store_left']} of {opts.steps}.",
            f"- Negative control, in the same process afterwards: {opts.control_steps} steps whose `take()` "
            f"keeps its features, as a leak would: {control['leaked_steps']} of {opts.control_steps} steps "
            f"flagged, live tensors {control['tensors'][0]} → {control['tensors'][-1]}, bytes held by live "
            f"allocations {control['heap_slope']:+,.0f} bytes/step "
            f"({control['heap_slope'] / control['step_bytes'] * 100:.0f} % of one step's features).",
            "",
            f"Reading: {'flat' if flat else 'NOT flat'} (flat: each slope under 10 % of one step's captured "
            "features, i.e. not even one step in ten could be keeping them); "
            + (
                "no window's tensors outlived their step and the store was empty after every window."
                if clean
                else "SOME WINDOW STATE OUTLIVED ITS STEP (see above)."
            )
            + (
                " The negative control was caught, so these checks can see a leak."
                if caught
                else " THE NEGATIVE CONTROL WAS NOT CAUGHT: the checks above prove nothing."
            ),
            MARK_END,
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=50, help="RSS sample and metric flush interval")
    parser.add_argument("--warmup", type=int, default=100, help="steps left out of the slope fit")
    parser.add_argument("--image-px", type=int, default=224)
    parser.add_argument("--control-steps", type=int, default=40, help="steps of the leaking control")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "vkd-bench")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "BENCHMARKS.md")
    opts = parser.parse_args()
    opts.work.mkdir(parents=True, exist_ok=True)

    bench_step.prepare_environment("cpu", opts.work)
    import torch

    if opts.threads:
        torch.set_num_threads(opts.threads)
    # One row, one image: the smallest visual micro-batch keeps 1000 steps short.
    preset = dataclasses.replace(bench_step.PRESETS["tiny"], rows=1, image_px=opts.image_px)
    assets = bench_step.build_assets(opts.work, "tiny", preset, "cpu")
    h = bench_step.Harness(bench_step.build_trainer(assets, preset, opts.work / "memory"))
    result = run(h, opts.steps, opts.every, opts.warmup)
    logged = h.trainer.custom_metrics["train"][bench_step.METRIC_LOSS].count
    if logged != opts.steps:
        raise RuntimeError(f"the shim logged its term for {logged} of {opts.steps} steps; see events.jsonl")
    control = run(h, opts.control_steps, 5, 0, keep=[])
    section = render(opts, h, h.describe(), result, control)
    print(section)
    bench_startup.write_section(opts.out, section, begin=MARK_BEGIN, end=MARK_END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
