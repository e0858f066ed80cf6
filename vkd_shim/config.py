"""Where the vision-KD config comes from, and the one order in which the sources merge.

Sources: the inline ``custom.visual_kd`` block of the YAML given to ``swift rlhf``, the files of
``VKD_CONFIG`` and the ``VKD_*`` overrides (their names live in :mod:`vkd_shim.env`). Each is checked
by :mod:`vkd_shim.schema` as it is read, so an error names the source that holds the bad value.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from vkd_shim import env
from vkd_shim.schema import BLOCK, BLOCK_PATH, SHARE_TEXT, WEIGHT_TEXT, VisualKDConfig, schema
from vkd_shim.validation import closest, fail, from_block, kind_of

__all__ = [
    "BLOCK",
    "BLOCK_PATH",
    "ResolvedConfig",
    "VisualKDConfig",
    "from_block",
    "load_block",
    "resolve",
    "split_inline",
]


# --- files ------------------------------------------------------------------------------------------


@functools.cache
def _loader() -> type:
    """yaml's safe loader, refusing duplicate keys (PyYAML silently keeps the last one)."""
    import yaml  # deferred: only a config file needs it

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"duplicate key {key!r} (first given on line {seen[key]})",
                        key_node.start_mark,
                    )
                seen[key] = key_node.start_mark.line + 1
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def _yaml_problem(error: Exception) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    context = getattr(error, "context", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"broken YAML{where}: {problem}" + (f" ({context})" if context else "")


def _missing_block_hint(document: Mapping[Any, Any]) -> str:
    custom_key, block_key = BLOCK
    wanted = f"a {env.CONFIG} file must hold a {BLOCK_PATH} mapping"
    if custom_key not in document:
        guess = closest(custom_key, document)
        if guess is not None:
            return f"found top-level {guess!r}: did you mean {custom_key!r}?"
        guess = closest(block_key, document)
        if guess is not None:
            return f"found top-level {guess!r}: nest it under '{custom_key}:'"
        return wanted
    custom = document[custom_key]
    if not isinstance(custom, Mapping):
        return f"{custom_key!r} is a {kind_of(custom)}, not a mapping"
    guess = closest(block_key, custom)
    return f"found '{custom_key}.{guess}': did you mean '{BLOCK_PATH}'?" if guess else wanted


def read_document(path: str) -> Any:
    """Parse one YAML file, safely: regular files only (a FIFO would block every Python process that
    activates), safe loader, duplicate keys refused."""
    import yaml

    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        where = "" if os.path.isabs(path) else f" (relative to {os.getcwd()})"
        raise fail(env.CONFIG, path, f"file not found{where}") from None
    except OSError as error:
        raise fail(env.CONFIG, path, f"cannot read the file: {error.strerror}") from None
    if not stat.S_ISREG(mode):
        raise fail(env.CONFIG, path, "cannot read the file: not a regular file (a directory, FIFO or device)")
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as error:
        raise fail(env.CONFIG, path, f"cannot read the file: {getattr(error, 'strerror', None) or error}") from None
    try:
        return yaml.load(text, Loader=_loader())  # a SafeLoader subclass
    except yaml.YAMLError as error:
        raise fail(env.CONFIG, path, _yaml_problem(error)) from None


def load_block(path: str) -> dict[str, Any]:
    """The raw ``custom.visual_kd`` mapping of one file; other keys are ignored (it may be a swift YAML)."""
    document = read_document(path)
    if not isinstance(document, Mapping):
        found = "the file is empty" if document is None else f"the top level is a {kind_of(document)}"
        raise fail(env.CONFIG, path, f"{found}; expected a mapping holding {BLOCK_PATH}")
    custom = document.get(BLOCK[0])
    if not isinstance(custom, Mapping) or BLOCK[1] not in custom:
        raise fail(BLOCK_PATH, path, "block not found; " + _missing_block_hint(document))
    block = custom[BLOCK[1]]
    if not isinstance(block, Mapping):
        raise fail(BLOCK_PATH, path, f"expected a mapping, got a {kind_of(block)}", value=block)
    return dict(block)


def split_inline(
    document: Mapping[str, Any], *, source: str | None = None
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Pull ``custom.visual_kd`` out of a parsed swift args YAML document (not mutated).

    ms-swift turns a ``custom:`` key into ``--custom`` and rejects it, so the block must leave before
    swift parses the file; ``custom`` is dropped when nothing else is left in it.
    """
    remainder = copy.deepcopy(dict(document))
    custom_key, block_key = BLOCK
    custom = remainder.get(custom_key)
    if not isinstance(custom, Mapping) or block_key not in custom:
        return None, remainder
    custom = dict(custom)
    block = custom.pop(block_key)
    if not isinstance(block, Mapping):
        raise fail(BLOCK_PATH, source, f"expected a mapping, got a {kind_of(block)}", value=block)
    if custom:
        remainder[custom_key] = custom
    else:
        del remainder[custom_key]
    return dict(block), remainder


# --- env overrides ----------------------------------------------------------------------------------


def _env_number(name: str, raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise fail(name, f"env:{name}", "not a number", value=raw, allowed=WEIGHT_TEXT) from None


def _env_targets(raw: str) -> dict[str, float]:
    pairs: dict[str, float] = {}
    for item in raw.split(","):
        name, separator, weight = item.partition(":")
        if name.strip() or separator:
            kind = name.strip().lower()
            if kind in pairs:  # a mapping would keep the last one silently, as PyYAML would a duplicate key
                allowed = next(spec["allowed"] for spec in schema() if spec["name"] == "targets")
                problem = f"target kind {kind!r} is given twice"
                raise fail(env.TARGETS, f"env:{env.TARGETS}", problem, value=raw, allowed=allowed)
            pairs[kind] = _env_number(env.TARGETS, weight) if separator else 1.0
    return pairs


def _env_share(raw: str) -> float | None:
    if raw.lower() in ("none", "null"):
        return None
    try:
        return float(raw)
    except ValueError:
        raise fail(env.SHARE, f"env:{env.SHARE}", "not a number", value=raw, allowed=SHARE_TEXT) from None


_ENV_OVERRIDES = (
    (env.WEIGHT, "weight", functools.partial(_env_number, env.WEIGHT)),
    (env.SHARE, "share", _env_share),
    (env.TARGETS, "targets", _env_targets),
    (env.DISTANCE, "distance", str),
    (env.MODE, "mode", str),
)


# --- precedence -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedConfig:
    """The config of a run plus where each value came from, for the one "config resolved" event."""

    config: VisualKDConfig
    sources: Mapping[str, str]
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


def _notes(config: VisualKDConfig, sources: Mapping[str, str]) -> tuple[str, ...]:
    """The cross-field pass: legal combinations that do less than they seem to."""
    notes = []
    if not config.enabled:
        notes.append(f"enabled = false ({sources['enabled']}): the vision-KD term is off for this run")
    elif config.share is not None and not config.monitor:
        if sources["weight"] != "default":
            notes.append(
                f"weight = {config.weight:g} ({sources['weight']}) is not used: share = {config.share:g}"
                f" ({sources['share']}) holds the term at {config.share:.0%} of the GKD part"
            )
        if config.share > 1:
            notes.append(f"share = {config.share:g} ({sources['share']}): the term is larger than the GKD part")
    elif config.weight == 0 and not config.monitor:
        notes.append(f"weight = 0 ({sources['weight']}) while enabled: the term is off")
    elif not config.monitor and all(weight == 0 for _, weight in config.targets):
        notes.append(f"every target weight is 0 ({sources['targets']}): the term adds nothing")
    ignored = [kind for kind in config.optional_targets if kind not in config.kinds]
    if ignored:
        notes.append(
            f"optional_targets {ignored} ({sources['optional_targets']}) are ignored: not among targets"
            f" ({sources['targets']})"
        )
    if config.deepstack_layers is not None and "deepstack" not in config.kinds:
        notes.append(
            f"deepstack_layers = {list(config.deepstack_layers)} ({sources['deepstack_layers']}) is ignored:"
            f" 'deepstack' is not among targets ({sources['targets']})"
        )
    return tuple(notes)


def _require_named_targets(keys: tuple[str, ...], values: dict[str, Any], sources: dict[str, str], source: str) -> None:
    """A source that names targets without ``optional_targets`` asks for each of them: a model lacking one is
    refused, whatever optional kinds an earlier source (or the defaults) declared."""
    if "targets" in keys and "optional_targets" not in keys:
        values["optional_targets"], sources["optional_targets"] = (), source


def inline_from_env(environ: Mapping[str, str]) -> tuple[dict[str, Any] | None, str | None]:
    """The inline block the CLI process found in the swift YAML, as it travels to the training process."""
    text = environ.get(env.INLINE)
    return (json.loads(text) if text else None), environ.get(env.INLINE_SOURCE) or None


def resolve(
    environ: Mapping[str, str] | None = None,
    inline: Mapping[str, Any] | None = None,
    inline_source: str | None = None,
) -> ResolvedConfig:
    """Build the one vision-KD config of a run and record where each value came from.

    Precedence, lowest to highest (this is the only place that decides it):

    1. the defaults declared on :class:`VisualKDConfig`;
    2. the inline ``custom.visual_kd`` block of the YAML given to ``swift rlhf`` (``inline``, or when
       None, what the CLI process left in ``VKD_INLINE_CONFIG``);
    3. each file of ``VKD_CONFIG`` (``os.pathsep``-separated, empty entries ignored), in order, so a
       stage overlay listed after its base wins;
    4. the env overrides ``VKD_WEIGHT``, ``VKD_SHARE``, ``VKD_TARGETS``, ``VKD_DISTANCE``,
       ``VKD_MODE`` (empty means unset; ``VKD_SHARE=none`` clears a file's share).

    Sources merge field by field; ``targets`` and ``deepstack_layers`` are selections, so a later
    source replaces them whole, and a source naming ``targets`` without ``optional_targets`` makes them all
    required. Each source is validated as it is read, so an error names the source
    that holds the bad value.
    """
    environ = os.environ if environ is None else environ
    if inline is None:
        inline, inline_source = inline_from_env(environ)
    values = msgspec.structs.asdict(VisualKDConfig())
    sources = dict.fromkeys(values, "default")
    layers: list[tuple[str, Any]] = []
    if inline is not None:
        layers.append((f"inline:{inline_source}" if inline_source else "inline", inline))
    files = tuple(os.path.expanduser(e) for e in environ.get(env.CONFIG, "").split(os.pathsep) if e.strip())
    layers += [(path, load_block(path)) for path in files]
    for source, raw in layers:
        config, keys = from_block(raw, source)
        for key in keys:
            values[key], sources[key] = getattr(config, key), source
        _require_named_targets(keys, values, sources, source)
    for name, key, parse in _ENV_OVERRIDES:
        raw_text = environ.get(name, "").strip()
        if raw_text:
            config, _ = from_block({key: parse(raw_text)}, f"env:{name}", label=name)
            values[key], sources[key] = getattr(config, key), f"env:{name}"
            _require_named_targets((key,), values, sources, f"env:{name}")
    config = VisualKDConfig(**values)
    return ResolvedConfig(config=config, sources=sources, files=files, notes=_notes(config, sources))
