"""Every ``VKD_*`` environment variable, and the gate's reading of ``VKD_ENABLE``.

Stdlib only, and separate from :mod:`vkd_shim.config`: the launcher (``vkd-run``) and the bootstrap
must know these names without importing the validation library, and the names must be spelled in one
place, because a variable that one module writes and another reads under a different name is a
silent no-op.
"""

from __future__ import annotations

import os

# collections.abc re-exports these; its own import (the collections package) costs about 7 ms, and with the
# switch exported this module loads in every Python process. os has already imported _collections_abc.
from _collections_abc import Mapping

from vkd_shim.errors import ConfigError

#: The switch. The sitecustomize files spell it literally (they import nothing before the gate);
#: a test holds them to this name.
ENABLE = "VKD_ENABLE"
#: Config files, ``os.pathsep``-separated, later files overriding earlier ones.
CONFIG = "VKD_CONFIG"
WEIGHT = "VKD_WEIGHT"
#: The term as a fraction of the GKD part of the loss (``custom.visual_kd.share``); ``none`` clears a file's.
SHARE = "VKD_SHARE"
TARGETS = "VKD_TARGETS"
DISTANCE = "VKD_DISTANCE"
#: ``monitor`` on an existing launch: measure the aligner's drift from the teacher, change nothing.
MODE = "VKD_MODE"
#: Where the JSON event lines go (default: stderr).
LOG_FILE = "VKD_LOG_FILE"
#: The ``custom.visual_kd`` block of the YAML given to ``swift rlhf``, carried as JSON from the CLI
#: process (which parses the YAML) to the re-exec'd training processes, and the file it came from.
INLINE = "VKD_INLINE_CONFIG"
INLINE_SOURCE = "VKD_INLINE_SOURCE"
PREFIX = "VKD_"
DEEPSPEED_ENV_FILE = ".deepspeed_env"
# DeepSpeed's multi-node runner exports a value as it is only when it has none of these characters
# (deepspeed/launcher/multinode_runner.py, MultiNodeRunner.add_export); otherwise it wraps it in double
# quotes, which pdsh's remote shell removes but `mpirun -x KEY=VALUE` keeps as part of the value. Compiled
# where it is used: with the switch on this module loads in every Python process, and `re` costs a few ms.
_DEEPSPEED_QUOTED = r"[^\w@%+=:,./-]"

TRUTHY = ("1", "true", "yes", "on")
FALSY = ("", "0", "false", "no", "off")


def gate(environ: Mapping[str, str] | None = None) -> bool:
    """Whether vision KD is switched on; a value outside :data:`TRUTHY` and :data:`FALSY` raises."""
    raw = (os.environ if environ is None else environ).get(ENABLE, "")
    value = raw.strip().lower()
    if value in TRUTHY:
        return True
    if value in FALSY:
        return False
    # The user meant something by it: guess nothing, in either direction.
    allowed = f"{', '.join(TRUTHY)} (on); unset, '', {', '.join(FALSY[1:])} (off)"
    raise ConfigError(
        f"invalid vision-KD switch: {ENABLE} = {raw!r}: neither on nor off; allowed values: {allowed}",
        field=ENABLE,
        source=f"env:{ENABLE}",
        allowed=allowed,
    )


def bootstrap_dir() -> str:
    """The directory whose sitecustomize.py activates the shim (``vkd_shim/bootstrap``)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "bootstrap")


def launch_env(environ, config: str | None = None, log_file: str | None = None) -> dict:
    """The child's environment: the gate on, the bootstrap first on PYTHONPATH, every VKD_* kept.

    Flags only set variables, so the environment stays the one source of truth across
    ``swift``'s re-exec and every torchrun worker.
    """
    env = dict(environ)
    env[ENABLE] = "1"
    if config is not None:
        env[CONFIG] = os.pathsep.join(os.path.abspath(p) for p in config.split(os.pathsep) if p)
    if log_file is not None:
        env[LOG_FILE] = os.path.abspath(log_file)
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != bootstrap_dir()]
    env["PYTHONPATH"] = os.pathsep.join([bootstrap_dir(), *rest])
    return env


def deepspeed_env_lines(environ) -> list[str]:
    """``KEY=VALUE`` lines for ``.deepspeed_env`` that carry every ``VKD_*`` setting of ``environ``.

    DeepSpeed's multi-node runners (pdsh, OpenMPI, MPICH, ...) forward only variables named ``PYTHON*``
    (plus NCCL/UCX/MV2/MLFLOW ones) and the lines of ``.deepspeed_env``: PYTHONPATH, which carries the
    bootstrap directory, travels, but VKD_ENABLE and VKD_CONFIG do not, and a worker without them trains
    silently without vision KD. Config and log paths are made absolute (workers may start elsewhere); a
    value DeepSpeed would quote is refused, because mpirun would hand the quotes to the worker.
    """
    import re

    lines = []
    for name in sorted(environ):
        if not name.startswith(PREFIX):
            continue
        value = environ[name]
        if name == CONFIG:
            value = os.pathsep.join(os.path.abspath(p) for p in value.split(os.pathsep) if p)
        elif name == LOG_FILE and value:
            value = os.path.abspath(value)
        if re.search(_DEEPSPEED_QUOTED, value):
            raise ValueError(
                f"{name}={value!r} cannot travel through {DEEPSPEED_ENV_FILE}: DeepSpeed quotes values "
                "with characters outside [A-Za-z0-9_@%+=:,./-] and mpirun keeps the quotes; use a path "
                "without spaces or shell characters"
            )
        lines.append(f"{name}={value}")
    return lines


def write_deepspeed_env(path, environ) -> list[str]:
    """Put ``deepspeed_env_lines(environ)`` into the ``.deepspeed_env`` at ``path``; return them.

    Other variables' lines are kept in order and earlier VKD_* lines are replaced. Blank lines are
    dropped: DeepSpeed splits every line on ``=`` and stops on one without it.
    """
    lines = deepspeed_env_lines(environ)
    kept: list[str] = []
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            kept = [x.rstrip("\n") for x in f if x.strip() and not x.lstrip().startswith(PREFIX)]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(f"{line}\n" for line in (*kept, *lines))
    return lines


def deepspeed_env_problems(environ, search_dirs=None) -> list[str]:
    """With the gate on: a ``.deepspeed_env`` DeepSpeed would read that does not carry our settings.

    DeepSpeed reads the file (``DS_ENV_FILE`` renames it) in the home directory, then in the launch
    directory, later lines overriding earlier ones. No file at all is not reported: a single-node or
    torchrun launch needs none.
    """
    try:
        if not gate(environ):
            return []
    except ConfigError:
        pass
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
