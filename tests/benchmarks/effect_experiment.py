"""Effect experiment: does vision KD keep a Stage-3 student grounded? Arms, seeds and error bars.

The proposal's claim, on a toy where every part is real (``swift sft``, ``swift rlhf --rlhf_type gkd``,
``vkd-run``, ms-swift's LoRA on the aligner, its template and metrics):

1. Teacher: a tiny random-init Qwen3-VL trained by ``swift sft`` (full) on in-domain scenes (one coloured
   rectangle on a plain background, in a 3 x 3 grid of 32-pixel cells, so each cell is one merged visual
   token) to answer "Locate the object." in the legacy box format ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>``
   and "Name the colour as a list." as ``[red]``. It must localize: exact box on held-out in-domain images.
2. Stage 3 (the student starts as a byte copy of the teacher): GKD on shifted imagery (noisy, striped
   backgrounds; ellipses and triangles; a quarter of the scenes empty) whose answers use a new format
   ``[x1,y1,x2,y2]`` (``[]`` for an empty scene), with ``--sft_alpha``, LoRA and ``--freeze_aligner false``.
   Arms: shim off (run in ``mode: monitor``, which trains bit for bit as without the shim and logs the drift);
   vision KD at three weights (the shipped Stage-3 configs and ``VKD_WEIGHT``); and what a user would try
   instead, the aligner frozen (``--freeze_aligner true``, monitored). Each arm runs with several seeds
   (``--seed`` and ``--data_seed``: Stage-3 data order and LoRA init).
3. Evaluation of every run, in this process: greedy answers through ms-swift's ``TransformersEngine`` on
   held-out in-domain images (forgetting), out-of-domain images (grounding, format adoption) and empty
   out-of-domain scenes (answers that report an object: in-domain content); teacher-forced, the student's
   NLL of the new-format answers, its JSD to the teacher and the aligner's relative drift per target.

Writes ``<out>/img/effect_*.png`` and the generated block of ``<out>/EFFECT.md``; keeps every run, log and
``results.json`` under ``--work``. ``--reuse`` keeps finished stages; ``--report-only`` redraws from
``results.json``::

    python tests/benchmarks/effect_experiment.py --work /tmp/effect --out docs/
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import bench_startup  # this script's own directory is on sys.path when it runs

from vkd_shim.testing import launch, models

REPO = Path(__file__).resolve().parents[2]
MARK_BEGIN = "<!-- effect:begin -->"
MARK_END = "<!-- effect:end -->"

# --- scenes ------------------------------------------------------------------------------------------

# A 96 x 96 image is 3 x 3 merged vision tokens (32 x 32 pixels each, see vkd_shim.testing.models): each
# object fills one grid cell, so a box is one of 9 and the object is one visual token.
GRID, CELL = 3, 32
SIZE = GRID * CELL
PROMPT = "<image>Locate the object."
LIST_PROMPT = "<image>Name the colour as a list."
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 70, 220),
    "yellow": (230, 200, 40),
    "purple": (140, 60, 170),
}
PLAIN_BACKGROUNDS = ((255, 255, 255), (235, 235, 235), (20, 20, 20))
OOD_BACKGROUNDS = ((120, 110, 90), (60, 90, 120), (150, 150, 150))
#: Every LIST_EVERY-th in-domain teacher row asks for the colour as a list, "[red]": the new format opens
#: with "[", and SFT pushes down the logit of every token it never sees as a target (without this task a
#: short Stage 3 cannot lift "[" and "]"; a real model has seen them countless times).
LIST_EVERY = 4
#: Every EMPTY_EVERY-th out-of-domain scene has no object (answer "[]"): an answer that reports a box there
#: repeats the in-domain content every teacher image had.
EMPTY_EVERY = 6
EMPTY_ANSWER = "[]"
#: Held-out sets: 4 object images per cell, in and out of domain, and empty out-of-domain scenes.
EVAL_OBJECTS = 36
EVAL_EMPTY = 12

LEGACY_RE = re.compile(r"<\|box_start\|>\((\d+),(\d+)\),\((\d+),(\d+)\)<\|box_end\|>")
NEW_RE = re.compile(r"\[(\d+),(\d+),(\d+),(\d+)\]")

# --- recipe ------------------------------------------------------------------------------------------

SEED = 42
TEACHER_ROWS = 1024
TEACHER_STEPS = 800
TEACHER_LR = "1e-3"
#: The ViT's learned position embedding is scaled by this at init. A pretrained ViT's patch features carry
#: where each patch is; a random init at std 0.02 carries almost none: the merged background tokens of an
#: image differ across positions by 2.7 % of how much the object's token differs from them, and the tiny
#: teacher stayed at the image-blind answer (the centre cell) through 2000 `swift sft` steps. At x100 (std
#: about 2, the scale of the patch embeddings) that ratio is 0.88 and the box is learned within a few hundred
#: steps. Measured by tests/benchmarks' teacher runs (docs/EFFECT.md).
POS_EMBED_SCALE = 100.0
STAGE3_ROWS = 192
#: Long enough for the format to switch (every OOD answer a well-formed new-format box after 120 steps in the
#: calibration run, shim off, seed 42), short of wiping out the teacher's grounding: at 5e-3 x 48 steps or
#: 2e-3 x 96 every answer became "[]" in every arm; at 1e-3 x 48 the answers were half-switched and garbled.
STAGE3_STEPS = 120
STAGE3_LR = "1e-3"
SEEDS = (42, 43, 44)
#: Picked from the calibration run's own monitoring, before any vision-KD run: at the drift plain Stage 3
#: reaches, the shipped recipe's term (mse, merger 1 + deepstack 0.5) is about 0.0054 against a GKD loss of
#: about 0.55, so weights 1, 10 and 100 start the term at 1 %, 10 % and 100 % of it (docs/REFERENCE.md).
WEIGHTS = (1.0, 10.0, 100.0)
CONFIGS = (REPO / "configs" / "visual_kd_base.yaml", REPO / "configs" / "stage3_visual_kd.yaml")
# ms-swift's GKD defaults for --rlhf_type gkd (beta 0.5 = symmetric JSD, temperature 0.9); the held-out
# JSD below uses the same values.
GKD_BETA = 0.5
GKD_TEMPERATURE = 0.9
TARGETS = ("merger", "deepstack_0", "deepstack_1")
# Full-vocabulary logits (151936 wide) of two models for all held-out rows at once would need several GiB.
EVAL_CHUNK = 12
TAIL = 5  # training-log values are averaged over the last TAIL logged steps


@dataclasses.dataclass(frozen=True)
class Arm:
    """One way to run Stage 3: the shim's mode and weight, and ms-swift's aligner flag."""

    name: str
    label: str
    mode: str  # "monitor" (trains as without the shim, logs drift) or "anchor" (vision KD)
    weight: float | None = None
    freeze_aligner: bool = False


def arms(weights: tuple[float, ...]) -> list[Arm]:
    return [
        Arm("off", "shim off (monitored)", "monitor"),
        *(Arm(f"kd{w:g}", f"vision KD, weight {w:g}", "anchor", weight=w) for w in weights),
        Arm("frozen", "aligner frozen (monitored)", "monitor", freeze_aligner=True),
    ]


# --- data --------------------------------------------------------------------------------------------


def legacy_answer(box: tuple[int, ...]) -> str:
    return "<|box_start|>({},{}),({},{})<|box_end|>".format(*box)


def new_answer(box: tuple[int, ...]) -> str:
    return "[{},{},{},{}]".format(*box)


def draw_scene(rng: random.Random, cell: int | None, out_of_domain: bool) -> tuple[Any, tuple | None, str | None]:
    """One object in grid cell `cell` (None: an empty scene); returns the image, box and colour name.

    In-domain: a rectangle on a plain background. Out-of-domain: an ellipse or a triangle on a noisy
    background, striped half of the time, so the vision features differ from anything the teacher saw.
    """
    import numpy as np
    from PIL import Image, ImageDraw

    if out_of_domain:
        noise = np.random.default_rng(rng.randrange(2**31)).normal(0.0, 40.0, (SIZE, SIZE, 3))
        pixels = np.asarray(rng.choice(OOD_BACKGROUNDS), dtype=np.float64) + noise
        if rng.random() < 0.5:
            diagonal = np.add.outer(np.arange(SIZE), np.arange(SIZE)) // 6 % 2
            pixels += 50.0 * diagonal[..., None]
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    else:
        image = Image.new("RGB", (SIZE, SIZE), rng.choice(PLAIN_BACKGROUNDS))
    if cell is None:
        return image, None, None
    col, row = cell % GRID, cell // GRID
    box = (col * CELL, row * CELL, (col + 1) * CELL, (row + 1) * CELL)
    inner = (box[0] + 3, box[1] + 3, box[2] - 4, box[3] - 4)
    name = rng.choice(sorted(COLOURS))
    draw = ImageDraw.Draw(image)
    if not out_of_domain:
        draw.rectangle(inner, fill=COLOURS[name])
    elif rng.random() < 0.5:
        draw.ellipse(inner, fill=COLOURS[name])
    else:
        triangle = [(inner[0], inner[3]), (inner[2], inner[3]), ((inner[0] + inner[2]) // 2, inner[1])]
        draw.polygon(triangle, fill=COLOURS[name])
    return image, box, name


def write_split(
    root: Path,
    name: str,
    count: int,
    *,
    out_of_domain: bool,
    seed: int,
    held_out: bool,
    empties: int = 0,
    draw=draw_scene,
    ood_answer=new_answer,
    empty_every: int = EMPTY_EVERY,
) -> Path:
    """ms-swift "messages" jsonl with PNGs. Held-out splits cycle through the cells (balanced) and put
    their empty scenes last; train splits draw cells at random. In-domain answers are legacy (teacher
    rows alternate with the colour question), out-of-domain answers new-format. `draw`, `ood_answer` and
    `empty_every` (0: no empty training scene) let another experiment draw its own out-of-domain scenes."""
    rng = random.Random(seed)
    media = root / "media"
    media.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        if held_out:
            cell = None if index >= count - empties else index % (GRID * GRID)
        else:
            empty = out_of_domain and empty_every > 0 and index % empty_every == empty_every - 1
            cell = None if empty else rng.randrange(GRID * GRID)
        image, box, colour = draw(rng, cell, out_of_domain)
        path = media / f"{name}_{index}.png"
        image.save(path)
        if box is None:
            prompt, answer = PROMPT, EMPTY_ANSWER
        elif out_of_domain:
            prompt, answer = PROMPT, ood_answer(box)
        elif not held_out and index % LIST_EVERY == LIST_EVERY - 1:
            prompt, answer = LIST_PROMPT, f"[{colour}]"
        else:
            prompt, answer = PROMPT, legacy_answer(box)
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        rows.append({"messages": messages, "images": [str(path)], "box": list(box) if box else None})
    path = root / f"{name}.jsonl"
    path.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows), encoding="utf-8")
    return path


def build_data(root: Path, seed: int) -> dict[str, Path]:
    return {
        "indomain_train": write_split(
            root, "indomain_train", TEACHER_ROWS, out_of_domain=False, seed=seed, held_out=False
        ),
        "indomain_eval": write_split(
            root, "indomain_eval", EVAL_OBJECTS, out_of_domain=False, seed=seed + 1, held_out=True
        ),
        "ood_train": write_split(root, "ood_train", STAGE3_ROWS, out_of_domain=True, seed=seed + 2, held_out=False),
        "ood_eval": write_split(
            root,
            "ood_eval",
            EVAL_OBJECTS + EVAL_EMPTY,
            out_of_domain=True,
            seed=seed + 3,
            held_out=True,
            empties=EVAL_EMPTY,
        ),
    }


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --- launches ----------------------------------------------------------------------------------------


def run_logged(argv: list[str], env: dict[str, str], log: Path) -> float:
    """Run a launcher with output to `log`; return its wall time; on failure show the log's tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print("$ " + " ".join(argv), flush=True)
    start = time.perf_counter()
    with log.open("w", encoding="utf-8") as sink:
        code = subprocess.run(argv, env=env, stdout=sink, stderr=subprocess.STDOUT, check=False).returncode
    seconds = time.perf_counter() - start
    if code != 0:
        tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-40:])
        raise RuntimeError(f"{argv[0]} exited with {code} after {seconds:.0f} s; last lines of {log}:\n{tail}")
    print(f"  done in {seconds:.0f} s", flush=True)
    return seconds


