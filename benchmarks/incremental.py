"""An incremental run against a large catalog: 1,000,000 earlier rows, 1,000 new images.

    python benchmarks/incremental.py [--earlier 1000000] [--new 1000]

The bucket holds 1,000 photo-like JPEGs classified by an earlier completed run
(unchanged since) and 1,000 new ones; the earlier run's results hold a row for
each old file plus synthetic rows up to ``--earlier`` (files since deleted). The
incremental run must classify exactly the new files and skip the old ones,
joining the earlier rows by URI in the pipeline. Side by side: a plain
classify of the 1,000 new files alone (no catalog), the cost of classifying
without the join. Both are whole processes (DirectRunner, one worker),
mobilenet_v2 at 224; reported: wall time, peak RSS and their ratios.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from common import BEAMVISION, make_jpegs, random_model, run_process  # noqa: E402

from beamvision.transforms.rows import result_schema  # noqa: E402


def _earlier_run(catalog: str, old_files: list[str], total: int) -> None:
    """A completed run=earlier partition: a row per old file, synthetic rows up to ``total``."""
    run = os.path.join(catalog, "run=earlier")
    os.makedirs(run, exist_ok=True)
    synthetic = total - len(old_files)
    uris = old_files + [f"/deleted/photos/img_{i:08d}.jpg" for i in range(synthetic)]
    sizes = [os.path.getsize(p) for p in old_files] + [50_000 + i % 997 for i in range(synthetic)]
    times = [
        datetime.datetime.fromtimestamp(os.path.getmtime(p), datetime.timezone.utc) for p in old_files
    ] + [datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)] * synthetic
    n = len(uris)
    now = datetime.datetime.now(datetime.timezone.utc)
    columns = {
        "image_uri": uris,
        "label": ["class_1"] * n,
        "score": [0.5] * n,
        "top_k_labels": [["class_1", "class_2"]] * n,
        "top_k_scores": [[0.5, 0.3]] * n,
        "width": [1024] * n,
        "height": [768] * n,
        "format": ["JPEG"] * n,
        "file_size": sizes,
        "file_modified": times,
        "sha256": [None] * n,
        "model_name": ["bench"] * n,
        "model_version": ["1"] * n,
        "processed_at": [now] * n,
    }
    schema = result_schema(False)
    pq.write_table(pa.table(columns, schema=schema), os.path.join(run, "results-00000-of-00001.parquet"))
    summary = {
        "inputs": n,
        "results": n,
        "errors": 0,
        "skipped": 0,
        "model": {"name": "bench", "version": "1"},
    }
    with open(os.path.join(run, "summary.json"), "w") as f:
        json.dump(summary, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--earlier", type=int, default=1_000_000)
    parser.add_argument("--new", type=int, default=1000)
    parser.add_argument("--workdir", default=os.path.join(HERE, "out", "incremental"))
    args = parser.parse_args()
    workdir = os.path.abspath(args.workdir)
    print(f"preparing {2 * args.new} 1024x768 JPEGs and {args.earlier:,} earlier rows in {workdir} ...")
    old = make_jpegs(os.path.join(workdir, "bucket", "old"), args.new, (1024, 768), seed=11)
    new = make_jpegs(os.path.join(workdir, "bucket", "new"), args.new, (1024, 768), seed=12)
    model = random_model(workdir)
    catalog = os.path.join(workdir, "catalog")
    shutil.rmtree(catalog, ignore_errors=True)
    _earlier_run(catalog, old, args.earlier)

    print("(a) plain classify of the new files alone ...", flush=True)
    plain_out = os.path.join(workdir, "plain")
    plain_args = ["--input", os.path.dirname(new[0]), "--model", model, "--output", plain_out, "--overwrite"]
    plain = run_process([*BEAMVISION, "classify", *plain_args])
    print("(b) incremental run over the whole bucket against the catalog ...", flush=True)
    bucket = os.path.join(workdir, "bucket")
    incremental_args = ["--input", bucket, "--model", model, "--output", catalog, "--incremental"]
    incremental = run_process([*BEAMVISION, "classify", *incremental_args, "--run_id", "tonight"])
    with open(os.path.join(catalog, "run=tonight", "summary.json")) as f:
        summary = json.load(f)
    assert (summary["results"], summary["skipped"]) == (args.new, args.new), summary

    cpus = os.cpu_count()
    print(
        f"\nN = {args.new:,} new images, {args.new:,} unchanged, {args.earlier:,} earlier rows; {cpus} CPUs"
    )
    print("| job | seconds | peak RSS MB |\n|---|---|---|")
    plain_row = f"{plain.seconds:.1f} | {plain.peak_rss_mb:,.0f}"
    print(f"| (a) classify {args.new:,} new images, no catalog | {plain_row} |")
    print(
        f"| (b) --incremental: {2 * args.new:,} matched, {args.earlier:,} earlier rows joined | "
        f"{incremental.seconds:.1f} | {incremental.peak_rss_mb:,.0f} |"
    )
    print(
        f"\n(b)/(a): {incremental.seconds / plain.seconds:.2f}x time, "
        f"{incremental.peak_rss_mb / plain.peak_rss_mb:.2f}x peak RSS; "
        f"(b) classified {summary['results']:,} and skipped {summary['skipped']:,}"
    )


if __name__ == "__main__":
    main()
