"""deploy/: Flex Template parameters are classify's flags; its entry point runs as the launcher runs it."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
from terminal import assert_no_startup_noise, progress_lines

from beamvision.pipelines.classify import add_arguments as add_classify_arguments

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


def test_flex_template_choices_are_classify_choices():
    """A parameter whose flag has choices (--engine, --precision) accepts exactly those choices."""
    import re

    parser = argparse.ArgumentParser()
    add_classify_arguments(parser)
    choices = {a.dest: a.choices for a in parser._actions if a.choices}
    with open(os.path.join(DEPLOY, "metadata.json")) as f:
        parameters = {p["name"]: p for p in json.load(f)["parameters"]}
    assert {"engine", "precision"} <= set(choices)
    for name, allowed in choices.items():
        (pattern,) = parameters[name]["regexes"]
        for value in allowed:
            assert re.fullmatch(pattern, value), (name, value, pattern)
        assert not re.fullmatch(pattern, "not-a-choice"), (name, pattern)
        spelled = re.fullmatch(r"\^\((.*)\)\$", pattern)
        assert spelled and set(spelled[1].split("|")) == set(allowed), (name, pattern, allowed)


def _flags(text: str):
    from beamvision.pipelines import flags

    return flags.parse_pipeline_args(
        "t", "t", add_classify_arguments, ["--model", "m", "--output", "o", *text.split()]
    )


@pytest.mark.parametrize(
    ("given", "embeddings", "overwrite", "dry_run"),
    [
        ("", False, False, False),
        ("--embeddings --overwrite --dry_run", True, True, True),
        ("--embeddings=true --overwrite=false --dry_run=false", True, False, False),
        ("--embeddings=TRUE --overwrite=False --dry_run=True", True, False, True),
        ("--embeddings 1 --overwrite 0 --dry_run 1", True, False, True),
    ],
)
def test_on_off_flags_take_true_false_as_flex_templates_pass_them(given, embeddings, overwrite, dry_run):
    from apache_beam.options.pipeline_options import TestOptions

    args, beam_options = _flags(given)
    assert (args.embeddings, args.overwrite) == (embeddings, overwrite)
    assert bool(beam_options.view_as(TestOptions).dry_run) is dry_run


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("--embeddings=yes", "argument --embeddings: expected true or false, received 'yes'"),
        ("--dry_run=maybe", "argument --dry_run: expected true or false, received 'maybe'"),
    ],
)
def test_an_on_off_flag_with_another_value_is_one_line(given, expected):
    from beamvision.pipelines.flags import UsageError

    with pytest.raises(UsageError, match=expected):
        _flags(given)


@pytest.fixture(scope="module")
def flex_inputs(photos, tmp_path_factory):
    """Real photos as JPEG files, a list file naming two of them, and a small multi-label model artifact.

    Multi-label (a sigmoid head), so that every template parameter, ``threshold`` included, applies.
    """
    import dataclasses

    from PIL import Image

    from beamvision.models import create_model, get_spec
    from beamvision.models.artifact import new_manifest, save_artifact
    from beamvision.models.training import with_new_head

    work = tmp_path_factory.mktemp("flex")
    images = work / "photos"
    images.mkdir()
    for i, photo in enumerate(photos):
        Image.fromarray(photo).save(images / f"photo_{i}.jpg", quality=90)
    (work / "list.csv").write_text(f"size,path\n1,{images / 'photo_0.jpg'}\n2,{images / 'photo_1.jpg'}\n")
    labels = ["astronaut", "coffee", "cat", "rocket"]
    spec = get_spec("squeezenet")
    model = with_new_head(
        create_model(spec.name, len(labels), 32), spec.classifier_layer, len(labels), multi_label=True
    )
    manifest = new_manifest(model, spec.name, labels, "none", name="flex", version="1")
    save_artifact(model, dataclasses.replace(manifest, multi_label=True), str(work / "model"))
    return work, len(photos)


def _entry_point() -> str:
    """The file the image's launcher runs: deploy/Dockerfile's FLEX_TEMPLATE_PYTHON_PY_FILE, in this checkout.

    The image's WORKDIR holds what the Dockerfile COPYs from the repository root,
    so the path below the WORKDIR is the path below the root.
    """
    with open(os.path.join(DEPLOY, "Dockerfile")) as f:
        lines = [line.split() for line in f if line.strip() and not line.startswith("#")]
    (workdir,) = [words[1] for words in lines if words[0] == "WORKDIR"]
    (py_file,) = [
        w.split("=", 1)[1] for words in lines for w in words[1:] if w.startswith("FLEX_TEMPLATE_PYTHON")
    ]
    relative = os.path.relpath(py_file, workdir)
    assert not relative.startswith(".."), f"{py_file} is outside the WORKDIR {workdir}"
    assert any(words[0] == "COPY" and relative in words[1:-1] for words in lines), f"{relative} is not copied"
    return os.path.join(os.path.dirname(DEPLOY), relative)


def _launch(*flags: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python $FLEX_TEMPLATE_PYTHON_PY_FILE --name=value ...`` in the WORKDIR: how the launcher runs it."""
    return subprocess.run(
        [sys.executable, _entry_point(), *flags],
        cwd=os.path.dirname(DEPLOY),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_flex_entry_point_runs_every_template_parameter_on_direct_runner(flex_inputs):
    import pandas as pd

    work, count = flex_inputs
    values = {
        "input": f"{work}/photos/*.jpg",
        "input_list": f"{work}/list.csv",
        "input_list_column": "path",
        "model": f"{work}/model",
        "output": f"{work}/out",
        "top_k": "2",
        "threshold": "0.5",
        "batch_size": "4",
        "embeddings": "true",
        "engine": "openvino",
        "precision": "auto",
        "max_pixels": "50000000",
        "buffer_mb": "64",
        "read_threads": "4",
        "decode_threads": "1",
        "inference_threads": "1",
        "model_copies": "1",
        "incremental": "true",
        "run_id": "flex-1",
        "overwrite": "false",
        "checkpoint_every": "1",
        "max_error_rate": "0.5",
        "progress_every": "0.5",
        "detach": "false",
    }
    with open(os.path.join(DEPLOY, "metadata.json")) as f:
        assert sorted(p["name"] for p in json.load(f)["parameters"]) == sorted(values)
    wrong = _launch(*(f"--{name}={value}" for name, value in {**values, "top_k": "0"}.items()))
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    assert wrong.stderr.strip().splitlines()[-1] == (
        "beamvision classify: error: argument --top_k: expected a positive integer, received '0'"
    )
    ran = _launch(*(f"--{name}={value}" for name, value in values.items()))
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert f"classified {count} of {count} images" in ran.stdout
    # The launcher's log: no start-up noise, progress lines that end at the count.
    assert_no_startup_noise(ran.stderr)
    assert progress_lines(ran.stderr, "classify")[-1]["done"] == count, ran.stderr
    run = work / "out" / "run=flex-1"
    results = pd.concat(pd.read_parquet(run / n) for n in os.listdir(run) if n.startswith("results-"))
    assert len(results) == count and {len(x) for x in results.top_k_labels} == {2}
    assert len(results.embedding.iloc[0]) > 0
    for row in results.itertuples():  # the label sets at --threshold 0.5, over every class
        assert set(row.labels) <= {"astronaut", "coffee", "cat", "rocket"}
        top = [label for label, s in zip(row.top_k_labels, row.top_k_scores, strict=True) if s >= 0.5]
        assert list(row.labels[: len(top)]) == top
    # The next night's launch, same parameters but its own run: nothing new, everything skipped.
    again = _launch(*(f"--{name}={value}" for name, value in {**values, "run_id": "flex-2"}.items()))
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"classified 0 of {count} images, 0 errors, {count} skipped" in again.stdout
    # A launch whose every input fails ends with the status a scheduler reads (docs: exit statuses).
    (work / "gone.csv").write_text(f"path\n{work}/photos/gone.jpg\n")
    failed = _launch(
        f"--input_list={work}/gone.csv",
        "--input_list_column=path",
        f"--model={work}/model",
        f"--output={work}/failed",
    )
    assert failed.returncode == 3, failed.stderr[-3000:]
    assert (
        failed.stderr.strip().splitlines()[-1].startswith("beamvision classify: every input failed (1 of 1;")
    )


@pytest.mark.slow
def test_flex_entry_point_builds_the_dataflow_job_graph(flex_inputs):
    work, _ = flex_inputs
    ran = _launch(
        "--input=gs://bucket/photos/**",
        f"--model={work}/model",
        "--output=gs://bucket/out",
        "--incremental=true",
        "--runner=DataflowRunner",
        "--dry_run=True",
        "--project=beamvision-test",
        "--region=us-central1",
        "--temp_location=gs://bucket/tmp",
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "dry run: built the DataflowRunner job graph" in ran.stdout
    assert "nothing was run or written, no job submitted, so no progress to follow" in ran.stdout
    assert_no_startup_noise(ran.stderr)


def _metadata_parameters() -> dict[str, dict]:
    with open(os.path.join(DEPLOY, "metadata.json")) as f:
        return {p["name"]: p for p in json.load(f)["parameters"]}


def test_the_scheduler_launch_body_uses_only_template_parameters():
    """deploy/launch-request.json is POSTed to flexTemplates:launch as is, every night."""
    with open(os.path.join(DEPLOY, "launch-request.json")) as f:
        launch = json.load(f)["launchParameter"]
    known = _metadata_parameters()
    template_parameters = {k: v for k, v in launch["parameters"].items() if k != "sdk_container_image"}
    assert set(template_parameters) <= set(known)
    assert {name for name, p in known.items() if not p.get("isOptional")} <= set(template_parameters)
    assert template_parameters["incremental"] == "true" and "run_id" not in template_parameters
    assert all(isinstance(v, str) for v in launch["parameters"].values())  # the API takes strings
    assert launch["containerSpecGcsPath"].startswith("gs://") and launch["environment"]["tempLocation"]
    from beamvision.pipelines import flags

    argv = [f"--{k}={v}" for k, v in template_parameters.items()]
    args, _ = flags.parse_pipeline_args("t", "t", add_classify_arguments, argv)
    assert args.incremental is True and args.output == "gs://BUCKET/catalog"


def test_the_airflow_dag_uses_only_template_parameters():
    """Checked statically: apache-airflow is far too heavy for the test extra."""
    import ast

    with open(os.path.join(DEPLOY, "airflow_dag.py")) as f:
        tree = ast.parse(f.read())
    assignment = next(
        node
        for node in tree.body
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "PARAMETERS"
    )
    parameters = ast.literal_eval(assignment.value)
    known = _metadata_parameters()
    assert set(parameters) <= set(known)
    assert {name for name, p in known.items() if not p.get("isOptional")} <= set(parameters)
    assert parameters["incremental"] == "true"
    calls = [n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    assert "DataflowStartFlexTemplateOperator" in calls