def last_checkpoint(output_dir: Path) -> Path | None:
    found = sorted(output_dir.glob("v*-*/checkpoint-*"), key=lambda p: int(p.name.rpartition("-")[2]))
    return found[-1] if found else None


MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
)


def copy_model(checkpoint: Path, target: Path) -> None:
    """Model files only: ms-swift reads a training `args.json` found in a model dir as the defaults of
    the next run, which must not leak from the teacher's SFT into Stage 3."""
    target.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        shutil.copy2(checkpoint / name, target / name)


def swift() -> str:
    return str(Path(sys.executable).with_name("swift"))


def common_flags(steps: int, batch: int, lr: str, seed: int, output: Path, logging_steps: int) -> list[str]:
    return [
        "--torch_dtype", "float32", "--split_dataset_ratio", "0",
        "--max_steps", str(steps), "--per_device_train_batch_size", str(batch),
        "--gradient_accumulation_steps", "1", "--learning_rate", lr,
        "--logging_steps", str(logging_steps),
        "--save_strategy", "steps", "--save_steps", str(steps), "--save_only_model", "true",
        "--report_to", "none", "--dataloader_num_workers", "0",
        "--seed", str(seed), "--data_seed", str(seed), "--check_model", "false",
        "--output_dir", str(output),
    ]  # fmt: skip


