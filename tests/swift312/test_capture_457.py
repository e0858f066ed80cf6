"""The capture on a transformers 4.57 Qwen3-VL tree: the vision tower returns a tuple there (merged
features, deepstack list) instead of 5.x's output object, while the merger and deepstack modules the
hooks sit on return plain tensors, so the captured features must be exactly what the language model
receives, and nothing may be recorded outside the window (generation included).

Why here: tests/test_capture.py reads the expected features through 5.x's `get_image_features` output
object and feeds `mm_token_type_ids` to `generate`, neither of which 4.57 has; these are the same claims
stated with 4.57's API.
"""

from __future__ import annotations

import pytest
import torch

from vkd_shim.capture import STUDENT, TEACHER, FeatureCapture
from vkd_shim.targets import Target
from vkd_shim.testing import inputs as kit_inputs
from vkd_shim.testing import models

KINDS = ("merger", "deepstack")
TARGETS = ["merger", "deepstack_0", "deepstack_1"]


@pytest.fixture(scope="module")
def student():
    return models.build_qwen3_vl(seed=0)


@pytest.fixture(scope="module")
def teacher():
    return models.build_qwen3_vl(seed=1)


@pytest.fixture
def capture(student, teacher):
    made = FeatureCapture(student, teacher, KINDS)
    made.attach()
    yield made
    made.detach()


def image_features_457(model, vision: dict) -> dict[str, torch.Tensor]:
    """4.57: `get_image_features` returns (per-image merged features, per-layer deepstack features)."""
    with torch.no_grad():
        merged, deepstack = model.model.get_image_features(vision["pixel_values"], vision["image_grid_thw"])
    return {"merger": torch.cat(merged), **{f"deepstack_{i}": f for i, f in enumerate(deepstack)}}


def test_tower_returns_a_tuple_and_the_aligner_returns_tensors(student):
    vision = kit_inputs.vision_inputs(student.config, n_images=1, seed=3)
    outputs = {}
    handles = [
        module.register_forward_hook(lambda m, a, out, name=name: outputs.__setitem__(name, out))
        for name, module in (
            ("visual", student.model.visual),
            ("merger", student.model.visual.merger),
            ("deepstack_0", student.model.visual.deepstack_merger_list[0]),
        )
    ]
    try:
        with torch.no_grad():
            student.model.visual(vision["pixel_values"], grid_thw=vision["image_grid_thw"])
    finally:
        for handle in handles:
            handle.remove()
    assert isinstance(outputs["visual"], tuple) and isinstance(outputs["visual"][1], list)
    assert isinstance(outputs["merger"], torch.Tensor) and isinstance(outputs["deepstack_0"], torch.Tensor)


def test_full_forward_captures_exactly_what_the_language_model_receives(student, teacher, capture):
    inputs = kit_inputs.forward_inputs(student.config, n_images=2, seed=5)
    inputs.pop("mm_token_type_ids")  # a 5.x input; 4.57 derives the types from the token ids
    with capture.window(), torch.no_grad():
        student(**inputs)
        teacher(**inputs)
        taken = capture.take()
    vision = {k: inputs[k] for k in ("pixel_values", "image_grid_thw")}
    for role, model in ((STUDENT, student), (TEACHER, teacher)):
        expected = image_features_457(model, vision)
        by_name = {target.name: features for target, features in taken[role].items()}
        assert list(by_name) == TARGETS
        for target in TARGETS:
            assert torch.equal(by_name[target], expected[target]), (role, target)
    tokens = kit_inputs.merged_tokens(student.config, vision["image_grid_thw"])
    assert taken[STUDENT][Target("merger")].shape == (tokens, student.config.vision_config.out_hidden_size)


def test_generate_outside_the_window_records_nothing(student, teacher, capture):
    inputs = kit_inputs.forward_inputs(student.config, n_images=1, seed=6)
    for key in ("mm_token_type_ids", "labels"):
        inputs.pop(key)
    with torch.no_grad():
        student.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert capture.calls == {}
    with capture.window():
        assert capture.take() == {}
    hooks = sum(len(m._forward_hooks) for model in (student, teacher) for m in model.modules())
    assert hooks == 2 * len(TARGETS)
    capture.detach()
    assert sum(len(m._forward_hooks) for model in (student, teacher) for m in model.modules()) == 0
