# vkd_shim: paste the last two lines into your own sitecustomize.py. Put on PYTHONPATH as it is, this file
# would hide the sitecustomize.py later on the path, so in this directory it runs that one first.
import os
if os.path.basename(os.path.dirname(os.path.abspath(__file__))) == "sitecustomize_example": __import__("vkd_shim.bootstrap").bootstrap.chain_user_sitecustomize(__file__)
import os
if os.environ.get("VKD_ENABLE"): __import__("vkd_shim.bootstrap").bootstrap.boot()
