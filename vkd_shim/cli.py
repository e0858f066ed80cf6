"""Command-line entry points: ``vkd-run`` (launcher) and ``vkd-shim doctor`` (read-only check).

``vkd-run`` lives in cluster launch scripts, so it stays stdlib-only and fails in one line:
a traceback from the launcher is a bug. ``doctor`` imports the heavy modules inside the
command only.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys

from vkd_shim.bootstrap import BOOTSTRAP_DIR, ENV_ENABLE, enabled

ENV_CONFIG = "VKD_CONFIG"
ENV_LOG_FILE = "VKD_LOG_FILE"

ENV_PREFIX = "VKD_"
DEEPSPEED_ENV_FILE = ".deepspeed_env"

RUN_USAGE = (
    "usage: vkd-run [--config PATHS] [--log-file PATH] [--write-deepspeed-env] [--] command [args ...]"
)
# DeepSpeed's multi-node runner exports a value as it is only when it has none of these characters
# (deepspeed/launcher/multinode_runner.py, MultiNodeRunner.add_export); otherwise it wraps it in double
# quotes, which pdsh's remote shell removes but `mpirun -x KEY=VALUE` keeps as part of the value.
_DEEPSPEED_QUOTED = re.compile(r"[^\w@%+=:,./-]")


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


def deepspeed_env_lines(environ) -> "list[str]":
    """``KEY=VALUE`` lines for ``.deepspeed_env`` that carry every ``VKD_*`` setting of ``environ``.

    DeepSpeed's multi-node runners (pdsh, OpenMPI, MPICH, ...) forward only variables named ``PYTHON*``
    (plus NCCL/UCX/MV2/MLFLOW ones) and the lines of ``.deepspeed_env``: PYTHONPATH, which carries the
    bootstrap directory, travels, but VKD_ENABLE and VKD_CONFIG do not, and a worker without them trains
    silently without vision KD. Config and log paths are made absolute (workers may start elsewhere); a
    value DeepSpeed would quote is refused, because mpirun would hand the quotes to the worker.
    """
    lines = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX):
            continue
        value = environ[name]
        if name == ENV_CONFIG:
            value = os.pathsep.join(os.path.abspath(p) for p in value.split(os.pathsep) if p)
        elif name == ENV_LOG_FILE and value:
            value = os.path.abspath(value)
        if _DEEPSPEED_QUOTED.search(value):
            raise ValueError(
                f"{name}={value!r} cannot travel through {DEEPSPEED_ENV_FILE}: DeepSpeed quotes values "
                "with characters outside [A-Za-z0-9_@%+=:,./-] and mpirun keeps the quotes; use a path "
                "without spaces or shell characters"
            )
        lines.append(f"{name}={value}")
    return lines


def write_deepspeed_env(path, environ) -> "list[str]":
    """Put ``deepspeed_env_lines(environ)`` into the ``.deepspeed_env`` at ``path``; return them.

    Other variables' lines are kept in order and earlier VKD_* lines are replaced. Blank lines are
    dropped: DeepSpeed splits every line on ``=`` and stops on one without it.
    """
    lines = deepspeed_env_lines(environ)
    kept: list[str] = []
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            kept = [x.rstrip("\n") for x in f if x.strip() and not x.lstrip().startswith(ENV_PREFIX)]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(f"{line}\n" for line in (*kept, *lines))
    return lines


def deepspeed_env_problems(environ, search_dirs=None) -> "list[str]":
    """With the gate on: a ``.deepspeed_env`` DeepSpeed would read that does not carry our settings.

    DeepSpeed reads the file (``DS_ENV_FILE`` renames it) in the home directory, then in the launch
    directory, later lines overriding earlier ones. No file at all is not reported: a single-node or
    torchrun launch needs none.
    """
    if not enabled(environ):
        return []
    name = environ.get("DS_ENV_FILE", DEEPSPEED_ENV_FILE)
    dirs = [os.path.expanduser("~"), os.curdir] if search_dirs is None else search_dirs
    # An absolute DS_ENV_FILE names the same file from both directories.
    files = list(dict.fromkeys(os.path.join(d, name) for d in dirs if os.path.isfile(os.path.join(d, name))))
    if not files:
        return []
    try:
        wanted = deepspeed_env_lines(environ)
    except ValueError as exc:
        return [str(exc)]
    exported: dict[str, str] = {}
    for path in files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                key, sep, value = line.partition("=")
                if sep:
                    exported[key.strip()] = value.strip()
    missing = [line for line in wanted if exported.get(line.partition("=")[0]) != line.partition("=")[2]]
    if not missing:
        return []
    return [
        f"{' and '.join(files)}: missing {', '.join(missing)}; DeepSpeed's multi-node workers would train "
        "without vision KD (fix: vkd-run --write-deepspeed-env ...)"
    ]


def run_main(argv: "list[str] | None" = None) -> int:
    """``vkd-run``: exec the command with vision KD activated in it and in every child."""
    argv = sys.argv[1:] if argv is None else argv
    config = log_file = None
    write_ds_env = False
    while argv and argv[0].startswith("-"):
        flag, _, value = argv[0].partition("=")
        if flag == "--":
            argv = argv[1:]
            break
        if flag in ("-h", "--help"):
            print(RUN_USAGE)
            print("Runs the command with VKD_ENABLE=1 and vkd_shim's bootstrap first on PYTHONPATH.")
            return 0
        if flag == "--write-deepspeed-env" and not value:
            write_ds_env, argv = True, argv[1:]
            continue
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
    if write_ds_env:
        target = os.environ.get("DS_ENV_FILE", DEEPSPEED_ENV_FILE)
        try:
            written = write_deepspeed_env(target, env)
        except (OSError, ValueError) as exc:
            return _fail(f"cannot write {target}: {exc}")
        sys.stderr.write(f"vkd-run: {os.path.abspath(target)}: {', '.join(written)}\n")
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
    # Read-only: when this process itself booted with VKD_ENABLE=1, looking the patch points up
    # must not patch ms-swift (nor print event lines into the report).
    from vkd_shim import bootstrap

    bootstrap.deactivate()
    problems: list[str] = []
    _section("activation")
    gate = os.environ.get(ENV_ENABLE, "")
    print(f"  {ENV_ENABLE}={gate!r} ({'on' if enabled() else 'off'})")
    child = _child_activation()
    print(f"  a child Python process started with this environment activates: {child}")
    if enabled() and child != "yes":
        problems.append("VKD_ENABLE is on but a child process would not activate (run under vkd-run)")

    for problem in deepspeed_env_problems(os.environ):
        print(f"  {problem}")
        problems.append("DeepSpeed multi-node workers would not activate (.deepspeed_env)")

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
    print(f"  ms-swift layout: {patches.LAYOUT.series}.x (tested with {patches.LAYOUT.stack})")

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