def teacher_command(init: Path, data: dict[str, Path], output: Path, steps: int) -> list[str]:
    """Full fine-tuning, vision tower and aligner included: a random-init model learns to look from scratch."""
    return [
        swift(), "sft", "--model", str(init), "--model_type", "qwen3_vl",
        "--dataset", str(data["indomain_train"]),
        "--tuner_type", "full", "--freeze_vit", "false", "--freeze_aligner", "false", "--warmup_ratio", "0.05",
        *common_flags(steps, 8, TEACHER_LR, SEED, output, 25),
    ]  # fmt: skip


def stage3_command(
    teacher: Path,
    student: Path,
    data: dict[str, Path],
    output: Path,
    steps: int,
    seed: int,
    arm: Arm,
    lr: str,
    *,
    dataset: str = "ood_train",
    freeze_vit: bool | None = None,
    lmbda: str = "0",
) -> list[str]:
    """Off-policy GKD (``--lmbda 0``: every step distils on the dataset's new-format answers, so every step
    also carries the SFT term; ms-swift drops ``sft_alpha`` on on-policy steps) with LoRA on the language
    stack and, unless the arm freezes it, on the merger and deepstack mergers. `freeze_vit` (None: the flag
    is left out, ms-swift's default true) and `lmbda` are for another experiment's arms."""
    vit = [] if freeze_vit is None else ["--freeze_vit", str(freeze_vit).lower()]
    return [
        swift(), "rlhf", "--rlhf_type", "gkd",
        "--model", str(student), "--model_type", "qwen3_vl",
        "--teacher_model", str(teacher), "--teacher_model_type", "qwen3_vl",
        "--dataset", str(data[dataset]),
        "--tuner_type", "lora", "--freeze_aligner", str(arm.freeze_aligner).lower(), *vit,
        "--lmbda", lmbda, "--sft_alpha", "1", "--max_completion_length", "24", "--eval_strategy", "no",
        *common_flags(steps, 4, lr, seed, output, 1),
    ]  # fmt: skip


def save_teacher_init(path: Path) -> None:
    """The tiny random-init Qwen3-VL with its ViT position embedding scaled by POS_EMBED_SCALE."""
    from safetensors.torch import load_file, save_file

    models.save_qwen3_vl(path, seed=0)
    weights = load_file(path / "model.safetensors")
    (key,) = [k for k in weights if k.endswith("visual.pos_embed.weight")]
    weights[key] = weights[key] * POS_EMBED_SCALE
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})


def train_teacher(work: Path, data: dict[str, Path], steps: int, env: dict, reuse: bool) -> dict[str, Any]:
    """`swift sft` from a fixed random init; the checkpoint's model files become the teacher and, in a
    directory of its own, the student (ms-swift compares --model and --teacher_model as strings)."""
    init, output = work / "teacher_init", work / "teacher_sft"
    teacher, student = work / "teacher", work / "student"
    argv = teacher_command(init, data, output, steps)
    if reuse and (student / "model.safetensors").exists():
        return {"argv": argv, "seconds": None, "teacher": teacher, "student": student}
    if not (init / "model.safetensors").exists():
        save_teacher_init(init)
    shutil.rmtree(output, ignore_errors=True)
    seconds = run_logged(argv, env, output.with_suffix(".log"))
    checkpoint = last_checkpoint(output)
    if checkpoint is None:
        raise RuntimeError(f"swift sft left no checkpoint under {output}")
    for target in (teacher, student):
        copy_model(checkpoint, target)
    return {"argv": argv, "seconds": seconds, "teacher": teacher, "student": student}


