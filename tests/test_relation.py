"""`relation`, `nmse` and the `vit` target: exact values against hand computations, the invariances
that make them usable across model sizes, and the preflight that decides which pairs they accept."""

from __future__ import annotations

import json
import types

import pytest
import torch

from vkd_shim import config, loss, preflight
from vkd_shim.capture import STUDENT, TEACHER, FeatureCapture
from vkd_shim.errors import FeatureMismatchError
from vkd_shim.targets import VIT, Target, resolve_targets
from vkd_shim.testing import inputs, models


def hand_relation(student: torch.Tensor, teacher: torch.Tensor, segments: list[int]) -> torch.Tensor:
    """Per image: mean over its n x n entries of (cos_s - cos_t)^2; images weighted by their n tokens."""
    total, start = torch.zeros((), dtype=torch.float64), 0
    for n in segments:
        a = student[start : start + n].double()
        b = teacher[start : start + n].double()
        a = a / a.norm(dim=-1, keepdim=True)
        b = b / b.norm(dim=-1, keepdim=True)
        total += n * ((a @ a.T - b @ b.T) ** 2).mean()
        start += n
    return total / sum(segments)


def features(rows: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, width, generator=torch.Generator().manual_seed(seed))


def test_relation_by_hand_on_two_orthogonal_pairs():
    """2 tokens, one image. Student rows are orthogonal (cos 0), teacher rows are parallel (cos 1):
    the matrices differ only off the diagonal, by 1 each, so the mean over 4 entries is 2/4 = 0.5."""
    student = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    teacher = torch.tensor([[2.0, 0.0, 0.0], [5.0, 0.0, 0.0]])  # wider: relation needs no equal width
    assert loss.feature_distance(student, teacher, "relation", [2]).item() == pytest.approx(0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_relation_matches_the_hand_computation_for_images_of_different_sizes(dtype):
    segments = [4, 6, 9]  # three images of different sizes in one micro-batch
    student, teacher = features(19, 16, 0).to(dtype), features(19, 24, 1).to(dtype)
    got = loss.feature_distance(student, teacher, "relation", segments)
    want = hand_relation(student.float(), teacher.float(), segments)
    assert got.dtype == torch.float32  # computed in fp32 whatever the features' dtype
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_relation_never_builds_one_matrix_over_the_batch():
    student, teacher = features(10, 8, 2), features(10, 8, 3)
    per_image = loss.feature_distance(student, teacher, "relation", [4, 6])
    whole = loss.feature_distance(student, teacher, "relation", [10])
    assert per_image.item() == pytest.approx(hand_relation(student, teacher, [4, 6]).item(), rel=1e-6)
    assert per_image.item() != pytest.approx(whole.item(), rel=1e-3)


def test_duplicating_every_image_leaves_relation_unchanged():
    student, teacher = features(10, 8, 4), features(10, 12, 5)
    once = loss.feature_distance(student, teacher, "relation", [4, 6])
    twice_s = torch.cat([student[:4], student[:4], student[4:], student[4:]])
    twice_t = torch.cat([teacher[:4], teacher[:4], teacher[4:], teacher[4:]])
    assert loss.feature_distance(twice_s, twice_t, "relation", [4, 4, 6, 6]).item() == pytest.approx(once.item())


def test_a_rotation_of_the_student_feature_space_leaves_relation_unchanged():
    student, teacher = features(12, 8, 6), features(12, 16, 7)
    rotation, _ = torch.linalg.qr(features(8, 8, 8))
    base = loss.feature_distance(student, teacher, "relation", [5, 7])
    rotated = loss.feature_distance(student @ rotation, teacher, "relation", [5, 7])
    assert rotated.item() == pytest.approx(base.item(), abs=1e-6)
    assert loss.feature_distance(student, student @ rotation, "relation", [12]).item() == pytest.approx(0, abs=1e-6)


def test_relation_in_blocks_gives_the_same_value_and_gradient(monkeypatch):
    student, teacher = features(23, 8, 9).requires_grad_(), features(23, 8, 10)
    whole = loss.feature_distance(student, teacher, "relation", [23])
    (grad_whole,) = torch.autograd.grad(whole, student)
    monkeypatch.setattr(loss, "RELATION_BLOCK_ROWS", 5)  # 23 rows: 5 blocks, recomputed in backward
    blocked = loss.feature_distance(student, teacher, "relation", [23])
    (grad_blocked,) = torch.autograd.grad(blocked, student)
    assert blocked.item() == pytest.approx(whole.item(), rel=1e-6)
    torch.testing.assert_close(grad_blocked, grad_whole)


def test_relation_gradients_reach_the_student_only_and_masked_rows_get_none():
    student = features(6, 8, 11).requires_grad_()
    teacher = features(6, 12, 12).requires_grad_()
    bad = teacher.detach().clone()
    bad[2] = float("nan")
    out = loss.vision_kd_loss(
        {Target("merger"): student},
        {Target("merger"): bad.requires_grad_()},
        weights={Target("merger"): 1.0},
        distance="relation",
        scale=1.0,
        segments={Target("merger"): [6]},
    )
    out.total.backward()
    assert torch.isfinite(out.total) and bad.grad is None
    assert student.grad[2].abs().sum() == 0 and student.grad.abs().sum() > 0
    assert int(out.nonfinite_teacher[Target("merger")]) == 1
    # The masked row and column leave the image: the value is that of the 5 valid tokens.
    keep = [0, 1, 3, 4, 5]
    want = hand_relation(student.detach()[keep], teacher.detach()[keep], [5])
    assert out.per_target[Target("merger")].item() == pytest.approx(want.item(), rel=1e-5)


def test_relation_refuses_segments_that_do_not_cover_the_rows_and_oversized_images(monkeypatch):
    student, teacher = features(10, 8, 13), features(10, 8, 14)
    with pytest.raises(FeatureMismatchError, match="hold 9 tokens"):
        loss.feature_distance(student, teacher, "relation", [4, 5])
    monkeypatch.setattr(loss, "MAX_RELATION_TOKENS", 5)
    with pytest.raises(FeatureMismatchError, match="an image of 6 tokens exceeds relation's 5"):
        loss.feature_distance(student, teacher, "relation", [4, 6])


def test_nmse_by_hand_and_scale_free():
    """Row 1: s - t = (1, 0), |t|^2 = 4 -> 1/4; row 2: s = t -> 0; mean 0.125 (eps 1e-6 aside)."""
    student = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    teacher = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    assert loss.feature_distance(student, teacher, "nmse").item() == pytest.approx(0.125, rel=1e-5)
    # One weight means the same at any feature scale: scaling both sides leaves nmse, not mse, unchanged.
    s, t = features(8, 16, 15), features(8, 16, 16)
    assert loss.feature_distance(50 * s, 50 * t, "nmse").item() == pytest.approx(
        loss.feature_distance(s, t, "nmse").item(), rel=1e-5
    )
    assert loss.feature_distance(50 * s, 50 * t, "mse").item() == pytest.approx(
        2500 * loss.feature_distance(s, t, "mse").item(), rel=1e-5
    )


# --- the vit target on the real module tree ----------------------------------------------------------


def test_vit_target_is_the_merger_input_captured_from_the_same_forward():
    student, teacher = models.build_qwen3_vl(seed=0), models.build_qwen3_vl(seed=1)
    targets = resolve_targets(student, ["merger", "vit"])
    assert list(targets) == [Target("merger"), Target(VIT)]
    assert targets[Target(VIT)] is student.model.visual.merger
    capture = FeatureCapture(student, teacher, ["merger", "vit"])
    capture.attach()
    vision = inputs.vision_inputs(student.config, n_images=2, seed=3)
    patches = int(vision["image_grid_thw"].prod(-1).sum())
    seen = {}
    hook = student.model.visual.merger.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    with capture.window():
        with torch.no_grad():
            teacher.model.visual(vision["pixel_values"], grid_thw=vision["image_grid_thw"])
        student.model.visual(vision["pixel_values"], grid_thw=vision["image_grid_thw"])
        taken = capture.take()
        calls = capture.calls
    hook.remove()
    vit = taken[STUDENT][Target(VIT)]
    assert vit.shape == (patches, student.config.vision_config.hidden_size)
    assert vit is seen["x"] and vit.grad_fn is not None  # the forward's own tensor, graph kept
    assert taken[TEACHER][Target(VIT)].grad_fn is None
    assert calls == {(r, t): 1 for r in (STUDENT, TEACHER) for t in (Target("merger"), Target(VIT))}


# --- preflight by distance -----------------------------------------------------------------------------


def model_dir(path, **vision) -> str:
    base = {
        "out_hidden_size": 64,
        "hidden_size": 32,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "qwen3_vl", "vision_config": {**base, **vision}}))
    return str(path)


