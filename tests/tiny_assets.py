"""On-disk assets for real `swift rlhf --rlhf_type gkd` runs on CPU: tiny Qwen3-VL teacher and student,
a Qwen-compatible tokenizer, a mixed image / video / text-only dataset, and the command that trains on them.

Why this exists: end-to-end tests must drive the real ms-swift launcher (argument parsing, re-exec, model
loader, template, GKD trainer, logging.jsonl) without hub access or a GPU. Everything is built locally from
fixed seeds, so two builds with the same seed write identical files (the jsonl files differ only in the
absolute media paths they hold).

Usable two ways: imported from tests (with ``tests/`` on ``sys.path``), or run as a script:
``python tests/tiny_assets.py OUT_DIR [--seed N] [--student-from-teacher]`` builds everything under OUT_DIR
and prints a JSON summary.

torch, transformers, tokenizers, PIL and av are imported inside the functions that need them: importing
this module must stay cheap and must not load torch into a test process that checks ``sys.modules``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib.util
import json
import os
import random
import re
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast, Qwen3VLConfig, Qwen3VLProcessor

VOCAB_SIZE = 151936

# Qwen3 / Qwen3-VL added tokens at their real ids. ms-swift's Qwen templates hard-code several of these ids
# (image pad 151655, video pad 151656) and emit the strings of the others (chat markers, vision start/end,
# object refs and boxes, <think>, <tool_call>, <tool_response>), so each must tokenize to exactly its real
# id. The bool is Qwen's own "special" flag: think/tool markers are plain added tokens, not special ones.
QWEN_ADDED_TOKENS: dict[str, tuple[int, bool]] = {
    "<|endoftext|>": (151643, True),
    "<|im_start|>": (151644, True),
    "<|im_end|>": (151645, True),
    "<|object_ref_start|>": (151646, True),
    "<|object_ref_end|>": (151647, True),
    "<|box_start|>": (151648, True),
    "<|box_end|>": (151649, True),
    "<|quad_start|>": (151650, True),
    "<|quad_end|>": (151651, True),
    "<|vision_start|>": (151652, True),
    "<|vision_end|>": (151653, True),
    "<|vision_pad|>": (151654, True),
    "<|image_pad|>": (151655, True),
    "<|video_pad|>": (151656, True),
    "<tool_call>": (151657, False),
    "</tool_call>": (151658, False),
    "<|fim_prefix|>": (151659, True),
    "<|fim_middle|>": (151660, True),
    "<|fim_suffix|>": (151661, True),
    "<|fim_pad|>": (151662, True),
    "<|repo_name|>": (151663, True),
    "<|file_sep|>": (151664, True),
    "<tool_response>": (151665, False),
    "</tool_response>": (151666, False),
    "<think>": (151667, False),
    "</think>": (151668, False),
}
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"

# Vision geometry shared by the model config and both processors: one merged token covers a
# (PATCH_SIZE * SPATIAL_MERGE) ** 2 = 32 x 32 pixel square, so a 64 x 64 image is 2 x 2 = 4 tokens.
PATCH_SIZE = 16
SPATIAL_MERGE = 2
TEMPORAL_PATCH = 2
_MERGED_PIXELS = (PATCH_SIZE * SPATIAL_MERGE) ** 2

# Dimensions small enough for 2 CPU cores, shaped like the real model: GQA (4 query / 2 kv heads), mrope
# sections summing to head_dim / 2, and two deepstack layers so `deepstack_merger_list` has 2 modules.
# Deepstack feature i is added to the output of text layer i at the visual positions only, so with 2 text
# layers deepstack 1 would feed the last layer and reach no response logit: its merger would get no GKD
# gradient at all. A third text layer keeps every deepstack merger on the loss path, as in the real model.
_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 2048,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 5000000.0,
        "mrope_section": [2, 3, 3],
        "mrope_interleaved": True,
    },
    "bos_token_id": QWEN_ADDED_TOKENS[PAD_TOKEN][0],
    "eos_token_id": QWEN_ADDED_TOKENS[EOS_TOKEN][0],
    "pad_token_id": QWEN_ADDED_TOKENS[PAD_TOKEN][0],
    "tie_word_embeddings": False,
}
_VISION_CONFIG: dict[str, Any] = {
    "depth": 3,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "out_hidden_size": 64,
    "patch_size": PATCH_SIZE,
    "spatial_merge_size": SPATIAL_MERGE,
    "temporal_patch_size": TEMPORAL_PATCH,
    "num_position_embeddings": 64,
    "deepstack_visual_indexes": [0, 1],
}

# Frame-sequence media: ms-swift 4.6 converts each on-policy rollout row into a `RolloutInferRequest`
# whose `videos` field is `List[str]`, so a frame list (`videos: [[f1.png, ...]]`) crashes the default
# lmbda=0.5 generation path with a dacite WrongTypeError. Videos are therefore real files; qwen-vl-utils
# reads them with decord or torchcodec (torchvision >= 0.24 has no `read_video`).
_VIDEO_FRAMES = 4
_VIDEO_FPS = 2
_VIDEO_READERS = ("decord", "torchcodec")

_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 70, 220),
    "yellow": (230, 200, 40),
    "purple": (140, 60, 170),
}
_BACKGROUNDS: tuple[tuple[int, int, int], ...] = ((255, 255, 255), (235, 235, 235), (20, 20, 20))
# Two image shapes give two token counts per image (64x64 -> 4 tokens, 96x64 -> 6 tokens).
_IMAGE_SIZES: tuple[tuple[int, int], ...] = ((64, 64), (96, 64))
_DIRECTIONS = ("right", "left", "down", "up")

# ms-swift reads these through qwen-vl-utils. Its video default is 128 tokens minimum per frame pair, which
# would upscale each 64x64 frame to about 370x370; 4..16 keeps a 4-frame 64x64 clip at 2 x 4 = 8 tokens.
_VIDEO_TOKEN_ENV = {"VIDEO_MIN_TOKEN_NUM": "4", "VIDEO_MAX_TOKEN_NUM": "16"}
# Launcher and rank variables that would turn the child into (part of) a distributed job.
_DISTRIBUTED_ENV = (
    "NPROC_PER_NODE",
    "NNODES",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
)

DEFAULT_MAX_STEPS = 6
DEFAULT_EVAL_STEPS = 3
DEFAULT_SEED = 42


class AssetError(RuntimeError):
    """An asset cannot be built or used in this environment; the message says what is missing."""


@functools.cache
def _tokenizer() -> PreTrainedTokenizerFast:
    """Build the tokenizer once per process: wrapping a 151936-entry vocab takes about a second."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # Byte-level BPE without merges: every text encodes (one token per UTF-8 byte, no unknowns) and
    # decodes back exactly, which is all the template and the random-init models need.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    real_ids = {token_id: token for token, (token_id, _) in QWEN_ADDED_TOKENS.items()}
    vocab: dict[str, int] = {char: i for i, char in enumerate(alphabet)}
    # Every id up to the model's vocab size exists, so decoding any sampled id works, as in the real
    # tokenizer; the unused ids are inert placeholders.
    for token_id in range(len(alphabet), VOCAB_SIZE):
        vocab[real_ids.get(token_id, f"<|reserved_{token_id}|>")] = token_id
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_tokens(
        [
            AddedToken(token, special=special, normalized=False)
            for token, (_, special) in sorted(QWEN_ADDED_TOKENS.items(), key=lambda item: item[1][0])
        ]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, model_max_length=2048
    )
    misplaced = {
        token: (want, got)
        for token, (want, _) in QWEN_ADDED_TOKENS.items()
        if (got := tokenizer.convert_tokens_to_ids(token)) != want
    }
    if misplaced or len(tokenizer) != VOCAB_SIZE:
        raise AssetError(
            f"tokenizer layout differs from Qwen's: misplaced={misplaced}, size={len(tokenizer)}"
        )
    return tokenizer


