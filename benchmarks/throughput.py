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
(c) beamvision classify with each engine and precision. "openvino int8" is the
    artifact that ``beamvision optimize`` quantised (NNCF), calibrated on 300 of
    the photos after ``beamvision prepare``, its float layers at bf16.
(d) Ray Data, as its documentation writes batch image inference: read_images
    (mode RGB, resized to 224 by Ray's reader), map_batches with a callable class
    (an autoscaling pool of 1 to os.cpu_count() actors) that loads the same
    float-input Keras model as (a), applies preprocess_input and returns top-5
    indices and scores per image, batch 32, then write_parquet. Ray is started
    inside the step (ray.init on this machine's CPUs, no dashboard) and shut down
    before it exits, so its GCS, raylet, agents and workers are descendants of the
    step: they count in its time and in its process tree's RSS.

"of ceiling" compares a beamvision run with its own engine's ceiling.

Prints img/s, ratios and peak RSS (summed over the process tree) as a table.
``--jobs a,d`` runs only some of them (default: all four).
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

from common import BEAMVISION, make_jpegs, run_process  # noqa: E402

INPUT_SIZE = 224


def _prepare(workdir: str, count: int, pixels_needed: bool = True) -> dict:
    import keras
    import numpy as np

    from beamvision.models import create_model
    from beamvision.models.artifact import new_manifest, save_artifact
    from beamvision.models.labels import imagenet_labels
    from beamvision.transforms.decode import decode_image
    from beamvision.transforms.engines import OpenVINOEngine, engine_files

    images = make_jpegs(os.path.join(workdir, "images"), count, (1600, 1200))
    artifact = os.path.join(workdir, "model")
    baseline_model = os.path.join(workdir, "baseline_mobilenet_v2.keras")
    manifest = pathlib.Path(artifact, "manifest.json")
    if not manifest.exists() or OpenVINOEngine.xml not in manifest.read_text():
        model = create_model("mobilenet_v2", weights=None)
        manifest = new_manifest(model, "mobilenet_v2", list(imagenet_labels()), "none")
        with tempfile.TemporaryDirectory() as converted:  # as export/train --engines openvino store it
            extra = engine_files(model, manifest, ["openvino"], converted)
            save_artifact(model, manifest, artifact, overwrite=True, extra_files=extra)
        plain = keras.applications.MobileNetV2(weights=None)
        plain.set_weights(model.get_weights())  # the same network and weights, float input
        plain.save(baseline_model)
    image_list = os.path.join(workdir, f"images_{count}.json")
    with open(image_list, "w") as f:
        json.dump(images, f)
    pixels = os.path.join(workdir, f"pixels_{count}.npy")
    if pixels_needed and not os.path.exists(pixels):
        batch = []
        for path in images:
            with open(path, "rb") as f:
                batch.append(decode_image(f.read(), INPUT_SIZE).pixels)
        np.save(pixels, np.stack(batch))
    return {
        "images": os.path.join(workdir, "images", "*.jpg"),
        "image_list": image_list,
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


# (engine, precision); "int8" is the artifact `beamvision optimize` made, run by OpenVINO at INT8_HINT.
ENGINES = [
    ("tensorflow", "fp32"),
    ("tensorflow", "bf16"),
    ("openvino", "fp32"),
    ("openvino", "bf16"),
    ("openvino", "int8"),
]
INT8_HINT = "bf16"  # the precision of what INT8 leaves unquantised (NNCF keeps some layers float)
CALIBRATION_IMAGES = 300


def int8_artifact(workdir: str, images: list[str], artifact: str) -> str:
    """The benchmark's model quantised by ``beamvision optimize``, calibrated on its own photos.

    The photos go through ``beamvision prepare`` first (two folders, as labelled data), as a user's
    training data would: optimize calibrates on the train split.
    """
    int8 = os.path.join(workdir, "model-int8")
    if os.path.exists(os.path.join(int8, "manifest.json")):
        return int8
    from beamvision.models.labels import imagenet_labels

    root = os.path.join(workdir, "calibration")
    classes = list(imagenet_labels())[:2]  # two of the model's classes, as a user's labelled sample would be
    for i, path in enumerate(images[: CALIBRATION_IMAGES + 60]):
        folder = os.path.join(root, classes[i % 2])
        os.makedirs(folder, exist_ok=True)
        link = os.path.join(folder, os.path.basename(path))
        if not os.path.lexists(link):
            os.symlink(path, link)
    data = os.path.join(workdir, "calibration-data")
    flags = ["--image_size", str(INPUT_SIZE), "--overwrite"]
    run_process([*BEAMVISION, "prepare", "--input", root, "--output", data, *flags])
    size = ["--calibration_size", str(CALIBRATION_IMAGES)]
    run_process([*BEAMVISION, "optimize", "--model", artifact, "--data", data, "--output", int8, *size])
    return int8


def _model_and_precision(paths: dict, precision: str) -> tuple[str, str]:
    """The artifact and ``--precision`` of an ENGINES entry."""
    return (paths["artifact_int8"], INT8_HINT) if precision == "int8" else (paths["artifact"], precision)


def run_ceiling(paths: dict, batch_size: int, engine: str, precision: str) -> None:
    """The artifact's model alone on pre-decoded batches, loaded as a beamvision worker loads it."""
    import numpy as np

    artifact, precision = _model_and_precision(paths, precision)
    pixels_path = paths["pixels"]

    from beamvision.transforms.inference import BeamvisionModelHandler

    pixels = np.load(pixels_path)
    classify = BeamvisionModelHandler(artifact, batch_size, 5, False, engine, precision).load_model()
    for start in range(0, len(pixels), batch_size):
        classify(list(pixels[start : start + batch_size]))


class RayClassifier:
    """The callable class (a Ray actor) of Ray Data's batch inference docs: the model is loaded once in
    ``__init__`` and ``__call__`` classifies one batch, as the TensorFlow tab of
    https://docs.ray.io/en/latest/data/batch_inference.html (Quickstart) writes it."""

    def __init__(self, model_path: str):
        import keras

        self.keras = keras
        self.model = keras.models.load_model(model_path)  # the float-input MobileNetV2 that (a) loads

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        inputs = self.keras.applications.mobilenet_v2.preprocess_input(batch["image"].astype(np.float32))
        scores = np.asarray(self.model(inputs, training=False))
        top = np.argsort(-scores, axis=1)[:, :5]
        return {"path": batch["path"], "top5": top, "scores": np.take_along_axis(scores, top, axis=1)}


def run_ray(image_list: str, model_path: str, output: str, batch_size: int) -> None:
    """Ray Data's batch image inference, as its documentation writes it.

    Follows "Working with Images" (https://docs.ray.io/en/latest/data/working-with-images.html:
    read_images, then "Performing inference on images": a callable class given to map_batches with
    ``compute=ray.data.ActorPoolStrategy(...)``, then "Saving images": write_parquet) and
    "End-to-end: Offline Batch Inference" (https://docs.ray.io/en/latest/data/batch_inference.html).
    In Ray 2.60 ``map_batches(concurrency=n)`` is deprecated in favour of that ``compute`` argument.
    """
    import logging

    # One machine, nothing leaves it: no usage-stats report, and every Ray server on the loopback
    # address (on Linux Ray otherwise picks the address of the default route for its node IP).
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    import ray.data

    # Quiet: Ray Data logs each execution (and a DEBUG trace to its session file) unless told otherwise.
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    with open(image_list) as f:
        images = json.load(f)  # exactly the N images (the folder may hold more from a larger earlier run)
    ray.init(
        num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False
    )
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    try:
        # Actor count. The docs run one model replica per device ("Set the concurrency to the number of GPUs
        # in your cluster", batch_inference.html), each map_batches actor reserving one CPU by default ("The
        # default resource assignments of one CPU per task/actor", same page, which caps replicas only by RAM:
        # two MobileNetV2 replicas fit easily here). So at most one actor per core: max_size=os.cpu_count().
        # Not a fixed pool of that size: read_images' tasks and write_parquet's tasks each need a CPU too and
        # are not fused into the actors, so a fixed pool holding every core starves them and the job hangs
        # (seen here with 2 CPUs: ReadImage "backpressured", CPU budget 0, for 10 minutes; Ray's own warning
        # is "The Dataset job will hang unless more CPUs are freed up"). An autoscaling pool from 1 to
        # os.cpu_count() (map_batches' docs: ActorPoolStrategy(min_size=m, max_size=n) "to use an autoscaling
        # actor pool from m to n workers"; a callable class gets 1 to unlimited by default) lets Ray Data's
        # resource manager share the cores between reading, the actors and writing.
        # read_images resizes with PIL's BILINEAR after decoding (Ray's reader), where (a) converts and
        # resizes with PIL's default (BICUBIC): the same size and layout, uint8 RGB at 224x224.
        (
            ray.data.read_images(images, mode="RGB", size=(INPUT_SIZE, INPUT_SIZE), include_paths=True)
            .map_batches(
                RayClassifier,
                fn_constructor_kwargs={"model_path": model_path},
                batch_size=batch_size,
                compute=ray.data.ActorPoolStrategy(min_size=1, max_size=os.cpu_count()),
            )
            .write_parquet(output)
        )
    finally:
        # Inside the timed step, as a job's end would be. Shutdown stops the raylet first: its workers then
        # sit re-parented to init for a second or two until they exit, outside the measured tree, but only
        # after the output is written (the peak comes earlier, with them still in the tree).
        ray.shutdown()


def _count_parquet_rows(directory: str) -> int:
    import pyarrow.parquet as pq

    files = [os.path.join(directory, n) for n in os.listdir(directory) if n.endswith(".parquet")]
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def _count_results(beamvision_dir: str) -> tuple[int, int]:
    with open(os.path.join(beamvision_dir, "summary.json")) as f:
        summary = json.load(f)
    return summary["results"], summary["errors"]


JOBS = "abcd"
RAY_ROW = "(d) Ray Data (read_images, map_batches with an actor, write_parquet)"


def _jobs(value: str) -> list[str]:
    jobs = [j.strip() for j in value.split(",") if j.strip()]
    unknown = [j for j in jobs if j not in JOBS]
    if unknown or not jobs:
        raise argparse.ArgumentTypeError(f"jobs are a comma list of {','.join(JOBS)}, not {value!r}")
    return jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=800)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--workdir", default=os.path.join(HERE, "out", "throughput"))
    parser.add_argument(
        "--jobs", type=_jobs, default=list(JOBS), help="comma list of a,b,c,d (default: all, in one run)"
    )
    parser.add_argument("--step", choices=["baseline", "ceiling", "ray"], help=argparse.SUPPRESS)
    parser.add_argument("--engine", default="tensorflow", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        paths = json.loads(args.paths)
        if args.step == "baseline":
            run_baseline(paths["images"], paths["baseline_model"], paths["baseline_out"])
        elif args.step == "ray":
            run_ray(paths["image_list"], paths["baseline_model"], paths["ray_out"], args.batch_size)
        else:
            run_ceiling(paths, args.batch_size, args.engine, args.precision)
        return

    jobs = args.jobs
    workdir = os.path.abspath(args.workdir)
    print(f"preparing {args.images} 1600x1200 JPEGs and the models in {workdir} ...", flush=True)
    paths = _prepare(workdir, args.images, pixels_needed="b" in jobs)
    if "b" in jobs or "c" in jobs:
        print(f"INT8 model: beamvision optimize on {CALIBRATION_IMAGES} photos ...", flush=True)
        with open(paths["image_list"]) as f:
            paths["artifact_int8"] = int8_artifact(workdir, json.load(f), paths["artifact"])
    stamp = time.strftime("%Y%m%dT%H%M%S")
    paths["baseline_out"] = os.path.join(workdir, f"baseline-{stamp}", "predictions")
    paths["ray_out"] = os.path.join(workdir, f"ray-{stamp}")
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
    base = None
    if "a" in jobs:
        print("(a) baseline: Beam RunInference example ...", flush=True)
        base = runs["(a) Beam RunInference example"] = run_process([*me, "--step", "baseline"])
    if "b" in jobs:
        for engine, precision in ENGINES:
            print(f"(b) ceiling: {engine} {precision} alone on pre-decoded batches ...", flush=True)
            flags = ["--step", "ceiling", "--engine", engine, "--precision", precision]
            ceiling = run_process([*me, *flags])
            ceilings[engine, precision] = runs[f"(b) model alone, {engine} {precision}"] = ceiling
    outputs = {}
    if "c" in jobs:
        for engine, precision in ENGINES:
            print(f"(c) beamvision classify, {engine} {precision} ...", flush=True)
            outputs[engine, precision] = out = f"{ours_out}-{engine}-{precision}"
            model, hint = _model_and_precision(paths, precision)
            argv = ["classify", "--input", paths["images"], "--model", model, "--output", out]
            flags = ["--batch_size", str(args.batch_size), "--engine", engine, "--precision", hint]
            runs[f"(c) beamvision classify, {engine} {precision}"] = run_process(
                [sys.executable, "-m", "beamvision", *argv, *flags]
            )
    if "d" in jobs:
        print("(d) Ray Data: read_images, map_batches with an actor, write_parquet ...", flush=True)
        runs[RAY_ROW] = run_process([*me, "--step", "ray"])
    rows = []
    for name, run in runs.items():
        rate = args.images / run.seconds
        own = next((c for (e, p), c in ceilings.items() if name.endswith(f"{e} {p}")), None)
        rows.append(
            [
                name,
                f"{run.seconds:.1f}",
                f"{rate:.1f}",
                f"{base.seconds / run.seconds:.2f}x" if base else "",
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
    if "d" in jobs:
        print(f"(d) Ray Data: {_count_parquet_rows(paths['ray_out'])} rows written of {args.images} images")


if __name__ == "__main__":
    main()
