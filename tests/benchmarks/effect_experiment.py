"""Effect experiment: does vision KD keep the aligner near the teacher while LoRA learns a new box format?

The seed proposal's smoke run, at toy scale and on CPU, with the real launchers:

1. Teacher: a tiny random-init Qwen3-VL trained with ``swift sft`` (full) on in-domain scenes (one
   coloured rectangle on a plain background, in a 3 x 3 grid of 32-pixel cells) to answer in the
   legacy box format ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>`` (Qwen2-VL's grounding syntax).
2. Student: a byte copy of the teacher. Stage 3 is ``swift rlhf --rlhf_type gkd`` with LoRA on the
   language stack and a trainable aligner (``--freeze_aligner false``: LoRA on the merger and the
   deepstack mergers too), on out-of-domain scenes (noisy, striped backgrounds; ellipses and
   triangles) whose answers use a new format ``[x1,y1,x2,y2]``, with an SFT term
   (``--sft_alpha 1``). One run without the shim (weight 0) and one per vision-KD weight through
   ``vkd-run`` with the shipped configs (``configs/visual_kd_base.yaml:configs/stage3_visual_kd.yaml``)
   and ``VKD_WEIGHT``; same seeds everywhere.
   With a wider teacher too (GKD's usual pair: a wider language model, so a wider aligner output, over
   the same vision tower and tokens), trained by the same SFT recipe: the same student, one run
   without the shim and one with ``VKD_DISTANCE=relation``, the one distance defined across widths.
3. Evaluation on held-out out-of-domain scenes, in this process: aligner drift from the teacher
   (relative squared error of the merger and deepstack outputs, read with ``vkd_shim.capture``), the
   GKD loss terms with ms-swift's own ``gkd_loss`` and the student's answer NLL (teacher-forced), and
   greedy answers through ms-swift's ``TransformersEngine`` (which syntax the answer opens with,
   well-formed rate, box accuracy, coordinate error).

Writes ``<out>/img/effect_*.png`` and the generated block of ``<out>/EFFECT.md``; keeps every run,
log and ``results.json`` under ``--work``. Usage::

    python tests/benchmarks/effect_experiment.py --work /tmp/effect --out docs/

Runs in minutes on 2 CPU cores; ``--reuse`` keeps the data, teacher and runs already finished under
``--work`` (they are rebuilt identically from the seeds otherwise).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import shutil
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

# Scene geometry: a 96 x 96 image is 3 x 3 merged vision tokens (32 x 32 pixels each, see vkd_shim.testing.models),
# and each object fills one grid cell, so a box is one of 9 and every cell is one visual token.
GRID = 3
CELL = 32
SIZE = GRID * CELL
PROMPT = "<image>Locate the object."
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 70, 220),
    "yellow": (230, 200, 40),
    "purple": (140, 60, 170),
}
# A second in-domain task whose answers use "[" and "]". The teacher must have produced those tokens
# somewhere (as any real model has): SFT pushes down the logits of every token it never sees as a
# target, and LoRA on a 3-layer, 64-wide stack then cannot lift "[" within a short Stage 3.
LIST_PROMPT = "<image>Name the colour as a list."
LIST_EVERY = 4
PLAIN_BACKGROUNDS = ((255, 255, 255), (235, 235, 235), (20, 20, 20))
OOD_BACKGROUNDS = ((120, 110, 90), (60, 90, 120), (150, 150, 150))

LEGACY_RE = re.compile(r"<\|box_start\|>\((\d+),(\d+)\),\((\d+),(\d+)\)<\|box_end\|>")
NEW_RE = re.compile(r"\[(\d+),(\d+),(\d+),(\d+)\]")

WEIGHTS = (0.0, 0.01, 0.1, 1.0)
# GKD's usual pair: a bigger teacher of the same family (same vision tower, so the same visual tokens; a
# wider language model and so a wider aligner output), distilled with the one distance that compares
# features of different widths. `mse` is refused before loading for this pair.
WIDE_MODEL = {"text_config": {"hidden_size": 96, "intermediate_size": 192}, "vision_config": {"out_hidden_size": 96}}
WIDE_WEIGHTS = (0.0, 1.0)
WIDE_DISTANCE = "relation"
CONFIGS = (REPO / "configs" / "visual_kd_base.yaml", REPO / "configs" / "stage3_visual_kd.yaml")
SEED = 42
# ms-swift's GKD defaults for --rlhf_type gkd (beta 0.5 = symmetric JSD, temperature 0.9); the
# held-out loss below is computed with the same values.
GKD_BETA = 0.5
GKD_TEMPERATURE = 0.9
TARGETS = ("merger", "deepstack_0", "deepstack_1")
# The teacher-forced pass on held-out rows runs in chunks: full-vocabulary logits (151936 wide)
# of two models for all rows at once would need several GiB.
EVAL_CHUNK = 12


def legacy_answer(box: tuple[int, int, int, int]) -> str:
    return "<|box_start|>({},{}),({},{})<|box_end|>".format(*box)


def new_answer(box: tuple[int, int, int, int]) -> str:
    return "[{},{},{},{}]".format(*box)


def draw_scene(rng: random.Random, cell: int, out_of_domain: bool) -> tuple[Any, tuple[int, int, int, int], str]:
    """One object in grid cell `cell`; returns the image, its box in pixels and its colour name.

    In-domain: a rectangle on a plain background. Out-of-domain: an ellipse or a triangle on a noisy
    background, striped half of the time, so the vision features differ from anything the teacher saw.
    """
    import numpy as np
    from PIL import Image, ImageDraw

    col, row = cell % GRID, cell // GRID
    box = (col * CELL, row * CELL, (col + 1) * CELL, (row + 1) * CELL)
    if out_of_domain:
        noise = np.random.default_rng(rng.randrange(2**31)).normal(0.0, 40.0, (SIZE, SIZE, 3))
        pixels = np.asarray(rng.choice(OOD_BACKGROUNDS), dtype=np.float64) + noise
        if rng.random() < 0.5:
            diagonal = np.add.outer(np.arange(SIZE), np.arange(SIZE)) // 6 % 2
            pixels += 50.0 * diagonal[..., None]
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    else:
        image = Image.new("RGB", (SIZE, SIZE), rng.choice(PLAIN_BACKGROUNDS))
    draw = ImageDraw.Draw(image)
    inner = (box[0] + 3, box[1] + 3, box[2] - 4, box[3] - 4)
    name = rng.choice(sorted(COLOURS))
    colour = COLOURS[name]
    if not out_of_domain:
        draw.rectangle(inner, fill=colour)
    elif rng.random() < 0.5:
        draw.ellipse(inner, fill=colour)
    else:
        draw.polygon([(inner[0], inner[3]), (inner[2], inner[3]), ((inner[0] + inner[2]) // 2, inner[1])], fill=colour)
    return image, box, name


def write_split(
    root: Path,
    name: str,
    count: int,
    *,
    out_of_domain: bool,
    legacy: bool,
    seed: int,
    list_task: bool = False,
) -> Path:
    """ms-swift "messages" jsonl with PNGs. Held-out splits cycle through the cells (balanced);
    train splits draw cells at random. With `list_task`, every LIST_EVERY-th row asks for the colour
    as a list instead of the box."""
    rng = random.Random(seed)
    media = root / "media"
    media.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        cell = index % (GRID * GRID) if "eval" in name else rng.randrange(GRID * GRID)
        image, box, colour = draw_scene(rng, cell, out_of_domain)
        path = media / f"{name}_{index}.png"
        image.save(path)
        prompt, answer = PROMPT, legacy_answer(box) if legacy else new_answer(box)
        if list_task and index % LIST_EVERY == LIST_EVERY - 1:
            prompt, answer = LIST_PROMPT, f"[{colour}]"
        rows.append(
            {
                "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
                "images": [str(path)],
                "box": list(box),
            }
        )
    path = root / f"{name}.jsonl"
    path.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows), encoding="utf-8")
    return path


def build_data(root: Path, seed: int) -> dict[str, Path]:
    return {
        "indomain_train": write_split(
            root, "indomain_train", 192, out_of_domain=False, legacy=True, seed=seed, list_task=True
        ),
        "indomain_eval": write_split(root, "indomain_eval", 18, out_of_domain=False, legacy=True, seed=seed + 1),
        "ood_train": write_split(root, "ood_train", 64, out_of_domain=True, legacy=False, seed=seed + 2),
        "ood_eval": write_split(root, "ood_eval", 36, out_of_domain=True, legacy=False, seed=seed + 3),
    }


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
    """Model files only: ms-swift reads a training `args.json` found in a model dir as the
    defaults of the next run, which must not leak from the teacher's SFT into Stage 3."""
    target.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        shutil.copy2(checkpoint / name, target / name)


