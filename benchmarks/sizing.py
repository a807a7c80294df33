"""Sizing Dataflow workers: images/s per core and memory per model copy, per architecture and engine.

    python benchmarks/sizing.py          (all 9 architectures, both engines: ~15 min on 2 quiet cores)
    python benchmarks/sizing.py --architectures mobilenet_v2,squeezenet --seconds 3

Dataflow runs one SDK process per vCPU and each process loads its own copy of
the model, so a worker's capacity follows from two figures per architecture
and engine:

- images/s per vCPU x vCPUs = images/s per worker (the 1-core figure: one
  process per vCPU, each computing on its own core);
- MB per model copy x processes per VM (one per vCPU) = model memory per
  worker, on top of Beam's own and the images in flight.

For every architecture of ``beamvision.models.list_models()`` at its default
input size (random weights: speed and memory do not depend on them) and each
engine at fp32 (``tensorflow``, ``openvino``), it measures in a fresh process
each (no thread settings or memory carried from one measurement to the next):

- img/s on ONE core: the process pinned to one CPU with ``os.sched_setaffinity``
  before anything is imported, and the engine's own threads set to 1 as a
  worker sets them (``WorkerSizing(inference_threads=1)``: TensorFlow's
  intra- and inter-op pools before the model loads, OpenVINO's
  ``INFERENCE_NUM_THREADS``); the threads each engine ran with are read back
  into the JSON (``engine_threads``);
- img/s on ALL cores of this machine (no pinning, a worker's default sizing: all cores): the
  scaling column is their ratio, how far one process would get on a whole VM;
- MB per copy: RSS after the engine is built and two batches have run, minus
  RSS just before loading (Beam and NumPy imported; TensorFlow or OpenVINO
  not yet, so an engine's runtime counts as part of its copy), and the RSS
  itself, and the peak RSS of the process (loading a Keras model can pass
  its steady RSS by a GB: processes that start together peak together);
  from the 1-core process (the JSON has the all-core one too);
- load s: ``load_model()`` (engine library import, artifact read, build and
  compile; the first batch, which traces TensorFlow's graph, is in the JSON).

Each model is loaded as a beamvision worker loads it:
``BeamvisionModelHandler(artifact, batch_size, 5, False, engine, "fp32").load_model()``
on an artifact with the OpenVINO IR stored in it (as ``export --engines
openvino`` writes it: the OpenVINO engine then never imports TensorFlow), made
once per architecture under ``--workdir`` and reused. It is then called with
``--batch_size`` pre-made uint8 images (content does not change speed): 2
warm-up batches, then batches until ``--seconds`` and at least 3 batches have
passed. Prints a markdown table with the CPU (model, cores, AVX512_BF16/AMX)
and writes the same as JSON in the workdir.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ENGINES = ("tensorflow", "openvino")
PRECISION = "fp32"
WARMUP_BATCHES = 2
MIN_BATCHES = 3
RESULT_MARK = "SIZING_RESULT "
CHILD_TIMEOUT_S = 1800


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def cpu_description() -> dict:
    """The CPU model, the cores this process may use and the bf16 instructions it has."""
    model, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags.update(value.split())
    except OSError:
        pass
    return {
        "model": model,
        "cores": len(os.sched_getaffinity(0)),
        "avx512f": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx": "amx_bf16" in flags or "amx_tile" in flags,
    }


# --- the children ---------------------------------------------------------------------------------


def prepare(workdir: str, architecture: str) -> None:
    """An artifact of ``architecture`` with random weights and its OpenVINO IR; reused if present."""
    import pathlib
    import tempfile

    from beamvision.models import create_model
    from beamvision.models.artifact import new_manifest, save_artifact
    from beamvision.models.labels import imagenet_labels
    from beamvision.transforms.engines import OpenVINOEngine, engine_files

    artifact = _artifact_path(workdir, architecture)
    manifest_path = pathlib.Path(artifact, "manifest.json")
    if manifest_path.exists() and OpenVINOEngine.xml in manifest_path.read_text():
        return
    model = create_model(architecture, weights=None)
    manifest = new_manifest(model, architecture, list(imagenet_labels()), "none")
    with tempfile.TemporaryDirectory() as converted:  # as export/train --engines openvino store it
        extra = engine_files(model, manifest, ["openvino"], converted)
        save_artifact(model, manifest, artifact, overwrite=True, extra_files=extra)


def measure(workdir: str, architecture: str, engine: str, cpu: int, batch_size: int, seconds: float) -> dict:
    """One measurement, in this (fresh) process: pinned to ``cpu`` with 1 engine thread, or all (-1)."""
    if cpu >= 0:  # before NumPy, TensorFlow or OpenVINO size their thread pools
        os.sched_setaffinity(0, {cpu})
    import numpy as np

    from beamvision.models.artifact import load_manifest
    from beamvision.transforms.inference import BeamvisionModelHandler
    from beamvision.transforms.sizing import DEFAULT_SIZING, WorkerSizing

    artifact = _artifact_path(workdir, architecture)
    size = load_manifest(artifact).input_size
    rng = np.random.default_rng(0)
    batches = [list(rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)) for _ in range(2)]
    sizing = WorkerSizing(inference_threads=1) if cpu >= 0 else DEFAULT_SIZING
    handler = BeamvisionModelHandler(artifact, batch_size, 5, False, engine, PRECISION, sizing)

    rss_before = _rss_mb()
    libraries_before = sorted(m for m in ("tensorflow", "openvino", "keras") if m in sys.modules)
    started = time.perf_counter()
    classify = handler.load_model()  # (sizes the engine's pools before anything starts them)
    load_s = time.perf_counter() - started

    started = time.perf_counter()
    classify(batches[0])
    first_batch_s = time.perf_counter() - started
    for i in range(1, WARMUP_BATCHES):
        classify(batches[i % len(batches)])
    rss_warm = _rss_mb()

    latencies = []
    started = time.perf_counter()
    while len(latencies) < MIN_BATCHES or time.perf_counter() - started < seconds:
        batch_started = time.perf_counter()
        classify(batches[len(latencies) % len(batches)])
        latencies.append(time.perf_counter() - batch_started)
    elapsed = time.perf_counter() - started

    return {
        "architecture": architecture,
        "engine": engine,
        "precision": PRECISION,
        "input_size": size,
        "batch_size": batch_size,
        "cores": len(os.sched_getaffinity(0)),
        "pinned_cpu": cpu if cpu >= 0 else None,
        "engine_threads": _engine_threads(classify),
        "sizing": sizing.describe(),
        "images_per_s": round(len(latencies) * batch_size / elapsed, 2),
        "batches_timed": len(latencies),
        "seconds_timed": round(elapsed, 2),
        "median_batch_ms": round(1000 * float(np.median(latencies)), 1),
        "load_s": round(load_s, 2),
        "first_batch_s": round(first_batch_s, 2),
        "rss_before_load_mb": round(rss_before, 1),
        "rss_mb": round(rss_warm, 1),
        "mb_per_copy": round(rss_warm - rss_before, 1),
        "rss_end_mb": round(_rss_mb(), 1),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "libraries_before_load": libraries_before,
        "tensorflow_loaded": "tensorflow" in sys.modules,
    }


def _engine_threads(classify) -> dict:
    """The thread counts the engine actually runs with (0: the library's default)."""
    from beamvision.transforms.engines import OpenVINOEngine, TensorFlowEngine

    if isinstance(classify, TensorFlowEngine):
        import tensorflow as tf

        return {
            "intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
        }
    if not isinstance(classify, OpenVINOEngine):
        return {}
    compiled = classify._compiled
    return {name: int(compiled.get_property(name)) for name in ("INFERENCE_NUM_THREADS", "NUM_STREAMS")}


# --- the parent -----------------------------------------------------------------------------------


def _artifact_path(workdir: str, architecture: str) -> str:
    return os.path.join(workdir, "models", architecture)


def _child(args: list[str]) -> tuple[dict | None, str, float]:
    """Runs this script as a child: (its result line as a dict, or None on failure; output tail; seconds)."""
    started = time.perf_counter()
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    try:
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            timeout=CHILD_TIMEOUT_S,
        )
        output, returncode = proc.stdout, proc.returncode
    except subprocess.TimeoutExpired as exc:
        output, returncode = f"{exc.stdout or ''}\ntimed out after {CHILD_TIMEOUT_S} s", -1
    seconds = time.perf_counter() - started
    if returncode != 0:
        return None, output[-3000:], seconds
    lines = [line for line in output.splitlines() if line.startswith(RESULT_MARK)]
    result = json.loads(lines[-1][len(RESULT_MARK) :]) if lines else {}
    return result, output[-3000:], seconds


