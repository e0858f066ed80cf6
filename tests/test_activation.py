"""Activation as users install and launch it, and nothing they asked for dropped silently.

- The switch alone: the package's wheel in a fresh virtual environment (no PYTHONPATH of ours, no
  sitecustomize of the user's), `VKD_ENABLE=1 swift rlhf ...` trains with the term; unset, the package is
  not even imported. The demo runs from that wheel outside the checkout.
- A launch vision KD cannot serve stops before loading, and `vkd-shim doctor` says so first: `swift sft`,
  a `vit` target behind a frozen ViT (in tests/test_e2e.py's refusal matrix), the README's launch checked
  with the switch off.
- Commands that do not train (`swift export`, `swift infer`, ...) hear nothing from the shim.
- The doctor writes nothing a run would see (no `vN-*` directory) and judges an unusable `VKD_LOG_FILE` as
  the run does: the run trains and writes its events to stderr.

Cost on 2 CPU cores: 3 training runs (about a minute each) and a dozen short processes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from e2e_support import (
    FAIL_FAST_TIMEOUT_S,
    LOADER_MARKER,
    PROBE_FILE_ENV,
    VKD_RUN,
    VKD_SHIM,
    launch,
    named,
    read_jsonl,
    report,
    swift_env,
    train_rows,
    trained,
    without,
    write_config,
)
from two_ranks import KD_KEYS, assert_same, assert_vision_kd_ran, run_two_ranks

from vkd_shim.testing import launch as kit

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
TWO_STEPS = ("--max_steps", "2", "--eval_strategy", "no", "--save_strategy", "no")


@pytest.fixture(scope="session")
def wheel_venv(tmp_path_factory) -> Path:
    """A fresh venv holding the package's wheel, as `pip install vkd-shim` leaves it.

    The ms-swift stack (and torch) come from this test's environment through a plain path file, which
    adds their directories to sys.path without running the .pth files there (so the source tree's
    editable install stays invisible); `bin/swift` is the console script pip would write for ms-swift.
    """
    root = tmp_path_factory.mktemp("wheel_venv")
    dist = root / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", dist, REPO],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = dist.glob("vkd_shim-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", wheel],
        check=True,
        capture_output=True,
        timeout=600,
    )
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    torch_dir = Path(importlib.util.find_spec("torch").origin).parents[1]
    stack = dict.fromkeys([sysconfig.get_path("purelib"), str(torch_dir)])
    (Path(purelib) / "_test_stack.pth").write_text("".join(f"{p}\n" for p in stack), encoding="utf-8")
    swift = venv / "bin" / "swift"
    swift.write_text(f"#!{python}\nimport sys\nfrom swift.cli.main import cli_main\nsys.exit(cli_main())\n")
    swift.chmod(0o755)
    assert (Path(purelib) / "vkd_shim.pth").is_file()
    return venv


def in_venv(venv: Path, code: str, **env_extra: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VKD_") and k != "PYTHONPATH"}
    proc = subprocess.run(
        [venv / "bin" / "python", "-c", code],
        env={**env, **env_extra},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=venv,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


STATE = (
    "import sys, json; b = sys.modules.get('vkd_shim.bootstrap'); "
    "print(json.dumps([b is not None and b.is_active(), getattr(b, '__file__', None), "
    "sorted(m for m in sys.modules if m.split('.')[0] in ('vkd_shim', 'wrapt', 'swift', 'torch'))]))"
)


def test_the_switch_alone_activates_an_installed_wheel(wheel_venv, gkd_assets, swift_cache, probe_dir, tmp_path):
    off = json.loads(in_venv(wheel_venv, STATE))
    assert off == [False, None, []]  # unset: the start-up line reads one variable, imports nothing
    active, where, loaded = json.loads(in_venv(wheel_venv, STATE, VKD_ENABLE="1"))
    assert active and where.startswith(str(wheel_venv)), where  # the wheel's copy, not the checkout's
    assert loaded == ["vkd_shim", "vkd_shim.bootstrap", "vkd_shim.env", "vkd_shim.errors"]

    configs = in_venv(wheel_venv, "from vkd_shim import examples; print(examples.stage3_value())")
    assert all(Path(p).is_file() and p.startswith(str(wheel_venv)) for p in configs.split(os.pathsep))
    events_file = tmp_path / "events.jsonl"
    argv = [wheel_venv / "bin" / "swift", *kit.gkd_command(gkd_assets, tmp_path / "out", *TWO_STEPS)[1:]]
    env = swift_env(
        swift_cache,
        probe_dir,  # the user's own sitecustomize, still run
        VKD_ENABLE="1",
        VKD_CONFIG=configs,
        VKD_LOG_FILE=events_file,
        **{PROBE_FILE_ENV: tmp_path / "probe.jsonl"},
    )
    trained(launch(argv, env))
    rows = train_rows(kit.read_logging_jsonl(tmp_path / "out"))
    calls = read_jsonl(tmp_path / "probe.jsonl")  # the user's sitecustomize saw every compute_loss
    visual = {c["step"] + 1 for c in calls if c["mode"] == "train" and (c["image"] or c["video"])}
    assert visual and {s for s, r in rows.items() if "vision_kd_loss" in r} == visual, rows
    events = read_jsonl(events_file)
    (attach,) = named(events, "vkd.attach")
    assert attach["pid"] == calls[0]["pid"]  # in the training process itself
    assert [e["files"] for e in named(events, "vkd.config")] == [configs.split(os.pathsep)]


@pytest.mark.parametrize(
    ("module", "dist"), [("wrapt", "wrapt"), ("structlog", "structlog"), ("yaml", "PyYAML"), ("msgspec", "msgspec")]
)
def test_a_broken_dependency_stops_the_run_in_the_first_process(
    module, dist, wheel_venv, gkd_assets, swift_cache, probe_dir, tmp_path
):
    """Failure injection, one case per dependency the shim needs: a module of that name in the venv's own
    site-packages (ahead of the real one) fails to import, as after a half-finished upgrade. `VKD_ENABLE=1
    swift rlhf ...` from the wheel must not train without the term: it stops in ms-swift's CLI process (no
    re-exec, no model loader entered), naming the module, its distribution and the fix."""
    purelib = Path(in_venv(wheel_venv, "import sysconfig; print(sysconfig.get_path('purelib'))"))
    shadow = purelib / f"{module}.py"
    shadow.write_text(f"raise ImportError('{module} is broken in this environment')\n", encoding="utf-8")
    try:
        argv = [wheel_venv / "bin" / "swift", *kit.gkd_command(gkd_assets, tmp_path / "out", *TWO_STEPS)[1:]]
        env = swift_env(swift_cache, probe_dir, VKD_ENABLE="1", **{PROBE_FILE_ENV: tmp_path / "probe.jsonl"})
        proc = launch(argv, env, FAIL_FAST_TIMEOUT_S)
        assert in_venv(wheel_venv, "print('unrelated process')", VKD_ENABLE="1") == "unrelated process"
    finally:
        shadow.unlink()
    assert proc.returncode != 0, report(proc)
    assert "run sh:" not in proc.stdout and LOADER_MARKER not in proc.stderr, report(proc)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("vkd_shim.errors.PatchError: vision KD was asked for (VKD_ENABLE)"), report(proc)
    assert f"importing {module} failed" in last and f"pip install --force-reinstall {dist}" in last, last
    assert not (tmp_path / "out").exists()


def test_the_switch_alone_activates_every_ddp_rank_from_the_wheel(
    wheel_venv, gkd_assets, swift_cache, ddp_vkd, tmp_path
):
    """`VKD_ENABLE=1 NPROC_PER_NODE=2 swift rlhf ...` from the wheel, no vkd-run and no PYTHONPATH of ours: swift's
    re-exec and both torchrun workers activate through the wheel's vkd_shim.pth, and the run equals the
    2-rank run launched through vkd-run with the same configs, step for step and target for target."""
    configs = in_venv(wheel_venv, "from vkd_shim import examples; print(examples.stage3_value())")
    env = {"VKD_ENABLE": "1", "VKD_CONFIG": configs, "VKD_LOG_FILE": str(tmp_path / "events.jsonl")}
    run = run_two_ranks(gkd_assets, swift_cache, tmp_path / "out", env=env, swift=wheel_venv / "bin" / "swift")
    assert_vision_kd_ran(run.trained())
    assert_same(run.train, ddp_vkd.train, ("loss", "grad_norm", *KD_KEYS))
    (config,) = {tuple(e["files"]) for e in run.named("vkd.config")}
    assert all(path.startswith(str(wheel_venv)) for path in config), config  # the wheel's copies


def test_the_demo_runs_from_the_wheel_outside_the_checkout(wheel_venv, tmp_path):
    env = {k: v for k, v in kit.gkd_env(cache_dir=tmp_path / "cache").items() if not k.startswith("VKD_")}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [wheel_venv / "bin" / "python", "-m", "vkd_shim.demo", "--work", tmp_path / "demo"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, report(proc)
    assert "OK: " in proc.stdout and "a finite vision_kd_loss" in proc.stdout
    assert "nan" not in proc.stdout.lower()
    assert "warm-up starts at weight 0" in proc.stdout  # step 1's zero is explained, not left to guess


def sft_argv(gkd_assets: dict, output_dir: Path) -> list:
    return [
        Path(sys.executable).with_name("swift"), "sft",
        "--model", gkd_assets["student"], "--model_type", "qwen3_vl", "--torch_dtype", "float32",
        "--dataset", gkd_assets["train"], "--tuner_type", "lora", "--freeze_aligner", "false", "--max_steps", "1",
        "--dataloader_num_workers", "0", "--check_model", "false", "--output_dir", output_dir,
    ]  # fmt: skip


def test_swift_sft_under_the_switch_stops_before_loading_and_the_doctor_agrees(
    gkd_assets, swift_cache, probe_dir, tmp_path
):
    argv = sft_argv(gkd_assets, tmp_path / "out")
    env = swift_env(swift_cache, probe_dir, **{PROBE_FILE_ENV: tmp_path / "probe.jsonl"})
    proc = launch([VKD_RUN, "--config", write_config(tmp_path / "vkd.yaml", weight=0.1), *argv], env)
    assert proc.returncode != 0 and LOADER_MARKER not in proc.stderr, report(proc)
    last = proc.stderr.strip().splitlines()[-1]
    assert "trains without a teacher (swift sft / swift pt)" in last and "unset VKD_ENABLE" in last, report(proc)

    before = sorted((tmp_path / "out").glob("v*"))  # ms-swift's own parsing, before the refusal
    verdict = launch([VKD_RUN, "--config", tmp_path / "vkd.yaml", VKD_SHIM, "doctor", "--", *argv], env)
    assert verdict.returncode == 1, verdict.stdout
    assert "PROBLEM: vision KD refused: this launch trains without a teacher" in verdict.stdout
    assert sorted((tmp_path / "out").glob("v*")) == before  # the doctor left no run directory behind

    plain = launch(argv, env)  # the same launch without the switch trains as plain ms-swift
    trained(plain)
    assert '"vkd.' not in plain.stderr


def test_commands_that_do_not_train_hear_nothing_from_the_shim(swift_cache, tmp_path):
    """Vision KD switched on (through vkd-run, as the checkout's editable install has no .pth), even with a
    broken config: `swift export` and `swift infer` print no shim line. `swift rlhf --help` is the positive
    control: there the shim does activate, in the CLI process and in the re-exec'd one."""
    broken = write_config(tmp_path / "bad.yaml", distance="l2")
    env = swift_env(swift_cache, VKD_CONFIG=broken)
    swift = Path(sys.executable).with_name("swift")
    for command in ("export", "infer"):
        proc = launch([VKD_RUN, swift, command, "--help"], env, FAIL_FAST_TIMEOUT_S)
        assert proc.returncode == 0, report(proc)
        assert "vkd" not in proc.stdout + proc.stderr, report(proc)
    control = launch([VKD_RUN, swift, "rlhf", "--help"], env, FAIL_FAST_TIMEOUT_S)
    assert (control.stdout + control.stderr).count('"event": "vkd.activate"') == 2, report(control)


def test_the_doctor_checks_vision_kd_with_the_switch_off_and_creates_nothing(gkd_assets, swift_cache, tmp_path):
    """The README's `vkd-shim doctor -- swift rlhf ...`, run as written: the switch is off in that shell, and
    the launch lacks `--freeze_aligner false`, so the vision-KD run would refuse it; the doctor says so."""
    out = tmp_path / "out"
    config = write_config(tmp_path / "vkd.yaml", weight=0.1)
    env = swift_env(swift_cache, VKD_CONFIG=config)
    frozen = kit.gkd_command(gkd_assets, out, "--freeze_aligner", "true")
    verdict = launch([VKD_SHIM, "doctor", "--", *frozen], env, FAIL_FAST_TIMEOUT_S)
    assert verdict.returncode == 1, verdict.stdout + verdict.stderr
    assert "off: a launch from this shell, as written, trains WITHOUT vision KD" in verdict.stdout
    assert "PROBLEM: vision KD refused: nothing upstream" in verdict.stdout and "both frozen" in verdict.stdout

    ready = launch([VKD_SHIM, "doctor", "--", *kit.gkd_command(gkd_assets, out)], env, FAIL_FAST_TIMEOUT_S)
    assert ready.returncode == 0, ready.stdout + ready.stderr
    assert not out.exists(), list(out.rglob("*"))  # ms-swift's parser made out/vN-*; the doctor removed it


def test_the_doctor_leaves_nothing_behind_in_any_form_of_the_arguments(gkd_assets, swift_cache, tmp_path):
    """`--output_dir=PATH` and an abbreviated flag make ms-swift's parser create `PATH/vN-*` too; the user's
    existing `VKD_LOG_FILE` keeps its bytes and its modification time, and one that does not exist yet is
    not created (nor its directory)."""
    config = write_config(tmp_path / "vkd.yaml", weight=0.1)
    log = tmp_path / "logs" / "events.jsonl"
    log.parent.mkdir()
    log.write_text('{"event": "an earlier run"}\n', encoding="utf-8")
    stamp = log.stat().st_mtime_ns
    missing = tmp_path / "not_yet" / "events.jsonl"
    base = without(kit.gkd_command(gkd_assets, tmp_path / "unused"), "--output_dir")
    for form, log_file in (
        (["--output_dir=" + str(tmp_path / "eq")], log),
        (["--output_d", str(tmp_path / "ab")], missing),
    ):
        env = swift_env(swift_cache, VKD_CONFIG=config, VKD_LOG_FILE=log_file)
        verdict = launch([VKD_SHIM, "doctor", "--", *base, *form], env, FAIL_FAST_TIMEOUT_S)
        assert verdict.returncode == 0, verdict.stdout + verdict.stderr
        assert f"VKD_LOG_FILE={log_file} (" in verdict.stdout and "nothing was written there" in verdict.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs", "vkd.yaml"]
    assert log.read_text(encoding="utf-8") == '{"event": "an earlier run"}\n' and log.stat().st_mtime_ns == stamp


#: Trainability chosen by name: (flags, what the run does). The aligner and the ViT stay frozen (ms-swift's
#: defaults), so only the names decide whether the vision pathway can move.
BY_NAME = {
    "full_regex_misses_the_vision_pathway": (
        ("--tuner_type", "full", "--trainable_parameters_regex", r"lm_head"),
        False,
    ),
    "lora_regex_on_the_language_model_only": (("--target_regex", r".*language_model.*\.(q_proj|v_proj)"), False),
    "lora_regex_reaches_the_merger": (
        ("--target_regex", r".*(language_model.*\.q_proj|visual\.merger\.linear_fc1)"),
        True,
    ),
}


@pytest.mark.parametrize("case", list(BY_NAME))
def test_the_doctor_judges_trainability_by_name_as_the_run_does(case, gkd_assets, swift_cache, tmp_path):
    """ms-swift's `--trainable_parameters_regex` (full tuning) and `--target_regex` (LoRA) can unfreeze any
    parameter, so the flags alone cannot tell whether a target can move; the run decides at trainer
    construction, after both models load. The doctor builds the student's module tree on the meta device and
    gets the same verdict, before anything loads."""
    flags, trains = BY_NAME[case]
    argv = [
        *kit.gkd_command(gkd_assets, tmp_path / "out", *TWO_STEPS, "--max_steps", "1"),
        "--freeze_aligner",
        "true",
        *flags,
    ]
    env = swift_env(swift_cache, VKD_CONFIG=write_config(tmp_path / "vkd.yaml", weight=0.1, targets=["merger"]))
    verdict = launch([VKD_SHIM, "doctor", "--", *argv], env, FAIL_FAST_TIMEOUT_S)
    assert verdict.returncode == (0 if trains else 1), verdict.stdout + verdict.stderr
    said = (
        "every target has a trainable parameter upstream" if trains else "PROBLEM: vision KD refused: nothing upstream"
    )
    assert said in verdict.stdout and f"{flags[-2].lstrip('-')}={flags[-1]!r}" in verdict.stdout, verdict.stdout
    run = launch([VKD_RUN, *argv], env)
    if trains:
        trained(run)
        assert any("vision_kd/merger" in row for row in train_rows(kit.read_logging_jsonl(tmp_path / "out")).values())
    else:
        assert run.returncode != 0 and "vision KD refused: nothing upstream" in run.stderr, report(run)


def test_an_unusable_log_file_gets_the_same_verdict_from_the_doctor_and_the_run(gkd_assets, swift_cache, tmp_path):
    """`VKD_LOG_FILE` that cannot be created, or that takes no write (`/dev/full`): the run trains and its
    event lines go to stderr after one `vkd.log_file_error` warning; the doctor says so, exit 0, and for the
    device, which only a write could test, says that it does not write there and what the run would do."""
    argv = kit.gkd_command(gkd_assets, tmp_path / "out", *TWO_STEPS)
    config = write_config(tmp_path / "vkd.yaml", weight=0.1)
    for path, verdict_line in (
        ("/proc/vkd/events.jsonl", "WARNING: VKD_LOG_FILE=/proc/vkd/events.jsonl cannot be written (FileNotFoundError"),
        ("/dev/full", "VKD_LOG_FILE=/dev/full: not a regular file (a device or a pipe): only a write could tell"),
    ):
        env = swift_env(swift_cache, VKD_LOG_FILE=path)
        verdict = launch([VKD_RUN, "--config", config, VKD_SHIM, "doctor", "--", *argv], env, FAIL_FAST_TIMEOUT_S)
        assert verdict.returncode == 0, verdict.stdout + verdict.stderr
        line = next(line for line in verdict.stdout.splitlines() if "VKD_LOG_FILE=" in line)
        assert verdict_line in line and "stderr instead" in line, line

    proc = launch([VKD_RUN, "--config", config, *argv], swift_env(swift_cache, VKD_LOG_FILE="/dev/full"))
    trained(proc)
    lines = [json.loads(x) for x in proc.stderr.splitlines() if x.startswith('{"timestamp"')]
    errors = named(lines, "vkd.log_file_error")  # once per process: swift's CLI and the training process
    assert sorted(e["pid"] for e in errors) == sorted({line["pid"] for line in lines}), errors
    assert all(e["level"] == "warning" and e["path"] == "/dev/full" for e in errors)
    assert named(lines, "vkd.attach") and named(lines, "vkd.summary")
