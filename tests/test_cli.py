"""The beamvision CLI: help, models, export (none, file, ImageNet from Keras's cache), errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import keras
import numpy as np
import pytest

from beamvision import storage
from beamvision.models import create_model, list_models
from beamvision.models.artifact import load_artifact
from beamvision.models.labels import imagenet_labels
from beamvision.pipelines.cli import COMMANDS, main


def _run_cli(*args):
    """Runs ``python -m beamvision ARGS``: a separate process, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "beamvision", *args], capture_output=True, text=True, timeout=600
    )


def _error_line(capsys, argv) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def test_help_lists_every_command():
    result = _run_cli("--help")
    assert result.returncode == 0
    for command in COMMANDS:
        assert command in result.stdout


def _help(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as excinfo:
        main([command, "--help"])
    assert excinfo.value.code == 0
    return capsys.readouterr().out


def _usage(text: str) -> str:
    """The usage paragraph of a --help text, on one line."""
    return " ".join(text.split("\n\n", 1)[0].split())


def _listed_options(text: str) -> dict[str, str]:
    """Each flag of a --help text's options list -> its help text."""
    listed, current = {}, []
    for line in text.split("options:\n", 1)[1].split("\n\n", 1)[0].splitlines():
        entry = re.match(r"^  (-\S.*?)(?:\s{2,}(\S.*))?$", line)
        if entry:
            current = re.findall(r"--[\w-]+", entry[1])
            listed.update(dict.fromkeys(current, entry[2] or ""))
        else:  # the help text goes on, further indented
            listed.update({flag: f"{listed[flag]} {line.strip()}".strip() for flag in current})
    return listed


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help_listing_each_flag_of_its_usage(command, capsys):
    text = _help(command, capsys)
    usage = _usage(text)
    assert usage.startswith(f"usage: beamvision {command} [-h]"), usage
    declared = set(re.findall(r"(?<![\w-])--[\w-]+", usage))
    listed = _listed_options(text)
    assert declared == set(listed) - {"--help"}, (declared, listed)
    assert all(listed.values()), [flag for flag, help_text in listed.items() if not help_text]


def _required_flags(usage: str) -> list[str]:
    """Each flag the usage requires (those outside brackets) with a value it takes: its first choice, or 1."""
    while re.search(r"\[[^][]*\]", usage):
        usage = re.sub(r"\[[^][]*\]", "", usage)
    argv = []
    for flag, value in re.findall(r"(--[\w-]+) (\S+)", usage):
        choice = value.strip("{}").split(",")[0] if value.startswith("{") else "1"
        argv += [flag, list_models()[0] if flag == "--architecture" else choice]
    return argv


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_an_unknown_flag_is_one_line_and_exit_2_for_every_command(command, capsys):
    required = _required_flags(_usage(_help(command, capsys)))
    assert _error_line(capsys, [command, *required, "--no_such_flag"]) == (
        f"beamvision {command}: error: unrecognized arguments: --no_such_flag"
    )


# Our name -> Keras's own application of the network: its constructor and the module of its preprocess_input.
KERAS_APPLICATIONS = {
    "densenet121": ("DenseNet121", "densenet"),
    "inception_v3": ("InceptionV3", "inception_v3"),
    "mobilenet_v1": ("MobileNet", "mobilenet"),
    "mobilenet_v2": ("MobileNetV2", "mobilenet_v2"),
    "resnet50": ("ResNet50", "resnet50"),
    "vgg16": ("VGG16", "vgg16"),
    "xception": ("Xception", "xception"),
}
# Built here with weights=None, so that Keras counts their parameters: two small ones, at 224 and 299 px.
BUILT = ("mobilenet_v2", "inception_v3")
# Not in Keras: torchvision's published parameter counts (AlexNet, SqueezeNet 1.1) at 224 px, and its
# normalisation (ImageNet mean and standard deviation of pixels in [0, 1]).
TORCHVISION = {"alexnet": 61_100_840, "squeezenet": 1_235_496}
TORCHVISION_MEAN, TORCHVISION_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def test_models_json_states_what_keras_and_torchvision_report(capsys):
    from keras.applications import imagenet_utils

    assert main(["models", "--json"]) == 0
    records = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert list(records) == list_models()
    assert set(records) == set(KERAS_APPLICATIONS) | set(TORCHVISION), (
        "a new architecture needs its facts here"
    )
    pixels = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3)).astype("float32")
    for name, (constructor, module) in KERAS_APPLICATIONS.items():
        record = records[name]
        assert record["imagenet_weights"] is True, name
        np.testing.assert_allclose(
            imagenet_utils.preprocess_input(pixels.copy(), mode=record["preprocessing"]),
            getattr(keras.applications, module).preprocess_input(pixels.copy()),
            rtol=1e-6,
            err_msg=name,
        )
        below = record["min_input_size"] - 1  # Keras refuses it before building anything
        with pytest.raises(ValueError, match=f"Input size must be at least {below + 1}x{below + 1}"):
            getattr(keras.applications, constructor)(weights=None, input_shape=(below, below, 3))
    for name in BUILT:
        reference = getattr(keras.applications, KERAS_APPLICATIONS[name][0])(weights=None)
        assert reference.input_shape == (None, records[name]["input_size"], records[name]["input_size"], 3)
        assert records[name]["params"] == reference.count_params(), name
        keras.backend.clear_session()
    for name, params in TORCHVISION.items():
        record = records[name]
        assert (record["params"], record["input_size"], record["imagenet_weights"]) == (params, 224, False)
        np.testing.assert_allclose(
            imagenet_utils.preprocess_input(pixels.copy(), mode=record["preprocessing"]),
            (pixels / 255 - TORCHVISION_MEAN) / TORCHVISION_STD,
            rtol=1e-5,
            err_msg=name,
        )


