# vkd_shim bootstrap, put first on PYTHONPATH by `vkd-run`. Do not edit: put your own code in
# your own sitecustomize.py, later on sys.path, which this file imports first.
#
# Only one module named `sitecustomize` runs per interpreter, so this one chains to the user's.
# Every Python process pays for this file: with VKD_ENABLE unset it reads one variable and
# imports nothing, not even vkd_shim.
import os
import sys


def _chain_user_sitecustomize():
    own_dir = os.path.dirname(os.path.abspath(__file__))
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
        sys.modules["vkd_shim.bootstrap.sitecustomize"] = own


_chain_user_sitecustomize()
del _chain_user_sitecustomize

if os.environ.get("VKD_ENABLE"):
    from vkd_shim.bootstrap import boot

    boot()
