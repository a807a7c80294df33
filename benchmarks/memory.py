"""Peak memory of beamvision's pipelines: flat as collections grow, bounded with large files.

    python benchmarks/memory.py [classify|prepare|scans ...]   (default: all three)

Each scenario runs whole processes (DirectRunner, one worker) and reports
wall time and the peak RSS of the process tree:

- ``classify``: 200 against 2,000 photo-like 1024x768 JPEGs, mobilenet_v2 at
  224. Pixels travel only at model input size, never across a shuffle: the
  target is the larger run within 1.3x of the smaller.
- ``openvino``: the same with ``--engine openvino --precision bf16`` (the
  artifact holding its OpenVINO model, so no TensorFlow is loaded), 200
  against 20,000 JPEGs (the 2,000 photos, each under ten names: every file is
  read and decoded): target within 1.3x.
- ``prepare``: 400 against 4,000 photo-like 640x480 JPEGs in 4 class folders,
  ``--image_size 224``. The class list comes from the URIs before decoding and
  pixels never leave one fused stage: target within 1.25x.
- ``scans``: classify 200 1024x768 JPEGs, then 40 uncompressed 7000x7000 TIFF
  scans (147 MB each), then 12 scans among the 200 JPEGs. File bytes and
  decoded pixels in flight are bounded by ``--buffer_mb`` (or one scan with
  its pixels, when that is more): the peak above the JPEG-only run (the
  model's own memory) stays within that bound.
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import BEAMVISION, ProcessRun, make_jpegs, make_tiff_scans, random_model, run_process  # noqa: E402

from beamvision.transforms.concurrency import DEFAULT_BUFFER_MB  # noqa: E402
from beamvision.transforms.engines import CONVERTED_ENGINES  # noqa: E402


def _listing(workdir: str, name: str, paths: list[str]) -> str:
    listing = os.path.join(workdir, f"list_{name}.txt")
    with open(listing, "w") as f:
        f.write("\n".join(paths) + "\n")
    return listing


def _classify(workdir: str, name: str, paths: list[str], *extra: str, engine="tensorflow") -> ProcessRun:
    output = os.path.join(workdir, f"out_{name}")
    listing = _listing(workdir, name, paths)
    model = random_model(workdir, (engine,) if engine in CONVERTED_ENGINES else ())
    args = ["classify", "--input_list", listing, "--model", model, "--output", output, "--engine", engine]
    return run_process([*BEAMVISION, *args, "--overwrite", *extra])


def _table(runs: dict[str, tuple[int, ProcessRun]]) -> None:
    print("\n| run | images | seconds | img/s | peak RSS MB |\n|---|---|---|---|---|")
    for name, (count, run) in runs.items():
        rate = count / run.seconds
        print(f"| {name} | {count:,} | {run.seconds:.1f} | {rate:.1f} | {run.peak_rss_mb:,.0f} |")


def _ratio(small: ProcessRun, large: ProcessRun, what: str, target: float) -> None:
    ratio = large.peak_rss_mb / small.peak_rss_mb
    verdict = "within" if ratio <= target else "OVER"
    print(f"\npeak RSS {what}: {ratio:.2f}x ({verdict} the {target}x target)")


def _linked(images: list[str], count: int, folder: str) -> list[str]:
    """``count`` file names for ``images`` repeated (hard links): as many files, decoded as often."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(count):
        path = os.path.join(folder, f"copy_{i:06d}.jpg")
        if not os.path.exists(path):
            os.link(images[i % len(images)], path)
        paths.append(path)
    return paths


def classify_growth(workdir: str, small: int, large: int, engine: str = "tensorflow", *extra: str) -> None:
    unique = min(large, 2000)  # beyond 2,000 distinct photos, more files name the same pictures
    print(f"[classify] {large} 1024x768 JPEGs ({unique} distinct) in {workdir} ...", flush=True)
    images = make_jpegs(os.path.join(workdir, "images"), unique, (1024, 768), seed=1)
    if large > unique:
        images = _linked(images, large, os.path.join(workdir, f"linked_{large}"))
    runs = {}
    for count in (small, large):
        print(f"[classify] {count} images, {engine} {' '.join(extra)} ...", flush=True)
        run = _classify(workdir, f"{engine}_{count}", images[:count], *extra, engine=engine)
        runs[f"classify {count}, {engine} {' '.join(extra)}"] = (count, run)
    _table(runs)
    (_, first), (_, last) = runs.values()
    _ratio(first, last, f"{large:,} / {small:,} images", 1.3)


