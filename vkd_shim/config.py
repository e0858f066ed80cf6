"""Parse, merge and validate the ``custom.visual_kd`` block.

Everything a user can get wrong about vision KD is caught here, before any model loads, with a
one-line error that names the field, the source and the allowed values. The result is a frozen,
hashable :class:`VisualKDConfig` in one canonical shape, so capture, loss and telemetry never
re-check spelling, case or ranges.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

ENV_CONFIG = "VKD_CONFIG"
ENV_WEIGHT = "VKD_WEIGHT"
ENV_TARGETS = "VKD_TARGETS"
ENV_DISTANCE = "VKD_DISTANCE"
BLOCK = ("custom", "visual_kd")
KINDS = ("merger", "deepstack")
DISTANCES = ("mse", "cosine")
NONFINITE = ("skip", "raise")

_BLOCK_PATH = ".".join(BLOCK)
_ALLOWED_BOOL = "true, false"
_ALLOWED_WEIGHT = "a finite number >= 0"
_ALLOWED_TARGETS = "merger, deepstack (one name, a list of names, or a mapping name -> weight >= 0)"
_ALLOWED_TARGETS_ENV = "merger, deepstack (as 'merger,deepstack' or 'merger:1.0,deepstack:0.5')"
_ALLOWED_LAYERS = "null (every deepstack merger), an int >= 0, or a list of ints >= 0"
_ALLOWED_STEPS = "an int >= 0"
_NO_VALUE = object()


class ConfigError(ValueError):
    """A vision-KD configuration the shim refuses to train with.

    ``field``, ``source`` and ``allowed`` are attributes so that ``vkd-shim doctor`` and the
    telemetry events can report them as data; ``str()`` stays one line because it lands in JSON
    log lines and job summaries.
    """

    def __init__(self, message: str, *, field: str, source: str | None = None, allowed: str | None = None):
        super().__init__(message)
        self.field = field
        self.source = source
        self.allowed = allowed

    def __reduce__(self) -> tuple[Any, ...]:
        # Default exception pickling re-calls cls(*args) and would drop the keyword-only
        # attributes; errors raised in spawned workers travel back to the parent pickled.
        rebuild = functools.partial(type(self), field=self.field, source=self.source, allowed=self.allowed)
        return (rebuild, self.args)


def _quote(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _kind_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        return "mapping"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, str):
        return "string"
    return type(value).__name__


def _fail(
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
    details = []
    if problem:
        details.append(" ".join(problem.split()))
    if allowed:
        details.append(f"{allowed_label}: {allowed}")
    message = f"{head}: {subject}" + (": " + "; ".join(details) if details else "")
    return ConfigError(message, field=field, source=source, allowed=allowed)


def _close(word: str, candidates: Any) -> str | None:
    """Return the candidate nearest to ``word``, ignoring case and ``-``/``_``, or None."""
    by_key: dict[str, str] = {}
    for candidate in candidates:
        if isinstance(candidate, str):
            by_key.setdefault(candidate.lower().replace("-", "_"), candidate)
    match = difflib.get_close_matches(word.lower().replace("-", "_"), list(by_key), n=1, cutoff=0.6)
    return by_key[match[0]] if match else None


def _check_bool(value: Any, field: str, source: str | None) -> bool:
    if isinstance(value, bool):
        return value
    looks_boolean = isinstance(value, str) and value.strip().lower() in (
        "true",
        "false",
        "yes",
        "no",
        "on",
        "off",
    )
    hint = " (a quoted boolean is a string: write true or false without quotes)" if looks_boolean else ""
    raise _fail(
        field,
        source,
        f"expected a boolean, got a {_kind_of(value)}{hint}",
        value=value,
        allowed=_ALLOWED_BOOL,
    )


def _parses_as_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _check_number(value: Any, field: str, source: str | None, allowed: str = _ALLOWED_WEIGHT) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        problem = f"expected a number, got a {_kind_of(value)}"
        if isinstance(value, str) and _parses_as_float(value):
            problem += (
                " (PyYAML reads quoted numbers and exponents without a decimal point, such as 1e-3,"
                " as strings: write 1.0e-3)"
            )
        raise _fail(field, source, problem, value=value, allowed=allowed)
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    # Finiteness first: every comparison with NaN is False, so a range check alone lets it through.
    if not math.isfinite(number):
        raise _fail(field, source, "must be finite", value=value, allowed=allowed)
    if number < 0:
        raise _fail(field, source, "must be >= 0", value=value, allowed=allowed)
    return number


def _check_count(value: Any, field: str, source: str | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(
            field, source, f"expected an int, got a {_kind_of(value)}", value=value, allowed=_ALLOWED_STEPS
        )
    if value < 0:
        raise _fail(field, source, "must be >= 0", value=value, allowed=_ALLOWED_STEPS)
    return value


def _check_choice(value: Any, field: str, source: str | None, *, choices: tuple[str, ...]) -> str:
    allowed = ", ".join(choices)
    if not isinstance(value, str):
        raise _fail(
            field, source, f"expected a string, got a {_kind_of(value)}", value=value, allowed=allowed
        )
    choice = value.strip().lower()
    if choice in choices:
        return choice
    guess = _close(choice, choices)
    raise _fail(field, source, f"did you mean {guess!r}?" if guess else None, value=value, allowed=allowed)


def _normalize_kinds(
    pairs: list[tuple[str, Any, float]], value: Any, field: str, source: str | None, allowed: str
) -> tuple[tuple[str, float], ...]:
    """Turn (where, name, weight) items into the canonical ((kind, weight), ...) in KINDS order."""
    if not pairs:
        raise _fail(field, source, "selects no target", value=value, allowed=allowed)
    weights: dict[str, float] = {}
    for where, name, weight in pairs:
        if not isinstance(name, str):
            raise _fail(
                where,
                source,
                f"target name must be a string, got a {_kind_of(name)}",
                value=name,
                allowed=allowed,
            )
        kind = name.strip().lower()
        if kind not in KINDS:
            if kind.startswith("deepstack_") and kind[len("deepstack_") :].isdigit():
                problem = "a kind names every layer: write deepstack and pick layers with deepstack_layers"
            else:
                guess = _close(kind, KINDS)
                problem = f"unknown target kind (did you mean {guess!r}?)" if guess else "unknown target kind"
            raise _fail(where, source, problem, value=name, allowed=allowed)
        if kind in weights:
            raise _fail(where, source, f"target kind {kind!r} is given twice", value=name, allowed=allowed)
        weights[kind] = weight
    return tuple((kind, weights[kind]) for kind in KINDS if kind in weights)


def _check_targets(value: Any, field: str, source: str | None) -> tuple[tuple[str, float], ...]:
    pairs: list[tuple[str, Any, float]] = []
    if isinstance(value, str):
        pairs.append((field, value, 1.0))
    elif isinstance(value, Mapping):
        for name, weight in value.items():
            where = f"{field}.{name}"
            pairs.append((where, name, _check_number(weight, where, source)))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            where = f"{field}[{index}]"
            if isinstance(item, tuple) and len(item) == 2:
                # (kind, weight) pairs: the canonical form, only reachable from Python.
                pairs.append((where, item[0], _check_number(item[1], where, source)))
            else:
                pairs.append((where, item, 1.0))
    else:
        raise _fail(
            field,
            source,
            f"expected a name, a list or a mapping, got a {_kind_of(value)}",
            value=value,
            allowed=_ALLOWED_TARGETS,
        )
    return _normalize_kinds(pairs, value, field, source, _ALLOWED_TARGETS)


def _check_layers(value: Any, field: str, source: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    items = value if isinstance(value, (list, tuple)) else [value]
    if isinstance(value, (list, tuple)) and not value:
        problem = "an empty list selects no layer (use null for every deepstack merger)"
        raise _fail(field, source, problem, value=value, allowed=_ALLOWED_LAYERS)
    for index, item in enumerate(items):
        where = f"{field}[{index}]" if isinstance(value, (list, tuple)) else field
        if isinstance(item, bool) or not isinstance(item, int):
            raise _fail(
                where, source, f"expected an int, got a {_kind_of(item)}", value=item, allowed=_ALLOWED_LAYERS
            )
        if item < 0:
            raise _fail(where, source, "must be >= 0", value=item, allowed=_ALLOWED_LAYERS)
    return tuple(sorted(set(items)))


def _meta(type_name: str, allowed: str, description: str, check: Callable[..., Any]) -> dict[str, Any]:
    return {"type_name": type_name, "allowed": allowed, "description": description, "check": check}


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """One field of the ``custom.visual_kd`` block, as ``vkd-shim doctor`` prints it.

    ``default`` is in the YAML shape a user writes (``targets`` as a mapping).
    """

    name: str
    type_name: str
    default: Any
    allowed: str
    description: str


@dataclasses.dataclass(frozen=True)
class VisualKDConfig:
    """The validated vision-KD settings of one run.

    Every field is declared once, here, with its check, allowed values and description;
    :func:`schema` and the validation messages both read these declarations. Construction
    re-runs the checks, so an instance is valid and canonical however it was built.
    """

    enabled: bool = dataclasses.field(
        default=True,
        metadata=_meta(
            "bool",
            _ALLOWED_BOOL,
            "Turns the vision-KD term on; false trains exactly as without the shim.",
            _check_bool,
        ),
    )
    weight: float = dataclasses.field(
        default=1.0,
        metadata=_meta(
            "float",
            _ALLOWED_WEIGHT,
            "Multiplier of the vision-KD loss added to the GKD loss; 0 turns the term off.",
            _check_number,
        ),
    )
    targets: tuple[tuple[str, float], ...] = dataclasses.field(
        default=(("merger", 1.0), ("deepstack", 1.0)),
        metadata=_meta(
            "kind | [kind, ...] | {kind: float}",
            _ALLOWED_TARGETS,
            "Aligner modules to distill (merger: the final merger; deepstack: each deepstack merger) with a"
            " per-kind weight; a later source replaces the whole selection.",
            _check_targets,
        ),
    )
    deepstack_layers: tuple[int, ...] | None = dataclasses.field(
        default=None,
        metadata=_meta(
            "null | int | [int, ...]",
            _ALLOWED_LAYERS,
            "Indices into deepstack_merger_list to distill; null means all of them; a later source replaces"
            " the whole list.",
            _check_layers,
        ),
    )
    distance: str = dataclasses.field(
        default="mse",
        metadata=_meta(
            "str",
            ", ".join(DISTANCES),
            "Feature distance per token: mse (mean squared error) or cosine (1 - cosine similarity).",
            functools.partial(_check_choice, choices=DISTANCES),
        ),
    )
    warmup_steps: int = dataclasses.field(
        default=0,
        metadata=_meta(
            "int",
            _ALLOWED_STEPS,
            "Optimizer steps over which the weight ramps linearly from 0 to full; 0 means full from step 0.",
            _check_count,
        ),
    )
    nonfinite: str = dataclasses.field(
        default="skip",
        metadata=_meta(
            "str",
            ", ".join(NONFINITE),
            "NaN/Inf features: skip masks them and warns; raise stops training.",
            functools.partial(_check_choice, choices=NONFINITE),
        ),
    )

    def __post_init__(self) -> None:
        for spec in dataclasses.fields(self):
            object.__setattr__(
                self, spec.name, spec.metadata["check"](getattr(self, spec.name), spec.name, None)
            )

    @property
    def active(self) -> bool:
        return self.enabled and self.weight > 0

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(kind for kind, _ in self.targets)

    def target_weight(self, target: str) -> float:
        """Weight of a capture target such as ``merger`` or ``deepstack_2`` (its kind's weight).

        A target this config did not select raises KeyError: it means capture and config
        disagree, which must not turn into a silent zero.
        """
        kind, _, index = target.partition("_")
        weights = dict(self.targets)
        if kind not in weights or (index and (kind != "deepstack" or not index.isdigit())):
            raise KeyError(
                f"{target!r} is not a vision-KD target of this config (kinds: {', '.join(self.kinds)})"
            )
        if index and self.deepstack_layers is not None and int(index) not in self.deepstack_layers:
            raise KeyError(f"{target!r} is not among deepstack_layers {list(self.deepstack_layers)}")
        return weights[kind]

    def warmup_factor(self, global_step: int) -> float:
        """Linear ramp of the weight by optimizer step: 0.0 at step 0, 1.0 from ``warmup_steps`` on."""
        if self.warmup_steps == 0:
            return 1.0
        return min(1.0, max(0.0, global_step / self.warmup_steps))

    def to_dict(self) -> dict[str, Any]:
        """The block in the shape a user writes, so it can be dumped to YAML/JSON and read back."""
        return {
            "enabled": self.enabled,
            "weight": self.weight,
            "targets": dict(self.targets),
            "deepstack_layers": None if self.deepstack_layers is None else list(self.deepstack_layers),
            "distance": self.distance,
            "warmup_steps": self.warmup_steps,
            "nonfinite": self.nonfinite,
        }


_FIELDS = {spec.name: spec for spec in dataclasses.fields(VisualKDConfig)}


def schema() -> tuple[FieldSpec, ...]:
    """The block's fields, in declaration order, read from :class:`VisualKDConfig` itself."""
    defaults = VisualKDConfig().to_dict()
    return tuple(
        FieldSpec(
            name=spec.name,
            type_name=spec.metadata["type_name"],
            default=defaults[spec.name],
            allowed=spec.metadata["allowed"],
            description=spec.metadata["description"],
        )
        for spec in _FIELDS.values()
    )


@dataclasses.dataclass(frozen=True)
class ResolvedConfig:
    """The config of a run plus where each value came from, for the one "config resolved" event."""

    config: VisualKDConfig
    sources: Mapping[str, str] = dataclasses.field(hash=False)
    files: tuple[str, ...]
    notes: tuple[str, ...]

    def digest(self) -> str:
        """Short hash of the effective settings only, so equal configs match across ranks and runs."""
        canonical = json.dumps(self.config.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:12]

    def to_event(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "sources": dict(self.sources),
            "files": list(self.files),
            "notes": list(self.notes),
            "digest": self.digest(),
        }


def _yaml_problem(error: Exception) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    context = getattr(error, "context", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"broken YAML{where}: {problem}" + (f" ({context})" if context else "")


def _missing_block_hint(document: Mapping[Any, Any]) -> str:
    custom_key, block_key = BLOCK
    if custom_key not in document:
        guess = _close(custom_key, document)
        if guess is not None:
            return f"did you mean {guess!r}?"
        guess = _close(block_key, document)
        if guess is not None:
            return f"found top-level {guess!r}: nest it under '{custom_key}:'"
        return f"a {ENV_CONFIG} file must hold a {_BLOCK_PATH} mapping"
    custom = document[custom_key]
    if not isinstance(custom, Mapping):
        return f"{custom_key!r} is a {_kind_of(custom)}, not a mapping"
    guess = _close(block_key, custom)
    if guess is not None:
        return f"did you mean '{custom_key}.{guess}'?"
    return f"a {ENV_CONFIG} file must hold a {_BLOCK_PATH} mapping"


def load_block(path: str) -> dict[str, Any]:
    """Read one YAML file and return its raw ``custom.visual_kd`` mapping.

    Other top-level keys are ignored, so the file may double as a swift args YAML.
    """
    import yaml  # deferred: bootstrap imports config in every process; yaml is needed only for a file

    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError as error:
        where = "" if os.path.isabs(path) else f" (relative to {os.getcwd()})"
        raise _fail(ENV_CONFIG, path, f"file not found{where}") from error
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise _fail(ENV_CONFIG, path, f"cannot read the file: {reason}") from error
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise _fail(ENV_CONFIG, path, _yaml_problem(error)) from error
    if not isinstance(document, Mapping):
        found = "the file is empty" if document is None else f"the top level is a {_kind_of(document)}"
        raise _fail(ENV_CONFIG, path, f"{found}; expected a mapping holding {_BLOCK_PATH}")
    custom = document.get(BLOCK[0])
    if not isinstance(custom, Mapping) or BLOCK[1] not in custom:
        raise _fail(_BLOCK_PATH, path, "block not found; " + _missing_block_hint(document))
    block = custom[BLOCK[1]]
    if not isinstance(block, Mapping):
        raise _fail(_BLOCK_PATH, path, f"expected a mapping, got a {_kind_of(block)}", value=block)
    return dict(block)


def split_inline(
    document: Mapping[str, Any], *, source: str | None = None
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Pull ``custom.visual_kd`` out of a parsed swift args YAML document.

    ms-swift turns a ``custom:`` key into ``--custom`` and rejects it, so the block must be removed
    before swift parses the file; ``custom`` is dropped when nothing else is left in it. The input
    is not mutated. ``source`` (the file path) only labels errors.
    """
    remainder = copy.deepcopy(dict(document))
    custom_key, block_key = BLOCK
    custom = remainder.get(custom_key)
    if not isinstance(custom, Mapping) or block_key not in custom:
        return None, remainder
    custom = dict(custom)
    block = custom.pop(block_key)
    if not isinstance(block, Mapping):
        raise _fail(_BLOCK_PATH, source, f"expected a mapping, got a {_kind_of(block)}", value=block)
    if custom:
        remainder[custom_key] = custom
    else:
        del remainder[custom_key]
    return dict(block), remainder


def _apply_block(block: Any, source: str, values: dict[str, Any], sources: dict[str, str]) -> None:
    if not isinstance(block, Mapping):
        raise _fail(_BLOCK_PATH, source, f"expected a mapping, got a {_kind_of(block)}", value=block)
    for key, raw in block.items():
        spec = _FIELDS.get(key) if isinstance(key, str) else None
        field = f"{_BLOCK_PATH}.{key}"
        if spec is None:
            guess = _close(str(key), _FIELDS)
            problem = "unknown key" + (f" (did you mean {guess!r}?)" if guess else "")
            raise _fail(field, source, problem, allowed=", ".join(_FIELDS), allowed_label="allowed keys")
        values[key] = spec.metadata["check"](raw, field, source)
        sources[key] = source


def _env_weight(raw: str) -> float:
    source = f"env:{ENV_WEIGHT}"
    try:
        number = float(raw)
    except ValueError as error:
        raise _fail(ENV_WEIGHT, source, "not a number", value=raw, allowed=_ALLOWED_WEIGHT) from error
    return _check_number(number, ENV_WEIGHT, source)


def _env_targets(raw: str) -> tuple[tuple[str, float], ...]:
    source = f"env:{ENV_TARGETS}"
    pairs: list[tuple[str, Any, float]] = []
    for item in raw.split(","):
        name, separator, weight_text = item.partition(":")
        if not name.strip() and not separator:
            continue
        weight = 1.0
        if separator:
            try:
                weight = float(weight_text)
            except ValueError as error:
                raise _fail(
                    ENV_TARGETS,
                    source,
                    f"weight of {name.strip()!r} is not a number",
                    value=raw,
                    allowed=_ALLOWED_TARGETS_ENV,
                ) from error
            weight = _check_number(weight, ENV_TARGETS, source, allowed=_ALLOWED_TARGETS_ENV)
        pairs.append((ENV_TARGETS, name, weight))
    return _normalize_kinds(pairs, raw, ENV_TARGETS, source, _ALLOWED_TARGETS_ENV)


def _env_distance(raw: str) -> str:
    return _check_choice(raw, ENV_DISTANCE, f"env:{ENV_DISTANCE}", choices=DISTANCES)


_ENV_OVERRIDES: tuple[tuple[str, str, Callable[[str], Any]], ...] = (
    (ENV_WEIGHT, "weight", _env_weight),
    (ENV_TARGETS, "targets", _env_targets),
    (ENV_DISTANCE, "distance", _env_distance),
)


def _notes(config: VisualKDConfig, sources: Mapping[str, str]) -> tuple[str, ...]:
    notes = []
    if not config.enabled:
        notes.append(f"enabled = false ({sources['enabled']}): the vision-KD term is off for this run")
    elif config.weight == 0:
        notes.append(f"weight = 0 ({sources['weight']}) while enabled: the term is off")
    elif all(weight == 0 for _, weight in config.targets):
        notes.append(f"every target weight is 0 ({sources['targets']}): the term adds nothing")
    if config.deepstack_layers is not None and "deepstack" not in config.kinds:
        notes.append(
            f"deepstack_layers = {list(config.deepstack_layers)} ({sources['deepstack_layers']}) is ignored:"
            f" 'deepstack' is not among targets ({sources['targets']})"
        )
    return tuple(notes)


def resolve(
    environ: Mapping[str, str] | None = None,
    inline: Mapping[str, Any] | None = None,
    inline_source: str | None = None,
) -> ResolvedConfig:
    """Build the one vision-KD config of a run and record where each value came from.

    Precedence, lowest to highest (this is the only place that decides it):

    1. the defaults declared on :class:`VisualKDConfig`;
    2. ``inline``: the ``custom.visual_kd`` block found in the YAML given to ``swift rlhf``;
    3. each file of ``VKD_CONFIG`` (``os.pathsep``-separated, empty entries ignored), in order,
       so a stage overlay listed after its base wins;
    4. the env overrides ``VKD_WEIGHT``, ``VKD_TARGETS``, ``VKD_DISTANCE`` (empty means unset).

    Sources merge field by field, except that ``targets`` and ``deepstack_layers`` are selections:
    a later source replaces them whole, so an overlay saying ``targets: [merger]`` really drops
    deepstack. Each source is validated as it is read, so an error names the source that holds
    the bad value. ``environ=None`` reads ``os.environ``.
    """
    env = os.environ if environ is None else environ
    values = {name: spec.default for name, spec in _FIELDS.items()}
    sources = dict.fromkeys(values, "default")
    if inline is not None:
        _apply_block(inline, f"inline:{inline_source}" if inline_source else "inline", values, sources)
    files = tuple(
        os.path.expanduser(entry) for entry in env.get(ENV_CONFIG, "").split(os.pathsep) if entry.strip()
    )
    for path in files:
        _apply_block(load_block(path), path, values, sources)
    for env_name, field_name, parse in _ENV_OVERRIDES:
        raw = env.get(env_name, "").strip()
        if raw:
            values[field_name] = parse(raw)
            sources[field_name] = f"env:{env_name}"
    config = VisualKDConfig(**values)
    return ResolvedConfig(config=config, sources=sources, files=files, notes=_notes(config, sources))
