"""Shared benchmark helpers: photo-like JPEG corpora and timing whole processes.

Images are made from the real photos that ship in scikit-image and
scikit-learn: random crops, flips and brightness changes, resized and saved as
JPEG, so that decode cost and content resemble a bucket of camera photos.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import time

import numpy as np
from PIL import Image, ImageEnhance


def sample_photos() -> list[np.ndarray]:
    import skimage.data
    from sklearn.datasets import load_sample_images

    shipped = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()]
    return shipped + list(load_sample_images().images)


def make_jpegs(directory: str, count: int, size: tuple[int, int], seed: int = 0) -> list[str]:
    """Writes ``count`` photo-like JPEGs of ``size`` (width, height); reuses existing ones."""
    os.makedirs(directory, exist_ok=True)
    paths = [os.path.join(directory, f"photo_{i:05d}.jpg") for i in range(count)]
    if all(os.path.exists(p) for p in paths):
        return paths
    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(p) for p in sample_photos()]
    for i, path in enumerate(paths):
        photo = photos[i % len(photos)]
        w, h = photo.size
        scale = rng.uniform(0.6, 1.0)
        cw, ch = int(w * scale), int(h * scale)
        x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        image = photo.crop((x, y, x + cw, y + ch)).resize(size, Image.BICUBIC)
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.7, 1.3))
        image.save(path, "JPEG", quality=90)
    return paths


@dataclasses.dataclass(frozen=True)
class ProcessRun:
    seconds: float
    peak_rss_mb: float
    output: str
    read_mb: float = 0.0  # bytes its process tree read through read() calls (rchar), page cache or not


def run_process(args: list[str], env: dict | None = None) -> ProcessRun:
    """Runs a command to completion: its wall time, the peak of its process tree's summed RSS, bytes read."""
    import psutil

    started = time.perf_counter()
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})},
    )
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.append(proc.stdout.read()), daemon=True)
    reader.start()
    root, peak = psutil.Process(proc.pid), 0
    read: dict[int, int] = {}  # the last read_chars seen of each process of the tree
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            for p in tree:
                read[p.pid] = max(read.get(p.pid, 0), p.io_counters().read_chars)
        except psutil.Error:
            pass
        time.sleep(0.05)
    seconds = time.perf_counter() - started
    reader.join()
    output = "".join(chunks)
    if proc.returncode != 0:
        sys.stderr.write(output[-4000:])
        raise SystemExit(f"benchmark step failed: {' '.join(args)}")
    return ProcessRun(seconds, peak / 2**20, output, sum(read.values()) / 2**20)


def make_tiff_scans(directory: str, count: int, side: int) -> list[str]:
    """Writes ``count`` uncompressed RGB TIFFs of ``side`` x ``side`` (a scanner's output); reuses them."""
    os.makedirs(directory, exist_ok=True)
    paths = [os.path.join(directory, f"scan_{i:03d}.tiff") for i in range(count)]
    photos = [Image.fromarray(p) for p in sample_photos()]
    for i, path in enumerate(paths):
        if not os.path.exists(path):
            photos[i % len(photos)].resize((side, side), Image.BILINEAR).save(path, "TIFF")
    return paths


BEAMVISION = [sys.executable, "-m", "beamvision"]


def random_model(workdir: str, engines: tuple[str, ...] = ()) -> str:
    """A mobilenet_v2 artifact at 224 with random weights (name bench, version 1) under ``workdir``.

    ``engines``: also store the model converted for them (``export --engines``).
    """
    model = os.path.join(workdir, "-".join(["model", *engines]))
    if not os.path.exists(os.path.join(model, "manifest.json")):
        args = ["export", "--architecture", "mobilenet_v2", "--weights", "none", "--output", model]
        converted = ["--engines", *engines] if engines else []
        run_process([*BEAMVISION, *args, "--name", "bench", "--version", "1", *converted])
    return model


def cpu_description() -> str:
    """This machine's CPU model and the cores this process may use, for a benchmark's header."""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        model = "?"
    return f"{model}, {len(os.sched_getaffinity(0))} cores"


def trained_photo_model(work: str) -> tuple[str, str]:
    """mobilenet_v2 at 64 px trained by beamvision's pipeline on crops of the shipped photos (cached).

    Returns the model artifact and its prepared data, under ``work`` (the serve and convert benchmarks').
    """
    from photos import write_photo_classes

    model, data = os.path.join(work, "model"), os.path.join(work, "data")
    if not os.path.exists(os.path.join(model, "manifest.json")):
        write_photo_classes(os.path.join(work, "train"), per_class=40, size=(96, 72), seed=0)
        run_process(
            [*BEAMVISION, "prepare", "--input", f"{work}/train", "--output", data, "--image_size", "64"]
        )
        flags = ["--epochs", "3", "--optimizer", "sgd", "--learning_rate", "0.05", "--batch_size", "32"]
        run_process(
            [
                *BEAMVISION,
                "train",
                "--data",
                data,
                "--architecture",
                "mobilenet_v2",
                "--output",
                model,
                *flags,
            ]
        )
    return model, data