def swift() -> str:
    return str(Path(sys.executable).with_name("swift"))


def teacher_command(init: Path, data: dict[str, Path], output: Path, steps: int) -> list[str]:
    """Full fine-tuning, vision tower and aligner included, at a high learning rate: a random-init model
    has to learn the answer syntax from scratch in a few dozen steps."""
    return [
        swift(), "sft",
        "--model", str(init), "--model_type", "qwen3_vl", "--torch_dtype", "float32",
        "--dataset", str(data["indomain_train"]), "--split_dataset_ratio", "0",
        "--tuner_type", "full", "--freeze_vit", "false", "--freeze_aligner", "false",
        "--max_steps", str(steps), "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1",
        "--learning_rate", "1e-2", "--warmup_ratio", "0.05",
        "--logging_steps", "5",
        "--save_strategy", "steps", "--save_steps", str(steps), "--save_only_model", "true",
        "--report_to", "none", "--dataloader_num_workers", "0",
        "--seed", str(SEED), "--data_seed", str(SEED), "--check_model", "false",
        "--output_dir", str(output),
    ]  # fmt: skip


def train_teacher(
    init: Path, data: dict[str, Path], output: Path, steps: int, env: dict, reuse: bool, copies: tuple[Path, ...]
) -> tuple[list[str], float | None]:
    """`swift sft` from `init`, then the model files of its checkpoint into each of `copies` (separate
    directories: ms-swift compares --model and --teacher_model as strings). Returns argv and wall time
    (None when reused)."""
    argv = teacher_command(init, data, output, steps)
    if reuse and (copies[0] / "model.safetensors").exists():
        return argv, None
    shutil.rmtree(output, ignore_errors=True)
    seconds = run_logged(argv, env, output.with_suffix(".log"))
    checkpoint = last_checkpoint(output)
    if checkpoint is None:
        raise RuntimeError(f"swift sft left no checkpoint under {output}")
    for target in copies:
        copy_model(checkpoint, target)
    return argv, seconds


