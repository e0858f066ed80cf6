"""Effect experiment, vision shift: when Stage 3 can only learn its new images by moving the vision pathway,
does anchoring that pathway to the teacher keep more of the old domain than leaving it free, while learning
more of the new one than freezing it?

``effect_experiment.py`` (docs/EFFECT.md) asked the student to change how it *writes* a box; OOD grounding
stayed at the teacher's level in every arm. Here the answers keep the teacher's (legacy) syntax and only the
imagery changes, to a domain chosen by a calibration on the unanchored arms alone (vision pathway frozen vs
free, several seeds) such that the frozen student stays near the teacher's OOD grounding and the free one
rises well above it. The same teacher recipe, scenes, launches (``vkd-run`` with the shipped configs) and
evaluation code are imported from ``effect_experiment``.

Arms (every one through the same launcher, configs and evaluation): the vision pathway frozen (ms-swift's
defaults); free (``VKD_MODE=monitor``, no term); anchored with the term asked for as a share of the GKD part
of the loss (``VKD_SHARE``); with the trainable ViT, the best anchor with the ``vit`` target too; and an
on-policy pair (``--lmbda 0.5``) of free vs the best anchor. Runs, scores and the teacher live under
``--work``; ``--report`` writes the generated block of ``docs/EFFECT_SHIFT.md`` and ``docs/img/effect_shift_*``::

    python tests/benchmarks/effect_vision_shift.py --work $WORK --probe-teacher          # teacher on candidates
    python tests/benchmarks/effect_vision_shift.py --work $WORK --arms frozen free --seeds 42 43 44
    python tests/benchmarks/effect_vision_shift.py --work $WORK --report --out docs/
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import bench_startup  # this script's own directory is on sys.path when it runs
import effect_experiment as fx

from vkd_shim.testing import launch

MARK_BEGIN = "<!-- effect-shift:begin -->"
MARK_END = "<!-- effect-shift:end -->"

# --- scenes: candidate out-of-domain imagery -----------------------------------------------------------
#
# Every candidate keeps the teacher's task and geometry (one object filling one of the 3 x 3 cells of a
# 96 x 96 image, "Locate the object.", the teacher's legacy box syntax in the answers): only how the
# image looks changes, so what Stage 3 has to learn is to see, not to write.

GREY = (128, 128, 128)


def _checker(size: int, period: int) -> Any:
    import numpy as np

    index = np.arange(size) // period
    return (np.add.outer(index, index) % 2).astype(bool)


def draw_shift(rng, cell: int | None, out_of_domain: bool, *, domain: str) -> tuple[Any, tuple | None, str | None]:
    """One scene of candidate domain `domain` (signature of ``effect_experiment.draw_scene``).

    - ``inverted``: the teacher's palette swapped: a saturated background, the object in one of the
      teacher's background colours (white, light grey, near black).
    - ``faint``: the teacher's scenes at 15 % contrast: the object's colour is 15 % of the way from the
      background to the teacher's colour.
    - ``texture``: the object differs from a mid-grey background only in texture: a 2-pixel black-and-white
      checkerboard of the same mean.
    - ``noisy``: the first experiment's OOD backgrounds with twice the noise (sd 80), teacher's rectangles.
    """
    import numpy as np
    from PIL import Image, ImageDraw

    size, grid, cell_px = fx.SIZE, fx.GRID, fx.CELL
    name = rng.choice(sorted(fx.COLOURS))
    if domain == "inverted":
        background, fill = fx.COLOURS[name], rng.choice(fx.PLAIN_BACKGROUNDS)
    elif domain == "faint":
        background = rng.choice(fx.PLAIN_BACKGROUNDS)
        fill = tuple(round(b + 0.15 * (c - b)) for b, c in zip(background, fx.COLOURS[name], strict=True))
    elif domain == "texture":
        background, fill = GREY, None
    elif domain == "noisy":
        background, fill = rng.choice(fx.OOD_BACKGROUNDS), fx.COLOURS[name]
    else:
        raise ValueError(f"unknown domain {domain!r}; known: {', '.join(DOMAINS)}")
    pixels = np.zeros((size, size, 3)) + np.asarray(background, dtype=np.float64)
    if domain == "noisy":
        pixels += np.random.default_rng(rng.randrange(2**31)).normal(0.0, 80.0, (size, size, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if cell is None:
        return image, None, None
    col, row = cell % grid, cell // grid
    box = (col * cell_px, row * cell_px, (col + 1) * cell_px, (row + 1) * cell_px)
    inner = (box[0] + 3, box[1] + 3, box[2] - 4, box[3] - 4)
    if fill is None:
        array = np.asarray(image).copy()
        patch = _checker(inner[2] - inner[0] + 1, 2)
        array[inner[1] : inner[3] + 1, inner[0] : inner[2] + 1] = np.where(patch[..., None], 255, 0)
        return Image.fromarray(array), box, "checker"
    ImageDraw.Draw(image).rectangle(inner, fill=tuple(fill))
    return image, box, name


DOMAINS = ("inverted", "faint", "texture", "noisy")

# --- recipe: chosen by the calibration (docs/EFFECT_SHIFT.md) -------------------------------------------

DOMAIN = "texture"
STAGE3_ROWS = 192
STAGE3_STEPS = 60
STAGE3_LR = "3e-3"
#: Whether the free and anchored arms also train the ViT (--freeze_vit false: LoRA on its blocks' linears).
VIT_FREE = True
#: Held-out sets: 8 object images per cell, in and out of domain (one image is 1/72 = 0.014).
EVAL_OBJECTS = 72
SEEDS = (42, 43, 44, 45, 46)
#: The anchor's strength as a share of the GKD part of the loss (VKD_SHARE): 1 %, 10 %, 100 %.
SHARES = (0.01, 0.1, 1.0)
#: The shipped recipe's targets (merger 1, deepstack 0.5), plus the ViT output for the vit arm.
VIT_TARGETS = "merger:1,deepstack:0.5,vit:1"
TARGETS = (*fx.TARGETS, "vit")
#: Greedy decoding is the only source of a grounding number; corner (the answer's first two numbers are the
#: object's top-left corner) is the primary one, as on docs/EFFECT.md; exact box is reported beside it.
PRIMARY = "corner"

# --- the criteria, fixed before any run ----------------------------------------------------------------

#: Calibration (unanchored arms only, >= 3 seeds): frozen stays near the teacher on OOD grounding (mean
#: within NEAR of the teacher's), free rises well above it (mean at least WELL_ABOVE above the teacher's, and
#: above frozen in every seed).
NEAR, WELL_ABOVE = 0.10, 0.25
#: The claim holds for an anchored arm when, paired by seed, it keeps more in-domain grounding than free AND
#: gains more OOD grounding than frozen, each "beyond the seed spread": the mean paired difference is positive,
#: larger than the standard deviation of the paired differences, and at most one seed disagrees in sign.
#: The best anchor (for the vit and on-policy arms) is the share with the largest min(mean in-domain gain over
#: free, mean OOD gain over frozen).


@dataclasses.dataclass(frozen=True)
class ShiftArm:
    """One Stage-3 arm: the shim's mode and share, its targets, the freezing flags and lmbda."""

    name: str
    label: str
    mode: str  # monitor (trains as without the shim) or anchor
    frozen: bool = False  # the vision pathway (aligner and ViT) frozen: ms-swift's defaults
    share: float | None = None  # VKD_SHARE; None on an anchor arm: the best share (resolved at run time)
    targets: str | None = None  # VKD_TARGETS, None: the shipped configs' merger + deepstack
    lmbda: str = "0"

    @property
    def freeze_aligner(self) -> bool:  # what effect_experiment.stage3_command reads
        return self.frozen

    @property
    def freeze_vit(self) -> bool:
        return self.frozen or not VIT_FREE


