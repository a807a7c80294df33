"""beamvision convert: SavedModel, TFLite (float and INT8) and ONNX from a model trained on real photos.

Each converted model is loaded the way its users load it (tf.saved_model.load
in TF Serving's layout, LiteRT's interpreter, an ONNX runtime: OpenVINO
reads ONNX) and must agree with what classify computes on the same files.
"""

from __future__ import annotations

import glob
import json
import os
import pathlib

import numpy as np
import pytest

from beamvision.models.artifact import load_artifact, load_manifest
from beamvision.pipelines.cli import main
from beamvision.transforms.decode import decode_image


def _convert(capsys, *argv: str) -> tuple[int, str]:
    code = main(["convert", *argv])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _photos(photos: str, step: int = 4) -> list[str]:
    return sorted(glob.glob(os.path.join(photos, "*", "*.jpg")))[::step]


def _reference(model: str, files: list[str]) -> np.ndarray:
    """classify's probabilities: each file through decode_image and the artifact's Keras model."""
    artifact = load_artifact(model)
    size = artifact.manifest.input_size
    pixels = []
    for path in files:
        with open(path, "rb") as f:
            pixels.append(decode_image(f.read(), size).pixels)
    return np.asarray(artifact.model(np.stack(pixels), training=False))


@pytest.mark.slow
def test_savedmodel_decodes_image_bytes_in_its_signature_and_agrees_with_classify(
    trained_photos, tmp_path, capsys
):
    import tensorflow as tf

    _, photos, _, model = trained_photos
    output = str(tmp_path / "serving" / "photos")
    code, printed = _convert(
        capsys, "--model", model, "--format", "savedmodel", "--output", output, "--check", photos
    )
    assert code == 0, printed
    assert os.path.exists(os.path.join(output, "1", "saved_model.pb"))  # TF Serving's layout: PATH/1/
    report = json.loads(pathlib.Path(output, "conversion.json").read_text())
    assert report["agreement"]["images"] == 280 and report["agreement"]["top1_agreement"] >= 0.97
    assert "agreement with classify on 280 images" in printed

    serve = tf.saved_model.load(os.path.join(output, "1")).signatures["serving_default"]
    files = _photos(photos)
    encoded = []
    for path in files:
        with open(path, "rb") as f:
            encoded.append(f.read())
    out = serve(image_bytes=tf.constant(encoded))
    manifest = load_manifest(model)
    reference = _reference(model, files)
    labels = [label.decode() for label in out["label"].numpy()]
    same = np.mean(np.array(labels) == np.array(manifest.labels)[reference.argmax(axis=1)])
    assert same >= 0.97
    assert np.abs(out["probabilities"].numpy() - reference).max() < 0.2
    assert [x.decode() for x in out["labels"].numpy()[0]] == list(manifest.labels)
    np.testing.assert_allclose(out["score"].numpy(), out["probabilities"].numpy().max(axis=1), rtol=1e-6)


@pytest.mark.slow
def test_tflite_float_and_int8_run_on_litert_with_uint8_pixels(trained_photos, tmp_path, capsys):
    from ai_edge_litert.interpreter import Interpreter

    _, photos, data, model = trained_photos
    manifest = load_manifest(model)
    files = _photos(photos)
    reference = _reference(model, files)
    sizes = {}
    for quantize in ("none", "int8"):
        output = str(tmp_path / f"tflite-{quantize}")
        argv = ["--model", model, "--format", "tflite", "--output", output, "--quantize", quantize]
        extra = ["--data", data, "--calibration_size", "60"] if quantize == "int8" else []
        code, printed = _convert(capsys, *argv, *extra, "--check", photos, "--check_limit", "70")
        assert code == 0, printed
        with open(os.path.join(output, "labels.txt")) as f:
            assert f.read().splitlines() == list(manifest.labels)
        interpreter = Interpreter(model_path=os.path.join(output, "model.tflite"))
        interpreter.allocate_tensors()
        given, returned = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
        assert given["dtype"] == np.uint8 and list(given["shape"]) == [1, 64, 64, 3]
        predicted = []
        for path in files:
            with open(path, "rb") as f:
                interpreter.set_tensor(given["index"], decode_image(f.read(), 64).pixels[None])
            interpreter.invoke()
            predicted.append(interpreter.get_tensor(returned["index"])[0])
        agreement = np.mean(np.argmax(predicted, axis=1) == reference.argmax(axis=1))
        assert agreement >= (0.97 if quantize == "none" else 0.85), (quantize, agreement)
        report = json.loads(pathlib.Path(output, "conversion.json").read_text())
        assert report["quantization"] == quantize and report["agreement"]["images"] == 70
        sizes[quantize] = report["size_bytes"]
    assert sizes["int8"] < sizes["none"] / 2.5  # INT8 weights: about a quarter of float32's