def prepare_growth(workdir: str, small: int, large: int, classes: int = 4) -> None:
    print(f"[prepare] {large} 640x480 JPEGs in {classes} class folders in {workdir} ...", flush=True)
    per_class = large // classes
    folders = {}
    for c in range(classes):
        folder = os.path.join(workdir, "all", f"class_{c}")
        folders[c] = make_jpegs(folder, per_class, (640, 480), seed=100 + c)
    runs = {}
    for count in (small, large):
        # A root of `count` images: symlinks to the first count/classes of each class.
        root = os.path.join(workdir, f"root_{count}")
        for c, paths in folders.items():
            os.makedirs(os.path.join(root, f"class_{c}"), exist_ok=True)
            for path in paths[: count // classes]:
                link = os.path.join(root, f"class_{c}", os.path.basename(path))
                if not os.path.lexists(link):
                    os.symlink(path, link)
        print(f"[prepare] {count} images ...", flush=True)
        output = os.path.join(workdir, f"data_{count}")
        args = ["prepare", "--input", root, "--output", output, "--image_size", "224", "--overwrite"]
        runs[f"prepare {count}"] = (count, run_process([*BEAMVISION, *args]))
    _table(runs)
    _ratio(runs[f"prepare {small}"][1], runs[f"prepare {large}"][1], f"{large:,} / {small:,} images", 1.25)


def scans(workdir: str, count: int, mixed: int, small_jpegs: int) -> None:
    print(f"[scans] {count} 7000x7000 uncompressed TIFFs in {workdir} ...", flush=True)
    tiffs = make_tiff_scans(os.path.join(workdir, "scans"), count, 7000)
    jpegs = make_jpegs(os.path.join(workdir, "small"), small_jpegs, (1024, 768), seed=2)
    size_mb = sum(os.path.getsize(p) for p in tiffs) / 2**20
    print(f"[scans] {small_jpegs} JPEGs alone (the model's own memory) ...", flush=True)
    runs = {f"{small_jpegs} JPEGs": (small_jpegs, _classify(workdir, "jpegs", jpegs))}
    print(f"[scans] {size_mb:,.0f} MB of scans ...", flush=True)
    runs[f"{count} scans"] = (count, _classify(workdir, "scans", tiffs))
    print(f"[scans] {mixed} scans among {small_jpegs} JPEGs ...", flush=True)
    step = max(1, small_jpegs // mixed)  # the scans spread among the JPEGs, as a bucket mixes them
    mix = []
    for i, jpeg in enumerate(jpegs):
        if i % step == 0 and i // step < mixed:
            mix.append(tiffs[i // step])
        mix.append(jpeg)
    runs[f"{mixed} scans + {small_jpegs} JPEGs"] = (len(mix), _classify(workdir, "mixed", mix))
    _table(runs)
    alone = runs[f"{small_jpegs} JPEGs"][1].peak_rss_mb
    worst = max(run.peak_rss_mb for _, run in runs.values())
    print(
        f"\nworst peak RSS: {worst:,.0f} MB, {worst - alone:,.0f} MB above the JPEGs alone "
        f"(bound: --buffer_mb {DEFAULT_BUFFER_MB}, or one scan and its pixels when larger)"
    )


SCENARIOS = ("classify", "openvino", "prepare", "scans")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    choices = "{" + ",".join(SCENARIOS) + "}"
    parser.add_argument("scenarios", nargs="*", metavar=choices, default=list(SCENARIOS))
    parser.add_argument("--workdir", default=os.path.join(HERE, "out", "memory"))
    args = parser.parse_args()
    unknown = sorted(set(args.scenarios) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenario {', '.join(unknown)} (choose from {', '.join(SCENARIOS)})")
    workdir = os.path.abspath(args.workdir)
    for scenario in args.scenarios:
        if scenario == "classify":
            classify_growth(workdir, 200, 2000)
        elif scenario == "openvino":
            classify_growth(workdir, 200, 20000, "openvino", "--precision", "bf16")
        elif scenario == "prepare":
            prepare_growth(os.path.join(workdir, "prepare"), 400, 4000)
        else:
            scans(workdir, 40, 12, 200)


if __name__ == "__main__":
    main()
