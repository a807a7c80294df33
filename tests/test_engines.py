"""Inference engines: TensorFlow and OpenVINO, fp32 and bf16, agree on a model our pipeline trained."""

from __future__ import annotations

import glob
import json
import subprocess
import sys

import pandas as pd
import pytest
from photos import write_photo_classes
from PIL import Image

from beamvision import storage
from beamvision.models.artifact import Manifest, load_artifact, load_manifest, save_artifact, verify_artifact
from beamvision.pipelines import classify, prepare
from beamvision.pipelines.cli import main
from beamvision.transforms.engines import (
    CONVERTED_ENGINES,
    ENGINES,
    PRECISIONS,
    Engine,
    OpenVINOEngine,
    TensorFlowEngine,
    native_bf16,
    resolve_precision,
    saturating_int8,
)

# TensorFlow bf16 first: the fp32 runs after it in this process must not inherit its graph rewrite.
RUNS = [("tensorflow", "bf16"), ("tensorflow", "fp32"), ("openvino", "fp32"), ("openvino", "bf16")]


def test_auto_precision_follows_the_cpu_flags():
    with_bf16 = "processor: 0\nflags\t\t: fpu sse avx512f avx512_bf16 amx_tile\n"
    without = "processor: 0\nflags\t\t: fpu sse avx2 avx512f\n"
    assert native_bf16(with_bf16) and not native_bf16(without)
    assert resolve_precision("auto", with_bf16) == "bf16" and resolve_precision("auto", without) == "fp32"
    assert resolve_precision("fp32", with_bf16) == "fp32"


def test_int8_saturates_on_x86_without_vnni_or_amx():
    cpus = {
        "AVX2 (this project's EPYC)": ("fpu sse sse4_1 avx avx2 fma", True),
        "AVX-512 before Cascade Lake": ("fpu sse sse4_1 avx2 avx512f avx512bw", True),
        "AVX-512 VNNI": ("fpu sse sse4_1 avx2 avx512f avx512_vnni", False),
        "AVX-VNNI": ("fpu sse sse4_1 avx2 avx_vnni", False),
        "AMX": ("fpu sse sse4_1 avx2 avx512f amx_int8 amx_tile", False),
    }
    for name, (flags, saturates) in cpus.items():
        assert saturating_int8(f"processor: 0\nflags\t\t: {flags}\n") is saturates, name
    # An Arm CPU lists Features, not flags: its INT8 kernels are not the x86 ones.
    assert saturating_int8("processor: 0\nFeatures\t: fp asimd asimddp i8mm\n") is False


def _manifest(files=(), quantization=None) -> Manifest:
    listed = {name: {"bytes": 1, "sha256": "0"} for name in ("model.keras", *files)}
    return Manifest(
        name="m",
        version="1",
        architecture="squeezenet",
        input_size=32,
        preprocessing="torch",
        labels=["a", "b"],
        weights="none",
        created_at="2026-01-01T00:00:00+00:00",
        library_versions={},
        files=listed,
        quantization=quantization or {},
    )


def test_each_engine_says_what_it_stores_and_what_it_runs():
    assert list(ENGINES) == ["tensorflow", "openvino"] and PRECISIONS == ("auto", "fp32", "bf16")
    assert CONVERTED_ENGINES == ("openvino",)
    plain, stored = _manifest(), _manifest(OpenVINOEngine.files)
    assert not OpenVINOEngine.holds(plain) and OpenVINOEngine.holds(stored)
    assert OpenVINOEngine.needs_keras(plain) and not OpenVINOEngine.needs_keras(stored)
    assert TensorFlowEngine.needs_keras(stored)  # it stores nothing: it always loads model.keras
    int8 = _manifest(OpenVINOEngine.files, {"precision": "int8"})
    assert all(engine.refusal("M", stored) is None for engine in ENGINES.values())
    assert OpenVINOEngine.refusal("M", int8) is None
    assert TensorFlowEngine.refusal("M", int8) == (
        "--engine tensorflow: M holds an INT8 model for OpenVINO (beamvision optimize); use --engine openvino"
    )


def test_a_new_engine_is_one_class(capsys):
    """Defining an Engine subclass registers it, and classify --engine offers it."""

    class Echo(Engine):
        name, title = "echo", "Echo"

    try:
        assert ENGINES["echo"] is Echo and Echo.needs_keras(_manifest()) and not Echo.runs_int8
        with pytest.raises(SystemExit):
            main(["classify", "--help"])
        assert "{tensorflow,openvino,echo}" in capsys.readouterr().out
    finally:
        del ENGINES["echo"]


