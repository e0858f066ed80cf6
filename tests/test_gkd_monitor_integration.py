"""The real ms-swift GKD pipeline and trainer, in this process, with the shim activated in it.

In-process (rather than through ``swift rlhf``) so the test can look inside the step: what the
original ``compute_loss`` returned, what the shim added, and the trainer's parameters after a
step. The end-to-end launcher path is covered by ``test_e2e.py``.
"""

import math

import pytest
import tiny_assets
import torch
from swift.pipelines import rlhf_main
from swift.rlhf_trainers import gkd_trainer

import vkd_shim
from vkd_shim import patches, telemetry

pytestmark = pytest.mark.e2e


@pytest.fixture
def assets(gkd_assets):
    return gkd_assets


@pytest.fixture
def shim(tmp_path, monkeypatch):
    """Activate the shim in this process with a config file; undo everything afterwards."""
    for name, value in tiny_assets.gkd_env({}).items():
        if name != "PATH":
            monkeypatch.setenv(name, value)
    for name in ("VKD_CONFIG", "VKD_WEIGHT", "VKD_TARGETS", "VKD_DISTANCE", "VKD_INLINE_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("VKD_LOG_FILE", str(tmp_path / "events.jsonl"))
    telemetry.reset_logger()
    monkeypatch.setattr(patches, "_resolved", None)

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
        calls.append(
            {"base": (out[0] if return_outputs else out).detach().clone(), "training": model.training}
        )
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
        rlhf_main(tiny_assets.gkd_command(assets, output_dir, *extra)[2:])
    finally:
        gkd_trainer.GKDTrainer.train = real_train
    return {"trainer": seen["trainer"], "rows": tiny_assets.read_logging_jsonl(output_dir)}


def test_trainer_logs_vision_kd_and_adds_the_weighted_term(assets, shim, recorder, mocker, tmp_path):
    shim(weight=0.5, distance="mse", targets="{merger: 1.0, deepstack: 0.5}")
    terms = mocker.spy(patches.TrainerKD, "_term")
    outer = mocker.spy(patches.TrainerKD, "compute_loss")
    run = train(assets, tmp_path / "out", "--max_steps", "3", "--eval_steps", "3", "--save_strategy", "no")

    train_rows = [r for r in run["rows"] if "loss" in r and "vision_kd_loss" in r]
    eval_rows = [r for r in run["rows"] if "eval_vision_kd_loss" in r]
    assert train_rows and eval_rows
    for row in train_rows:
        assert math.isfinite(row["vision_kd_loss"]) and row["vision_kd_loss"] > 0
        # The logged loss is the weighted sum of the logged per-target distances.
        weighted = 0.5 * (
            row["vision_kd/merger"] + 0.5 * (row["vision_kd/deepstack_0"] + row["vision_kd/deepstack_1"])
        )
        assert row["vision_kd_loss"] == pytest.approx(weighted, rel=1e-3)
    assert all(math.isfinite(r["eval_vision_kd_loss"]) for r in eval_rows)

    # Every call: what the trainer got == the unpatched loss (+ the shim's term on visual micro-batches).
    assert len(outer.call_args_list) == len(recorder) > 0
    terms_left = list(terms.spy_return_list)
    visual_calls = 0
    for call, got, base in zip(outer.call_args_list, outer.spy_return_list, recorder, strict=True):
        inputs = call.args[2][
            1
        ]  # TrainerKD.compute_loss(self, wrapped, args, kwargs): args = (model, inputs)
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
        assert torch.equal(got, base["base"] + term.detach())
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
    patches._resolved = None
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
    terms = mocker.spy(patches.TrainerKD, "_term")
    rows = train(
        assets, tmp_path / "ds", "--max_steps", "2", "--eval_strategy", "no", "--save_strategy", "no"
    )["rows"]
    text_only = [c for c in dummy_runs.call_args_list if c.args[4] is None and c.args[5] is None]
    assert text_only, "the dummy-image branch never ran"
    # Step 1 is an image batch, step 2 text-only (seed 42): one term, and no metric on step 2.
    assert len(terms.call_args_list) == 1
    assert "vision_kd_loss" in rows[0] and "vision_kd_loss" not in rows[1]


def nan_teacher(take):
    """Failure injection: the teacher's merger features carry NaN in their first row."""

    def inject(self):
        features = take(self)
        merger = features["teacher"]["merger"].clone()
        merger[0] = float("nan")
        features["teacher"]["merger"] = merger
        return features

    return inject


def read_events(tmp_path) -> list[dict]:
    import json

    telemetry.get_logger().close()
    return [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]


def test_nonfinite_skip_masks_warns_and_trains_on(assets, shim, mocker, tmp_path):
    from vkd_shim.capture import FeatureCapture

    mocker.patch.object(FeatureCapture, "take", nan_teacher(FeatureCapture.take))
    shim(weight=1.0, nonfinite="skip")
    rows = train(
        assets, tmp_path / "skip", "--max_steps", "1", "--eval_strategy", "no", "--save_strategy", "no"
    )
    row = rows["rows"][0]
    assert (
        math.isfinite(row["loss"])
        and math.isfinite(row["vision_kd_loss"])
        and math.isfinite(row["grad_norm"])
    )
    assert row["vision_kd/skipped"] == 1
    warned = [e for e in read_events(tmp_path) if e["event"] == "vkd.nonfinite"]
    assert [(e["target"], e["count"], e["mode"], e["policy"]) for e in warned] == [
        ("merger", 1, "train", "skip")
    ]


def test_nonfinite_raise_stops_the_run_and_frozen_aligner_warns(assets, shim, mocker, tmp_path):
    from vkd_shim.capture import FeatureCapture

    mocker.patch.object(FeatureCapture, "take", nan_teacher(FeatureCapture.take))
    shim(weight=1.0, nonfinite="raise")
    with pytest.raises(patches.NonFiniteError, match="nonfinite is 'raise'"):
        train(
            assets,
            tmp_path / "raise",
            "--max_steps",
            "1",
            "--eval_strategy",
            "no",
            "--freeze_aligner",
            "true",
        )
    events = read_events(tmp_path)
    assert [e["event"] for e in events if e["event"] == "vkd.aligner_frozen"] == ["vkd.aligner_frozen"]