def all_arms() -> list[ShiftArm]:
    return [
        ShiftArm("frozen", "vision pathway frozen (monitored)", "monitor", frozen=True),
        ShiftArm("free", "free (monitored)", "monitor"),
        *(ShiftArm(f"share{s:g}", f"anchored, {s:.0%} of GKD", "anchor", share=s) for s in SHARES),
        ShiftArm("anchor-vit", "best anchor + vit target", "anchor", targets=VIT_TARGETS),
        ShiftArm("op-free", "on-policy: free (monitored)", "monitor", lmbda="0.5"),
        ShiftArm("op-anchor", "on-policy: best anchor", "anchor", lmbda="0.5"),
    ]


# --- data, teacher, runs -------------------------------------------------------------------------------


def shift_data(root: Path, domain: str) -> dict[str, Path]:
    """The domain's Stage-3 rows (legacy answers, no empty scene) and both held-out sets."""
    draw = functools.partial(draw_shift, domain=domain)
    paths = {
        "shift_train": root / f"{domain}_train.jsonl",
        "ood_eval": root / f"{domain}_eval.jsonl",
        "indomain_eval": root / "indomain_eval72.jsonl",
    }
    if not paths["shift_train"].exists():
        common = {"out_of_domain": True, "draw": draw, "ood_answer": fx.legacy_answer, "empty_every": 0}
        fx.write_split(root, f"{domain}_train", STAGE3_ROWS, seed=fx.SEED + 12, held_out=False, **common)
        fx.write_split(root, f"{domain}_eval", EVAL_OBJECTS, seed=fx.SEED + 13, held_out=True, **common)
    if not paths["indomain_eval"].exists():
        fx.write_split(root, "indomain_eval72", EVAL_OBJECTS, out_of_domain=False, seed=fx.SEED + 11, held_out=True)
    return paths


