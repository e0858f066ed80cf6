"""The family table against the real thing, in process and before any weights: each kit family's saved
config.json, ms-swift's own model-architecture registry (MultiModelKeys) and the module tree transformers
builds on the meta device. Every family the table calls fit must resolve its `merger` target from the registry
path; every pair that cannot work must be refused by the preflight the run calls, with the reason.
"""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch
import transformers
from swift.model import MODEL_MAPPING
from swift.model.model_arch import get_model_arch

from vkd_shim import families, pairing, preflight, swift_layouts, targets
from vkd_shim.config import resolve
from vkd_shim.schema import VisualKDConfig
from vkd_shim.testing import models, other_families, qwen_families

#: kit family -> (its config builder, the kinds its config.json says it has).
CONFIGS = {
    "qwen3_vl": (models.qwen3_vl_config, ("merger", "vit", "deepstack")),
    "qwen3_vl_moe": (qwen_families.qwen3_vl_moe_config, ("merger", "vit", "deepstack")),
    "qwen3_5": (qwen_families.qwen3_5_config, ("merger", "vit")),
    "qwen3_5_moe": (qwen_families.qwen3_5_moe_config, ("merger", "vit")),
    "qwen2_vl": (qwen_families.qwen2_vl_config, ("merger", "vit")),
    "qwen2_5_vl": (qwen_families.qwen2_5_vl_config, ("merger", "vit")),
    "gemma3_vision": (other_families.gemma3_config, ("merger", "vit")),
    "internvl": (other_families.internvl_config, ("merger", "vit")),
    "glm4v": (other_families.glm4v_config, ("merger", "vit")),
    "llava1_5_hf": (other_families.llava_config, ("merger", "vit")),
}


def save_config(path: Path, config) -> str:
    """config.json as a checkpoint's: naming its architecture, as the model's save_pretrained writes it."""
    config.architectures = [transformers.AutoModelForImageTextToText._model_mapping[type(config)].__name__]
    config.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, str]:
    """kit family -> a directory holding only its config.json, as every check before loading reads it."""
    root = tmp_path_factory.mktemp("configs")
    out = {}
    for family, (build, _) in CONFIGS.items():
        out[family] = save_config(root / family, build())
    return out


def args_for(student: str, teacher: str, model_type: str | None = None, **overrides) -> types.SimpleNamespace:
    """What ms-swift's RLHFArguments hold for the checks: the student's registry entry comes with its model_meta."""
    arch = MODEL_MAPPING[model_type].model_arch if model_type else None
    values = dict(
        rlhf_type="gkd",
        model=student,
        teacher_model=teacher,
        teacher_model_server=None,
        fsdp=None,
        freeze_aligner=False,
        freeze_vit=True,
        tuner_type="lora",
        model_meta=types.SimpleNamespace(model_arch=arch),
    )
    return types.SimpleNamespace(**{**values, **overrides})


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_each_fit_family_resolves_its_merger_from_the_ms_swift_registry(family, saved):
    document = pairing.read_config(saved[family])
    name = families.architecture(document)
    assert families.family(name) is not None and families.unfit_reason(name) is None, name
    assert family in families.family(name).model_types
    assert pairing.available(document) == CONFIGS[family][1]
    aligner = get_model_arch(MODEL_MAPPING[family].model_arch.arch_name).aligner
    with torch.device("meta"):
        model = transformers.AutoModelForImageTextToText.from_config(
            transformers.AutoConfig.from_pretrained(saved[family])
        )
    model.model_meta = MODEL_MAPPING[family]
    declared = swift_layouts.aligner_paths(model)
    paths = targets.target_paths(model, ["merger"], aligner=declared)
    assert paths == {targets.Target("merger"): next(p for p in ([aligner] if isinstance(aligner, str) else aligner))}
    assert preflight.check(args_for(saved[family], saved[family], family), resolve(environ={}).config) == []


