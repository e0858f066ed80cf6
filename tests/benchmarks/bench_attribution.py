"""The shim's own cost per training step, attributed operator by operator with torch's profiler (CPU).

Whole-step timings (``bench_step.py``) compare noisy steps; this measures only the work the shim adds,
inside one profiled step, so machine noise hardly touches it. A real ms-swift ``GKDTrainer`` with the
shim active (built as in ``bench_step.py``) runs warm steps, then profiled steps of the patched
``compute_loss`` + backward + optimizer step + the log-time flush of the metric buffer.

Forward side: during the profiled steps the shim's functions are wrapped by dotted path
(``shim_points``) in ``torch.profiler.record_function("vkd::<part>")`` ranges: the hook body
(``capture._record``), ``FeatureCapture.take``, the distance (``runtime.vision_kd_loss``), the metric
buffer (``MetricBuffer.add``), the log-time ``TrainerKD.flush`` and the rest of
``TrainerKD.compute_loss`` (window, roles, tally, adding the term), with ms-swift's original
``compute_loss`` inside it in a ``swift::compute_loss`` range that is not the shim's. Each profiler
event belongs to its nearest enclosing range. Reported per part: the self CPU time of the operators it
owns, and the wall time of its ranges minus the ranges nested in them (host time: Python included),
less the profiler's own cost of a range, measured in the same run.

Backward side: the autograd nodes the shim created, found by sequence number. Around each shim range
the bench creates a probe node (outside every shim range) to read the thread's autograd sequence
counter; after the forward it walks the graph back from the loss and keeps the nodes whose sequence
number falls in a shim interval and outside ms-swift's. Backward events
(``autograd::engine::evaluate_function: *``) carry their node's forward sequence number: their time
is the shim's backward. The profiler-only variant (the sequence numbers of all autograd-recording
operators inside a ``vkd::`` range) is computed beside it as a cross-check.

Control: a variant whose distance is computed three times (the mean of three identical calls, so the
value, the gradient and the training are unchanged) must show about three times the distance's
attributed cost, forward and backward; the measured ratio is reported, as is and with one untimed
call first (outside every range), so that the single call runs on caches as warm as the repeated ones.
Writes one block per model of the attribution section of ``docs/BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path

import bench_startup  # this script's own directory is on sys.path when it runs
import bench_step
import shim_points

MARK_BEGIN = "<!-- attribution:begin -->"
MARK_END = "<!-- attribution:end -->"
RUN_MARK = "<!-- attribution:run {key} -->"
SHIM = "vkd::"
SWIFT = "swift::compute_loss"
BENCH = "bench::"
STEP = "bench::step"
BACKWARD = "autograd::engine::evaluate_function: "
PARTS = ("hook", "take", "distance", "buffer", "compute_loss", "flush")
PART_TEXT = {
    "hook": "hook bodies (`capture._record`)",
    "take": "`FeatureCapture.take`",
    "distance": "distance (`vision_kd_loss`)",
    "buffer": "`MetricBuffer.add`",
    "compute_loss": "rest of `TrainerKD.compute_loss` (window, roles, tally, term add)",
    "flush": "`TrainerKD.flush` (log time)",
}
CONTROL = "mse x3"
WARM = "mse, warm"
WARM_CONTROL = "mse x3, warm"
#: label -> (distance, calls, warm): the controls. `calls` identical distances, their mean returned (value and
#: gradient unchanged); `warm`: one more call first, outside every shim range, so that every attributed call
#: finds caches as warm as the repeated calls of the x3 variant do.
CONTROLS = {CONTROL: ("mse", 3, False), WARM: ("mse", 1, True), WARM_CONTROL: ("mse", 3, True)}


# --- instrumentation -------------------------------------------------------------------------------


class Recorder:
    """Wraps the shim's points in profiler ranges and records the autograd sequence intervals of each.

    An interval is (counter before, counter after) on the calling thread, read by creating one probe
    node outside the shim's ranges; a node created inside has a sequence number strictly between.
    """

    def __init__(self, torch, calls: int = 1, warm: bool = False) -> None:
        self.torch = torch
        self.calls = calls
        self.warm = warm
        self.leaf = torch.zeros((), requires_grad=True)
        self.intervals: list[tuple[str, int, int]] = []
        self.nodes: dict[int, str] = {}  # sequence number -> part, of the nodes the shim created
        self.cpu: dict[str, int] = {}  # part -> thread CPU time (ns) inside its calls, range included

    def probe(self) -> int:
        with self.torch.profiler.record_function("bench::probe"), self.torch.enable_grad():
            return (self.leaf * 1).grad_fn._sequence_nr()

    def wrap(self, label: str, original):
        record_function = self.torch.profiler.record_function
        name = SHIM + label
        single = original
        if label == "distance" and self.calls > 1:

            def original(*args, **kwargs):  # the control: identical distances, their mean
                outs = [single(*args, **kwargs) for _ in range(self.calls)]
                total = outs[0].total
                for out in outs[1:]:
                    total = total + out.total
                return dataclasses.replace(outs[-1], total=total / self.calls)

        if label == "compute_loss":

            def compute_loss(kd, wrapped, args, kwargs):
                def swift_compute_loss(*a, **k):
                    before = self.probe()
                    try:
                        with record_function(SWIFT):
                            return wrapped(*a, **k)
                    finally:
                        self.intervals.append(("swift", before, self.probe()))

                before = self.probe()
                with record_function(name):
                    result = original(kd, swift_compute_loss, args, kwargs)
                self.intervals.append((label, before, self.probe()))
                with record_function("bench::graph"):
                    self.collect(result)
                return result

            return compute_loss

        def ranged(*args, **kwargs):
            if self.warm and label == "distance":
                with record_function("bench::warm"):
                    single(*args, **kwargs)  # its graph is dropped: no backward either
            before = self.probe()
            start = time.thread_time_ns()
            try:
                with record_function(name):
                    return original(*args, **kwargs)
            finally:
                # This thread's CPU time: unlike the profiler's wall times, it excludes the time the
                # thread sat descheduled (on 2 shared cores, often milliseconds inside one operator).
                self.cpu[label] = self.cpu.get(label, 0) + time.thread_time_ns() - start
                self.intervals.append((label, before, self.probe()))

        return ranged

    def part_of(self, sequence_nr: int) -> str | None:
        """The innermost interval holding a node: ms-swift's ('swift') or a shim part."""
        best = None
        for label, before, after in self.intervals:
            if before < sequence_nr < after and (best is None or after - before < best[1] - best[0]):
                best = (before, after, label)
        return None if best is None else best[2]

    def collect(self, loss) -> None:
        """Walk back from the loss through nodes the shim created; ms-swift's nodes end the walk
        (every shim node is created after ms-swift's compute_loss returned, so none lies behind one)."""
        root = loss[0] if isinstance(loss, tuple) else loss
        stack = [root.grad_fn] if getattr(root, "grad_fn", None) is not None else []
        seen = set()
        while stack:
            node = stack.pop()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            part = self.part_of(node._sequence_nr())
            if part is None or part == "swift":
                continue
            self.nodes[node._sequence_nr()] = part
            stack.extend(next_node for next_node, _ in node.next_functions)

    def reset(self) -> None:
        self.intervals.clear()
        self.nodes.clear()
        self.cpu.clear()