def teacher_models(work: Path, env: dict) -> dict[str, Any]:
    """effect_experiment's teacher (its recipe and data), trained once under --work and reused."""
    data_dir = work / "data"
    data = {n: data_dir / f"{n}.jsonl" for n in ("indomain_train", "indomain_eval", "ood_train", "ood_eval")}
    if not data["indomain_train"].exists():
        data = fx.build_data(data_dir, fx.SEED)
    return fx.train_teacher(work, data, fx.TEACHER_STEPS, env, reuse=True)


def setting(domain: str, lr: str, steps: int) -> str:
    return f"{domain}-lr{lr}-{steps}"


def best_share(work: Path) -> float | None:
    path = work / "best_share.json"
    return json.loads(path.read_text())["share"] if path.exists() else None


def shim_has_share() -> bool:
    """Whether the installed shim reads VKD_SHARE (issue 24 item 4): anchored arms need it."""
    import vkd_shim.config as config

    return "VKD_SHARE" in Path(config.__file__).read_text(encoding="utf-8")


def run_arm(work: Path, env: dict, teacher: dict, arm: ShiftArm, seed: int, opts) -> dict[str, Any]:
    set_name = setting(opts.domain, opts.lr, opts.steps)
    run_dir = work / "runs" / set_name / f"{arm.name}-s{seed}"
    data = shift_data(work / "data", opts.domain)
    arm_env = {"VKD_MODE": arm.mode}
    if arm.mode == "anchor":
        share = arm.share if arm.share is not None else best_share(work)
        if share is None:
            raise SystemExit(f"{arm.name}: no best share yet (run the share arms, then --pick-best)")
        if not shim_has_share():
            raise SystemExit("the installed vkd_shim has no VKD_SHARE yet: anchored arms wait for it")
        arm_env["VKD_SHARE"] = f"{share:g}"
    if arm.targets:
        arm_env["VKD_TARGETS"] = arm.targets
    command = fx.stage3_command(
        teacher["teacher"], teacher["student"], data, run_dir / "output", opts.steps, seed, arm, opts.lr,
        dataset="shift_train", freeze_vit=arm.freeze_vit, lmbda=arm.lmbda,
    )  # fmt: skip
    run = fx.launch_stage3(run_dir, arm.name, seed, command, arm_env, env, reuse=True)
    if arm.mode == "anchor" and not any("vision_kd/scale" in row for row in run["logs"]):
        raise RuntimeError(f"{arm.name} seed {seed}: no vision_kd/scale in logging.jsonl; see {run_dir}")
    run["setting"] = set_name
    return run


# --- evaluation ----------------------------------------------------------------------------------------


@functools.cache
def evaluator(teacher_dir: str, domain: str, data_dir: str) -> fx.Evaluator:
    data = shift_data(Path(data_dir), domain)
    return fx.Evaluator(Path(teacher_dir), data, targets=TARGETS)


