"""Capture on real (tiny) Qwen-VL module trees: what fires, what is kept, and for how long."""

from __future__ import annotations

import ast
import gc
import importlib.util
import json
import pathlib
import pickle
import subprocess
import sys
import weakref

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from vkd_shim import targets as targets_module
from vkd_shim.capture import STUDENT, TEACHER, FeatureCapture
from vkd_shim.errors import CaptureError, RoleUnknownError, TargetResolutionError
from vkd_shim.targets import Target, frozen_targets, resolve_targets, unwrap, upstream_parameters, vision_tower
from vkd_shim.testing import inputs as kit_inputs
from vkd_shim.testing import models

KINDS = ("merger", "deepstack")  # the aligner outputs; vit has its own tests
MERGER = Target("merger")
DEEPSTACK_0 = Target("deepstack", 0)
DEEPSTACK_1 = Target("deepstack", 1)
TARGETS = [MERGER, DEEPSTACK_0, DEEPSTACK_1]


@pytest.fixture(scope="module")
def student() -> nn.Module:
    return models.build_qwen3_vl(seed=0)


@pytest.fixture(scope="module")
def teacher() -> nn.Module:
    return models.build_qwen3_vl(seed=1)


@pytest.fixture(scope="module")
def qwen2_5() -> nn.Module:
    return models.build_qwen2_5_vl(seed=0)


@pytest.fixture(scope="module")
def vision(student):
    return kit_inputs.vision_inputs(student.config, n_images=2, seed=3)


@pytest.fixture
def make_capture():
    """Builds captures and detaches them all at teardown: the models are shared by the module."""
    made: list[FeatureCapture] = []

    def make(*args, **kwargs) -> FeatureCapture:
        capture = FeatureCapture(*args, **kwargs)
        made.append(capture)
        return capture

    yield make
    for capture in made:
        capture.detach()


