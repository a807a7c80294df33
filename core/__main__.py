"""``python -m beamvision <command>``: the same as the ``beamvision`` console script."""

import sys

from beamvision.pipelines.cli import main

sys.exit(main())
