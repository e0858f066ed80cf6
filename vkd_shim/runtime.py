"""The vision-KD state of one GKD trainer: capture around each loss call, the term, and the hand-off of
metrics and events.

Per step: open the capture window, call the original ``compute_loss``, ask :mod:`vkd_shim.loss` for
the distance, add it (train only: ``eval_loss`` stays ms-swift's own), and keep the numbers on the
device. Host reads happen only when the trainer logs and once at the end of training, because every
``.item()`` on a micro-step stalls a GPU.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from typing import Any

import torch

from vkd_shim import pairing, preflight, swift_layouts, telemetry
from vkd_shim.capture import STUDENT, TEACHER, FeatureCapture
from vkd_shim.config import ResolvedConfig
from vkd_shim.errors import (
    CaptureError,
    FeatureMismatchError,
    NonFiniteError,
    NoVisualTokensError,
    RefusedError,
    TargetResolutionError,
)
from vkd_shim.loss import RELATION_DISTANCES, vision_kd_loss
from vkd_shim.metrics import MetricBuffer, Tally
from vkd_shim.schema import MAX_WEIGHT
from vkd_shim.swift_layouts import SwiftLayout
from vkd_shim.targets import VIT, frozen_targets, resolve_targets, unwrap

CONFIG_FILE_NAME = "vision_kd_config.json"
METRIC_LOSS = "vision_kd_loss"
#: ``vision_kd/scale``: with ``share``, the scale applied to the distance this step (logged beside the term).
METRIC_SCALE = "vision_kd/scale"
#: ``vision_kd/drift/<target>``: ||f_s - f_t||^2 / ||f_t||^2, logged in both modes, beside the distance.
DRIFT_PREFIX = "vision_kd/drift/"
VISUAL_INPUT_KEYS = ("pixel_values", "pixel_values_videos")
#: What a monitored run says where an anchoring one would stop (policies raise, or the shim itself fails).
MONITOR_GOES_ON = "monitoring only: reported, and the run goes on exactly as without the shim"
#: Where a patched trainer carries its vision-KD state (an instance attribute, so the class is untouched).
STATE_ATTR = "_vkd"


def state_of(trainer: Any) -> TrainerKD | None:
    """The vision-KD state of a trainer, or None (knob off, term inactive, or detached)."""
    return trainer.__dict__.get(STATE_ATTR)


def bind(trainer: Any, state: TrainerKD | None) -> None:
    """Attach (or, with None, detach) a trainer's vision-KD state; benchmarks toggle the shim with it."""
    if state is None:
        trainer.__dict__.pop(STATE_ATTR, None)
    else:
        trainer.__dict__[STATE_ATTR] = state


