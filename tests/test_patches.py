"""Each patch point against the real ms-swift modules of the installed release: installed where the
layout puts it, calls through, removed by unpatch, refuses loudly, and never raises into an import.

Parametrized by the installed layout (``patches.LAYOUT``), so the same file runs under every tested
ms-swift stack (`make test` runs it under 4.6 and under 3.12).
"""

import importlib
import json
import re
import types

import pytest
import wrapt

from vkd_shim import config, doctor, pairing, patches, preflight, swift_layouts, telemetry
from vkd_shim.config import VisualKDConfig
from vkd_shim.errors import PatchError, RefusedError

LAYOUT = patches.LAYOUT
TRAINER_ROLES = (swift_layouts.TRAINER_INIT, swift_layouts.TRAINER_COMPUTE_LOSS, swift_layouts.TRAINER_LOG)


def point(role: str) -> tuple[types.ModuleType, str, str]:
    """(module object, class name, attribute) of a role in the installed layout."""
    module_name, qualname = LAYOUT.points[role]
    owner, _, attr = qualname.rpartition(".")
    return importlib.import_module(module_name), owner, attr


@pytest.fixture
def events(tmp_path, monkeypatch):
    """Event lines from the real sink, parsed; config cache and patcher start empty."""
    path = tmp_path / "events.jsonl"
    monkeypatch.setenv("VKD_LOG_FILE", str(path))
    for name in ("VKD_CONFIG", "VKD_WEIGHT", "VKD_TARGETS", "VKD_DISTANCE", "VKD_INLINE_CONFIG", "VKD_INLINE_SOURCE"):
        monkeypatch.delenv(name, raising=False)
    telemetry.reset_logger()
    patches.reset()

    def read() -> list[dict]:
        telemetry.get_logger().close()
        return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []

    yield read
    patches.reset()
    telemetry.reset_logger()


@pytest.fixture
def trainer_mocks(mocker):
    """Stand-ins for the originals, so a call through the wrapper is observable."""
    module, owner, _ = point(swift_layouts.TRAINER_INIT)
    cls = getattr(module, owner)
    return cls, {point(r)[2]: mocker.patch.object(cls, point(r)[2], autospec=True) for r in TRAINER_ROLES}


def test_installed_release_picks_its_layout_and_passes_the_guard():
    assert swift_layouts.version_problem() is None
    assert LAYOUT.matches(swift_layouts.installed_version())


@pytest.mark.parametrize(
    ("version", "series", "guarded"),
    [
        ("3.12.0", "3.12", False),
        ("4.6.3", "4.6", False),
        ("3.11.3", "3.12", True),  # same major: the 3.x layout, and the guard says it is untested
        ("3.1", "3.12", True),  # "3.1" must not pass as "3.12"
        ("4.5.3", "4.5", False),
        ("4.4.2", "4.4", False),
        ("4.3.2", "4.6", True),  # known incompatible (flat batch): guarded, and refused at preflight
        ("5.0.0", "4.6", True),  # unknown major: the newest layout, guarded
    ],
)
def test_version_to_layout_guard_and_reason(version, series, guarded):
    assert swift_layouts.for_version(version).series == series
    problem = swift_layouts.version_problem(version)
    assert (problem is not None) == guarded
    assert version in swift_layouts.layout_reason(version)
    if guarded:
        assert version in problem and "3.12.x" in problem and "4.6.x" in problem


def test_bootstrap_hooks_every_layout_module_from_the_layouts_themselves():
    """A module of a supported release that the bootstrap does not hook would never be patched."""
    hooked = set(swift_layouts.hook_modules())
    for layout in swift_layouts.LAYOUTS:
        assert set(layout.modules) <= hooked, layout.series
    assert "swift" in hooked


def test_trainer_points_installed_call_through_and_removed(events, trainer_mocks):
    cls, mocks = trainer_mocks
    patches.on_import(importlib.import_module(LAYOUT.trainer_module))
    for attr, original in mocks.items():
        wrapper = vars(cls)[attr]
        assert isinstance(wrapper, patches._VkdWrapper) and wrapper.__wrapped__ is original
    instance = object.__new__(cls)  # no vision KD state: pure pass-through
    inputs = {"model_inputs": {"input_ids": [1]}}
    mocks["compute_loss"].return_value = "loss"
    assert cls.compute_loss(instance, "model", inputs, return_outputs=True) == "loss"
    mocks["compute_loss"].assert_called_once_with(instance, "model", inputs, return_outputs=True)
    cls.log(instance, {"loss": 1.0})
    mocks["log"].assert_called_once_with(instance, {"loss": 1.0})

    patches.unpatch_all()
    for attr, original in mocks.items():
        assert vars(cls)[attr] is original
    applied = [e["target"] for e in events() if e["event"] == "vkd.patch" and e["status"] == "applied"]
    assert applied == [f"{LAYOUT.trainer_module}:{cls.__name__}.{a}" for a in mocks]