@pytest.mark.parametrize(
    ("student", "teacher", "match"),
    [
        ("qwen3_vl", "qwen3_5", "vocabularies differ (vocab_size 151936 vs 248320)"),
        ("gemma3_vision", "glm4v", "the student is a Gemma 3 and the teacher a GLM-4.1V"),
        ("qwen2_5_vl", "qwen3_vl", "patch_size 14 vs 16"),
        ("internvl", "qwen3_vl", "the student is a InternVL and the teacher a Qwen3-VL"),
    ],
)
def test_pairs_that_cannot_work_are_refused_with_the_reason(student, teacher, match, saved):
    refusals = preflight.check(args_for(saved[student], saved[teacher], student), resolve(environ={}).config)
    assert any(match in refusal.reason for refusal in refusals), refusals


def test_a_named_target_the_family_lacks_is_refused_and_an_optional_one_left_out(saved):
    pair = args_for(saved["qwen3_5"], saved["qwen3_5_moe"], "qwen3_5")
    named = resolve(environ={}, inline={"targets": ["merger", "deepstack"]}).config
    refusals = preflight.check(pair, named)
    assert [r.reason.split(" /")[0] for r in refusals] == [
        "targets include deepstack but the student",
        "targets include deepstack but the teacher",
    ]
    assert all("has no deepstack mergers" in r.reason and "optional_targets" in r.fix for r in refusals)
    defaults = resolve(environ={}).config
    assert preflight.check(pair, defaults) == []
    (note,) = preflight.notes(pair, defaults)
    expected = "student Qwen3_5ForConditionalGeneration and teacher Qwen3_5MoeForConditionalGeneration have none"
    assert note == f"optional target(s) deepstack left out: {expected} (custom.visual_kd.optional_targets)"


@pytest.mark.parametrize(
    ("config_class", "arch", "match"),
    [
        # transformers builds it; its projector output is unpadded and gains image_newline rows.
        ("LlavaOnevisionConfig", "llava_hf", "unpadded and interleaved with image_newline rows"),
        # PaliGemma's projector may well fit, but nobody has run it: not assumed.
        ("PaliGemmaConfig", "llava_hf", "has not verified that its aligner (model.multi_modal_projector)"),
    ],
)
def test_an_architecture_whose_aligner_does_not_fit_or_was_never_checked_is_refused(
    config_class, arch, match, tmp_path
):
    path = save_config(tmp_path / "model", getattr(transformers, config_class)())
    args = args_for(path, path, model_meta=types.SimpleNamespace(model_arch=get_model_arch(arch)))
    refusals = preflight.check(args, VisualKDConfig(targets=["merger"]))
    named = config_class.removesuffix("Config")
    assert any(match in r.reason and named in r.reason for r in refusals), refusals
    assert all(r.fix for r in refusals)


@pytest.mark.parametrize(
    ("arch", "match"),
    [
        ("minicpmv", "its aligner 'resampler' is a resampler"),
        ("chatglm4v", "ms-swift records no aligner for it"),
        ("midashenglm", "projects an audio tower"),
    ],
)
def test_the_registry_entry_names_why_an_unknown_architecture_does_not_fit(arch, match):
    aligner = get_model_arch(arch).aligner
    aligner = [aligner] if isinstance(aligner, str) else list(aligner or [])
    assert match in families.unfit_reason("SomeRemoteCodeModel", aligner)


def test_what_a_projector_depends_on_is_the_registry_vision_tower_not_the_projector_parent(saved):
    """In the LLaVA layout (Gemma 3, InternVL) the projector's parent is the whole model: a trainable language model
    must not count as upstream of the aligner, or a constant term would pass the frozen check."""
    with torch.device("meta"):
        model = transformers.AutoModelForImageTextToText.from_config(
            transformers.AutoConfig.from_pretrained(saved["gemma3_vision"])
        )
    model.model_meta = MODEL_MAPPING["gemma3_vision"]
    aligner, tower = swift_layouts.aligner_paths(model), swift_layouts.vision_tower_paths(model)
    assert tower == ["model.vision_tower"]
    wanted = [targets.Target("merger"), targets.Target("vit")]
    for name, parameter in model.named_parameters():
        parameter.requires_grad = name.startswith("model.language_model.")
    assert targets.frozen_targets(model, wanted, aligner, tower) == wanted
    assert targets.frozen_targets(model, wanted, aligner) == [], "the parent fallback counts the LM as upstream"
    model.get_submodule("model.vision_tower").requires_grad_(True)
    assert targets.frozen_targets(model, wanted, aligner, tower) == []
