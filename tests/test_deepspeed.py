"""DeepSpeed ZeRO-2 / ZeRO-3 on two CPU ranks: plain ms-swift GKD is faithful to DDP, and vision KD matches DDP.

Why: users run Stage-3 GKD under DeepSpeed and CI has no GPU, and a DeepSpeed run on CPU that "exits 0"
proved nothing: with DeepSpeed 0.18.9 plain ms-swift logged loss 0.0 / grad_norm 1.0 (a NaN loss hidden
by `logging_nan_inf_filter`; the causes are in docs/DISTRIBUTED.md). Every run is a real
`swift rlhf --rlhf_type gkd` launch with NPROC_PER_NODE=2, `--use_cpu true --ddp_backend gloo`, off-policy
(`--lmbda 0`: no sampling, so DeepSpeed and DDP see the same batches), 3 steps, the kit's image / video /
text rows (with seed 42 one rank's micro-batch is text-only while the other's has images, so under
DeepSpeed ms-swift runs the vision tower on its dummy image there), and must equal the same run under
plain DDP, per step, to logging.jsonl's 8 decimals (tolerance: two units of the last one, or 1e-4 relative).

DeepSpeed 0.19.8 (pinned in requirements/swift46.txt); ms-swift's own `--teacher_deepspeed` bug is worked
around in the children only (tests/ds_cpu_harness), and a strict xfail shows it without the workaround.
Configs: tests/ds_configs (ms-swift's zero2/zero3 with fp16/bf16 disabled and no train_batch_size).

Cost on 2 CPU cores: 6 two-rank runs, 30-150 s each, plus one build of DeepSpeed's CPU comm op (cached).
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from vkd_shim.testing import launch as kit

pytestmark = [pytest.mark.deepspeed, pytest.mark.e2e]

TESTS = Path(__file__).resolve().parent
HARNESS_DIR = TESTS / "ds_cpu_harness"
ZERO2, ZERO3 = TESTS / "ds_configs" / "ds_zero2_cpu.json", TESTS / "ds_configs" / "ds_zero3_cpu.json"
SHIPPED_CONFIGS = [TESTS.parent / "configs" / name for name in ("visual_kd_base.yaml", "stage3_visual_kd.yaml")]
VKD_RUN = Path(sys.executable).with_name("vkd-run")
TIMEOUT_S = 900
STEPS = 3
REL, ABS = 1e-4, 2e-8
KD_KEYS = ("vision_kd_loss", "vision_kd/merger", "vision_kd/deepstack_0", "vision_kd/deepstack_1")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_gkd(assets: dict, cache: Path, out: Path, *extra: str, vkd: bool = False, harness_skip: str = "") -> tuple:
    """A 2-rank CPU run in a session of its own (a hang kills torchrun and both workers and fails the test);
    returns (exit code, output, train rows, eval rows, event lines)."""
    argv = kit.gkd_command(
        assets,
        out,
        *("--use_cpu", "true", "--ddp_backend", "gloo", "--lmbda", "0", "--max_steps", str(STEPS)),
        *("--eval_steps", str(STEPS), "--save_strategy", "no", *extra),
    )
    env = {k: v for k, v in kit.gkd_env(cache_dir=cache).items() if not k.startswith("VKD_")}
    env.update(NPROC_PER_NODE="2", MASTER_PORT=str(free_port()), DS_ACCELERATOR="cpu")
    env.update(PYTHONPATH=str(HARNESS_DIR), DS_CPU_HARNESS="1", DS_CPU_HARNESS_SKIP=harness_skip)
    events = out.parent / "events.jsonl"
    if vkd:
        argv = [VKD_RUN, "--config", os.pathsep.join(map(str, SHIPPED_CONFIGS)), "--log-file", events, *argv]
    proc = subprocess.Popen(
        [str(a) for a in argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"hung: no exit after {TIMEOUT_S} s\n{proc.communicate()[0][-5000:]}")
    rows = kit.read_logging_jsonl(out) if list(out.glob("v*-*/logging.jsonl")) else []
    lines = [json.loads(x) for x in events.read_text().splitlines() if x.strip()] if events.exists() else []
    return proc.returncode, output, [r for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r], lines


def deepspeed(student: Path, teacher: Path | None = None) -> tuple[str, ...]:
    flags = ("--deepspeed", str(student), "--fp16", "false", "--bf16", "false")
    return (*flags, "--teacher_deepspeed", str(teacher)) if teacher else flags


def assert_same(got: list[dict], want: list[dict], keys: tuple[str, ...]) -> None:
    assert len(got) == len(want) == STEPS, (got, want)
    for step, (g, w) in enumerate(zip(got, want, strict=True), start=1):
        for key in keys:
            assert math.isfinite(g[key]), (step, key, g)
            assert g[key] == pytest.approx(w[key], rel=REL, abs=ABS), (step, key, g[key], w[key])


@pytest.fixture(scope="module")
def ddp_plain(gkd_assets, swift_cache, tmp_path_factory):
    code, output, train, evals, _ = run_gkd(gkd_assets, swift_cache, tmp_path_factory.mktemp("ddp") / "out")
    assert code == 0, output[-5000:]
    assert all(r["loss"] > 0 and r["grad_norm"] > 0 for r in train), train
    return train, evals


@pytest.fixture(scope="module")
def ddp_vkd(gkd_assets, swift_cache, tmp_path_factory):
    code, output, train, evals, _ = run_gkd(
        gkd_assets, swift_cache, tmp_path_factory.mktemp("ddp_vkd") / "out", vkd=True
    )
    assert code == 0, output[-5000:]
    return train, evals


@pytest.mark.parametrize(("student", "teacher"), [(ZERO2, None), (ZERO3, ZERO3)], ids=["zero2", "zero3+teacher_zero3"])
def test_plain_gkd_under_deepspeed_matches_ddp(student, teacher, ddp_plain, gkd_assets, swift_cache, tmp_path):
    """Same data, seed and optimizer steps as DDP: per-step loss and grad_norm, and the eval loss, agree."""
    code, output, train, evals, _ = run_gkd(gkd_assets, swift_cache, tmp_path / "out", *deepspeed(student, teacher))
    assert code == 0, output[-5000:]
    assert_same(train, ddp_plain[0], ("loss", "grad_norm"))
    assert evals[0]["eval_loss"] == pytest.approx(ddp_plain[1][0]["eval_loss"], rel=REL, abs=ABS)


def test_vision_kd_under_zero3_matches_ddp_from_the_first_step(ddp_vkd, gkd_assets, swift_cache, tmp_path):
    """ZeRO-3 student and ZeRO-3 teacher: the hooks see full, gathered outputs (not partitions), so every
    target's distance equals DDP's from step 1, the text-only rank's dummy-image features never count,
    the term is finite and non-zero after the warm-up, in train and eval, and both ranks attach."""
    flags = deepspeed(ZERO3, ZERO3)
    code, output, train, evals, events = run_gkd(gkd_assets, swift_cache, tmp_path / "out", *flags, vkd=True)
    assert code == 0, output[-5000:]
    assert_same(train, ddp_vkd[0], ("loss", "grad_norm", *KD_KEYS))
    assert train[0]["vision_kd/merger"] > 0 and all(r["vision_kd_loss"] > 0 for r in train[1:]), train
    for key in ("eval_loss", *(f"eval_{k}" for k in KD_KEYS)):
        assert evals[0][key] == pytest.approx(ddp_vkd[1][0][key], rel=REL, abs=ABS), key
    assert not [e for e in events if e["event"] in ("vkd.skip", "vkd.refuse")]
    assert sorted(e["rank"] for e in events if e["event"] == "vkd.attach") == [0, 1]
    assert len([e for e in events if e["event"] == "vkd.summary"]) == 2


@pytest.mark.xfail(
    reason="ms-swift 4.6.0 swift/rlhf_trainers/utils.py prepare_deepspeed: its local HfTrainerDeepSpeedConfig "
    "re-points transformers' global deepspeed-config weakref, which dies on return; is_deepspeed_enabled() "
    "turns False, the Qwen3-VL forward skips the vision tower on the text-only rank, and the ZeRO-3 ranks "
    "issue different all-gathers (collective mismatch).",
    strict=True,
)
def test_zero3_teacher_without_the_ms_swift_workaround(ddp_plain, gkd_assets, swift_cache, tmp_path):
    flags = deepspeed(ZERO3, ZERO3)
    code, output, train, _, _ = run_gkd(gkd_assets, swift_cache, tmp_path / "out", *flags, harness_skip="teacher")
    assert code == 0, output[-3000:]
    assert_same(train, ddp_plain[0], ("loss", "grad_norm"))