def score_teacher(work: Path, teacher: dict, domain: str) -> dict[str, Any]:
    path = work / "scores" / f"teacher-{domain}.json"
    if not path.exists():
        ev = evaluator(str(teacher["teacher"]), domain, str(work / "data"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(ev.score(ev.teacher), default=str), encoding="utf-8")
    return json.loads(path.read_text(encoding="utf-8"))


def numbers(run: dict[str, Any], score: dict[str, Any]) -> dict[str, float | None]:
    logs = run["logs"]
    total, term = fx.tail_mean(logs, "loss"), fx.tail_mean(logs, "vision_kd_loss") or 0.0
    return {
        "indomain_corner": score["indomain"]["corner"],
        "indomain_exact": score["indomain"]["exact"],
        "ood_corner": score["ood"]["corner"],
        "ood_exact": score["ood"]["exact"],
        **{f"drift_{t}": score["drift"][t] for t in TARGETS},
        "train_drift_merger": fx.tail_mean(logs, "vision_kd/drift/merger"),
        "gkd": total - term,
        "term": term,
        "scale": fx.tail_mean(logs, "vision_kd/scale"),
        "nll": score["nll"],
        "jsd": score["jsd"],
        "seconds": run["seconds"],
    }


def evaluate_run(work: Path, teacher: dict, run: dict[str, Any], domain: str) -> dict[str, Any]:
    """Score a finished run once (greedy grounding in and out of domain, NLL, JSD, drift per target) and
    keep the record beside the run."""
    record_path = Path(run["checkpoint"]).parents[2] / "record.json"
    if record_path.exists():
        return json.loads(record_path.read_text(encoding="utf-8"))
    ev = evaluator(str(teacher["teacher"]), domain, str(work / "data"))
    score = ev.score(fx.student_engine(teacher["student"], run["checkpoint"]))
    record = {**run, "domain": domain, "score": score, "numbers": numbers(run, score)}
    record_path.write_text(json.dumps(record, default=str), encoding="utf-8")
    return record


# --- aggregation and the verdict -----------------------------------------------------------------------


def load_records(work: Path, set_name: str) -> dict[str, dict[int, dict[str, Any]]]:
    """Every scored run of one setting: {arm: {seed: record}}."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for path in sorted((work / "runs" / set_name).glob("*/record.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        out.setdefault(record["arm"], {})[int(record["seed"])] = record
    return out


def paired(records: dict, arm: str, base: str, key: str) -> dict[str, Any] | None:
    """(arm − base) within each seed both ran: mean, sd, per-seed values and how many share the mean's sign."""
    seeds = sorted(set(records.get(arm, {})) & set(records.get(base, {})))
    if not seeds:
        return None
    diffs = [records[arm][s]["numbers"][key] - records[base][s]["numbers"][key] for s in seeds]
    mean = statistics.fmean(diffs)
    sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    agree = sum((d > 0) == (mean > 0) and d != 0 for d in diffs)
    return {"mean": mean, "sd": sd, "diffs": diffs, "seeds": seeds, "agree": agree}


def beyond_spread(p: dict[str, Any] | None) -> bool:
    """The pre-declared test: positive mean, larger than the paired differences' sd, at most one seed against."""
    return bool(p) and p["mean"] > 0 and p["mean"] > p["sd"] and p["agree"] >= len(p["diffs"]) - 1


def verdict(records: dict, arm: str) -> dict[str, Any]:
    keep = paired(records, arm, "free", f"indomain_{PRIMARY}")
    gain = paired(records, arm, "frozen", f"ood_{PRIMARY}")
    return {"keep": keep, "gain": gain, "holds": beyond_spread(keep) and beyond_spread(gain)}


def pick_best(work: Path, set_name: str) -> float:
    """The pre-declared rule: the share with the largest min(mean in-domain gain over free, mean OOD gain
    over frozen), from the share arms' paired differences."""
    records = load_records(work, set_name)
    scored = {}
    for share in SHARES:
        v = verdict(records, f"share{share:g}")
        if v["keep"] and v["gain"]:
            scored[share] = min(v["keep"]["mean"], v["gain"]["mean"])
    if not scored:
        raise SystemExit("no share arm has been scored yet")
    share = max(scored, key=scored.get)
    (work / "best_share.json").write_text(json.dumps({"share": share, "scores": scored}), encoding="utf-8")
    return share


# --- report --------------------------------------------------------------------------------------------

#: (key, label): the per-run numbers of the arms table, mean ± sd over seeds.
COLUMNS = (
    ("indomain_corner", "in-domain corner"),
    ("indomain_exact", "in-domain exact"),
    ("ood_corner", "OOD corner"),
    ("ood_exact", "OOD exact"),
    *((f"drift_{t}", f"drift {t}") for t in TARGETS),
    ("train_drift_merger", "train drift merger"),
    ("gkd", "train GKD part"),
    ("scale", "vision_kd/scale"),
    ("nll", "held-out NLL"),
    ("jsd", "held-out JSD"),
    ("seconds", "wall s"),
)
SHARES_LABEL = "the term asked for as a share of the GKD part (`VKD_SHARE`)"


def stat_cell(values: list[float | None], key: str) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    s = fx.spread(values)
    if key.endswith(("corner", "exact")):
        return f"{s['mean']:.2f} ± {s['sd']:.2f}"
    if key == "seconds":
        return f"{s['mean']:.0f} ± {s['sd']:.0f}"
    return f"{fx.fmt(s['mean'])} ± {fx.fmt(s['sd'], 2)}"


def paired_cell(p: dict[str, Any] | None) -> str:
    if p is None:
        return "—"
    each = ", ".join(f"{d:+.2f}" for d in p["diffs"])
    return f"{p['mean']:+.3f} ± {p['sd']:.3f} ({each}; {p['agree']}/{len(p['diffs'])})"


def arm_label(arm: ShiftArm, records: dict) -> str:
    runs = list(records.get(arm.name, {}).values())
    share = runs[0]["env"].get("VKD_SHARE") if runs else None
    if arm.share is None and share is not None:
        return f"{arm.label} ({float(share):.0%})"
    return arm.label


def calibration_rows(work: Path, teacher_ood: dict[str, float]) -> list[str]:
    rows = [
        "| setting (domain, lr, steps) | teacher OOD corner | arm | seeds | OOD corner | in-domain corner | wall s "
        "| criterion |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for set_dir in sorted((work / "runs").glob("*")):
        records = load_records(work, set_dir.name)
        domain = set_dir.name.split("-lr")[0]
        base = teacher_ood.get(domain)
        for arm in ("frozen", "free"):
            runs = records.get(arm, {})
            if not runs:
                continue
            ood = [r["numbers"]["ood_corner"] for r in runs.values()]
            ind = [r["numbers"]["indomain_corner"] for r in runs.values()]
            secs = [r["numbers"]["seconds"] for r in runs.values()]
            mean = statistics.fmean(ood)
            if arm == "frozen":
                ok = abs(mean - base) <= NEAR
                test = f"near the teacher (within {NEAR:.2f}): {'met' if ok else 'not met'}"
            else:
                frozen = records.get("frozen", {})
                above = all(runs[s]["numbers"]["ood_corner"] > frozen[s]["numbers"]["ood_corner"] for s in frozen)
                ok = mean - base >= WELL_ABOVE and above
                test = f"well above (+{WELL_ABOVE:.2f}, every seed above frozen): {'met' if ok else 'not met'}"
                if not frozen:
                    test += " (frozen not run at this setting)"
            rows.append(
                f"| {set_dir.name} | {base:.2f} | {arm} | {', '.join(map(str, sorted(runs)))} | "
                f"{stat_cell(ood, 'ood_corner')} | {stat_cell(ind, 'indomain_corner')} | "
                f"{stat_cell(secs, 'seconds')} | {test} |"
            )
    return rows


def report(work: Path, opts) -> str:
    set_name = setting(opts.domain, opts.lr, opts.steps)
    records = load_records(work, set_name)
    arms = [a for a in all_arms() if a.name in records]
    teachers = {d: json.loads(p.read_text()) for d in DOMAINS if (p := work / "scores" / f"teacher-{d}.json").exists()}
    teacher = teachers[opts.domain]
    head = "| arm | " + " | ".join(label for _, label in COLUMNS) + " |"
    table = [head, "|---" * (len(COLUMNS) + 1) + "|"]
    t_cells = {
        "indomain_corner": f"{teacher['indomain']['corner']:.2f}",
        "indomain_exact": f"{teacher['indomain']['exact']:.2f}",
        "ood_corner": f"{teacher['ood']['corner']:.2f}",
        "ood_exact": f"{teacher['ood']['exact']:.2f}",
        "nll": fx.fmt(teacher["nll"]),
        "jsd": "0",
        **{f"drift_{t}": "0" for t in TARGETS},
    }
    table.append(
        "| teacher (= every student at step 0) | " + " | ".join(t_cells.get(k, "—") for k, _ in COLUMNS) + " |"
    )
    for arm in arms:
        runs = records[arm.name]
        cells = [stat_cell([r["numbers"][k] for r in runs.values()], k) for k, _ in COLUMNS]
        table.append(f"| {arm_label(arm, records)}, n={len(runs)} | " + " | ".join(cells) + " |")
    paired_head = [
        "| arm | in-domain corner − free | OOD corner − frozen | OOD corner − free | in-domain corner − frozen "
        "| train GKD part − free | claim |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm in arms:
        if arm.mode != "anchor" or arm.lmbda != "0":
            continue
        v = verdict(records, arm.name)
        paired_head.append(
            f"| {arm_label(arm, records)} | {paired_cell(v['keep'])} | {paired_cell(v['gain'])} | "
            f"{paired_cell(paired(records, arm.name, 'free', 'ood_corner'))} | "
            f"{paired_cell(paired(records, arm.name, 'frozen', 'indomain_corner'))} | "
            f"{paired_cell(paired(records, arm.name, 'free', 'gkd'))} | {'holds' if v['holds'] else 'does not hold'} |"
        )
    free_frozen = [
        f"| free − frozen | {paired_cell(paired(records, 'free', 'frozen', 'indomain_corner'))} | "
        f"{paired_cell(paired(records, 'free', 'frozen', 'ood_corner'))} |"
    ]
    onpolicy = []
    if "op-anchor" in records and "op-free" in records:
        keep, gain = (paired(records, "op-anchor", "op-free", k) for k in ("indomain_corner", "ood_corner"))
        onpolicy = [f"| on-policy: best anchor − free | {paired_cell(keep)} | {paired_cell(gain)} |"]
    every = ["| run | in-domain corner / exact | OOD corner / exact | drift merger / vit | scale | first answers |"]
    every.append("|---|---|---|---|---|---|")
    for arm in arms:
        for seed, r in sorted(records[arm.name].items()):
            n, sc = r["numbers"], r["score"]
            samples = " · ".join(f"`{a}`" for a in (*sc["indomain"]["samples"][:1], *sc["ood"]["samples"][:2]))
            every.append(
                f"| {arm.name} seed {seed} | {n['indomain_corner']:.2f} / {n['indomain_exact']:.2f} | "
                f"{n['ood_corner']:.2f} / {n['ood_exact']:.2f} | {fx.fmt(n['drift_merger'])} / "
                f"{fx.fmt(n['drift_vit'])} | {fx.fmt(n['scale'])} | {samples.replace('|', chr(92) + '|')} |"
            )
    commands = []
    first = min(opts.seeds)
    for arm in arms:
        r = records[arm.name].get(first) or next(iter(records[arm.name].values()))
        argv = [os.path.normpath(a) if a.startswith("/") else a for a in r["argv"]]
        commands += [f"# {arm.name} (seed {r['seed']})", fx.shell(argv, r["env"], work)]
    secs = [r["numbers"]["seconds"] for runs in records.values() for r in runs.values() if r["numbers"]["seconds"]]
    teacher_rows = [
        f"| {d} | {t['ood']['corner']:.2f} | {t['ood']['exact']:.2f} |" for d, t in sorted(teachers.items())
    ]
    best = best_share(work)
    return "\n".join(
        [
            MARK_BEGIN,
            "## Results (generated by `tests/benchmarks/effect_vision_shift.py`)",
            "",
            f"Machine: {fx.machine()} (shared; load average at report time {fx.load_average()}). Versions: "
            + ", ".join(f"{k} {v}" for k, v in fx.versions().items())
            + ".",
            "",
            f"Teacher (`effect_experiment.py`'s recipe): on {EVAL_OBJECTS} held-out in-domain images corner "
            f"{teacher['indomain']['corner']:.2f}, exact box {teacher['indomain']['exact']:.2f}. On "
            f"{EVAL_OBJECTS} held-out images of each candidate domain:",
            "",
            "| domain | teacher OOD corner | teacher OOD exact |",
            "|---|---|---|",
            *teacher_rows,
            "",
            "### Calibration (unanchored arms only)",
            "",
            *calibration_rows(work, {d: t["ood"]["corner"] for d, t in teachers.items()}),
            "",
            f"### Arms: {set_name}",
            "",
            f"Stage 3 on `{opts.domain}` scenes, {opts.steps} steps × 4 rows of {STAGE3_ROWS}, learning rate "
            f"{opts.lr}, answers in the teacher's legacy syntax; ViT {'trainable (LoRA)' if VIT_FREE else 'frozen'} "
            f"in every arm but `frozen`; anchors: {SHARES_LABEL}"
            + (f"; best share (pre-declared rule) {best:g}" if best is not None else "")
            + f". Wall time of the {len(secs)} Stage-3 runs: {sum(secs) / 60:.0f} min "
            f"({min(secs):.0f}–{max(secs):.0f} s each), one at a time, one thread each.",
            "",
            "Mean ± standard deviation over seeds. *corner*: the answer's first two numbers are the object's "
            "top-left corner; *exact*: the whole answer is the right box; *drift*: held-out OOD, "
            "‖f_s − f_t‖² / ‖f_t‖²; *train GKD part*: `loss` − `vision_kd_loss`, last 5 logged steps; "
            "*vision_kd/scale*: the applied scale, last 5 logged steps; *held-out NLL*: the OOD answers, "
            "nats/token; *held-out JSD*: to the teacher, ms-swift's gkd_loss.",
            "",
            *table,
            "",
            "Paired by seed: mean ± sd of the per-seed differences (each seed's difference; how many seeds share "
            "the mean's sign). The claim holds for an arm when both *in-domain corner − free* and *OOD corner − "
            "frozen* are positive, larger than their sd, with at most one seed against.",
            "",
            *paired_head,
            "",
            "| pair | in-domain corner | OOD corner |",
            "|---|---|---|",
            *free_frozen,
            *onpolicy,
            "",
            "![retention against gain](img/effect_shift_tradeoff.png)",
            "",
            "<details><summary>Every run</summary>",
            "",
            *every,
            "",
            "</details>",
            "",
            "<details><summary>Exact commands</summary>",
            "",
            "`$WORK` is `--work`; launchers are the virtualenv's; every command ran with `HF_HUB_OFFLINE=1 "
            "MODELSCOPE_OFFLINE=1 CUDA_VISIBLE_DEVICES= TOKENIZERS_PARALLELISM=false` "
            "(`vkd_shim.testing.launch.gkd_env`) and `OMP_NUM_THREADS=1`; other seeds differ in `--seed`, "
            "`--data_seed` and the output directory.",
            "",
            "```bash",
            *commands,
            "```",
            "",
            "</details>",
            MARK_END,
        ]
    )


def plot(work: Path, opts, img_dir: Path) -> None:
    """Retention (in-domain corner) against OOD gain (OOD corner − teacher's): every run a dot, arm means
    with their sd, the frozen-free line; beside it the held-out drift per target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = load_records(work, setting(opts.domain, opts.lr, opts.steps))
    teacher = json.loads((work / "scores" / f"teacher-{opts.domain}.json").read_text())
    arms = [a for a in all_arms() if a.name in records]
    cmap = plt.get_cmap("tab10")
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(15, 6.5), gridspec_kw={"width_ratios": [3, 2]})
    means = {}
    for i, arm in enumerate(arms):
        runs = list(records[arm.name].values())
        xs = [r["numbers"]["ood_corner"] - teacher["ood"]["corner"] for r in runs]
        ys = [r["numbers"]["indomain_corner"] for r in runs]
        marker = "s" if arm.lmbda != "0" else "o"
        ax.scatter(xs, ys, color=cmap(i), alpha=0.35, s=22, marker=marker)
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        sx = statistics.stdev(xs) if len(xs) > 1 else 0.0
        sy = statistics.stdev(ys) if len(ys) > 1 else 0.0
        ax.errorbar(mx, my, xerr=sx, yerr=sy, fmt=marker, color=cmap(i), capsize=4, ms=9, label=arm_label(arm, records))
        means[arm.name] = (mx, my)
    if "frozen" in means and "free" in means:
        (x0, y0), (x1, y1) = means["frozen"], means["free"]
        ax.plot([x0, x1], [y0, y1], "k--", lw=1, label="frozen–free line")
    ax.axhline(teacher["indomain"]["corner"], color="grey", lw=0.8, ls=":")
    ax.axvline(0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("OOD gain: held-out OOD corner − teacher's")
    ax.set_ylabel("in-domain retention: held-out in-domain corner (teacher: dotted)")
    ax.set_title("retention against gain: every seed (faint), arm mean ± sd (squares: on-policy)")
    ax.grid(alpha=0.3)
    ax.set_xlim(-0.1, 1.0)
    ax.set_ylim(0.0, 1.05)
    ax.legend(fontsize=8, loc="lower right")
    width = 0.8 / len(TARGETS)
    for j, target in enumerate(TARGETS):
        vals = [statistics.fmean(r["numbers"][f"drift_{target}"] for r in records[a.name].values()) for a in arms]
        bx.bar([i + j * width for i in range(len(arms))], vals, width, label=target)
    bx.set_yscale("log")
    bx.set_xticks([i + 0.4 - width / 2 for i in range(len(arms))], [a.name for a in arms], rotation=30, fontsize=8)
    bx.set_title("held-out relative drift per target, mean over seeds (frozen: 0)", fontsize=10)
    bx.legend(fontsize=8)
    bx.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    img_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(img_dir / "effect_shift_tradeoff.png", dpi=100)
    plt.close(fig)


def publish(work: Path, opts) -> None:
    plot(work, opts, opts.out / "img")
    section = report(work, opts)
    bench_startup.write_section(
        opts.out / "EFFECT_SHIFT.md", section, begin=MARK_BEGIN, end=MARK_END, title="# Effect experiment, vision shift"
    )
    print(section)


# --- entry point ---------------------------------------------------------------------------------------


def child_env(work: Path, threads: int) -> dict[str, str]:
    """effect_experiment's launch env (offline, CPU) without the caller's VKD_*; `threads` torch threads per
    run: on a shared 2-core machine one thread per run kept a step's time steady where two threads stalled
    on each other (an OpenMP team with one thread descheduled)."""
    env = {k: v for k, v in launch.gkd_env(cache_dir=work / "cache").items() if not k.startswith("VKD_")}
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    os.environ.update({k: env[k] for k in ("HF_HUB_OFFLINE", "MODELSCOPE_OFFLINE", "MODELSCOPE_CACHE")})
    return env


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/effect_shift"), help="scratch directory")
    parser.add_argument("--out", type=Path, default=fx.REPO / "docs", help="where EFFECT_SHIFT.md and img/ go")
    parser.add_argument("--domain", default=DOMAIN, choices=DOMAINS)
    parser.add_argument("--lr", default=STAGE3_LR)
    parser.add_argument("--steps", type=int, default=STAGE3_STEPS)
    parser.add_argument("--arms", nargs="+", default=[], help=f"arms to run: {[a.name for a in all_arms()]}")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run and for the evaluation")
    parser.add_argument("--probe-teacher", action="store_true", help="score the teacher on every candidate")
    parser.add_argument("--pick-best", action="store_true", help="fix the best share from the share arms first")
    parser.add_argument("--report", action="store_true", help="write the page's generated block and plots")
    opts = parser.parse_args()
    work = opts.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = child_env(work, opts.threads)
    import torch

    torch.set_num_threads(opts.threads)
    teacher = teacher_models(work, env)
    if opts.probe_teacher:
        for domain in DOMAINS:
            score = score_teacher(work, teacher, domain)
            print(domain, json.dumps({k: score[k]["corner"] for k in ("indomain", "ood")}), score["ood"]["samples"])
    by_name = {a.name: a for a in all_arms()}
    unknown = set(opts.arms) - set(by_name)
    if unknown:
        raise SystemExit(f"unknown arms {sorted(unknown)}; known: {list(by_name)}")
    score_teacher(work, teacher, opts.domain)
    if opts.pick_best:  # before the arms of this call: the vit and on-policy anchors use the best share
        print("best share:", pick_best(work, setting(opts.domain, opts.lr, opts.steps)))
    for seed in opts.seeds:
        for name in opts.arms:
            run = run_arm(work, env, teacher, by_name[name], seed, opts)
            record = evaluate_run(work, teacher, run, opts.domain)
            print(f"  {name} seed {seed}: {json.dumps(record['numbers'])}", flush=True)
    if opts.report:
        publish(work, opts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
