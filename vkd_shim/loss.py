"""Token-normalized distances between student and teacher aligner features.

The student is always the prediction and the detached teacher the target. Everything stays on the
device: this runs on every micro-step, and a host sync (`.item()`, `bool(tensor)`, boolean indexing)
would stall the GPU each time. Non-finite rows are removed from both sides before the distance so
that one bad token neither poisons the loss nor sends NaN gradients into the student; they are
counted per side, because a non-finite teacher means a broken teacher, not a noisy batch.

Inputs were validated upstream (the config checks distances and weights once per run), so only
what can differ per batch is checked here: the features' shapes.

``relation`` compares, per image (and per video), the token-to-token cosine-similarity matrices of the
two sides, so it needs the same tokens but not the same width (a wider teacher, no projection). Its
memory is the square of one image's tokens: rows are processed in blocks of
:data:`RELATION_BLOCK_ROWS` (recomputed in backward), so the extra memory per block is about
``3 × RELATION_BLOCK_ROWS × tokens`` fp32 values per side; an image of more than
:data:`MAX_RELATION_TOKENS` tokens is refused for the micro-batch with a clear reason.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from vkd_shim.errors import FeatureMismatchError

# Same floor as torch's cosine_similarity: keeps all-zero rows at cosine 0 instead of 0/0.
_COSINE_EPS = 1e-8
# nmse's floor on the teacher row's squared norm: an all-zero teacher row would otherwise be 0/0.
_NMSE_EPS = 1e-6
#: Rows of one image's similarity matrix computed at a time by ``relation``.
RELATION_BLOCK_ROWS = 1024
#: Largest image (or video) ``relation`` accepts, in tokens of the captured output: 16384 tokens is a
#: 1 GiB fp32 matrix per side if materialized, 64 MiB per block as computed.
MAX_RELATION_TOKENS = 16384


@dataclass(frozen=True)
class LossOutput:
    """The weighted term for backward, plus unweighted per-target values for telemetry.

    Tensors are 0-d and on the features' device; ``tokens`` is a host int read from shapes. ``drift`` is
    the scale-free ``||s - t||^2 / ||t||^2`` over the valid rows, per target of equal width (no graph).
    """

    total: torch.Tensor
    per_target: dict[Hashable, torch.Tensor]
    drift: dict[Hashable, torch.Tensor]
    tokens: int
    nonfinite_student: dict[Hashable, torch.Tensor]
    nonfinite_teacher: dict[Hashable, torch.Tensor]


def _check_pair(
    target: Hashable, student: torch.Tensor, teacher: torch.Tensor, segments: Sequence[int] | None = None
) -> None:
    """Host-side shape check: same [..., tokens, hidden] on both sides (``relation``: same tokens only)."""
    name = getattr(target, "name", target)
    shapes = (tuple(student.shape), tuple(teacher.shape))
    same = student.shape[:-1] == teacher.shape[:-1] if segments is not None else student.shape == teacher.shape
    if not same or student.dim() < 2 or student.shape[-1] == 0 or teacher.shape[-1] == 0:
        raise FeatureMismatchError(name, *shapes)
    if segments is not None:
        rows = student.numel() // student.shape[-1]
        if sum(segments) != rows:
            raise FeatureMismatchError(name, *shapes, f"the images and videos of the batch hold {sum(segments)} tokens")
        if max(segments, default=0) > MAX_RELATION_TOKENS:
            raise FeatureMismatchError(
                name, *shapes, f"an image of {max(segments)} tokens exceeds relation's {MAX_RELATION_TOKENS}"
            )


def _cosine(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine with each norm floored separately, so zero rows give 0 and finite grads."""
    dot = (student * teacher).sum(dim=-1)
    floor = _COSINE_EPS**2
    return (
        dot
        * torch.rsqrt(student.square().sum(dim=-1).clamp_min(floor))
        * torch.rsqrt(teacher.square().sum(dim=-1).clamp_min(floor))
    )