def calibrate(torch, count: int = 2000) -> dict:
    """Under the profiler: what one empty range costs inside itself and in the time around it."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("bench::calibrate-empty"):
            pass
        with record_function("bench::calibrate"):
            start = time.perf_counter()
            for _ in range(count):
                with record_function(SHIM + "calibrate"):
                    pass
            loop = time.perf_counter() - start
    events = [e for e in prof.events() if e.name == SHIM + "calibrate"]
    inside = statistics.fmean(e.cpu_time_total for e in events)  # µs
    return {"inside_us": inside, "per_range_us": loop / count * 1e6, "count": count}


# --- analysis --------------------------------------------------------------------------------------


def marker(event) -> bool:
    return event.name.startswith((SHIM, SWIFT, BENCH))


def owner(event, cache: dict):
    """The nearest enclosing range (a marker) of an event, or None."""
    chain = []
    current = event.cpu_parent
    found = None
    while current is not None:
        if id(current) in cache:
            found = cache[id(current)]
            break
        if marker(current):
            found = current
            break
        chain.append(current)
        current = current.cpu_parent
    for link in chain:
        cache[id(link)] = found
    return found


def analyse(events, recorder: Recorder, calibration: dict) -> dict:
    """One profiled step: step time, and per shim part its operators' self time, its ranges' exclusive
    wall time (less the range cost) and its backward nodes' time."""
    step = next(e for e in events if e.name == STEP)
    thread = step.thread
    cache: dict[int, object] = {}
    ops = dict.fromkeys(PARTS, 0.0)
    wall = dict.fromkeys(PARTS, 0.0)
    ranges = dict.fromkeys(PARTS, 0)
    # A range's cost lies partly inside it (`inside`) and partly around it, charged to its parent.
    per_range, inside = calibration["per_range_us"], calibration["inside_us"]
    outside = max(0.0, per_range - inside)
    bookkeeping = 0.0
    markers = bench_markers = 0
    profiler_seqs: set[int] = set()
    distance_ops: dict[str, float] = {}
    backward_events = []
    for event in events:
        if event.thread != thread and event.fwd_thread != thread:
            continue
        if event.name.startswith(BACKWARD):
            backward_events.append(event)
        if marker(event):
            if event.name == STEP:
                continue
            parent = owner(event, cache)
            if event.name.startswith(BENCH):
                # The bench's own probes and graph walks are neither the shim's nor the step's.
                if parent is None or parent.name == STEP or not parent.name.startswith(BENCH):
                    bookkeeping += event.cpu_time_total
                    bench_markers += 1
                continue
            markers += 1
            children = [c for c in event.cpu_children if marker(c)]
            exclusive = (
                event.cpu_time_total - sum(c.cpu_time_total for c in children) - inside - len(children) * outside
            )
            if event.name.startswith(SHIM):
                part = event.name[len(SHIM) :]
                wall[part] += max(0.0, exclusive)
                ranges[part] += 1
            continue
        parent = owner(event, cache)
        if parent is not None and parent.name.startswith(SHIM):
            part = parent.name[len(SHIM) :]
            ops[part] += event.self_cpu_time_total
            if part == "distance":
                distance_ops[event.name] = distance_ops.get(event.name, 0.0) + event.self_cpu_time_total
            if event.sequence_nr >= 0 and event.fwd_thread == 0:
                profiler_seqs.add(event.sequence_nr)
    backward = dict.fromkeys(PARTS, 0.0)
    backward_profiler = 0.0
    for event in backward_events:
        if event.fwd_thread != thread:
            continue
        part = recorder.nodes.get(event.sequence_nr)
        if part is not None:
            backward[part] += event.cpu_time_total
        if event.sequence_nr in profiler_seqs:
            backward_profiler += event.cpu_time_total
    step_us = step.cpu_time_total - bookkeeping - markers * per_range - bench_markers * outside
    return {
        "step_us": step_us,
        "ops": ops,
        "wall": wall,
        "ranges": ranges,
        "backward": backward,
        "backward_profiler": backward_profiler,
        "nodes": len(recorder.nodes),
        "profiler_seqs": len(profiler_seqs),
        "bookkeeping_us": bookkeeping,
        "markers": markers,
        "distance_ops": distance_ops,
        "thread_cpu": {part: max(0.0, recorder.cpu.get(part, 0) / 1e3 - ranges[part] * per_range) for part in PARTS},
    }


