"""The shim's per-step functions, named by dotted path, and a way to wrap them for a measurement.

Benchmark-only monkeypatching: each point is a public name of the shim (or the hook body, which is the
one module-level function the forward hooks call), wrapped by the caller's factory for the duration of
a ``with instrumented(...)`` block and restored on exit. Wrap where the caller looks the name up:
``vkd_shim.runtime`` imports ``vision_kd_loss`` into its own namespace, so that is the name patched.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

#: label -> dotted path (``module:attribute`` or ``module:Class.method``). Order: a step's call order.
POINTS: Mapping[str, str] = {
    # The forward-hook body. FeatureCapture binds it with functools.partial at attach(): re-attach
    # the capture after wrapping (see `reattach`).
    "hook": "vkd_shim.capture:_record",
    "take": "vkd_shim.capture:FeatureCapture.take",
    "distance": "vkd_shim.runtime:vision_kd_loss",
    "buffer": "vkd_shim.runtime:MetricBuffer.add",
    "flush": "vkd_shim.runtime:TrainerKD.flush",
    # The whole per-step method; ms-swift's original compute_loss runs inside it (passed as `wrapped`).
    "compute_loss": "vkd_shim.runtime:TrainerKD.compute_loss",
}


def resolve(path: str) -> tuple[Any, str, Any]:
    """(owner, attribute, current value) of a ``module:attr[.attr]`` path."""
    module_name, _, qualname = path.partition(":")
    owner: Any = importlib.import_module(module_name)
    *parents, attr = qualname.split(".")
    for name in parents:
        owner = getattr(owner, name)
    return owner, attr, vars(owner)[attr]


@contextlib.contextmanager
def instrumented(wrap: Callable[[str, Callable], Callable], labels: tuple[str, ...] | None = None) -> Iterator[None]:
    """Replace each point (all, or those in ``labels``) with ``wrap(label, original)``; restore on exit."""
    saved = []
    try:
        for label, path in POINTS.items():
            if labels is not None and label not in labels:
                continue
            owner, attr, original = resolve(path)
            replacement = functools.wraps(original)(wrap(label, original))
            setattr(owner, attr, replacement)
            saved.append((owner, attr, original))
        yield
    finally:
        for owner, attr, original in reversed(saved):
            setattr(owner, attr, original)


def reattach(capture: Any) -> None:
    """Rebind the forward hooks to whatever ``vkd_shim.capture._record`` is now (attach binds it)."""
    capture.detach()
    capture.attach()
