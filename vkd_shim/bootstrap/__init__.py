"""Env-gated activation: the only vkd_shim code that runs in every Python process.

With ``VKD_ENABLE`` unset (or not truthy) :func:`boot` reads one environment variable and
returns; nothing else is imported. When it is on, post-import hooks are registered *by name*
on the ms-swift modules that :mod:`vkd_shim.patches` wraps, so ms-swift, torch and the shim's
heavy modules load only in processes that import ms-swift, and in the order ms-swift chooses.

This directory doubles as the bootstrap directory that ``vkd-run`` puts first on
``PYTHONPATH``: its ``sitecustomize.py`` runs at interpreter start-up in every re-exec'd
``swift`` process and every torchrun worker.
"""

import os
import sys

ENV_ENABLE = "VKD_ENABLE"
TRUTHY = frozenset(("1", "true", "yes", "on"))
BOOTSTRAP_DIR = os.path.dirname(os.path.abspath(__file__))

#: (module whose import fires the hook, the hook named as "module:function"), for the modules of
#: every ms-swift release in vkd_shim.swift_layouts (4.6, then 3.12); only the installed one's import.
HOOKS = (
    ("swift", "vkd_shim.patches:on_swift"),
    ("swift.cli.main", "vkd_shim.patches:on_cli_main"),
    ("swift.pipelines.train.rlhf", "vkd_shim.patches:on_rlhf_pipeline"),
    ("swift.rlhf_trainers.gkd_trainer", "vkd_shim.patches:on_gkd_trainer"),
    ("swift.megatron.pipelines.train.rlhf", "vkd_shim.patches:on_megatron_rlhf"),
    ("swift.llm.train.rlhf", "vkd_shim.patches:on_rlhf_pipeline"),
    ("swift.trainers.rlhf_trainer.gkd_trainer", "vkd_shim.patches:on_gkd_trainer"),
    ("swift.megatron.train.rlhf", "vkd_shim.patches:on_megatron_rlhf"),
)

_active = False
_registered = False
#: Errors met while activating (config invalid, a hook that could not load): published, not raised,
#: because CPython turns an exception escaping sitecustomize into one easily missed stderr line.
errors: list = []


def enabled(environ=None) -> bool:
    """The gate: one lookup, no imports."""
    value = (os.environ if environ is None else environ).get(ENV_ENABLE, "")
    return value.strip().lower() in TRUTHY


def is_active() -> bool:
    return _active


def boot() -> bool:
    """Activate when the environment asks for it; the entry point of every sitecustomize."""
    if not enabled():
        return False
    return activate()


def activate() -> bool:
    """Register the ms-swift hooks once per process; later calls are no-ops."""
    global _active, _registered
    if _active:
        return False
    _active = True
    if _registered:
        # Hooks stay registered after deactivate(); re-apply to modules imported meanwhile.
        for module_name, target in HOOKS:
            module = sys.modules.get(module_name)
            if module is not None:
                _deferred(target)(module)
    else:
        from wrapt.importer import register_post_import_hook

        _registered = True
        for module_name, target in HOOKS:
            register_post_import_hook(_deferred(target), module_name)
    _check_config()
    return True


def deactivate() -> bool:
    """Unwrap everything the shim wrapped; hooks that fire later do nothing."""
    global _active
    if not _active:
        return False
    _active = False
    patches = sys.modules.get("vkd_shim.patches")
    if patches is not None:
        patches.unpatch_all()
    return True


def _deferred(target: str):
    """A post-import hook that loads ``target`` only when it fires, and never raises.

    An exception escaping a post-import hook fails the user's own import (wrapt documents
    this), so failures are recorded and printed; :mod:`vkd_shim.patches` raises them later
    from code the shim owns, where stopping the run is the right outcome.
    """

    def hook(module) -> None:
        if not _active:
            return
        try:
            import importlib

            module_name, function = target.split(":")
            getattr(importlib.import_module(module_name), function)(module)
        except Exception as exc:
            _report(f"vision KD cannot patch {module.__name__} ({target}): {exc!r}")

    return hook


def _check_config() -> None:
    """Validate the config up front so a typo shows in the first process, as one line."""
    try:
        from vkd_shim import config

        config.resolve()
    except Exception as exc:
        _report(f"invalid vision-KD config, training with VKD_ENABLE=1 will refuse to start: {exc}")


def _report(message: str) -> None:
    errors.append(message)
    sys.stderr.write(f"vkd_shim: WARNING: {message}\n")
