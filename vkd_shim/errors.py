"""One root for every error the shim raises on purpose, so callers and tests can tell a deliberate
refusal from a bug, and every message stays one line (it lands in JSON events and job summaries)."""

from __future__ import annotations


class VisionKDError(RuntimeError):
    """Base of every error the shim raises on purpose."""


class ConfigError(VisionKDError, ValueError):
    """A vision-KD configuration the shim refuses to train with.

    ``field``, ``source`` and ``allowed`` are attributes so that the doctor and the events can report
    them as data.
    """

    def __init__(self, message: str, *, field: str, source: str | None = None, allowed: str | None = None):
        super().__init__(message)
        self.field = field
        self.source = source
        self.allowed = allowed

    def __reduce__(self) -> tuple[object, ...]:
        # Default exception pickling re-calls cls(*args) and would drop the keyword-only attributes;
        # errors raised in spawned workers travel back to the parent pickled.
        import functools  # here, not at the top: with the switch on this module loads in every process

        rebuild = functools.partial(type(self), field=self.field, source=self.source, allowed=self.allowed)
        return (rebuild, self.args)


class PatchError(VisionKDError):
    """Vision KD was asked for but a patch point is missing: training would run without it."""


class RefusedError(VisionKDError):
    """The run asked for vision KD in a setting that cannot provide it."""

    def __init__(self, reason: str, fix: str) -> None:
        super().__init__(f"vision KD refused: {reason}. Fix: {fix}.")
        self.reason = reason
        self.fix = fix

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.reason, self.fix))


class NonFiniteError(VisionKDError):
    """Aligner features carried NaN/Inf and the policy says stop."""


class NoVisualTokensError(VisionKDError):
    """Vision KD is on but the run feeds the models no visual token, so the term never exists."""


class TargetResolutionError(VisionKDError, LookupError):
    """A requested aligner target does not exist on this model (architecture, path or layer)."""


class CaptureError(VisionKDError):
    """Capture was misused or recorded something it cannot attribute or read."""


class RoleUnknownError(CaptureError):
    """A module shared by student and teacher fired while no role was set."""


class FeatureMismatchError(VisionKDError, ValueError):
    """Student and teacher features of a target cannot be compared row by row.

    Shapes are None when that side has no features for the target at all.
    """

    def __init__(
        self,
        target: str | None,
        student_shape: tuple[int, ...] | None,
        teacher_shape: tuple[int, ...] | None,
        detail: str | None = None,
    ) -> None:
        self.target = target
        self.student_shape = student_shape
        self.teacher_shape = teacher_shape
        self.detail = detail
        super().__init__(
            f"vision KD target {target!r}: student features {_shape_text(student_shape)} "
            f"do not match teacher features {_shape_text(teacher_shape)}" + (f" ({detail})" if detail else "")
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.target, self.student_shape, self.teacher_shape, self.detail))


def _shape_text(shape: tuple[int, ...] | None) -> str:
    return "missing" if shape is None else str(list(shape))