def args_for(tmp_path, student: dict, teacher: dict):
    return types.SimpleNamespace(
        rlhf_type="gkd",
        teacher_model=model_dir(tmp_path / "teacher", **teacher),
        model_dir=model_dir(tmp_path / "student", **student),
        freeze_aligner=False,
        freeze_vit=False,  # the vit cases need a trainable ViT (a frozen one is refused on its own)
    )


@pytest.mark.parametrize(
    ("block", "teacher", "refused"),
    [
        ({"targets": ["merger"], "distance": "mse"}, {"out_hidden_size": 96}, "distance: relation"),
        ({"targets": ["merger"], "distance": "nmse"}, {"out_hidden_size": 96}, "distance: relation"),
        ({"targets": ["merger"], "distance": "relation"}, {"out_hidden_size": 96}, None),
        ({"targets": ["vit"], "distance": "mse"}, {"out_hidden_size": 96}, None),  # equal ViTs: width-free
        ({"targets": ["vit"], "distance": "mse"}, {"hidden_size": 48}, "vision_config.hidden_size 32 vs 48"),
        ({"targets": ["vit", "merger"], "distance": "relation"}, {"hidden_size": 48, "out_hidden_size": 96}, None),
        ({"targets": ["merger"], "distance": "relation"}, {"spatial_merge_size": 4}, "spatial_merge_size 2 vs 4"),
        ({"targets": ["merger"], "distance": "relation"}, {"temporal_patch_size": 1}, "temporal_patch_size"),
    ],
)
def test_preflight_accepts_width_free_pairs_and_refuses_different_token_geometry(tmp_path, block, teacher, refused):
    settings, _ = config.from_block(block)
    reasons = [f"{r.reason} Fix: {r.fix}" for r in preflight.check(args_for(tmp_path, {}, teacher), settings)]
    if refused is None:
        assert reasons == []
    else:
        assert any(refused in reason for reason in reasons), reasons
