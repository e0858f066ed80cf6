import os
if os.environ.get("VKD_ENABLE"): __import__("vkd_shim.bootstrap").bootstrap.boot()
