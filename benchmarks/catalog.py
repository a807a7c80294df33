"""A night's cost after a year of nights, before and after ``beamvision compact``.

    python benchmarks/catalog.py [--nights 10 100 365] [--rows 10000] [--new 200]

For each catalog size, a catalog of that many completed synthetic nights
(``--rows`` result rows each, written as a night on several workers writes
them: 4 result shards, an error shard with a few rows, a summary.json) is
made; then, side by side in one run:

- (a) a real ``classify --incremental`` night of ``--new`` new photo-like
  JPEGs (mobilenet_v2 at 224, random weights) against it;
- ``compact`` of the catalog;
- (b) the same night against the compacted catalog.

Reported per size: wall time, peak RSS and bytes read (rchar of the whole
process tree, Python and TensorFlow libraries included) of each night, the
catalog's files and the bytes of them a night reads (the column chunks of
the key columns and every footer and summary, from the Parquet metadata),
the latest-label query's time, and compact's own time and peak RSS. The
synthetic rows name files no longer in the bucket: the night lists only its
new files, so what grows with the catalog is the catalog's share alone.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import pyarrow as pa  # noqa: E402
import pyarrow.dataset as ds  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from common import BEAMVISION, cpu_description, make_jpegs, random_model, run_process  # noqa: E402

from beamvision.transforms import incremental  # noqa: E402
from beamvision.transforms.rows import ERROR_SCHEMA, result_schema  # noqa: E402

SHARDS_PER_NIGHT = 4
ERRORS_PER_NIGHT = 12
KEY_COLUMNS = {"results": incremental.KEY_COLUMNS, "errors": incremental.ERROR_KEY_COLUMNS}


def _night(catalog: str, night: int, rows: int) -> None:
    """One completed synthetic night: run=<its date>/ with result shards, an error shard, a summary."""
    day = datetime.datetime(2026, 1, 1, 3, tzinfo=datetime.timezone.utc) + datetime.timedelta(days=night)
    run = os.path.join(catalog, f"run={day:%Y%m%dT%H%M%SZ}")
    os.makedirs(run)
    per_shard = rows // SHARDS_PER_NIGHT
    for shard in range(SHARDS_PER_NIGHT):
        n = per_shard
        uris = [f"gs://my-bucket/incoming/{day:%Y/%m/%d}/img_{shard}_{i:06d}.jpg" for i in range(n)]
        columns = {
            "image_uri": uris,
            "label": [f"class_{i % 7}" for i in range(n)],
            "score": [0.5 + (i % 50) / 100 for i in range(n)],
            "top_k_labels": [[f"class_{i % 7}", f"class_{(i + 1) % 7}"] for i in range(n)],
            "top_k_scores": [[0.5, 0.3]] * n,
            "width": [1024] * n,
            "height": [768] * n,
            "format": ["JPEG"] * n,
            "file_size": [50_000 + i % 997 for i in range(n)],
            "file_modified": [day] * n,
            "sha256": [None] * n,
            "model_name": ["bench"] * n,
            "model_version": ["1"] * n,
            "processed_at": [day] * n,
        }
        table = pa.table(columns, schema=result_schema(False))
        name = f"results-{shard:05d}-of-{SHARDS_PER_NIGHT:05d}.parquet"
        pq.write_table(table, os.path.join(run, name), use_compliant_nested_type=False)
    errors = {
        "image_uri": [f"gs://my-bucket/incoming/{day:%Y/%m/%d}/bad_{i}.jpg" for i in range(ERRORS_PER_NIGHT)],
        "stage": ["decode"] * ERRORS_PER_NIGHT,
        "error_type": ["CorruptImage"] * ERRORS_PER_NIGHT,
        "message": ["image file is truncated"] * ERRORS_PER_NIGHT,
        "file_size": [1234] * ERRORS_PER_NIGHT,
        "file_modified": [day] * ERRORS_PER_NIGHT,
        "sha256": [None] * ERRORS_PER_NIGHT,
        "processed_at": [day] * ERRORS_PER_NIGHT,
    }
    pq.write_table(pa.table(errors, schema=ERROR_SCHEMA), os.path.join(run, "errors-00000-of-00001.parquet"))
    total = per_shard * SHARDS_PER_NIGHT
    summary = {
        "inputs": total + ERRORS_PER_NIGHT,
        "results": total,
        "errors": ERRORS_PER_NIGHT,
        "skipped": 0,
        "complete": True,
        "model": {"name": "bench", "version": "1"},
    }
    with open(os.path.join(run, "summary.json"), "w") as f:
        json.dump(summary, f)


def catalog_files(catalog: str) -> list[str]:
    return [p for p in glob.glob(os.path.join(catalog, "run=*", "*")) if os.path.isfile(p)]


def bytes_a_night_reads(catalog: str) -> int:
    """The catalog's bytes a night reads: every summary.json, and each shard's footer and key columns."""
    total = 0
    for path in catalog_files(catalog):
        name = os.path.basename(path)
        if name == "summary.json":
            total += os.path.getsize(path)
            continue
        kind = name.split("-", 1)[0]
        metadata = pq.ParquetFile(path).metadata
        total += metadata.serialized_size + 8
        wanted = set(KEY_COLUMNS[kind])
        for group in range(metadata.num_row_groups):
            row_group = metadata.row_group(group)
            for column in range(row_group.num_columns):
                chunk = row_group.column(column)
                if chunk.path_in_schema in wanted:
                    total += chunk.total_compressed_size
    return total


def latest_label_seconds(catalog: str) -> float:
    """The docs' latest-label query over the whole catalog (docs/scheduled-runs.md)."""
    started = time.perf_counter()
    shards = glob.glob(os.path.join(catalog, "run=*", "results-*.parquet"))
    results = ds.dataset(shards, format="parquet", partitioning="hive", partition_base_dir=catalog)
    frame = results.to_table(columns=["image_uri", "label", "processed_at"]).to_pandas()
    frame.sort_values("processed_at").groupby("image_uri").tail(1)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nights", type=int, nargs="+", default=[10, 100, 365])
    parser.add_argument("--rows", type=int, default=10_000, help="result rows of each earlier night")
    parser.add_argument("--new", type=int, default=200, help="new images the measured night classifies")
    parser.add_argument("--workdir", default=os.path.join(HERE, "out", "catalog"))
    args = parser.parse_args()
    workdir = os.path.abspath(args.workdir)
    new = make_jpegs(os.path.join(workdir, "bucket"), args.new, (640, 480), seed=21)
    model = random_model(workdir)
    bucket = os.path.dirname(new[0])
    table = []
    for nights in args.nights:
        catalog = os.path.join(workdir, f"catalog-{nights}")
        shutil.rmtree(catalog, ignore_errors=True)
        print(f"{nights} nights of {args.rows:,} rows into {catalog} ...", flush=True)
        for night in range(nights):
            _night(catalog, night, args.rows)
        row = {"nights": nights}
        for phase in ("before", "after"):
            files = catalog_files(catalog)
            row[f"{phase}_files"] = len(files)
            row[f"{phase}_catalog_mb"] = sum(os.path.getsize(p) for p in files) / 2**20
            row[f"{phase}_key_mb"] = bytes_a_night_reads(catalog) / 2**20
            row[f"{phase}_query_s"] = latest_label_seconds(catalog)
            night_args = ["--input", bucket, "--model", model, "--output", catalog, "--incremental"]
            print(f"  night ({phase} compact) ...", flush=True)
            run = run_process([*BEAMVISION, "classify", *night_args, "--run_id", "tonight"])
            with open(os.path.join(catalog, "run=tonight", "summary.json")) as f:
                summary = json.load(f)
            assert (summary["results"], summary["skipped"]) == (args.new, 0), summary
            shutil.rmtree(os.path.join(catalog, "run=tonight"))  # the catalog as it was, for the next phase
            row[phase] = run
            if phase == "before":
                print("  compact ...", flush=True)
                row["compact"] = run_process([*BEAMVISION, "compact", "--catalog", catalog])
        table.append(row)
        shutil.rmtree(catalog, ignore_errors=True)

    print(f"\n{cpu_description()}; each earlier night {args.rows:,} rows; tonight {args.new:,} new images")
    print(
        "| nights | files | catalog MB | a night reads of it, MB | night s | night peak RSS MB | "
        "night rchar MB | latest-label query s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in table:
        for phase in ("before", "after"):
            run = row[phase]
            label = f"{row['nights']} ({'compacted' if phase == 'after' else 'as written'})"
            print(
                f"| {label} | {row[f'{phase}_files']:,} | {row[f'{phase}_catalog_mb']:,.1f} | "
                f"{row[f'{phase}_key_mb']:,.1f} | {run.seconds:.1f} | {run.peak_rss_mb:,.0f} | "
                f"{run.read_mb:,.0f} | {row[f'{phase}_query_s']:.2f} |"
            )
    print("\n| nights | compact s | compact peak RSS MB | night after/before: time | peak RSS | rchar |")
    print("|---|---|---|---|---|---|")
    for row in table:
        before, after, compact = row["before"], row["after"], row["compact"]
        print(
            f"| {row['nights']} | {compact.seconds:.1f} | {compact.peak_rss_mb:,.0f} | "
            f"{after.seconds / before.seconds:.2f}x | {after.peak_rss_mb / before.peak_rss_mb:.2f}x | "
            f"{after.read_mb / before.read_mb:.2f}x |"
        )
    first, last = table[0]["before"], table[-1]["before"]
    print(
        f"\nwithout compact, {table[-1]['nights']} nights vs {table[0]['nights']}: "
        f"{last.seconds / first.seconds:.2f}x time, {last.peak_rss_mb / first.peak_rss_mb:.2f}x peak RSS"
    )


if __name__ == "__main__":
    main()