class TrainerKD:
    """Vision KD state of one GKD trainer: capture, config, metric buffer, run tally."""

    def __init__(self, trainer: Any, resolved: ResolvedConfig, layout: SwiftLayout) -> None:
        self.trainer = trainer
        self.layout = layout
        self.config = resolved.config
        self.log = telemetry.get_logger()
        self.buffer = MetricBuffer()
        self.limiter = telemetry.RateLimiter()
        self.tally = Tally()
        student = trainer.accelerator.unwrap_model(trainer.model)
        teacher = trainer.teacher_model
        self_distill = teacher is None and getattr(trainer, "_teacher_use_disable_adapter", False)
        if getattr(trainer, "use_teacher_api", False) or (teacher is None and not self_distill):
            # Preflight refuses both from the arguments; a trainer built by hand reaches this instead.
            raise RefusedError(*(preflight.REMOTE_TEACHER if teacher is None else preflight.NO_TEACHER))
        if self_distill:
            teacher = student  # ms-swift's teacher: the same model with its adapters disabled
        aligner = swift_layouts.aligner_paths(student)
        teacher_aligner = swift_layouts.aligner_paths(teacher) or aligner
        configs = {role: getattr(unwrap(m), "config", None) for role, m in ((STUDENT, student), (TEACHER, teacher))}
        documents = {role: c.to_dict() for role, c in configs.items() if hasattr(c, "to_dict")}
        kinds, optional_left_out = pairing.target_plan(self.config, documents)
        layers, left_out, refusal = pairing.deepstack_plan(self.config, documents)
        if refusal is not None:
            raise RefusedError(*refusal)
        try:
            modules = resolve_targets(student, kinds, layers, aligner)
            self.capture = FeatureCapture(student, teacher, kinds, layers, aligner, teacher_aligner)
        except TargetResolutionError as exc:
            raise RefusedError(str(exc), pairing.MISSING_TARGET_FIX) from None
        frozen = frozen_targets(student, modules, aligner, swift_layouts.vision_tower_paths(student))
        if frozen and not self.config.monitor:
            raise RefusedError(*preflight.frozen([t.name for t in frozen], every=len(frozen) == len(modules)))
        self.weights = {target: self.config.kind_weights[target.kind] for target in modules}
        vision_config = getattr(getattr(unwrap(student), "config", None), "vision_config", None)
        self.merge = getattr(vision_config, "spatial_merge_size", 1) ** 2
        self.capture.attach()
        self.peft_student = student if hasattr(student, "disable_adapter") else None
        self.keys = (
            *(() if self.config.monitor else (METRIC_LOSS,)),
            *((METRIC_SCALE,) if self.config.share is not None and not self.config.monitor else ()),
            *(f"vision_kd/{t.name}" for t in modules),
            *(f"{DRIFT_PREFIX}{t.name}" for t in modules),
            "vision_kd/tokens",
            "vision_kd/skipped",
        )
        self.pending_nonfinite: dict[str, dict[tuple[str, str], Any]] = {"train": {}, "eval": {}}
        self.last_visual_step: int | None = None
        self.first_step: int | None = None
        self.stretch_reported = False
        self.log.info(
            "vkd.attach",
            targets=[t.name for t in modules],
            shared_modules=self.capture.shared,
            distance=self.config.distance,
            mode=self.config.mode,
            families=pairing.labels(documents),
            frozen_targets=[t.name for t in frozen],
            modules={t.name: path for t, path in self.capture.paths.items()},
            left_out=[*optional_left_out, *(f"deepstack_{i}" for i in left_out)],
            **({"note": " ".join(notes)} if (notes := pairing.plan_notes(self.config, documents)) else {}),
        )
        self._save_config(resolved)
        trainer.add_callback(_run_end_callback(self))

    def _save_config(self, resolved: ResolvedConfig) -> None:
        if not self.trainer.is_world_process_zero():
            return
        output_dir = self.trainer.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, CONFIG_FILE_NAME), "w", encoding="utf-8") as f:
            json.dump(resolved.to_event(), f, indent=2, sort_keys=True)

    # --- per step ------------------------------------------------------------------------------

    def compute_loss(self, wrapped: Any, args: tuple, kwargs: dict) -> Any:
        inputs = args[1] if len(args) > 1 else kwargs["inputs"]
        model_inputs = self.layout.model_inputs(inputs)
        mode = "train" if self.trainer.model.training else "eval"
        step = self.trainer.state.global_step
        if self.first_step is None:
            self.first_step = step
        if not any(model_inputs.get(k) is not None for k in VISUAL_INPUT_KEYS):
            # Text-only micro-batch: the tower may still run on ms-swift's dummy image (DeepSpeed), and
            # those features are not visual tokens. Nothing is captured, nothing is added.
            if mode == "train":
                self._text_only(step)
            return wrapped(*args, **kwargs)
        if mode == "train":
            self.last_visual_step, self.stretch_reported = step, False
        with self.capture.window(), self._roles():
            result = wrapped(*args, **kwargs)
            term = None
            with self._unless_monitoring(mode, step, "measuring"):
                term = self._term(mode, step, self._segments(model_inputs))
        loss = result[0] if isinstance(result, tuple) else result
        if term is None or self.config.monitor:
            return result  # a monitored run only measures
        if self.config.share is not None:
            term = self._held_at_share(mode, step, term, loss)
        self.buffer.add(mode, METRIC_LOSS, term.detach())
        if mode == "eval":
            # eval_loss stays ms-swift's own, so best-checkpoint selection compares across runs; the term is
            # reported beside it as eval_vision_kd_loss.
            return result
        if isinstance(result, tuple):
            return (loss + term, *result[1:])
        return loss + term

    def _fixed_scale(self, step: int) -> float:
        """weight x warm-up; 1 with a share, which scales the raw distance itself (:meth:`_held_at_share`)."""
        return 1.0 if self.config.share is not None else self.config.weight * self.config.warmup_factor(step)

    def _held_at_share(self, mode: str, step: int, term: Any, gkd: Any) -> Any:
        """``custom.visual_kd.share``: the term times a scale that makes it ``share`` x the GKD part of this
        micro-batch's loss (times the warm-up factor), recomputed every step from detached values, as
        ModelOpt's loss balancer does. Only the distance's gradient flows; the scale is a number, capped at the
        weight's own ceiling (a student still next to the teacher would otherwise get a gradient that grows as
        the distance shrinks, and clipping would scale the whole model's gradient down). A zero or non-finite
        distance or GKD part gives scale 0."""
        raw, gkd = term.detach().float(), gkd.detach().float()
        ratio = self.config.share * self.config.warmup_factor(step) * gkd / raw
        usable = (raw > 0) & (gkd > 0) & torch.isfinite(ratio)
        scale = torch.where(usable, ratio.clamp(max=MAX_WEIGHT), torch.zeros_like(ratio))
        self.buffer.add(mode, METRIC_SCALE, scale)
        return term * scale.to(term.dtype)

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

    @contextlib.contextmanager
    def _unless_monitoring(self, mode: str, step: int, what: str):
        """A monitored run promises to train exactly as plain ms-swift, so nothing the shim meets while it
        measures stops it: the failure becomes a ``vkd.monitor_error`` event and a summary count. Anchoring
        lets it through: a run that asked for the term must not go on without it."""
        if not self.config.monitor:
            yield
            return
        try:
            yield
        except Exception as exc:
            reason = f"{what}: {type(exc).__name__}: {exc}"
            self._count_and_report("vkd.monitor_error", "error", mode, step, reason, decision=MONITOR_GOES_ON)

    def _segments(self, model_inputs: Mapping[str, Any]) -> dict[Any, list[int]] | None:
        """Tokens per image, then per video, for each target (``relation`` compares within each one).

        Images run through the tower before videos (in one call under DeepSpeed, in two without), so the
        captured rows follow this order. The grids are tiny; the model itself reads them on the host. Families
        without grids (LLaVA, Gemma 3, ...) give None: their aligner's [images, tokens, hidden] output says it.
        """
        if self.config.distance not in RELATION_DISTANCES:
            return None  # every other distance: nothing to read on the step
        grids = [g for g in map(model_inputs.get, ("image_grid_thw", "video_grid_thw")) if g is not None]
        if not grids:
            return None
        patches = [int(t) * int(h) * int(w) for grid in grids for t, h, w in grid.tolist()]
        return {t: patches if t.kind == VIT else [n // self.merge for n in patches] for t in self.weights}

    def _term(self, mode: str, step: int, segments: dict[Any, list[int]] | None = None) -> Any:
        try:
            features = self.capture.take()
        except CaptureError as exc:
            self._skip(mode, step, str(exc))
            return None
        student, teacher = features.get(STUDENT, {}), features.get(TEACHER, {})
        if not student and not teacher:
            self._skip(mode, step, "no aligner features were captured in a micro-batch with visual inputs")
            return None
        try:
            with torch.no_grad() if self.config.monitor else contextlib.nullcontext():
                out = vision_kd_loss(
                    student,
                    teacher,
                    weights=self.weights,
                    distance=self.config.distance,
                    # A share sets its own scale from the raw distance (see _held_at_share).
                    scale=1.0
                    if self.config.share is not None
                    else self.config.weight * self.config.warmup_factor(step),
                    segments=segments,
                )
        except FeatureMismatchError as exc:
            self._skip(
                mode,
                step,
                str(exc),
                target=exc.target,
                student_shape=exc.student_shape,
                teacher_shape=exc.teacher_shape,
            )
            return None
        add = self.buffer.add
        for target, value in out.per_target.items():
            add(mode, f"vision_kd/{target.name}", value.detach())
        for target, value in out.drift.items():
            add(mode, f"{DRIFT_PREFIX}{target.name}", value)
        add(mode, "vision_kd/tokens", out.tokens)
        add(
            mode,
            "vision_kd/skipped",
            sum(out.nonfinite_student.values()) + sum(out.nonfinite_teacher.values()),
        )
        self.tally.add(mode, out.tokens, out.per_target, out.drift)
        pending = self.pending_nonfinite[mode]
        for side, counts in ((STUDENT, out.nonfinite_student), (TEACHER, out.nonfinite_teacher)):
            for target, count in counts.items():
                key = (side, target.name)
                pending[key] = pending[key] + count if key in pending else count
        return out.total

    def _skip(self, mode: str, step: int, reason: str, **fields: Any) -> None:
        self.buffer.add(mode, "vision_kd/skipped", 1)
        self._count_and_report("vkd.skip", "warning", mode, step, reason, **fields)

    def _count_and_report(self, event: str, level: str, mode: str, step: int, reason: str, **fields: Any) -> None:
        """Count the reason for the summary; say it at most once per rate-limit window (a per-step problem
        would otherwise flood the log pipeline), with how many were left unsaid."""
        self.tally.skipped[reason[:80]] += 1
        allowed, suppressed = self.limiter.allow(f"{event}:{reason[:60]}")
        if allowed:
            self.log.event(event, level, mode=mode, step=step, reason=reason, suppressed=suppressed, **fields)

    def _text_only(self, step: int) -> None:
        since = self.first_step if self.last_visual_step is None else self.last_visual_step
        if step - since >= self.config.no_visual_steps and not self.stretch_reported:
            self.stretch_reported = True
            self._no_visual(f"no visual token reached the models in the last {step - since} optimizer steps", step)

    def _no_visual(self, reason: str, step: int) -> None:
        fix = (
            "check that the dataset has image/video rows and that they encode (ms-swift logs 'Encoding failed'"
            " and resamples); for pipelines that are text-only by design set custom.visual_kd.no_visual: warn"
        )
        stop = self.config.no_visual == "raise" and not self.config.monitor
        self.log.event(
            "vkd.no_visual",
            "error" if stop else "warning",
            step=step,
            reason=reason,
            fix=fix,
            policy=self.config.no_visual,
            **({"decision": MONITOR_GOES_ON} if self.config.monitor else {}),
        )
        if stop:
            raise NoVisualTokensError(f"vision KD is on but {reason}. Fix: {fix}.")

    # --- at log time and at the end --------------------------------------------------------------

    def flush(self, mode: str) -> None:
        """At log time only: one host read of the accumulators, then ms-swift's MeanMetric."""
        step = self.trainer.state.global_step
        with self._unless_monitoring(mode, step, "reporting"):
            self._flush(mode, step)

    def _flush(self, mode: str, step: int) -> None:
        self.buffer.flush(mode, self.layout.metrics(self.trainer), self.keys)
        pending, self.pending_nonfinite[mode] = self.pending_nonfinite[mode], {}
        for (side, target), count in pending.items():
            total = int(count)
            if total == 0:
                continue
            self.tally.nonfinite[f"{mode}/{side}/{target}"] += total
            policy = self.config.nonfinite if side == STUDENT else self.config.teacher_nonfinite
            self.log.warning(
                "vkd.nonfinite",
                step=step,
                mode=mode,
                target=target,
                side=side,
                count=total,
                policy=policy,
                **({"decision": MONITOR_GOES_ON} if self.config.monitor else {}),
            )
            if policy != "raise" or self.config.monitor:
                continue
            if side == TEACHER:
                raise NonFiniteError(
                    f"the frozen teacher's {target} features held NaN/Inf in {total} token rows ({mode}) before "
                    f"step {step}: the teacher itself is broken (its logits, and so the GKD loss, are too); "
                    "check the teacher checkpoint and --torch_dtype, or set custom.visual_kd.teacher_nonfinite: skip"
                )
            raise NonFiniteError(
                f"non-finite aligner features: {total} token rows of {target} ({mode}) before step {step}; "
                "custom.visual_kd.nonfinite is 'raise' (use 'skip' to mask them and go on)"
            )

    def end_of_training(self) -> None:
        """One summary event; a run that anchors and never saw a visual token stops here (exit non-zero)."""
        with self._unless_monitoring("train", self.trainer.state.global_step, "summarizing"):
            self._summarize()

    def _summarize(self) -> None:
        tally = self.tally
        self.log.info(
            "vkd.summary",
            mode=self.config.mode,
            steps_with_term=dict(tally.term_steps),
            skipped=dict(tally.skipped),
            nonfinite_rows=dict(tally.nonfinite),
            visual_tokens=dict(tally.tokens),
            mean_per_target=tally.means(),
            mean_drift_per_target=tally.means(tally.drift),
            last_visual_step=self.last_visual_step,
        )
        if self.last_visual_step is None:
            self._no_visual("no visual token reached the models in the whole run", self.trainer.state.global_step)


def _run_end_callback(kd: TrainerKD) -> Any:
    from transformers import TrainerCallback  # the trainer that calls this has loaded it already

    class VisionKDRunEnd(TrainerCallback):
        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            kd.end_of_training()

    return VisionKDRunEnd()
