"""Forward hooks on the vision aligner of student and teacher, recording only inside a window.

The features come from the forward passes the trainer already runs, so vision KD costs no extra
vision forward. Hooks stay registered for the run but record only while a `window()` is open
(the loss computation): on-policy `generate`, eval outside the loss and activation-checkpoint
recompute during backward all find the store disarmed, and whatever a window recorded is
dropped when it closes, so no graph outlives its step.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from vkd_shim.errors import CaptureError, RoleUnknownError, TargetResolutionError
from vkd_shim.targets import INPUT_KINDS, Target, resolve_targets, target_paths, unwrap

STUDENT = "student"
TEACHER = "teacher"
ROLES = (STUDENT, TEACHER)


class _Store:
    """All state a hook touches; hooks hold this object only, never the model or the trainer."""

    def __init__(self) -> None:
        self.armed = False
        self.role: str | None = None
        self.clear()

    def clear(self) -> None:
        self.features: dict[tuple[str, Target], list[torch.Tensor]] = {}
        self.unattributed: dict[Target, int] = {}
        self.unreadable: dict[tuple[str, Target], str] = {}


def _as_tensor(output: object) -> torch.Tensor | None:
    """The one place that knows hook outputs: a tensor, or a tuple/list led by one."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def _record_input(store: _Store, target: Target, owner: str | None, module: nn.Module, args: tuple) -> None:
    """Forward pre-hook: the module's first input is the feature (the ViT output entering the merger)."""
    _record(store, target, owner, module, args, args[0] if args else None)


def _record(store: _Store, target: Target, owner: str | None, module: nn.Module, args: object, output: object) -> None:
    """Forward hook. `owner` is the role of an unshared module; shared modules read the store's.

    Never raises into the model's forward: problems are kept and surface from `take()`.
    """
    if not store.armed:
        return
    role = owner if owner is not None else store.role
    if role is None:
        store.unattributed[target] = store.unattributed.get(target, 0) + 1
        return
    features = _as_tensor(output)
    if features is None:
        store.unreadable[(role, target)] = type(output).__name__
        return
    if role == TEACHER:
        features = features.detach()
    store.features.setdefault((role, target), []).append(features)


class FeatureCapture:
    """Hooks on the aligner targets of a student and a teacher, attributed to a role per call.

    With `teacher` None or the student itself (self-distillation: the teacher pass is the student
    with adapters disabled), both roles share module objects and `role()` decides attribution.
    Otherwise each hook belongs to one model and records under that model's role.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        kinds: Iterable[str],
        deepstack_layers: Sequence[int] | None = None,
        aligner: Sequence[str] | None = None,
        teacher_aligner: Sequence[str] | None = None,
    ) -> None:
        kinds = tuple(kinds)
        student_targets = resolve_targets(student, kinds, deepstack_layers, aligner)
        if teacher is None or teacher is student:
            teacher_targets = student_targets
        else:
            # A teacher of another architecture of the family (Qwen3-VL-MoE for a dense Qwen3-VL) has its own
            # registry entry; without one it is read with the student's.
            teacher_aligner = aligner if teacher_aligner is None else teacher_aligner
            teacher_targets = resolve_targets(teacher, kinds, deepstack_layers, teacher_aligner)
        if list(teacher_targets) != list(student_targets):
            architectures = f"{type(unwrap(student)).__name__} vs {type(unwrap(teacher)).__name__}"
            raise TargetResolutionError(
                f"student targets {[t.name for t in student_targets]} differ from teacher targets "
                f"{[t.name for t in teacher_targets]} ({architectures})"
            )
        self._targets = tuple(student_targets)
        self.paths = target_paths(student, kinds, deepstack_layers, aligner)
        self._shared = all(student_targets[name] is teacher_targets[name] for name in self._targets)
        self._plan: list[tuple[nn.Module, Target, str | None]] = []
        for name in self._targets:
            if student_targets[name] is teacher_targets[name]:
                self._plan.append((student_targets[name], name, None))
            else:
                self._plan.append((student_targets[name], name, STUDENT))
                self._plan.append((teacher_targets[name], name, TEACHER))
        self._store = _Store()
        self._handles: list[RemovableHandle] = []

    @property
    def targets(self) -> tuple[Target, ...]:
        """Targets in resolution order (merger first, then deepstack layers)."""
        return self._targets

    @property
    def shared(self) -> bool:
        """Student and teacher targets are the same module objects (self-distillation)."""
        return self._shared

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> None:
        """Register one hook per (module, owner); a second call is a no-op, not a second hook."""
        if self._handles:
            return
        for module, target, owner in self._plan:
            if target.kind in INPUT_KINDS:
                hook = functools.partial(_record_input, self._store, target, owner)
                self._handles.append(module.register_forward_pre_hook(hook))
            else:
                hook = functools.partial(_record, self._store, target, owner)
                self._handles.append(module.register_forward_hook(hook))

    def detach(self) -> None:
        """Remove every hook and drop anything recorded; the model is left as it was."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._store.armed = False
        self._store.clear()

    @contextmanager
    def window(self) -> Iterator[FeatureCapture]:
        """Record only inside; on exit, normal or not, drop every reference it recorded."""
        if not self._handles:
            raise CaptureError("FeatureCapture.window() needs attach() first: no hooks are registered")
        if self._store.armed:
            raise CaptureError("a FeatureCapture window is already open; windows do not nest")
        self._store.clear()
        self._store.armed = True
        try:
            yield self
        finally:
            self._store.armed = False
            self._store.clear()

    @contextmanager
    def role(self, name: str) -> Iterator[None]:
        """Attribute shared-module calls to `name` inside; restores the previous role on exit.

        Unshared modules ignore it: the model a hook sits on is the better witness of the role.
        """
        if name not in ROLES:
            raise ValueError(f"unknown role {name!r}; roles are {list(ROLES)}")
        previous = self._store.role
        self._store.role = name
        try:
            yield
        finally:
            self._store.role = previous

    @property
    def calls(self) -> dict[tuple[str, Target], int]:
        """(role, target) -> hook calls recorded in this window (one per vision-tower call)."""
        return {key: len(chunks) for key, chunks in self._store.features.items()}

    def take(self) -> dict[str, dict[Target, torch.Tensor]]:
        """role -> target -> features of every call in this window, concatenated in call order.

        Returns references (student ones carry their graph); the window exit drops the store's.
        """
        store = self._store
        if not store.armed:
            raise CaptureError("FeatureCapture.take() called outside a window; nothing is recorded there")
        if store.unattributed:
            raise RoleUnknownError(
                "shared aligner modules fired with no role set (target -> calls: "
                f"{ {t.name: n for t, n in store.unattributed.items()} }); "
                "wrap student and teacher forwards in FeatureCapture.role(...)"
            )
        if store.unreadable:
            raise CaptureError(
                "aligner outputs that are neither a tensor nor a tuple/list led by one: "
                f"{ {f'{role}/{t.name}': kind for (role, t), kind in store.unreadable.items()} }"
            )
        taken: dict[str, dict[Target, torch.Tensor]] = {}
        for role in ROLES:
            for target in self._targets:
                chunks = store.features.get((role, target))
                if chunks:
                    taken.setdefault(role, {})[target] = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        return taken