def test_registry_and_help_never_import_tensorflow():
    """Start-up: listing architectures and printing help need no Keras or TensorFlow (seconds of import).

    One process runs them in turn and looks after each: the first to load either is named.
    """
    calls = [["models"], ["models", "--json"], ["classify", "--help"], ["--help"]]
    code = (
        "import sys\n"
        "from beamvision.pipelines import cli\n"
        f"for argv in {calls!r}:\n"
        "    try:\n"
        "        cli.main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "    loaded = sorted(m for m in ('tensorflow', 'keras') if m in sys.modules)\n"
        "    print('LOADED', argv, loaded, file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert [line for line in done.stderr.splitlines() if line.startswith("LOADED")] == [
        f"LOADED {argv!r} []" for argv in calls
    ], done.stderr[-2000:]


def test_models_table(capsys):
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == [
        "name",
        "input_size",
        "min_input_size",
        "preprocessing",
        "params",
        "imagenet_weights",
    ]
    assert len(lines) == 1 + len(list_models())
    assert "vgg16         224         32              caffe          138,357,544  yes" in lines


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["nonsense"], "unknown command 'nonsense'"),
        (["models", "--jsn"], "unrecognized arguments: --jsn"),
        (
            ["export", "--architecture", "resnet9000", "--weights", "none", "--output", "x"],
            "argument --architecture: invalid choice: 'resnet9000'",
        ),
        (
            ["export", "--architecture", "vgg16", "--weights", "none", "--output", "x", "--input_size", "-3"],
            "argument --input_size: expected a positive integer, received '-3'",
        ),
        (
            [
                "export",
                "--architecture",
                "vgg16",
                "--weights",
                "none",
                "--output",
                "x",
                "--num_classes",
                "ten",
            ],
            "argument --num_classes: expected a positive integer, received 'ten'",
        ),
        (
            [
                "export",
                "--architecture",
                "inception_v3",
                "--weights",
                "none",
                "--output",
                "x",
                "--input_size",
                "64",
            ],
            "--input_size 64: inception_v3 needs at least 75",
        ),
        (
            ["export", "--architecture", "alexnet", "--weights", "imagenet", "--output", "x"],
            "--weights imagenet: no ImageNet weights are published for alexnet",
        ),
        (
            [
                "export",
                "--architecture",
                "vgg16",
                "--weights",
                "imagenet",
                "--output",
                "x",
                "--num_classes",
                "5",
            ],
            "--weights imagenet: takes the 1,000 ImageNet classes",
        ),
        (
            [
                "export",
                "--architecture",
                "squeezenet",
                "--weights",
                "none",
                "--output",
                "x",
                "--labels",
                "/no/such",
            ],
            "--labels /no/such: label file not found: /no/such",
        ),
        (
            ["export", "--architecture", "squeezenet", "--weights", "/no/w.h5", "--output", "x"],
            "weights file not found: /no/w.h5",
        ),
        (
            ["export", "--weights", "none", "--output", "x"],
            "the following arguments are required: --architecture",
        ),
    ],
)
def test_user_mistakes_give_one_line_and_exit_2(argv, expected, capsys):
    assert expected in _error_line(capsys, argv)


