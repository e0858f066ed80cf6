"""Every model family of docs/REFERENCE.md's table, end to end: real `swift rlhf --rlhf_type gkd` runs on tiny
random-init checkpoints that the kit builds with each family's real module tree, special-token ids and processor
(vkd_shim/testing/kits.py), launched through `vkd-run` as users launch them.

What each run must show is what a user of that family would look for: a finite term on every target the family
has (and only those), the `vkd.attach` event naming the families, the module paths the registry resolved and
what was left out, and, for one new family, a knob-off and a monitored run that train bit for bit like plain
ms-swift. The Qwen3-VL-MoE teacher of another width (`relation`) is in tests/test_e2e.py beside the `mse`
refusal of the same pair; pairs that cannot work are refused in tests/test_families_preflight.py, in process
on the real configs and ms-swift's registry, and once through a real launch in tests/test_e2e.py.

Cost: 11 training runs of 3 steps (15-20 s each on 2 quiet CPU cores; the equality test runs three), one run
that stops at trainer construction, one doctor call: about 3 minutes.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
from e2e_support import (
    FAIL_FAST_TIMEOUT_S,
    SHIPPED_CONFIGS,
    VKD_RUN,
    VKD_SHIM,
    launch,
    named,
    read_jsonl,
    report,
    run_dir,
    swift_env,
    train_rows,
    trained,
    trajectory,
    write_config,
)

from vkd_shim.bootstrap import BOOTSTRAP_DIR
from vkd_shim.testing import launch as kit

pytestmark = pytest.mark.e2e

SHIPPED = os.pathsep.join(map(str, SHIPPED_CONFIGS))
#: Three steps: the Stage-3 overlay ramps the weight over two, so steps 2 and 3 carry a positive term.
STEPS = ("--max_steps", "3", "--eval_steps", "3", "--save_strategy", "no")
#: Every row an image: each step carries visual tokens (the text-only path is tested on Qwen3-VL).
ROWS = {"n_image": 16, "n_text": 0, "n_video": 0}


def build(tmp_path_factory, student: str, teacher: str | None = None) -> dict:
    return kit.build_all(tmp_path_factory.mktemp(f"{student}_assets"), family=student, teacher_family=teacher, **ROWS)


def run(assets: dict, out: Path, config: str, swift_cache: Path, *extra: str, **env: str) -> tuple[list, list]:
    """One vkd-run launch; its logging.jsonl rows and the shim's events."""
    events = out.with_suffix(".events.jsonl")
    argv = [VKD_RUN, "--config", config, "--log-file", events, *kit.gkd_command(assets, out, *STEPS, *extra)]
    trained(launch(argv, swift_env(swift_cache, **env)))
    return kit.read_logging_jsonl(out), read_jsonl(events)


def assert_term_on(rows: list[dict], targets: list[str]) -> None:
    """Every train step logs a finite distance per target (and no other target), and the term is positive once
    the warm-up has begun."""
    train = train_rows(rows)
    assert sorted(train) == [1, 2, 3], rows
    for step, row in train.items():
        logged = sorted(k.removeprefix("vision_kd/") for k in row if k.startswith("vision_kd/") and "/drift/" not in k)
        assert logged == sorted([*targets, "tokens", "skipped"]), row
        assert all(math.isfinite(row[f"vision_kd/{t}"]) for t in targets), row
        assert row["vision_kd/tokens"] > 0 and row["vision_kd/skipped"] == 0, row
        assert math.isfinite(row["vision_kd_loss"]) and (step == 1 or row["vision_kd_loss"] > 0), row


def attach_of(events: list[dict]) -> dict:
    (attach,) = named(events, "vkd.attach")
    assert not named(events, "vkd.skip") and not named(events, "vkd.refuse"), events
    return attach