# --- the run ---------------------------------------------------------------------------------------


def set_distance(h: bench_step.Harness, distance: str) -> None:
    """Switch the trainer's distance through the validating config path (the config is frozen)."""
    from vkd_shim.config import from_block

    h.kd.config = from_block({**h.kd.config.to_dict(), "distance": distance}, "bench_attribution")[0]


def profiled_step(h: bench_step.Harness, recorder: Recorder, calibration: dict) -> dict:
    from torch.profiler import ProfilerActivity, profile, record_function

    recorder.reset()
    inputs = h.fresh()
    with shim_points.instrumented(recorder.wrap):
        shim_points.reattach(h.kd.capture)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof, record_function(STEP):
            h.step("shim", inputs)
            h.kd.flush("train")
    shim_points.reattach(h.kd.capture)  # back to the unwrapped hook body
    return analyse(prof.events(), recorder, calibration)


def run(h: bench_step.Harness, warm: int, steps: int, distances: tuple[str, ...]) -> dict:
    torch = h.torch
    h.set_mode("shim")
    plain = []
    for _ in range(warm):
        inputs = h.fresh()
        start = time.perf_counter()
        h.step("shim", inputs)
        h.kd.flush("train")
        plain.append(time.perf_counter() - start)
    calibration = calibrate(torch)
    variants = [*((d, d, 1, False) for d in distances), *((label, *spec) for label, spec in CONTROLS.items())]
    results: dict[str, list[dict]] = {label: [] for label, *_ in variants}
    for _ in range(steps):  # variants interleaved, so drift hits all alike
        for label, distance, calls, warm_call in variants:
            set_distance(h, distance)
            results[label].append(profiled_step(h, Recorder(torch, calls=calls, warm=warm_call), calibration))
    set_distance(h, bench_step.VKD_BLOCK["distance"])
    metrics = h.trainer.custom_metrics["train"]
    expected = warm + steps * len(variants)
    if metrics[bench_step.METRIC_LOSS].count != expected or metrics["vision_kd/skipped"].state != 0:
        raise RuntimeError(
            f"the shim added its term in {metrics[bench_step.METRIC_LOSS].count} of {expected} steps; see events.jsonl"
        )
    return {"plain": plain, "calibration": calibration, "results": results}


