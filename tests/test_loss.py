"""Distances checked against hand arithmetic, then wired to a real tiny Qwen3-VL backward."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from vkd_shim import loss
from vkd_shim.capture import STUDENT, TEACHER, FeatureCapture
from vkd_shim.errors import FeatureMismatchError
from vkd_shim.loss import LossOutput, feature_distance, vision_kd_loss
from vkd_shim.targets import Target
from vkd_shim.testing import inputs as kit_inputs
from vkd_shim.testing import models

NAN = float("nan")
INF = float("inf")

# mse example, hidden 2:
#   row 0: s=(1,2) t=(1,0) -> squared error (0,4) -> mean 2.0
#   row 1: s=(3,4) t=(0,4) -> squared error (9,0) -> mean 4.5
#   mse = (2.0 + 4.5) / 2 rows = 3.25
MSE_S = [[1.0, 2.0], [3.0, 4.0]]
MSE_T = [[1.0, 0.0], [0.0, 4.0]]
MSE_VALUE = 3.25

# cosine example, hidden 2:
#   row 0: s=(1,0) t=(0,1) -> cos 0                      -> 1 - 0    = 1
#   row 1: s=(1,1) t=(2,2) -> cos 1                      -> 1 - 1    = 0
#   row 2: s=(3,4) t=(4,3) -> cos (12+12)/(5*5) = 0.96   -> 1 - 0.96 = 0.04
#   cosine = (1 + 0 + 0.04) / 3 rows = 0.346666...
COS_S = [[1.0, 0.0], [1.0, 1.0], [3.0, 4.0]]
COS_T = [[0.0, 1.0], [2.0, 2.0], [4.0, 3.0]]
COS_VALUE = 1.04 / 3


def tensor(rows, dtype=torch.float32, grad=False):
    return torch.tensor(rows, dtype=dtype, requires_grad=grad)


def num(value: torch.Tensor) -> float:
    return value.detach().item()


def approx(value):
    return pytest.approx(value, rel=1e-6, abs=1e-7)


# --- exact values ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("kind", "student", "teacher", "expected"),
    [("mse", MSE_S, MSE_T, MSE_VALUE), ("cosine", COS_S, COS_T, COS_VALUE)],
)
def test_exact_distance_in_fp32_whatever_the_input_dtype(kind, student, teacher, expected, dtype):
    # Every input value (0..4) is exact in bf16, so both dtypes must give the same fp32 number.
    distance = feature_distance(tensor(student, dtype), tensor(teacher, dtype), kind)

    assert isinstance(distance, torch.Tensor)
    assert distance.dtype == torch.float32
    assert distance.dim() == 0
    assert num(distance) == approx(expected)


def test_cosine_zero_vectors_are_finite():
    # Either side all-zero: cosine is defined as 0, so each row contributes 1 - 0 = 1.
    #   rows (0,0)|(1,0), (1,0)|(0,0), (0,0)|(0,0) -> (1 + 1 + 1) / 3 = 1
    student = tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]], grad=True)
    teacher = tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])

    distance = feature_distance(student, teacher, "cosine")
    distance.backward()

    assert num(distance) == approx(1.0)
    assert torch.isfinite(student.grad).all()


def test_rows_of_several_calls_weigh_equally():
    # An image call (1 row) and a video call (3 rows) concatenated, as capture hands them over:
    #   image row  s=(1,2) t=(1,0) -> 2.0
    #   video rows s=(3,4) t=(0,4) -> 4.5 each
    #   mean over the 4 token rows = (2.0 + 3 * 4.5) / 4 = 3.875 (a mean of per-call means: 3.25)
    image_s, image_t = tensor([[1.0, 2.0]]), tensor([[1.0, 0.0]])
    video_s, video_t = tensor([[3.0, 4.0]] * 3), tensor([[0.0, 4.0]] * 3)

    out = vision_kd_loss(
        {"merger": torch.cat([image_s, video_s])},
        {"merger": torch.cat([image_t, video_t])},
        weights={"merger": 1.0},
        distance="mse",
        scale=1.0,
    )

    assert num(out.per_target["merger"]) == approx(3.875)
    assert out.tokens == 4


@pytest.mark.parametrize(
    ("kind", "student", "teacher", "expected"),
    [("mse", MSE_S, MSE_T, MSE_VALUE), ("cosine", COS_S, COS_T, COS_VALUE)],
)
def test_duplicating_every_image_leaves_the_term_unchanged(kind, student, teacher, expected):
    s, t = tensor(student), tensor(teacher)

    distance = feature_distance(torch.cat([s, s]), torch.cat([t, t]), kind)

    assert num(distance) == approx(expected)


def test_weights_and_scale_scale_the_total_only():
    # merger: MSE example = 3.25; deepstack_0: s=(2,2) t=(0,0) -> (4 + 4) / 2 = 4.0
    # total = scale (weight 0.1 x warm-up 0.5) * (1.0 * 3.25 + 0.5 * 4.0) = 0.05 * 5.25 = 0.2625
    out = vision_kd_loss(
        {"merger": tensor(MSE_S), "deepstack_0": tensor([[2.0, 2.0]])},
        {"merger": tensor(MSE_T), "deepstack_0": tensor([[0.0, 0.0]])},
        weights={"merger": 1.0, "deepstack_0": 0.5, "deepstack_1": 9.0},
        distance="mse",
        scale=0.1 * 0.5,
    )

    assert isinstance(out, LossOutput)
    assert out.total.dtype == torch.float32
    assert out.total.dim() == 0
    assert num(out.total) == approx(0.2625)
    assert {k: num(v) for k, v in out.per_target.items()} == {
        "merger": approx(3.25),
        "deepstack_0": approx(4.0),
    }
    assert out.tokens == 2  # rows of the first target (merger)
    assert {k: int(v) for k, v in out.nonfinite_student.items()} == {"merger": 0, "deepstack_0": 0}
    assert {k: int(v) for k, v in out.nonfinite_teacher.items()} == {"merger": 0, "deepstack_0": 0}
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.tokens = 3


def test_scale_zero_at_the_start_of_warm_up_keeps_the_per_target_values():
    # Step 0 of a warm-up: scale 0 gives an exact 0 term, still a function of the student, while the
    # unweighted per-target value (telemetry) is the MSE example's 3.25.
    student = tensor(MSE_S, grad=True)

    out = vision_kd_loss(
        {"merger": student}, {"merger": tensor(MSE_T)}, weights={"merger": 2.0}, distance="mse", scale=0.0
    )
    out.total.backward()

    assert num(out.total) == 0.0
    assert num(out.per_target["merger"]) == approx(MSE_VALUE)
    assert torch.equal(student.grad, torch.zeros(2, 2))


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_zero_rows_give_an_exact_zero_connected_to_the_student(kind):
    student = torch.zeros(0, 4, requires_grad=True)
    teacher = torch.zeros(0, 4)

    out = vision_kd_loss({"merger": student}, {"merger": teacher}, weights={"merger": 1.0}, distance=kind, scale=2.0)
    out.total.backward()

    assert num(out.total) == 0.0
    assert out.total.grad_fn is not None
    assert out.tokens == 0
    assert student.grad is not None
    assert student.grad.shape == (0, 4)


# --- non-finite rows --------------------------------------------------------------------------------


def bad_row_counts(out: LossOutput) -> dict[str, dict]:
    return {
        "student": {k: int(v) for k, v in out.nonfinite_student.items()},
        "teacher": {k: int(v) for k, v in out.nonfinite_teacher.items()},
    }


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_nonfinite_teacher_rows_are_masked_on_both_sides(bad):
    # row 1 is dropped; rows 0 and 2 remain:
    #   row 0: s=(1,2) t=(1,0) -> 2.0;  row 2: s=(5,6) t=(0,4) -> (25 + 4) / 2 = 14.5
    #   mse = (2.0 + 14.5) / 2 valid rows = 8.25
    # d mse / d s = 2 (s - t) / (hidden 2 * valid 2) = (s - t) / 2:
    #   row 0: (0, 2) / 2 = (0, 1);  row 1: 0 (masked);  row 2: (5, 2) / 2 = (2.5, 1)
    student = tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], grad=True)
    teacher = tensor([[1.0, 0.0], [bad, 0.0], [0.0, 4.0]])

    out = vision_kd_loss({"merger": student}, {"merger": teacher}, weights={"merger": 1.0}, distance="mse", scale=1.0)
    out.total.backward()

    assert num(out.total) == approx(8.25)
    assert bad_row_counts(out) == {"student": {"merger": 0}, "teacher": {"merger": 1}}
    torch.testing.assert_close(student.grad, tensor([[0.0, 1.0], [0.0, 0.0], [2.5, 1.0]]))
    assert num(feature_distance(student, teacher, "mse")) == approx(8.25)


@pytest.mark.parametrize("bad", [NAN, INF])
def test_nonfinite_student_rows_are_masked_with_finite_gradients(bad):
    # row 1 dropped; rows 0 and 1 of the MSE example remain -> 3.25; the bad row's grad is 0.
    student = tensor([[1.0, 2.0], [bad, 4.0], [3.0, 4.0]], grad=True)
    teacher = tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 4.0]])

    out = vision_kd_loss({"merger": student}, {"merger": teacher}, weights={"merger": 1.0}, distance="mse", scale=1.0)
    out.total.backward()

    assert num(out.total) == approx(3.25)
    assert bad_row_counts(out) == {"student": {"merger": 1}, "teacher": {"merger": 0}}
    assert out.nonfinite_student["merger"].dtype == torch.int64
    assert out.nonfinite_student["merger"].dim() == 0
    assert torch.isfinite(student.grad).all()
    assert student.grad[1].abs().sum() == 0


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_nonfinite_rows_are_counted_per_side_and_target(kind):
    # merger, 5 rows of hidden 2:
    #   row 0: valid                 s=(1,2) t=(1,0)
    #   row 1: student NaN
    #   row 2: teacher NaN
    #   row 3: both (student Inf, teacher -Inf): counted on each side
    #   row 4: valid                 s=(3,4) t=(4,3)
    #   mse    = ((0 + 4) / 2 + (1 + 1) / 2) / 2 valid rows = (2 + 1) / 2 = 1.5
    #   cosine = ((1 - 1/sqrt(5)) + (1 - 24/25)) / 2 = (1 - 0.4472136 + 0.04) / 2 = 0.2963932
    # deepstack_0, 2 rows: row 0 student NaN, row 1 valid and equal -> distance 0 on either kind.
    # total = scale 0.5 * (2.0 * merger + 3.0 * 0)
    merger_s = tensor([[1.0, 2.0], [NAN, 1.0], [1.0, 1.0], [INF, 0.0], [3.0, 4.0]], grad=True)
    merger_t = tensor([[1.0, 0.0], [1.0, 1.0], [NAN, 1.0], [-INF, 1.0], [4.0, 3.0]])
    deep_s = tensor([[NAN, 0.0], [1.0, 1.0]], grad=True)
    deep_t = tensor([[0.0, 0.0], [1.0, 1.0]])
    merger_value = {"mse": 1.5, "cosine": (1 - 1 / math.sqrt(5) + 0.04) / 2}[kind]
    merger, deep = Target("merger"), Target("deepstack", 0)

    out = vision_kd_loss(
        {merger: merger_s, deep: deep_s},
        {merger: merger_t, deep: deep_t},
        weights={merger: 2.0, deep: 3.0},
        distance=kind,
        scale=0.5,
    )
    out.total.backward()

    assert bad_row_counts(out) == {"student": {merger: 2, deep: 1}, "teacher": {merger: 2, deep: 0}}
    assert all(v.dtype == torch.int64 for v in [*out.nonfinite_student.values(), *out.nonfinite_teacher.values()])
    assert math.isfinite(num(out.total))
    assert num(out.per_target[merger]) == approx(merger_value)
    assert num(out.per_target[deep]) == approx(0.0)
    assert num(out.total) == approx(0.5 * 2.0 * merger_value)
    assert out.tokens == 5
    assert torch.isfinite(merger_s.grad).all()
    assert torch.isfinite(deep_s.grad).all()
    assert merger_s.grad[1:4].abs().sum() == 0  # masked rows, whichever side was bad


def test_nonfinite_rows_are_masked_for_cosine():
    # Middle row (NaN in the student) dropped; rows 0 and 1 of the cosine example remain:
    #   (1 + 0) / 2 valid rows = 0.5
    student = tensor([[1.0, 0.0], [NAN, 1.0], [1.0, 1.0]], grad=True)
    teacher = tensor([[0.0, 1.0], [1.0, 1.0], [2.0, 2.0]])

    out = vision_kd_loss(
        {"merger": student}, {"merger": teacher}, weights={"merger": 1.0}, distance="cosine", scale=1.0
    )
    out.total.backward()

    assert num(out.total) == approx(0.5)
    assert bad_row_counts(out) == {"student": {"merger": 1}, "teacher": {"merger": 0}}
    assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_all_rows_nonfinite_give_zero_not_nan(kind):
    student = tensor([[1.0, 2.0], [3.0, 4.0]], grad=True)
    teacher = tensor([[NAN, 0.0], [0.0, INF]])

    out = vision_kd_loss({"merger": student}, {"merger": teacher}, weights={"merger": 1.0}, distance=kind, scale=1.0)
    out.total.backward()

    assert num(out.total) == 0.0
    assert bad_row_counts(out) == {"student": {"merger": 0}, "teacher": {"merger": 2}}
    assert torch.equal(student.grad, torch.zeros(2, 2))


def test_teacher_never_receives_gradients():
    student = tensor(MSE_S, grad=True)
    teacher = tensor(MSE_T, grad=True)

    distance = feature_distance(student, teacher, "mse")
    distance.backward()

    assert student.grad is not None
    assert teacher.grad is None


# --- refusals -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("student_shape", "teacher_shape"),
    [((5, 4), (5, 3)), ((5, 4), (4, 4)), ((1, 5, 4), (5, 4))],
    ids=["hidden-size", "row-count", "rank"],
)
def test_shape_mismatch_names_both_shapes(student_shape, teacher_shape):
    with pytest.raises(FeatureMismatchError) as error:
        vision_kd_loss(
            {Target("merger"): torch.zeros(student_shape)},
            {Target("merger"): torch.zeros(teacher_shape)},
            weights={Target("merger"): 1.0},
            distance="mse",
            scale=1.0,
        )

    assert error.value.target == "merger"
    assert error.value.student_shape == student_shape
    assert error.value.teacher_shape == teacher_shape
    assert str(error.value) == (
        f"vision KD target 'merger': student features {list(student_shape)} "
        f"do not match teacher features {list(teacher_shape)}"
    )
    assert isinstance(error.value, ValueError)


@pytest.mark.parametrize("shape", [(4,), (), (3, 0)], ids=["1-d", "0-d", "no-hidden"])
def test_features_without_rows_of_hidden_values_are_a_mismatch(shape):
    # Equal shapes, but nothing to compare row by row: [..., tokens, hidden] with hidden > 0 is required.
    target = Target("deepstack", 1)
    with pytest.raises(FeatureMismatchError) as error:
        vision_kd_loss(
            {target: torch.zeros(shape)}, {target: torch.zeros(shape)}, weights={target: 1.0}, distance="mse", scale=1.0
        )
    assert (error.value.target, error.value.student_shape, error.value.teacher_shape) == ("deepstack_1", shape, shape)
    with pytest.raises(FeatureMismatchError):
        feature_distance(torch.zeros(shape), torch.zeros(shape), "cosine")


@pytest.mark.parametrize("missing_side", ["student", "teacher"])
def test_target_on_one_side_only_is_a_mismatch(missing_side):
    full = {Target("merger"): torch.zeros(2, 4), Target("deepstack", 0): torch.zeros(2, 4)}
    partial = {Target("merger"): torch.zeros(2, 4)}
    student, teacher = (partial, full) if missing_side == "student" else (full, partial)

    with pytest.raises(FeatureMismatchError, match=r"'deepstack_0'.*missing") as error:
        vision_kd_loss(student, teacher, weights=dict.fromkeys(full, 1.0), distance="mse", scale=1.0)

    shapes = {"student": error.value.student_shape, "teacher": error.value.teacher_shape}
    assert error.value.target == "deepstack_0"
    assert shapes[missing_side] is None
    assert shapes[{"student": "teacher", "teacher": "student"}[missing_side]] == (2, 4)


def test_shapes_are_checked_before_any_arithmetic(monkeypatch):
    # A mismatch in the last target must refuse before the first target's distance is computed.
    def must_not_run(*_args, **_kwargs):
        raise AssertionError("distance computed before every shape was checked")

    monkeypatch.setitem(loss.ROW_DISTANCES, "mse", must_not_run)
    with pytest.raises(FeatureMismatchError, match="'deepstack_0'"):
        vision_kd_loss(
            {Target("merger"): torch.zeros(2, 4), Target("deepstack", 0): torch.zeros(2, 4)},
            {Target("merger"): torch.zeros(2, 4), Target("deepstack", 0): torch.zeros(2, 3)},
            weights={Target("merger"): 1.0, Target("deepstack", 0): 1.0},
            distance="mse",
            scale=1.0,
        )


def test_feature_distance_checks_shapes_too():
    with pytest.raises(FeatureMismatchError, match=r"\[3, 2\].*\[3, 5\]"):
        feature_distance(torch.zeros(3, 2), torch.zeros(3, 5), "mse")


def test_no_features_at_all_is_a_mismatch():
    with pytest.raises(FeatureMismatchError) as error:
        vision_kd_loss({}, {}, weights={}, distance="mse", scale=1.0)
    assert (error.value.target, error.value.student_shape, error.value.teacher_shape) == (None, None, None)
    assert str(error.value) == "vision KD target None: student features missing do not match teacher features missing"


def test_distances_table():
    assert loss.DISTANCES == ("mse", "cosine", "nmse", "relation")
    assert (*loss.ROW_DISTANCES, *loss.RELATION_DISTANCES) == loss.DISTANCES


# --- device discipline -------------------------------------------------------------------------------


def test_loss_module_has_no_parameters():
    modules = [value for value in vars(loss).values() if isinstance(value, type)]

    assert not any(issubclass(value, torch.nn.Module) for value in modules)


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_no_host_sync(kind, monkeypatch):
    student = {"merger": tensor([[1.0, NAN], [3.0, 4.0]], grad=True), "deepstack_0": torch.zeros(0, 2)}
    teacher = {"merger": tensor([[1.0, 0.0], [0.0, INF]]), "deepstack_0": torch.zeros(0, 2)}

    def sync(*_args, **_kwargs):
        raise AssertionError("host sync inside loss.py")

    for name in ("item", "__bool__", "__float__", "__int__", "__index__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    with pytest.raises(AssertionError, match="host sync"):
        bool(torch.ones(()))  # the trap is armed

    out = vision_kd_loss(student, teacher, weights={"merger": 1.0, "deepstack_0": 1.0}, distance=kind, scale=1.0)
    monkeypatch.undo()

    assert num(out.total) == 0.0  # both merger rows masked, deepstack empty
    assert bad_row_counts(out) == {
        "student": {"merger": 1, "deepstack_0": 0},
        "teacher": {"merger": 1, "deepstack_0": 0},
    }


# --- real model: gradients reach the student's vision side only ---------------------------------------

KINDS = ("merger", "deepstack")
MERGER = Target("merger")
DEEPSTACK_0 = Target("deepstack", 0)
DEEPSTACK_1 = Target("deepstack", 1)


@pytest.fixture(scope="module")
def kd_models():
    student = models.build_qwen3_vl(seed=0)
    teacher = models.build_qwen3_vl(seed=1).requires_grad_(False)
    inputs = kit_inputs.forward_inputs(student.config, n_images=2, seed=11)
    return student, teacher, inputs


def kd_backward(student, teacher, inputs, corrupt_teacher_row: int | None = None) -> LossOutput:
    """One GKD-shaped step: student forward, teacher forward under no_grad, KD term alone."""
    capture = FeatureCapture(student, teacher, KINDS)
    capture.attach()
    try:
        with capture.window():
            student(**inputs)
            with torch.no_grad():
                teacher(**inputs)
            features = capture.take()
            teacher_features = dict(features[TEACHER])
            if corrupt_teacher_row is not None:
                corrupted = teacher_features[MERGER].clone()
                corrupted[corrupt_teacher_row] = NAN
                teacher_features[MERGER] = corrupted
            out = vision_kd_loss(
                features[STUDENT],
                teacher_features,
                weights=dict.fromkeys(features[STUDENT], 1.0),
                distance="mse",
                scale=0.5,
            )
            student.zero_grad(set_to_none=True)
            out.total.backward()
    finally:
        capture.detach()
    return out


def grad_norm(module: torch.nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


def test_kd_term_trains_the_student_vision_side_only(kd_models):
    student, teacher, inputs = kd_models

    out = kd_backward(student, teacher, inputs)

    assert math.isfinite(num(out.total))
    assert num(out.total) > 0
    assert list(out.per_target) == [MERGER, DEEPSTACK_0, DEEPSTACK_1]
    assert bad_row_counts(out) == {
        "student": dict.fromkeys(out.per_target, 0),
        "teacher": dict.fromkeys(out.per_target, 0),
    }
    assert out.tokens == 8  # 2 images x 4 merged tokens
    visual = student.model.visual
    for name, module in [
        ("merger", visual.merger),
        ("deepstack_0", visual.deepstack_merger_list[0]),
        ("deepstack_1", visual.deepstack_merger_list[1]),
        ("block_0", visual.blocks[0]),
        ("block_2", visual.blocks[2]),
        ("patch_embed", visual.patch_embed),
    ]:
        assert grad_norm(module) > 0, name
    assert grad_norm(student.model.language_model) == 0
    assert grad_norm(student.lm_head) == 0
    assert all(p.grad is None for p in teacher.parameters())


def test_nan_teacher_features_keep_student_grads_finite(kd_models):
    student, teacher, inputs = kd_models

    out = kd_backward(student, teacher, inputs, corrupt_teacher_row=3)

    assert math.isfinite(num(out.total))
    assert bad_row_counts(out) == {
        "student": {MERGER: 0, DEEPSTACK_0: 0, DEEPSTACK_1: 0},
        "teacher": {MERGER: 1, DEEPSTACK_0: 0, DEEPSTACK_1: 0},
    }
    grads = [p.grad for p in student.model.visual.parameters() if p.grad is not None]
    assert grads
    assert all(torch.isfinite(g).all() for g in grads)
    assert grad_norm(student.model.visual.merger) > 0