def test_user_mistake_in_a_real_process_has_no_traceback():
    result = _run_cli(
        "export", "--architecture", "vgg16", "--weights", "none", "--output", "x", "--input_size", "0"
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "beamvision export: error: argument --input_size: expected a positive integer, received '0'"
    )
    assert "Traceback" not in result.stderr


def test_export_random_weights_with_label_file(tmp_path, capsys):
    labels = tmp_path / "labels.txt"
    labels.write_text("zero\none\n\ntwo\n")
    out = str(tmp_path / "artifact")
    argv = [
        "export",
        "--architecture",
        "squeezenet",
        "--weights",
        "none",
        "--labels",
        str(labels),
        "--input_size",
        "32",
        "--output",
        out,
        "--name",
        "digits",
        "--version",
        "3",
    ]
    assert main(argv) == 0
    assert f"to {out}" in capsys.readouterr().out
    manifest = load_artifact(out).manifest
    assert (manifest.labels, manifest.weights, manifest.input_size) == (["zero", "one", "two"], "none", 32)
    assert (manifest.name, manifest.version) == ("digits", "3")
    assert "already exists" in _error_line(capsys, argv)
    assert main([*argv, "--overwrite"]) == 0


def test_export_default_labels_are_numbered(tmp_path):
    out = str(tmp_path / "a")
    assert (
        main(
            [
                "export",
                "--architecture",
                "mobilenet_v2",
                "--weights",
                "none",
                "--num_classes",
                "4",
                "--input_size",
                "32",
                "--output",
                out,
            ]
        )
        == 0
    )
    assert load_artifact(out).manifest.labels == ["class_0", "class_1", "class_2", "class_3"]


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_export_weights_file(where, tmp_path, photo_batch, request):
    base = request.getfixturevalue("gcs_bucket") if where == "gcs" else str(tmp_path)
    source = create_model("squeezenet", num_classes=5, input_size=40)
    local_weights = str(tmp_path / "trained.weights.h5")
    source.save_weights(local_weights)
    weights_uri = f"{base}/w/trained.weights.h5"
    storage.write_atomic(weights_uri, local_path=local_weights)
    out = f"{base}/artifact"
    assert (
        main(
            [
                "export",
                "--architecture",
                "squeezenet",
                "--weights",
                weights_uri,
                "--num_classes",
                "5",
                "--input_size",
                "40",
                "--output",
                out,
            ]
        )
        == 0
    )
    artifact = load_artifact(out)
    assert artifact.manifest.weights == f"file:{weights_uri}"
    images = photo_batch(40)
    np.testing.assert_array_equal(
        artifact.model.predict(images, verbose=0), source.predict(images, verbose=0)
    )


def test_export_imagenet_uses_the_weights_file_in_keras_cache(
    imagenet_mobilenet_v2, tmp_path, photo_batch, capsys
):
    """Keras looks for ImageNet weights in $KERAS_HOME/models before downloading.

    A weights file placed there under Keras's own name must be what the
    artifact computes with: its predictions must equal those of Keras's
    MobileNetV2 with the same weights on Keras's own preprocess_input.
    """
    reference = imagenet_mobilenet_v2
    out = str(tmp_path / "mnv2")
    assert main(["export", "--architecture", "mobilenet_v2", "--weights", "imagenet", "--output", out]) == 0
    assert "exported mobilenet_v2" in capsys.readouterr().out

    artifact = load_artifact(out)
    assert artifact.manifest.weights == "imagenet"
    assert artifact.manifest.labels == list(imagenet_labels())
    images = photo_batch(224)
    expected = reference.predict(
        keras.applications.mobilenet_v2.preprocess_input(images.astype("float32")), verbose=0
    )
    np.testing.assert_allclose(artifact.model.predict(images, verbose=0), expected, rtol=1e-4, atol=1e-6)


def test_imagenet_labels_ship_with_the_package():
    labels = imagenet_labels()
    assert len(labels) == len(set(labels)) == 1000
    assert (labels[0], labels[207], labels[999]) == ("tench", "golden retriever", "toilet tissue")
