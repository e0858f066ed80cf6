"""Where vision KD plugs into an ms-swift GKD run: the patch points, the patcher, the wrappers.

Patch points, by role (module paths and names per ms-swift release live in
:mod:`vkd_shim.swift_layouts`; the layout is picked by the installed ms-swift version):

- CLI YAML parsing: takes a ``custom:`` block out of the YAML given to ``swift rlhf`` before
  ms-swift's argument parser rejects it.
- ``SwiftRLHF._prepare_model_tokenizer``: runs :func:`vkd_shim.preflight.check` before any model loads;
  ``SwiftSft._prepare_model_tokenizer`` (the base of every training pipeline) does so for ``swift sft``/``pt``.
- ``GKDTrainer.__init__`` attaches :class:`vkd_shim.runtime.TrainerKD`; ``.compute_loss`` hands each
  call to it; ``.log`` flushes its accumulators into ms-swift's metrics at log time only.
- ``MegatronRLHF._prepare_template``: refuses (Megatron is not supported yet), before any weights.

Every hook catches its own errors (an exception in a post-import hook breaks the user's import); a
patch point that could not be applied is raised from the next wrapper the shim owns, because a run
that asked for vision KD must never train silently without it.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import wrapt

from vkd_shim import __version__, config, env, preflight, runtime, swift_layouts, telemetry
from vkd_shim.errors import ConfigError, PatchError, RefusedError, VisionKDError


class _VkdWrapper(wrapt.FunctionWrapper):
    """Marks our wrappers, so a second patch sees the first and never double-wraps."""


class Patcher:
    """Applies one module's points all-or-nothing and remembers how to undo them."""

    def __init__(self) -> None:
        #: point name -> (owner, attribute, original, whether the owner held it itself)
        self.applied: dict[str, tuple[Any, str, Any, bool]] = {}
        self.failures: dict[str, str] = {}
        #: What the bootstrap could not do (a switch value that is neither on nor off, ...).
        self.boot_errors: list = []

    def apply(self, module: Any, points: dict[str, Callable]) -> None:
        log = telemetry.get_logger()
        resolved = []
        for qualname, wrapper in points.items():
            name = f"{module.__name__}:{qualname}"
            try:
                owner, attr, original = wrapt.resolve_path(module, qualname)
            except AttributeError:
                self.failures[name] = f"{qualname} not found in {module.__name__}"
                log.error("vkd.patch", status="failed", target=name, reason=self.failures[name], **_versions())
                continue
            resolved.append((name, owner, attr, original, wrapper))
        if len(resolved) != len(points):
            return  # all-or-nothing: a half-patched trainer is worse than an unpatched one
        for name, owner, attr, original, wrapper in resolved:
            if isinstance(original, _VkdWrapper):
                log.info("vkd.patch", status="skipped", target=name, reason="already patched")
                continue
            own = attr in vars(owner)
            setattr(owner, attr, _VkdWrapper(original, wrapper))
            self.applied[name] = (owner, attr, original, own)
            self.failures.pop(name, None)
            log.info("vkd.patch", status="applied", target=name, **_versions())

    def unpatch_all(self) -> None:
        for name, (owner, attr, original, own) in list(self.applied.items()):
            if isinstance(vars(owner).get(attr), _VkdWrapper):
                if own:
                    setattr(owner, attr, original)
                else:
                    delattr(owner, attr)
            del self.applied[name]
            telemetry.get_logger().info("vkd.unpatch", target=name)

    def raise_failures(self) -> None:
        problems = [str(e) for e in self.boot_errors]
        problems += [f"{name}: {reason}" for name, reason in sorted(self.failures.items())]
        if problems:
            raise PatchError(
                f"vision KD was asked for (VKD_ENABLE) but cannot run with ms-swift {_swift_version()}: "
                f"{'; '.join(problems)}. Supported ms-swift: {swift_layouts.supported_text()}"
            )


LAYOUT = swift_layouts.installed()
PATCHER = Patcher()
_resolved: config.ResolvedConfig | None = None