def test_second_patch_never_double_wraps(events, trainer_mocks):
    cls, _ = trainer_mocks
    module = importlib.import_module(LAYOUT.trainer_module)
    patches.on_import(module)
    patches.on_import(module)
    assert not isinstance(vars(cls)["compute_loss"].__wrapped__, wrapt.FunctionWrapper)
    assert [e["status"] for e in events() if e["event"] == "vkd.patch"].count("skipped") == 3


def test_pipeline_and_cli_points(events, mocker):
    pipeline, owner, attr = point(swift_layouts.PIPELINE_PREFLIGHT)
    cli, _, cli_attr = point(swift_layouts.CLI_YAML)
    prepare = mocker.patch.object(getattr(pipeline, owner), attr, autospec=True)
    parse = mocker.patch.object(cli, cli_attr)
    patches.on_import(pipeline)
    patches.on_import(cli)
    assert vars(getattr(pipeline, owner))[attr].__wrapped__ is prepare
    assert vars(cli)[cli_attr].__wrapped__ is parse
    patches.unpatch_all()
    assert vars(getattr(pipeline, owner))[attr] is prepare
    assert vars(cli)[cli_attr] is parse


def test_missing_point_applies_nothing_and_raises_from_our_code(events):
    class GKDTrainer:  # a drifted ms-swift: compute_loss renamed
        def __init__(self):
            pass

        def log(self, logs):
            pass

    fake = types.ModuleType(LAYOUT.trainer_module)
    fake.GKDTrainer = GKDTrainer
    patches.on_import(fake)  # must not raise into the import
    assert not isinstance(vars(GKDTrainer)["__init__"], wrapt.FunctionWrapper)  # all-or-nothing
    with pytest.raises(PatchError, match=r"GKDTrainer\.compute_loss not found") as err:
        patches.PATCHER.raise_failures()
    assert f"ms-swift {swift_layouts.installed_version()}" in str(err.value)
    failed = [e for e in events() if e["event"] == "vkd.patch" and e["status"] == "failed"]
    assert [e["target"] for e in failed] == [f"{LAYOUT.trainer_module}:GKDTrainer.compute_loss"]
    assert failed[0]["swift_version"] == swift_layouts.installed_version()


def test_exception_inside_hook_is_recorded_not_raised(events, mocker):
    mocker.patch.object(patches.PATCHER, "apply", side_effect=RuntimeError("boom"))
    patches.on_import(importlib.import_module(LAYOUT.trainer_module))
    with pytest.raises(PatchError, match="boom"):
        patches.PATCHER.raise_failures()
    assert any(e["event"] == "vkd.patch" and "boom" in e["reason"] for e in events())


def test_switch_value_that_is_neither_on_nor_off_stops_the_first_wrapper(events, mocker):
    """VKD_ENABLE=2 activates carrying the error, and the pipeline wrapper raises it before any load."""
    from vkd_shim.errors import ConfigError

    error = ConfigError("invalid vision-KD switch: VKD_ENABLE = '2'", field="VKD_ENABLE")
    patches.on_import(types.ModuleType("swift"), [error])
    original = mocker.Mock()
    with pytest.raises(PatchError, match="VKD_ENABLE = '2'"):
        patches._wrap_prepare_model_tokenizer(original, types.SimpleNamespace(args=rlhf_args()), (), {})
    original.assert_not_called()


def test_version_guard_event(events, mocker):
    mocker.patch.object(swift_layouts, "installed_version", return_value="3.11.3")
    patches.on_import(types.ModuleType("swift"))
    (guard,) = [e for e in events() if e["event"] == "vkd.version"]
    assert "3.11.3" in guard["problem"] and guard["level"] == "warning"
    (activate,) = [e for e in events() if e["event"] == "vkd.activate"]
    assert "3.11.3" in activate["layout_reason"]


