"""Token-normalized distances between student and teacher aligner features.

The student is always the prediction and the detached teacher the target. Everything stays on
the device: this runs on every micro-step, and a host sync (`.item()`, `bool(tensor)`, boolean
indexing) would stall the GPU each time. Non-finite rows are removed from both sides before the
distance so that one bad token neither poisons the loss nor sends NaN gradients into the student.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

DISTANCES = ("mse", "cosine")

# Same floor as torch's cosine_similarity: keeps all-zero rows at cosine 0 instead of 0/0.
_COSINE_EPS = 1e-8


class FeatureMismatchError(ValueError):
    """Student and teacher features of a target cannot be compared row by row.

    Shapes are None when that side has no features for the target at all.
    """

    def __init__(
        self, target: str | None, student_shape: tuple[int, ...] | None, teacher_shape: tuple[int, ...] | None
    ) -> None:
        self.target = target
        self.student_shape = student_shape
        self.teacher_shape = teacher_shape
        super().__init__(
            f"vision KD target {target!r}: student features {_shape_text(student_shape)} "
            f"do not match teacher features {_shape_text(teacher_shape)}"
        )


def _shape_text(shape: tuple[int, ...] | None) -> str:
    return "missing" if shape is None else str(list(shape))


@dataclass(frozen=True)
class LossOutput:
    """The weighted term for backward, plus unweighted per-target values for telemetry."""

    total: torch.Tensor
    per_target: dict[str, torch.Tensor]
    tokens: int
    nonfinite: dict[str, torch.Tensor]


def _check_distance(kind: str) -> None:
    if kind not in DISTANCES:
        raise ValueError(f"unknown vision KD distance {kind!r}; allowed: {list(DISTANCES)}")


def _check_pair(target: str | None, student: torch.Tensor, teacher: torch.Tensor) -> None:
    """Host-side shape check: same [..., tokens, hidden] on both sides, hidden non-empty."""
    if student.shape != teacher.shape:
        raise FeatureMismatchError(target, tuple(student.shape), tuple(teacher.shape))
    if student.dim() < 2 or student.shape[-1] == 0:
        raise ValueError(
            f"vision KD target {target!r}: features must be [tokens, hidden] with hidden > 0, "
            f"got {list(student.shape)}"
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


def _masked_distance(
    student: torch.Tensor, teacher: torch.Tensor, kind: str
) -> tuple[torch.Tensor, torch.Tensor]:
    hidden = student.shape[-1]
    prediction = student.reshape(-1, hidden).float()
    target = teacher.detach().reshape(-1, hidden).to(device=prediction.device, dtype=torch.float32)

    # Zero non-finite rows on both sides before any arithmetic: the where() blocks the backward
    # path into them, which masking the finished loss would not (0 * NaN is still NaN).
    finite = torch.isfinite(prediction).all(dim=-1) & torch.isfinite(target).all(dim=-1)
    keep = finite.unsqueeze(-1)
    prediction = torch.where(keep, prediction, 0.0)
    target = torch.where(keep, target, 0.0)

    if kind == "mse":
        per_row = (prediction - target).square().mean(dim=-1)
    else:
        per_row = 1.0 - _cosine(prediction, target)
    # Masked rows are all-zero pairs: mse already gives 0 there, cosine gives 1 - 0.
    per_row = per_row * finite

    valid = finite.sum()
    # clamp: no valid rows means an all-zero numerator, so the result is an exact 0 that is
    # still a function of the student (DDP then sees its parameters as used).
    distance = per_row.sum() / valid.clamp(min=1).to(per_row.dtype)
    return distance, finite.numel() - valid


def feature_distance(
    student: torch.Tensor, teacher: torch.Tensor, kind: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean distance over valid token rows as 0-d fp32, number of masked rows as 0-d int64)."""
    _check_distance(kind)
    _check_pair(None, student, teacher)
    return _masked_distance(student, teacher, kind)


def _check_finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"vision KD {name} must be finite, got {value!r}")


def vision_kd_loss(
    student: Mapping[str, torch.Tensor],
    teacher: Mapping[str, torch.Tensor],
    *,
    target_weights: Mapping[str, float],
    distance: str,
    weight: float,
    warmup: float = 1.0,
) -> LossOutput:
    """weight * warmup * sum over targets of target_weights[t] * distance_t.

    Every check runs before any arithmetic, so a mismatch costs nothing on the device and the
    caller can skip the term with both shapes in hand.
    """
    _check_distance(distance)
    _check_finite("weight", weight)
    _check_finite("warmup", warmup)
    if not student and not teacher:
        raise ValueError("vision KD got no features from either side; nothing to compare")
    for target in [*student, *(name for name in teacher if name not in student)]:
        if target not in student or target not in teacher:
            raise FeatureMismatchError(
                target,
                tuple(student[target].shape) if target in student else None,
                tuple(teacher[target].shape) if target in teacher else None,
            )
        _check_pair(target, student[target], teacher[target])
        if target not in target_weights:
            raise ValueError(
                f"vision KD has no weight for target {target!r}; weights: {dict(target_weights)}"
            )
        _check_finite(f"weight of target {target!r}", target_weights[target])

    per_target: dict[str, torch.Tensor] = {}
    nonfinite: dict[str, torch.Tensor] = {}
    weighted: list[torch.Tensor] = []
    for target, features in student.items():
        per_target[target], nonfinite[target] = _masked_distance(features, teacher[target], distance)
        weighted.append(per_target[target] * float(target_weights[target]))

    first = next(iter(student.values()))
    return LossOutput(
        total=torch.stack(weighted).sum() * (float(weight) * float(warmup)),
        per_target=per_target,
        tokens=first.numel() // first.shape[-1],
        nonfinite=nonfinite,
    )
