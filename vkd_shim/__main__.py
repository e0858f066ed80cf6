"""``python -m vkd_shim doctor``: the same commands as the ``vkd-shim`` console script."""

import sys

from vkd_shim.doctor import main

sys.exit(main())
