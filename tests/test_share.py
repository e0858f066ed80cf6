"""`share`: the term held at a fraction of the GKD part, by a scale from detached values (exact numbers).

The end-to-end test (tests/test_e2e.py) holds the logged share on a real run; these pin the arithmetic and
its edges on hand-set values: the scale, the warm-up, the cap, and the zero and non-finite cases.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from vkd_shim.config import VisualKDConfig
from vkd_shim.metrics import MetricBuffer
from vkd_shim.runtime import METRIC_SCALE, TrainerKD
from vkd_shim.schema import MAX_WEIGHT


def held(share: float, distance: torch.Tensor, gkd: float, step: int = 10, warmup_steps: int = 0):
    """TrainerKD._held_at_share on a state holding only what it reads: the config and the metric buffer."""
    state = SimpleNamespace(config=VisualKDConfig(share=share, warmup_steps=warmup_steps), buffer=MetricBuffer())
    term = TrainerKD._held_at_share(state, "train", step, distance, torch.tensor(gkd))
    metrics = {"train": {METRIC_SCALE: SimpleNamespace(update=lambda values: logged.extend(values))}}
    logged: list[float] = []
    state.buffer.flush("train", metrics, [METRIC_SCALE])
    return term, logged[0]


def test_the_term_is_the_share_of_the_gkd_part_and_only_the_distance_carries_gradient():
    features = torch.tensor([1.0, 2.0], requires_grad=True)
    distance = (features**2).sum()  # 5.0
    term, scale = held(0.1, distance, gkd=0.5)
    # scale = 0.1 * 0.5 / 5 = 0.01; term = 0.01 * 5 = 0.05 = 10 % of 0.5
    assert scale == pytest.approx(0.01) and term.item() == pytest.approx(0.05)
    term.backward()
    assert features.grad.tolist() == pytest.approx([0.02, 0.04])  # 0.01 * d(x1^2 + x2^2) = 0.01 * 2x


def test_the_warm_up_scales_the_share():
    # step 1 of a 4-step warm-up: factor 0.25, so 0.25 * 0.1 * 0.5 = 0.0125 of a GKD part of 0.5
    term, scale = held(0.1, torch.tensor(5.0), gkd=0.5, step=1, warmup_steps=4)
    assert term.item() == pytest.approx(0.0125) and scale == pytest.approx(0.0025)


def test_the_scale_is_capped_at_the_weights_ceiling():
    # 1.0 * 0.5 / 1e-9 = 5e8 is capped at 1e4: the term is then 1e-5, below the share
    term, scale = held(1.0, torch.tensor(1e-9), gkd=0.5)
    assert scale == MAX_WEIGHT and term.item() == pytest.approx(MAX_WEIGHT * 1e-9)


@pytest.mark.parametrize(
    ("distance", "gkd"), [(0.0, 0.5), (5.0, 0.0), (math.nan, 0.5), (5.0, math.inf), (math.inf, 0.5)]
)
def test_nothing_to_hold_or_nothing_to_hold_it_to_gives_scale_zero(distance, gkd):
    term, scale = held(0.1, torch.tensor(distance), gkd=gkd)
    assert scale == 0.0
    assert term.item() == 0.0 or not math.isfinite(distance)  # 0 * inf is nan: the distance's own problem