class Wrapper(nn.Module):
    """Stands in for DDP / a DeepSpeed engine: the wrapped model sits at `.module`."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def image_features(model: nn.Module, vision: dict) -> dict[Target, torch.Tensor]:
    """What the language model receives: merger and deepstack outputs, all images concatenated."""
    with torch.no_grad():
        out = model.model.get_image_features(**vision)
    features = {MERGER: torch.cat(out.pooler_output)}
    for index, per_image in enumerate(out.deepstack_features):
        features[Target("deepstack", index)] = torch.cat(per_image)
    return features


def count_hooks(model: nn.Module) -> int:
    return sum(len(module._forward_hooks) for module in model.modules())


def swift_declared_aligner(arch: str) -> list[str]:
    """The aligner paths the installed ms-swift declares for `arch`, read from its source.

    Parsing instead of importing keeps ms-swift (and its import-time side effects) out of this
    test process while still following whatever the installed version declares.
    """
    package = importlib.util.find_spec("swift")
    source = pathlib.Path(next(iter(package.submodule_search_locations)), "model", "model_arch.py")
    for node in ast.walk(ast.parse(source.read_text())):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "MultiModelKeys"
            and node.args
            and ast.unparse(node.args[0]) == f"MLLMModelArch.{arch}"
        ):
            for keyword in node.keywords:
                if keyword.arg == "aligner":
                    value = ast.literal_eval(keyword.value)
                    return [value] if isinstance(value, str) else value
    raise LookupError(f"ms-swift declares no aligner for {arch}")


# --- targets ----------------------------------------------------------------------------------


def test_target_is_a_value_with_a_metric_name():
    assert (*KINDS, "vit") == targets_module.KINDS
    assert (MERGER.kind, MERGER.index, MERGER.name) == ("merger", None, "merger")
    assert (DEEPSTACK_1.kind, DEEPSTACK_1.index, DEEPSTACK_1.name) == ("deepstack", 1, "deepstack_1")
    assert Target("deepstack", 1) == DEEPSTACK_1
    assert Target("deepstack", 0) != DEEPSTACK_1
    assert {Target("merger"): 1}[MERGER] == 1  # hashable by value: a key across capture, loss and runtime
    assert pickle.loads(pickle.dumps(DEEPSTACK_0)) == DEEPSTACK_0
    assert [t.name for t in TARGETS] == ["merger", "deepstack_0", "deepstack_1"]


# --- resolution -----------------------------------------------------------------------------


def test_resolves_merger_and_every_deepstack_layer(student):
    targets = resolve_targets(student, KINDS)

    assert list(targets) == TARGETS
    assert targets[MERGER] is student.model.visual.merger
    assert targets[DEEPSTACK_0] is student.model.visual.deepstack_merger_list[0]
    assert targets[DEEPSTACK_1] is student.model.visual.deepstack_merger_list[1]


def test_deepstack_layer_subset(student):
    targets = resolve_targets(student, ["deepstack"], deepstack_layers=[1])

    assert list(targets) == [DEEPSTACK_1]
    assert targets[DEEPSTACK_1] is student.model.visual.deepstack_merger_list[1]


@pytest.mark.parametrize("layer", [2, -1])
def test_out_of_range_deepstack_layer_is_refused(student, layer):
    with pytest.raises(TargetResolutionError) as error:
        resolve_targets(student, KINDS, deepstack_layers=[0, layer])

    message = str(error.value)
    assert f"deepstack layer {layer}" in message
    assert "Qwen3VLForConditionalGeneration" in message
    assert "valid layers are 0..1" in message


def test_unknown_kind_is_refused(student):
    with pytest.raises(TargetResolutionError, match=r"allowed kinds are \['merger', 'deepstack', 'vit'\]"):
        resolve_targets(student, ["merger", "projector"])


def test_qwen2_5_vl_has_a_merger_but_no_deepstack(qwen2_5):
    assert resolve_targets(qwen2_5, ["merger"]) == {MERGER: qwen2_5.model.visual.merger}

    with pytest.raises(TargetResolutionError) as error:
        resolve_targets(qwen2_5, KINDS)

    message = str(error.value)
    assert "Qwen2_5_VLForConditionalGeneration" in message
    assert "requested target 'deepstack'" in message
    assert "merger at 'model.visual.merger'" in message
    assert "0 deepstack mergers" in message


def test_qwen2_5_vl_merger_capture_equals_image_features(qwen2_5, make_capture):
    # 56x56 px at patch 14 -> 4x4 patches -> 4 tokens, inside one 112 px attention window, so
    # Qwen2.5-VL's window reordering leaves the merger rows in the order the LM receives them.
    vision = kit_inputs.vision_inputs(qwen2_5.config, n_images=2, image_hw=(56, 56), seed=4)
    with torch.no_grad():
        expected = torch.cat(qwen2_5.model.get_image_features(**vision).pooler_output)
    capture = make_capture(qwen2_5, None, ["merger"])
    capture.attach()

    with capture.window(), capture.role(STUDENT), torch.no_grad():
        qwen2_5.model.get_image_features(**vision)
        taken = capture.take()

    assert taken[STUDENT][MERGER].shape == (8, 64)
    torch.testing.assert_close(taken[STUDENT][MERGER], expected, rtol=0, atol=0)


def test_resolves_through_peft_and_ddp_like_wrappers():
    model = models.build_qwen3_vl(seed=0)
    merger = model.model.visual.merger
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    wrapped = Wrapper(Wrapper(peft_model))

    assert unwrap(wrapped) is model
    targets = resolve_targets(wrapped, KINDS)
    assert targets[MERGER] is merger
    assert targets[DEEPSTACK_1] is model.model.visual.deepstack_merger_list[1]


def test_swift_declared_aligner_paths_resolve(student):
    declared = swift_declared_aligner("qwen3_vl")

    assert declared == ["model.visual.merger", "model.visual.deepstack_merger_list"]
    assert resolve_targets(student, KINDS, aligner=declared) == resolve_targets(student, KINDS)


def test_declared_aligner_wins_over_the_qwen_layout(student):
    # A single non-list module declared as aligner is the merger, even where the Qwen fallback
    # path would find a different module.
    targets = resolve_targets(student, ["merger"], aligner=["model.visual.deepstack_merger_list.0"])

    assert targets[MERGER] is student.model.visual.deepstack_merger_list[0]


def test_several_declared_modules_prefer_the_one_named_merger(student):
    # Omni-style declarations list audio projectors beside the visual merger.
    aligner = ["model.visual.blocks.0.mlp", "model.visual.merger", "model.visual.deepstack_merger_list"]

    assert resolve_targets(student, KINDS, aligner=aligner) == resolve_targets(student, KINDS)


def test_ambiguous_declared_aligner_is_refused(student):
    with pytest.raises(TargetResolutionError, match="ambiguous 'merger' aligner"):
        resolve_targets(student, ["merger"], aligner=["model.visual.blocks.0.mlp", "model.visual.blocks.1.mlp"])


def test_resolution_errors_are_lookup_errors(student):
    with pytest.raises(LookupError, match=r"valid layers are 0\.\.1"):
        resolve_targets(student, ["deepstack"], deepstack_layers=[5])


# --- vision tower -----------------------------------------------------------------------------


def test_vision_tower_is_the_module_holding_the_merger(student, qwen2_5):
    tower = vision_tower(student)
    assert tower is student.model.visual
    # Everything the captured outputs depend on lives under it: blocks, patch embedding, mergers.
    owned = {id(p) for p in tower.parameters()}
    for module in (
        student.model.visual.merger,
        student.model.visual.deepstack_merger_list[1],
        student.model.visual.blocks[0],
        student.model.visual.patch_embed,
    ):
        assert all(id(p) in owned for p in module.parameters())
    assert not any(id(p) in owned for p in student.model.language_model.parameters())
    assert vision_tower(qwen2_5) is qwen2_5.model.visual


def test_vision_tower_follows_declared_paths_wrappers_and_the_legacy_layout(student):
    declared = ["model.visual.merger", "model.visual.deepstack_merger_list"]
    assert vision_tower(student, aligner=declared) is student.model.visual
    model = models.build_qwen3_vl(seed=0)
    wrapped = Wrapper(get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])))
    assert vision_tower(wrapped) is model.model.visual
    legacy = legacy_layout(TupleMerger())
    assert vision_tower(legacy) is legacy.visual


def test_vision_tower_of_a_model_without_aligner_is_none():
    text_only = nn.Sequential(nn.Linear(2, 2))
    assert vision_tower(text_only) is None
    assert vision_tower(text_only, aligner=["0.missing"]) is None


def test_teacher_with_fewer_deepstack_layers_is_refused_up_front(student):
    shallow = models.build_qwen3_vl(
        seed=1, config=models.qwen3_vl_config(vision_config={"deepstack_visual_indexes": [0]})
    )

    with pytest.raises(TargetResolutionError, match="differ from teacher targets"):
        FeatureCapture(student, shallow, KINDS)


# --- recording --------------------------------------------------------------------------------


def test_hooks_fire_once_per_target_per_vision_call(student, teacher, vision, make_capture):
    capture = make_capture(student, teacher, KINDS)
    capture.attach()

    with capture.window(), torch.no_grad():
        student.model.get_image_features(**vision)
        assert capture.calls == {(STUDENT, target): 1 for target in TARGETS}
        student.model.get_image_features(**vision)
        assert capture.calls == {(STUDENT, target): 2 for target in TARGETS}


def test_captures_equal_what_the_language_model_receives(student, teacher, vision, make_capture):
    expected = image_features(student, vision)
    capture = make_capture(student, teacher, KINDS)
    capture.attach()

    with capture.window(), torch.no_grad():
        student.model.get_image_features(**vision)
        taken = capture.take()

    assert list(taken) == [STUDENT]
    assert list(taken[STUDENT]) == TARGETS
    # 2 images of 4x4 patches, 2x2 merge -> 2 * 4 = 8 token rows of out_hidden_size 64.
    assert taken[STUDENT][MERGER].shape == (8, 64)
    for target in TARGETS:
        torch.testing.assert_close(taken[STUDENT][target], expected[target], rtol=0, atol=0)


def test_separate_teacher_capture_equals_teacher_alone(student, teacher, vision, make_capture):
    expected = image_features(teacher, vision)
    capture = make_capture(student, teacher, KINDS)
    capture.attach()
    assert not capture.shared

    with capture.window(), torch.no_grad():
        student.model.get_image_features(**vision)
        teacher.model.get_image_features(**vision)
        taken = capture.take()

    for target in TARGETS:
        torch.testing.assert_close(taken[TEACHER][target], expected[target], rtol=0, atol=0)
    assert not torch.allclose(taken[TEACHER][MERGER], taken[STUDENT][MERGER])


def test_unshared_module_trusts_its_owner_over_the_role(student, teacher, vision, make_capture):
    capture = make_capture(student, teacher, ["merger"])
    capture.attach()

    with capture.window(), torch.no_grad(), capture.role(TEACHER):
        student.model.get_image_features(**vision)
        assert capture.calls == {(STUDENT, MERGER): 1}


def test_full_forward_captures_for_the_student(student, teacher, make_capture):
    inputs = kit_inputs.forward_inputs(student.config, n_images=2, seed=5)
    expected = image_features(student, {k: inputs[k] for k in ("pixel_values", "image_grid_thw")})
    capture = make_capture(student, teacher, KINDS)
    capture.attach()

    with capture.window():
        output = student(**inputs)
        taken = capture.take()
        assert capture.calls == {(STUDENT, target): 1 for target in TARGETS}

    assert torch.isfinite(output.loss)
    for target in TARGETS:
        torch.testing.assert_close(taken[STUDENT][target], expected[target])
        assert taken[STUDENT][target].grad_fn is not None


def test_image_and_video_forward_concatenates_calls_in_order(student, teacher, make_capture):
    inputs = kit_inputs.forward_inputs(student.config, n_images=1, n_videos=1, seed=7)
    with torch.no_grad():
        images = student.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        videos = student.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    capture = make_capture(student, teacher, KINDS)
    capture.attach()

    with capture.window(), torch.no_grad():
        student(**inputs)
        calls = capture.calls
        taken = capture.take()

    # Without DeepSpeed the tower runs once for images and once for videos.
    assert calls == {(STUDENT, target): 2 for target in TARGETS}
    # 1 image (4x4 patches) -> 4 tokens; 1 video of 4 frames (2x4x4 patches) -> 8 tokens.
    assert taken[STUDENT][MERGER].shape == (12, 64)
    expected_merger = torch.cat([*images.pooler_output, *videos.pooler_output])
    torch.testing.assert_close(taken[STUDENT][MERGER], expected_merger)
    expected_deepstack = torch.cat([*images.deepstack_features[1], *videos.deepstack_features[1]])
    torch.testing.assert_close(taken[STUDENT][DEEPSTACK_1], expected_deepstack)


def test_teacher_features_are_detached_student_keep_their_graph(student, teacher, vision, make_capture):
    capture = make_capture(student, teacher, ["merger"])
    capture.attach()

    with capture.window():
        student.model.get_image_features(**vision)
        teacher.model.get_image_features(**vision)  # grad mode on: only the role detaches it
        taken = capture.take()

    assert taken[STUDENT][MERGER].grad_fn is not None
    assert taken[TEACHER][MERGER].grad_fn is None
    assert not taken[TEACHER][MERGER].requires_grad


# --- nothing outside the window ----------------------------------------------------------------


def test_nothing_recorded_outside_a_window_including_generate(student, teacher, make_capture):
    inputs = kit_inputs.forward_inputs(student.config, n_images=1, seed=9)
    inputs.pop("labels")
    fired: list[int] = []
    witness = student.model.visual.merger.register_forward_hook(lambda *_: fired.append(1))
    capture = make_capture(student, teacher, KINDS)
    capture.attach()
    try:
        with torch.no_grad():
            student(**inputs)
            generated = student.generate(**inputs, max_new_tokens=3, do_sample=False)
    finally:
        witness.remove()

    assert generated.shape[1] == inputs["input_ids"].shape[1] + 3
    assert len(fired) == 2  # the merger ran in the forward and in generate's prefill
    assert capture.calls == {}
    with capture.window():
        assert capture.take() == {}
    with pytest.raises(CaptureError, match="outside a window"):
        capture.take()


def test_window_exit_drops_every_reference(student, teacher, vision, make_capture):
    capture = make_capture(student, teacher, ["merger"])
    capture.attach()

    with capture.window(), torch.no_grad():
        student.model.get_image_features(**vision)  # result discarded: the store holds the only ref
        captured = weakref.ref(capture.take()[STUDENT][MERGER])
        assert captured() is not None

    gc.collect()
    assert captured() is None
    assert capture.calls == {}


def test_window_exit_clears_after_an_exception(student, teacher, vision, make_capture):
    capture = make_capture(student, teacher, ["merger"])
    capture.attach()

    with pytest.raises(ZeroDivisionError), capture.window(), torch.no_grad():
        student.model.get_image_features(**vision)
        assert capture.calls == {(STUDENT, MERGER): 1}
        _ = 1 / 0

    assert capture.calls == {}
    with torch.no_grad():
        student.model.get_image_features(**vision)
    assert capture.calls == {}  # disarmed again: the failed window did not leave recording on


def test_windows_do_not_nest_and_need_hooks(student, teacher, make_capture):
    capture = make_capture(student, teacher, ["merger"])
    with pytest.raises(CaptureError, match="attach"), capture.window():
        pass

    capture.attach()
    with capture.window(), pytest.raises(CaptureError, match="already open"), capture.window():
        pass


# --- hook lifecycle ---------------------------------------------------------------------------


def test_attach_twice_registers_and_records_once(student, teacher, vision, make_capture):
    capture = make_capture(student, teacher, KINDS)
    capture.attach()
    capture.attach()

    assert len(student.model.visual.merger._forward_hooks) == 1
    assert len(teacher.model.visual.merger._forward_hooks) == 1
    assert count_hooks(student) == 3
    with capture.window(), torch.no_grad():
        student.model.get_image_features(**vision)
        assert capture.calls == {(STUDENT, target): 1 for target in TARGETS}


def test_hooks_hold_only_a_picklable_store(student, teacher, make_capture):
    capture = make_capture(student, teacher, ["merger"])
    capture.attach()

    (hook,) = student.model.visual.merger._forward_hooks.values()
    restored = pickle.loads(pickle.dumps(hook))
    # A closure over the model would drag its parameters along; the store pickles in bytes.
    assert len(pickle.dumps(hook)) < 2000
    assert restored.args[1:] == (MERGER, STUDENT)


def test_detach_leaves_the_model_as_before(student, teacher, vision, make_capture):
    before = {key: value.clone() for key, value in student.state_dict().items()}
    hooks_before = count_hooks(student) + count_hooks(teacher)
    capture = make_capture(student, teacher, KINDS)
    capture.attach()
    with capture.window(), torch.no_grad():
        student.model.get_image_features(**vision)

    capture.detach()

    assert hooks_before == 0
    assert count_hooks(student) == 0
    assert count_hooks(teacher) == 0
    after = student.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert not capture.attached
    with pytest.raises(CaptureError, match="attach"), capture.window():
        pass


# --- self-distillation: one model, two roles --------------------------------------------------


@pytest.fixture(scope="module")
def lora_on_merger():
    """LoRA on the LM's q/v and on the final merger, with random B so adapters change outputs."""
    model = models.build_qwen3_vl(seed=0)
    config = LoraConfig(
        r=4,
        init_lora_weights=False,
        target_modules=r".*language_model.*\.(q_proj|v_proj)|.*visual\.merger\.linear_fc[12]",
    )
    return get_peft_model(model, config)


