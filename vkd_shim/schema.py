"""The fields of the ``custom.visual_kd`` block, validated by msgspec, and one source's check.

Types, ranges and choices are checked by msgspec against :class:`VisualKDConfig` (every field declared
once, with its default, description and allowed values); this module only normalizes shorthand at the
edge and turns msgspec's messages into ours: one line that names the field, the source and the allowed
values. The result is frozen and canonical, so capture, loss and telemetry never re-check spelling,
case or ranges. :mod:`vkd_shim.config` reads the sources and merges them.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec

from vkd_shim.errors import ConfigError

BLOCK = ("custom", "visual_kd")
BLOCK_PATH = ".".join(BLOCK)
KINDS = ("merger", "deepstack", "vit")
DEFAULT_KINDS = ("merger", "deepstack")
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

    def warmup_factor(self, global_step: int) -> float:
        """Linear ramp of the weight by optimizer step: 0.0 at step 0, 1.0 from ``warmup_steps`` on."""
        return min(1.0, max(0.0, global_step / self.warmup_steps)) if self.warmup_steps else 1.0

    def to_dict(self) -> dict[str, Any]:
        """The block in the shape a user writes, so it can be dumped to YAML/JSON and read back."""
        out = msgspec.structs.asdict(self)
        out["targets"] = dict(self.targets)
        out["deepstack_layers"] = None if self.deepstack_layers is None else list(self.deepstack_layers)
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


# --- turning msgspec's messages into ours ----------------------------------------------------------

# msgspec ends with "- at `$.a[1]`", or "- at `key` in `$.a`" for a bad mapping key; a bad mapping
# value's path reads "`$.a[...]`", without the key.
_AT = re.compile(r"^(?P<problem>.*?)(?: - at (?P<key>`key` in )?`\$(?P<path>[^`]*)`)?$", re.DOTALL)
_UNKNOWN = re.compile(r"unknown field `(?P<name>[^`]*)`")
_ENUM = re.compile(r"Invalid enum value '(?P<value>[^']*)'")
_NO_VALUE = object()


def _quote(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def closest(word: str, candidates: Any) -> str | None:
    """The candidate nearest to ``word``, ignoring case and ``-``/``_``, or None."""
    by_key = {c.lower().replace("-", "_"): c for c in candidates if isinstance(c, str)}
    match = difflib.get_close_matches(word.lower().replace("-", "_"), list(by_key), n=1, cutoff=0.6)
    return by_key[match[0]] if match else None


def fail(
    field: str,
    source: str | None,
    problem: str | None = None,
    *,
    value: Any = _NO_VALUE,
    allowed: str | None = None,
    allowed_label: str = "allowed values",
) -> ConfigError:
    head = "invalid vision-KD config" + (f" in {source}" if source else "")
    subject = field if value is _NO_VALUE else f"{field} = {_quote(value)}"
    details = [" ".join(problem.split())] if problem else []
    if allowed:
        details.append(f"{allowed_label}: {allowed}")
    message = f"{head}: {subject}" + (": " + "; ".join(details) if details else "")
    return ConfigError(message, field=field, source=source, allowed=allowed)


def _allowed(name: str) -> str:
    return {spec["name"]: spec["allowed"] for spec in schema()}[name]


def _at(raw: Mapping[str, Any], path: str) -> Any:
    """The raw value msgspec's ``$.a[1]`` path points at, or _NO_VALUE."""
    value: Any = raw
    for key, index in re.findall(r"\.(\w+)|\[(\d+)\]", path):
        try:
            value = value[key] if key else value[int(index)]
        except (KeyError, IndexError, TypeError):
            return _NO_VALUE
    return value


def _mapping_entry(raw: Mapping[str, Any], path: str, name: str) -> str:
    """``$.targets[...]`` as ``$.targets.<key>`` of the first entry that fails on its own."""
    head, found, tail = path.partition("[...]")
    mapping = _at(raw, head)
    if found and isinstance(mapping, Mapping):
        for key, item in mapping.items():
            try:
                msgspec.convert({name: {key: item}}, VisualKDConfig)
            except (msgspec.ValidationError, _Problem):
                return f"{head}.{key}{tail}"
    return path


