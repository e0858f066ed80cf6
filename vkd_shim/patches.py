"""The only module that knows ms-swift: where vision KD plugs into a GKD run, and how.

Patch points, by role (module paths and names per ms-swift release live in
:mod:`vkd_shim.swift_layouts`; the layout is picked by the installed ms-swift version):

- CLI YAML parsing (``parse_yaml_args`` in 4.6, ``prepare_config_args`` in 3.12): takes a
  ``custom:`` block out of the YAML given to ``swift rlhf`` before ms-swift's argument parser
  rejects it.
- ``SwiftRLHF._prepare_model_tokenizer``: validates the config and the parsed arguments before
  any model loads, so a mistake costs seconds.
- ``GKDTrainer.__init__``: attaches the capture to student and teacher. ``.compute_loss``: opens
  the capture window around the original and adds the term. ``.log``: hands the on-device
  accumulators to ms-swift's metrics at log time only.
- ``MegatronRLHF._prepare_template``: refuses (Megatron is not supported yet), before Megatron
  builds its trainer or loads weights. Optional: it exists only where megatron-core is installed.

Every hook catches its own errors (an exception in a post-import hook breaks the user's
import); a patch point that could not be applied is raised from the next wrapper the shim
owns, because a run that asked for vision KD must never train silently without it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import torch
import wrapt

from vkd_shim import __version__, config, swift_layouts, telemetry
from vkd_shim.capture import (
    STUDENT,
    TEACHER,
    CaptureError,
    FeatureCapture,
    TargetResolutionError,
    resolve_targets,
)
from vkd_shim.loss import FeatureMismatchError, vision_kd_loss

#: ms-swift major.minor releases this shim was built and tested against.
SUPPORTED_SWIFT = swift_layouts.SUPPORTED
ENV_INLINE = "VKD_INLINE_CONFIG"
#: The YAML file the inline block came from, for messages and the config's source attribution.
ENV_INLINE_SOURCE = "VKD_INLINE_SOURCE"
CONFIG_FILE_NAME = "vision_kd_config.json"
METRIC_LOSS = "vision_kd_loss"
VISUAL_INPUT_KEYS = ("pixel_values", "pixel_values_videos")


class VisionKDError(RuntimeError):
    """Base of every error the shim raises on purpose."""


class PatchError(VisionKDError):
    """Vision KD was asked for but a patch point is missing: training would run without it."""


class RefusedError(VisionKDError):
    """The run asked for vision KD in a setting that cannot provide it; stopped before loading."""


class NonFiniteError(VisionKDError):
    """``nonfinite: raise`` and the aligner features carried NaN/Inf."""


@dataclass(frozen=True)
class PatchPoint:
    module: str
    qualname: str
    wrapper: Callable
    #: Top-level module of the optional dependency the point exists with (Megatron needs
    #: megatron-core); without it the point is absent by design and its module is never imported.
    requires: str | None = None

    @property
    def optional(self) -> bool:
        return self.requires is not None

    @property
    def name(self) -> str:
        return f"{self.module}:{self.qualname}"


class _VkdWrapper(wrapt.FunctionWrapper):
    """Marks our wrappers, so a second patch sees the first and never double-wraps."""


class _Patcher:
    """Applies one module's points all-or-nothing and remembers how to undo them."""

    def __init__(self) -> None:
        self.applied: dict[str, tuple[Any, str, Any]] = {}
        self.failures: dict[str, str] = {}

    def apply(self, module, points: tuple[PatchPoint, ...]) -> None:
        log = telemetry.get_logger()
        resolved = []
        for point in points:
            owner, attr = _owner(module, point)
            original = vars(owner).get(attr) if owner is not None else None
            if original is None:
                reason = f"{point.qualname} not found in {module.__name__}"
                self.failures[point.name] = reason
                log.error("vkd.patch", status="failed", target=point.name, reason=reason, **_versions_ctx())
                continue
            resolved.append((point, owner, attr, original))
        if len(resolved) != len(points):
            return  # all-or-nothing: a half-patched trainer is worse than an unpatched one
        for point, owner, attr, original in resolved:
            if isinstance(original, _VkdWrapper):
                log.info("vkd.patch", status="skipped", target=point.name, reason="already patched")
                continue
            setattr(owner, attr, _VkdWrapper(original, point.wrapper))
            self.applied[point.name] = (owner, attr, original)
            self.failures.pop(point.name, None)
            log.info("vkd.patch", status="applied", target=point.name, **_versions_ctx())

    def unpatch_all(self) -> None:
        for name, (owner, attr, original) in list(self.applied.items()):
            if isinstance(vars(owner).get(attr), _VkdWrapper):
                setattr(owner, attr, original)
            del self.applied[name]
            telemetry.get_logger().info("vkd.unpatch", target=name)

    def raise_failures(self) -> None:
        if self.failures:
            details = "; ".join(f"{name}: {reason}" for name, reason in sorted(self.failures.items()))
            raise PatchError(
                f"vision KD was asked for (VKD_ENABLE=1) but ms-swift {_swift_version()} is missing "
                f"patch points: {details}. Supported ms-swift: {swift_layouts.supported_text()}"
            )