def test_shared_modules_attribute_by_role(lora_on_merger, vision, make_capture):
    base = image_features(models.build_qwen3_vl(seed=0), vision)
    capture = make_capture(lora_on_merger, lora_on_merger, KINDS)
    capture.attach()
    assert capture.shared
    assert count_hooks(lora_on_merger) == 3  # one hook per shared module, not one per role

    with capture.window():
        with capture.role(STUDENT):
            lora_on_merger.base_model.model.model.get_image_features(**vision)
            with capture.role(TEACHER), lora_on_merger.disable_adapter(), torch.no_grad():
                lora_on_merger.base_model.model.model.get_image_features(**vision)
        taken = capture.take()

    student_merger, teacher_merger = taken[STUDENT][MERGER], taken[TEACHER][MERGER]
    torch.testing.assert_close(teacher_merger, base[MERGER])
    assert not torch.allclose(student_merger, teacher_merger, atol=1e-3)
    # The adapters sit on the final merger only: deepstack outputs agree across roles.
    torch.testing.assert_close(taken[STUDENT][DEEPSTACK_0], taken[TEACHER][DEEPSTACK_0])
    assert student_merger.grad_fn is not None
    assert teacher_merger.grad_fn is None


def test_teacher_none_means_self_distillation(lora_on_merger, make_capture):
    capture = make_capture(lora_on_merger, None, ["merger"])

    assert capture.shared
    assert capture.targets == (MERGER,)