def test_a_qwen3_vl_moe_student_distils_every_target_from_a_dense_qwen3_vl_teacher(tmp_path_factory, swift_cache):
    """Qwen3-VL-MoE as the student (its sparse LM, Qwen3-VL's tower): merger, both deepstack mergers and the ViT
    output, each finite; the events name both families and the registry's module paths."""
    assets = build(tmp_path_factory, "qwen3_vl_moe", "qwen3_vl")
    out = tmp_path_factory.mktemp("moe") / "out"
    every = write_config(out.parent / "every.yaml", targets={"merger": 1.0, "deepstack": 0.5, "vit": 0.5})
    rows, events = run(assets, out, f"{SHIPPED}{os.pathsep}{every}", swift_cache, "--freeze_vit", "false")
    assert_term_on(rows, ["merger", "vit", "deepstack_0", "deepstack_1"])
    attach = attach_of(events)
    assert attach["families"] == {"student": "Qwen3-VL-MoE", "teacher": "Qwen3-VL"}
    assert attach["modules"] == {
        "merger": "model.visual.merger",
        "vit": "model.visual.merger (input)",
        "deepstack_0": "model.visual.deepstack_merger_list.0",
        "deepstack_1": "model.visual.deepstack_merger_list.1",
    }
    assert attach["left_out"] == []


def test_the_shipped_configs_train_a_qwen3_5_moe_student_on_its_merger_without_edits(tmp_path_factory, swift_cache):
    """Qwen3.5 has no deepstack: the shipped base + Stage-3 configs (deepstack optional) train it on the merger
    alone, and the doctor, asked first about the same launch, and the attach event both say deepstack was left out.
    A Qwen3.5 teacher for the Qwen3.5-MoE student: both sides of the family's pairing."""
    assets = build(tmp_path_factory, "qwen3_5_moe", "qwen3_5")
    out = tmp_path_factory.mktemp("qwen3_5_moe") / "out"
    argv = kit.gkd_command(assets, out, *STEPS)
    verdict = launch([VKD_SHIM, "doctor", "--", *argv], swift_env(swift_cache, VKD_CONFIG=SHIPPED), FAIL_FAST_TIMEOUT_S)
    assert verdict.returncode == 0, verdict.stdout + verdict.stderr
    lines = [line.strip() for line in verdict.stdout.splitlines()]
    assert "TARGETS: merger; left out: deepstack" in lines, verdict.stdout
    assert "family: student Qwen3.5-MoE (Qwen3_5MoeForConditionalGeneration)" in lines
    assert "family: teacher Qwen3.5 (Qwen3_5ForConditionalGeneration)" in lines
    assert "aligner (ms-swift registry): ['model.visual.merger']" in lines
    assert "modules: merger -> model.visual.merger" in lines, verdict.stdout
    assert any("optional target(s) deepstack left out" in line for line in lines), verdict.stdout
    assert not out.exists(), "the doctor ran nothing"

    rows, events = run(assets, out, SHIPPED, swift_cache)
    assert_term_on(rows, ["merger"])
    attach = attach_of(events)
    assert attach["families"] == {"student": "Qwen3.5-MoE", "teacher": "Qwen3.5"}
    assert attach["targets"] == ["merger"] and attach["left_out"] == ["deepstack"]
    assert attach["modules"] == {"merger": "model.visual.merger"}
    assert "optional target(s) deepstack left out" in attach["note"]


def test_switched_off_and_monitored_qwen3_5_train_bit_for_bit_like_plain_swift(tmp_path_factory, swift_cache):
    """The knob-off promise on a new family (hybrid linear attention, the Qwen3.5-MoE teacher): plain ms-swift,
    the bootstrap with VKD_ENABLE unset, and a monitored run measuring merger and ViT log the same loss,
    grad_norm and learning rate on every step and save the same adapter bytes."""
    assets = build(tmp_path_factory, "qwen3_5", "qwen3_5_moe")
    root = tmp_path_factory.mktemp("qwen3_5_equal")
    outs = {name: root / name for name in ("plain", "off", "monitor")}
    save = ("--save_strategy", "steps", "--save_steps", "3", "--eval_strategy", "no")
    trained(launch(kit.gkd_command(assets, outs["plain"], *STEPS, *save), swift_env(swift_cache)))
    off_events = root / "off.events.jsonl"
    off_env = swift_env(swift_cache, BOOTSTRAP_DIR, VKD_LOG_FILE=off_events)
    trained(launch(kit.gkd_command(assets, outs["off"], *STEPS, *save), off_env))
    rows, events = run(
        assets, outs["monitor"], SHIPPED, swift_cache, *save, VKD_MODE="monitor", VKD_TARGETS="merger,vit"
    )

    plain = trajectory(outs["plain"])
    assert [s for s, *_ in plain] == [1, 2, 3]
    assert trajectory(outs["off"]) == plain and trajectory(outs["monitor"]) == plain
    adapters = [(run_dir(o) / "checkpoint-3" / "adapter_model.safetensors").read_bytes() for o in outs.values()]
    assert adapters[1] == adapters[0] and adapters[2] == adapters[0]
    assert not off_events.exists(), "with VKD_ENABLE unset the shim must not even start"
    for row in train_rows(rows).values():
        assert "vision_kd_loss" not in row
        assert all(math.isfinite(row[f"vision_kd/{t}"]) for t in ("merger", "vit")), row
        assert math.isfinite(row["vision_kd/drift/merger"]) and row["vision_kd/drift/merger"] > 0, row
    attach = attach_of(events)
    assert attach["mode"] == "monitor" and attach["targets"] == ["merger", "vit"]
    assert attach["families"] == {"student": "Qwen3.5", "teacher": "Qwen3.5-MoE"}


