"""Throughput and peak memory of beamvision classify against Beam's own RunInference recipe.

    python benchmarks/throughput.py --images 800

Makes N photo-like 1600x1200 JPEGs, then times whole processes, one after
another, on the same images with the same network (mobilenet_v2 at 224,
identical weights):

(a) baseline: the job as Beam's RunInference examples write it: fileio.MatchFiles,
    ReadMatches, PIL decode and resize, Keras preprocess_input,
    RunInference(KeyedModelHandler(TFModelHandlerNumpy(...))), WriteToText.
(b) ceilings: each engine and precision alone on pre-decoded uint8 batches
    (no Beam, no decode). The artifact holds its OpenVINO model (as
    ``export --engines openvino`` stores it), so OpenVINO runs load no TensorFlow.
(c) beamvision classify with each engine and precision.

"of ceiling" compares a beamvision run with its own engine's ceiling.

Prints img/s, ratios and peak RSS (summed over the process tree) as a table.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import make_jpegs, run_process  # noqa: E402

INPUT_SIZE = 224


def _prepare(workdir: str, count: int) -> dict:
    import keras
    import numpy as np

    from beamvision.models import create_model
    from beamvision.models.artifact import new_manifest, save_artifact
    from beamvision.models.labels import imagenet_labels
    from beamvision.transforms.decode import decode_image
    from beamvision.transforms.engines import engine_files

    images = make_jpegs(os.path.join(workdir, "images"), count, (1600, 1200))
    artifact = os.path.join(workdir, "model")
    baseline_model = os.path.join(workdir, "baseline_mobilenet_v2.keras")
    manifest = pathlib.Path(artifact, "manifest.json")
    if not manifest.exists() or "openvino/model.xml" not in manifest.read_text():
        model = create_model("mobilenet_v2", weights=None)
        manifest = new_manifest(model, "mobilenet_v2", list(imagenet_labels()), "none")
        with tempfile.TemporaryDirectory() as converted:  # as export/train --engines openvino store it
            extra = engine_files(model, manifest, ["openvino"], converted)
            save_artifact(model, manifest, artifact, overwrite=True, extra_files=extra)
        plain = keras.applications.MobileNetV2(weights=None)
        plain.set_weights(model.get_weights())  # the same network and weights, float input
        plain.save(baseline_model)
    pixels = os.path.join(workdir, f"pixels_{count}.npy")
    if not os.path.exists(pixels):
        batch = []
        for path in images:
            with open(path, "rb") as f:
                batch.append(decode_image(f.read(), INPUT_SIZE).pixels)
        np.save(pixels, np.stack(batch))
    return {
        "images": os.path.join(workdir, "images", "*.jpg"),
        "artifact": artifact,
        "baseline_model": baseline_model,
        "pixels": pixels,
    }


def run_baseline(pattern: str, model_path: str, output: str) -> None:
    """Beam's RunInference example, as written in Beam's documentation."""
    import io

    import apache_beam as beam
    import numpy as np
    import tensorflow as tf
    from apache_beam.io import fileio
    from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
    from apache_beam.ml.inference.tensorflow_inference import ModelType, TFModelHandlerNumpy
    from PIL import Image

    def preprocess(readable_file):
        image = Image.open(io.BytesIO(readable_file.read())).convert("RGB").resize((INPUT_SIZE, INPUT_SIZE))
        array = tf.keras.applications.mobilenet_v2.preprocess_input(np.asarray(image, dtype=np.float32))
        return readable_file.metadata.path, array

    def postprocess(element):
        path, result = element
        scores = np.asarray(result.inference)
        top = np.argsort(-scores)[:5]
        return f"{path},{','.join(str(i) for i in top)}"

    handler = KeyedModelHandler(TFModelHandlerNumpy(model_path, model_type=ModelType.SAVED_MODEL))
    with beam.Pipeline() as p:
        _ = (
            p
            | fileio.MatchFiles(pattern)
            | fileio.ReadMatches()
            | beam.Map(preprocess)
            | RunInference(handler)
            | beam.Map(postprocess)
            | beam.io.WriteToText(output, file_name_suffix=".txt")
        )


ENGINES = [("tensorflow", "fp32"), ("tensorflow", "bf16"), ("openvino", "fp32"), ("openvino", "bf16")]


def run_ceiling(artifact: str, pixels_path: str, batch_size: int, engine: str, precision: str) -> None:
    """The artifact's model alone on pre-decoded batches, loaded as a beamvision worker loads it."""
    import numpy as np

    from beamvision.transforms.inference import BeamvisionModelHandler

    pixels = np.load(pixels_path)
    classify = BeamvisionModelHandler(artifact, batch_size, 5, False, engine, precision).load_model()
    for start in range(0, len(pixels), batch_size):
        classify(list(pixels[start : start + batch_size]))


