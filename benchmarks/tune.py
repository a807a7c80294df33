"""What does a search buy? ``beamvision tune`` against ``beamvision train`` with its default flags.

    python benchmarks/tune.py [--trials 8] [--workers 2]

On crops of 7 real photographs that ship in scikit-image and scikit-learn
(40 per class, prepared at 64 px), trains mobilenet_v2 with train's default
flags, then runs a random search of ``--trials`` trials over architecture,
learning rate, batch size, optimizer, augmentation and label smoothing (each
trial runs train's default epochs, with successive halving at half of them) on ``--workers``
multi-processing workers. Both are scored on the same test split, which the
search never sees (it ranks on the validation split). Prints the trial table
and one comparison table: wall time, validation and test accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from common import BEAMVISION, run_process  # noqa: E402
from photos import write_photo_classes  # noqa: E402

SPACE = """\
architecture: [mobilenet_v2, squeezenet]
learning_rate: {low: 0.0003, high: 0.01, log: true}
batch_size: [16, 32, 64]
optimizer: [adam, sgd]
augment: [none, "flip,zoom"]
label_smoothing: [0.0, 0.1]
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--workdir", default="/tmp/beamvision-bench-tune")
    args = parser.parse_args()
    work = args.workdir
    data, default_model = os.path.join(work, "data"), os.path.join(work, "default")
    if not os.path.exists(os.path.join(data, "stats.json")):
        write_photo_classes(os.path.join(work, "photos"), per_class=40, seed=0)
        run_process(
            [*BEAMVISION, "prepare", "--input", f"{work}/photos", "--output", data, "--image_size", "64"]
        )
    train = ["train", "--data", data, "--architecture", "mobilenet_v2", "--output", default_model]
    default = run_process([*BEAMVISION, *train, "--overwrite"])
    with open(os.path.join(default_model, "manifest.json")) as f:
        manifest = json.load(f)
    default_val = max(manifest["training"]["history"]["val_accuracy"])
    default_test = manifest["metrics"]["accuracy"]
    space = os.path.join(work, "space.yaml")
    with open(space, "w") as f:
        f.write(SPACE)
    search = os.path.join(work, "search")
    tune = ["tune", "--data", data, "--space", space, "--output", search, "--overwrite"]
    workers = ["--direct_num_workers", str(args.workers), "--direct_running_mode", "multi_processing"]
    tuned = run_process([*BEAMVISION, *tune, "--trials", str(args.trials), *workers])
    lines = tuned.output.splitlines()  # what tune printed, without its trials' own progress lines
    table = next(i for i, line in enumerate(lines) if line.startswith("trial  status"))
    print("\n".join([next(line for line in lines if line.startswith("tune: ")), *lines[table:]]) + "\n")
    with open(os.path.join(search, "summary.json")) as f:
        summary = json.load(f)
    best = summary["best"]
    rows = [
        ("train, default flags (mobilenet_v2)", default.seconds, default_val, default_test),
        (
            f"tune, best of {summary['trials']} ({best['flags']['architecture']})",
            tuned.seconds,
            best["val_accuracy"],
            best["metrics"]["accuracy"],
        ),
    ]
    print("| run | wall s | val accuracy | test accuracy |")
    print("|---|---|---|---|")
    for name, seconds, val, test in rows:
        print(f"| {name} | {seconds:.0f} | {val:.1%} | {test:.1%} |")
    print(
        f"\ntune: {summary['completed']} completed, {summary['stopped']} stopped early, "
        f"{summary['failed']} failed; {summary['seconds_in_trials']:.0f} s of training in the workers; "
        f"best flags {json.dumps(best['flags'], sort_keys=True)}; influence {summary['influence']}"
    )


if __name__ == "__main__":
    main()
