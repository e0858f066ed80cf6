from vkd_shim.bootstrap import boot

boot()