def stage3_command(teacher: Path, student: Path, data: dict[str, Path], output: Path, steps: int) -> list[str]:
    """Off-policy GKD (``--lmbda 0``: every step distils on the dataset's new-format answers, so every step
    also carries the SFT term; ms-swift drops ``sft_alpha`` on on-policy steps) with LoRA on the language
    stack and, through ``--freeze_aligner false``, on the merger and deepstack mergers."""
    return [
        swift(), "rlhf", "--rlhf_type", "gkd",
        "--model", str(student), "--model_type", "qwen3_vl",
        "--teacher_model", str(teacher), "--teacher_model_type", "qwen3_vl",
        "--torch_dtype", "float32",
        "--dataset", str(data["ood_train"]), "--split_dataset_ratio", "0",
        "--tuner_type", "lora", "--freeze_aligner", "false",
        "--lmbda", "0", "--sft_alpha", "1",
        "--max_steps", str(steps), "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
        "--learning_rate", "5e-3", "--max_completion_length", "24",
        "--logging_steps", "1", "--eval_strategy", "no",
        "--save_strategy", "steps", "--save_steps", str(steps), "--save_only_model", "true",
        "--report_to", "none", "--dataloader_num_workers", "0",
        "--seed", str(SEED), "--data_seed", str(SEED), "--check_model", "false",
        "--output_dir", str(output),
    ]  # fmt: skip


def weight_label(weight: float) -> str:
    return "0 (shim off)" if weight == 0 else f"{weight:g}"


def run_stage3(
    work: Path,
    data: dict[str, Path],
    teacher: Path,
    student: Path,
    weight: float,
    steps: int,
    env: dict,
    reuse: bool,
    pair: str = "",
    distance: str | None = None,
) -> dict[str, Any]:
    """One Stage-3 run. Weight 0 is the plain launcher without the shim (the true baseline, not a
    zero-weight config); the others go through ``vkd-run`` with the shipped configs and VKD_WEIGHT
    (and VKD_DISTANCE when `distance` is given). `pair` names the teacher's runs apart ("wide-")."""
    run_dir = work / "runs" / f"{pair}w{weight:g}"
    output = run_dir / "output"
    events = run_dir / "vkd_events.jsonl"
    argv = stage3_command(teacher, student, data, output, steps)
    run_env = dict(env)
    if weight > 0:
        vkd_run = str(Path(sys.executable).with_name("vkd-run"))
        argv = [
            vkd_run,
            "--config",
            os.pathsep.join(str(c) for c in CONFIGS),
            "--log-file",
            str(events),
            *argv,
        ]
        run_env["VKD_WEIGHT"] = f"{weight:g}"
        if distance is not None:
            run_env["VKD_DISTANCE"] = distance
    seconds = None
    if not (reuse and last_checkpoint(output)):
        shutil.rmtree(run_dir, ignore_errors=True)
        seconds = run_logged(argv, run_env, run_dir / "launcher.log")
    checkpoint = last_checkpoint(output)
    if checkpoint is None:
        raise RuntimeError(f"no checkpoint under {output}")
    event_counts: dict[str, int] = {}
    if events.exists():
        for line in events.read_text(encoding="utf-8").splitlines():
            if line.strip():
                name = json.loads(line)["event"]
                event_counts[name] = event_counts.get(name, 0) + 1
    logs = launch.read_logging_jsonl(output)
    # A run that silently trained without the term would turn the comparison into noise: check that the
    # shim attached and that every logged step carries vision_kd_loss.
    if weight > 0 and (
        event_counts.get("vkd.attach") != 1 or not all("vision_kd_loss" in row for row in logs if "loss" in row)
    ):
        raise RuntimeError(f"weight {weight:g}: vision KD did not run (events {event_counts}); see {run_dir}")
    return {
        "weight": weight,
        "argv": argv,
        "env": {k: run_env[k] for k in ("VKD_WEIGHT", "VKD_DISTANCE") if k in run_env} if weight > 0 else {},
        "seconds": seconds,
        "checkpoint": str(checkpoint),
        "logs": logs,
        "events": event_counts,
    }


# --- evaluation (in process) -----------------------------------------------------------------


def parse_answer(text: str) -> tuple[str, tuple[int, ...] | None]:
    """(opening, box): which syntax the answer opens with ("new", "legacy", "other"), and the box when
    the whole answer is one well-formed box in either syntax."""
    text = text.strip()
    opening = "new" if text.startswith("[") else "legacy" if text.startswith("<|box_start|>") else "other"
    for pattern in (NEW_RE, LEGACY_RE):
        match = pattern.fullmatch(text)
        if match:
            return opening, tuple(int(v) for v in match.groups())
    return opening, None