def summarize(samples: list[dict]) -> dict:
    """One variant's estimates (ms): per part, the minimum over the profiled steps.

    On shared cores a thread is often descheduled for milliseconds inside one operator, and the
    profiler's times are wall times: a median over a handful of steps still carries such stalls, the
    minimum is the least disturbed estimate of each part. Totals are sums of the parts' minima.
    """

    def low(get) -> float:
        return min(get(s) for s in samples) / 1e3

    parts = {
        part: {
            "wall": low(lambda s, p=part: s["wall"][p]),
            "ops": low(lambda s, p=part: s["ops"][p]),
            "backward": low(lambda s, p=part: s["backward"][p]),
            "cpu": low(lambda s, p=part: s["thread_cpu"][p]),
        }
        for part in PARTS
    }
    summary = {
        "parts": parts,
        "step": low(lambda s: s["step_us"]),
        "step_median": statistics.median(s["step_us"] for s in samples) / 1e3,
        "forward_ops": sum(p["ops"] for p in parts.values()),
        "forward": sum(p["wall"] for p in parts.values()),
        "backward": sum(p["backward"] for p in parts.values()),
        "backward_profiler": low(lambda s: s["backward_profiler"]),
        "backward_graph": low(lambda s: sum(s["backward"].values())),
        "nodes": statistics.median(s["nodes"] for s in samples),
        "profiler_seqs": statistics.median(s["profiler_seqs"] for s in samples),
    }
    summary["shim"] = summary["forward"] + summary["backward"]
    summary["fraction"] = summary["shim"] / summary["step"]
    distance = parts["distance"]
    summary["distance"] = distance["wall"] + distance["backward"]
    summary["distance_forward"] = distance["wall"]
    summary["distance_backward"] = distance["backward"]
    summary["distance_ops"] = distance["ops"]
    summary["distance_cpu"] = distance["cpu"]
    return summary


# --- report ----------------------------------------------------------------------------------------


