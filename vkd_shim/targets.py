"""Which module each vision-KD target is, and which parameters its feature depends on.

ms-swift's registry declares each architecture's aligner paths; the Qwen-VL layouts are the fallback. Targets
are resolved on the real module tree (or one built on the meta device, for the doctor), so a requested target
that is absent is an error naming what the model has, never a silent partial capture.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

from torch import nn

from vkd_shim.errors import TargetResolutionError

MERGER = "merger"
DEEPSTACK = "deepstack"
#: The ViT's output as it enters the merger (the patch embeddings after the ViT blocks): the merger's
#: input, read by a forward pre-hook on it, so it costs no extra compute.
VIT = "vit"
KINDS = (MERGER, DEEPSTACK, VIT)
#: Kinds whose features are a module's input, not its output.
INPUT_KINDS = (VIT,)

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


def vision_tower(
    model: nn.Module, aligner: Sequence[str] | None = None, tower: Sequence[str] | None = None
) -> nn.Module | None:
    """The vision tower the captured outputs depend on: ms-swift's declared ``vision_tower`` (``tower``; with
    several, the one holding the merger, as Qwen's ``model.visual`` does), else the merger's parent."""
    root = unwrap(model)
    found = _locate(root, aligner)
    located = found[MERGER] or found[DEEPSTACK]
    if located is None:
        return None
    declared = [(path, module) for path in tower or () if (module := _lookup(root, path)) is not None]
    holding = [module for path, module in declared if located[0].startswith(path + ".")]
    if holding or declared:
        return (holding or [declared[0][1]])[0]
    parent = located[0].rpartition(".")[0]
    return _lookup(root, parent) if parent else root


def upstream_parameters(
    model: nn.Module, target: Target, aligner: Sequence[str] | None = None, tower: Sequence[str] | None = None
) -> list[nn.Parameter]:
    """The parameters a target's feature depends on (what the term can move): ``vit`` the ViT's own,
    ``merger`` those plus the merger's, ``deepstack_i`` the ViT up to the block it taps
    (``deepstack_visual_indexes``) plus its merger. Without that attribute every block counts."""
    root = unwrap(model)
    found = _locate(root, aligner)
    vit_module = vision_tower(root, aligner, tower)
    if vit_module is None:
        return []
    merger = found[MERGER][1] if found[MERGER] else None
    deepstack = found[DEEPSTACK][1] if found[DEEPSTACK] else nn.ModuleList()
    own = {id(p) for m in (merger, *deepstack) if m is not None for p in m.parameters()}
    blocks = getattr(vit_module, "blocks", None)
    taps = getattr(vit_module, "deepstack_visual_indexes", None)
    later_blocks: set[int] = set()
    if target.kind == DEEPSTACK and isinstance(blocks, nn.ModuleList) and taps is not None:
        later_blocks = {id(p) for block in blocks[taps[target.index] + 1 :] for p in block.parameters()}
    vit = [p for p in vit_module.parameters() if id(p) not in own and id(p) not in later_blocks]
    if target.kind == MERGER and merger is not None:
        return [*vit, *merger.parameters()]
    if target.kind == DEEPSTACK:
        return [*vit, *deepstack[target.index].parameters()]
    return vit


def frozen_targets(
    model: nn.Module,
    targets: Iterable[Target],
    aligner: Sequence[str] | None = None,
    tower: Sequence[str] | None = None,
) -> list[Target]:
    """Targets whose feature depends on no trainable parameter: a term on them is a constant."""
    return [t for t in targets if not any(p.requires_grad for p in upstream_parameters(model, t, aligner, tower))]


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

    return {target: module for target, (_, module) in _resolve(root, wanted, deepstack_layers, aligner).items()}


def target_paths(
    model: nn.Module,
    kinds: Iterable[str],
    deepstack_layers: Sequence[int] | None = None,
    aligner: Sequence[str] | None = None,
) -> dict[Target, str]:
    """Each target's module path, as the attach event and the doctor name it (``vit`` reads its module's input)."""
    resolved = _resolve(unwrap(model), list(dict.fromkeys(kinds)), deepstack_layers, aligner)
    return {t: f"{path} (input)" if t.kind in INPUT_KINDS else path for t, (path, _) in resolved.items()}


def _resolve(
    root: nn.Module, wanted: list[str], deepstack_layers: Sequence[int] | None, aligner: Sequence[str] | None
) -> dict[Target, tuple[str, nn.Module]]:
    found = _locate(root, aligner)
    targets: dict[Target, tuple[str, nn.Module]] = {}
    for kind in (MERGER, VIT):
        if kind in wanted:
            if found[MERGER] is None:
                raise TargetResolutionError(f"requested target {kind!r} but {_describe(root, found, aligner)}")
            targets[Target(kind)] = found[MERGER]
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
            targets[Target(DEEPSTACK, index)] = (f"{deepstack[0]}.{index}", deepstack[1][index])
    return targets