#: family -> the module its registry entry (ms-swift's MultiModelKeys.aligner) resolves as the merger target.
MERGER_ONLY = {
    "qwen2_vl": "model.visual.merger",
    "qwen2_5_vl": "model.visual.merger",
    "gemma3_vision": "model.multi_modal_projector",
    "internvl": "model.multi_modal_projector",
    "glm4v": "model.visual.merger",
    "llava1_5_hf": "model.multi_modal_projector",
}
LABELS = {
    "qwen2_vl": "Qwen2-VL",
    "qwen2_5_vl": "Qwen2.5-VL",
    "gemma3_vision": "Gemma 3",
    "internvl": "InternVL",
    "glm4v": "GLM-4.1V",
    "llava1_5_hf": "LLaVA",
}


@pytest.mark.parametrize("family", sorted(MERGER_ONLY))
def test_a_merger_only_family_distils_its_aligner_and_vit_output(family, tmp_path_factory, swift_cache):
    """Qwen2.5-VL and three non-Qwen families whose aligner ms-swift's registry names (Gemma 3's pooling projector,
    InternVL's pixel-shuffle MLP, GLM-4.1V's merger): the shipped configs plus a `vit` target, with the ViT
    trainable. Finite distances on the aligner and on the ViT output entering it; deepstack left out."""
    assets = build(tmp_path_factory, family)
    out = tmp_path_factory.mktemp(family) / "out"
    with_vit = write_config(
        out.parent / "vit.yaml",
        targets={"merger": 1.0, "deepstack": 0.5, "vit": 0.5},
        optional_targets=["deepstack"],
    )
    rows, events = run(assets, out, f"{SHIPPED}{os.pathsep}{with_vit}", swift_cache, "--freeze_vit", "false")
    assert_term_on(rows, ["merger", "vit"])
    attach = attach_of(events)
    assert attach["families"] == {"student": LABELS[family], "teacher": LABELS[family]}
    assert attach["modules"] == {"merger": MERGER_ONLY[family], "vit": f"{MERGER_ONLY[family]} (input)"}
    assert attach["left_out"] == ["deepstack"]


def test_gemma_3_under_lora_with_a_frozen_vit_is_refused_not_trained_with_a_constant(tmp_path_factory, swift_cache):
    """Gemma 3's projector is a bare matrix that LoRA gives no adapter, so with ms-swift's frozen ViT nothing upstream
    of the aligner output can move (its parent module holds the language model, which must not count): the run
    stops at trainer construction, naming why, instead of adding a constant term."""
    assets = build(tmp_path_factory, "gemma3_vision")
    out = tmp_path_factory.mktemp("gemma3_frozen") / "out"
    argv = [VKD_RUN, "--config", SHIPPED, *kit.gkd_command(assets, out, *STEPS)]
    proc = launch(argv, swift_env(swift_cache))
    assert proc.returncode != 0, report(proc)
    last = proc.stderr.strip().splitlines()[-1]
    assert "nothing upstream of the captured aligner outputs (merger) is trainable" in last, report(proc)
    assert "Gemma 3's projector matrix" in last and "--freeze_vit false" in last, report(proc)
