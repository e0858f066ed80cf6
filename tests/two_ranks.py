"""What the two-rank engine suites share (tests/test_deepspeed.py, tests/test_fsdp.py): a real
`swift rlhf --rlhf_type gkd` launch on two CPU ranks, its result as a user sees it, and the comparisons
they make against plain DDP on the same rows (the session fixtures `ddp_plain` / `ddp_vkd` in conftest.py
run those two DDP baselines once for both suites).

Every run: NPROC_PER_NODE=2, `--use_cpu true --ddp_backend gloo` (what makes CPU ranks one job, see
docs/DISTRIBUTED.md), 3 steps, off-policy (`--lmbda 0`: no sampling, so every engine sees the same
batches), the kit's image / video / text rows (with seed 42 one rank's micro-batch is text-only while the
other's has images at step 1), evaluation after step 3, no checkpoint unless a test asks. A run that must
equal another does so per step to logging.jsonl's 8 decimals (tolerance: two units of the last one, or
1e-4 relative); a switched-off run equals its plain twin exactly.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest
from e2e_support import SHIPPED_CONFIGS, VKD_RUN, free_port, numbers  # noqa: F401 (numbers: the suites import it from here)

from vkd_shim.bootstrap import BOOTSTRAP_DIR
from vkd_shim.testing import launch as kit

TESTS = Path(__file__).resolve().parent
CHECKPOINT_PROBE = TESTS / "checkpoint_probe.py"
RANK_EXIT = TESTS / "rank_exit"  # last on every run's PYTHONPATH: see its sitecustomize
TIMEOUT_S = 900
STEPS = 3
REL, ABS = 1e-4, 2e-8
KD_KEYS = ("vision_kd_loss", "vision_kd/merger", "vision_kd/deepstack_0", "vision_kd/deepstack_1")
DISTANCES = KD_KEYS[1:]
ALIGNER = {"merger", "deepstack_merger_list.0", "deepstack_merger_list.1"}
SAVE_AT_2 = ("--save_strategy", "steps", "--save_steps", "2")
#: What gloo says when two ranks issue different collectives (the ms-swift bugs the strict xfails pin).
COLLECTIVE_MISMATCH = ("Received data size doesn't match expected size", "collective mismatch")


class UpstreamFailure(Exception):
    """A 2-rank run that died of the named upstream error, and of nothing else (see Run.unless_upstream)."""


class Run:
    """One finished 2-rank run, as a user sees it: exit code, output, logging.jsonl rows, event lines."""

    def __init__(self, code: int, output: str, out: Path, events: Path) -> None:
        self.code, self.output, self.out = code, output, out
        rows = kit.read_logging_jsonl(out) if list(out.glob("v*-*/logging.jsonl")) else []
        self.train = [r for r in rows if "loss" in r]
        self.evals = [r for r in rows if "eval_loss" in r]
        lines = events.read_text().splitlines() if events.exists() else []
        self.events = [json.loads(x) for x in lines if x.strip()]

    def trained(self) -> Run:
        assert self.code == 0, self.output[-5000:]
        return self

    def unless_upstream(self, *markers: str) -> Run:
        """Raise :class:`UpstreamFailure` when the run failed with every marker in its output: what a strict
        ``xfail(raises=UpstreamFailure)`` pins. Any other failure stays an ordinary test failure, and a run
        that passes (the upstream bug fixed) goes on to the test's asserts, so the xfail turns into XPASS."""
        if self.code != 0 and all(marker in self.output for marker in markers):
            raise UpstreamFailure(f"exit {self.code} with {markers}")
        return self

    def named(self, name: str) -> list[dict]:
        return [e for e in self.events if e["event"] == name]

    def checkpoint(self, step: int) -> Path:
        (path,) = self.out.glob(f"v*-*/checkpoint-{step}")
        return path