def reset() -> None:
    """Forget the resolved config and every applied patch (tests; a fresh run in one process)."""
    global _resolved, PATCHER
    PATCHER.unpatch_all()
    PATCHER = Patcher()
    _resolved = None


def settings() -> config.ResolvedConfig:
    """The resolved config, computed once per process and logged once as an event."""
    global _resolved
    if _resolved is None:
        resolved = config.resolve()
        log = telemetry.get_logger()
        log.bind(config_digest=resolved.digest())
        log.info("vkd.config", **resolved.to_event())
        for note in resolved.notes:
            log.warning("vkd.config.note", note=note)
        if not resolved.config.active:
            log.warning(
                "vkd.disabled",
                reason=resolved.notes[0] if resolved.notes else "the term is off",
                decision="VKD_ENABLE is on, the config turns the term off: this run trains without vision KD",
            )
        _resolved = resolved
    return _resolved


# --- the post-import hook (registered for every module in swift_layouts.hook_modules()) -----------


def on_import(module: Any, boot_errors: list | tuple = ()) -> None:
    """Patch what the installed layout puts in ``module``; on ``swift`` itself, the version guard.

    ``boot_errors``: what the bootstrap met, raised from the first wrapper the shim owns.
    """
    # The bootstrap's own list: what it records after this call (a later hook failing) is raised too.
    PATCHER.boot_errors = boot_errors if isinstance(boot_errors, list) else list(boot_errors)
    if module.__name__ == "swift":
        _on_swift()
        return
    points = {qualname: WRAPPERS[role] for role, (name, qualname) in LAYOUT.points.items() if name == module.__name__}
    if not points:
        return  # another release's module: hooked for every layout, imported only under its own
    try:
        PATCHER.apply(module, points)
    except Exception as exc:  # never break the user's import: record, raise later from our code
        for qualname in points:
            PATCHER.failures[f"{module.__name__}:{qualname}"] = repr(exc)
        telemetry.get_logger().error(
            "vkd.patch", status="failed", target=module.__name__, reason=repr(exc), **_versions()
        )


def _on_swift() -> None:
    log = telemetry.get_logger()
    version = _swift_version()
    log.info(
        "vkd.activate",
        vkd_shim=__version__,
        swift_layout=LAYOUT.series,
        layout_reason=swift_layouts.layout_reason(version),
        **_versions(),
    )
    problem = swift_layouts.version_problem()
    if problem:
        log.warning("vkd.version", problem=problem, supported=list(swift_layouts.SUPPORTED))
    # A bad switch value or config is said once, by the first wrapper that stops the run (the CLI's YAML
    # step, or the preflight in the training process), not by every process that imports ms-swift.


def unpatch_all() -> None:
    PATCHER.unpatch_all()


# --- wrappers ------------------------------------------------------------------------------------


def _refuse(error: RefusedError) -> None:
    telemetry.get_logger().error("vkd.refuse", reason=error.reason, fix=error.fix)
    raise error


def _wrap_cli_yaml(wrapped, instance, args, kwargs):
    """Move ``custom.visual_kd`` out of ``swift rlhf x.yaml`` into the environment of the run.

    ms-swift turns the YAML's ``custom:`` mapping into ``--custom <json>``, which its argument parser
    rejects; the block travels to the re-exec'd process as ``VKD_INLINE_CONFIG`` instead.
    """
    argv = args[0] if args else kwargs.get("argv")
    source = LAYOUT.config_source(argv) if argv else None  # before ms-swift rewrites argv in place
    result = wrapped(*args, **kwargs)
    try:
        PATCHER.raise_failures()
        block = extract_inline(argv, source=source)
    except VisionKDError as exc:
        telemetry.get_logger().error("vkd.refuse", reason=str(exc), fix="fix custom.visual_kd in the YAML")
        raise SystemExit(f"vkd_shim: {exc}") from None
    if block is not None:
        os.environ[env.INLINE] = json.dumps(block)
        if source is not None:
            os.environ[env.INLINE_SOURCE] = source
    return result


