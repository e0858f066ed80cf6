"""``python -m vkd_shim doctor``: the same commands as the ``vkd-shim`` console script."""

import sys

from vkd_shim.cli import shim_main

sys.exit(shim_main())
