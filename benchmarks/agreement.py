"""Do the engines and precisions agree? Top-1 agreement and top-5 overlap with TensorFlow fp32.

    python benchmarks/agreement.py [--per_class 150]

Trains mobilenet_v2 at 96 px with beamvision's own pipeline (prepare, then
train with default flags) on crops of 7 real photographs that ship in
scikit-image and scikit-learn, quantises it to INT8 with ``beamvision
optimize`` (default flags: 300 images of its train split calibrate), then
classifies ``--per_class`` x 7 other crops (another seed: images the model
never saw) with every engine and precision, and the INT8 artifact with
OpenVINO, and compares each with TensorFlow fp32, image by image.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import pandas as pd  # noqa: E402
from common import BEAMVISION, run_process  # noqa: E402
from photos import write_photo_classes  # noqa: E402

RUNS = [("tensorflow", "fp32"), ("tensorflow", "bf16"), ("openvino", "fp32"), ("openvino", "bf16")]
# The optimize artifact, run as classify --engine openvino runs it (what is not quantised, in fp32).
INT8 = ("openvino", "int8")


def _rows(output: str) -> pd.DataFrame:
    frames = [pd.read_parquet(p) for p in glob.glob(f"{output}/results-*.parquet")]
    return pd.concat(frames).set_index("image_uri").sort_index()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per_class", type=int, default=150)
    parser.add_argument("--workdir", default="/tmp/beamvision-bench-agreement")
    args = parser.parse_args()
    work = args.workdir
    model, data = os.path.join(work, "model"), os.path.join(work, "data")
    if not os.path.exists(os.path.join(model, "manifest.json")):
        write_photo_classes(os.path.join(work, "train"), per_class=40, seed=0)
        run_process(
            [*BEAMVISION, "prepare", "--input", f"{work}/train", "--output", data, "--image_size", "96"]
        )
        run_process(
            [*BEAMVISION, "train", "--data", data, "--architecture", "mobilenet_v2", "--output", model]
        )
    int8_model = os.path.join(work, "model-int8")
    if not os.path.exists(os.path.join(int8_model, "manifest.json")):
        run_process([*BEAMVISION, "optimize", "--model", model, "--data", data, "--output", int8_model])
    images = os.path.join(work, "unseen")
    if not os.path.isdir(images):
        write_photo_classes(images, per_class=args.per_class, seed=7)
    rows = {}
    for engine, precision in [*RUNS, INT8]:
        out = os.path.join(work, f"out-{engine}-{precision}")
        artifact, flag = (int8_model, "fp32") if (engine, precision) == INT8 else (model, precision)
        argv = ["classify", "--input", images, "--model", artifact, "--output", out, "--overwrite"]
        run_process([*BEAMVISION, *argv, "--engine", engine, "--precision", flag])
        rows[engine, precision] = _rows(out)
    reference = rows["tensorflow", "fp32"]
    truth = pd.Series([uri.rsplit("/", 2)[-2] for uri in reference.index], index=reference.index)
    print(
        f"\n{len(reference):,} unseen crops of 7 photos, mobilenet_v2 at 96 px trained by beamvision train\n"
    )
    print("| engine | precision | top-1 agreement with tensorflow fp32 | top-5 overlap | accuracy |")
    print("|---|---|---|---|---|")
    for (engine, precision), other in rows.items():
        agreement = (other.label == reference.label).mean()
        overlap = sum(
            len(set(a) & set(b)) / len(b)
            for a, b in zip(other.top_k_labels, reference.top_k_labels, strict=True)
        ) / len(other)
        accuracy = (other.label == truth).mean()
        print(f"| {engine} | {precision} | {agreement:.2%} | {overlap:.2%} | {accuracy:.2%} |")


if __name__ == "__main__":
    main()
