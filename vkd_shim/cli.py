"""``vkd-run``: launch a command with vision KD activated in it and in every process it starts.

It lives in cluster launch scripts, so it stays stdlib-only and fails in one line: a traceback from the
launcher is a bug. It only sets variables (:func:`vkd_shim.env.launch_env`) and execs, so the PID,
signals and exit code are the command's own, and the environment stays the one source of truth across
``swift``'s re-exec and every torchrun worker.
"""

from __future__ import annotations

import os
import shutil
import sys

from vkd_shim import env

RUN_USAGE = "usage: vkd-run [--config PATHS] [--log-file PATH] [--write-deepspeed-env] [--] command [args ...]"
RUN_HELP = """
Runs the command with vision KD activated in it and in every process it starts: sets VKD_ENABLE=1, puts
vkd_shim's bootstrap first on PYTHONPATH (your own sitecustomize.py still runs) and execs the command, so
the PID, signals and exit code are the command's own. Every option only sets a variable for the command.

options:
  --config PATHS          VKD_CONFIG: config files holding custom.visual_kd, separated by ':', merged in order
                          (the shipped Stage-3 recipe: --config "$(vkd-shim configs)")
  --log-file PATH         VKD_LOG_FILE: append the shim's JSON event lines to PATH. Without it they go to
                          stderr, mixed with ms-swift's own output; a path that cannot be written falls back
                          to stderr with a vkd.log_file_error warning. Use a node-local path on multi-node runs.
  --write-deepspeed-env   also write the VKD_* lines into ./.deepspeed_env (DS_ENV_FILE renames it): DeepSpeed's
                          multi-node runner forwards only PYTHON* variables and that file's lines
  -h, --help              this text

Check a launch first, without loading a model: vkd-shim doctor -- swift rlhf ...""".strip("\n")
#: Interpreter options under which no sitecustomize runs or PYTHONPATH is ignored: -I (isolated: no
#: PYTHONPATH, no user site), -E (no PYTHON* variables), -S (no site module, so no sitecustomize).
_BLIND_FLAGS = {"I": "-I ignores PYTHONPATH", "E": "-E ignores PYTHONPATH", "S": "-S skips sitecustomize"}


def interpreter_blind(argv: list[str], executable: str) -> str | None:
    """Why the bootstrap could not load in the command, or None: Python flags on the command line or
    in the script's shebang line that skip sitecustomize or ignore PYTHONPATH."""
    flags: list[str] = []
    if os.path.basename(executable).startswith("python"):
        for item in argv[1:]:
            if not item.startswith("-") or item in ("-c", "-m") or item.startswith("--"):
                break
            flags.append(item)
    else:
        try:
            with open(executable, "rb") as handle:
                first = handle.readline(256).decode("utf-8", "replace")
        except OSError:
            first = ""
        if first.startswith("#!") and "python" in first:
            flags = [word for word in first[2:].split()[1:] if word.startswith("-")]
    for flag in flags:
        for letter in flag.lstrip("-"):
            if letter in _BLIND_FLAGS:
                return f"{_BLIND_FLAGS[letter]}, so vision KD cannot activate in {os.path.basename(executable)}"
    return None


def run_main(argv: list[str] | None = None) -> int:
    """``vkd-run``: exec the command with vision KD activated in it and in every child."""
    argv = sys.argv[1:] if argv is None else argv
    config = log_file = None
    write_ds_env = False
    while argv and argv[0].startswith("-"):
        flag, equals, value = argv[0].partition("=")
        if flag == "--":
            argv = argv[1:]
            break
        if flag in ("-h", "--help"):
            print(RUN_USAGE)
            print(RUN_HELP)
            return 0
        if flag == "--write-deepspeed-env" and not equals:
            write_ds_env, argv = True, argv[1:]
            continue
        if flag not in ("--config", "--log-file"):
            return _fail(f"unknown option {flag!r}")
        if equals and not value:
            return _fail(f"{flag}= needs a value")
        if not equals:
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
    blind = interpreter_blind(argv, executable)
    if blind:
        return _fail(f"{blind}: drop the flag (vkd-run activates through PYTHONPATH and sitecustomize)")
    launch = env.launch_env(os.environ, config, log_file)
    if write_ds_env:
        target = os.environ.get("DS_ENV_FILE", env.DEEPSPEED_ENV_FILE)
        try:
            written = env.write_deepspeed_env(target, launch)
        except (OSError, ValueError) as exc:
            return _fail(f"cannot write {target}: {exc}")
        sys.stderr.write(f"vkd-run: {os.path.abspath(target)}: {', '.join(written)}\n")
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(executable, argv, launch)
    except OSError as exc:
        return _fail(f"cannot run {executable}: {exc.strerror}")
    return 127  # unreachable: execve only returns by raising


def _fail(message: str) -> int:
    sys.stderr.write(f"vkd-run: {message}\n{RUN_USAGE}\n")
    return 127 if message.startswith(("command not found", "cannot run")) else 2
