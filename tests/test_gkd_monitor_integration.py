"""The real ms-swift GKD pipeline and trainer, in this process, with the shim activated in it.

In-process (rather than through ``swift rlhf``) so the test can look inside the step: what the
original ``compute_loss`` returned, what the shim added, and the trainer's parameters after a
step. The end-to-end launcher path is covered by ``test_e2e.py``.
"""

import math
from pathlib import Path

import pytest
import torch
from swift.pipelines import rlhf_main
from swift.rlhf_trainers import gkd_trainer

import vkd_shim
from vkd_shim import patches, runtime, telemetry
from vkd_shim.errors import FeatureMismatchError, NonFiniteError, NoVisualTokensError, RefusedError
from vkd_shim.targets import Target
from vkd_shim.testing import launch as kit

pytestmark = pytest.mark.e2e


@pytest.fixture
def assets(gkd_assets):
    return gkd_assets


@pytest.fixture
def shim(tmp_path, monkeypatch):
    """Activate the shim in this process with a config file; undo everything afterwards."""
    for name, value in kit.gkd_env({}).items():
        if name != "PATH":
            monkeypatch.setenv(name, value)
    for name in ("VKD_CONFIG", "VKD_WEIGHT", "VKD_TARGETS", "VKD_DISTANCE", "VKD_INLINE_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("VKD_LOG_FILE", str(tmp_path / "events.jsonl"))
    telemetry.reset_logger()
    patches.reset()

    def configure(**block) -> None:
        lines = ["custom:", "  visual_kd:"] + [f"    {k}: {v}" for k, v in block.items()]
        path = tmp_path / "vkd.yaml"
        path.write_text("\n".join(lines) + "\n")
        monkeypatch.setenv("VKD_CONFIG", str(path))
        vkd_shim.activate()

    yield configure
    vkd_shim.deactivate()
    telemetry.reset_logger()


@pytest.fixture
def recorder(monkeypatch):
    """Records, per compute_loss call, the unpatched loss and the loss the trainer received."""
    calls: list[dict] = []
    real = gkd_trainer.GKDTrainer.compute_loss

    def unpatched(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = real(self, model, inputs, return_outputs, num_items_in_batch)
        calls.append({"base": (out[0] if return_outputs else out).detach().clone(), "training": model.training})
        return out

    monkeypatch.setattr(gkd_trainer.GKDTrainer, "compute_loss", unpatched)
    return calls


def train(assets, output_dir, *extra: str) -> dict:
    """One in-process ms-swift GKD run; returns the trainer and its logging.jsonl rows."""
    seen = {}
    real_train = gkd_trainer.GKDTrainer.train

    def keep(self, *args, **kwargs):
        seen["trainer"] = self
        return real_train(self, *args, **kwargs)

    gkd_trainer.GKDTrainer.train = keep
    try:
        rlhf_main(kit.gkd_command(assets, output_dir, *extra)[2:])
    finally:
        gkd_trainer.GKDTrainer.train = real_train
    return {"trainer": seen["trainer"], "rows": kit.read_logging_jsonl(output_dir)}


def test_trainer_logs_vision_kd_and_adds_the_weighted_term(assets, shim, recorder, mocker, tmp_path):
    shim(weight=0.5, distance="mse", targets="{merger: 1.0, deepstack: 0.5}")
    terms = mocker.spy(runtime.TrainerKD, "_term")
    outer = mocker.spy(runtime.TrainerKD, "compute_loss")
    run = train(assets, tmp_path / "out", "--max_steps", "3", "--eval_steps", "3", "--save_strategy", "no")

    train_rows = [r for r in run["rows"] if "loss" in r and "vision_kd_loss" in r]
    eval_rows = [r for r in run["rows"] if "eval_vision_kd_loss" in r]
    assert train_rows and eval_rows
    for row in train_rows:
        assert math.isfinite(row["vision_kd_loss"]) and row["vision_kd_loss"] > 0
        # The logged loss is the weighted sum of the logged per-target distances.
        weighted = 0.5 * (row["vision_kd/merger"] + 0.5 * (row["vision_kd/deepstack_0"] + row["vision_kd/deepstack_1"]))
        assert row["vision_kd_loss"] == pytest.approx(weighted, rel=1e-3)
    assert all(math.isfinite(r["eval_vision_kd_loss"]) for r in eval_rows)

    # Every call: what the trainer got == the unpatched loss (+ the shim's term on visual micro-batches).
    assert len(outer.call_args_list) == len(recorder) > 0
    terms_left = list(terms.spy_return_list)
    visual_calls = 0
    for call, got, base in zip(outer.call_args_list, outer.spy_return_list, recorder, strict=True):
        inputs = call.args[2][1]  # TrainerKD.compute_loss(self, wrapped, args, kwargs): args = (model, inputs)
        got = (got[0] if isinstance(got, tuple) else got).detach()
        if (
            inputs["model_inputs"].get("pixel_values") is None
            and inputs["model_inputs"].get("pixel_values_videos") is None
        ):
            assert torch.equal(got, base["base"])
            continue
        visual_calls += 1
        term = terms_left.pop(0)
        assert term is not None and term.requires_grad == base["training"]
        # Train adds the term; eval_loss stays ms-swift's own (the term is reported beside it).
        expected = base["base"] + term.detach() if base["training"] else base["base"]
        assert torch.equal(got, expected)
    assert visual_calls > 0 and not terms_left


def aligner_state(trainer) -> dict[str, torch.Tensor]:
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {n: p.detach().clone() for n, p in model.named_parameters() if "merger" in n and p.requires_grad}


def test_aligner_moves_differently_with_the_term(assets, shim, tmp_path):
    """Same seed, one optimizer step on an image batch: weight 0 (no hooks) vs weight 10."""
    one_step = ("--max_steps", "1", "--eval_strategy", "no", "--save_strategy", "no")
    shim(weight=0)
    without = aligner_state(train(assets, tmp_path / "w0", *one_step)["trainer"])
    vkd_shim.deactivate()
    patches.reset()
    shim(weight=10)
    run = train(assets, tmp_path / "w10", *one_step)
    with_term = aligner_state(run["trainer"])
    assert run["rows"][0]["vision_kd_loss"] > 0  # step 1 is an image batch and the term was added
    assert without.keys() == with_term.keys() and len(without) >= 6  # merger + 2 deepstack, LoRA A/B
    changed = [n for n in without if not torch.equal(without[n], with_term[n])]
    assert any("deepstack_merger_list" in n for n in changed) and any(".merger." in n for n in changed)


def test_deepspeed_forward_path_dummy_image_adds_nothing(assets, shim, mocker, tmp_path):
    """Under DeepSpeed ms-swift runs the vision tower on a black dummy image for text-only batches;
    those features must never become a term. DeepSpeed itself is not needed for that code path."""
    from swift.model.models import qwen

    dummy_runs = mocker.spy(qwen, "_forward_qwen3_vl_or_qwen3_omni")
    mocker.patch.object(qwen, "is_deepspeed_enabled", return_value=True)
    shim(weight=1.0)
    terms = mocker.spy(runtime.TrainerKD, "_term")
    rows = train(assets, tmp_path / "ds", "--max_steps", "2", "--eval_strategy", "no", "--save_strategy", "no")["rows"]
    text_only = [c for c in dummy_runs.call_args_list if c.args[4] is None and c.args[5] is None]
    assert text_only, "the dummy-image branch never ran"
    # Step 1 is an image batch, step 2 text-only (seed 42): one term, and no metric on step 2.
    assert len(terms.call_args_list) == 1
    assert "vision_kd_loss" in rows[0] and "vision_kd_loss" not in rows[1]


def nan_in(role: str, take):
    """Failure injection: one side's merger features carry NaN in their first row."""

    def inject(self):
        features = take(self)
        merger = features[role][Target("merger")].clone()
        merger[0] = float("nan")
        features[role][Target("merger")] = merger
        return features

    return inject


def read_events(tmp_path) -> list[dict]:
    import json

    telemetry.get_logger().close()
    return [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]


ONE_STEP = ("--max_steps", "1", "--eval_strategy", "no", "--save_strategy", "no")


def test_nonfinite_skip_masks_warns_and_trains_on(assets, shim, mocker, tmp_path):
    from vkd_shim.capture import FeatureCapture

    mocker.patch.object(FeatureCapture, "take", nan_in("teacher", FeatureCapture.take))
    shim(weight=1.0, nonfinite="skip", teacher_nonfinite="skip")
    row = train(assets, tmp_path / "skip", *ONE_STEP)["rows"][0]
    assert math.isfinite(row["loss"]) and math.isfinite(row["vision_kd_loss"]) and math.isfinite(row["grad_norm"])
    assert row["vision_kd/skipped"] == 1
    warned = [e for e in read_events(tmp_path) if e["event"] == "vkd.nonfinite"]
    assert [(e["target"], e["side"], e["count"], e["mode"], e["policy"]) for e in warned] == [
        ("merger", "teacher", 1, "train", "skip")
    ]


def test_a_nonfinite_teacher_stops_the_run_with_that_diagnosis_by_default(assets, shim, mocker, tmp_path):
    from vkd_shim.capture import FeatureCapture

    mocker.patch.object(FeatureCapture, "take", nan_in("teacher", FeatureCapture.take))
    shim(weight=1.0, nonfinite="skip")  # the student-side policy does not cover a broken teacher
    with pytest.raises(NonFiniteError, match="the teacher itself is broken"):
        train(assets, tmp_path / "teacher", *ONE_STEP)


def test_nonfinite_raise_stops_the_run_on_student_features(assets, shim, mocker, tmp_path):
    from vkd_shim.capture import FeatureCapture

    mocker.patch.object(FeatureCapture, "take", nan_in("student", FeatureCapture.take))
    shim(weight=1.0, nonfinite="raise")
    with pytest.raises(NonFiniteError, match="nonfinite is 'raise'"):
        train(assets, tmp_path / "raise", *ONE_STEP)


def test_frozen_aligner_and_vit_are_refused_before_any_model_loads(assets, shim, mocker, tmp_path):
    from swift.pipelines.train import rlhf

    loads = mocker.spy(rlhf.SwiftRLHF, "_prepare_single_model")
    shim(weight=1.0)
    with pytest.raises(RefusedError, match="both frozen"):
        train(assets, tmp_path / "frozen", *ONE_STEP, "--freeze_aligner", "true")
    assert loads.call_count == 0


def text_only_dataset(assets, path):
    import json

    rows = [json.loads(x) for x in Path(assets["train"]).read_text(encoding="utf-8").splitlines()]
    text = [r for r in rows if not r.get("images") and not r.get("videos")]
    path.write_text("".join(json.dumps(r) + "\n" for r in text), encoding="utf-8")
    return {**assets, "train": str(path), "val": str(path), "rows": {"image": 0, "video": 0, "text": len(text)}}


def test_a_run_without_any_visual_token_stops_at_the_end_with_the_summary(assets, shim, tmp_path):
    shim(weight=1.0)
    with pytest.raises(NoVisualTokensError, match="whole run"):
        train(text_only_dataset(assets, tmp_path / "text.jsonl"), tmp_path / "text", *ONE_STEP)
    events = read_events(tmp_path)
    (summary,) = [e for e in events if e["event"] == "vkd.summary"]
    assert summary["steps_with_term"] == {} and summary["last_visual_step"] is None
    (stop,) = [e for e in events if e["event"] == "vkd.no_visual"]
    assert stop["level"] == "error" and "no_visual: warn" in stop["fix"]


def test_no_visual_warn_lets_a_text_only_pipeline_finish(assets, shim, tmp_path):
    shim(weight=1.0, no_visual="warn", no_visual_steps=1)
    run = train(
        text_only_dataset(assets, tmp_path / "text.jsonl"),
        tmp_path / "warn",
        "--max_steps",
        "3",
        "--eval_strategy",
        "no",
        "--save_strategy",
        "no",
    )
    assert len([r for r in run["rows"] if "loss" in r]) == 3
    levels = [e["level"] for e in read_events(tmp_path) if e["event"] == "vkd.no_visual"]
    assert levels and set(levels) == {"warning"}  # the stretch, then the whole run


def test_monitor_mode_measures_every_step_and_hands_back_the_loss_untouched(assets, shim, recorder, mocker, tmp_path):
    """mode: monitor on the real trainer: every call returns exactly what ms-swift computed; the distances
    and the relative drift are computed (under no_grad) and logged in train and eval; no vision_kd_loss."""
    shim(weight=5.0, mode="monitor")
    outer = mocker.spy(runtime.TrainerKD, "compute_loss")
    terms = mocker.spy(runtime.TrainerKD, "_term")
    run = train(assets, tmp_path / "out", "--max_steps", "3", "--eval_steps", "3", "--save_strategy", "no")
    for got, base in zip(outer.spy_return_list, recorder, strict=True):
        assert torch.equal((got[0] if isinstance(got, tuple) else got).detach(), base["base"])
    measured = [t for t in terms.spy_return_list if t is not None]
    assert measured and not any(t.requires_grad for t in measured)  # computed without a graph
    names = ["merger", "deepstack_0", "deepstack_1"]
    visual = [r for r in run["rows"] if "vision_kd/tokens" in r]
    evaluated = [r for r in run["rows"] if "eval_vision_kd/tokens" in r]
    assert visual and evaluated
    for row in visual:
        assert "vision_kd_loss" not in row
        assert all(row[f"vision_kd/drift/{n}"] > 0 and math.isfinite(row[f"vision_kd/{n}"]) for n in names)
    assert all("eval_vision_kd_loss" not in r and f"eval_vision_kd/drift/{names[0]}" in r for r in evaluated)


def test_the_exact_check_refuses_a_target_nothing_trainable_feeds(assets, shim, tmp_path):
    """Names can unfreeze anything, so the preflight lets `--trainable_parameters_regex` through; at trainer
    construction the shim checks each target against the parameters that really feed it. Under full
    fine-tuning the regex unfreezes only the merger: the ViT output entering it (`vit`) cannot move. Under
    LoRA ms-swift ignores the regex (it applies it to full tuning only): the preflight knows, and refuses
    the frozen aligner and ViT before anything loads."""
    shim(weight=1.0, targets="[merger, vit]")
    frozen = ("--freeze_aligner", "true", "--trainable_parameters_regex", r"visual\.merger\.")
    with pytest.raises(RefusedError, match=r"targets include vit.*--freeze_vit false"):
        train(assets, tmp_path / "full", *ONE_STEP, *frozen, "--tuner_type", "full")
    with pytest.raises(RefusedError, match=r"both frozen"):
        train(assets, tmp_path / "lora", *ONE_STEP, *frozen)


def test_a_failure_of_the_shims_own_while_monitoring_is_reported_and_the_run_goes_on(
    assets, shim, recorder, mocker, tmp_path
):
    """Failure injection: the distance itself raises on every call. Monitoring promises to train as plain
    ms-swift would, so every loss is handed back untouched, the run finishes, and the failure is one
    rate-limited `vkd.monitor_error` event (counted in the summary), not a stop."""
    failing = mocker.patch.object(runtime, "vision_kd_loss", side_effect=RuntimeError("distance exploded"))
    shim(weight=1.0, mode="monitor")
    outer = mocker.spy(runtime.TrainerKD, "compute_loss")
    train(assets, tmp_path / "out", "--max_steps", "3", "--eval_strategy", "no", "--save_strategy", "no")
    assert len(outer.spy_return_list) == len(recorder) > 0
    for got, base in zip(outer.spy_return_list, recorder, strict=True):
        assert torch.equal((got[0] if isinstance(got, tuple) else got).detach(), base["base"])
    events = read_events(tmp_path)
    (error,) = [e for e in events if e["event"] == "vkd.monitor_error"]
    assert error["reason"] == "measuring: RuntimeError: distance exploded" and error["mode"] == "train"
    assert error["decision"] == runtime.MONITOR_GOES_ON and error["level"] == "error"
    (summary,) = [e for e in events if e["event"] == "vkd.summary"]
    assert summary["skipped"] == {error["reason"]: failing.call_count} and failing.call_count >= 2


def test_a_micro_batch_whose_features_cannot_be_compared_is_skipped_with_both_shapes(assets, shim, mocker, tmp_path):
    """Failure injection: the first distance raises a shape mismatch. That micro-batch adds no term and
    counts 1 in `vision_kd/skipped`; one `vkd.skip` event names the target and both shapes; the run goes on
    and later steps carry the term."""
    real = runtime.vision_kd_loss
    mismatch = FeatureMismatchError("merger", (8, 64), (8, 96), "widths differ")
    calls = {"n": 0}

    def first_fails(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise mismatch
        return real(*args, **kwargs)

    mocker.patch.object(runtime, "vision_kd_loss", side_effect=first_fails)
    shim(weight=1.0)
    rows = train(assets, tmp_path / "out", "--max_steps", "3", "--eval_strategy", "no", "--save_strategy", "no")["rows"]
    train_rows = [r for r in rows if "loss" in r]
    first_visual = next(r for r in train_rows if "vision_kd/skipped" in r)
    assert first_visual["vision_kd/skipped"] == 1, first_visual
    assert any(r.get("vision_kd_loss", 0) > 0 for r in train_rows[1:]), train_rows
    events = read_events(tmp_path)
    (skip,) = [e for e in events if e["event"] == "vkd.skip"]
    assert (skip["target"], skip["student_shape"], skip["teacher_shape"]) == ("merger", [8, 64], [8, 96])
    (summary,) = [e for e in events if e["event"] == "vkd.summary"]
    assert sum(summary["skipped"].values()) == 1
