# vkd_shim bootstrap, put first on PYTHONPATH by `vkd-run`. Do not edit: put your own code in your own
# sitecustomize.py, later on sys.path, which this file runs first (only one `sitecustomize` runs per
# interpreter). Every Python process pays for this file: with VKD_ENABLE unset it imports only the
# stdlib-only vkd_shim.bootstrap and reads one variable.
import os
import sys

from vkd_shim import bootstrap

bootstrap.chain_user_sitecustomize(__file__)
if os.environ.get("VKD_ENABLE"):
    bootstrap.boot()
elif sys.argv and os.path.basename(sys.argv[0]) == "swift":
    bootstrap.hint_inline_block(sys.argv)