def _mse_rows(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (prediction - target).square().mean(dim=-1)


def _cosine_rows(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 1.0 - _cosine(prediction, target)


def _nmse_rows(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Relative squared error: one weight means the same on aligners of different feature scale."""
    return (prediction - target).square().sum(dim=-1) / (target.square().sum(dim=-1) + _NMSE_EPS)


def _unit(rows: torch.Tensor) -> torch.Tensor:
    return rows * torch.rsqrt(rows.square().sum(dim=-1, keepdim=True).clamp_min(_COSINE_EPS**2))


def _relation_block(
    student_rows: torch.Tensor, student: torch.Tensor, teacher_rows: torch.Tensor, teacher: torch.Tensor
):
    return (student_rows @ student.T - teacher_rows @ teacher.T).square().sum(dim=-1)


def _relation_rows(prediction: torch.Tensor, target: torch.Tensor, segments: Sequence[int], valid: torch.Tensor):
    """Per token row: mean over the valid tokens of its image of the squared similarity difference.

    Averaged over rows this is each image's mean over its similarity-matrix entries, weighted by the
    image's tokens: the same per-token normalization as the other distances, and duplicating an image
    changes nothing. Masked rows are zero vectors, so their similarities are 0 on both sides.
    """
    student, teacher = _unit(prediction), _unit(target)
    out, start = [], 0
    for count in segments:
        a, b = student[start : start + count], teacher[start : start + count]
        blocks = []
        for r in range(0, count, RELATION_BLOCK_ROWS):
            rows = (a[r : r + RELATION_BLOCK_ROWS], a, b[r : r + RELATION_BLOCK_ROWS], b)
            blocks.append(
                checkpoint(_relation_block, *rows, use_reentrant=False)
                if count > RELATION_BLOCK_ROWS
                else _relation_block(*rows)
            )
        columns = valid[start : start + count].sum().clamp(min=1).to(prediction.dtype)
        out.append(torch.cat(blocks) / columns if blocks else prediction.new_zeros(0))
        start += count
    return torch.cat(out)


#: Per-token-row distances; the config's ``distance`` choices are held to these names by a test.
ROW_DISTANCES = {"mse": _mse_rows, "cosine": _cosine_rows, "nmse": _nmse_rows}
#: Distances that compare token-to-token structure within each image (they need image boundaries).
RELATION_DISTANCES = ("relation",)
DISTANCES = (*ROW_DISTANCES, *RELATION_DISTANCES)


def _masked_distance(
    student: torch.Tensor, teacher: torch.Tensor, kind: str, segments: Sequence[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    prediction = student.reshape(-1, student.shape[-1]).float()
    target = teacher.detach().reshape(-1, teacher.shape[-1]).to(device=prediction.device, dtype=torch.float32)

    # Zero non-finite rows on both sides before any arithmetic: the where() blocks the backward path
    # into them, which masking the finished loss would not (0 * NaN is still NaN).
    student_ok = torch.isfinite(prediction).all(dim=-1)
    teacher_ok = torch.isfinite(target).all(dim=-1)
    finite = student_ok & teacher_ok
    keep = finite.unsqueeze(-1)
    prediction = torch.where(keep, prediction, 0.0)
    target = torch.where(keep, target, 0.0)

    # Masked rows are all-zero pairs: mse already gives 0 there, cosine gives 1 - 0.
    if kind in ROW_DISTANCES:
        per_row = ROW_DISTANCES[kind](prediction, target) * finite
    else:
        per_row = _relation_rows(prediction, target, segments, finite) * finite

    # clamp: no valid rows means an all-zero numerator, so the result is an exact 0 that is still a
    # function of the student (DDP then sees its parameters as used).
    distance = per_row.sum() / finite.sum().clamp(min=1).to(per_row.dtype)
    rows = finite.numel()
    drift = None
    if prediction.shape == target.shape:
        with torch.no_grad():  # telemetry only: a ratio of sums, so one number compares models and distances
            drift = (prediction - target).square().sum() / target.square().sum().clamp(min=_NMSE_EPS)
    return distance, rows - student_ok.sum(), rows - teacher_ok.sum(), drift


def feature_distance(
    student: torch.Tensor, teacher: torch.Tensor, kind: str, segments: Sequence[int] | None = None
) -> torch.Tensor:
    """Mean distance over the valid token rows of one pair, as a 0-d fp32 tensor.

    ``segments``: tokens per image/video in row order, needed (only) by ``relation``.
    """
    _check_pair(None, student, teacher, _segments_for(kind, segments, student))
    return _masked_distance(student, teacher, kind, segments)[0]


def _segments_for(kind: str, segments: Sequence[int] | None, features: torch.Tensor) -> Sequence[int] | None:
    if kind not in RELATION_DISTANCES:
        return None
    if segments is None and features.dim() == 3:  # [images, tokens, hidden]: one image per leading index
        return [features.shape[1]] * features.shape[0]
    return segments if segments is not None else [features.numel() // max(features.shape[-1], 1)]


def vision_kd_loss(
    student: Mapping[Hashable, torch.Tensor],
    teacher: Mapping[Hashable, torch.Tensor],
    *,
    weights: Mapping[Hashable, float],
    distance: str,
    scale: float,
    segments: Mapping[Hashable, Sequence[int]] | None = None,
) -> LossOutput:
    """scale * sum over targets of weights[t] * distance_t (scale: the run's weight times warm-up).

    ``segments``: per target, the tokens of each image/video in row order (``relation`` only; without
    it the whole micro-batch is one image). Every shape check runs before any arithmetic, so a
    mismatch costs nothing on the device and the caller can skip the term with both shapes in hand.
    """
    segments = {t: _segments_for(distance, (segments or {}).get(t), f) for t, f in student.items()}
    for target in [*student, *(name for name in teacher if name not in student)]:
        if target not in student or target not in teacher:
            raise FeatureMismatchError(
                getattr(target, "name", target),
                tuple(student[target].shape) if target in student else None,
                tuple(teacher[target].shape) if target in teacher else None,
            )
        _check_pair(target, student[target], teacher[target], segments[target])
    if not student:
        raise FeatureMismatchError(None, None, None)

    per_target: dict[Hashable, torch.Tensor] = {}
    drift: dict[Hashable, torch.Tensor] = {}
    bad_student: dict[Hashable, torch.Tensor] = {}
    bad_teacher: dict[Hashable, torch.Tensor] = {}
    weighted: list[torch.Tensor] = []
    for target, features in student.items():
        per_target[target], bad_student[target], bad_teacher[target], relative = _masked_distance(
            features, teacher[target], distance, segments[target]
        )
        if relative is not None:
            drift[target] = relative
        weighted.append(per_target[target] * float(weights[target]))

    first = next(iter(student.values()))
    return LossOutput(
        total=torch.stack(weighted).sum() * float(scale),
        per_target=per_target,
        drift=drift,
        tokens=first.numel() // first.shape[-1],
        nonfinite_student=bad_student,
        nonfinite_teacher=bad_teacher,
    )