def build_tokenizer(out_dir: str | os.PathLike[str]) -> Path:
    """Write the tokenizer into `out_dir` and return it; model dirs get the same files via the processor."""
    path = Path(out_dir)
    _tokenizer().save_pretrained(path)
    return path


def _merged(defaults: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Overlay `overrides` on `defaults`, recursing into nested dicts (so one rope key can change)."""
    result = copy.deepcopy(dict(defaults))
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(result.get(key), Mapping):
            result[key] = _merged(result[key], value)
        else:
            result[key] = value
    return result


def qwen3_vl_config(**overrides: Any) -> Qwen3VLConfig:
    """The tiny `Qwen3VLConfig`; `text_config` / `vision_config` overrides are merged key by key."""
    from transformers import Qwen3VLConfig

    text = _merged(_TEXT_CONFIG, overrides.pop("text_config", {}))
    vision = _merged(_VISION_CONFIG, overrides.pop("vision_config", {}))
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **overrides)


def _processor() -> Qwen3VLProcessor:
    """Qwen3VLProcessor whose image and video processors share the model's patch geometry."""
    from transformers import Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    geometry = {"patch_size": PATCH_SIZE, "temporal_patch_size": TEMPORAL_PATCH, "merge_size": SPATIAL_MERGE}
    # Qwen3-VL normalizes with mean = std = 0.5. ms-swift resizes through qwen-vl-utils and calls the
    # processors with do_resize=False; these small bounds matter where a processor resizes by itself
    # (ms-swift's dummy image for text-only batches under DeepSpeed is 32x32 -> 64x64 -> 4 tokens).
    normalize = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": 4 * _MERGED_PIXELS, "longest_edge": 16 * _MERGED_PIXELS},
        **geometry,
        **normalize,
    )
    # cap_pixels_per_frame=True is qwen-vl-utils' behaviour (and the transformers default from 5.22);
    # setting it also silences transformers' per-run warning about the change.
    video_processor = Qwen3VLVideoProcessor(
        size={"shortest_edge": 4 * _MERGED_PIXELS, "longest_edge": 64 * _MERGED_PIXELS},
        cap_pixels_per_frame=True,
        **geometry,
        **normalize,
    )
    return Qwen3VLProcessor(
        image_processor=image_processor, tokenizer=_tokenizer(), video_processor=video_processor
    )


