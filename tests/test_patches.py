"""Each patch point against the real ms-swift modules: installed where it belongs, calls through,
removed by unpatch, refuses loudly, and never raises into an import."""

import json
import types

import pytest
import wrapt
from swift.cli import main as swift_cli
from swift.pipelines.train import rlhf
from swift.rlhf_trainers import gkd_trainer

from vkd_shim import patches, telemetry

TRAINER_ATTRS = ("__init__", "compute_loss", "log")


@pytest.fixture
def events(tmp_path, monkeypatch):
    """Event lines from the real sink, parsed; the config cache starts empty."""
    path = tmp_path / "events.jsonl"
    monkeypatch.setenv("VKD_LOG_FILE", str(path))
    for name in ("VKD_CONFIG", "VKD_WEIGHT", "VKD_TARGETS", "VKD_DISTANCE", "VKD_INLINE_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    telemetry.reset_logger()
    monkeypatch.setattr(patches, "_resolved", None)
    monkeypatch.setattr(patches, "_PATCHER", patches._Patcher())

    def read() -> list[dict]:
        telemetry.get_logger().close()
        return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []

    yield read
    patches.unpatch_all()
    telemetry.reset_logger()


@pytest.fixture
def trainer_mocks(mocker):
    """Stand-ins for the originals, so a call through the wrapper is observable."""
    return {attr: mocker.patch.object(gkd_trainer.GKDTrainer, attr, autospec=True) for attr in TRAINER_ATTRS}


def test_trainer_points_installed_call_through_and_removed(events, trainer_mocks):
    patches.on_gkd_trainer(gkd_trainer)
    for attr, original in trainer_mocks.items():
        wrapper = vars(gkd_trainer.GKDTrainer)[attr]
        assert isinstance(wrapper, patches._VkdWrapper) and wrapper.__wrapped__ is original
    instance = object.__new__(gkd_trainer.GKDTrainer)  # no vision KD state: pure pass-through
    inputs = {"model_inputs": {"input_ids": [1]}}
    trainer_mocks["compute_loss"].return_value = "loss"
    assert gkd_trainer.GKDTrainer.compute_loss(instance, "model", inputs, return_outputs=True) == "loss"
    trainer_mocks["compute_loss"].assert_called_once_with(instance, "model", inputs, return_outputs=True)
    gkd_trainer.GKDTrainer.log(instance, {"loss": 1.0})
    trainer_mocks["log"].assert_called_once_with(instance, {"loss": 1.0})

    patches.unpatch_all()
    for attr, original in trainer_mocks.items():
        assert vars(gkd_trainer.GKDTrainer)[attr] is original
    applied = [e["target"] for e in events() if e["event"] == "vkd.patch" and e["status"] == "applied"]
    assert applied == [f"swift.rlhf_trainers.gkd_trainer:GKDTrainer.{a}" for a in TRAINER_ATTRS]


def test_second_patch_never_double_wraps(events, trainer_mocks):
    patches.on_gkd_trainer(gkd_trainer)
    patches.on_gkd_trainer(gkd_trainer)
    wrapper = vars(gkd_trainer.GKDTrainer)["compute_loss"]
    assert not isinstance(wrapper.__wrapped__, wrapt.FunctionWrapper)
    assert [e["status"] for e in events() if e["event"] == "vkd.patch"].count("skipped") == 3


def test_pipeline_and_cli_points(events, mocker):
    prepare = mocker.patch.object(rlhf.SwiftRLHF, "_prepare_model_tokenizer", autospec=True)
    parse = mocker.patch.object(swift_cli, "parse_yaml_args")
    patches.on_rlhf_pipeline(rlhf)
    patches.on_cli_main(swift_cli)
    assert vars(rlhf.SwiftRLHF)["_prepare_model_tokenizer"].__wrapped__ is prepare
    assert vars(swift_cli)["parse_yaml_args"].__wrapped__ is parse
    patches.unpatch_all()
    assert vars(rlhf.SwiftRLHF)["_prepare_model_tokenizer"] is prepare
    assert vars(swift_cli)["parse_yaml_args"] is parse


def test_missing_point_applies_nothing_and_raises_from_our_code(events):
    class GKDTrainer:  # a drifted ms-swift: compute_loss renamed
        def __init__(self):
            pass

        def log(self, logs):
            pass

    fake = types.ModuleType("swift.rlhf_trainers.gkd_trainer")
    fake.GKDTrainer = GKDTrainer
    patches.on_gkd_trainer(fake)  # must not raise into the import
    assert not isinstance(vars(GKDTrainer)["__init__"], wrapt.FunctionWrapper)  # all-or-nothing
    with pytest.raises(patches.PatchError, match=r"GKDTrainer\.compute_loss not found") as err:
        patches._PATCHER.raise_failures()
    assert "ms-swift 4.6" in str(err.value)
    failed = [e for e in events() if e["event"] == "vkd.patch" and e["status"] == "failed"]
    assert [e["target"] for e in failed] == ["swift.rlhf_trainers.gkd_trainer:GKDTrainer.compute_loss"]
    assert failed[0]["swift_version"] == "4.6.0"


def test_exception_inside_hook_is_recorded_not_raised(events, mocker):
    mocker.patch.object(patches._PATCHER, "apply", side_effect=RuntimeError("boom"))
    patches.on_gkd_trainer(gkd_trainer)
    with pytest.raises(patches.PatchError, match="boom"):
        patches._PATCHER.raise_failures()
    assert any(e["event"] == "vkd.patch" and "boom" in e["reason"] for e in events())


def test_version_guard_event(events, mocker):
    mocker.patch.object(patches, "_swift_version", return_value="3.11.3")
    patches.on_swift(types.ModuleType("swift"))
    guard = [e for e in events() if e["event"] == "vkd.version"]
    assert len(guard) == 1 and "3.11.3" in guard[0]["problem"] and guard[0]["level"] == "warning"
    assert "4.6.x, 3.12.x" in guard[0]["problem"]
    assert patches.version_problem() is not None


def test_supported_version_has_no_guard_event(events):
    patches.on_swift(types.ModuleType("swift"))
    names = [e["event"] for e in events()]
    assert "vkd.activate" in names and "vkd.version" not in names


def rlhf_args(**overrides):
    values = dict(
        rlhf_type="gkd",
        teacher_model="/models/teacher",
        teacher_model_server=None,
        fsdp=None,
        model_dir=None,
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
        ({"fsdp": "full_shard"}, "FSDP"),
    ],
)
def test_preflight_refusals(events, overrides, match):
    with pytest.raises(patches.RefusedError, match=match):
        patches.preflight(rlhf_args(**overrides))
    refused = [e for e in events() if e["event"] == "vkd.refuse"]
    assert len(refused) == 1 and refused[0]["fix"]


