"""`vkd-shim doctor` / `python -m vkd_shim doctor` in real interpreters: what a user runs before a job."""

import os
import subprocess
import sys
from pathlib import Path

from vkd_shim.bootstrap import BOOTSTRAP_DIR

REPO = Path(__file__).resolve().parents[1]
CONFIGS = os.pathsep.join(str(REPO / "configs" / name) for name in ("visual_kd_base.yaml", "stage3_visual_kd.yaml"))


def doctor(*launch: str, pythonpath: str | None = None, **env_extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VKD_") and k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", MODELSCOPE_OFFLINE="1", TRL_EXPERIMENTAL_SILENCE="1", **env_extra)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run(
        [sys.executable, "-m", "vkd_shim", "doctor", *launch], env=env, capture_output=True, text=True, timeout=300
    )


def test_doctor_reports_a_ready_setup_and_exits_zero():
    proc = doctor(pythonpath=BOOTSTRAP_DIR, VKD_ENABLE="1", VKD_CONFIG=CONFIGS)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "a child Python process started with this environment activates: yes" in out
    assert "weight: 0.1  <- " + str(REPO / "configs" / "stage3_visual_kd.yaml") in out
    assert "ms-swift: 4.6.0" in out and "ms-swift layout: 4.6.x" in out
    assert "[ok] swift.rlhf_trainers.gkd_trainer:GKDTrainer.compute_loss" in out
    assert out.rstrip().endswith("OK")
    # Read-only: the doctor's own process booted with VKD_ENABLE=1 but patched nothing.
    assert '"vkd.patch"' not in proc.stderr


def test_doctor_names_an_invalid_config_and_exits_non_zero(tmp_path):
    bad = tmp_path / "stage3.yaml"
    bad.write_text("custom:\n  visual_kd:\n    distance: l2\n")
    proc = doctor(pythonpath=BOOTSTRAP_DIR, VKD_ENABLE="1", VKD_CONFIG=str(bad))
    assert proc.returncode == 1
    assert f"PROBLEM: invalid vision-KD config in {bad}: custom.visual_kd.distance = 'l2'" in proc.stdout
    assert "allowed values: mse, cosine, nmse, relation" in proc.stdout
    assert "the run would stop" in proc.stdout


def test_doctor_makes_disabled_by_config_a_visible_decision(tmp_path):
    off = tmp_path / "off.yaml"
    off.write_text("custom:\n  visual_kd:\n    enabled: false\n")
    proc = doctor(pythonpath=BOOTSTRAP_DIR, VKD_ENABLE="1", VKD_CONFIG=str(off))
    assert proc.returncode == 0, proc.stdout
    assert "DECISION: the config turns the term off: the run trains without vision KD" in proc.stdout


def test_doctor_refuses_a_switch_that_is_neither_on_nor_off():
    proc = doctor(pythonpath=BOOTSTRAP_DIR, VKD_ENABLE="enable")
    assert proc.returncode == 1
    assert "VKD_ENABLE = 'enable': neither on nor off" in proc.stdout


def test_doctor_prints_the_monitor_decision_and_how_each_launch_path_activates():
    proc = doctor(pythonpath=BOOTSTRAP_DIR, VKD_ENABLE="1", VKD_CONFIG=CONFIGS, VKD_MODE="monitor")
    assert proc.returncode == 0, proc.stdout
    assert "mode: 'monitor'  <- env:VKD_MODE" in proc.stdout
    assert "MONITOR: the run measures each target's distance and relative drift" in proc.stdout
    assert "a child Python process started by vkd-run activates: yes" in proc.stdout
    # The checkout's editable install has no vkd_shim.pth: the doctor says the switch alone would not do.
    assert "(vkd_shim.pth start-up hook) activates: no" in proc.stdout


def test_doctor_configs_prints_the_shipped_recipe_as_a_vkd_config_value():
    proc = subprocess.run(
        [sys.executable, "-m", "vkd_shim", "configs"], capture_output=True, text=True, timeout=60, check=True
    )
    paths = proc.stdout.strip().split(os.pathsep)
    assert [Path(p).name for p in paths] == ["visual_kd_base.yaml", "stage3_visual_kd.yaml"]
    assert all(Path(p).is_file() for p in paths)


def test_doctor_catches_a_gate_that_children_would_not_see():
    """VKD_ENABLE=1 exported, but no sitecustomize on the path: every worker would train without KD."""
    proc = doctor(VKD_ENABLE="1")
    assert proc.returncode == 1
    assert "activates: no" in proc.stdout
    assert "a child process would not activate" in proc.stdout
