"""Flex Template entry point: ``beamvision classify`` with the template's parameters as flags."""

from beamvision.pipelines.classify import run

if __name__ == "__main__":
    run()