def render(opts, h: bench_step.Harness, info: dict, measured: dict) -> str:
    preset = bench_step.PRESETS[opts.model]
    calibration = measured["calibration"]
    summaries = {label: summarize(samples) for label, samples in measured["results"].items()}
    distances = [label for label in summaries if label not in CONTROLS]
    lines = [
        f"### CPU, model `{opts.model}` ({preset.note}, {preset.dtype})",
        "",
        f"Command: `python tests/benchmarks/bench_attribution.py --model {opts.model} --steps {opts.steps} "
        f"--warm {opts.warm}{f' --threads {opts.threads}' if opts.threads else ''}`. "
        f"Date {datetime.datetime.now(datetime.timezone.utc).date()}.",
        f"Machine: {bench_step.machine(False)}; torch threads {h.torch.get_num_threads()}. "
        f"Versions: {bench_step.versions()}.",
        f"Micro-batch: {info['rows']} rows, {info['images']} images of {preset.image_px}² px, {info['tokens']} "
        f"tokens of which {info['visual_tokens']} visual; targets {', '.join(info['targets'])}; weight "
        f"{bench_step.VKD_BLOCK['weight']}; gradient checkpointing "
        f"{'on' if info['gradient_checkpointing'] else 'off'}. "
        f"{opts.warm} warm steps (median {statistics.median(measured['plain']) * 1e3:.0f} ms unprofiled), then "
        f"{opts.steps} profiled steps per variant, variants interleaved; each part's minimum over those steps "
        "(see the method above), totals are sums of those minima. A step is "
        "`compute_loss` + backward + optimizer step + the log-time flush (as with `--logging_steps 1`).",
        f"Profiler cost of one range, measured in this run: {calibration['per_range_us']:.1f} µs of wall time "
        f"({calibration['inside_us']:.1f} µs inside it); subtracted per range from the shim's wall times and "
        "from the step.",
        "",
        "| distance | step (ms, profiled; min / median) | shim forward, ops (ms) | shim forward, wall (ms) "
        "| shim backward (ms) | shim total (ms) | fraction of the step |",
        "|---|---|---|---|---|---|---|",
    ]
    for label in distances:
        s = summaries[label]
        lines.append(
            f"| {label} | {s['step']:.1f} / {s['step_median']:.1f} | {s['forward_ops']:.3f} | {s['forward']:.3f} "
            f"| {s['backward']:.3f} "
            f"| {s['shim']:.3f} | {s['fraction'] * 100:.3f} % |"
        )
    lines += ["", "Per part (ms, minimum over the profiled steps; forward wall / forward ops / backward):", ""]
    lines += ["| part | " + " | ".join(distances) + " |", "|---|" + "---|" * len(distances)]
    for part in PARTS:
        cells = []
        for label in distances:
            p = summaries[label]["parts"][part]
            cells.append(f"{p['wall']:.3f} / {p['ops']:.3f} / {p['backward']:.3f}")
        lines.append(f"| {PART_TEXT[part]} | " + " | ".join(cells) + " |")
    base = summaries["mse"]

    def ratios(control: dict, reference: dict) -> str:
        def ratio(key: str) -> str:
            return f"{control[key] / reference[key]:.2f}" if reference[key] > 0 else "n/a"

        return (
            f"{control['distance']:.3f} ms against {reference['distance']:.3f} ms, ratio **{ratio('distance')}** "
            f"(forward wall {ratio('distance_forward')}, forward ops {ratio('distance_ops')}, backward "
            f"{ratio('distance_backward')}; this thread's CPU clock inside the distance's calls, which "
            f"descheduling does not advance: {ratio('distance_cpu')})"
        )

    lines += [
        "",
        f"Control: the distance computed three times (mean returned; value and gradient unchanged), attributed "
        f"distance cost {ratios(summaries[CONTROL], base)}. With one untimed call first, outside every shim range, "
        f"so that every attributed call runs on warm caches: {ratios(summaries[WARM_CONTROL], summaries[WARM])}. "
        "Expected ≈ 3 (a little above: two adds and a division); a cold-cache cost paid once per step by the "
        "first call shows as the gap between the two ratios.",
        f"Backward cross-check: {base['nodes']:.0f} shim autograd nodes found by the graph walk; the profiler-only "
        f"method (sequence numbers of the autograd-recording ops inside `vkd::` ranges: {base['profiler_seqs']:.0f}) "
        f"gives {base['backward_profiler']:.3f} ms of backward against {base['backward_graph']:.3f} ms (mse, "
        "minimum over steps of each method's total).",
    ]
    return "\n".join(lines)


