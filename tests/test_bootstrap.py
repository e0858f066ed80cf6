"""Bootstrap and launcher across real interpreter starts (post-import hooks are process-global)."""

import json
import os
import py_compile
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from vkd_shim.bootstrap import BOOTSTRAP_DIR

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_DIR = REPO / "sitecustomize_example"
HEAVY = ("torch", "transformers", "swift", "structlog", "yaml", "wrapt")
GKD = "swift.rlhf_trainers.gkd_trainer"
RLHF = "swift.pipelines.train.rlhf"

# Printed by the child: which of our wrappers sit on the real ms-swift attributes.
REPORT_PATCHES = textwrap.dedent(
    """
    import json, sys, wrapt
    from swift.rlhf_trainers.gkd_trainer import GKDTrainer
    from swift.pipelines.train.rlhf import SwiftRLHF
    def depth(obj):
        n = 0
        while isinstance(obj, wrapt.FunctionWrapper):
            n, obj = n + 1, obj.__wrapped__
        return n
    print("REPORT" + json.dumps({
        "compute_loss": depth(GKDTrainer.__dict__["compute_loss"]),
        "init": depth(GKDTrainer.__dict__["__init__"]),
        "log": depth(GKDTrainer.__dict__["log"]),
        "prepare": depth(SwiftRLHF.__dict__["_prepare_model_tokenizer"]),
    }))
    """
)


def child_env(pythonpath=(), **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VKD_") and k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", MODELSCOPE_OFFLINE="1", TRL_EXPERIMENTAL_SILENCE="1")
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(str(p) for p in pythonpath)
    env.update(extra)
    return env


