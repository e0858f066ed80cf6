"""The tiny training data: PNG images, MP4 clips and text-only rows in ms-swift's "messages" jsonl,
built locally from fixed seeds (two builds with one seed write identical media)."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Frame-sequence media: ms-swift 4.6 converts each on-policy rollout row into a `RolloutInferRequest`
# whose `videos` field is `List[str]`, so a frame list (`videos: [[f1.png, ...]]`) crashes the default
# lmbda=0.5 generation path with a dacite WrongTypeError. Videos are therefore real files; qwen-vl-utils
# reads them with decord or torchcodec (torchvision >= 0.24 has no `read_video`).
_VIDEO_FRAMES = 4
_VIDEO_FPS = 2

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


def box_frame(size: tuple[int, int], colour: str, background: tuple[int, int, int], offset: tuple[int, int]) -> Any:
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
            frame = av.VideoFrame.from_image(box_frame((64, 64), colour, background, offset))
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def message(user: str, assistant: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def _rows(media_dir: Path, prefix: str, counts: Mapping[str, int], rng: random.Random) -> list[dict[str, Any]]:
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
        box_frame(size, colour, rng.choice(_BACKGROUNDS), offset).save(path)
        by_kind["image"].append(
            {
                "messages": message("<image>What colour is the box?", f"The box is {colour}."),
                "images": [str(path)],
            }
        )
    for _ in range(counts["text"]):
        a, b = rng.randrange(1, 10), rng.randrange(1, 10)
        by_kind["text"].append({"messages": message(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.")})
    for index in range(counts["video"]):
        colour, direction = rng.choice(colours), _DIRECTIONS[index % len(_DIRECTIONS)]
        path = media_dir / f"{prefix}_video_{index}.mp4"
        _write_video(path, colour, rng.choice(_BACKGROUNDS), direction)
        by_kind["video"].append(
            {
                "messages": message("<video>Which way does the box move?", f"The {colour} box moves {direction}."),
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