def test_shared_module_without_role_is_reported_from_take(lora_on_merger, vision, make_capture):
    capture = make_capture(lora_on_merger, None, ["merger"])
    capture.attach()

    with capture.window(), torch.no_grad():
        features = lora_on_merger.base_model.model.model.get_image_features(**vision)
        assert torch.cat(features.pooler_output).shape == (8, 64)  # the forward itself succeeded
        with pytest.raises(RoleUnknownError, match=r"no role set \(target -> calls: \{'merger': 1\}\)") as error:
            capture.take()
    assert isinstance(error.value, CaptureError)


def test_role_rejects_unknown_names(lora_on_merger, make_capture):
    capture = make_capture(lora_on_merger, None, ["merger"])

    with pytest.raises(ValueError, match="unknown role 'techer'"), capture.role("techer"):
        pass


# --- output shapes from other transformers versions ---------------------------------------------


class TupleMerger(nn.Module):
    """A merger that returns (features, extra) like some transformers 4.57 vision modules."""

    def __init__(self, as_dict: bool = False) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2, bias=False)
        self.as_dict = as_dict

    def forward(self, x: torch.Tensor):
        out = self.linear(x)
        return {"features": out} if self.as_dict else (out, x.sum())


def legacy_layout(merger: nn.Module) -> nn.Module:
    """`visual.merger` at the top level: the pre-4.52 Qwen-VL layout of the fallback paths."""
    root = nn.Module()
    root.visual = nn.Module()
    root.visual.merger = merger
    return root