@pytest.mark.slow
def test_onnx_runs_on_an_onnx_runtime_and_agrees(trained_photos, tmp_path, capsys):
    import openvino as ov

    _, photos, _, model = trained_photos
    output = str(tmp_path / "onnx")
    code, printed = _convert(capsys, "--model", model, "--format", "onnx", "--output", output)
    assert code == 0, printed
    assert "agreement not measured (pass --check" in printed
    files = _photos(photos)
    pixels = np.stack([decode_image(pathlib.Path(p).read_bytes(), 64).pixels for p in files])
    # f32: OpenVINO computes in bf16 by default on CPUs with AVX512_BF16 or AMX.
    compiled = ov.Core().compile_model(
        os.path.join(output, "model.onnx"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
    )
    np.testing.assert_allclose(compiled([pixels])[0], _reference(model, files), atol=1e-3)


def test_a_conversion_to_gcs_lands_whole(trained_photos, gcs_bucket, capsys):
    from beamvision import storage

    _, _, _, model = trained_photos
    output = f"{gcs_bucket}/serving/photos"
    code, printed = _convert(capsys, "--model", model, "--format", "onnx", "--output", output)
    assert code == 0, printed
    names = {uri[len(output) + 1 :] for uri in storage.list_files(output)}
    assert names == {"model.onnx", "labels.txt", "conversion.json"}
    code, printed = _convert(capsys, "--model", model, "--format", "onnx", "--output", output)
    assert code == 2 and "--output" in printed and "--overwrite" in printed


def test_check_counts_the_files_a_format_cannot_take(trained_photos, tmp_path, capsys):
    from PIL import Image

    _, photos, _, model = trained_photos
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for path in _photos(photos, step=40):
        (mixed / os.path.basename(os.path.dirname(path))).with_suffix(".jpg").write_bytes(
            pathlib.Path(path).read_bytes()
        )
    Image.open(_photos(photos)[0]).save(mixed / "scan.tif")  # Pillow reads TIFF; TensorFlow does not
    output = str(tmp_path / "out")
    code, printed = _convert(
        capsys, "--model", model, "--format", "savedmodel", "--output", output, "--check", str(mixed)
    )
    assert code == 0, printed
    report = json.loads(pathlib.Path(output, "conversion.json").read_text())
    assert (
        report["agreement"]["not_taken"] == 1 and report["agreement"]["images"] == len(os.listdir(mixed)) - 1
    )
    assert "1 not taken by SavedModel" in printed


def test_overwrite_replaces_only_a_conversion_and_never_the_model(trained_photos, tmp_path, capsys):
    _, _, _, model = trained_photos
    output = tmp_path / "onnx"
    assert _convert(capsys, "--model", model, "--format", "onnx", "--output", str(output))[0] == 0
    first = (output / "conversion.json").read_text()
    code, printed = _convert(
        capsys, "--model", model, "--format", "tflite", "--output", str(output), "--overwrite"
    )
    assert code == 0, printed
    assert sorted(os.listdir(output)) == ["conversion.json", "labels.txt", "model.tflite"] and first
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".convert")]  # nothing left beside
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "mine.txt").write_text("keep me")
    code, printed = _convert(
        capsys, "--model", model, "--format", "onnx", "--output", str(notes), "--overwrite"
    )
    assert code == 2 and "no conversion.json" in printed and (notes / "mine.txt").exists()
    code, printed = _convert(
        capsys, "--model", model, "--format", "onnx", "--output", os.path.dirname(model), "--overwrite"
    )
    assert code == 2 and "holds --model" in printed and os.path.exists(os.path.join(model, "manifest.json"))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--format", "savedmodel", "--quantize", "int8"], "--quantize int8: SavedModel takes none"),
        (["--format", "tflite", "--quantize", "int8"], "--quantize int8: needs --data"),
        (["--format", "keras"], "--format: invalid choice: 'keras'"),
        (["--format", "onnx", "--check", "no/such/*.jpg"], "--check no/such/*.jpg: matches no files"),
    ],
    ids=["int8-savedmodel", "int8-without-data", "unknown-format", "check-matches-nothing"],
)
def test_user_mistakes_are_one_line_and_write_nothing(trained_photos, tmp_path, capsys, argv, message):
    _, _, _, model = trained_photos
    output = tmp_path / "out"
    code, printed = _convert(capsys, "--model", model, "--output", str(output), *argv)
    assert code == 2
    assert len(printed.strip().splitlines()) == 1 and message in printed, printed
    assert not output.exists()


def test_an_output_that_is_a_file_is_refused_and_kept(trained_photos, tmp_path, capsys):
    _, _, _, model = trained_photos
    named = tmp_path / "model.onnx"
    named.write_text("mine")
    code, printed = _convert(capsys, "--model", model, "--format", "onnx", "--output", str(named))
    assert code == 2 and "is a file" in printed and named.read_text() == "mine"
