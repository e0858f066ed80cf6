"""One source's ``custom.visual_kd`` block validated against :class:`vkd_shim.schema.VisualKDConfig`, with msgspec's
messages turned into ours: one line that names the field, the source and the allowed values.

Shorthand (case, spacing) is normalized here, at the edge, so the config that comes out is canonical.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping
from typing import Any

import msgspec

from vkd_shim.errors import ConfigError
from vkd_shim.schema import BLOCK_PATH, FIELDS, KINDS, MAX_WEIGHT, VisualKDConfig, _Problem, schema

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
        return " (larger weights overflow the fp32 gradient norm; see MAX_WEIGHT in vkd_shim.schema)"
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
            choices = KINDS if name in ("targets", "optional_targets") else _allowed(name).split(", ")
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
    if isinstance(out.get("optional_targets"), (list, tuple)):
        out["optional_targets"] = [fold(item) for item in out["optional_targets"]]
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
