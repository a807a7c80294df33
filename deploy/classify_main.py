"""Flex Template entry point: ``beamvision classify`` with the template's parameters as flags.

The launcher runs ``python deploy/classify_main.py --input=... --model=... --embeddings=true``.
A wrong parameter or model artifact prints one line and exits 2, as on the command line.
"""

import sys

from beamvision.pipelines.cli import main

if __name__ == "__main__":
    sys.exit(main(["classify", *sys.argv[1:]]))
