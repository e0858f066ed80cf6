# vkd_shim bootstrap, put first on PYTHONPATH by `vkd-run`. Do not edit: your own
# sitecustomize.py, later on sys.path, still runs (this file imports it first).
from vkd_shim.bootstrap import BOOTSTRAP_DIR, boot, chain_user_sitecustomize

chain_user_sitecustomize(BOOTSTRAP_DIR)
boot()
