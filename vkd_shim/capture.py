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
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from vkd_shim.errors import CaptureError, RoleUnknownError, TargetResolutionError

STUDENT = "student"
TEACHER = "teacher"
ROLES = (STUDENT, TEACHER)

MERGER = "merger"
DEEPSTACK = "deepstack"
#: The ViT's output as it enters the merger (the patch embeddings after the ViT blocks): the merger's
#: input, read by a forward pre-hook on it, so it costs no extra compute.
VIT = "vit"
KINDS = (MERGER, DEEPSTACK, VIT)
#: Kinds whose features are a module's input, not its output.
_INPUT_KINDS = (VIT,)

# Tried after ms-swift's declared aligner paths: the Qwen-VL layout of transformers >= 4.52
# (`model.visual`), then the older one where the vision tower hangs off the top-level model.
_FALLBACK_PATHS = {
    MERGER: ("model.visual.merger", "visual.merger"),
    DEEPSTACK: ("model.visual.deepstack_merger_list", "visual.deepstack_merger_list"),
}


class Target(NamedTuple):
    """One captured aligner output: a kind and, for deepstack, the index into deepstack_merger_list.

    Capture, loss and runtime key everything by this value; ``name`` is only for metrics and events.
    """

    kind: str
    index: int | None = None

    @property
    def name(self) -> str:
        return self.kind if self.index is None else f"{self.kind}_{self.index}"


def unwrap(model: nn.Module) -> nn.Module:
    """Peel DDP / DeepSpeed (`.module`) and PEFT (`get_base_model()`) wrappers, in any nesting.

    ms-swift's aligner paths are relative to the transformers model, and accelerate, DeepSpeed
    and PEFT each add a layer above it.
    """
    current = model
    while True:
        inner = getattr(current, "module", None)
        if isinstance(inner, nn.Module):
            current = inner
            continue
        get_base_model = getattr(current, "get_base_model", None)
        if callable(get_base_model):
            base = get_base_model()
            if isinstance(base, nn.Module) and base is not current:
                current = base
                continue
        return current


