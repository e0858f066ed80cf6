"""The ms-swift 3.12 layout against the real ms-swift 3.12 modules: every patch point lands on the 3.x
attribute, calls through and comes off again; a drifted module refuses loudly; the 3.x YAML entry moves
the inline block out of argv; metrics reach 3.x's MeanMetric table only at log time.

Why separate from tests/test_patches.py: the same claims, but the modules, names and calling
conventions are 3.x's, and only an installed ms-swift 3.12 can show that the layout names them right.
"""

from __future__ import annotations

import ast
import collections
import json
import sys
import types
from pathlib import Path

import pytest
import torch
import wrapt
from swift.cli import main as swift_cli
from swift.llm.train import rlhf
from swift.plugin import MeanMetric
from swift.trainers.mixin import SwiftMixin
from swift.trainers.rlhf_trainer import gkd_trainer

from vkd_shim import bootstrap, patches, swift_layouts, telemetry

GKD_MODULE = "swift.trainers.rlhf_trainer.gkd_trainer"
TRAINER_ATTRS = ("__init__", "compute_loss", "log")


@pytest.fixture
def events(tmp_path, monkeypatch):
    """Event lines from the real sink, parsed; config cache and patcher start empty."""
    path = tmp_path / "events.jsonl"
    monkeypatch.setenv("VKD_LOG_FILE", str(path))
    for name in ("VKD_CONFIG", "VKD_WEIGHT", "VKD_TARGETS", "VKD_DISTANCE", "VKD_INLINE_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv(patches.ENV_INLINE_SOURCE, raising=False)
    telemetry.reset_logger()
    monkeypatch.setattr(patches, "_resolved", None)
    monkeypatch.setattr(patches, "_PATCHER", patches._Patcher())

    def read() -> list[dict]:
        telemetry.get_logger().close()
        return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []

    yield read
    patches.unpatch_all()
    telemetry.reset_logger()


# --- the layout the shim picked -------------------------------------------------------------


def test_installed_3_12_selects_the_3_12_layout_and_passes_the_guard():
    assert patches.LAYOUT is swift_layouts.SWIFT_3_12
    assert patches.version_problem() is None
    assert set(patches.POINTS) == {
        "swift.cli.main",
        "swift.llm.train.rlhf",
        GKD_MODULE,
        "swift.megatron.train.rlhf",
    }


@pytest.mark.parametrize(
    ("version", "series", "guarded"),
    [
        ("3.12.0", "3.12", False),
        ("3.12.6", "3.12", False),
        ("4.6.0", "4.6", False),
        ("4.6.3", "4.6", False),
        ("3.11.3", "3.12", True),  # same major: the 3.x layout, and the guard says it is untested
        ("3.1", "3.12", True),  # "3.1" must not pass as "3.12"
        ("4.5.3", "4.6", True),
        ("5.0.0", "4.6", True),  # unknown major: the newest layout, guarded
    ],
)
def test_version_to_layout_and_guard(version, series, guarded, mocker):
    assert swift_layouts.for_version(version).series == series
    mocker.patch.object(patches, "_swift_version", return_value=version)
    problem = patches.version_problem()
    assert (problem is not None) == guarded
    if guarded:
        assert version in problem and "3.12.x" in problem and "4.6.x" in problem


def test_bootstrap_hooks_cover_every_layout_module():
    """A module of a supported release that the bootstrap does not hook would never be patched."""
    hooked = {module: target for module, target in bootstrap.HOOKS}
    for layout in swift_layouts.LAYOUTS:
        for role, (module, _) in layout.points.items():
            assert module in hooked, (layout.series, role, module)
            function = getattr(patches, hooked[module].split(":")[1])
            assert callable(function)


# --- patch points on the real 3.12 modules ---------------------------------------------------


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
    batch = {"input_ids": [1], "pixel_values": "pixels"}  # 3.x: the batch is the model's inputs
    trainer_mocks["compute_loss"].return_value = "loss"
    assert gkd_trainer.GKDTrainer.compute_loss(instance, "model", batch, return_outputs=True) == "loss"
    trainer_mocks["compute_loss"].assert_called_once_with(instance, "model", batch, return_outputs=True)
    gkd_trainer.GKDTrainer.log(instance, {"loss": 1.0})
    trainer_mocks["log"].assert_called_once_with(instance, {"loss": 1.0})

    patches.unpatch_all()
    for attr, original in trainer_mocks.items():
        assert vars(gkd_trainer.GKDTrainer)[attr] is original
    applied = [e for e in events() if e["event"] == "vkd.patch" and e["status"] == "applied"]
    assert [e["target"] for e in applied] == [f"{GKD_MODULE}:GKDTrainer.{a}" for a in TRAINER_ATTRS]
    assert {e["swift_version"] for e in applied} == {sys.modules["swift"].__version__}


def test_pipeline_and_cli_points(events, mocker):
    prepare = mocker.patch.object(rlhf.SwiftRLHF, "_prepare_model_tokenizer", autospec=True)
    parse = mocker.patch.object(swift_cli, "prepare_config_args")
    patches.on_rlhf_pipeline(rlhf)
    patches.on_cli_main(swift_cli)
    assert vars(rlhf.SwiftRLHF)["_prepare_model_tokenizer"].__wrapped__ is prepare
    assert vars(swift_cli)["prepare_config_args"].__wrapped__ is parse
    patches.unpatch_all()
    assert vars(rlhf.SwiftRLHF)["_prepare_model_tokenizer"] is prepare
    assert vars(swift_cli)["prepare_config_args"] is parse


def test_missing_point_applies_nothing_and_raises_from_our_code(events):
    class GKDTrainer:  # a drifted ms-swift 3.x: compute_loss renamed
        def __init__(self):
            pass

        def log(self, logs):
            pass

    fake = types.ModuleType(GKD_MODULE)
    fake.GKDTrainer = GKDTrainer
    patches.on_gkd_trainer(fake)  # must not raise into the import
    assert not isinstance(vars(GKDTrainer)["__init__"], wrapt.FunctionWrapper)  # all-or-nothing
    with pytest.raises(patches.PatchError, match=r"GKDTrainer\.compute_loss not found") as err:
        patches._PATCHER.raise_failures()
    assert "ms-swift 3.12.6" in str(err.value) and "3.12.x" in str(err.value)
    failed = [e for e in events() if e["event"] == "vkd.patch" and e["status"] == "failed"]
    assert [e["target"] for e in failed] == [f"{GKD_MODULE}:GKDTrainer.compute_loss"]


def test_module_of_the_other_layout_is_a_recorded_failure(events):
    """Hooks are registered for 4.6's modules too; should one ever import beside 3.12, say so."""
    patches.on_gkd_trainer(types.ModuleType("swift.rlhf_trainers.gkd_trainer"))
    with pytest.raises(patches.PatchError, match=r"holds no patch point in the ms-swift 3\.12 layout"):
        patches._PATCHER.raise_failures()
    assert [e["status"] for e in events() if e["event"] == "vkd.patch"] == ["failed"]


def test_preflight_imports_the_3_12_trainer_module(events, mocker, monkeypatch):
    """The pipeline wrapper imports the trainer module so that its patch failures stop the run before
    any model loads; under 3.12 that must be the 3.x module."""
    monkeypatch.setenv("VKD_WEIGHT", "0.1")
    imported = mocker.spy(patches.importlib, "import_module")
    original = mocker.Mock(return_value="loaded")
    args = types.SimpleNamespace(
        rlhf_type="gkd", teacher_model="/models/teacher", model_dir=None, fsdp=None, teacher_model_server=None
    )
    assert (
        patches._wrap_prepare_model_tokenizer(original, types.SimpleNamespace(args=args), (), {}) == "loaded"
    )
    assert [c.args[0] for c in imported.call_args_list] == [GKD_MODULE]


# --- the 3.x YAML entry: `swift rlhf --config x.yaml` -----------------------------------------


def test_inline_block_leaves_the_3_12_argv(events, tmp_path, monkeypatch):
    path = tmp_path / "gkd.yaml"
    path.write_text(
        "rlhf_type: gkd\ncustom:\n  visual_kd:\n    weight: 0.25\n    distance: cosine\n"
        "  other: 1\nmax_steps: 3\n"
    )
    argv = ["--model", "m", "--config", str(path)]
    wrapped = patches._VkdWrapper(swift_cli.prepare_config_args, patches._wrap_parse_yaml_args)
    wrapped(argv)
    assert argv == ["--model", "m", "--rlhf_type", "gkd", "--custom", '{"other": 1}', "--max_steps", "3"]
    assert json.loads(patches.os.environ["VKD_INLINE_CONFIG"]) == {"weight": 0.25, "distance": "cosine"}
    assert patches.os.environ[patches.ENV_INLINE_SOURCE] == str(path)
    resolved = patches.settings()
    assert resolved.config.weight == 0.25 and resolved.sources["weight"] == f"inline:{path}"
    monkeypatch.delenv("VKD_INLINE_CONFIG")


def test_yaml_without_custom_block_is_untouched(events, tmp_path):
    path = tmp_path / "gkd.yaml"
    path.write_text("rlhf_type: gkd\nmax_steps: 3\n")
    argv = ["--config", str(path)]
    patches._VkdWrapper(swift_cli.prepare_config_args, patches._wrap_parse_yaml_args)(argv)
    assert argv == ["--rlhf_type", "gkd", "--max_steps", "3"]
    assert "VKD_INLINE_CONFIG" not in patches.os.environ


def test_inline_block_not_a_mapping_stops_the_launcher(events, tmp_path):
    path = tmp_path / "gkd.yaml"
    path.write_text("rlhf_type: gkd\ncustom:\n  visual_kd: [merger]\n")
    wrapped = patches._VkdWrapper(swift_cli.prepare_config_args, patches._wrap_parse_yaml_args)
    with pytest.raises(SystemExit, match=r"custom\.visual_kd"):
        wrapped(["--config", str(path)])
    (refused,) = [e for e in events() if e["event"] == "vkd.refuse"]
    assert str(path) in refused["reason"]


# --- metrics: 3.x's MeanMetric table, fed at log time only -------------------------------------


def test_buffer_feeds_3_12_custom_metrics_once_per_log_with_the_micro_batch_mean(mocker):
    """3.12's MeanMetric.update calls .item() on a tensor: the shim adds on device per micro-step and
    touches the table once per key at log time; ms-swift then logs the mean over micro-batches (the
    all-reduce of sum and count makes it the mean over ranks too), with `eval_` in eval rows."""
    trainer = types.SimpleNamespace(
        custom_metrics={
            "train": collections.defaultdict(lambda: MeanMetric(nan_value=None)),
            "eval": collections.defaultdict(lambda: MeanMetric(nan_value=None)),
        }
    )
    table = swift_layouts.SWIFT_3_12.metrics(trainer)
    assert table is trainer.custom_metrics
    update = mocker.spy(MeanMetric, "update")
    buffer = telemetry.MetricBuffer()
    for value in (0.5, 1.5, 4.0):
        buffer.add("train", "vision_kd_loss", torch.tensor(value))
    buffer.add("eval", "vision_kd_loss", torch.tensor(2.0))
    assert update.call_count == 0  # no host sync per micro-step
    keys = ("vision_kd_loss", "vision_kd/skipped")
    buffer.flush("train", table, keys)
    buffer.flush("eval", table, keys)
    assert update.call_count == 4  # one per key and mode
    assert SwiftMixin.compute_custom_metrics(table["train"]) == {"vision_kd_loss": 2.0}
    assert SwiftMixin.compute_custom_metrics(table["eval"], "eval_") == {"eval_vision_kd_loss": 2.0}


# --- Megatron: refused before its trainer exists ----------------------------------------------


def _swift_source(module: str) -> ast.Module:
    package = Path(sys.modules["swift"].__file__).parent
    return ast.parse((package / Path(*module.split(".")[1:])).with_suffix(".py").read_text())


def test_megatron_point_exists_and_runs_before_the_trainer_in_3_12_source():
    """megatron-core is not installed here (and 3.12's swift.megatron clones Megatron-LM on import), so
    the installed source is read instead: MegatronRLHF defines the patched method, and MegatronSft's
    __init__ calls it before it builds the trainer."""
    module, qualname = patches.LAYOUT.points[swift_layouts.MEGATRON_PREFLIGHT]
    owner, method = qualname.split(".")
    classes = {n.name: n for n in ast.walk(_swift_source(module)) if isinstance(n, ast.ClassDef)}
    assert method in {n.name for n in classes[owner].body if isinstance(n, ast.FunctionDef)}
    sft = {
        n.name: n for n in ast.walk(_swift_source("swift.megatron.train.sft")) if isinstance(n, ast.ClassDef)
    }
    init = next(n for n in sft["MegatronSft"].body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    calls = [ast.unparse(n.func) for n in ast.walk(init) if isinstance(n, ast.Call)]
    assert calls.index(f"self.{method}") < calls.index("self.prepare_trainer")


def test_megatron_refuses_when_active(events):
    started = []

    class MegatronRLHF:  # shaped like 3.12's: __init__ (inherited) calls _prepare_template first
        def __init__(self, args=None):
            self._prepare_template()
            started.append(args)

        def _prepare_template(self):
            pass

    fake = types.ModuleType(patches.MEGATRON_MODULE)
    fake.MegatronRLHF = MegatronRLHF
    patches.on_megatron_rlhf(fake)
    with pytest.raises(patches.RefusedError, match="Megatron"):
        MegatronRLHF(["--rlhf_type", "gkd"])
    assert started == []


def test_patch_points_resolve_without_importing_megatron():
    assert "swift.megatron" not in sys.modules
    statuses = patches.check_patch_points()
    assert statuses and all(s.ok for s in statuses), [s for s in statuses if not s.ok]
    (megatron,) = [s for s in statuses if s.name.startswith(patches.MEGATRON_MODULE)]
    assert megatron.reason == "optional, needs megatron (not installed)"
    assert "swift.megatron" not in sys.modules  # importing it would try to clone Megatron-LM
    assert len(statuses) == sum(len(p) for p in patches.POINTS.values()) == 6
