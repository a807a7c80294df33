"""Flex Template entry point: ``beamvision classify`` with the template's parameters as flags.

The launcher runs ``python deploy/classify_main.py --input=... --model=... --embeddings=true``.
A wrong parameter or model artifact prints one line and exits 2, as on the command line;
the launcher's log starts as quietly as the command line does.
"""

import sys

from beamvision.pipelines.cli import console_main

if __name__ == "__main__":
    console_main(["classify", *sys.argv[1:]])