def extract_inline(argv: list[str] | None, source: str | None) -> dict | None:
    """Take the ``custom.visual_kd`` block out of the argv ms-swift expanded from a YAML (in place)."""
    if not argv or "--custom" not in argv:
        return None
    at = argv.index("--custom")
    block, rest = config.split_inline({"custom": json.loads(argv[at + 1])}, source=source)
    if block is not None:
        if "custom" in rest:
            argv[at + 1] = json.dumps(rest["custom"])
        else:
            del argv[at : at + 2]
    return block


def _preflight(swift_args: Any) -> None:
    """Every refusal happens here, before the student or the teacher loads."""
    try:
        PATCHER.raise_failures()
        resolved = settings()
    except ConfigError as exc:
        telemetry.get_logger().error(
            "vkd.config.invalid", field=exc.field, source=exc.source, allowed=exc.allowed, message=str(exc)
        )
        _refuse(RefusedError(str(exc), "fix the vision-KD config (see `vkd-shim doctor`)"))
    if resolved.config.active:
        incompatible = swift_layouts.incompatible()
        if incompatible:
            _refuse(RefusedError(incompatible, "install ms-swift 4.4 or later, or unset VKD_ENABLE"))
        for refusal in preflight.check(swift_args, resolved.config, LAYOUT):
            _refuse(RefusedError(*refusal))
        importlib.import_module(LAYOUT.trainer_module)  # fires the trainer hook now, before loading
        PATCHER.raise_failures()


def _wrap_prepare_model_tokenizer(wrapped, instance, args, kwargs):
    _preflight(instance.args)
    return wrapped(*args, **kwargs)


def _wrap_train_preflight(wrapped, instance, args, kwargs):
    """``swift sft`` / ``swift pt`` (every training pipeline's base): a run that asked for vision KD stops
    here, before loading. RLHF pipelines pass: their own point ran the preflight before the teacher loaded."""
    if not hasattr(instance.args, "rlhf_type"):
        _preflight(instance.args)
    return wrapped(*args, **kwargs)


def _wrap_megatron(wrapped, instance, args, kwargs):
    if settings().config.active:
        _refuse(
            RefusedError(
                "Megatron-SWIFT GKD is not supported by vision KD yet",
                "use `swift rlhf`, or unset VKD_ENABLE",
            )
        )
    return wrapped(*args, **kwargs)


def _wrap_trainer_init(wrapped, instance, args, kwargs):
    PATCHER.raise_failures()
    result = wrapped(*args, **kwargs)
    resolved = settings()
    if resolved.config.active:
        try:
            runtime.bind(instance, runtime.TrainerKD(instance, resolved, LAYOUT))
        except RefusedError as exc:
            _refuse(exc)
    return result


def _wrap_compute_loss(wrapped, instance, args, kwargs):
    kd = runtime.state_of(instance)
    if kd is None:
        return wrapped(*args, **kwargs)
    return kd.compute_loss(wrapped, args, kwargs)


def _wrap_log(wrapped, instance, args, kwargs):
    kd = runtime.state_of(instance)
    if kd is not None:
        kd.flush("train" if instance.model.training else "eval")
    return wrapped(*args, **kwargs)


WRAPPERS: dict[str, Callable] = {
    swift_layouts.CLI_YAML: _wrap_cli_yaml,
    swift_layouts.TRAIN_PREFLIGHT: _wrap_train_preflight,
    swift_layouts.PIPELINE_PREFLIGHT: _wrap_prepare_model_tokenizer,
    swift_layouts.TRAINER_INIT: _wrap_trainer_init,
    swift_layouts.TRAINER_COMPUTE_LOSS: _wrap_compute_loss,
    swift_layouts.TRAINER_LOG: _wrap_log,
    swift_layouts.MEGATRON_PREFLIGHT: _wrap_megatron,
}


def _swift_version() -> str:
    return swift_layouts.installed_version() or "not installed"


def _versions() -> dict[str, str]:
    torch = sys.modules.get("torch")
    return {"swift_version": _swift_version(), "torch_version": getattr(torch, "__version__", "not imported")}
