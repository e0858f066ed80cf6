"""Command-line entry points: ``vkd-run`` (launcher) and ``vkd-shim doctor`` (read-only check).

``vkd-run`` lives in cluster launch scripts, so it stays stdlib-only and fails in one line:
a traceback from the launcher is a bug. ``doctor`` imports the heavy modules inside the
command only.
"""

import argparse
import os
import shutil
import subprocess
import sys

from vkd_shim.bootstrap import BOOTSTRAP_DIR, ENV_ENABLE, enabled

ENV_CONFIG = "VKD_CONFIG"
ENV_LOG_FILE = "VKD_LOG_FILE"

RUN_USAGE = "usage: vkd-run [--config PATHS] [--log-file PATH] [--] command [args ...]"


def launch_env(environ, config: "str | None" = None, log_file: "str | None" = None) -> dict:
    """The child's environment: the gate on, the bootstrap first on PYTHONPATH, every VKD_* kept.

    Flags only set variables, so the environment stays the one source of truth across
    ``swift``'s re-exec and every torchrun worker.
    """
    env = dict(environ)
    env[ENV_ENABLE] = "1"
    if config is not None:
        env[ENV_CONFIG] = os.pathsep.join(os.path.abspath(p) for p in config.split(os.pathsep) if p)
    if log_file is not None:
        env[ENV_LOG_FILE] = os.path.abspath(log_file)
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != BOOTSTRAP_DIR]
    env["PYTHONPATH"] = os.pathsep.join([BOOTSTRAP_DIR, *rest])
    return env


def run_main(argv: "list[str] | None" = None) -> int:
    """``vkd-run``: exec the command with vision KD activated in it and in every child."""
    argv = sys.argv[1:] if argv is None else argv
    config = log_file = None
    while argv and argv[0].startswith("-"):
        flag, _, value = argv[0].partition("=")
        if flag == "--":
            argv = argv[1:]
            break
        if flag in ("-h", "--help"):
            print(RUN_USAGE)
            print("Runs the command with VKD_ENABLE=1 and vkd_shim's bootstrap first on PYTHONPATH.")
            return 0
        if flag not in ("--config", "--log-file"):
            return _fail(f"unknown option {flag!r}")
        if not value:
            if len(argv) < 2:
                return _fail(f"{flag} needs a value")
            value, argv = argv[1], argv[1:]
        argv = argv[1:]
        if flag == "--config":
            config = value
        else:
            log_file = value
    if not argv:
        return _fail("no command given")
    executable = argv[0] if os.sep in argv[0] else shutil.which(argv[0])
    if executable is None or not os.path.isfile(executable):
        return _fail(f"command not found: {argv[0]}")
    if not os.access(executable, os.X_OK):
        return _fail(f"{executable} is not executable; try: vkd-run python {argv[0]} ...")
    env = launch_env(os.environ, config, log_file)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(executable, argv, env)
    except OSError as exc:
        return _fail(f"cannot run {executable}: {exc.strerror}")
    return 127  # unreachable: execve only returns by raising


def _fail(message: str) -> int:
    sys.stderr.write(f"vkd-run: {message}\n{RUN_USAGE}\n")
    return 127 if message.startswith(("command not found", "cannot run")) else 2


def shim_main(argv: "list[str] | None" = None) -> int:
    """``vkd-shim``: ``doctor`` prints what a run would do, and exits non-zero on any problem."""
    parser = argparse.ArgumentParser(prog="vkd-shim", description="vkd_shim tools")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("doctor", help="check config, versions, patch points and activation; start nothing")
    parser.parse_args(sys.argv[1:] if argv is None else argv)
    return doctor()


def doctor() -> int:
    problems: list[str] = []
    _section("activation")
    gate = os.environ.get(ENV_ENABLE, "")
    print(f"  {ENV_ENABLE}={gate!r} ({'on' if enabled() else 'off'})")
    child = _child_activation()
    print(f"  a child Python process started with this environment activates: {child}")
    if enabled() and child != "yes":
        problems.append("VKD_ENABLE is on but a child process would not activate (run under vkd-run)")

    _section("config")
    from vkd_shim import config

    try:
        resolved = config.resolve()
    except config.ConfigError as exc:
        print(f"  INVALID: {exc}")
        problems.append("invalid config")
    else:
        print(f"  files: {list(resolved.files) or 'none (defaults)'}")
        for name, value in resolved.config.to_dict().items():
            print(f"  {name}: {value!r}  <- {resolved.sources.get(name, 'default')}")
        for note in resolved.notes:
            print(f"  note: {note}")
    print("  schema:")
    for spec in config.schema():
        print(f"    {spec.name} ({spec.type_name}, default {spec.default!r}): {spec.description}")
        print(f"      allowed: {spec.allowed}")

    _section("versions")
    from vkd_shim import patches

    for name, version in patches.installed_versions().items():
        print(f"  {name}: {version}")

    _section("patch points")
    for point in patches.check_patch_points():
        print(
            f"  [{'ok' if point.ok else 'MISSING'}] {point.name}{': ' + point.reason if point.reason else ''}"
        )
        if not point.ok:
            problems.append(f"patch point {point.name} does not resolve")
    guard = patches.version_problem()
    if guard:
        print(f"  version guard: {guard}")
        problems.append(guard)

    _section("result")
    for problem in problems:
        print(f"  PROBLEM: {problem}")
    print("  OK" if not problems else f"  {len(problems)} problem(s)")
    return 1 if problems else 0


def _section(title: str) -> None:
    print(f"[{title}]")


def _child_activation() -> str:
    """Start a real child interpreter with this environment and ask whether the shim booted in it."""
    probe = (
        "import sys; b = sys.modules.get('vkd_shim.bootstrap'); print('yes' if b and b.is_active() else 'no')"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    return out.stdout.strip() or f"unknown (exit {out.returncode}: {out.stderr.strip()[-200:]})"