def _error_line(output: str) -> str:
    """The last line of a failed child that looks like an error, for the table."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line]
    return (errors or lines or ["failed"])[-1][:200]


def _rows(results: list[dict], architectures: list[str], engines: list[str]) -> list[dict]:
    rows = []
    for architecture in architectures:
        for engine in engines:
            mine = [r for r in results if r["architecture"] == architecture and r["engine"] == engine]
            one = next((r for r in mine if r.get("pinned_cpu") is not None), None)
            every = next((r for r in mine if r.get("pinned_cpu") is None), None)
            errors = list(dict.fromkeys(r["error"] for r in mine if "error" in r))
            memory = one if one and "error" not in one else every
            ok = memory is not None and "error" not in memory
            one_rate = one.get("images_per_s") if one else None
            all_rate = every.get("images_per_s") if every else None
            rows.append(
                {
                    "architecture": architecture,
                    "input": memory["input_size"] if ok else None,
                    "engine": f"{engine} {PRECISION}",
                    "images_per_s_1_core": one_rate,
                    "images_per_s_all_cores": all_rate,
                    "scaling": round(all_rate / one_rate, 2) if one_rate and all_rate else None,
                    "mb_per_copy": memory["mb_per_copy"] if ok else None,
                    "rss_mb": memory["rss_mb"] if ok else None,
                    "peak_rss_mb": memory["peak_rss_mb"] if ok else None,
                    "load_s": memory["load_s"] if ok else None,
                    "errors": errors,
                }
            )
    return rows


def _table(rows: list[dict], cpu: dict, batch_size: int, load: tuple[float, float]) -> str:
    cores = cpu["cores"]
    header = [
        "architecture",
        "input",
        "engine",
        "img/s 1 core",
        f"img/s {cores} cores",
        "scaling",
        "MB per copy",
        "RSS MB",
        "peak MB",
        "load s",
    ]

    def cell(value, spec=""):
        return "failed" if value is None else format(value, spec)

    lines = [
        f"CPU: {cpu['model']}, {cores} cores; AVX512_BF16 {'yes' if cpu['avx512_bf16'] else 'no'}, "
        f"AMX {'yes' if cpu['amx'] else 'no'}. Batch {batch_size}, {PRECISION}, random weights, "
        f"default input size; 1 core: pinned, 1 engine thread; {cores} cores: no pinning, default threads. "
        f"Load average {load[0]:.1f} at the start, {load[1]:.1f} at the end (a busy machine skews img/s).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for row in rows:
        scaling = f"{row['scaling']:.2f}x" if row["scaling"] else "failed"
        cells = [
            row["architecture"],
            cell(row["input"]),
            row["engine"],
            cell(row["images_per_s_1_core"], ".1f"),
            cell(row["images_per_s_all_cores"], ".1f"),
            scaling,
            cell(row["mb_per_copy"], ",.0f"),
            cell(row["rss_mb"], ",.0f"),
            cell(row["peak_rss_mb"], ",.0f"),
            cell(row["load_s"], ".1f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    failures = [(row, error) for row in rows for error in row["errors"]]
    for row, error in failures:
        lines.append(f"\n{row['architecture']} {row['engine']} failed: {error}")
    return "\n".join(lines)


def main() -> None:
    from beamvision.models import list_models

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architectures", default="all", help="comma-separated, or all (the default)")
    parser.add_argument(
        "--engines", default=",".join(ENGINES), help="comma-separated of " + ", ".join(ENGINES)
    )
    parser.add_argument(
        "--seconds", type=float, default=8.0, help="timed seconds per measurement (min 3 batches)"
    )
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--workdir", default=os.path.join(HERE, "out", "sizing"))
    parser.add_argument("--step", choices=["prepare", "measure"], help=argparse.SUPPRESS)
    parser.add_argument("--architecture", help=argparse.SUPPRESS)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--cpu", type=int, default=-1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    workdir = os.path.abspath(args.workdir)
    if args.step == "prepare":
        prepare(workdir, args.architecture)
        return
    if args.step == "measure":
        result = measure(workdir, args.architecture, args.engine, args.cpu, args.batch_size, args.seconds)
        print(RESULT_MARK + json.dumps(result), flush=True)
        return

    known = list_models()
    architectures = known if args.architectures == "all" else args.architectures.split(",")
    engines = args.engines.split(",")
    unknown = [a for a in architectures if a not in known] + [e for e in engines if e not in ENGINES]
    if unknown:
        parser.error(f"unknown {', '.join(unknown)}; architectures: {', '.join(known)}; engines: {ENGINES}")
    os.makedirs(workdir, exist_ok=True)
    cpu = cpu_description()
    pin = max(os.sched_getaffinity(0))  # the last CPU: the first tends to take more interrupts
    settings = [pin] if cpu["cores"] == 1 else [pin, -1]
    began, load_at_start = time.perf_counter(), os.getloadavg()[0]
    if load_at_start > cpu["cores"] / 2:
        print(
            f"warning: load average {load_at_start:.1f} on {cpu['cores']} cores: other work will lower "
            "img/s and the all-core figures most (run it on a quiet machine)",
            flush=True,
        )
    results, prepared = [], {}
    for architecture in architectures:
        print(f"preparing {architecture} (random weights, OpenVINO IR) in {workdir} ...", flush=True)
        result, output, seconds = _child(
            ["--step", "prepare", "--architecture", architecture, "--workdir", workdir]
        )
        prepared[architecture] = {"seconds": round(seconds, 1), "ok": result is not None}
        if result is None:
            error = _error_line(output)
            print(f"  failed: {error}", flush=True)
            results += [
                {
                    "architecture": architecture,
                    "engine": e,
                    "pinned_cpu": c if c >= 0 else None,
                    "error": error,
                }
                for e in engines
                for c in settings
            ]
            continue
        for engine in engines:
            for setting in settings:
                flags = ["--step", "measure", "--architecture", architecture, "--engine", engine]
                flags += ["--cpu", str(setting), "--batch_size", str(args.batch_size)]
                flags += ["--seconds", str(args.seconds), "--workdir", workdir]
                where = f"1 core (CPU {setting})" if setting >= 0 else f"{cpu['cores']} cores"
                result, output, seconds = _child(flags)
                if result is None or "images_per_s" not in result:
                    error = _error_line(output)
                    result = {"architecture": architecture, "engine": engine, "error": error}
                    result["pinned_cpu"] = setting if setting >= 0 else None
                    print(f"  {architecture} {engine} {where}: failed: {error}", flush=True)
                else:
                    print(
                        f"  {architecture} {engine} {where}: {result['images_per_s']:.1f} img/s, "
                        f"{result['mb_per_copy']:,.0f} MB per copy, load {result['load_s']:.1f} s, "
                        f"threads {result['engine_threads']} ({seconds:.0f} s)",
                        flush=True,
                    )
                result["child_s"] = round(seconds, 1)
                results.append(result)
    rows = _rows(results, architectures, engines)
    load = (load_at_start, os.getloadavg()[0])
    print()
    print(_table(rows, cpu, args.batch_size, load))
    total = time.perf_counter() - began
    path = os.path.join(workdir, f"sizing-{time.strftime('%Y%m%dT%H%M%S')}.json")
    report = {
        "cpu": cpu,
        "batch_size": args.batch_size,
        "seconds": args.seconds,
        "warmup_batches": WARMUP_BATCHES,
        "precision": PRECISION,
        "total_seconds": round(total, 1),
        "load_average": {"start": load[0], "end": load[1]},
        "prepared": prepared,
        "rows": rows,
        "measurements": results,
    }
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\n{total:.0f} s in all; JSON: {path}")


if __name__ == "__main__":
    main()
