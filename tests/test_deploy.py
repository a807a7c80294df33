"""deploy/: the Flex Template's parameters are exactly the flags of beamvision classify."""

from __future__ import annotations

import argparse
import json
import os

from beamvision.pipelines.options import add_classify_arguments

DEPLOY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "deploy")


def _classify_flags() -> dict[str, bool]:
    parser = argparse.ArgumentParser()
    add_classify_arguments(parser)
    return {a.dest: a.required for a in parser._actions if a.option_strings and a.dest != "help"}


def test_flex_template_metadata_mirrors_classify_flags():
    with open(os.path.join(DEPLOY, "metadata.json")) as f:
        parameters = json.load(f)["parameters"]
    flags = _classify_flags()
    assert sorted(p["name"] for p in parameters) == sorted(flags)
    for parameter in parameters:
        assert parameter.get("isOptional", False) is not flags[parameter["name"]], parameter["name"]
        assert parameter["helpText"]


def test_flex_template_entry_point_runs_classify():
    with open(os.path.join(DEPLOY, "Dockerfile")) as f:
        dockerfile = f.read()
    assert "FLEX_TEMPLATE_PYTHON_PY_FILE=/beamvision/deploy/classify_main.py" in dockerfile
    with open(os.path.join(DEPLOY, "classify_main.py")) as f:
        assert "from beamvision.pipelines.classify import run" in f.read()
