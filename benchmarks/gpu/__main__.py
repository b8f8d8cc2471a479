"""``python -m benchmarks.gpu``: run the GPU campaign (see benchmarks/gpu/campaign.py)."""

import sys

from benchmarks.gpu.campaign import main

sys.exit(main())