def test_tuple_outputs_are_normalized():
    merger = TupleMerger()
    capture = FeatureCapture(legacy_layout(merger), None, ["merger"])
    capture.attach()
    x = torch.tensor([[1.0, 2.0]])

    with capture.window(), capture.role(STUDENT):
        expected = merger(x)[0]
        taken = capture.take()

    torch.testing.assert_close(taken[STUDENT][MERGER], expected)
    capture.detach()


def test_unreadable_outputs_surface_from_take():
    merger = TupleMerger(as_dict=True)
    capture = FeatureCapture(legacy_layout(merger), None, ["merger"])
    capture.attach()

    with capture.window(), capture.role(STUDENT):
        merger(torch.ones(1, 2))
        with pytest.raises(CaptureError, match=r"neither a tensor nor a tuple/list.*'dict'"):
            capture.take()
    capture.detach()


# --- import boundary ---------------------------------------------------------------------------


def test_capture_and_loss_import_no_heavy_dependencies():
    code = (
        "import json, sys\n"
        "import vkd_shim.capture, vkd_shim.loss\n"
        "heavy = ('swift', 'transformers', 'structlog', 'peft')\n"
        "print(json.dumps(sorted(name for name in heavy if name in sys.modules)))\n"
    )
    root = pathlib.Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120, check=True
    )

    assert json.loads(result.stdout) == []


