"""Tests for vkd_shim.env: the VKD_* names, the gate's reading of VKD_ENABLE, and the stdlib-only import."""

from __future__ import annotations

import ast
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vkd_shim import env
from vkd_shim.errors import ConfigError, VisionKDError

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "vkd_shim"
ALLOWED = "1, true, yes, on (on); unset, '', 0, false, no, off (off)"


# --- names ----------------------------------------------------------------------------------------


def test_every_name_is_spelled_once_with_the_prefix():
    names = {
        "ENABLE": "VKD_ENABLE",
        "CONFIG": "VKD_CONFIG",
        "WEIGHT": "VKD_WEIGHT",
        "SHARE": "VKD_SHARE",
        "TARGETS": "VKD_TARGETS",
        "DISTANCE": "VKD_DISTANCE",
        "LOG_FILE": "VKD_LOG_FILE",
        "INLINE": "VKD_INLINE_CONFIG",
        "INLINE_SOURCE": "VKD_INLINE_SOURCE",
    }
    assert {attr: getattr(env, attr) for attr in names} == names
    assert env.PREFIX == "VKD_"
    assert all(value.startswith(env.PREFIX) for value in names.values())


def _bare_names(path: Path) -> list[tuple[int, str]]:
    """String constants that are exactly a VKD_* name (messages that mention one do not count)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(r"VKD_\w+", node.value)
    ]


def test_no_module_but_env_spells_a_variable_name():
    # A name that one module writes and another reads under a different spelling is a silent no-op.
    # The bootstrap's sitecustomize is the one exception: it imports nothing before reading the gate.
    sitecustomize = PACKAGE / "bootstrap" / "sitecustomize.py"
    offenders = {
        str(path.relative_to(REPO)): found
        for path in sorted(PACKAGE.rglob("*.py"))
        if path not in (PACKAGE / "env.py", sitecustomize) and (found := _bare_names(path))
    }
    assert offenders == {}
    assert [name for _, name in _bare_names(sitecustomize)] == [env.ENABLE]
    declared = {name for _, name in _bare_names(PACKAGE / "env.py")}
    assert declared == {
        env.ENABLE,
        env.CONFIG,
        env.WEIGHT,
        env.SHARE,
        env.TARGETS,
        env.DISTANCE,
        env.MODE,
        env.LOG_FILE,
        env.INLINE,
        env.INLINE_SOURCE,
    }


# --- the gate -------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["1", "true", "yes", "on", "TRUE", "True", " on ", "Yes\n", "\tON"])
def test_gate_on(value):
    assert env.gate({env.ENABLE: value}) is True


@pytest.mark.parametrize("value", ["", " ", "0", "false", "no", "off", "FALSE", "Off", " no ", "0\n"])
def test_gate_off(value):
    assert env.gate({env.ENABLE: value}) is False


def test_gate_unset_is_off_and_other_variables_do_not_count():
    assert env.gate({}) is False
    assert env.gate({"VKD_ENABLED": "1", "ENABLE": "1", env.CONFIG: "/x.yaml"}) is False


@pytest.mark.parametrize("value", ["2", "enable", "maybe", "enabled", "y", "n", "-1", "1.0", "on off", "ja"])
def test_gate_refuses_what_is_neither_on_nor_off(value):
    # A guess in either direction is wrong for someone: '2' may mean "on" and 'disable' surely does not.
    with pytest.raises(ConfigError) as caught:
        env.gate({env.ENABLE: value})
    error = caught.value
    assert error.field == "VKD_ENABLE"
    assert error.source == "env:VKD_ENABLE"
    assert error.allowed == ALLOWED
    assert str(error) == (
        f"invalid vision-KD switch: VKD_ENABLE = {value!r}: neither on nor off; allowed values: {ALLOWED}"
    )
    assert isinstance(error, VisionKDError)
    assert isinstance(error, ValueError)


def test_gate_allowed_values_are_the_ones_it_accepts():
    assert env.TRUTHY == ("1", "true", "yes", "on")
    assert env.FALSY == ("", "0", "false", "no", "off")
    assert all(env.gate({env.ENABLE: value}) for value in env.TRUTHY)
    assert not any(env.gate({env.ENABLE: value}) for value in env.FALSY)
    assert not set(env.TRUTHY) & set(env.FALSY)


def test_gate_reads_os_environ_by_default(monkeypatch):
    monkeypatch.setenv(env.ENABLE, "yes")
    assert env.gate() is True
    monkeypatch.setenv(env.ENABLE, "off")
    assert env.gate() is False
    monkeypatch.delenv(env.ENABLE)
    assert env.gate() is False
    monkeypatch.setenv(env.ENABLE, "2")
    with pytest.raises(ConfigError, match="VKD_ENABLE = '2'"):
        env.gate()


def test_gate_refusal_survives_pickling():
    # Spawned workers send their errors back pickled; the attributes must come along.
    with pytest.raises(ConfigError) as caught:
        env.gate({env.ENABLE: "enable"})
    restored = pickle.loads(pickle.dumps(caught.value))
    assert type(restored) is ConfigError
    assert (str(restored), restored.field, restored.source, restored.allowed) == (
        str(caught.value),
        "VKD_ENABLE",
        "env:VKD_ENABLE",
        ALLOWED,
    )


# --- import budget --------------------------------------------------------------------------------


def test_env_imports_only_the_stdlib():
    # The launcher and the bootstrap read these names in every Python process.
    code = (
        "import json, sys\n"
        "before = set(sys.modules)\n"
        "import vkd_shim.env\n"
        "new = sorted({m.split('.')[0] for m in set(sys.modules) - before})\n"
        "print(json.dumps(new))\n"
    )
    clean = {key: value for key, value in os.environ.items() if not key.startswith(env.PREFIX)}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=clean, capture_output=True, text=True, timeout=60, check=True
    )
    loaded = json.loads(proc.stdout)
    assert "vkd_shim" in loaded  # the check can see what the import loads
    outside_stdlib = [name for name in loaded if name != "vkd_shim" and name not in sys.stdlib_module_names]
    assert outside_stdlib == []


#: A shell that carries every setting a user could export, each at a value that would change what tests see.
EXPORTED = {
    "VKD_ENABLE": "1",
    "VKD_MODE": "monitor",
    "VKD_WEIGHT": "7",
    "VKD_TARGETS": "vit",
    "VKD_DISTANCE": "cosine",
    "VKD_CONFIG": "/nonexistent/vkd.yaml",
    "VKD_LOG_FILE": "/dev/full",
    "VKD_INLINE_CONFIG": '{"weight": 3}',
}


def test_the_suite_passes_with_vkd_variables_exported_in_the_shell():
    """The suites that read VKD_* in process (config precedence and env overrides, the gate, the schema) run in
    a child pytest whose shell exports every VKD_* variable: conftest takes them out before any test runs, and
    so out of every child a test starts (the end-to-end helpers strip them too)."""
    tests = Path(__file__).resolve().parent
    files = ["test_config.py", "test_env.py", "test_schema.py"]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files, "-k", "not exported_in_the_shell"],
        cwd=tests, env={**os.environ, **EXPORTED}, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert " passed" in proc.stdout.splitlines()[-1] and "failed" not in proc.stdout.splitlines()[-1]