def _lookup(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _pick(candidates: list[tuple[str, nn.Module]], kind: str, root: nn.Module) -> tuple[str, nn.Module] | None:
    """One declared path per kind; with several (omni models also declare audio projectors),
    the one named like a merger wins, and a tie is refused rather than guessed."""
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    named = [(path, module) for path, module in candidates if "merger" in path.rsplit(".", 1)[-1]]
    if len(named) == 1:
        return named[0]
    raise TargetResolutionError(
        f"{type(root).__name__}: ambiguous {kind!r} aligner, declared paths "
        f"{[path for path, _ in candidates]} all resolve; pass a single path per kind"
    )


def _locate(root: nn.Module, aligner: Sequence[str] | None) -> dict[str, tuple[str, nn.Module] | None]:
    """Merger and deepstack list: declared aligner paths first, then the Qwen-VL fallbacks.

    A declared path whose object is an `nn.ModuleList` is the deepstack list; any other module
    is the merger. Declared paths that do not resolve to a module (ms-swift also lists
    parameters for some architectures) are ignored here and reported by the caller's error.
    """
    declared: dict[str, list[tuple[str, nn.Module]]] = {MERGER: [], DEEPSTACK: []}
    for path in aligner or ():
        module = _lookup(root, path)
        if module is not None:
            declared[DEEPSTACK if isinstance(module, nn.ModuleList) else MERGER].append((path, module))

    found: dict[str, tuple[str, nn.Module] | None] = {}
    for kind in (MERGER, DEEPSTACK):
        found[kind] = _pick(declared[kind], kind, root)
        if found[kind] is None:
            for path in _FALLBACK_PATHS[kind]:
                module = _lookup(root, path)
                if module is not None and isinstance(module, nn.ModuleList) == (kind == DEEPSTACK):
                    found[kind] = (path, module)
                    break
    return found


def _describe(root: nn.Module, found: dict[str, tuple[str, nn.Module] | None], aligner: Sequence[str] | None) -> str:
    merger = found[MERGER]
    deepstack = found[DEEPSTACK]
    has = f"merger at {merger[0]!r}" if merger else "no merger"
    count = len(deepstack[1]) if deepstack else 0
    where = f" at {deepstack[0]!r}" if deepstack else ""
    searched = [*(aligner or ()), *_FALLBACK_PATHS[MERGER], *_FALLBACK_PATHS[DEEPSTACK]]
    return f"{type(root).__name__} has {has} and {count} deepstack mergers{where} (searched {searched})"


def vision_tower(model: nn.Module, aligner: Sequence[str] | None = None) -> nn.Module | None:
    """The module holding the merger (``model.visual``): everything the captured outputs depend on."""
    root = unwrap(model)
    found = _locate(root, aligner)
    located = found[MERGER] or found[DEEPSTACK]
    if located is None:
        return None
    parent = located[0].rpartition(".")[0]
    return _lookup(root, parent) if parent else root


def upstream_parameters(model: nn.Module, target: Target, aligner: Sequence[str] | None = None) -> list[nn.Parameter]:
    """The parameters a target's feature depends on (what the term can move): ``vit`` the ViT's own,
    ``merger`` those plus the merger's, ``deepstack_i`` the ViT up to the block it taps
    (``deepstack_visual_indexes``) plus its merger. Without that attribute every block counts."""
    root = unwrap(model)
    found = _locate(root, aligner)
    tower = vision_tower(root, aligner)
    if tower is None:
        return []
    merger = found[MERGER][1] if found[MERGER] else None
    deepstack = found[DEEPSTACK][1] if found[DEEPSTACK] else nn.ModuleList()
    own = {id(p) for m in (merger, *deepstack) if m is not None for p in m.parameters()}
    blocks = getattr(tower, "blocks", None)
    taps = getattr(tower, "deepstack_visual_indexes", None)
    later_blocks: set[int] = set()
    if target.kind == DEEPSTACK and isinstance(blocks, nn.ModuleList) and taps is not None:
        later_blocks = {id(p) for block in blocks[taps[target.index] + 1 :] for p in block.parameters()}
    vit = [p for p in tower.parameters() if id(p) not in own and id(p) not in later_blocks]
    if target.kind == MERGER and merger is not None:
        return [*vit, *merger.parameters()]
    if target.kind == DEEPSTACK:
        return [*vit, *deepstack[target.index].parameters()]
    return vit


def frozen_targets(model: nn.Module, targets: Iterable[Target], aligner: Sequence[str] | None = None) -> list[Target]:
    """Targets whose feature depends on no trainable parameter: a term on them is a constant."""
    return [t for t in targets if not any(p.requires_grad for p in upstream_parameters(model, t, aligner))]


def resolve_targets(
    model: nn.Module,
    kinds: Iterable[str],
    deepstack_layers: Sequence[int] | None = None,
    aligner: Sequence[str] | None = None,
) -> dict[Target, nn.Module]:
    """Map each :class:`Target` to the module whose output is captured.

    `deepstack_layers` indexes `deepstack_merger_list` (None: every entry); `aligner` is
    ms-swift's declared aligner paths for the architecture. Anything requested but absent raises,
    because the user asked for vision KD and a silent partial capture would look like success.
    """
    root = unwrap(model)
    wanted = list(dict.fromkeys(kinds))
    unknown = [kind for kind in wanted if kind not in KINDS]
    if unknown or not wanted:
        raise TargetResolutionError(
            f"{type(root).__name__}: target kinds {wanted} requested; allowed kinds are {list(KINDS)}"
        )

    found = _locate(root, aligner)
    targets: dict[Target, nn.Module] = {}
    for kind in (MERGER, VIT):
        if kind in wanted:
            if found[MERGER] is None:
                raise TargetResolutionError(f"requested target {kind!r} but {_describe(root, found, aligner)}")
            targets[Target(kind)] = found[MERGER][1]
    if DEEPSTACK in wanted:
        deepstack = found[DEEPSTACK]
        if deepstack is None or len(deepstack[1]) == 0:
            raise TargetResolutionError(f"requested target 'deepstack' but {_describe(root, found, aligner)}")
        size = len(deepstack[1])
        for index in range(size) if deepstack_layers is None else deepstack_layers:
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < size:
                raise TargetResolutionError(
                    f"requested deepstack layer {index!r} but {_describe(root, found, aligner)}; "
                    f"valid layers are 0..{size - 1}"
                )
            targets[Target(DEEPSTACK, index)] = deepstack[1][index]
    return targets


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
    ) -> None:
        kinds = tuple(kinds)
        student_targets = resolve_targets(student, kinds, deepstack_layers, aligner)
        if teacher is None or teacher is student:
            teacher_targets = student_targets
        else:
            teacher_targets = resolve_targets(teacher, kinds, deepstack_layers, aligner)
        if list(teacher_targets) != list(student_targets):
            architectures = f"{type(unwrap(student)).__name__} vs {type(unwrap(teacher)).__name__}"
            raise TargetResolutionError(
                f"student targets {[t.name for t in student_targets]} differ from teacher targets "
                f"{[t.name for t in teacher_targets]} ({architectures})"
            )
        self._targets = tuple(student_targets)
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
            if target.kind in _INPUT_KINDS:
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