def _hint(problem: str, value: Any, name: str) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return " (it must be finite: NaN and Inf compare false with every bound)"
    if name == "weight" and isinstance(value, (int, float)) and value > MAX_WEIGHT:
        return f" (larger weights overflow the fp32 gradient norm; see MAX_WEIGHT in {__name__})"
    if isinstance(value, str):
        text = value.strip().lower()
        if "`float`" in problem and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?", text):
            return (
                " (PyYAML reads quoted numbers and exponents without a decimal point, such as 1e-3,"
                " as strings: write 1.0e-3)"
            )
        if "`bool`" in problem and text in ("true", "false", "yes", "no", "on", "off"):
            return " (a quoted boolean is a string: write true or false without quotes)"
        match = _ENUM.search(problem)
        if match and name == "targets" and re.fullmatch(r"deepstack_\d+", text):
            return ": a kind names every layer: write deepstack and pick layers with deepstack_layers"
        if match:
            choices = KINDS if name == "targets" else _allowed(name).split(", ")
            guess = closest(text, choices)
            return f" (did you mean {guess!r}?)" if guess else ""
    return ""


def _translate(error: msgspec.ValidationError, raw: Mapping[str, Any], source: str, label: str | None) -> ConfigError:
    """msgspec's "Expected `float` >= 0.0 - at `$.weight`" as our one line with field, source, allowed."""
    match = _AT.match(str(error))
    problem, path = match["problem"], match["path"] or ""
    unknown = _UNKNOWN.search(problem)
    if unknown:
        key = unknown["name"]
        guess = closest(key, FIELDS)
        return fail(
            label or f"{BLOCK_PATH}.{key}",
            source,
            "unknown key" + (f" (did you mean {guess!r}?)" if guess else ""),
            allowed=", ".join(FIELDS),
            allowed_label="allowed keys",
        )
    name = re.match(r"\.(\w+)", path)[1]
    if match["key"]:
        enum = _ENUM.search(problem)
        value = enum["value"] if enum else _NO_VALUE
    else:
        path = _mapping_entry(raw, path, name)
        value = _at(raw, path)
    return fail(
        label or f"{BLOCK_PATH}{path}",
        source,
        problem + _hint(problem, value, name),
        value=value,
        allowed=_allowed(name),
    )


def _normalize(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Case and spacing of choices and kind names, once, at the edge: ``MSE`` and `` mse`` are ``mse``."""

    def fold(value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    out = dict(raw)
    for name in ("mode", "distance", "nonfinite", "teacher_nonfinite", "no_visual"):
        if name in out:
            out[name] = fold(out[name])
    targets = out.get("targets")
    if isinstance(targets, str):
        out["targets"] = fold(targets)
    elif isinstance(targets, (list, tuple)):
        out["targets"] = [fold(item) for item in targets]
    elif isinstance(targets, Mapping):
        out["targets"] = {fold(key): weight for key, weight in targets.items()}
    return out


def from_block(raw: Any, source: str = "python", *, label: str | None = None) -> tuple[VisualKDConfig, tuple[str, ...]]:
    """Validate one source's block; return the config it implies (defaults elsewhere) and the keys it set.

    ``label`` replaces the field name in messages (an env variable names itself, not the YAML path).
    """
    if not isinstance(raw, Mapping):
        raise fail(BLOCK_PATH, source, f"expected a mapping, got a {kind_of(raw)}", value=raw)
    normalized = _normalize(raw)
    try:
        config = msgspec.convert(normalized, VisualKDConfig)
    except msgspec.ValidationError as error:
        raise _translate(error, normalized, source, label) from None
    except _Problem as problem:
        raise fail(
            label or f"{BLOCK_PATH}.{problem.field}",
            source,
            problem.problem,
            value=raw.get(problem.field),
            allowed=_allowed(problem.field),
        ) from None
    return config, tuple(normalized)


def kind_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        return "mapping"
    if isinstance(value, (list, tuple)):
        return "list"
    return "string" if isinstance(value, str) else type(value).__name__