_PATCHER = _Patcher()
_resolved: config.ResolvedConfig | None = None


def settings() -> config.ResolvedConfig:
    """The resolved config, computed once per process and logged once as an event."""
    global _resolved
    if _resolved is None:
        inline_text = os.environ.get(ENV_INLINE)
        inline = json.loads(inline_text) if inline_text else None
        resolved = config.resolve(inline=inline, inline_source=os.environ.get(ENV_INLINE_SOURCE))
        log = telemetry.get_logger()
        log.bind(config_digest=resolved.digest())
        log.info("vkd.config", **resolved.to_event())
        for note in resolved.notes:
            log.warning("vkd.config.note", note=note)
        _resolved = resolved
    return _resolved


# --- hooks (registered by name in vkd_shim.bootstrap) -------------------------------------


def on_swift(module) -> None:
    """Version guard: say so before patching when ms-swift is outside the tested matrix."""
    log = telemetry.get_logger()
    log.info("vkd.activate", vkd_shim=__version__, swift_layout=LAYOUT.series, **_versions_ctx())
    problem = version_problem()
    if problem:
        log.warning("vkd.version", problem=problem, supported=list(SUPPORTED_SWIFT))


def on_cli_main(module) -> None:
    _safe_hook(module)


def on_rlhf_pipeline(module) -> None:
    _safe_hook(module)


def on_gkd_trainer(module) -> None:
    _safe_hook(module)


def on_megatron_rlhf(module) -> None:
    _safe_hook(module)


def _safe_hook(module) -> None:
    """Patch what the installed release's layout puts in ``module`` (hooks are registered for the
    modules of every supported release; only the installed one's can be imported)."""
    points = POINTS.get(module.__name__)
    if points is None:
        reason = f"{module.__name__} holds no patch point in the ms-swift {LAYOUT.series} layout"
        _PATCHER.failures[module.__name__] = reason
        telemetry.get_logger().error(
            "vkd.patch", status="failed", target=module.__name__, reason=reason, **_versions_ctx()
        )
        return
    try:
        _PATCHER.apply(module, points)
    except Exception as exc:  # never break the user's import: record, raise later from our code
        for point in points:
            _PATCHER.failures[point.name] = repr(exc)
        telemetry.get_logger().error(
            "vkd.patch", status="failed", target=module.__name__, reason=repr(exc), **_versions_ctx()
        )


def unpatch_all() -> None:
    _PATCHER.unpatch_all()


# --- wrappers ------------------------------------------------------------------------------


def _wrap_parse_yaml_args(wrapped, instance, args, kwargs):
    """Move ``custom.visual_kd`` out of ``swift rlhf x.yaml`` into the environment of the run.

    ms-swift turns the YAML's ``custom:`` mapping into ``--custom <json>``, which its argument
    parser rejects; the block travels to the re-exec'd process as ``VKD_INLINE_CONFIG`` instead.
    """
    argv = args[0] if args else kwargs.get("argv")
    source = LAYOUT.config_source(argv) if argv else None  # before ms-swift rewrites argv in place
    result = wrapped(*args, **kwargs)
    if not argv or "--custom" not in argv:
        return result
    at = argv.index("--custom")
    try:
        block, rest = config.split_inline({"custom": json.loads(argv[at + 1])}, source=source)
    except config.ConfigError as exc:
        telemetry.get_logger().error("vkd.refuse", reason=str(exc), fix="fix custom.visual_kd in the YAML")
        raise SystemExit(f"vkd_shim: {exc}") from None
    if block is not None:
        os.environ[ENV_INLINE] = json.dumps(block)
        if source is not None:
            os.environ[ENV_INLINE_SOURCE] = source
        if "custom" in rest:
            argv[at + 1] = json.dumps(rest["custom"])
        else:
            del argv[at : at + 2]
    return result


