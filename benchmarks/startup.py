"""Start-up time of the commands that need no model: ``--help``, ``models``, a command's ``--help``.

    python benchmarks/startup.py [--runs 5]

Each command runs as a whole process ``--runs`` times; the median wall time is
reported. Keras and TensorFlow are imported only where a model is built or
loaded, so none of these import them (a test checks that).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import BEAMVISION, run_process  # noqa: E402

COMMANDS = [["--help"], ["models"], ["models", "--json"], ["classify", "--help"], ["prepare", "--help"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    print("| command | median seconds | slowest |\n|---|---|---|")
    for command in COMMANDS:
        times = [run_process([*BEAMVISION, *command]).seconds for _ in range(args.runs)]
        print(f"| beamvision {' '.join(command)} | {statistics.median(times):.2f} | {max(times):.2f} |")


if __name__ == "__main__":
    main()