def run_stage3(work: Path, data: dict, teacher: dict, arm: Arm, seed: int, opts: argparse.Namespace, env: dict):
    """One Stage-3 run through vkd-run and the shipped configs (VKD_MODE / VKD_WEIGHT pick the arm)."""
    run_dir = work / "runs" / f"{arm.name}-s{seed}"
    command = stage3_command(
        teacher["teacher"], teacher["student"], data, run_dir / "output", opts.stage3_steps, seed, arm, opts.stage3_lr
    )
    arm_env = {"VKD_MODE": arm.mode, **({"VKD_WEIGHT": f"{arm.weight:g}"} if arm.weight is not None else {})}
    return launch_stage3(run_dir, arm.name, seed, command, arm_env, env, reuse=opts.reuse)


def launch_stage3(
    run_dir: Path, name: str, seed: int, command: list[str], arm_env: dict[str, str], env: dict, *, reuse: bool
) -> dict[str, Any]:
    """`command` (whose --output_dir is run_dir/output) through vkd-run and the shipped configs, with the
    arm's VKD_* variables; checks that the shim attached and added a term exactly when VKD_MODE is anchor."""
    output, events = run_dir / "output", run_dir / "vkd_events.jsonl"
    vkd_run = str(Path(sys.executable).with_name("vkd-run"))
    argv = [vkd_run, "--config", os.pathsep.join(map(str, CONFIGS)), "--log-file", str(events), *command]
    seconds = None
    if not (reuse and last_checkpoint(output)):
        shutil.rmtree(run_dir, ignore_errors=True)
        seconds = run_logged(argv, {**env, **arm_env}, run_dir / "launcher.log")
    checkpoint = last_checkpoint(output)
    counts: dict[str, int] = {}
    for event in read_rows(events) if events.exists() else []:
        counts[event["event"]] = counts.get(event["event"], 0) + 1
    logs = launch.read_logging_jsonl(output)
    train = [row for row in logs if "loss" in row]
    # A run that silently trained without the shim would turn the comparison into noise.
    attached = counts.get("vkd.attach") == 1 and any("vision_kd/tokens" in row for row in train)
    has_term = any("vision_kd_loss" in row for row in train)
    if checkpoint is None or not attached or has_term != (arm_env["VKD_MODE"] == "anchor"):
        raise RuntimeError(f"{name} seed {seed}: the shim did not run as asked (events {counts}); see {run_dir}")
    return {
        "arm": name,
        "seed": seed,
        "argv": argv,
        "env": arm_env,
        "seconds": seconds,
        "checkpoint": str(checkpoint),
        "logs": logs,
        "events": counts,
    }


# --- evaluation (in process) ---------------------------------------------------------------------


def parse_answer(text: str) -> tuple[str, tuple[int, ...] | None]:
    """(syntax, box): the syntax a whole answer is written in ("new", "legacy", "empty" for "[]", "other")
    and its box when it is exactly one well-formed box."""
    text = text.strip()
    if text == EMPTY_ANSWER:
        return "empty", None
    for syntax, pattern in (("new", NEW_RE), ("legacy", LEGACY_RE)):
        match = pattern.fullmatch(text)
        if match:
            return syntax, tuple(int(v) for v in match.groups())
    return "other", None


def corner(text: str) -> tuple[int, int] | None:
    """The first two numbers of an answer, in either syntax, however the rest is written: where the answer
    puts the object's top-left corner. A format switch in progress garbles the tail of an answer, not this."""
    numbers = re.findall(r"\d+", text)
    return (int(numbers[0]), int(numbers[1])) if len(numbers) >= 2 else None


def reports_an_object(text: str) -> bool:
    """An answer that places an object somewhere (it holds a position), in any syntax, well-formed or not."""
    return corner(text) is not None