def test_a_known_incompatible_release_is_refused_before_any_model_loads(events, mocker):
    mocker.patch.object(swift_layouts, "installed_version", return_value="4.3.2")
    original = mocker.Mock()
    with pytest.raises(RefusedError, match=r"ms-swift 4\.3\.2 is not supported: .*flat batch"):
        patches._wrap_prepare_model_tokenizer(original, types.SimpleNamespace(args=rlhf_args()), (), {})
    original.assert_not_called()


def test_supported_version_has_no_guard_event(events):
    patches.on_import(types.ModuleType("swift"))
    names = [e["event"] for e in events()]
    assert "vkd.activate" in names and "vkd.version" not in names


def rlhf_args(**overrides):
    values = dict(
        rlhf_type="gkd",
        teacher_model="/models/teacher",
        teacher_model_server=None,
        fsdp=None,
        model_dir=None,
        freeze_aligner=False,
        freeze_vit=True,
        _teacher_use_disable_adapter=False,
    )
    values.update(overrides)
    return types.SimpleNamespace(**values)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"rlhf_type": "dpo"}, "rlhf_type is 'dpo'"),
        ({"teacher_model_server": "http://127.0.0.1:8000"}, "remote teacher"),
        ({"teacher_model": None}, "no --teacher_model"),
        ({"fsdp": "full_shard auto_wrap", "fsdp_config": {"fsdp_version": 1}}, "FSDP1"),
        ({"freeze_aligner": True}, "aligner and the ViT are both frozen"),
    ],
)
def test_preflight_refusals(events, mocker, overrides, match):
    original = mocker.Mock()
    with pytest.raises(RefusedError, match=match):
        patches._wrap_prepare_model_tokenizer(original, types.SimpleNamespace(args=rlhf_args(**overrides)), (), {})
    original.assert_not_called()
    (refused,) = [e for e in events() if e["event"] == "vkd.refuse"]
    assert refused["fix"] and re.search(match, refused["reason"])


def test_preflight_refuses_what_cannot_train_per_target_and_lets_monitoring_through():
    vit = VisualKDConfig(targets={"merger": 1.0, "vit": 1.0})
    assert preflight.check(rlhf_args(), vit) == [preflight.FROZEN_VIT]  # the merger's LoRA cannot move the ViT
    assert preflight.check(rlhf_args(freeze_vit=False), vit) == []
    regex = r"visual\.blocks"
    assert preflight.check(rlhf_args(tuner_type="full", trainable_parameters_regex=regex), vit) == []  # exact later
    # ms-swift applies trainable_parameters(_regex) to full tuning only: under LoRA they unfreeze nothing.
    assert preflight.check(rlhf_args(tuner_type="lora", trainable_parameters_regex=regex), vit) == [
        preflight.FROZEN_VIT
    ]
    monitor = VisualKDConfig(mode="monitor", targets=["vit"])
    assert preflight.check(rlhf_args(freeze_aligner=True), monitor) == []  # a frozen aligner's drift is data too
    assert preflight.check(rlhf_args(rlhf_type="dpo"), monitor)  # ...but only GKD has a teacher pass


def test_training_without_a_teacher_pipeline_is_refused_before_loading(events, mocker):
    """`swift sft` / `swift pt` with the switch on: their pipeline (SwiftSft) has no rlhf_type."""
    original = mocker.Mock()
    sft = types.SimpleNamespace(args=types.SimpleNamespace(model="/models/student", freeze_aligner=False))
    with pytest.raises(RefusedError, match=r"trains without a teacher \(swift sft / swift pt\)"):
        patches._wrap_train_preflight(original, sft, (), {})
    original.assert_not_called()
    assert preflight.check(sft.args, VisualKDConfig()) == [preflight.NOT_RLHF]
    # An RLHF pipeline reaches SwiftSft's method through super(): its own point already ran the preflight.
    patches._wrap_train_preflight(original, types.SimpleNamespace(args=rlhf_args(rlhf_type="dpo")), (), {})
    original.assert_called_once()


def test_preflight_lets_lora_self_distillation_and_an_unfrozen_vit_through():
    config = VisualKDConfig()
    assert preflight.check(rlhf_args(teacher_model=None, _teacher_use_disable_adapter=True), config) == []
    assert preflight.check(rlhf_args(freeze_aligner=True, freeze_vit=False), config) == []
    full = rlhf_args(tuner_type="full", freeze_aligner=True, trainable_parameters=["model.visual"])
    assert preflight.check(full, config) == []
    lora_targets = rlhf_args(tuner_type="lora", freeze_aligner=True, target_regex=r".*visual.*")
    assert preflight.check(lora_targets, config) == []


