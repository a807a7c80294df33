"""``python -m beamvision <command>``: the same as the ``beamvision`` console script."""

from beamvision.pipelines.cli import console_main

console_main()