def merge_section(path: Path, key: str, block: str) -> str:
    blocks = {**bench_startup.run_blocks(path, MARK_BEGIN, MARK_END, RUN_MARK), key: block}
    header = [
        MARK_BEGIN,
        "## The shim's own cost, attributed with the profiler (CPU)",
        "",
        "Method (`tests/benchmarks/bench_attribution.py`, see its docstring): one real ms-swift `GKDTrainer` "
        "with the shim active, profiled with `torch.profiler` (CPU) step by step. The shim's functions are "
        "wrapped by dotted path in `record_function('vkd::<part>')` ranges: the hook body, `take`, the "
        "distance, `MetricBuffer.add`, the log-time flush and the rest of `TrainerKD.compute_loss`, with "
        "ms-swift's own `compute_loss` inside it in a range of its own that is not the shim's. Forward: "
        "each event belongs to its nearest enclosing range; *ops* is the self CPU time of the operators in "
        "shim ranges, *wall* the ranges' exclusive wall time (Python included), less the profiler's cost "
        "of a range, measured in the same run. Backward: the autograd nodes the shim created, identified by "
        "sequence number (probe nodes read the autograd counter around each range; a walk from the loss "
        "keeps the nodes created inside a shim range), and the time of the backward events that carry "
        "those sequence numbers. *Shim total* = forward wall + backward; the step is the profiled step "
        "less the benchmark's own bookkeeping and range costs. Control: the distance computed three "
        "times must show about three times the distance's attributed cost; it runs twice, as is and after one "
        "untimed call outside every shim range (so that the 1x and the 3x variants both run on warm caches). "
        "Estimates are each part's minimum over the profiled steps: on 2 shared cores the thread is often "
        "descheduled for milliseconds inside one operator, which a median of a few steps still carries. "
        "Not attributed: PyTorch's "
        "hook dispatch in `Module.__call__` (Python only, no operator) and the wrapt wrapper of "
        "`compute_loss`. Profiling inflates every operator's time a little; the fraction compares "
        "profiled times with profiled times.",
        "",
    ]
    return bench_startup.assemble(header, blocks, RUN_MARK, MARK_END)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "small"), default="tiny")
    parser.add_argument("--steps", type=int, default=5, help="profiled steps per variant")
    parser.add_argument("--warm", type=int, default=3, help="unprofiled warm steps first")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "vkd-bench")
    parser.add_argument("--out", type=Path, default=bench_step.REPO / "docs" / "BENCHMARKS.md")
    parser.add_argument("--debug", action="store_true", help="print the distance's top operators per variant")
    opts = parser.parse_args()
    opts.work.mkdir(parents=True, exist_ok=True)

    bench_step.prepare_environment("cpu", opts.work)
    import torch

    from vkd_shim.loss import DISTANCES

    if opts.threads:
        torch.set_num_threads(opts.threads)
    preset = bench_step.PRESETS[opts.model]
    assets = bench_step.build_assets(opts.work, opts.model, preset, "cpu")
    h = bench_step.Harness(bench_step.build_trainer(assets, preset, opts.work / f"attribution-{opts.model}"))
    info = h.describe()
    measured = run(h, opts.warm, opts.steps, tuple(DISTANCES))
    block = render(opts, h, info, measured)
    if opts.debug:
        for label, samples in measured["results"].items():
            totals: dict[str, float] = {}
            for sample in samples:
                for name, us in sample["distance_ops"].items():
                    totals[name] = totals.get(name, 0.0) + us / len(samples)
            top = sorted(totals.items(), key=lambda item: -item[1])[:12]
            print(label, " ".join(f"{name}={us:.0f}us" for name, us in top), file=sys.stderr)
            print(label, "distance ops per step (us):", [round(x["ops"]["distance"]) for x in samples], file=sys.stderr)
    section = merge_section(opts.out, f"cpu/{opts.model}", block)
    print(section)
    bench_startup.write_section(opts.out, section, begin=MARK_BEGIN, end=MARK_END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
