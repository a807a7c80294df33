"""Does each format ``beamvision convert`` writes agree with classify? Top-1 agreement on unseen photo crops.

    python benchmarks/convert.py [--model DIR --data PREFIX] [--per_class 150]

Trains mobilenet_v2 at 64 px with beamvision's own pipeline (prepare, then
train for 3 epochs) on crops of 7 real photographs that ship in scikit-image
and scikit-learn (or takes ``--model``, and ``--data``: the prepare output
that calibrates INT8), writes ``--per_class`` x 7 other crops (another seed:
images the model never saw), then runs ``beamvision convert`` as a whole
process for each format: SavedModel, TFLite, TFLite ``--quantize int8``
(calibrated on the prepare output's train split) and ONNX, each with
``--check`` on those crops. Each run measures the converted model against
classify (decode_image and the Keras model) image by image; the table is
read from each ``OUT/conversion.json``, with the process's wall time and
the converted size over ``model.keras``'s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from common import BEAMVISION, cpu_description, run_process, trained_photo_model  # noqa: E402
from photos import CLASSES, write_photo_classes  # noqa: E402

RUNS = [("savedmodel", "none"), ("tflite", "none"), ("tflite", "int8"), ("onnx", "none")]
CHECK_LIMIT = 2000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model artifact to convert (default: train one in --workdir)")
    parser.add_argument("--data", help="with --model: its prepare output, for INT8 (none: no INT8 row)")
    parser.add_argument("--per_class", type=int, default=150, help="unseen crops per class (7 classes)")
    parser.add_argument("--workdir", default="/tmp/bv-bench-convert")
    args = parser.parse_args()
    began = time.perf_counter()
    work = args.workdir
    os.makedirs(work, exist_ok=True)
    print(f"cpu: {cpu_description()}", flush=True)
    model, data = (args.model, args.data) if args.model else trained_photo_model(work)
    images = os.path.join(work, f"unseen-{args.per_class}")
    if not os.path.isdir(images):
        write_photo_classes(images, per_class=args.per_class, seed=1)
    keras_bytes = os.path.getsize(os.path.join(model, "model.keras"))
    rows = []
    for fmt, quantize in RUNS:
        if quantize != "none" and not data:
            print(f"{fmt} {quantize}: skipped (no --data to calibrate on)", flush=True)
            continue
        out = os.path.join(work, f"out-{fmt}-{quantize}")
        argv = ["convert", "--model", model, "--format", fmt, "--output", out, "--overwrite"]
        argv += ["--check", images, "--check_limit", str(CHECK_LIMIT)]
        if quantize != "none":
            argv += ["--quantize", quantize, "--data", data]
        run = run_process([*BEAMVISION, *argv])
        with open(os.path.join(out, "conversion.json")) as f:
            report = json.load(f)
        print(f"{fmt} {quantize}: {run.seconds:.0f}s; " + run.output.strip().splitlines()[-1], flush=True)
        rows.append((fmt, quantize, report, run))
    total = len(CLASSES) * args.per_class
    print(
        f"\n{total:,} unseen crops of {len(CLASSES)} photos (160x120 JPEG), mobilenet_v2 at 64 px trained by "
        f"beamvision train; model.keras {keras_bytes / 1e6:.1f} MB; {cpu_description()}\n"
    )
    print(
        "| format | quantize | size MB | size / model.keras | images | top-1 agreement | same top-1 "
        "| max prob difference | seconds | peak RSS MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for fmt, quantize, report, run in rows:
        checked = report["agreement"]
        size = report["size_bytes"]
        print(
            f"| {fmt} | {quantize} | {size / 1e6:.1f} | {size / keras_bytes:.2f}x | {checked['images']:,} "
            f"| {checked['top1_agreement']:.2%} | {checked['same_top1']:,} "
            f"| {checked['max_abs_difference']:.4f} | {run.seconds:.0f} | {run.peak_rss_mb:,.0f} |"
        )
    print(f"\ntook {time.perf_counter() - began:.0f}s")


if __name__ == "__main__":
    main()
