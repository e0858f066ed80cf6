# vkd_shim bootstrap, put first on PYTHONPATH by `vkd-run`. Do not edit: put your own code in your own
# sitecustomize.py, later on sys.path, which this file runs first (only one `sitecustomize` runs per
# interpreter). Every Python process pays for this file, so with VKD_ENABLE unset it imports nothing: it
# looks for a user sitecustomize with a few stat calls (no directory listing, no import machinery) and
# loads the stdlib-only vkd_shim.bootstrap only to chain to one that exists, or in a `swift` process.
import os
import sys


def _user_sitecustomize_may_exist(own_dir: str) -> bool:
    """True when a later sys.path entry holds a sitecustomize (source, bytecode, package or extension), or is
    not a plain directory (a zip), where only the import system can tell."""
    names = ["sitecustomize.py", "sitecustomize.pyc", "sitecustomize"]
    names += ["sitecustomize" + suffix for suffix in __import__("_imp").extension_suffixes()]
    for entry in sys.path:
        if not entry or entry == own_dir:
            continue
        if not os.path.isdir(entry):
            if os.path.exists(entry):
                return True
            continue
        if any(os.path.exists(os.path.join(entry, name)) for name in names):
            return True
    return False


if os.environ.get("VKD_ENABLE"):
    from vkd_shim import bootstrap

    bootstrap.chain_user_sitecustomize(__file__)
    bootstrap.boot()
else:
    if _user_sitecustomize_may_exist(os.path.dirname(__file__)):
        __import__("vkd_shim.bootstrap").bootstrap.chain_user_sitecustomize(__file__)
    if sys.argv and os.path.basename(sys.argv[0]) == "swift":
        __import__("vkd_shim.bootstrap").bootstrap.hint_inline_block(sys.argv)