def save_qwen3_vl(out_dir: str | os.PathLike[str], seed: int = 0, **config_overrides: Any) -> Path:
    """Save a random-init tiny Qwen3-VL that ms-swift loads with `--model_type qwen3_vl`.

    The directory holds what a hub snapshot holds (config, safetensors weights, tokenizer, processor
    config with image and video processors, generation config), so the loader takes its normal path.
    """
    import torch
    from transformers import GenerationConfig, Qwen3VLForConditionalGeneration

    path = Path(out_dir)
    config = qwen3_vl_config(**config_overrides)
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).eval()
    model.save_pretrained(path)
    _processor().save_pretrained(path)
    # Sampling settings of the released Qwen3-VL Instruct checkpoints; eos covers both end markers.
    GenerationConfig(
        bos_token_id=QWEN_ADDED_TOKENS[PAD_TOKEN][0],
        pad_token_id=QWEN_ADDED_TOKENS[PAD_TOKEN][0],
        eos_token_id=[QWEN_ADDED_TOKENS[EOS_TOKEN][0], QWEN_ADDED_TOKENS[PAD_TOKEN][0]],
        do_sample=True,
        temperature=0.7,
        top_p=0.8,
        top_k=20,
    ).save_pretrained(path)
    return path


def _box_frame(
    size: tuple[int, int], colour: str, background: tuple[int, int, int], offset: tuple[int, int]
) -> Any:
    """A plain background with one filled box: trivially different inputs for the vision tower."""
    from PIL import Image, ImageDraw

    width, height = size
    image = Image.new("RGB", size, background)
    left, top = offset
    ImageDraw.Draw(image).rectangle((left, top, left + width // 3, top + height // 3), fill=_COLOURS[colour])
    return image


def _write_video(path: Path, colour: str, background: tuple[int, int, int], direction: str) -> None:
    """Encode a clip of a box moving one step per frame (MPEG-4 via PyAV, a qwen-vl-utils dependency)."""
    import av

    steps = {"right": (8, 0), "left": (-8, 0), "down": (0, 8), "up": (0, -8)}[direction]
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=_VIDEO_FPS)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for index in range(_VIDEO_FRAMES):
            offset = (24 + steps[0] * (index - 1), 24 + steps[1] * (index - 1))
            frame = av.VideoFrame.from_image(_box_frame((64, 64), colour, background, offset))
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def _message(user: str, assistant: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def _rows(
    media_dir: Path, prefix: str, counts: Mapping[str, int], rng: random.Random
) -> list[dict[str, Any]]:
    """Rows of the three kinds, interleaved image / text / video.

    ms-swift shuffles the train set but not the val set, so the interleaving is what puts mixed kinds into
    the eval batches (with batch size 2: image+text, video+image, text+video).
    """
    colours = list(_COLOURS)
    by_kind: dict[str, list[dict[str, Any]]] = {"image": [], "text": [], "video": []}
    for index in range(counts["image"]):
        colour, size = rng.choice(colours), _IMAGE_SIZES[index % len(_IMAGE_SIZES)]
        offset = (rng.randrange(0, size[0] // 2), rng.randrange(0, size[1] // 2))
        path = media_dir / f"{prefix}_image_{index}.png"
        _box_frame(size, colour, rng.choice(_BACKGROUNDS), offset).save(path)
        by_kind["image"].append(
            {
                "messages": _message("<image>What colour is the box?", f"The box is {colour}."),
                "images": [str(path)],
            }
        )
    for _ in range(counts["text"]):
        a, b = rng.randrange(1, 10), rng.randrange(1, 10)
        by_kind["text"].append({"messages": _message(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.")})
    for index in range(counts["video"]):
        colour, direction = rng.choice(colours), _DIRECTIONS[index % len(_DIRECTIONS)]
        path = media_dir / f"{prefix}_video_{index}.mp4"
        _write_video(path, colour, rng.choice(_BACKGROUNDS), direction)
        by_kind["video"].append(
            {
                "messages": _message(
                    "<video>Which way does the box move?", f"The {colour} box moves {direction}."
                ),
                "videos": [str(path)],
            }
        )
    rows: list[dict[str, Any]] = []
    for position in range(max(counts.values(), default=0)):
        rows.extend(kind_rows[position] for kind_rows in by_kind.values() if position < len(kind_rows))
    return rows


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows), encoding="utf-8")
    return path


def build_dataset(
    out_dir: str | os.PathLike[str],
    n_image: int = 12,
    n_text: int = 12,
    n_video: int = 8,
    seed: int = 0,
) -> dict[str, Path]:
    """Write ms-swift "messages" jsonl files (`train`, `val`) with PNG images and MP4 videos under `out_dir`.

    The train file has a few dozen rows: GKD builds whole generation batches, and a dataset that is small
    relative to them ends with "no single sample in your epoch_iterator". The val file holds two rows of
    each kind present in train, different from the train rows. Video rows need a video reader at run time
    (see `video_reader`); writing them only needs PyAV.
    """
    counts = {"image": n_image, "text": n_text, "video": n_video}
    if any(count < 0 for count in counts.values()) or sum(counts.values()) == 0:
        raise ValueError(f"row counts must be >= 0 and not all zero, got {counts}")
    root = Path(out_dir)
    media = root / "media"
    media.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    train = _rows(media, "train", counts, rng)
    val = _rows(media, "val", {kind: min(count, 2) for kind, count in counts.items()}, rng)
    return {"train": _write_jsonl(root / "train.jsonl", train), "val": _write_jsonl(root / "val.jsonl", val)}


def build_all(
    out_dir: str | os.PathLike[str],
    seed: int = 0,
    *,
    student_from_teacher: bool = False,
    n_image: int = 12,
    n_text: int = 12,
    n_video: int = 8,
) -> dict[str, Any]:
    """Build teacher, student and data under `out_dir`; return a JSON-ready summary `gkd_command` accepts.

    The student uses `seed + 1` so that teacher and student logits differ and the GKD loss has a gradient.
    With `student_from_teacher` it is a byte copy of the teacher in its own directory: ms-swift compares
    the `--model` and `--teacher_model` strings, and the same path with LoRA would switch to
    self-distillation through `disable_adapter()` with no separate teacher model.
    """
    root = Path(out_dir)
    teacher = save_qwen3_vl(root / "teacher", seed=seed)
    student = root / "student"
    if student_from_teacher:
        shutil.copytree(teacher, student, dirs_exist_ok=True)
    else:
        save_qwen3_vl(student, seed=seed + 1)
    data = build_dataset(root / "data", n_image=n_image, n_text=n_text, n_video=n_video, seed=seed)
    return {
        "teacher": str(teacher),
        "student": str(student),
        "train": str(data["train"]),
        "val": str(data["val"]),
        "seed": seed,
        "student_from_teacher": student_from_teacher,
        "rows": {"image": n_image, "text": n_text, "video": n_video},
    }


def video_reader() -> str | None:
    """The video backend qwen-vl-utils can use here, or None when video rows cannot be decoded."""
    return next((name for name in _VIDEO_READERS if importlib.util.find_spec(name) is not None), None)


def _swift_executable() -> Path:
    """The `swift` console script of the interpreter running the tests, so the child uses the same venv."""
    script = Path(sys.executable).with_name("swift")
    if not script.is_file():
        raise AssetError(f"no `swift` console script next to {sys.executable}; is ms-swift installed there?")
    return script


def gkd_command(assets: Mapping[str, Any], output_dir: str | os.PathLike[str], *extra: str) -> list[str]:
    """argv of a real `swift rlhf --rlhf_type gkd` run on the assets; 25-35 s wall on 2 CPU cores.

    `extra` is appended last, so it overrides any flag here (argparse keeps the last value), e.g.
    `"--max_steps", "8", "--resume_from_checkpoint", ckpt`. lmbda is left at its default (0.5) so that the
    on-policy generation path runs. Raises AssetError when the data has video rows but no video reader is
    installed: ms-swift would otherwise log "Encoding failed for one sample; will resample" and silently
    train without videos.
    """
    if assets["rows"]["video"] and video_reader() is None:
        raise AssetError(
            "the dataset has video rows but neither decord nor torchcodec is importable; ms-swift would "
            "drop every video row. Install decord, or build the assets with n_video=0."
        )
    return [
        str(_swift_executable()), "rlhf",
        "--rlhf_type", "gkd",
        "--model", str(assets["student"]),
        "--model_type", "qwen3_vl",
        "--teacher_model", str(assets["teacher"]),
        "--teacher_model_type", "qwen3_vl",
        "--torch_dtype", "float32",
        "--dataset", str(assets["train"]),
        "--val_dataset", str(assets["val"]),
        "--tuner_type", "lora",
        # ms-swift freezes the aligner by default; unfrozen under LoRA, the merger and every deepstack
        # merger get LoRA adapters on their linear layers.
        "--freeze_aligner", "false",
        "--max_steps", str(DEFAULT_MAX_STEPS),
        # Without it ms-swift picks 16 / batch size = 8 micro-batches (and 8 generations) per step.
        "--gradient_accumulation_steps", "1",
        "--per_device_train_batch_size", "2",
        "--per_device_eval_batch_size", "2",
        "--max_completion_length", "8",
        "--logging_steps", "1",
        "--eval_strategy", "steps",
        "--eval_steps", str(DEFAULT_EVAL_STEPS),
        "--save_strategy", "steps",
        "--save_steps", str(DEFAULT_MAX_STEPS),
        "--report_to", "tensorboard",
        "--dataloader_num_workers", "0",
        "--seed", str(DEFAULT_SEED),
        "--data_seed", str(DEFAULT_SEED),
        # The trainer otherwise asks the ModelScope hub whether the local model is current: offline, that
        # costs about 7 s of retries.
        "--check_model", "false",
        "--output_dir", str(output_dir),
        *extra,
    ]  # fmt: skip


def gkd_env(
    base_env: Mapping[str, str] | None = None, *, cache_dir: str | os.PathLike[str] | None = None
) -> dict[str, str]:
    """Environment for the `swift rlhf` child: offline, CPU only, single process, unbuffered output.

    `cache_dir` keeps what ms-swift caches at run time (the datasets json cache, matplotlib's font list)
    out of the home directory.
    """
    env = dict(os.environ if base_env is None else base_env)
    for name in (*_DISTRIBUTED_ENV, "TENSORBOARD_LOGGING_DIR"):
        env.pop(name, None)
    bin_dir = str(Path(sys.executable).parent)
    env.update(
        {
            "PATH": os.pathsep.join([bin_dir, env.get("PATH", "")]),
            "HF_HUB_OFFLINE": "1",
            "MODELSCOPE_OFFLINE": "1",
            "CUDA_VISIBLE_DEVICES": "",
            "TOKENIZERS_PARALLELISM": "false",
            # Unbuffered: with stderr merged into stdout, log dicts, ms-swift logs and our JSON lines
            # keep the order in which they were written.
            "PYTHONUNBUFFERED": "1",
            **_VIDEO_TOKEN_ENV,
        }
    )
    if cache_dir is not None:
        env["MODELSCOPE_CACHE"] = str(Path(cache_dir) / "modelscope")
        env["MPLCONFIGDIR"] = str(Path(cache_dir) / "matplotlib")
    return env


def _version_number(run_dir: Path) -> int:
    match = re.match(r"v(\d+)-", run_dir.name)
    return int(match.group(1)) if match else -1


def read_logging_jsonl(output_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows of `<output_dir>/v<N>-<timestamp>/logging.jsonl` for the newest run (highest N).

    ms-swift adds one such version directory per launch under the same `--output_dir` (a resumed run gets
    the next N), so the newest is the run that just finished.
    """
    files = sorted(Path(output_dir).glob("v*-*/logging.jsonl"), key=lambda path: _version_number(path.parent))
    if not files:
        raise FileNotFoundError(f"no v*-*/logging.jsonl under {output_dir}")
    lines = files[-1].read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--student-from-teacher", action="store_true")
    args = parser.parse_args(argv)
    summary = build_all(args.out_dir, seed=args.seed, student_from_teacher=args.student_from_teacher)
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