def _count_results(beamvision_dir: str) -> tuple[int, int]:
    with open(os.path.join(beamvision_dir, "summary.json")) as f:
        summary = json.load(f)
    return summary["results"], summary["errors"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=800)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--workdir", default=os.path.join(HERE, "out", "throughput"))
    parser.add_argument("--step", choices=["baseline", "ceiling"], help=argparse.SUPPRESS)
    parser.add_argument("--engine", default="tensorflow", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        paths = json.loads(args.paths)
        if args.step == "baseline":
            run_baseline(paths["images"], paths["baseline_model"], paths["baseline_out"])
        else:
            run_ceiling(paths["artifact"], paths["pixels"], args.batch_size, args.engine, args.precision)
        return

    workdir = os.path.abspath(args.workdir)
    print(f"preparing {args.images} 1600x1200 JPEGs and the models in {workdir} ...", flush=True)
    paths = _prepare(workdir, args.images)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    paths["baseline_out"] = os.path.join(workdir, f"baseline-{stamp}", "predictions")
    ours_out = os.path.join(workdir, f"beamvision-{stamp}")
    me = [
        sys.executable,
        os.path.abspath(__file__),
        "--images",
        str(args.images),
        "--batch_size",
        str(args.batch_size),
        "--paths",
        json.dumps(paths),
    ]
    runs, ceilings = {}, {}
    print("(a) baseline: Beam RunInference example ...", flush=True)
    base = runs["(a) Beam RunInference example"] = run_process([*me, "--step", "baseline"])
    for engine, precision in ENGINES:
        print(f"(b) ceiling: {engine} {precision} alone on pre-decoded batches ...", flush=True)
        flags = ["--step", "ceiling", "--engine", engine, "--precision", precision]
        ceiling = run_process([*me, *flags])
        ceilings[engine, precision] = runs[f"(b) model alone, {engine} {precision}"] = ceiling
    outputs = {}
    for engine, precision in ENGINES:
        print(f"(c) beamvision classify, {engine} {precision} ...", flush=True)
        outputs[engine, precision] = out = f"{ours_out}-{engine}-{precision}"
        argv = ["classify", "--input", paths["images"], "--model", paths["artifact"], "--output", out]
        flags = ["--batch_size", str(args.batch_size), "--engine", engine, "--precision", precision]
        runs[f"(c) beamvision classify, {engine} {precision}"] = run_process(
            [sys.executable, "-m", "beamvision", *argv, *flags]
        )
    rows = []
    for name, run in runs.items():
        rate = args.images / run.seconds
        own = next((c for (e, p), c in ceilings.items() if name.endswith(f"{e} {p}")), None)
        rows.append(
            [
                name,
                f"{run.seconds:.1f}",
                f"{rate:.1f}",
                f"{base.seconds / run.seconds:.2f}x",
                f"{own.seconds / run.seconds:.2f}" if own and name.startswith("(c)") else "",
                f"{run.peak_rss_mb:,.0f}",
            ]
        )
    header = ["job", "seconds", "img/s", "vs (a)", "of ceiling", "peak RSS MB"]
    print()
    print(
        f"N = {args.images} JPEGs 1600x1200, mobilenet_v2 at 224, batch {args.batch_size}, "
        f"{os.cpu_count()} CPUs, whole processes (start-up included)"
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    for (engine, precision), out in outputs.items():
        results, errors = _count_results(out)
        print(f"(c) {engine} {precision}: {results} results and {errors} errors of {args.images} images")


if __name__ == "__main__":
    main()
