"""Peak memory of beamvision classify as the collection grows: 200 images against 2,000.

    python benchmarks/memory.py [--small 200] [--large 2000]

Pixels travel only as uint8 at model input size, never across a shuffle, and
reads and decodes run a bounded number of elements ahead, so peak memory must
stay flat: the target is the 2,000-image run within 1.3x of the 200-image run.
Both runs are whole processes (DirectRunner, one worker) on photo-like
1024x768 JPEGs, mobilenet_v2 at 224.
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import make_jpegs, run_process  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=200)
    parser.add_argument("--large", type=int, default=2000)
    parser.add_argument("--workdir", default=os.path.join(HERE, "out", "memory"))
    args = parser.parse_args()
    workdir = os.path.abspath(args.workdir)
    print(f"preparing {args.large} 1024x768 JPEGs in {workdir} ...", flush=True)
    images = make_jpegs(os.path.join(workdir, "images"), args.large, (1024, 768), seed=1)
    model = os.path.join(workdir, "model")
    if not os.path.exists(os.path.join(model, "manifest.json")):
        run_process(
            [
                sys.executable,
                "-m",
                "beamvision",
                "export",
                "--architecture",
                "mobilenet_v2",
                "--weights",
                "none",
                "--output",
                model,
            ]
        )
    runs = {}
    for count in (args.small, args.large):
        listing = os.path.join(workdir, f"list_{count}.txt")
        with open(listing, "w") as f:
            f.write("\n".join(images[:count]) + "\n")
        output = os.path.join(workdir, f"out_{count}")
        print(f"classifying {count} images ...", flush=True)
        runs[count] = run_process(
            [
                sys.executable,
                "-m",
                "beamvision",
                "classify",
                "--input_list",
                listing,
                "--model",
                model,
                "--output",
                output,
                "--overwrite",
            ]
        )
    small, large = runs[args.small], runs[args.large]
    print("\n| images | seconds | img/s | peak RSS MB |\n|---|---|---|---|")
    for count, run in runs.items():
        print(f"| {count:,} | {run.seconds:.1f} | {count / run.seconds:.1f} | {run.peak_rss_mb:,.0f} |")
    ratio = large.peak_rss_mb / small.peak_rss_mb
    verdict = "within" if ratio <= 1.3 else "OVER"
    print(f"\npeak RSS {args.large:,} / {args.small:,} images: {ratio:.2f}x ({verdict} the 1.3x target)")


if __name__ == "__main__":
    main()