# --- what each target depends on (the trainability check at trainer construction) -------------------


def test_upstream_parameters_follow_the_vision_towers_wiring():
    """Measured, not assumed: the parameters whose gradient a target's feature actually reaches."""
    model = models.build_qwen3_vl(seed=0).train()
    visual = unwrap(model).model.visual
    batch = kit_inputs.vision_inputs(model.config, n_images=1, seed=0)
    for target in [Target("vit"), MERGER, DEEPSTACK_0, DEEPSTACK_1]:
        cap = FeatureCapture(model, None, [target.kind], deepstack_layers=[target.index or 0])
        cap.attach()
        with cap.window(), cap.role(STUDENT):
            visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
            feature = cap.take()[STUDENT][target]
        reached = {
            name for name, p in visual.named_parameters()
            if torch.autograd.grad(feature.square().sum(), p, allow_unused=True, retain_graph=True)[0] is not None
        }  # fmt: skip
        cap.detach()
        declared = _names(visual, model, target)
        assert declared == reached, (target.name, declared ^ reached)
    # deepstack 0 taps block 0: later blocks do not feed it, the merger does not either
    assert not any("blocks.1." in n or n.startswith("merger") for n in _names(visual, model, DEEPSTACK_0))


def _names(visual, model, target):
    return {name for name, p in visual.named_parameters() if any(p is q for q in upstream_parameters(model, target))}


def test_frozen_targets_name_exactly_the_targets_nothing_trainable_feeds():
    model = models.build_qwen3_vl(seed=0)
    visual = unwrap(model).model.visual
    visual.requires_grad_(False)
    targets = [Target("vit"), MERGER, DEEPSTACK_0, DEEPSTACK_1]
    assert frozen_targets(model, targets) == targets
    visual.merger.requires_grad_(True)  # --freeze_aligner false with --freeze_vit true, roughly
    assert frozen_targets(model, targets) == [Target("vit"), DEEPSTACK_0, DEEPSTACK_1]
    visual.blocks[2].requires_grad_(True)  # a late block feeds vit and merger, not the deepstack taps (0, 1)
    assert frozen_targets(model, targets) == [DEEPSTACK_0, DEEPSTACK_1]
    visual.blocks[0].requires_grad_(True)
    assert frozen_targets(model, targets) == []
