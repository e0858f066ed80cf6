"""Structured JSON events and rate limiting for the vision-KD shim.

The shim runs inside someone else's training process, so this module owns its output end to end:
one structlog logger built with ``structlog.wrap_logger`` (processors pinned on the logger, never
``structlog.configure``), writing one JSON object per line to its own sink. The application's
structlog or stdlib logging setup cannot reroute or reformat our lines, and ours cannot change theirs.

It imports only the stdlib and structlog. Tensors are duck-typed, and torch.distributed is consulted
only when the training process has already imported it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import operator
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any, TextIO

import structlog

from vkd_shim import env

EVENTS: Mapping[str, str] = MappingProxyType(
    {
        "vkd.activate": "ms-swift imported with the gate on: shim version and the layout picked, and why",
        "vkd.config": "resolved config with the source of each value (once per process)",
        "vkd.config.invalid": "config failed validation (field, source, allowed)",
        "vkd.config.note": "legal but odd config (e.g. weight 0)",
        "vkd.disabled": "VKD_ENABLE is on but the config says enabled: false (or weight 0): no term, by decision",
        "vkd.version": "ms-swift version outside the supported matrix",
        "vkd.patch": "one per patch point: status applied|skipped|failed, target, swift_version, reason",
        "vkd.unpatch": "patches removed by deactivate()",
        "vkd.refuse": "run refused before model loading (reason, fix)",
        "vkd.attach": "capture attached to student/teacher (targets, shared modules)",
        "vkd.skip": "a micro-batch's term skipped (reason, e.g. shape mismatch, with both shapes)",
        "vkd.nonfinite": "non-finite features masked or raised (step, mode, target, side, count)",
        "vkd.no_visual": "no visual token reached the models for a stretch of steps or a whole run",
        "vkd.summary": "end of training: steps with the term, skipped steps by reason, visual tokens, mean per target",
        "vkd.log_file_error": "VKD_LOG_FILE could not be opened or written; lines go to stderr from then on",
        "vkd.monitor_error": "monitor mode met a failure of its own; reported, and the run goes on as without the shim",
    }
)

LOGGER_NAME = "vkd_shim"

# Keys every line starts with, in this order; caller context and fields come after them.
_RESERVED = ("timestamp", "level", "event", "pid", "rank", "local_rank", "world_size", "logger")
_LEVELS = frozenset({"debug", "info", "warning", "error"})


def rank_info(environ: Mapping[str, str] | None = None) -> dict[str, int]:
    """Return ``{"rank", "local_rank", "world_size"}`` for the line being written.

    An initialized process group is the truth once it exists (launchers may set RANK to something
    stale); before that, torchrun's environment is. torch is never imported here: if the training
    process has not imported torch.distributed, it cannot have a process group.
    """
    env = os.environ if environ is None else environ
    local_rank = _env_int(env, "LOCAL_RANK", 0)
    dist = sys.modules.get("torch.distributed")
    if dist is not None:
        try:
            if dist.is_available() and dist.is_initialized():
                return {
                    "rank": int(dist.get_rank()),
                    "local_rank": local_rank,
                    "world_size": int(dist.get_world_size()),
                }
        except (AttributeError, RuntimeError, ValueError):
            # A half-imported or torn-down torch.distributed must not cost us the line.
            pass
    return {
        "rank": _env_int(env, "RANK", 0),
        "local_rank": local_rank,
        "world_size": _env_int(env, "WORLD_SIZE", 1),
    }


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    try:
        return int(env.get(name, ""))
    except ValueError:
        return default


def _utc_timestamp() -> str:
    # strftime keeps the microseconds even when they are zero, unlike isoformat().
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _text(obj: object) -> str:
    try:
        return str(obj)
    except Exception:
        return f"<unrepresentable {type(obj).__name__}>"


def _repr(obj: object) -> str:
    try:
        return repr(obj)
    except Exception:
        return f"<unrepresentable {type(obj).__name__}>"


def _finite_or_text(value: float) -> float | str:
    # Bare NaN/Infinity tokens are not JSON; strict log shippers reject the whole line.
    return value if math.isfinite(value) else str(value)


def _jsonable(value: Any) -> Any:
    """Turn any field value into plain JSON types, because a telemetry call must not fail on data.

    Numbers that are not plain ints or floats (numpy scalars, 0-d tensors) become numbers through
    ``__index__``/``__float__``; anything else that JSON cannot hold becomes its repr.
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return _finite_or_text(value)
    if isinstance(value, Mapping):
        return {k if isinstance(k, str) else _text(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((_jsonable(v) for v in value), key=_repr)
    if isinstance(value, os.PathLike):
        return _text(os.fspath(value))
    # A float tensor has __index__ too (it raises), so each conversion is tried in turn. float() is
    # only offered to objects that define __float__: it would also parse bytes such as b"3".
    with contextlib.suppress(Exception):
        return operator.index(value)
    if hasattr(value, "__float__"):
        with contextlib.suppress(Exception):
            return _finite_or_text(float(value))
    return _repr(value)


def _unreserve(values: Mapping[str, Any]) -> dict[str, Any]:
    """Move caller keys that collide with the line's own keys to ``<key>_`` so neither is lost."""
    return {f"{k}_" if k in _RESERVED else k: v for k, v in values.items()}


def _shape_line(_logger: Any, method_name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """Put the fixed keys first; rank and pid are read now so lines after init/fork are right."""
    line: dict[str, Any] = {
        "timestamp": _utc_timestamp(),
        "level": method_name,
        "event": event_dict.pop("event"),
        "pid": os.getpid(),
        **rank_info(),
        "logger": LOGGER_NAME,
    }
    for key, value in event_dict.items():
        line[key] = _jsonable(value)
    return line


_PROCESSORS = (_shape_line, structlog.processors.JSONRenderer(allow_nan=False))
_BOUND_LOGGER = structlog.make_filtering_bound_logger(logging.DEBUG)


class _LineSink:
    """The object structlog wraps: writes finished lines and absorbs I/O failures.

    A log file that cannot be opened or written must not silence the shim (users do not read code
    to find out why nothing happened), so the first file failure switches output to stderr and
    leaves a note for the owning EventLogger to report. Every rank of a job may share one
    ``VKD_LOG_FILE``: each line goes out in one ``write`` on an ``O_APPEND`` descriptor, so lines of
    different processes never interleave inside each other (a buffered text file splits long lines).
    """

    def __init__(self, sink: TextIO | None, path: str | None) -> None:
        self.sink = sink
        self.path = path
        self.dropped = 0
        self._fd: int | None = None
        self._file_error: str | None = None
        self._unreported_error: str | None = None
        self._lock = threading.Lock()

    def _write(self, line: str) -> None:
        if self.sink is not None or self.path is None or self._file_error is not None:
            stream = self.sink if self.sink is not None else sys.stderr
            stream.write(line + "\n")
            stream.flush()
            return
        if self._fd is None:
            parent = os.path.dirname(self.path)
            if parent:
                os.makedirs(parent, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        data = (line + "\n").encode("utf-8")
        written = os.write(self._fd, data)
        if written != len(data):
            raise OSError(f"short write to {self.path}: {written} of {len(data)} bytes")

    def msg(self, line: str) -> None:
        with self._lock:
            to_file = self.sink is None and self.path is not None and self._file_error is None
            try:
                self._write(line)
                return
            except (OSError, ValueError) as exc:
                if not to_file:
                    self.dropped += 1
                    return
                self._file_error = f"{type(exc).__name__}: {exc}"
                self._unreported_error = self._file_error
                self._close_file()
            try:
                self._write(line)
            except (OSError, ValueError):
                self.dropped += 1

    debug = info = warning = error = msg

    @property
    def file_error(self) -> str | None:
        return self._file_error

    def take_file_error(self) -> str | None:
        with self._lock:
            error, self._unreported_error = self._unreported_error, None
            return error

    def _close_file(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        with self._lock:
            self._close_file()


def probe_log_file(path: str) -> tuple[bool | None, str]:
    """Whether the run could write its events to ``path`` (``None``: only a write could tell), and why, found
    without writing: the run makes missing parents and opens the file for append; the probe opens an existing
    file for append and closes it, or makes and removes a scratch directory where the file would be created.
    """
    import tempfile

    absolute = os.path.abspath(path)
    directory = os.path.dirname(absolute)
    try:
        if os.path.isdir(absolute):
            return False, f"IsADirectoryError: {absolute} is a directory"
        if os.path.exists(absolute) and not os.path.isfile(absolute):
            return None, "not a regular file (a device or a pipe): only a write could tell, and the doctor writes none"
        if os.path.exists(absolute):
            os.close(os.open(absolute, os.O_WRONLY | os.O_APPEND))
        else:
            while not os.path.exists(directory):
                directory = os.path.dirname(directory)
            if not os.path.isdir(directory):
                return False, f"NotADirectoryError: {directory} is not a directory"
            os.rmdir(tempfile.mkdtemp(prefix=".vkd-doctor-", dir=directory))
        stats = os.statvfs(directory)
    except OSError as exc:
        return False, f"{type(exc).__name__}: {exc}"
    if stats.f_blocks and not stats.f_bavail:
        return False, "OSError: no space left on its file system"
    return True, "appendable" if os.path.exists(absolute) else "can be created"


class EventLogger:
    """Writes the shim's events as JSON lines; never raises into training.

    With neither ``sink`` nor ``path``, ``VKD_LOG_FILE`` (read here) names a file opened lazily in
    append mode; without it, lines go to whatever ``sys.stderr`` is when each line is written, so
    redirected or captured stderr works.
    """

    def __init__(self, sink: TextIO | None = None, path: str | None = None) -> None:
        if sink is None and path is None:
            path = os.environ.get(env.LOG_FILE) or None
        self._sink = _LineSink(sink, path)
        self._context: dict[str, Any] = {}
        self._log = structlog.wrap_logger(
            self._sink,
            processors=list(_PROCESSORS),
            wrapper_class=_BOUND_LOGGER,
            context_class=dict,
            cache_logger_on_first_use=True,
        )

    @property
    def file_error(self) -> str | None:
        """Why the log file could not be opened or written, once that happened (then lines go to stderr)."""
        return self._sink.file_error

    @property
    def dropped(self) -> int:
        """Lines lost to sink errors or unrenderable input since this logger was created."""
        return self._sink.dropped

    def bind(self, **ctx: Any) -> None:
        """Add context to every later line (run id, config digest); later binds override earlier ones."""
        ctx = _unreserve(ctx)
        self._context.update(ctx)
        self._log = self._log.bind(**ctx)

    def event(self, name: str, level: str = "info", **fields: Any) -> None:
        if name not in EVENTS:
            # A programming error, not a data problem: a test reads every emitted name against EVENTS.
            raise ValueError(f"unregistered vision-KD event {name!r}; add it to telemetry.EVENTS")
        fields = _unreserve(fields)
        normalized = "warning" if level == "warn" else level
        if normalized not in _LEVELS:
            fields["level_"] = level
            normalized = "info"
        try:
            getattr(self._log, normalized)(name, **fields)
        except Exception:
            # Telemetry must never break a training step; the loss is counted instead.
            self._sink.dropped += 1
        error = self._sink.take_file_error()
        if error is not None:
            self.event("vkd.log_file_error", "warning", path=self._sink.path, error=error)

    def info(self, name: str, **fields: Any) -> None:
        self.event(name, "info", **fields)

    def warning(self, name: str, **fields: Any) -> None:
        self.event(name, "warning", **fields)

    def error(self, name: str, **fields: Any) -> None:
        self.event(name, "error", **fields)

    def close(self) -> None:
        """Close the log file if one is open; a later line reopens it."""
        self._sink.close()

    def __getstate__(self) -> dict[str, Any]:
        # Spawned workers may pickle objects that hold us; open files and locks do not travel.
        return {"sink": self._sink.sink, "path": self._sink.path, "context": dict(self._context)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["sink"], state["path"])
        self.bind(**state["context"])


_logger: EventLogger | None = None
_logger_lock = threading.Lock()


def get_logger() -> EventLogger:
    """The process-wide logger, created on first use so importing this module has no effect."""
    global _logger
    with _logger_lock:
        if _logger is None:
            _logger = EventLogger()
        return _logger


def reset_logger() -> None:
    """Drop the process-wide logger (tests; after fork, so the child gets its own file handle)."""
    global _logger
    with _logger_lock:
        old, _logger = _logger, None
    if old is not None:
        old.close()


class RateLimiter:
    """Lets the first call per key through in each window and counts the rest.

    A NaN on every micro-step would otherwise flood log aggregation; the suppressed count travels
    with the next emitted line so nothing is hidden.
    """

    def __init__(self, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        if not (math.isfinite(window_s) and window_s >= 0):
            raise ValueError(f"RateLimiter window_s must be a finite number >= 0, got {window_s!r}")
        self._window_s = window_s
        self._clock = clock
        self._state: dict[str, list[float | int]] = {}

    def allow(self, key: str) -> tuple[bool, int]:
        """Return (emit now?, calls suppressed for this key since its last emit, this one included)."""
        now = self._clock()
        state = self._state.get(key)
        if state is None or now - state[0] >= self._window_s:
            suppressed = 0 if state is None else int(state[1])
            self._state[key] = [now, 0]
            return True, suppressed
        state[1] += 1
        return False, int(state[1])