def test_preflight_allows_lora_self_distillation_via_disable_adapter(events):
    patches.preflight(rlhf_args(teacher_model=None, _teacher_use_disable_adapter=True))
    assert events() == []


def test_preflight_refuses_aligner_width_mismatch(events, tmp_path):
    for name, width in (("student", 64), ("teacher", 96)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(
            json.dumps({"vision_config": {"out_hidden_size": width}})
        )
    with pytest.raises(patches.RefusedError, match="64 vs 96"):
        patches.preflight(
            rlhf_args(model_dir=str(tmp_path / "student"), teacher_model=str(tmp_path / "teacher"))
        )


def test_invalid_config_refuses_before_the_original_runs(events, mocker, tmp_path, monkeypatch):
    bad = tmp_path / "bad.yaml"
    bad.write_text("custom:\n  visual_kd:\n    wieght: 0.1\n")
    monkeypatch.setenv("VKD_CONFIG", str(bad))
    original = mocker.Mock()
    with pytest.raises(patches.RefusedError, match="did you mean 'weight'"):
        patches._wrap_prepare_model_tokenizer(original, types.SimpleNamespace(args=rlhf_args()), (), {})
    original.assert_not_called()
    invalid = [e for e in events() if e["event"] == "vkd.config.invalid"]
    assert invalid[0]["field"] == "custom.visual_kd.wieght" and invalid[0]["source"] == str(bad)


def test_inactive_config_calls_straight_through(events, mocker, monkeypatch):
    monkeypatch.setenv("VKD_WEIGHT", "0")
    original = mocker.Mock(return_value="loaded")
    instance = types.SimpleNamespace(args=rlhf_args(rlhf_type="dpo"))  # would be refused if active
    assert patches._wrap_prepare_model_tokenizer(original, instance, (), {}) == "loaded"
    assert [e["event"] for e in events()].count("vkd.config.note") == 1


def test_inline_block_leaves_swift_argv(events, tmp_path, monkeypatch):
    monkeypatch.delenv("SWIFT_CONFIG_FILE", raising=False)
    path = tmp_path / "gkd.yaml"
    path.write_text(
        "rlhf_type: gkd\ncustom:\n  visual_kd:\n    weight: 0.25\n    distance: cosine\n"
        "  other: 1\nmax_steps: 3\n"
    )
    argv = [str(path)]
    wrapped = patches._VkdWrapper(swift_cli.parse_yaml_args, patches._wrap_parse_yaml_args)
    wrapped(argv)
    assert argv == ["--rlhf_type", "gkd", "--custom", '{"other": 1}', "--max_steps", "3"]
    assert json.loads(patches.os.environ["VKD_INLINE_CONFIG"]) == {"weight": 0.25, "distance": "cosine"}
    resolved = patches.settings()
    assert resolved.config.weight == 0.25 and resolved.sources["weight"] == f"inline:{path}"
    monkeypatch.delenv("VKD_INLINE_CONFIG")


def test_inline_block_not_a_mapping_stops_the_launcher(events, tmp_path, monkeypatch):
    monkeypatch.delenv("SWIFT_CONFIG_FILE", raising=False)
    path = tmp_path / "gkd.yaml"
    path.write_text("rlhf_type: gkd\ncustom:\n  visual_kd: [merger]\n")
    wrapped = patches._VkdWrapper(swift_cli.parse_yaml_args, patches._wrap_parse_yaml_args)
    with pytest.raises(SystemExit, match=r"custom\.visual_kd"):
        wrapped([str(path)])


def test_megatron_refuses_when_active(events):
    """megatron-core is not installed here, so ms-swift's Megatron pipeline cannot import: the hook
    receives a stand-in module shaped like it (MegatronSft.__init__ calls _prepare_template before
    it builds the trainer or loads weights), and the refusal must come before anything is built."""
    built = []

    class MegatronRLHF:
        def __init__(self, args=None):
            self._prepare_template()
            built.append(args)

        def _prepare_template(self):
            built.append("template")

    fake = types.ModuleType(patches.MEGATRON_MODULE)
    fake.MegatronRLHF = MegatronRLHF
    patches.on_megatron_rlhf(fake)
    with pytest.raises(patches.RefusedError, match="Megatron"):
        MegatronRLHF(["--rlhf_type", "gkd"])
    assert built == []


def test_patch_points_resolve_on_installed_swift():
    statuses = patches.check_patch_points()
    assert statuses and all(s.ok for s in statuses), [s for s in statuses if not s.ok]
    megatron = [s for s in statuses if s.name.startswith(patches.MEGATRON_MODULE)]
    assert len(megatron) == 1 and "optional" in megatron[0].reason  # no megatron-core here
    assert len(statuses) == sum(len(p) for p in patches.POINTS.values())
