"""Classifying multi-GB image archives streamed, against unpacking them first (the usual way).

    python benchmarks/archives.py [--images 600] [--side 3000]

Makes ``--images`` photo-like JPEGs of ``side`` x ``side*3/4`` with sensor
noise (about 3.5 MB each: a 2 GB archive at the defaults), packs them as a
tar, a tar.gz and a zip, then runs whole processes (DirectRunner, one
worker, mobilenet_v2 at 224 with random weights):

- beamvision classify on each archive (members streamed; nothing on disk);
- the baseline: ``tar -xf`` to local disk, then beamvision classify the folder.

It reports wall time, images per second, the peak RSS of the process tree and
the local disk each needs, and the ratios against the baseline.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402
from common import BEAMVISION, ProcessRun, random_model, run_process, sample_photos  # noqa: E402
from PIL import Image  # noqa: E402


def make_large_jpegs(directory: str, count: int, side: int) -> list[str]:
    """``count`` camera-sized JPEGs (a photo crop plus sensor noise, quality 95); reuses existing ones."""
    os.makedirs(directory, exist_ok=True)
    paths = [os.path.join(directory, f"IMG_{i:05d}.jpg") for i in range(count)]
    rng = np.random.default_rng(0)
    photos = sample_photos()
    size = (side, side * 3 // 4)
    noise = rng.normal(0, 9, (size[1], size[0], 3)).astype(np.int16)
    for i, path in enumerate(paths):
        if os.path.exists(path):
            continue
        base = np.asarray(Image.fromarray(photos[i % len(photos)]).resize(size, Image.BILINEAR), np.int16)
        shifted = np.roll(noise, int(rng.integers(0, size[0])), axis=1)
        Image.fromarray(np.clip(base + shifted, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=95)
    return paths


def pack_all(workdir: str, paths: list[str]) -> dict[str, str]:
    """The JPEGs as shard.tar, shard.tar.gz and shard.zip (stored: JPEGs do not deflate); reuses them."""
    archives = {kind: os.path.join(workdir, f"shard.{kind}") for kind in ("tar", "tar.gz", "zip")}
    for kind, path in archives.items():
        if os.path.exists(path):
            continue
        if kind == "zip":
            with zipfile.ZipFile(path + ".tmp", "w", zipfile.ZIP_STORED) as archive:
                for p in paths:
                    archive.write(p, f"photos/{os.path.basename(p)}")
        else:
            with tarfile.open(path + ".tmp", "w:gz" if kind == "tar.gz" else "w") as archive:
                for p in paths:
                    archive.add(p, f"photos/{os.path.basename(p)}")
        os.replace(path + ".tmp", path)
    return archives


def classify(workdir: str, name: str, source: str) -> ProcessRun:
    output = os.path.join(workdir, f"out_{name}")
    args = ["classify", "--input", source, "--model", random_model(workdir), "--output", output]
    return run_process([*BEAMVISION, *args, "--overwrite"])


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, names in os.walk(path) for f in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--side", type=int, default=3000)
    parser.add_argument("--workdir", default="/tmp/beamvision-bench-archives")
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    started = time.perf_counter()
    paths = make_large_jpegs(os.path.join(args.workdir, "jpegs"), args.images, args.side)
    archives = pack_all(args.workdir, paths)
    print(f"corpus ready in {time.perf_counter() - started:.0f}s: {args.images} JPEGs of {args.side}px")
    rows = []
    for kind, path in archives.items():
        run = classify(args.workdir, kind.replace(".", "_"), path)
        name = f"beamvision classify {os.path.basename(path)} (streamed)"
        rows.append((name, os.path.getsize(path), run, 0))
    extracted = os.path.join(args.workdir, "extracted")
    shutil.rmtree(extracted, ignore_errors=True)
    os.makedirs(extracted)
    untar_started = time.perf_counter()
    subprocess.run(["tar", "-xf", archives["tar"], "-C", extracted], check=True)
    untar_seconds = time.perf_counter() - untar_started
    run = classify(args.workdir, "extracted", extracted)
    baseline = ProcessRun(untar_seconds + run.seconds, run.peak_rss_mb, run.output)
    disk = folder_bytes(extracted)
    name = "baseline: tar -xf, then classify the folder"
    rows.append((name, os.path.getsize(archives["tar"]), baseline, disk))
    shutil.rmtree(extracted)

    shape = f"{args.side}x{args.side * 3 // 4}"
    print(f"\n{args.images} JPEGs of {shape}, mobilenet_v2 at 224, DirectRunner, 1 worker")
    print(f"(baseline: tar -xf {untar_seconds:.1f}s + classify {run.seconds:.1f}s)\n")
    print("| run | archive GB | seconds | img/s | peak RSS MB | local disk GB | time vs baseline |")
    print("|---|---|---|---|---|---|---|")
    for name, size, result, used in rows:
        print(
            f"| {name} | {size / 1e9:.2f} | {result.seconds:.1f} | {args.images / result.seconds:.1f} | "
            f"{result.peak_rss_mb:,.0f} | {used / 1e9:.2f} | {result.seconds / baseline.seconds:.2f}x |"
        )
    for _, _, result, _ in rows[:-1]:
        if f"classified {args.images:,} of {args.images:,} images" not in result.output:
            raise SystemExit("a streamed run did not classify every member:\n" + result.output[-2000:])


if __name__ == "__main__":
    main()