def answer_metrics(answers: list[str], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Rates over all rows. The opening token is the format decision the proposal is about; whether
    the rest is a well-formed box, and which box, comes after it."""
    openings = {"new": 0, "legacy": 0, "other": 0}
    wellformed, exact, errors = 0, 0, []
    for text, row in zip(answers, rows, strict=True):
        opening, box = parse_answer(text)
        openings[opening] += 1
        if box is not None:
            wellformed += 1
            exact += list(box) == row["box"]
            errors.extend(abs(p - t) for p, t in zip(box, row["box"], strict=True))
    n = len(rows)
    return {
        "opens_new": openings["new"] / n,
        "opens_legacy": openings["legacy"] / n,
        "wellformed": wellformed / n,
        "box_accuracy": exact / n,
        "coord_mae": sum(errors) / len(errors) if errors else math.nan,
        "parsed": wellformed,
        "samples": answers[:6],
    }


def constant_box_mae(rows: list[dict[str, Any]]) -> float:
    """Coordinate error of always answering the centre cell: what a model that ignores the image scores."""
    centre = (CELL, CELL, 2 * CELL, 2 * CELL)
    errors = [abs(c - t) for row in rows for c, t in zip(centre, row["box"], strict=True)]
    return sum(errors) / len(errors)


class Evaluator:
    """Holds the teacher and the encoded held-out rows; scores one model at a time against them."""

    def __init__(self, teacher_dir: Path, rows: list[dict[str, Any]], relation: bool = False) -> None:
        import torch
        from swift.infer_engine import TransformersEngine

        self.torch = torch
        self.rows = rows
        # A teacher of another width: drift is the `relation` distance (the only one defined across widths).
        self.relation = relation
        self.teacher = TransformersEngine(str(teacher_dir), model_type="qwen3_vl", torch_dtype=torch.float32)
        self.batches = self._encode(self.teacher.template)

    def _encode(self, template) -> list[dict[str, Any]]:
        """Chunks of rows encoded by ms-swift's Qwen3-VL template exactly as in training (prompt, image
        tokens, answer labels), right-padded by hand: the template's own collator would load a model
        to compute rope positions, which the model's forward computes itself from mm_token_type_ids."""
        torch = self.torch
        pad = models.QWEN_ADDED_TOKENS[models.PAD_TOKEN][0]
        template.set_mode("train")
        try:
            encoded = [template.encode({"messages": r["messages"], "images": r["images"]}) for r in self.rows]
        finally:
            template.set_mode("transformers")
        batches = []
        for start in range(0, len(encoded), EVAL_CHUNK):
            chunk = encoded[start : start + EVAL_CHUNK]
            lengths = torch.tensor([len(e["input_ids"]) for e in chunk])
            length = int(lengths.max())

            def padded(key: str, value: int, chunk=chunk, length=length) -> torch.Tensor:
                seqs = [e[key].tolist() if isinstance(e[key], torch.Tensor) else list(e[key]) for e in chunk]
                return torch.tensor([seq + [value] * (length - len(seq)) for seq in seqs])

            labels = padded("labels", -100)
            # Logits only from the first answer position on, as ms-swift's prepare_logits_to_keep does.
            keep = length - int((labels != -100).int().argmax(-1).min()) + 1
            batches.append(
                {
                    "inputs": {
                        "input_ids": padded("input_ids", pad),
                        "attention_mask": (torch.arange(length)[None, :] < lengths[:, None]).long(),
                        "mm_token_type_ids": padded("mm_token_type_ids", 0),
                        "pixel_values": torch.cat([e["pixel_values"] for e in chunk]),
                        "image_grid_thw": torch.cat([e["image_grid_thw"] for e in chunk]),
                        "logits_to_keep": keep,
                    },
                    "labels": labels[:, -keep:],
                }
            )
        return batches

    def score(self, engine) -> dict[str, Any]:
        """Drift, held-out GKD terms and greedy answers of a trained student (`engine.model`)."""
        torch = self.torch
        from swift.rlhf_trainers.gkd_loss import TeacherOutput, gkd_loss

        from vkd_shim.capture import FeatureCapture

        capture = FeatureCapture(engine.model, self.teacher.model, ("merger", "deepstack"))
        capture.attach()
        squared = dict.fromkeys(TARGETS, 0.0)
        reference = dict.fromkeys(TARGETS, 0.0)
        elements = dict.fromkeys(TARGETS, 0)
        jsd_sum = nll_sum = 0.0
        tokens = 0
        try:
            for batch in self.batches:
                with torch.no_grad(), capture.window():
                    student_out = engine.model(**batch["inputs"])
                    teacher_out = self.teacher.model(**batch["inputs"])
                    features = capture.take()
                # Features are keyed by capture.Target; the report keys them by Target.name.
                by_name = {role: {key.name: value for key, value in side.items()} for role, side in features.items()}
                if self.relation:
                    images = self._relation(features, batch["inputs"]["image_grid_thw"], engine.model)
                    for target, value in images.items():
                        squared[target] += value
                        elements[target] += len(batch["inputs"]["image_grid_thw"])
                    by_name = {}
                for target in TARGETS if by_name else ():
                    s, t = by_name["student"][target].float(), by_name["teacher"][target].float()
                    squared[target] += float(((s - t) ** 2).sum())
                    reference[target] += float((t**2).sum())
                    elements[target] += t.numel()
                # Same shift and JSD as GKDTrainer._compute_jsd_loss.
                shifted = torch.roll(batch["labels"], shifts=-1, dims=1)
                teacher_side = TeacherOutput(full_logits=teacher_out.logits, labels=shifted)
                with torch.no_grad():
                    jsd, valid = gkd_loss(student_out.logits, teacher_side, shifted, GKD_BETA, GKD_TEMPERATURE)
                jsd_sum += float(jsd)
                nll_sum += self._nll_sum(student_out.logits, shifted)
                tokens += int(valid)
        finally:
            capture.detach()
        if self.relation:
            drift, scale = {target: squared[target] / elements[target] for target in TARGETS}, None
        else:
            drift = {target: squared[target] / reference[target] for target in TARGETS}
            # The scale `distance: mse` works in: the teacher's mean squared feature value.
            scale = {target: reference[target] / elements[target] for target in TARGETS}
        return {
            "drift": drift,
            "teacher_mean_square": scale,
            "jsd": jsd_sum / tokens,
            "nll": nll_sum / tokens,
            **greedy(engine, self.rows),
        }

    def score_teacher(self) -> dict[str, Any]:
        """The teacher against itself: drift and JSD are zero by definition; its NLL of the new-format
        answers is the starting point of every student."""
        torch = self.torch
        nll_sum, tokens = 0.0, 0
        for batch in self.batches:
            with torch.no_grad():
                logits = self.teacher.model(**batch["inputs"]).logits
            shifted = torch.roll(batch["labels"], shifts=-1, dims=1)
            nll_sum += self._nll_sum(logits, shifted)
            tokens += int((shifted != -100).sum())
        return {
            "drift": dict.fromkeys(TARGETS, 0.0),
            "jsd": 0.0,
            "nll": nll_sum / tokens,
            **greedy(self.teacher, self.rows),
        }

    def _relation(self, features: dict, grid, model) -> dict[str, float]:
        """Per target, the sum over this chunk's images of the shim's own `relation` distance (its image
        mean times the image count; every held-out image has the same number of tokens)."""
        from vkd_shim.loss import vision_kd_loss

        merge = model.config.vision_config.spatial_merge_size**2
        tokens = [int(t) * int(h) * int(w) // merge for t, h, w in grid.tolist()]
        student, teacher = features["student"], features["teacher"]
        out = vision_kd_loss(
            student, teacher, weights=dict.fromkeys(student, 1.0), distance="relation", scale=1.0,
            segments=dict.fromkeys(student, tokens),
        )  # fmt: skip
        return {target.name: float(value) * len(tokens) for target, value in out.per_target.items()}

    def _nll_sum(self, logits, shifted) -> float:
        mask = shifted != -100
        with self.torch.no_grad():
            loss = self.torch.nn.functional.cross_entropy(logits[mask].float(), shifted[mask], reduction="sum")
        return float(loss)


def greedy(engine, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Greedy answers to the rows' prompts through ms-swift's inference engine (its chat template)."""
    from swift.infer_engine import InferRequest, RequestConfig

    requests = [InferRequest(messages=r["messages"][:1], images=r["images"]) for r in rows]
    responses = engine.infer(requests, RequestConfig(max_tokens=20, temperature=0), use_tqdm=False)
    return answer_metrics([r.choices[0].message.content for r in responses], rows)


def student_engine(student: Path, checkpoint: str | None = None):
    """The student through ms-swift's inference engine, with a Stage-3 LoRA checkpoint when given."""
    import torch
    from swift.infer_engine import TransformersEngine

    adapters = [checkpoint] if checkpoint else None
    # max_batch_size=0: all held-out prompts decode as one batch.
    return TransformersEngine(
        str(student), model_type="qwen3_vl", torch_dtype=torch.float32, adapters=adapters, max_batch_size=0
    )


def evaluate(
    teacher: Path,
    student: Path,
    data: dict[str, Path],
    runs: list[dict[str, Any]],
    wide_teacher: Path | None = None,
    wide_runs: list[dict[str, Any]] = (),
) -> dict[str, Any]:
    ood = [json.loads(line) for line in data["ood_eval"].read_text(encoding="utf-8").splitlines()]
    indomain = [json.loads(line) for line in data["indomain_eval"].read_text(encoding="utf-8").splitlines()]
    evaluator = Evaluator(teacher, ood)
    evaluator.teacher.max_batch_size = 0
    result = {
        "teacher_indomain": greedy(evaluator.teacher, indomain),
        "teacher_ood": evaluator.score_teacher(),
        "constant_box_mae": constant_box_mae(ood),
        "runs": {},
    }
    for run in runs:
        result["runs"][f"{run['weight']:g}"] = evaluator.score(student_engine(student, run["checkpoint"]))
        print(f"  evaluated weight {run['weight']:g}", flush=True)
    if wide_runs:
        wide = Evaluator(wide_teacher, ood, relation=True)
        wide.teacher.max_batch_size = 0
        result["wide_teacher_indomain"] = greedy(wide.teacher, indomain)
        result["wide_teacher_ood"] = greedy(wide.teacher, ood)
        # Where every wide-teacher run starts: the student before Stage 3, against the wide teacher.
        result["wide_start"] = wide.score(student_engine(student))
        result["wide_runs"] = {}
        for run in wide_runs:
            result["wide_runs"][f"{run['weight']:g}"] = wide.score(student_engine(student, run["checkpoint"]))
            print(f"  evaluated the wide teacher's weight {run['weight']:g}", flush=True)
    return result


# --- plots and report ------------------------------------------------------------------------


def series(logs: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for row in logs:
        if key in row and "global_step/max_steps" in row:
            steps.append(int(str(row["global_step/max_steps"]).split("/")[0]))
            values.append(float(row[key]))
    return steps, values


def plot(runs: list[dict[str, Any]], evaluation: dict[str, Any], img_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    img_dir.mkdir(parents=True, exist_ok=True)
    colours = plt.get_cmap("viridis")
    colour = {run["weight"]: colours(i / max(1, len(runs) - 1)) for i, run in enumerate(runs)}
    # The GKD curves of all weights nearly coincide; dashes of different lengths keep each one visible.
    dashes = ("-", "--", "-.", ":")
    style = {run["weight"]: dashes[i % len(dashes)] for i, run in enumerate(runs)}

    fig, grid = plt.subplots(2, 2, figsize=(12, 8))
    axes = grid.ravel()
    for run in runs:
        w, label = run["weight"], weight_label(run["weight"])
        steps, total = series(run["logs"], "loss")
        axes[0].plot(steps, total, marker=".", color=colour[w], ls=style[w], label=label)
        kd_steps, kd = series(run["logs"], "vision_kd_loss")
        kd_by_step = dict(zip(kd_steps, kd, strict=True))
        gkd = [value - kd_by_step.get(step, 0.0) for step, value in zip(steps, total, strict=True)]
        axes[1].plot(steps, gkd, marker=".", color=colour[w], ls=style[w], label=label)
        # Log axes: the first step's term is exactly 0 (the features start equal, and warm-up).
        positive = [(step, value) for step, value in zip(kd_steps, kd, strict=True) if value > 0]
        if positive:
            axes[2].plot(*zip(*positive, strict=True), marker=".", color=colour[w], label=label)
        merger = [(st, v) for st, v in zip(*series(run["logs"], "vision_kd/merger"), strict=True) if v > 0]
        if merger:
            axes[3].plot(*zip(*merger, strict=True), marker=".", color=colour[w], label=label)
    axes[0].set_title("Stage-3 train loss (GKD JSD + SFT + vision KD)")
    axes[1].set_title("GKD part: loss − vision_kd_loss (JSD + 1·SFT)")
    axes[2].set_title("vision_kd_loss (weighted term added to the loss)")
    axes[3].set_title("vision_kd/merger (unweighted MSE, train batches)")
    for ax, ylabel in zip(axes, ("loss", "loss", "vision_kd_loss", "MSE per feature"), strict=True):
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.legend(title="vision-KD weight", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes[2:]:
        ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(img_dir / "effect_loss_curves.png", dpi=110)
    plt.close(fig)

    labels = [weight_label(run["weight"]) for run in runs]
    scored = [evaluation["runs"][f"{run['weight']:g}"] for run in runs]
    x = list(range(len(runs)))
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.4))
    for target, marker in zip(TARGETS, "osD", strict=True):
        axes[0].plot(x, [s["drift"][target] for s in scored], marker=marker, label=target)
    axes[0].set_yscale("log")
    axes[0].set_title("Aligner drift from the teacher (held-out OOD)")
    axes[0].set_ylabel("‖f_student − f_teacher‖² / ‖f_teacher‖²")
    teacher = evaluation["teacher_ood"]
    for key, marker, label in (
        ("opens_new", "o", "opens with [ (new syntax)"),
        ("opens_legacy", "s", "opens with <|box_start|> (legacy)"),
        ("wellformed", "^", "well-formed box"),
        ("box_accuracy", "D", "exact box"),
    ):
        axes[1].plot(x, [s[key] for s in scored], marker=marker, label=label)
    axes[1].axhline(teacher["opens_legacy"], color="grey", ls="--", lw=1, label="teacher: opens legacy")
    axes[1].set_ylim(-0.05, 1.05)
    axes[1].set_title("Greedy answers on held-out OOD (36 prompts)")
    axes[1].set_ylabel("fraction of prompts")
    axes[2].plot(x, [s["nll"] for s in scored], marker="o", label="student NLL of new-format answer")
    axes[2].plot(x, [s["jsd"] for s in scored], marker="s", label="JSD to teacher (GKD term)")
    axes[2].axhline(teacher["nll"], color="grey", ls="--", lw=1, label="teacher NLL (before Stage 3)")
    axes[2].set_title("Held-out OOD, teacher-forced, per answer token")
    axes[2].set_ylabel("nats per token")
    for ax in axes:
        ax.set_xticks(x, labels)
        ax.set_xlabel("vision-KD weight")
        # Below the axes: inside, the legends hid the teacher's reference lines.
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(img_dir / "effect_sweep.png", dpi=110)
    plt.close(fig)


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


def fmt(value: float | None, digits: int = 3) -> str:
    """3 significant digits; "—" where a value does not apply, "n/a" where there was nothing to average."""
    if value is None:
        return "—"
    return "n/a" if math.isnan(value) else f"{value:.{digits}g}"


def took(seconds: float | None) -> str:
    return "reused (--reuse)" if seconds is None else f"{seconds:.0f} s"


def shell(argv: list[str], env: dict[str, str], work: Path) -> str:
    text = " ".join(argv).replace(str(work), "$WORK").replace(str(Path(sys.executable).parent) + "/", "")
    text = text.replace(str(REPO) + "/", "")
    prefix = " ".join(f"{k}={v}" for k, v in env.items())
    return f"{prefix} {text}".strip()


def tail_mean(logs: list[dict[str, Any]], key: str, last: int = 5) -> float | None:
    """Mean of the last `last` logged values: one micro-batch of 4 per step makes single steps noisy."""
    values = series(logs, key)[1][-last:]
    return sum(values) / len(values) if values else None


def table_row(label: str, s: dict[str, Any], gkd: float | None, kd: float | None) -> str:
    drift = " | ".join(fmt(s["drift"][target]) for target in TARGETS)
    return (
        f"| {label} | {drift} | {fmt(gkd)} | {fmt(kd)} | {fmt(s['jsd'])} "
        f"| {fmt(s['nll'])} | {s['opens_new']:.2f} | {s['opens_legacy']:.2f} | {s['wellformed']:.2f} "
        f"| {s['box_accuracy']:.2f} | {fmt(s['coord_mae'])} |"
    )


def table_head(drift: str) -> list[str]:
    cells = [f"{drift} {target}" for target in TARGETS]
    return [
        "| vision-KD weight | " + " | ".join(cells) + " | train GKD part | train vision_kd_loss | held-out JSD "
        "| held-out NLL | opens `[` | opens `<\\|box_start\\|>` | well-formed | exact box | coord. error px |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]


def run_rows(runs: list[dict[str, Any]], scores: dict[str, Any], suffix: str = "") -> list[str]:
    """One table row per Stage-3 run: its held-out scores and the tail of its training log."""
    rows = []
    for run in runs:
        total, kd = tail_mean(run["logs"], "loss"), tail_mean(run["logs"], "vision_kd_loss")
        label = weight_label(run["weight"]) + (suffix if run["weight"] else "")
        rows.append(table_row(label, scores[f"{run['weight']:g}"], total - (kd or 0.0), kd))
    return rows


def events_line(runs: list[dict[str, Any]]) -> str:
    counts = (
        f"{weight_label(r['weight'])}: "
        + (", ".join(f"{k} {v}" for k, v in sorted(r["events"].items())) or "none (no shim)")
        for r in runs
    )
    return "Shim events in each run's `VKD_LOG_FILE`: " + "; ".join(counts) + "."


def wide_section(results: dict[str, Any]) -> list[str]:
    """The wider teacher's table: drift is the `relation` distance, JSD is against the wide teacher."""
    evaluation, runs = results["evaluation"], results.get("wide_runs") or []
    if not runs:
        return []
    text, ood = evaluation["wide_teacher_indomain"], evaluation["wide_teacher_ood"]
    rows = [
        table_row("student before Stage 3", evaluation["wide_start"], None, None),
        *run_rows(runs, evaluation["wide_runs"], f" (`{WIDE_DISTANCE}`)"),
    ]
    widths = results["wide_model"]
    return [
        "### A wider teacher",
        "",
        f"Teacher: the same tiny Qwen3-VL with a wider language model (text hidden size "
        f"{widths['text_config']['hidden_size']} instead of 64, so an aligner output of "
        f"{widths['vision_config']['out_hidden_size']} against the student's 64; same vision tower, so the "
        f"same visual tokens), trained by the same `swift sft` recipe ({took(results['timing']['teacher_wide'])}; "
        "Stage-3 runs " + ", ".join(f"{weight_label(r['weight'])}: {took(r['seconds'])}" for r in runs) + "). "
        f"Greedy on 18 held-out in-domain prompts: opens with the legacy syntax {text['opens_legacy']:.2f}, "
        f"well-formed box {text['wellformed']:.2f}, exact box {text['box_accuracy']:.2f}; on the 36 OOD "
        f"prompts: opens legacy {ood['opens_legacy']:.2f}. The student is the same as above (the narrow "
        f"teacher's copy); Stage 3 is the same command with `--teacher_model` pointing at the wide teacher, "
        f"vision KD through `VKD_DISTANCE={WIDE_DISTANCE}` (with `mse` the preflight refuses this pair "
        "before loading).",
        "",
        "Columns as above, except *drift*: the `relation` distance itself (per image, MSE between the "
        "student's and the wide teacher's token-to-token cosine-similarity matrices of that image's tokens), "
        "unweighted, mean over the 36 held-out out-of-domain images; JSD is against the wide teacher.",
        "",
        *table_head("relation drift"),
        *rows,
        "",
        events_line(runs),
        "",
    ]


def report(results: dict[str, Any], work: Path) -> str:
    """The generated block of EFFECT.md: setup, the table, sample answers, plots and exact commands."""
    evaluation, runs, timing = results["evaluation"], results["runs"], results["timing"]
    teacher, indomain = evaluation["teacher_ood"], evaluation["teacher_indomain"]
    rows = [table_row("teacher (= student before Stage 3)", teacher, None, None), *run_rows(runs, evaluation["runs"])]
    answers = [
        f"| {weight_label(run['weight'])} | "
        + " · ".join(f"`{a}`" for a in evaluation["runs"][f"{run['weight']:g}"]["samples"][:3]).replace("|", "\\|")
        + " |"
        for run in runs
    ]
    scale = next(iter(evaluation["runs"].values()))["teacher_mean_square"]
    commands = ["# teacher: in-domain, legacy format", shell(results["teacher_argv"], {}, work)]
    for run in runs:
        commands += [
            f"# Stage 3, vision-KD weight {weight_label(run['weight'])}",
            shell(run["argv"], run["env"], work),
        ]
    if results.get("wide_runs"):
        commands += ["# the wider teacher: in-domain, legacy format", shell(results["wide_teacher_argv"], {}, work)]
    for run in results.get("wide_runs") or []:
        commands += [
            f"# Stage 3 with the wider teacher, vision-KD weight {weight_label(run['weight'])}",
            shell(run["argv"], run["env"], work),
        ]
    stage3_times = ", ".join(f"{weight_label(r['weight'])}: {took(r['seconds'])}" for r in runs)
    version_text = ", ".join(f"{k} {v}" for k, v in results["versions"].items())
    return "\n".join(
        [
            MARK_BEGIN,
            "## Results (generated by `tests/benchmarks/effect_experiment.py`)",
            "",
            f"Machine: {results['machine']}, shared with other jobs (load average before / after: "
            f"{results['load_before']} / {results['load_after']}). Versions: {version_text}.",
            "",
            f"Wall time {timing['total']:.0f} s: data and init {timing['data']:.0f} s, teacher `swift sft` "
            f"{took(timing['teacher'])}, Stage-3 `swift rlhf` runs ({stage3_times}), "
            + ("the wider teacher's `swift sft` and runs (below), " if results.get("wide_runs") else "")
            + f"evaluation (both teachers) {timing['evaluate']:.0f} s.",
            "",
            f"Teacher: {results['teacher_steps']} `swift sft` steps. Greedy on 18 held-out in-domain "
            "prompts: "
            f"opens with the legacy syntax {indomain['opens_legacy']:.2f}, well-formed box "
            f"{indomain['wellformed']:.2f}, exact box {indomain['box_accuracy']:.2f}, "
            f"coordinate error {fmt(indomain['coord_mae'])} px; answering the centre cell every time scores "
            f"{evaluation['constant_box_mae']:.1f} px. Stage 3: {results['stage3_steps']} steps per run.",
            "",
            "Columns: *drift* = ‖f_s − f_t‖² / ‖f_t‖² of each aligner output over the 36 held-out "
            "out-of-domain images; *train* = mean of the last 5 logged steps in `logging.jsonl` (GKD part = "
            "`loss` − `vision_kd_loss`, i.e. JSD + 1 × SFT); *held-out JSD / NLL* = ms-swift's `gkd_loss` "
            "against the teacher and the student's cross-entropy on the new-format answers, teacher-forced, "
            "per answer token; the last five columns are greedy answers to the 36 held-out prompts: the "
            "syntax the answer opens with (`[` or `<|box_start|>`), whether the whole answer is one "
            "well-formed box (either syntax), exact box, and the mean coordinate error over the well-formed "
            "ones.",
            "",
            *table_head("drift"),
            *rows,
            "",
            events_line(runs),
            "",
            "Scale of the term: the teacher's mean squared aligner output on these images is "
            + ", ".join(f"{target} {fmt(scale[target])}" for target in TARGETS)
            + " per feature, so `distance: mse` at a relative drift d costs about d × that.",
            "",
            "Greedy answers to the first three held-out prompts (true: "
            + ", ".join(f"`{new_answer(tuple(b))}`" for b in results["first_boxes"])
            + "; teacher: "
            + " · ".join(f"`{a}`" for a in teacher["samples"][:3]).replace("|", "\\|")
            + "):",
            "",
            "| vision-KD weight | answers |",
            "|---|---|",
            *answers,
            "",
            *wide_section(results),
            "![loss curves](img/effect_loss_curves.png)",
            "",
            "![sweep](img/effect_sweep.png)",
            "",
            "<details><summary>Exact commands</summary>",
            "",
            "`$WORK` is `--work`; the launchers are the virtualenv's; every command ran with "
            "`HF_HUB_OFFLINE=1 MODELSCOPE_OFFLINE=1 CUDA_VISIBLE_DEVICES= TOKENIZERS_PARALLELISM=false` "
            "(`vkd_shim.testing.launch.gkd_env`).",
            "",
            "```bash",
            *commands,
            "```",
            "",
            "</details>",
            MARK_END,
        ]
    )


def load_average() -> str:
    try:
        return " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/effect"), help="scratch directory")
    parser.add_argument("--out", type=Path, default=REPO / "docs", help="where EFFECT.md and img/ go")
    parser.add_argument("--weights", type=float, nargs="+", default=list(WEIGHTS), help="vision-KD weights")
    parser.add_argument(
        "--wide-weights",
        type=float,
        nargs="*",
        default=list(WIDE_WEIGHTS),
        help=f"vision-KD weights with the wider teacher ({WIDE_DISTANCE}); none skips that teacher",
    )
    parser.add_argument("--teacher-steps", type=int, default=60)
    parser.add_argument("--stage3-steps", type=int, default=16)
    parser.add_argument("--reuse", action="store_true", help="keep data, teacher and finished runs in --work")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="redraw plots and the EFFECT.md block from --work/results.json",
    )
    opts = parser.parse_args()
    work = opts.work.resolve()
    if opts.report_only:
        publish(json.loads((work / "results.json").read_text(encoding="utf-8")), work, opts.out)
        return 0
    if not opts.reuse:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    # No VKD_* from the caller's shell: weight 0 must run without the shim, the others with only
    # the shipped configs and VKD_WEIGHT.
    env = {k: v for k, v in launch.gkd_env(cache_dir=work / "cache").items() if not k.startswith("VKD_")}
    load_before = load_average()
    started = time.perf_counter()
    timing: dict[str, float | None] = {}

    tick = time.perf_counter()
    data = build_data(work / "data", SEED)
    init, wide_init = work / "teacher_init", work / "teacher_wide_init"
    if not (init / "model.safetensors").exists():
        models.save_qwen3_vl(init, seed=0)
    if opts.wide_weights and not (wide_init / "model.safetensors").exists():
        models.save_qwen3_vl(wide_init, seed=0, **WIDE_MODEL)
    timing["data"] = time.perf_counter() - tick

    teacher, student = work / "teacher", work / "student"
    # The student starts as a copy of the teacher in a directory of its own.
    teacher_argv, timing["teacher"] = train_teacher(
        init, data, work / "teacher_sft", opts.teacher_steps, env, opts.reuse, (teacher, student)
    )

    runs = [
        run_stage3(work, data, teacher, student, weight, opts.stage3_steps, env, opts.reuse)
        for weight in sorted(opts.weights)
    ]

    # The wider teacher: the same recipe from a wider init; the student stays the narrow teacher's copy.
    wide_teacher = work / "teacher_wide"
    wide_argv, timing["teacher_wide"] = [], None
    if opts.wide_weights:
        wide_argv, timing["teacher_wide"] = train_teacher(
            wide_init, data, work / "teacher_wide_sft", opts.teacher_steps, env, opts.reuse, (wide_teacher,)
        )
    wide_runs = [
        run_stage3(
            work, data, wide_teacher, student, weight, opts.stage3_steps, env, opts.reuse,
            pair="wide-", distance=WIDE_DISTANCE,
        )
        for weight in sorted(opts.wide_weights)
    ]  # fmt: skip

    tick = time.perf_counter()
    os.environ.update({k: env[k] for k in ("HF_HUB_OFFLINE", "MODELSCOPE_OFFLINE", "MODELSCOPE_CACHE")})
    evaluation = evaluate(teacher, student, data, runs, wide_teacher, wide_runs)
    timing["evaluate"] = time.perf_counter() - tick
    timing["total"] = time.perf_counter() - started

    ood = [json.loads(line) for line in data["ood_eval"].read_text(encoding="utf-8").splitlines()]
    results = {
        "machine": machine(),
        "versions": versions(),
        "load_before": load_before,
        "load_after": load_average(),
        "timing": timing,
        "teacher_steps": opts.teacher_steps,
        "stage3_steps": opts.stage3_steps,
        "teacher_argv": teacher_argv,
        "wide_teacher_argv": wide_argv,
        "wide_model": WIDE_MODEL,
        "runs": runs,
        "wide_runs": wide_runs,
        "evaluation": evaluation,
        "first_boxes": [row["box"] for row in ood[:3]],
    }
    (work / "results.json").write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    publish(results, work, opts.out)
    return 0


def publish(results: dict[str, Any], work: Path, out: Path) -> None:
    plot(results["runs"], results["evaluation"], out / "img")
    section = report(results, work)
    bench_startup.write_section(out / "EFFECT.md", section, begin=MARK_BEGIN, end=MARK_END, title="# Effect experiment")
    print(section)


if __name__ == "__main__":
    sys.exit(main())
