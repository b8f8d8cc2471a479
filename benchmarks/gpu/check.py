"""``python -m benchmarks.gpu.check DIR``: exit 1 and list the problems when a campaign's outputs are incomplete."""

import sys

from benchmarks.gpu.campaign import check_main

if __name__ == "__main__":
    sys.exit(check_main())