def run_two_ranks(
    assets: dict,
    cache: Path,
    out: Path,
    *extra: str,
    vkd: bool = False,
    gate_off: bool = False,
    harness: Iterable[Path] = (),
    env: Mapping[str, str] | None = None,
    swift: Path | None = None,
) -> Run:
    """A 2-rank CPU run in a session of its own (a hang kills torchrun and both workers and fails the test).

    `vkd` launches through vkd-run with the shipped configs; `gate_off` puts the bootstrap first on
    PYTHONPATH with VKD_ENABLE unset, the way a shared image that has the shim installed runs every job.
    `harness` directories (test-only sitecustomize files, each chaining to the next) follow on PYTHONPATH,
    then tests/rank_exit; `env` adds the variables that switch them on. `swift` is another environment's
    console script (a fresh venv holding the wheel).
    """
    argv = kit.gkd_command(
        assets,
        out,
        *("--use_cpu", "true", "--ddp_backend", "gloo", "--lmbda", "0", "--max_steps", str(STEPS)),
        *("--eval_steps", str(STEPS), "--save_strategy", "no", *extra),
    )
    if swift is not None:
        argv[0] = str(swift)
    child = {k: v for k, v in kit.gkd_env(cache_dir=cache).items() if not k.startswith("VKD_")}
    child.update(NPROC_PER_NODE="2", MASTER_PORT=str(free_port()), **(env or {}))
    pythonpath = [*([BOOTSTRAP_DIR] if gate_off else []), *map(str, harness), str(RANK_EXIT)]
    child["PYTHONPATH"] = os.pathsep.join(pythonpath)
    events = out.parent / "events.jsonl"
    if gate_off:
        child["VKD_LOG_FILE"] = str(events)
    if vkd:
        argv = [VKD_RUN, "--config", os.pathsep.join(map(str, SHIPPED_CONFIGS)), "--log-file", events, *argv]
    proc = subprocess.Popen(
        [str(a) for a in argv], env=child, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"hung: no exit after {TIMEOUT_S} s\n{proc.communicate()[0][-5000:]}")
    return Run(proc.returncode, output, out, events)


def assert_same(got: list[dict], want: list[dict], keys: tuple[str, ...], steps: int = STEPS) -> None:
    assert len(got) == len(want) == steps, (got, want)
    for g, w in zip(got, want, strict=True):
        for key in keys:
            assert math.isfinite(g[key]), (g["global_step/max_steps"], key, g)
            assert g[key] == pytest.approx(w[key], rel=REL, abs=ABS), (g["global_step/max_steps"], key, g[key], w[key])


def assert_vision_kd_ran(run: Run) -> None:
    """Finite in train and eval, non-zero once the warm-up (2 steps in the stage-3 overlay) lets it in,
    both ranks attached and summarized, nothing skipped."""
    assert len(run.train) == STEPS and run.evals, run.output[-3000:]
    assert all(math.isfinite(r[k]) for r in run.train for k in KD_KEYS), run.train
    assert run.train[0]["vision_kd/merger"] > 0 and all(r["vision_kd_loss"] > 0 for r in run.train[1:]), run.train
    assert all(math.isfinite(run.evals[-1][f"eval_{k}"]) and run.evals[-1][f"eval_{k}"] > 0 for k in KD_KEYS)
    assert not run.named("vkd.skip") and not run.named("vkd.refuse"), run.events
    assert sorted(e["rank"] for e in run.named("vkd.attach")) == [0, 1]
    assert sorted(e["rank"] for e in run.named("vkd.summary")) == [0, 1]


def probe_checkpoint(student: str, checkpoint: Path, cache: Path) -> dict:
    """What a process without the shim loads from the checkpoint (tests/checkpoint_probe.py)."""
    proc = subprocess.run(
        [sys.executable, str(CHECKPOINT_PROBE), student, str(checkpoint)],
        env=kit.gkd_env(cache_dir=cache), capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded["vkd_shim_imported"] is False and loaded["saved"] > 0, loaded
    assert len(loaded["restored_exactly"]) == loaded["saved"], loaded
    return loaded