def test_preflight_lets_fsdp2_through_and_refuses_fsdp1_however_it_is_spelled(tmp_path):
    """ms-swift leaves `fsdp_config['fsdp_version']`; transformers strips the prefix (`version`); both default
    to 2, the version ms-swift's GKD trainer prepares its teacher for."""
    config = VisualKDConfig()
    fsdp2 = {"fsdp_version": 2, "reshard_after_forward": True, "state_dict_type": "SHARDED_STATE_DICT"}
    proven = swift_layouts.SWIFT_4_6  # the release where FSDP2 under vision KD is proven; the others refuse it
    for options in (fsdp2, {"version": 2}, {}, None):
        args = rlhf_args(fsdp="full_shard auto_wrap", fsdp_config=options)
        assert preflight.fsdp_version(args) == 2 and preflight.check(args, config, proven) == []
        for layout in (swift_layouts.SWIFT_4_5, swift_layouts.SWIFT_4_4, swift_layouts.SWIFT_3_12):
            (refusal,) = preflight.check(args, config, layout)
            assert refusal == preflight.fsdp2_unproven(layout) and f"installed {layout.series}.x" in refusal.reason
    for options in ({"fsdp_version": 1}, {"version": "1"}):
        assert preflight.check(rlhf_args(fsdp="full_shard", fsdp_config=options), config) == [preflight.FSDP1]
    assert "--fsdp fsdp2" in preflight.FSDP1.fix
    assert preflight.fsdp_version(rlhf_args(fsdp=[])) is None and preflight.fsdp_version(rlhf_args()) is None


def test_preflight_refuses_a_lora_resume_from_a_sharded_fsdp_checkpoint(tmp_path):
    """A SHARDED_STATE_DICT checkpoint holds DCP shards and no adapter files: ms-swift 4.6 resumes LoRA from
    the adapter files, so it would train nothing. Full fine-tuning resumes from the shards; a checkpoint with
    the adapter (FULL_STATE_DICT, or DDP) resumes LoRA."""
    checkpoint = tmp_path / "checkpoint-2"
    (checkpoint / "pytorch_model_fsdp_0").mkdir(parents=True)
    config = VisualKDConfig()
    lora = rlhf_args(fsdp="full_shard auto_wrap", tuner_type="lora", resume_from_checkpoint=str(checkpoint))
    proven = swift_layouts.SWIFT_4_6
    assert preflight.check(lora, config, proven) == [preflight.SHARDED_LORA_RESUME]
    assert "FULL_STATE_DICT" in preflight.SHARDED_LORA_RESUME.fix
    full = rlhf_args(fsdp="full_shard auto_wrap", tuner_type="full", resume_from_checkpoint=str(checkpoint))
    assert preflight.check(full, config, proven) == []
    (checkpoint / "adapter_config.json").write_text("{}")
    assert preflight.check(lora, config, proven) == []


def write_model(path, **vision):
    path.mkdir()
    base = {"out_hidden_size": 64, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2}
    (path / "config.json").write_text(json.dumps({"model_type": "qwen3_vl", "vision_config": {**base, **vision}}))
    return str(path)


@pytest.mark.parametrize(
    ("student", "teacher", "block", "match"),
    [
        ({}, {"out_hidden_size": 96}, {}, "64 vs 96"),
        ({}, {"patch_size": 14}, {}, "patch_size 16 vs 14"),
        ({"deepstack_visual_indexes": [0, 1]}, {"deepstack_visual_indexes": [0, 1, 2]}, {}, "2 and 3 deepstack"),
        (
            {"deepstack_visual_indexes": [0, 1]},
            {"deepstack_visual_indexes": [0, 1]},
            {"deepstack_layers": [2]},
            r"\[2\]",
        ),
        ({}, {}, {"targets": ["merger", "deepstack"]}, "no deepstack mergers"),  # Qwen2.5-VL-shaped, named
    ],
)
def test_preflight_reads_both_config_files(tmp_path, student, teacher, block, match):
    args = rlhf_args(
        model_dir=write_model(tmp_path / "s", **student), teacher_model=write_model(tmp_path / "t", **teacher)
    )
    settings = config.resolve(environ={}, inline=block).config
    refusals = preflight.check(args, settings)
    assert refusals and any(re.search(match, r.reason) for r in refusals), refusals
    assert all(r.fix for r in refusals)