# A schedule that learns the crops (test_optimize's): bf16's top-1 agrees with fp32's where the
# model is sure. 6 epochs of batch 64 (18 steps) left it unsure, and bf16 at 84-95% of fp32's
# top-1 from one run to the next, as the thread timing of training changed the weights.
SCHEDULE = ("--epochs", "12", "--optimizer", "sgd", "--learning_rate", "0.05", "--batch_size", "32")
SCHEDULE += ("--augment", "none")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """mobilenet_v2 at 64 px trained by prepare and train on crops of 7 real photos; the photos.

    Trained in a process of its own, as a user's ``beamvision train`` is: in the
    test's process, TensorFlow's thread pools are whatever an earlier test on
    that worker left, so the weights (and how close bf16 comes) changed with
    the order xdist ran the tests in.
    """
    work = tmp_path_factory.mktemp("engines")
    photos = str(work / "photos")
    write_photo_classes(photos, per_class=24, size=(96, 72))
    prepare.run(["--input", photos, "--output", str(work / "data"), "--image_size", "64"])
    argv = ["--data", str(work / "data"), "--architecture", "mobilenet_v2", "--output", str(work / "model")]
    trained = subprocess.run(
        [sys.executable, "-m", "beamvision", "train", *argv, *SCHEDULE, "--quiet"],
        capture_output=True,
        text=True,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    return work, photos


def _rows(output: str) -> pd.DataFrame:
    frames = [pd.read_parquet(p) for p in glob.glob(f"{output}/results-*.parquet")]
    return pd.concat(frames).set_index("image_uri").sort_index()


@pytest.mark.slow
def test_every_engine_and_precision_agrees_with_tensorflow_fp32(trained):
    work, photos = trained
    rows = {}
    for engine, precision in RUNS:
        output = str(work / f"out-{engine}-{precision}")
        argv = ["--input", photos, "--model", str(work / "model"), "--output", output, "--embeddings"]
        classify.run([*argv, "--engine", engine, "--precision", precision, "--top_k", "5"])
        summary = json.loads(storage.read_text(f"{output}/summary.json"))
        assert (summary["model"]["engine"], summary["model"]["precision"]) == (engine, precision)
        rows[engine, precision] = _rows(output)
    reference = rows["tensorflow", "fp32"]
    assert len(reference) == 7 * 24
    for (engine, precision), other in rows.items():
        assert list(other.index) == list(reference.index)
        agreement = (other.label == reference.label).mean()
        overlap = pd.Series(
            [
                len(set(a) & set(b)) / 5
                for a, b in zip(other.top_k_labels, reference.top_k_labels, strict=True)
            ]
        ).mean()
        print(f"{engine} {precision}: top-1 agreement {agreement:.4f}, top-5 overlap {overlap:.4f}")
        if precision == "fp32":
            assert agreement == 1.0 and overlap >= 0.99, (engine, agreement, overlap)
            assert (other.score - reference.score).abs().max() < 1e-3
        else:
            assert agreement >= 0.95 and overlap >= 0.95, (engine, precision, agreement, overlap)
            assert not (other.score == reference.score).all()  # bf16 really ran


def test_an_artifact_can_carry_its_openvino_model(photo_batch, tmp_path, capsys):
    stored, plain = str(tmp_path / "stored"), str(tmp_path / "plain")
    common = ["export", "--architecture", "squeezenet", "--weights", "none", "--num_classes", "4"]
    assert (
        main([*common, "--input_size", "64", "--output", stored, "--engines", "openvino", "--version", "1"])
        == 0
    )
    files = load_manifest(stored).files
    assert {"openvino/model.xml", "openvino/model.bin"} <= set(files) and files["openvino/model.bin"][
        "bytes"
    ] > 0
    # The same weights without the converted model: workers convert it themselves.
    artifact = load_artifact(stored)
    save_artifact(artifact.model, artifact.manifest, plain)
    assert "openvino/model.xml" not in load_manifest(plain).files
    images = tmp_path / "images"
    images.mkdir()
    for i, pixels in enumerate(photo_batch(80)):
        Image.fromarray(pixels).save(images / f"{i}.png")
    outputs = {}
    for name, model in (("stored", stored), ("plain", plain)):
        outputs[name] = str(tmp_path / f"out-{name}")
        argv = ["--input", str(images), "--model", model, "--output", outputs[name], "--engine", "openvino"]
        classify.run([*argv, "--embeddings"])
    stored_rows, plain_rows = _rows(outputs["stored"]), _rows(outputs["plain"])
    assert list(stored_rows.label) == list(plain_rows.label)
    assert (stored_rows.score - plain_rows.score).abs().max() < 1e-5
    # With the converted model stored, an OpenVINO run never loads TensorFlow or Keras.
    code = (
        "import sys\n"
        "from beamvision.pipelines import classify\n"
        f"classify.run(['--input', {str(images)!r}, '--model', {stored!r},"
        f" '--output', {str(tmp_path / 'out-3')!r}, '--engine', 'openvino'])\n"
        "print('LOADED', sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "LOADED []" in done.stdout, done.stdout[-1000:] + done.stderr[-2000:]
    # A converted model that does not match its manifest is refused before any work.
    with open(tmp_path / "stored" / "openvino" / "model.bin", "ab") as f:
        f.write(b"tampered")
    with pytest.raises(Exception, match="does not match its manifest"):
        verify_artifact(stored)
