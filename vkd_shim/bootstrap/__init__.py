"""Env-gated activation: the only vkd_shim code that runs in every Python process.

Stdlib only until the gate is on. With ``VKD_ENABLE`` unset the sitecustomize files chain to the
user's own ``sitecustomize`` and return; nothing else is imported. When it is on, post-import hooks
are registered on the module names :mod:`vkd_shim.swift_layouts` lists, so ms-swift, torch and the
shim's heavy modules load only in processes that import ms-swift, in the order ms-swift chooses.

This directory doubles as the bootstrap directory that ``vkd-run`` puts first on ``PYTHONPATH``: its
``sitecustomize.py`` runs at interpreter start-up in every re-exec'd ``swift`` process and every
torchrun worker.
"""

import os
import sys

BOOTSTRAP_DIR = os.path.dirname(os.path.abspath(__file__))  # == vkd_shim.env.bootstrap_dir()

_active = False
_registered = False
#: Errors met while activating (a switch value that is neither on nor off, a hook that could not
#: load): published, not raised, because CPython turns an exception escaping sitecustomize into one
#: easily missed stderr line. :mod:`vkd_shim.patches` raises them from the first wrapper it owns.
errors: list = []


def chain_user_sitecustomize(own_file: str) -> None:
    """Import the ``sitecustomize`` that ``own_file`` hides: only one module of that name runs.

    ``own_file``'s directory leaves ``sys.path`` while the next one is found, and comes back after.
    """
    own_dir = os.path.dirname(os.path.abspath(own_file))
    own = sys.modules.pop("sitecustomize", None)
    saved_path = sys.path[:]
    sys.path[:] = [p for p in saved_path if os.path.abspath(p or os.curdir) != own_dir]
    try:
        __import__("sitecustomize")
    except Exception as exc:
        if not (isinstance(exc, ImportError) and exc.name == "sitecustomize"):
            import traceback

            sys.stderr.write("Error in the user's sitecustomize (chained by vkd_shim):\n")
            traceback.print_exc()
    finally:
        sys.path[:] = saved_path
    if own is not None:
        sys.modules.setdefault("sitecustomize", own)


def is_active() -> bool:
    return _active


def boot() -> bool:
    """Activate when the environment asks for it; the entry point of every sitecustomize.

    A ``VKD_ENABLE`` that is neither on nor off activates too, carrying the error: the run that
    meant to ask for vision KD then stops in ms-swift's first process with the allowed values.
    """
    from vkd_shim import env
    from vkd_shim.errors import ConfigError

    try:
        if not env.gate():
            return False
    except ConfigError as exc:
        errors.append(exc)
    return activate()


def activate() -> bool:
    """Arm the ms-swift hooks once per process; later calls are no-ops.

    Nothing heavy loads here: this runs in every Python process of an environment where the switch is
    exported, and most of them never import ms-swift. A tiny finder waits for the first ``import
    swift``; only then are wrapt and the layouts loaded and the post-import hooks registered.
    """
    global _active
    if _active:
        return False
    _active = True
    if "swift" in sys.modules:
        _register()
    elif not any(isinstance(finder, _SwiftImportWatch) for finder in sys.meta_path):
        sys.meta_path.insert(0, _SwiftImportWatch())
    return True


class _SwiftImportWatch:
    """Meta-path finder that only waits for ``swift``: registers the hooks, then hands the import on.

    It answers for no module itself: it removes itself, registers wrapt's post-import hooks (wrapt puts
    its own finder first on ``sys.meta_path``) and returns what the import system, asked again, finds,
    so ``swift`` is loaded through wrapt's finder and its hooks fire.
    """

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> object:
        if fullname != "swift":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        if not _active:
            return None
        # Only in a process that may train (_register stays out of the others): the user asked for vision KD
        # and nothing could patch ms-swift, so its import stops here, in ms-swift's first process, before
        # any model loads.
        _register()
        from importlib.util import find_spec

        return find_spec(fullname)