def test_an_optional_deepstack_is_left_out_of_a_merger_only_pair_and_said(tmp_path):
    args = rlhf_args(model_dir=write_model(tmp_path / "s"), teacher_model=write_model(tmp_path / "t"))
    defaults = VisualKDConfig()  # deepstack optional, as in the shipped configs
    assert preflight.check(args, defaults) == []
    assert pairing.target_plan(defaults, preflight.model_documents(args)) == (("merger",), ("deepstack",))
    (note,) = preflight.notes(args, defaults)
    assert note.startswith("optional target(s) deepstack left out: student qwen3_vl and teacher qwen3_vl have none")


def write_layers(path, layers, deepstack):
    document = {"model_type": "qwen3_vl", "text_config": {"num_hidden_layers": layers}}
    document["vision_config"] = {"out_hidden_size": 64, "patch_size": 16, "deepstack_visual_indexes": deepstack}
    path.mkdir()
    (path / "config.json").write_text(json.dumps(document))
    return str(path)


def test_deepstack_mergers_the_language_model_never_reads_are_left_out_or_refused_when_named(tmp_path):
    """Qwen3-VL adds deepstack feature i after text layer i, for i below the number of text layers only: with
    2 layers and 3 mergers the third one's output is computed and dropped. "Every deepstack merger" leaves it
    out (with the note the run's vkd.attach and the doctor print); naming it in deepstack_layers is refused
    with the layers that would work. A merger the teacher's language model never reads is left out too."""
    assert pairing.unconsumed_deepstack({"text_config": {"num_hidden_layers": 2}, "vision_config": {}}) == []
    shallow = {"text_config": {"num_hidden_layers": 2}, "vision_config": {"deepstack_visual_indexes": [0, 1, 2]}}
    assert pairing.unconsumed_deepstack(shallow) == [2]
    assert pairing.unconsumed_deepstack({**shallow, "text_config": {"num_hidden_layers": 3}}) == []
    assert pairing.unconsumed_deepstack({"vision_config": shallow["vision_config"]}) == []  # no text config: unknown

    student = write_layers(tmp_path / "s", 2, [0, 1, 2])
    deep_teacher = write_layers(tmp_path / "t", 36, [0, 1, 2])
    args = rlhf_args(model_dir=student, teacher_model=deep_teacher)
    assert preflight.check(args, VisualKDConfig()) == []
    (note,) = preflight.notes(args, VisualKDConfig())
    assert note == pairing.left_out_note([2]) and note.startswith("deepstack_2 left out")
    documents = {"student": shallow, "teacher": {**shallow, "text_config": {"num_hidden_layers": 36}}}
    assert pairing.deepstack_plan(VisualKDConfig(), documents) == ((0, 1), [2], None)
    assert pairing.deepstack_plan(VisualKDConfig(), {"teacher": shallow, "student": documents["teacher"]})[:2] == (
        (0, 1),
        [2],
    )

    named = VisualKDConfig(deepstack_layers=[1, 2])
    (refusal,) = preflight.check(args, named)
    assert "deepstack_layers [2]" in refusal.reason and "student 2" in refusal.reason
    assert refusal.fix == "set custom.visual_kd.deepstack_layers to [1]"
    assert pairing.deepstack_plan(VisualKDConfig(deepstack_layers=[0, 1]), documents) == ((0, 1), [], None)
    assert preflight.notes(args, VisualKDConfig(targets=["merger"])) == []
    assert preflight.notes(rlhf_args(model_dir=write_layers(tmp_path / "deep", 36, [0, 1, 2])), VisualKDConfig()) == []


def test_preflight_refuses_a_model_without_a_vision_tower(tmp_path):
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    refusals = preflight.check(rlhf_args(model_dir=str(tmp_path / "text")), VisualKDConfig())
    assert [r.reason for r in refusals if "no vision tower" in r.reason]


