"""The fields of the ``custom.visual_kd`` block, declared once for msgspec with their defaults, descriptions
and allowed values.

Types, ranges and choices are checked by msgspec against :class:`VisualKDConfig`; the result is frozen and
canonical, so capture, loss and telemetry never re-check spelling, case or ranges.
:mod:`vkd_shim.validation` checks one source's block and words msgspec's messages; :mod:`vkd_shim.config`
reads the sources and merges them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

BLOCK = ("custom", "visual_kd")
BLOCK_PATH = ".".join(BLOCK)
KINDS = ("merger", "deepstack", "vit")
DEFAULT_KINDS = ("merger", "deepstack")
#: The defaults name deepstack for Qwen3-VL and apply to merger-only families as well.
DEFAULT_OPTIONAL = ("deepstack",)
DISTANCES = ("mse", "cosine", "nmse", "relation")
MODES = ("anchor", "monitor")
#: Why a ceiling: the term's gradient scales with the weight and ms-swift's grad norm squares it, so 1e38 already
#: gives an infinite grad_norm in fp32 (every update dropped while the run exits 0). 1e4 is four orders of magnitude
#: above any weight that still regularizes (0.01-10), with squared norms 20 orders of magnitude from overflow.
MAX_WEIGHT = 1e4

MAX_SHARE = 10.0  # a term 10x the GKD loss it regularizes is far past any use; bounds the scale as MAX_WEIGHT does
SHARE_TEXT = f"null, or a number above 0 and up to {MAX_SHARE:g} (a fraction: 0.1 is 10 % of the GKD part)"

Kind = Literal["merger", "deepstack", "vit"]
Weight = Annotated[float, msgspec.Meta(ge=0, le=MAX_WEIGHT)]
Layer = Annotated[int, msgspec.Meta(ge=0)]
WEIGHT_TEXT = f"a number from 0 to {MAX_WEIGHT:g}"


def _doc(description: str, allowed: str) -> msgspec.Meta:
    return msgspec.Meta(description=description, extra={"allowed": allowed})


class _Problem(Exception):
    """A check of :meth:`VisualKDConfig.__post_init__` (not a ValueError: msgspec would swallow the field)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(problem)
        self.field = field
        self.problem = problem


class VisualKDConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The validated vision-KD settings of one run, in canonical form.

    ``targets`` is a tuple of ``(kind, weight)`` in :data:`KINDS` order and ``deepstack_layers`` a
    sorted tuple or None, whatever shorthand the YAML used. Build it with :func:`resolve` or
    :func:`from_block`; the constructor alone does not check types.
    """

    enabled: Annotated[
        bool, _doc("Turns the vision-KD term on; false trains exactly as without the shim.", "true, false")
    ] = True
    mode: Annotated[
        Literal["anchor", "monitor"],
        _doc(
            "anchor adds the weighted term to the training loss; monitor only measures and logs the same"
            " per-target distances and the relative drift, under no_grad, and trains exactly as without the"
            " shim (weight and warmup_steps are not used).",
            ", ".join(MODES),
        ),
    ] = "anchor"
    weight: Annotated[
        Weight, _doc("Multiplier of the vision-KD loss added to the GKD loss; 0 turns the term off.", WEIGHT_TEXT)
    ] = 1.0
    share: Annotated[
        Annotated[float, msgspec.Meta(gt=0, le=MAX_SHARE)] | None,
        _doc(
            "Holds the term at this fraction of the GKD part of the loss (0.1: 10 %) by a scale recomputed every"
            " step from detached values, so it needs no knowledge of the features' scale; weight is then unused.",
            SHARE_TEXT,
        ),
    ] = None
    targets: Annotated[
        Kind | list[Kind] | dict[Kind, Weight],
        _doc(
            "Vision-pathway features to distill (merger: the final merger's output; deepstack: each deepstack"
            " merger's output; vit: the ViT's patch embeddings entering the merger), with a per-kind weight;"
            " a later source replaces the whole selection.",
            f"{', '.join(KINDS)} (one name, a list of names, or a mapping name -> {WEIGHT_TEXT})",
        ),
    ] = msgspec.field(default_factory=lambda: dict.fromkeys(DEFAULT_KINDS, 1.0))
    optional_targets: Annotated[
        list[Kind],
        _doc(
            "Kinds among targets that apply only where both models have them (a merger-only model such as"
            " Qwen3.5 or Gemma 3 trains without deepstack, and the attach event and the doctor name what was left"
            " out); every other target the model lacks is refused before loading. A source that sets targets"
            " without this field makes all of its targets required.",
            f"a list of {', '.join(KINDS)} (empty: every target is required)",
        ),
    ] = msgspec.field(default_factory=lambda: list(DEFAULT_OPTIONAL))
    deepstack_layers: Annotated[
        Layer | list[Layer] | None,
        _doc(
            "Indices into deepstack_merger_list to distill; null means all of them; a later source replaces"
            " the whole list.",
            "null (every deepstack merger), an int >= 0, or a list of ints >= 0",
        ),
    ] = None
    distance: Annotated[
        Literal["mse", "cosine", "nmse", "relation"],
        _doc(
            "Feature distance: mse (mean squared error per token), cosine (1 - cosine similarity per token),"
            " nmse (squared error relative to the teacher token's squared norm: scale-free), relation (per"
            " image, MSE between the token-to-token cosine-similarity matrices: needs no equal width).",
            ", ".join(DISTANCES),
        ),
    ] = "mse"
    warmup_steps: Annotated[
        Layer,
        _doc(
            "Optimizer steps over which the weight ramps linearly from 0 to full; 0: full from step 0.",
            "an int >= 0",
        ),
    ] = 0
    nonfinite: Annotated[
        Literal["skip", "raise"],
        _doc(
            "NaN/Inf in the student's features: skip masks those token rows and warns; raise stops.",
            "skip, raise",
        ),
    ] = "skip"
    teacher_nonfinite: Annotated[
        Literal["raise", "skip"],
        _doc(
            "NaN/Inf in the frozen teacher's features: the teacher is broken and its logits are too, so raise"
            " stops the run with that diagnosis; skip masks the rows like nonfinite.",
            "raise, skip",
        ),
    ] = "raise"
    no_visual: Annotated[
        Literal["raise", "warn"],
        _doc(
            "What to do when no visual token reaches the models for no_visual_steps optimizer steps in a row,"
            " or in a whole run (text-only data, every image failing to encode): raise stops, warn goes on.",
            "raise, warn",
        ),
    ] = "raise"
    no_visual_steps: Annotated[
        Annotated[int, msgspec.Meta(ge=1)],
        _doc("Length of the text-only stretch (optimizer steps) after which no_visual acts.", "an int >= 1"),
    ] = 50

    def __post_init__(self) -> None:
        msgspec.structs.force_setattr(self, "targets", _canonical_targets(self.targets))
        msgspec.structs.force_setattr(self, "deepstack_layers", _canonical_layers(self.deepstack_layers))
        optional = self.optional_targets
        msgspec.structs.force_setattr(self, "optional_targets", tuple(k for k in KINDS if k in optional))

    @property
    def active(self) -> bool:
        """The shim attaches: it anchors with a positive weight, or it monitors."""
        return self.enabled and (self.monitor or self.share is not None or self.weight > 0)

    @property
    def monitor(self) -> bool:
        return self.mode == "monitor"

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(kind for kind, _ in self.targets)

    @property
    def kind_weights(self) -> dict[str, float]:
        return dict(self.targets)

    @property
    def required(self) -> tuple[str, ...]:
        """Target kinds the model must have: a lacking one is refused, not left out."""
        return tuple(kind for kind in self.kinds if kind not in self.optional_targets)

    def warmup_factor(self, global_step: int) -> float:
        """Linear ramp of the weight by optimizer step: 0.0 at step 0, 1.0 from ``warmup_steps`` on."""
        return min(1.0, max(0.0, global_step / self.warmup_steps)) if self.warmup_steps else 1.0

    def to_dict(self) -> dict[str, Any]:
        """The block in the shape a user writes, so it can be dumped to YAML/JSON and read back."""
        out = msgspec.structs.asdict(self)
        out["targets"] = dict(self.targets)
        out["deepstack_layers"] = None if self.deepstack_layers is None else list(self.deepstack_layers)
        out["optional_targets"] = list(self.optional_targets)
        return out


FIELDS = tuple(VisualKDConfig.__struct_fields__)


def _canonical_targets(value: Any) -> tuple[tuple[str, float], ...]:
    if isinstance(value, tuple):  # already canonical (a rebuilt or copied config)
        return value
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list):
        twice = sorted({kind for kind in value if value.count(kind) > 1})
        if twice:
            raise _Problem("targets", f"target kind {twice[0]!r} is given twice")
        value = dict.fromkeys(value, 1.0)
    if not value:
        raise _Problem("targets", "selects no target")
    return tuple((kind, float(value[kind])) for kind in KINDS if kind in value)


def _canonical_layers(value: Any) -> tuple[int, ...] | None:
    if value is None or isinstance(value, tuple):
        return value
    if isinstance(value, int):
        return (value,)
    if not value:
        raise _Problem("deepstack_layers", "an empty list selects no layer (use null for every deepstack merger)")
    return tuple(sorted(set(value)))


def schema() -> tuple[dict[str, Any], ...]:
    """Each field's name, type, default (YAML shape), allowed values and description, for the doctor."""
    defaults = VisualKDConfig().to_dict()
    info = msgspec.inspect.type_info(VisualKDConfig)
    return tuple(
        {
            "name": field.name,
            "default": defaults[field.name],
            "allowed": field.type.extra["allowed"],
            "description": field.type.extra_json_schema["description"],
        }
        for field in info.fields
    )