def _register() -> None:
    """Post-import hooks on every module of :func:`vkd_shim.swift_layouts.hook_modules` (once), or, when
    they are already registered (after a deactivate()), the patches applied to what is imported."""
    global _registered
    from vkd_shim import swift_layouts

    if swift_layouts.stays_out(sys.argv):
        return  # swift infer, export, deploy...: vision KD has nothing to do there, and says nothing
    modules = swift_layouts.hook_modules()
    if _registered:
        for name in modules:
            if name in sys.modules:
                _on_import(sys.modules[name])
        return
    for name in DEPENDENCIES:
        _require(name)
    from wrapt.importer import register_post_import_hook

    _registered = True
    for name in modules:
        register_post_import_hook(_on_import, name)


#: What the shim imports in a process that trains, by import name, with the distribution that provides it.
#: Checked when ``swift`` is first imported, before any of ms-swift's code runs, so a broken install is named
#: by the shim (ms-swift itself imports some of them and would otherwise fail with a bare traceback, or, for
#: the ones it does not need, train without vision KD).
DEPENDENCIES = {"wrapt": "wrapt", "structlog": "structlog", "yaml": "PyYAML", "msgspec": "msgspec"}


def _require(name: str):
    """Import ``name`` for a run that asked for vision KD, or stop it with the module and the fix.

    Raised into ms-swift's import on purpose: in a process that trains, a shim that cannot load would
    otherwise leave the run to train without the term and exit 0.
    """
    import importlib

    try:
        return importlib.import_module(name)
    except Exception as exc:
        from vkd_shim.env import ENABLE
        from vkd_shim.errors import PatchError

        missing = getattr(exc, "name", None) or name
        top = missing.split(".")[0]
        if top == "vkd_shim":
            fix = "reinstall it (pip install --force-reinstall vkd-shim)"
        else:
            dist = DEPENDENCIES.get(top, top)
            needs = ", ".join(DEPENDENCIES.values())
            fix = f"repair {dist} (pip install --force-reinstall {dist}; vkd-shim needs {needs})"
        raise PatchError(
            f"vision KD was asked for ({ENABLE}) but the shim cannot load: importing {missing} failed with "
            f"{type(exc).__name__}: {exc}. Fix: {fix}, or unset {ENABLE} to train without vision KD"
        ) from exc


def deactivate() -> bool:
    """Unwrap everything the shim wrapped; hooks that fire later do nothing."""
    global _active
    if not _active:
        return False
    _active = False
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _SwiftImportWatch)]
    patches = sys.modules.get("vkd_shim.patches")
    if patches is not None:
        patches.unpatch_all()
    return True


def _on_import(module) -> None:
    """The one post-import hook: loads :mod:`vkd_shim.patches` only when it fires.

    An exception escaping a post-import hook fails the user's own import (wrapt documents this), so a
    patch that fails is recorded and printed, and patches raises it later from code the shim owns. A shim
    that cannot load at all owns no code to raise from: then ms-swift's import stops here (:func:`_require`).
    """
    if not _active:
        return
    patches = _require("vkd_shim.patches")
    try:
        patches.on_import(module, errors)
    except Exception as exc:
        message = f"vision KD cannot patch {module.__name__}: {exc!r}"
        errors.append(message)
        sys.stderr.write(f"vkd_shim: ERROR: {message}\n")


def hint_inline_block(argv: list) -> None:
    """With the switch off, say why ms-swift is about to reject a YAML's ``custom:`` block.

    ms-swift turns ``custom:`` into ``--custom`` and fails with "ambiguous option"; only the shim
    takes the block out. Reads the YAML as text (no parser, nothing patched), in ``swift`` CLI
    processes only.
    """
    for item in argv[1:3]:
        if item.endswith((".yaml", ".yml")) and os.path.isfile(item):
            try:
                with open(item, encoding="utf-8") as handle:
                    text = handle.read()
            except (OSError, UnicodeDecodeError):
                return
            if "visual_kd" in text and "custom" in text:
                sys.stderr.write(
                    f"vkd_shim: {item} holds a custom.visual_kd block but VKD_ENABLE is not set, so nothing "
                    "takes it out and ms-swift will reject --custom; run through vkd-run, or export VKD_ENABLE=1\n"
                )
            return