def _wrap_prepare_model_tokenizer(wrapped, instance, args, kwargs):
    """Preflight: every refusal happens here, before the student or the teacher loads."""
    try:
        resolved = settings()
    except config.ConfigError as exc:
        telemetry.get_logger().error(
            "vkd.config.invalid", field=exc.field, source=exc.source, allowed=exc.allowed, message=str(exc)
        )
        _refuse(str(exc), "fix the vision-KD config (see `vkd-shim doctor`)")
    if resolved.config.active:
        preflight(instance.args)
        importlib.import_module(LAYOUT.trainer_module)  # fires on_gkd_trainer now
        _PATCHER.raise_failures()
    return wrapped(*args, **kwargs)


def preflight(args) -> None:
    """Refuse, with the fix, the settings in which vision KD cannot work."""
    if getattr(args, "rlhf_type", None) != "gkd":
        _refuse(f"rlhf_type is {args.rlhf_type!r}; vision KD works with --rlhf_type gkd", "unset VKD_ENABLE")
    if getattr(args, "teacher_model_server", None):
        _refuse(
            "a remote teacher (teacher_model_server) returns logits only: no aligner features exist",
            "use a local --teacher_model, or unset VKD_ENABLE",
        )
    if getattr(args, "teacher_model", None) is None and not getattr(
        args, "_teacher_use_disable_adapter", False
    ):
        _refuse(
            "no --teacher_model: the teacher is the student's own weights, so the term is zero by "
            "construction",
            "pass --teacher_model (the frozen Stage-2 model), or unset VKD_ENABLE",
        )
    if getattr(args, "fsdp", None):
        _refuse("FSDP is not supported by vision KD yet", "use DeepSpeed ZeRO-2/3, or unset VKD_ENABLE")
    student, teacher = (
        _out_hidden_size(getattr(args, "model_dir", None)),
        _out_hidden_size(args.teacher_model),
    )
    if student is not None and teacher is not None and student != teacher:
        _refuse(
            f"student and teacher aligners differ in width (vision_config.out_hidden_size "
            f"{student} vs {teacher}): features cannot be compared",
            "distil between models with the same aligner width, or unset VKD_ENABLE",
        )


def _out_hidden_size(model_dir) -> int | None:
    """Read from config.json, not the weights: ZeRO-3 partitions the weights."""
    path = os.path.join(model_dir, "config.json") if isinstance(model_dir, str) else ""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        vision = json.load(f).get("vision_config") or {}
    return vision.get("out_hidden_size")


def _refuse(reason: str, fix: str) -> None:
    telemetry.get_logger().error("vkd.refuse", reason=reason, fix=fix)
    raise RefusedError(f"vision KD refused: {reason}. Fix: {fix}.")


def _wrap_megatron_rlhf_init(wrapped, instance, args, kwargs):
    if settings().config.active:
        _refuse(
            "Megatron-SWIFT GKD is not supported by vision KD yet", "use `swift rlhf`, or unset VKD_ENABLE"
        )
    return wrapped(*args, **kwargs)


def _wrap_trainer_init(wrapped, instance, args, kwargs):
    _PATCHER.raise_failures()
    result = wrapped(*args, **kwargs)
    resolved = settings()
    if resolved.config.active:
        instance._vkd = TrainerKD(instance, resolved)
    return result


def _wrap_compute_loss(wrapped, instance, args, kwargs):
    kd = instance.__dict__.get("_vkd")
    if kd is None:
        return wrapped(*args, **kwargs)
    return kd.compute_loss(wrapped, args, kwargs)


def _wrap_log(wrapped, instance, args, kwargs):
    kd = instance.__dict__.get("_vkd")
    if kd is not None:
        kd.flush("train" if instance.model.training else "eval")
    return wrapped(*args, **kwargs)


WRAPPERS: dict[str, Callable] = {
    swift_layouts.CLI_YAML: _wrap_parse_yaml_args,
    swift_layouts.PIPELINE_PREFLIGHT: _wrap_prepare_model_tokenizer,
    swift_layouts.TRAINER_INIT: _wrap_trainer_init,
    swift_layouts.TRAINER_COMPUTE_LOSS: _wrap_compute_loss,
    swift_layouts.TRAINER_LOG: _wrap_log,
    swift_layouts.MEGATRON_PREFLIGHT: _wrap_megatron_rlhf_init,
}


def build_points(layout: swift_layouts.SwiftLayout) -> dict[str, tuple[PatchPoint, ...]]:
    """The layout's patch points grouped by module, each with the wrapper of its role."""
    points: dict[str, tuple[PatchPoint, ...]] = {}
    for role, (module, qualname) in layout.points.items():
        point = PatchPoint(module, qualname, WRAPPERS[role], swift_layouts.OPTIONAL_ROLES.get(role))
        points[module] = (*points.get(module, ()), point)
    return points