def answer_metrics(answers: list[str], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Grounding on object scenes (exact box in either syntax), format adoption, and on empty scenes the
    rate of answers that report an object anyway."""
    objects = [(a, r) for a, r in zip(answers, rows, strict=True) if r["box"] is not None]
    empties = [a for a, r in zip(answers, rows, strict=True) if r["box"] is None]
    parsed = [(parse_answer(a), r) for a, r in objects]
    out = {
        "exact": sum(box is not None and list(box) == r["box"] for (_, box), r in parsed) / len(objects),
        "corner": sum(corner(a) == tuple(r["box"][:2]) for a, r in objects) / len(objects),
        "new_format": sum(syntax == "new" for (syntax, _), _ in parsed) / len(objects),
        "legacy_format": sum(syntax == "legacy" for (syntax, _), _ in parsed) / len(objects),
        "samples": answers[:4],
    }
    if empties:
        out["hallucination"] = sum(reports_an_object(a) for a in empties) / len(empties)
    return out


def greedy(engine, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Greedy answers to the rows' prompts through ms-swift's inference engine (its chat template)."""
    from swift.infer_engine import InferRequest, RequestConfig

    requests = [InferRequest(messages=r["messages"][:1], images=r["images"]) for r in rows]
    responses = engine.infer(requests, RequestConfig(max_tokens=24, temperature=0), use_tqdm=False)
    return answer_metrics([r.choices[0].message.content for r in responses], rows)


class Evaluator:
    """The teacher and the held-out rows, encoded once; scores one model at a time against them."""

    def __init__(self, teacher_dir: Path, data: dict[str, Path], targets: tuple[str, ...] = TARGETS) -> None:
        import torch
        from swift.infer_engine import TransformersEngine

        self.torch = torch
        self.targets = targets  # names as the shim logs them: merger, deepstack_<i>, vit
        self.indomain = read_rows(data["indomain_eval"])
        self.ood = read_rows(data["ood_eval"])
        self.teacher = TransformersEngine(
            str(teacher_dir), model_type="qwen3_vl", torch_dtype=torch.float32, max_batch_size=0
        )
        self.batches = self._encode([r for r in self.ood if r["box"] is not None])

    def _encode(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Chunks encoded by ms-swift's Qwen3-VL template exactly as in training (prompt, image tokens, answer
        labels), right-padded by hand: the template's collator would load a model to compute rope positions,
        which the model's forward computes itself from mm_token_type_ids."""
        torch, template = self.torch, self.teacher.template
        pad = models.QWEN_ADDED_TOKENS[models.PAD_TOKEN][0]
        template.set_mode("train")
        try:
            encoded = [template.encode({"messages": r["messages"], "images": r["images"]}) for r in rows]
        finally:
            template.set_mode("transformers")
        batches = []
        for start in range(0, len(encoded), EVAL_CHUNK):
            chunk = encoded[start : start + EVAL_CHUNK]
            lengths = torch.tensor([len(e["input_ids"]) for e in chunk])
            length = int(lengths.max())

            def padded(key: str, value: int, chunk=chunk, length=length) -> Any:
                seqs = [e[key].tolist() if isinstance(e[key], torch.Tensor) else list(e[key]) for e in chunk]
                return torch.tensor([seq + [value] * (length - len(seq)) for seq in seqs])

            labels = padded("labels", -100)
            # Logits only from the first answer position on, as ms-swift's prepare_logits_to_keep does.
            keep = length - int((labels != -100).int().argmax(-1).min()) + 1
            inputs = {
                "input_ids": padded("input_ids", pad),
                "attention_mask": (torch.arange(length)[None, :] < lengths[:, None]).long(),
                "mm_token_type_ids": padded("mm_token_type_ids", 0),
                "pixel_values": torch.cat([e["pixel_values"] for e in chunk]),
                "image_grid_thw": torch.cat([e["image_grid_thw"] for e in chunk]),
                "logits_to_keep": keep,
            }
            batches.append({"inputs": inputs, "labels": labels[:, -keep:]})
        return batches

    def score(self, engine) -> dict[str, Any]:
        """Greedy answers on every held-out set, then teacher-forced NLL, JSD and drift on the OOD objects."""
        torch = self.torch
        from swift.rlhf_trainers.gkd_loss import TeacherOutput, gkd_loss

        from vkd_shim.capture import FeatureCapture
        from vkd_shim.loss import vision_kd_loss

        result = {"indomain": greedy(engine, self.indomain), "ood": greedy(engine, self.ood)}
        if engine is self.teacher:
            capture = None
        else:
            kinds = tuple(dict.fromkeys(name.split("_")[0] for name in self.targets))
            capture = FeatureCapture(engine.model, self.teacher.model, kinds)
            capture.attach()
        targets = self.targets
        sums = {"drift": dict.fromkeys(targets, 0.0), "chunks": 0, "jsd": 0.0, "nll": 0.0, "tokens": 0}
        try:
            for batch in self.batches:
                shifted = torch.roll(batch["labels"], shifts=-1, dims=1)  # as GKDTrainer._compute_jsd_loss
                with torch.no_grad():
                    if capture is None:
                        logits = self.teacher.model(**batch["inputs"]).logits
                        sums["nll"] += self._nll_sum(logits, shifted)
                        sums["tokens"] += int((shifted != -100).sum())
                        continue
                    with capture.window():
                        student = engine.model(**batch["inputs"]).logits
                        teacher = self.teacher.model(**batch["inputs"]).logits
                        features = capture.take()
                    # The shim's own relative drift: ||s - t||^2 / ||t||^2 over this chunk's visual tokens.
                    out = vision_kd_loss(
                        features["student"], features["teacher"], weights=dict.fromkeys(features["student"], 1.0),
                        distance="mse", scale=1.0,
                    )  # fmt: skip
                    jsd, valid = gkd_loss(
                        student, TeacherOutput(full_logits=teacher, labels=shifted), shifted, GKD_BETA, GKD_TEMPERATURE
                    )
                for target, value in out.drift.items():
                    sums["drift"][target.name] += float(value)
                sums["chunks"] += 1
                sums["jsd"] += float(jsd)  # gkd_loss returns the sum over the valid tokens
                sums["nll"] += self._nll_sum(student, shifted)
                sums["tokens"] += int(valid)
        finally:
            if capture is not None:
                capture.detach()
        chunks = max(sums["chunks"], 1)
        result["drift"] = {t: sums["drift"][t] / chunks for t in targets} if capture else dict.fromkeys(targets, 0.0)
        result["jsd"] = sums["jsd"] / sums["tokens"] if capture else 0.0
        result["nll"] = sums["nll"] / sums["tokens"]
        return result

    def _nll_sum(self, logits, shifted) -> float:
        mask = shifted != -100
        loss = self.torch.nn.functional.cross_entropy(logits[mask].float(), shifted[mask], reduction="sum")
        return float(loss)


def student_engine(student: Path, checkpoint: str):
    """The student through ms-swift's inference engine with its Stage-3 LoRA checkpoint."""
    import torch
    from swift.infer_engine import TransformersEngine

    return TransformersEngine(
        str(student), model_type="qwen3_vl", torch_dtype=torch.float32, adapters=[checkpoint], max_batch_size=0
    )


# --- aggregation -------------------------------------------------------------------------------------


def series(logs: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for row in logs:
        if key in row and "global_step/max_steps" in row:
            steps.append(int(str(row["global_step/max_steps"]).split("/")[0]))
            values.append(float(row[key]))
    return steps, values


def gkd_series(logs: list[dict[str, Any]]) -> tuple[list[int], list[float]]:
    """Per logged step, the GKD part of the training loss: the logged loss minus the term the shim added."""
    term = dict(zip(*series(logs, "vision_kd_loss"), strict=True))
    steps, totals = series(logs, "loss")
    return steps, [total - term.get(step, 0.0) for step, total in zip(steps, totals, strict=True)]


def tail_mean(logs: list[dict[str, Any]], key: str) -> float | None:
    values = series(logs, key)[1][-TAIL:]
    return sum(values) / len(values) if values else None


#: (key, label, where from): the per-run numbers the table reports as mean ± sd over seeds.
METRICS = (
    (
        "indomain_corner",
        "in-domain corner",
        f"greedy, {EVAL_OBJECTS} held-out in-domain images: the answer's first two numbers"
        " are the object's top-left corner, in either syntax, however the rest is written",
    ),
    ("indomain_exact", "in-domain exact box", "greedy: the whole answer is the right box, in either syntax"),
    ("ood_corner", "OOD corner", f"as in-domain corner, {EVAL_OBJECTS} held-out OOD object images"),
    ("ood_exact", "OOD exact box", "as in-domain exact box, on the OOD object images"),
    ("new_format", "OOD new format", "greedy: the whole answer is one `[x1,y1,x2,y2]` box"),
    (
        "hallucination",
        "object on empty OOD",
        f"greedy, {EVAL_EMPTY} empty OOD scenes (right answer `[]`): the answer places an"
        " object somewhere (holds two numbers), in any syntax; every in-domain image had exactly one object",
    ),
    *((f"drift_{t}", f"drift {t}", "held-out OOD, ‖f_s − f_t‖² / ‖f_t‖²") for t in TARGETS),
    ("train_drift_merger", "train drift merger", f"`vision_kd/drift/merger`, last {TAIL} logged steps"),
    ("gkd", "train GKD part", f"`loss` − `vision_kd_loss`, last {TAIL} logged steps"),
    ("nll", "held-out NLL", "new-format answers on OOD objects, nats/token"),
    ("jsd", "held-out JSD", "to the teacher, ms-swift's gkd_loss"),
)


def answer_numbers(score: dict[str, Any]) -> dict[str, float]:
    """What the greedy answers scored: a run's and the teacher's table cells read the same keys."""
    indomain, ood = score["indomain"], score["ood"]
    return {
        "indomain_corner": indomain["corner"],
        "indomain_exact": indomain["exact"],
        "ood_corner": ood["corner"],
        "ood_exact": ood["exact"],
        "new_format": ood["new_format"],
        "hallucination": ood["hallucination"],
    }


def run_numbers(run: dict[str, Any], score: dict[str, Any]) -> dict[str, float]:
    logs = run["logs"]
    total, term = tail_mean(logs, "loss"), tail_mean(logs, "vision_kd_loss") or 0.0
    return {
        **answer_numbers(score),
        **{f"drift_{t}": score["drift"][t] for t in TARGETS},
        "train_drift_merger": tail_mean(logs, "vision_kd/drift/merger"),
        "gkd": total - term,
        "nll": score["nll"],
        "jsd": score["jsd"],
    }


def spread(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def aggregate(results: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    per_arm: dict[str, dict[str, list[float]]] = {}
    for run in results["runs"]:
        numbers = results["numbers"][f"{run['arm']}-s{run['seed']}"]
        for key, value in numbers.items():
            per_arm.setdefault(run["arm"], {}).setdefault(key, []).append(value)
    return {arm: {key: spread(values) for key, values in table.items()} for arm, table in per_arm.items()}


# --- report ------------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "—"
    return "n/a" if math.isnan(value) else f"{value:.{digits}g}"


def cell(stats: dict[str, float], key: str) -> str:
    if key.endswith(("exact", "corner", "format", "hallucination")):
        return f"{stats['mean']:.2f} ± {stats['sd']:.2f}"
    return f"{fmt(stats['mean'])} ± {fmt(stats['sd'], 2)}"


def took(seconds: float | None) -> str:
    return "reused (--reuse)" if seconds is None else f"{seconds:.0f} s"


def shell(argv: list[str], env: dict[str, str], work: Path) -> str:
    text = " ".join(map(str, argv)).replace(str(work), "$WORK").replace(str(Path(sys.executable).parent) + "/", "")
    text = text.replace(str(REPO) + "/", "")
    prefix = " ".join(f"{k}={v}" for k, v in env.items())
    return f"{prefix} {text}".strip()


#: Metrics compared seed by seed against the shim-off arm: a seed fixes the Stage-3 data order and LoRA init,
#: so the difference of two arms within a seed is free of that noise.
PAIRED = ("indomain_corner", "indomain_exact", "ood_corner", "ood_exact", "nll", "gkd")


def paired_rows(results: dict[str, Any]) -> list[str]:
    """Per arm and metric: the mean over seeds of (arm − shim off) within each seed, each seed's difference,
    and how many seeds share the mean's sign; drift as the factor by which the arm reduces it."""
    labels = {key: label for key, label, _ in METRICS}
    head = "| arm − shim off, per seed | drift merger reduced | " + " | ".join(labels[k] for k in PAIRED) + " |"
    rows = [head, "|---" * (len(PAIRED) + 2) + "|"]
    numbers, seeds = results["numbers"], results["seeds"]
    for arm in (Arm(**a) for a in results["arms"]):
        if arm.name == "off":
            continue
        off_drift = statistics.fmean(numbers[f"off-s{s}"]["drift_merger"] for s in seeds)
        arm_drift = statistics.fmean(numbers[f"{arm.name}-s{s}"]["drift_merger"] for s in seeds)
        cells = [f"{off_drift / arm_drift:.0f}x" if arm_drift > 0 else "to 0"]
        for key in PAIRED:
            diffs = [numbers[f"{arm.name}-s{s}"][key] - numbers[f"off-s{s}"][key] for s in seeds]
            mean = statistics.fmean(diffs)
            same = sum((d > 0) == (mean > 0) and d != 0 for d in diffs)
            cells.append(f"{mean:+.3f} ({', '.join(f'{d:+.3f}' for d in diffs)}; {same}/{len(diffs)})")
        rows.append(f"| {arm.label} | " + " | ".join(cells) + " |")
    return rows


def report(results: dict[str, Any], work: Path) -> str:
    """The generated block of EFFECT.md: setup, teacher, the arms table, per-seed rows, plots, commands."""
    stats, timing = aggregate(results), results["timing"]
    teacher = results["teacher_score"]
    arm_list = [Arm(**a) for a in results["arms"]]
    head = "| arm | " + " | ".join(label for _, label, _ in METRICS) + " |"
    rows = [head, "|---" * (len(METRICS) + 1) + "|"]
    rows.append(
        "| teacher (= every student at step 0) | "
        + " | ".join(_teacher_cell(teacher, key) for key, _, _ in METRICS)
        + " |"
    )
    for arm in arm_list:
        rows.append(f"| {arm.label} | " + " | ".join(cell(stats[arm.name][key], key) for key, _, _ in METRICS) + " |")
    per_seed = [
        "| run | in-domain corner / exact | OOD corner / exact | new format | object on empty | drift merger "
        "| held-out NLL | first answers (in-domain · OOD) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in results["runs"]:
        key = f"{run['arm']}-s{run['seed']}"
        n, score = results["numbers"][key], results["scores"][key]
        samples = " · ".join(f"`{a}`" for a in (*score["indomain"]["samples"][:2], *score["ood"]["samples"][:2]))
        per_seed.append(
            f"| {run['arm']} seed {run['seed']} | {n['indomain_corner']:.2f} / {n['indomain_exact']:.2f} "
            f"| {n['ood_corner']:.2f} / {n['ood_exact']:.2f} | {n['new_format']:.2f} | {n['hallucination']:.2f} "
            f"| {fmt(n['drift_merger'])} | {fmt(n['nll'])} | {samples.replace('|', chr(92) + '|')} |"
        )
    definitions = "; ".join(f"*{label}*: {where}" for _, label, where in METRICS)
    commands = ["# teacher: in-domain, legacy format", shell(results["teacher_argv"], {}, work)]
    for run in results["runs"]:
        if run["seed"] == results["seeds"][0]:
            commands += [f"# Stage 3, arm {run['arm']} (first seed)", shell(run["argv"], run["env"], work)]
    stage3 = [r["seconds"] for r in results["runs"] if r["seconds"] is not None]
    version_text = ", ".join(f"{k} {v}" for k, v in results["versions"].items())
    return "\n".join(
        [
            MARK_BEGIN,
            "## Results (generated by `tests/benchmarks/effect_experiment.py`)",
            "",
            f"Machine: {results['machine']} (load average before / after: {results['load_before']} / "
            f"{results['load_after']}). Versions: {version_text}.",
            "",
            f"Wall time {timing['total'] / 60:.0f} min: data {timing['data']:.0f} s, teacher `swift sft` "
            f"{took(timing['teacher'])}, {len(results['runs'])} Stage-3 runs "
            + (f"{sum(stage3) / 60:.0f} min ({min(stage3):.0f}–{max(stage3):.0f} s each)" if stage3 else "reused")
            + f", evaluation {timing['evaluate'] / 60:.0f} min.",
            "",
            f"Teacher: {results['teacher_steps']} `swift sft` steps on {TEACHER_ROWS} in-domain rows. Greedy on "
            f"{EVAL_OBJECTS} held-out in-domain images: exact box {teacher['indomain']['exact']:.2f} (chance 1/9), "
            f"corner {teacher['indomain']['corner']:.2f}, legacy format {teacher['indomain']['legacy_format']:.2f}; "
            f"on {EVAL_OBJECTS} OOD object images: exact box {teacher['ood']['exact']:.2f}, new format "
            f"{teacher['ood']['new_format']:.2f}; it places an object on {teacher['ood']['hallucination']:.2f} of "
            f"the {EVAL_EMPTY} empty OOD scenes. Stage 3: {results['stage3_steps']} steps at learning rate "
            f"{results['stage3_lr']}, seeds {', '.join(map(str, results['seeds']))}.",
            "",
            f"Mean ± standard deviation over the {len(results['seeds'])} seeds of each arm. {definitions}.",
            "",
            *rows,
            "",
            "Paired by seed: each cell is the mean over seeds of (arm − shim off) within a seed, then each "
            "seed's difference and how many seeds share the mean's sign; *drift merger reduced*: shim off's "
            "mean held-out merger drift over the arm's.",
            "",
            *paired_rows(results),
            "",
            "<details><summary>Every run</summary>",
            "",
            *per_seed,
            "",
            "</details>",
            "",
            "![arms](img/effect_arms.png)",
            "",
            "![drift during training](img/effect_drift.png)",
            "",
            "<details><summary>Exact commands</summary>",
            "",
            "`$WORK` is `--work`; the launchers are the virtualenv's; every command ran with `HF_HUB_OFFLINE=1 "
            "MODELSCOPE_OFFLINE=1 CUDA_VISIBLE_DEVICES= TOKENIZERS_PARALLELISM=false` "
            "(`vkd_shim.testing.launch.gkd_env`); the other seeds differ only in `--seed`, `--data_seed` and the "
            "output directory.",
            "",
            "```bash",
            *commands,
            "```",
            "",
            "</details>",
            MARK_END,
        ]
    )


def _teacher_cell(teacher: dict[str, Any], key: str) -> str:
    values = {**answer_numbers(teacher), "nll": teacher["nll"]}
    if key in values:
        return f"{values[key]:.2f}" if key != "nll" else fmt(values[key])
    return "0" if key.startswith(("drift", "jsd")) else "—"


def plot(results: dict[str, Any], img_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    arm_list = [Arm(**a) for a in results["arms"]]
    stats = aggregate(results)
    colours = plt.get_cmap("viridis")
    colour = {arm.name: colours(i / max(1, len(arm_list) - 1)) for i, arm in enumerate(arm_list)}
    panels = [m for m in METRICS if not m[0].startswith("drift_deepstack")]
    fig, axes = plt.subplots(2, (len(panels) + 1) // 2, figsize=(4 * ((len(panels) + 1) // 2), 8))
    for ax, (key, label, _) in zip(axes.ravel(), panels, strict=False):
        for x, arm in enumerate(arm_list):
            values = [results["numbers"][f"{arm.name}-s{s}"][key] for s in results["seeds"]]
            ax.scatter([x] * len(values), values, color=colour[arm.name], alpha=0.5, s=18)
            ax.errorbar(x, stats[arm.name][key]["mean"], yerr=stats[arm.name][key]["sd"], fmt="o",
                        color=colour[arm.name], capsize=4, ms=7)  # fmt: skip
        ax.set_title(label, fontsize=10)
        ax.set_xticks(range(len(arm_list)), [a.name for a in arm_list], fontsize=8)
        if key.startswith(("drift", "train_drift")):
            ax.set_yscale("symlog", linthresh=1e-6)
            ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(panels) :]:
        ax.axis("off")
    fig.suptitle("Stage-3 arms: every seed (dots), mean ± sd (bars)")
    fig.tight_layout()
    fig.savefig(img_dir / "effect_arms.png", dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for arm in arm_list:
        logs = [r["logs"] for r in results["runs"] if r["arm"] == arm.name]
        for ax, curve in zip(axes, (lambda x: series(x, "vision_kd/drift/merger"), gkd_series), strict=True):
            curves = [curve(log) for log in logs]
            steps = curves[0][0]
            columns = list(zip(*(values for _, values in curves), strict=True))
            ax.plot(steps, [statistics.fmean(c) for c in columns], color=colour[arm.name], label=arm.label)
            low, high = [min(c) for c in columns], [max(c) for c in columns]
            ax.fill_between(steps, low, high, color=colour[arm.name], alpha=0.15)
    axes[0].set_yscale("symlog", linthresh=1e-6)
    axes[0].set_ylim(bottom=0)
    axes[1].set_yscale("log")
    axes[0].set_title("relative drift of the merger output during Stage 3 (train batches)")
    axes[1].set_title("GKD part of the training loss (loss − vision_kd_loss)")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(img_dir / "effect_drift.png", dpi=100)
    plt.close(fig)


# --- entry point -------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("vkd-shim", "ms-swift", "torch", "transformers", "trl", "peft"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def load_average() -> str:
    try:
        return " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def evaluate(results: dict[str, Any], teacher: dict[str, Any], data: dict[str, Path]) -> None:
    evaluator = Evaluator(teacher["teacher"], data)
    results["teacher_score"] = evaluator.score(evaluator.teacher)
    print(f"  teacher: {json.dumps({k: results['teacher_score'][k] for k in ('indomain', 'ood')})}", flush=True)
    for run in results["runs"]:
        key = f"{run['arm']}-s{run['seed']}"
        score = evaluator.score(student_engine(teacher["student"], run["checkpoint"]))
        results["scores"][key] = score
        results["numbers"][key] = run_numbers(run, score)
        print(f"  evaluated {key}: {json.dumps(results['numbers'][key])}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/effect"), help="scratch directory")
    parser.add_argument("--out", type=Path, default=REPO / "docs", help="where EFFECT.md and img/ go")
    parser.add_argument("--weights", type=float, nargs="+", default=list(WEIGHTS), help="vision-KD weights")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--arms", nargs="+", default=None, help="only these arms (names: off, kd<w>, frozen)")
    parser.add_argument("--teacher-steps", type=int, default=TEACHER_STEPS)
    parser.add_argument("--stage3-steps", type=int, default=STAGE3_STEPS)
    parser.add_argument("--stage3-lr", default=STAGE3_LR)
    parser.add_argument("--teacher-only", action="store_true", help="train and score the teacher, then stop")
    parser.add_argument("--reuse", action="store_true", help="keep data, teacher and finished runs in --work")
    parser.add_argument("--report-only", action="store_true", help="redraw from --work/results.json")
    opts = parser.parse_args()
    work = opts.work.resolve()
    if opts.report_only:
        publish(json.loads((work / "results.json").read_text(encoding="utf-8")), work, opts.out)
        return 0
    if not opts.reuse:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    # No VKD_* from the caller's shell: each arm sets exactly its own.
    env = {k: v for k, v in launch.gkd_env(cache_dir=work / "cache").items() if not k.startswith("VKD_")}
    os.environ.update({k: env[k] for k in ("HF_HUB_OFFLINE", "MODELSCOPE_OFFLINE", "MODELSCOPE_CACHE")})
    chosen = [a for a in arms(tuple(opts.weights)) if opts.arms is None or a.name in opts.arms]
    results: dict[str, Any] = {
        "machine": machine(),
        "versions": versions(),
        "load_before": load_average(),
        "seeds": opts.seeds,
        "arms": [dataclasses.asdict(a) for a in chosen],
        "teacher_steps": opts.teacher_steps,
        "stage3_steps": opts.stage3_steps,
        "stage3_lr": opts.stage3_lr,
        "runs": [],
        "scores": {},
        "numbers": {},
        "timing": {},
    }
    started = tick = time.perf_counter()
    data = build_data(work / "data", SEED)
    results["timing"]["data"] = time.perf_counter() - tick
    teacher = train_teacher(work, data, opts.teacher_steps, env, opts.reuse)
    results["teacher_argv"], results["timing"]["teacher"] = teacher["argv"], teacher["seconds"]
    if opts.teacher_only:
        evaluator = Evaluator(teacher["teacher"], data)
        print(json.dumps(evaluator.score(evaluator.teacher), indent=2, default=str))
        return 0
    for seed in opts.seeds:  # seeds outermost: a shorter budget still gets every arm
        for arm in chosen:
            results["runs"].append(run_stage3(work, data, teacher, arm, seed, opts, env))
    tick = time.perf_counter()
    evaluate(results, teacher, data)
    results["timing"]["evaluate"] = time.perf_counter() - tick
    results["timing"]["total"] = time.perf_counter() - started
    results["load_after"] = load_average()
    (work / "results.json").write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    publish(results, work, opts.out)
    return 0


def publish(results: dict[str, Any], work: Path, out: Path) -> None:
    plot(results, out / "img")
    section = report(results, work)
    bench_startup.write_section(out / "EFFECT.md", section, begin=MARK_BEGIN, end=MARK_END, title="# Effect experiment")
    print(section)


if __name__ == "__main__":
    sys.exit(main())
