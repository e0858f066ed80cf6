"""What one trainer's vision KD accumulates between log times and over the run, kept off the host.

The values are 0-d tensors on the training device (duck-typed: anything with ``detach``) or plain numbers;
they are read on the host only at log time and at the end of training, because every ``.item()`` on a
micro-step stalls a GPU. Stdlib only.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping
from typing import Any


class MetricBuffer:
    """Holds per-micro-step values on device and hands them to the trainer's metrics only at log time,
    because ms-swift's MeanMetric.update calls .item() (a host sync) on every call."""

    def __init__(self) -> None:
        self._modes: dict[str, dict[str, list[Any]]] = {}

    def add(self, mode: str, key: str, value: Any) -> None:
        """Add one micro-step value: a 0-d tensor stays on its device (detached, fp32), or a number."""
        if hasattr(value, "detach"):
            if value.ndim != 0:
                raise ValueError(
                    f"MetricBuffer.add({mode!r}, {key!r}) takes a 0-d tensor or a number, "
                    f"got a tensor of shape {tuple(value.shape)}"
                )
            # Detached so no autograd graph outlives the step; fp32 so bf16 sums do not lose steps.
            value = value.detach().float()
        entry = self._modes.setdefault(mode, {}).setdefault(key, [0.0, 0])
        entry[0] = entry[0] + value
        entry[1] += 1

    def pending(self, mode: str) -> bool:
        return bool(self._modes.get(mode))

    def flush(self, mode: str, metrics: Mapping[str, Any], keys: Iterable[str]) -> dict[str, tuple[float, int]]:
        """Move this mode's sums into ``metrics[mode][key]`` with one host conversion per key.

        Every key in ``keys`` is updated, with ``[]`` when nothing was added, so all ranks touch the
        same metrics (MeanMetric all-reduces each one at log time). ``update([mean] * count)`` adds the
        sum and the count, so the logged value is the mean over all micro-batches of all ranks. Values
        added under keys not in ``keys`` are discarded with the buffer.
        """
        buffered = self._modes.pop(mode, {})
        table = metrics[mode]
        result: dict[str, tuple[float, int]] = {}
        for key in dict.fromkeys(keys):
            total, count = buffered.get(key, (0.0, 0))
            host = float(total)
            mean = host / count if count else 0.0
            table[key].update([mean] * count)
            result[key] = (host, count)
        return result


class Tally:
    """What the end-of-run summary reports; host counters only, plus on-device sums per target."""

    def __init__(self) -> None:
        self.term_steps: collections.Counter[str] = collections.Counter()
        self.skipped: collections.Counter[str] = collections.Counter()
        self.nonfinite: collections.Counter[str] = collections.Counter()
        self.tokens: collections.Counter[str] = collections.Counter()
        self.sums: dict[tuple[str, str], Any] = {}
        self.drift: dict[tuple[str, str], Any] = {}

    def add(self, mode: str, tokens: int, per_target: Mapping[Any, Any], drift: Mapping[Any, Any]) -> None:
        self.term_steps[mode] += 1
        self.tokens[mode] += tokens
        for sums, values in ((self.sums, per_target), (self.drift, drift)):
            for target, value in values.items():
                key = (mode, target.name)
                sums[key] = sums.get(key, 0.0) + value.detach().float()

    def means(self, sums: Mapping[tuple[str, str], Any] | None = None) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for (mode, name), total in (self.sums if sums is None else sums).items():
            out.setdefault(mode, {})[name] = float(total) / self.term_steps[mode]
        return out