#: The installed release's layout, and the patch points it implies.
LAYOUT = swift_layouts.for_version(swift_layouts.installed_version())
POINTS = build_points(LAYOUT)
MEGATRON_MODULE = LAYOUT.points[swift_layouts.MEGATRON_PREFLIGHT][0]


# --- the per-trainer runtime ---------------------------------------------------------------


class TrainerKD:
    """Vision KD state of one GKD trainer: capture, config, and the metric buffer."""

    def __init__(self, trainer, resolved: config.ResolvedConfig) -> None:
        self.trainer = trainer
        self.config = resolved.config
        self.log = telemetry.get_logger()
        self.buffer = telemetry.MetricBuffer()
        self.limiter = telemetry.RateLimiter()
        if getattr(trainer, "use_teacher_api", False):
            _refuse("a remote teacher returns logits only: no aligner features exist", "use a local teacher")
        student = trainer.accelerator.unwrap_model(trainer.model)
        teacher = trainer.teacher_model
        if teacher is None:
            if not getattr(trainer, "_teacher_use_disable_adapter", False):
                _refuse("the trainer has no teacher model", "pass --teacher_model")
            teacher = student  # ms-swift's teacher: the same model with its adapters disabled
        kinds, layers, aligner = self.config.kinds, self.config.deepstack_layers, _aligner_paths(student)
        try:
            modules = resolve_targets(student, kinds, layers, aligner)
            self.capture = FeatureCapture(student, teacher, kinds, layers, aligner=aligner)
        except TargetResolutionError as exc:
            _refuse(str(exc), "choose targets the architecture has (custom.visual_kd.targets)")
        self.capture.attach()
        self.targets = tuple(modules)
        self.peft_student = student if hasattr(student, "disable_adapter") else None
        self.keys = (
            METRIC_LOSS,
            *(f"vision_kd/{t}" for t in self.targets),
            "vision_kd/tokens",
            "vision_kd/skipped",
        )
        self.nonfinite: dict[str, dict[str, Any]] = {"train": {}, "eval": {}}
        self.log.info(
            "vkd.attach",
            targets=list(self.targets),
            shared_modules=self.capture.shared,
            distance=self.config.distance,
        )
        if not any(p.requires_grad for m in modules.values() for p in m.parameters()):
            self.log.warning(
                "vkd.aligner_frozen",
                reason="the student's aligner has no trainable parameters: the term cannot move it",
                fix="pass --freeze_aligner false (or add the aligner to LoRA target modules)",
            )
        self._save_config(resolved)

    def _save_config(self, resolved: config.ResolvedConfig) -> None:
        args = self.trainer.args
        if not self.trainer.is_world_process_zero():
            return
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, CONFIG_FILE_NAME), "w", encoding="utf-8") as f:
            json.dump(resolved.to_event(), f, indent=2, sort_keys=True)

    def compute_loss(self, wrapped, args, kwargs):
        inputs = args[1] if len(args) > 1 else kwargs["inputs"]
        model_inputs = LAYOUT.model_inputs(inputs)
        if not any(model_inputs.get(k) is not None for k in VISUAL_INPUT_KEYS):
            # Text-only micro-batch: the tower may still run on ms-swift's dummy image (DeepSpeed),
            # and those features are not visual tokens. Nothing is captured, nothing is added.
            return wrapped(*args, **kwargs)
        mode = "train" if self.trainer.model.training else "eval"
        with self.capture.window(), self._roles():
            result = wrapped(*args, **kwargs)
            term = self._term(mode)
        if term is None:
            return result
        if isinstance(result, tuple):
            return (result[0] + term, *result[1:])
        return result + term

    @contextlib.contextmanager
    def _roles(self):
        """Attribute passes through shared modules: student by default, teacher under disable_adapter."""
        if not self.capture.shared:
            yield
            return
        peft = self.peft_student
        original = peft.disable_adapter
        capture = self.capture

        @contextlib.contextmanager
        def disable_adapter():
            with capture.role(TEACHER), original():
                yield

        peft.disable_adapter = disable_adapter
        try:
            with capture.role(STUDENT):
                yield
        finally:
            del peft.disable_adapter

    def _term(self, mode: str):
        try:
            features = self.capture.take()
        except CaptureError as exc:
            self._skip(mode, str(exc))
            return None
        student, teacher = features.get(STUDENT, {}), features.get(TEACHER, {})
        if not student and not teacher:
            self._skip(mode, "no aligner features were captured in a micro-batch with visual inputs")
            return None
        try:
            out = vision_kd_loss(
                student,
                teacher,
                target_weights={t: self.config.target_weight(t) for t in student},
                distance=self.config.distance,
                weight=self.config.weight,
                warmup=self.config.warmup_factor(self.trainer.state.global_step),
            )
        except FeatureMismatchError as exc:
            self._skip(
                mode,
                str(exc),
                target=exc.target,
                student_shape=exc.student_shape,
                teacher_shape=exc.teacher_shape,
            )
            return None
        add = self.buffer.add
        add(mode, METRIC_LOSS, out.total.detach())
        for target, value in out.per_target.items():
            add(mode, f"vision_kd/{target}", value.detach())
        add(mode, "vision_kd/tokens", out.tokens)
        add(mode, "vision_kd/skipped", sum(out.nonfinite.values()))
        pending = self.nonfinite[mode]
        for target, count in out.nonfinite.items():
            pending[target] = pending[target] + count if target in pending else count
        return out.total

    def _skip(self, mode: str, reason: str, **fields) -> None:
        self.buffer.add(mode, "vision_kd/skipped", 1)
        allowed, suppressed = self.limiter.allow(f"skip:{reason[:60]}")
        if allowed:
            self.log.warning(
                "vkd.skip",
                mode=mode,
                step=self.trainer.state.global_step,
                reason=reason,
                suppressed=suppressed,
                **fields,
            )

    def flush(self, mode: str) -> None:
        """At log time only: one host read of the accumulators, then ms-swift's MeanMetric."""
        self.buffer.flush(mode, LAYOUT.metrics(self.trainer), self.keys)
        pending, self.nonfinite[mode] = self.nonfinite[mode], {}
        step = self.trainer.state.global_step
        for target, count in pending.items():
            total = int(count)
            if total > 0:
                self.log.warning(
                    "vkd.nonfinite",
                    step=step,
                    mode=mode,
                    target=target,
                    count=total,
                    policy=self.config.nonfinite,
                )
                if self.config.nonfinite == "raise":
                    raise NonFiniteError(
                        f"non-finite aligner features: {total} token rows of {target} ({mode}) before step "
                        f"{step}; custom.visual_kd.nonfinite is 'raise' (use 'skip' to mask them and go on)"
                    )