def test_invalid_config_refuses_before_the_original_runs(events, mocker, tmp_path, monkeypatch):
    bad = tmp_path / "bad.yaml"
    bad.write_text("custom:\n  visual_kd:\n    wieght: 0.1\n")
    monkeypatch.setenv("VKD_CONFIG", str(bad))
    original = mocker.Mock()
    with pytest.raises(RefusedError, match="did you mean 'weight'"):
        patches._wrap_prepare_model_tokenizer(original, types.SimpleNamespace(args=rlhf_args()), (), {})
    original.assert_not_called()
    invalid = [e for e in events() if e["event"] == "vkd.config.invalid"]
    assert invalid[0]["field"] == "custom.visual_kd.wieght" and invalid[0]["source"] == str(bad)


def test_disabled_by_config_is_a_visible_decision_and_calls_straight_through(events, mocker, monkeypatch):
    monkeypatch.setenv("VKD_WEIGHT", "0")
    original = mocker.Mock(return_value="loaded")
    instance = types.SimpleNamespace(args=rlhf_args(rlhf_type="dpo"))  # would be refused if active
    assert patches._wrap_prepare_model_tokenizer(original, instance, (), {}) == "loaded"
    names = [e["event"] for e in events()]
    assert names.count("vkd.config.note") == 1
    (disabled,) = [e for e in events() if e["event"] == "vkd.disabled"]
    assert disabled["level"] == "warning" and "weight = 0" in disabled["reason"]


def yaml_argv(path) -> list[str]:
    return [str(path)] if LAYOUT.config_flag is None else ["--model", "m", LAYOUT.config_flag, str(path)]


def expanded(argv_tail: list[str]) -> list[str]:
    return argv_tail if LAYOUT.config_flag is None else ["--model", "m", *argv_tail]


def test_inline_block_leaves_swift_argv(events, tmp_path, monkeypatch):
    path = tmp_path / "gkd.yaml"
    path.write_text(
        "rlhf_type: gkd\ncustom:\n  visual_kd:\n    weight: 0.25\n    distance: cosine\n  other: 1\nmax_steps: 3\n"
    )
    cli, _, attr = point(swift_layouts.CLI_YAML)
    argv = yaml_argv(path)
    patches._VkdWrapper(getattr(cli, attr), patches._wrap_cli_yaml)(argv)
    assert argv == expanded(["--rlhf_type", "gkd", "--custom", '{"other": 1}', "--max_steps", "3"])
    monkeypatch.setenv("VKD_INLINE_CONFIG", patches.os.environ["VKD_INLINE_CONFIG"])
    monkeypatch.setenv("VKD_INLINE_SOURCE", patches.os.environ["VKD_INLINE_SOURCE"])
    assert json.loads(patches.os.environ["VKD_INLINE_CONFIG"]) == {"weight": 0.25, "distance": "cosine"}
    resolved = patches.settings()
    assert resolved.config.weight == 0.25 and resolved.sources["weight"] == f"inline:{path}"


def test_inline_block_not_a_mapping_stops_the_launcher(events, tmp_path):
    path = tmp_path / "gkd.yaml"
    path.write_text("rlhf_type: gkd\ncustom:\n  visual_kd: [merger]\n")
    cli, _, attr = point(swift_layouts.CLI_YAML)
    with pytest.raises(SystemExit, match=r"custom\.visual_kd"):
        patches._VkdWrapper(getattr(cli, attr), patches._wrap_cli_yaml)(yaml_argv(path))


def test_megatron_refuses_when_active(events):
    """megatron-core is not installed here, so ms-swift's Megatron pipeline cannot import: the hook
    receives a stand-in module shaped like it (MegatronSft.__init__ calls _prepare_template before it
    builds the trainer or loads weights), and the refusal must come before anything is built."""
    built = []

    class MegatronRLHF:
        def __init__(self, args=None):
            self._prepare_template()
            built.append(args)

        def _prepare_template(self):
            built.append("template")

    fake = types.ModuleType(LAYOUT.points[swift_layouts.MEGATRON_PREFLIGHT][0])
    fake.MegatronRLHF = MegatronRLHF
    patches.on_import(fake)
    with pytest.raises(RefusedError, match="Megatron"):
        MegatronRLHF(["--rlhf_type", "gkd"])
    assert built == []


def test_doctor_resolves_every_patch_point_without_megatron(capsys):
    report = doctor._Report()
    doctor._patch_points(report, LAYOUT)
    out = capsys.readouterr().out
    assert report.problems == [], out
    assert out.count("[ok]") == len(LAYOUT.points) - 1 and "[optional]" in out  # no megatron-core here