def run_py(code: str, *args: str, env: dict, python: str = sys.executable, cwd=None) -> subprocess.CompletedProcess:
    proc = subprocess.run([python, *args, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def report(proc: subprocess.CompletedProcess) -> dict:
    line = next(x for x in proc.stdout.splitlines() if x.startswith("REPORT"))
    return json.loads(line[len("REPORT") :])


LOADED = (
    "import sys, json; site = getattr(sys.modules.get('sitecustomize'), '__file__', None); "
    "print('REPORT' + json.dumps([sorted(sys.modules), site]))"
)


@pytest.mark.parametrize("gate", [None, "0", "false", ""])
@pytest.mark.parametrize("site_dir", [BOOTSTRAP_DIR, EXAMPLE_DIR], ids=["packaged", "example"])
def test_disabled_imports_nothing_heavy(gate, site_dir):
    extra = {} if gate is None else {"VKD_ENABLE": gate}
    proc = run_py(LOADED, env=child_env([site_dir], **extra))
    loaded, site_file = report(proc)
    assert Path(site_file).parent == Path(site_dir)  # our sitecustomize really ran
    heavy = {m for m in loaded if m.split(".")[0] in HEAVY}
    assert not heavy, heavy
    ours = {m for m in loaded if m.startswith("vkd_shim")}
    # unset or empty: the stdlib-only bootstrap (for chaining) and one lookup; "0"/"false" also parse
    # the value with the stdlib-only env module.
    allowed = {"vkd_shim", "vkd_shim.bootstrap"} | ({"vkd_shim.env", "vkd_shim.errors"} if gate else set())
    assert ours <= allowed, ours
    assert proc.stderr == ""


@pytest.mark.parametrize("value", ["2", "enable", "maybe"])
def test_switch_that_is_neither_on_nor_off_stays_silent_outside_ms_swift(value):
    """Unrelated Python processes are never broken or noisy; ms-swift processes stop (test_patches)."""
    proc = run_py(LOADED, env=child_env([BOOTSTRAP_DIR], VKD_ENABLE=value))
    loaded, _ = report(proc)
    assert proc.stderr == "" and not {m for m in loaded if m.split(".")[0] in ("torch", "swift")}


def test_example_on_pythonpath_as_is_still_runs_the_users_sitecustomize(tmp_path):
    user = tmp_path / "user_site"
    user.mkdir()
    (user / "sitecustomize.py").write_text("print('USER SITE')\n")
    proc = run_py(LOADED, env=child_env([EXAMPLE_DIR, user], VKD_ENABLE="1"))
    assert "USER SITE" in proc.stdout
    assert report(run_py(ACTIVE, env=child_env([EXAMPLE_DIR, user], VKD_ENABLE="1"))) is True  # and activated


ACTIVE = "import sys; print('REPORT' + str(sys.modules['vkd_shim.bootstrap'].is_active()).lower())"


@pytest.mark.parametrize("site_dir", [BOOTSTRAP_DIR, EXAMPLE_DIR], ids=["packaged", "example"])
def test_switch_on_costs_a_process_that_never_imports_ms_swift_only_the_stdlib_bootstrap(site_dir):
    """With VKD_ENABLE=1 exported in a shell, every Python process boots the shim. Until one imports ms-swift,
    the shim is a finder waiting for `swift`: no wrapt (it pulls in asyncio), no importlib.metadata, no
    layouts; the rest of the cost is measured by tests/benchmarks/bench_startup.py."""
    proc = run_py(LOADED + "; " + ACTIVE.split("; ", 1)[1], env=child_env([site_dir], VKD_ENABLE="1"))
    loaded, _ = json.loads(proc.stdout.splitlines()[0][len("REPORT") :])
    assert proc.stdout.splitlines()[1] == "REPORTtrue"
    assert not {m for m in loaded if m.split(".")[0] in HEAVY}
    assert not {"asyncio", "importlib.metadata", "typing", "vkd_shim.swift_layouts"} & set(loaded)
    assert {m for m in loaded if m.startswith("vkd_shim")} == {
        "vkd_shim",
        "vkd_shim.bootstrap",
        "vkd_shim.env",
        "vkd_shim.errors",
    }


def test_inline_block_without_the_switch_is_explained(tmp_path, capsys):
    from vkd_shim import bootstrap

    path = tmp_path / "gkd.yaml"
    path.write_text("rlhf_type: gkd\ncustom:\n  visual_kd:\n    weight: 0.1\n")
    bootstrap.hint_inline_block(["/venv/bin/swift", "rlhf", str(path)])
    assert "VKD_ENABLE is not set" in capsys.readouterr().err
    (tmp_path / "plain.yaml").write_text("rlhf_type: gkd\n")
    bootstrap.hint_inline_block(["/venv/bin/swift", "rlhf", str(tmp_path / "plain.yaml")])
    assert capsys.readouterr().err == ""


def test_enabled_wraps_real_trainer_once_after_import():
    proc = run_py(REPORT_PATCHES, env=child_env([BOOTSTRAP_DIR], VKD_ENABLE="1"))
    assert report(proc) == {"compute_loss": 1, "init": 1, "log": 1, "prepare": 1}
    events = [json.loads(x) for x in proc.stderr.splitlines() if x.startswith("{")]
    applied = {e["target"] for e in events if e["event"] == "vkd.patch" and e["status"] == "applied"}
    assert f"{GKD}:GKDTrainer.compute_loss" in applied
    assert f"{RLHF}:SwiftRLHF._prepare_model_tokenizer" in applied


def test_import_before_activation_double_activation_and_deactivate():
    code = textwrap.dedent(
        """
        import wrapt
        from swift.rlhf_trainers.gkd_trainer import GKDTrainer
        from swift.pipelines.train import rlhf
        original = GKDTrainer.__dict__["compute_loss"]
        import vkd_shim
        from vkd_shim import bootstrap
        assert vkd_shim.activate() is True
        assert vkd_shim.activate() is False        # second call: no-op
        bootstrap.boot()                           # sitecustomize after activate(): no-op
        wrapped = GKDTrainer.__dict__["compute_loss"]
        assert isinstance(wrapped, wrapt.FunctionWrapper) and wrapped.__wrapped__ is original
        assert vkd_shim.deactivate() is True
        assert GKDTrainer.__dict__["compute_loss"] is original
        assert not isinstance(rlhf.SwiftRLHF.__dict__["_prepare_model_tokenizer"], wrapt.FunctionWrapper)
        assert vkd_shim.deactivate() is False
        assert vkd_shim.activate() is True         # re-activation re-applies, still once
        again = GKDTrainer.__dict__["compute_loss"]
        assert isinstance(again, wrapt.FunctionWrapper) and again.__wrapped__ is original
        print("REPORT" + "{}")
        """
    )
    proc = run_py(code, env=child_env(VKD_ENABLE="1"))
    assert report(proc) == {}
    statuses = [json.loads(x)["status"] for x in proc.stderr.splitlines() if '"vkd.patch"' in x]
    assert statuses.count("applied") == 2 * 3 + 2 * 2  # trainer (3) and pipelines (sft, rlhf), twice
    assert any('"vkd.unpatch"' in x for x in proc.stderr.splitlines())


def test_deactivate_before_import_leaves_later_imports_alone():
    code = "import vkd_shim; vkd_shim.deactivate()\n" + REPORT_PATCHES
    proc = run_py(code, env=child_env([BOOTSTRAP_DIR], VKD_ENABLE="1"))
    assert report(proc) == {"compute_loss": 0, "init": 0, "log": 0, "prepare": 0}


def test_both_sitecustomizes_chain_and_patch_once(tmp_path):
    """The user's own sitecustomize (here: the two-line example) runs, and still one wrapper."""
    user = tmp_path / "user_site"
    user.mkdir()
    (user / "sitecustomize.py").write_text(
        "import os\nos.environ['USER_SITE_RAN'] = '1'\n" + (EXAMPLE_DIR / "sitecustomize.py").read_text()
    )
    code = "import os\nprint('USER', os.environ.get('USER_SITE_RAN'))\n" + REPORT_PATCHES
    proc = run_py(code, env=child_env([BOOTSTRAP_DIR, user], VKD_ENABLE="1"))
    assert "USER 1" in proc.stdout
    assert report(proc) == {"compute_loss": 1, "init": 1, "log": 1, "prepare": 1}


def test_failing_user_sitecustomize_is_shown_and_boot_goes_on(tmp_path):
    user = tmp_path / "user_site"
    user.mkdir()
    (user / "sitecustomize.py").write_text("raise RuntimeError('user site broke')\n")
    code = "import vkd_shim.bootstrap as b; print('REPORT' + str(b.is_active()).lower())"
    proc = run_py(code, env=child_env([BOOTSTRAP_DIR, user], VKD_ENABLE="1"))
    assert report(proc) is True
    assert "user site broke" in proc.stderr


def test_python_dash_S_runs_neither(tmp_path):
    user = tmp_path / "user_site"
    user.mkdir()
    (user / "sitecustomize.py").write_text("print('USER SITE')\n")
    proc = run_py(LOADED, "-S", env=child_env([BOOTSTRAP_DIR, user], VKD_ENABLE="1"))
    loaded, site_file = report(proc)
    assert "USER SITE" not in proc.stdout
    assert not [m for m in loaded if m.startswith("vkd_shim")] and site_file is None


def test_vkd_run_activates_child_and_grandchild(tmp_path):
    grandchild = (
        "import subprocess, sys; "
        "subprocess.run([sys.executable, '-c', "
        '\'import sys; b = sys.modules.get("vkd_shim.bootstrap"); print("GRANDCHILD", b.is_active())\'])'
    )
    code = f"import sys; b = sys.modules.get('vkd_shim.bootstrap'); print('CHILD', b.is_active()); {grandchild}"
    vkd_run = Path(sys.executable).with_name("vkd-run")
    proc = subprocess.run(
        [str(vkd_run), "--config", str(tmp_path / "absent.yaml"), sys.executable, "-c", code],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "CHILD True" in proc.stdout and "GRANDCHILD True" in proc.stdout
    # The missing config is said only in processes that import ms-swift: an unrelated program is
    # neither broken nor noisy.
    assert "vkd_shim" not in proc.stderr, proc.stderr


def test_vkd_run_fails_in_one_line():
    vkd_run = Path(sys.executable).with_name("vkd-run")
    proc = subprocess.run([str(vkd_run), "no-such-command-xyz"], capture_output=True, text=True, env=child_env())
    assert proc.returncode == 127
    assert proc.stderr.splitlines()[0] == "vkd-run: command not found: no-such-command-xyz"
    assert "Traceback" not in proc.stderr
    proc = subprocess.run([str(vkd_run)], capture_output=True, text=True, env=child_env())
    assert proc.returncode == 2 and "no command given" in proc.stderr
    # An empty --config= must not swallow the next word as the config path.
    proc = subprocess.run(
        [str(vkd_run), "--config=", "python", "-c", "pass"], capture_output=True, text=True, env=child_env()
    )
    assert proc.returncode == 2 and "--config= needs a value" in proc.stderr


@pytest.mark.parametrize("flags", [["-I"], ["-E"], ["-S"], ["-BS"], ["-u", "-I"]])
def test_vkd_run_refuses_interpreter_flags_that_blind_the_bootstrap(flags):
    vkd_run = Path(sys.executable).with_name("vkd-run")
    proc = subprocess.run(
        [str(vkd_run), sys.executable, *flags, "-c", "print('RAN')"], capture_output=True, text=True, env=child_env()
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "RAN" not in proc.stdout and "vision KD cannot activate" in proc.stderr.splitlines()[0]


def test_vkd_run_reads_the_shebang_of_a_script(tmp_path):
    script = tmp_path / "tool"
    script.write_text(f"#!{sys.executable} -I\nprint('RAN')\n")
    script.chmod(0o755)
    vkd_run = Path(sys.executable).with_name("vkd-run")
    proc = subprocess.run([str(vkd_run), str(script)], capture_output=True, text=True, env=child_env())
    assert proc.returncode == 2 and "-I ignores PYTHONPATH" in proc.stderr


def test_vkd_run_keeps_exit_code_and_pid():
    vkd_run = Path(sys.executable).with_name("vkd-run")
    code = "import os, sys; print(os.getpid()); sys.exit(7)"
    proc = subprocess.Popen(
        [str(vkd_run), sys.executable, "-c", code], env=child_env(), stdout=subprocess.PIPE, text=True
    )
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 7
    assert int(out.strip()) == proc.pid  # exec, not a child process


def test_activation_from_non_editable_install(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(REPO)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    bootstrap_dir = target / "vkd_shim" / "bootstrap"
    assert (bootstrap_dir / "sitecustomize.py").is_file()
    code = (
        "import sys, json, vkd_shim; b = sys.modules['vkd_shim.bootstrap']; "
        "print('REPORT' + json.dumps([vkd_shim.__file__, b.is_active()]))"
    )
    proc = run_py(code, env=child_env([bootstrap_dir, target], VKD_ENABLE="1"), cwd=tmp_path)
    path, active = report(proc)
    assert path.startswith(str(target)) and active is True


def test_a_broken_install_stops_ms_swift_loudly_and_leaves_other_processes_alone(tmp_path):
    """Failure injection: wrapt cannot be imported. A process that never imports ms-swift is untouched; a
    process that imports it stops at `import swift`, naming the cause, instead of training without KD."""
    broken = tmp_path / "broken"
    (broken / "wrapt").mkdir(parents=True)
    (broken / "wrapt" / "__init__.py").write_text("raise ImportError('wrapt is broken here')\n")
    env = child_env([BOOTSTRAP_DIR, broken], VKD_ENABLE="1")
    assert run_py("print('fine')", env=env).stdout.strip() == "fine"
    proc = subprocess.run([sys.executable, "-c", "import swift"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("vkd_shim.errors.PatchError: vision KD was asked for") and "wrapt is broken" in last


@pytest.mark.parametrize("form", ["module", "package", "bytecode only", "in a zip"])
def test_switch_off_still_finds_every_form_of_the_users_sitecustomize(form, tmp_path):
    """With the switch unset, the bootstrap looks for a user sitecustomize by stat calls alone (its start-up
    budget), and must still chain to each form Python itself would import: a module, a package, a sourceless
    .pyc, and one inside a zip on sys.path (which only the import system can look into). Nothing else loads."""
    code = "print('USER SITE')\n"
    entry = tmp_path / "user_site"
    entry.mkdir()
    if form == "module":
        (entry / "sitecustomize.py").write_text(code)
    elif form == "package":
        (entry / "sitecustomize").mkdir()
        (entry / "sitecustomize" / "__init__.py").write_text(code)
    elif form == "bytecode only":
        (entry / "source.py").write_text(code)
        py_compile.compile(str(entry / "source.py"), cfile=str(entry / "sitecustomize.pyc"), doraise=True)
        (entry / "source.py").unlink()
    else:
        entry = tmp_path / "user_site.zip"
        with zipfile.ZipFile(entry, "w") as archive:
            archive.writestr("sitecustomize.py", code)
    proc = run_py(LOADED, env=child_env([BOOTSTRAP_DIR, entry]))
    loaded, _ = report(proc)
    assert "USER SITE" in proc.stdout, proc.stdout
    assert set(m for m in loaded if m.startswith("vkd_shim")) == {"vkd_shim", "vkd_shim.bootstrap"}  # to chain


def test_switch_off_without_a_user_sitecustomize_imports_nothing(tmp_path):
    proc = run_py(LOADED, env=child_env([BOOTSTRAP_DIR, tmp_path]))
    loaded, site_file = report(proc)
    assert not [m for m in loaded if m.startswith("vkd_shim")] and Path(site_file).parent == Path(BOOTSTRAP_DIR)