def _owner(module, point: PatchPoint) -> tuple[Any, str]:
    """The object holding the patched attribute: a class of the module, or the module itself."""
    owner_name, _, attr = point.qualname.rpartition(".")
    return (getattr(module, owner_name, None) if owner_name else module), attr


def _aligner_paths(model) -> list[str] | None:
    """ms-swift's own declaration of the architecture's aligner (swift/model/model_arch.py)."""
    arch = getattr(getattr(model, "model_meta", None), "model_arch", None)
    aligner = getattr(arch, "aligner", None)
    if not aligner:
        return None
    return [aligner] if isinstance(aligner, str) else list(aligner)


# --- introspection (doctor, version guard) -------------------------------------------------


def _swift_version() -> str:
    return swift_layouts.installed_version() or "not installed"


def _versions_ctx() -> dict:
    return {"swift_version": _swift_version(), "torch_version": torch.__version__}


def version_problem() -> str | None:
    version = _swift_version()
    if version == "not installed":
        return "ms-swift is not installed"
    if not any(layout.matches(version) for layout in swift_layouts.LAYOUTS):
        return f"ms-swift {version} is outside the supported matrix ({swift_layouts.supported_text()})"
    return None


def installed_versions() -> dict[str, str]:
    out = {"vkd_shim": __version__, "python": sys.version.split()[0]}
    for dist in (
        "ms-swift",
        "torch",
        "transformers",
        "trl",
        "peft",
        "deepspeed",
        "wrapt",
        "structlog",
        "PyYAML",
    ):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


@dataclass(frozen=True)
class PointStatus:
    name: str
    ok: bool
    reason: str = ""


def check_patch_points() -> list[PointStatus]:
    """Import each patch point's module and look the attribute up; patch nothing."""
    statuses = []
    for module_name, points in POINTS.items():
        for point in points:
            if point.optional and importlib.util.find_spec(point.requires) is None:
                # ms-swift 3.12's swift.megatron clones Megatron-LM from the network on import.
                statuses.append(
                    PointStatus(point.name, True, f"optional, needs {point.requires} (not installed)")
                )
                continue
            try:
                module = importlib.import_module(module_name)
            except Exception as exc:
                reason = f"cannot import {module_name}: {exc!r}"
                statuses.append(
                    PointStatus(point.name, point.optional, ("optional, " if point.optional else "") + reason)
                )
                continue
            owner, attr = _owner(module, point)
            ok = owner is not None and attr in vars(owner)
            statuses.append(PointStatus(point.name, ok, "" if ok else f"{point.qualname} not found"))
    return statuses
