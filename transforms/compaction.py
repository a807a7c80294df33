"""A catalog's completed runs folded into one partition per model: ``beamvision compact``.

    ROOT/run=compacted-<ID>/results-SSSSS-of-NNNNN.parquet   every result row of the runs folded
    ROOT/run=compacted-<ID>/errors-SSSSS-of-NNNNN.parquet    every error row
    ROOT/run=compacted-<ID>/summary.json                     their counts summed; the commit point

``ID`` is the newest run folded. Runs are folded by what an incremental
night matches them on (the model's name, version and a multi-label model's
threshold) and by their rows' layout (with or without ``--embeddings``), so
each compacted table has one schema; a compacted partition is itself folded
again with later runs. Nothing is lost: every row is kept, with a
``source_run`` column naming the run that made it (the partition's ``run``
is the compaction's). The rows are hash-partitioned by URI into buckets of
about ``shard_rows`` result rows (``incremental.uri_bucket``): a night reads
one summary.json and, per bucket its files fall in, that bucket's key
columns, where it joined every earlier row; the latest-label query is unchanged.

Rows are read a Parquet batch at a time and wait per bucket until it has
``BATCH_ROWS``: memory grows with the bucket count (about 1 GB at 37
buckets), not with the rows. Each step can be cut (an interrupt, a lost
machine) without harm:

1. The shards are written to ``ROOT/_partial/run=compacted-ID/``, which no
   ``run=*`` glob sees (a cut here leaves the catalog as it was; the next
   compaction deletes them).
2. They are renamed into ``ROOT/run=compacted-ID/``, then its summary.json is
   written: the commit point. It names each run folded and a digest of that
   run's summary.json.
3. Each folded run's summary.json is deleted (it is no longer a completed
   run), then its files. A cut here leaves runs both folded and in place: a
   night skips the same files either way, queries see their rows twice
   until the next compaction deletes what its summary names (and only runs
   whose summary is the one it folded, so a later run under a reused ID is
   kept).

Only a caller holding the catalog's lock (``catalog_lock``) may compact: no
night is writing while runs are read, folded and deleted.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import glob
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from beamvision import storage
from beamvision.transforms.incremental import uri_bucket
from beamvision.transforms.outputs import (
    COMPACTED_PREFIX,
    ERRORS_PREFIX,
    RESULTS_PREFIX,
    SOURCE_RUN_COLUMN,
    SUMMARY_FILE,
    errors_pattern,
    part_name,
    partial_dir,
    results_pattern,
    run_dir,
    summaries_pattern,
)
from beamvision.transforms.resume import PARQUET_OPTIONS, commit_run, count_rows, remove_partial

# Rows per bucket (a compacted shard): a night's lookup of one bucket reads its key columns whole,
# and a catalog's buckets are that many keys of the night's work (its parallelism on Dataflow).
DEFAULT_SHARD_ROWS = 100_000
MAX_BUCKETS = 1024  # parts written at once (beyond 102 million rows, buckets grow instead)
BATCH_ROWS = 65_536  # rows read at a time, and written at a time to each bucket
COUNTS = ("inputs", "results", "errors", "skipped")


@dataclasses.dataclass(frozen=True)
class Run:
    """A completed run of the catalog: its ID, its summary, and the schemas of its rows."""

    run_id: str
    summary: dict[str, Any]
    digest: str  # of its summary.json's bytes
    results_schema: pa.Schema
    errors_schema: pa.Schema

    @property
    def folder(self) -> str:
        return self.summary["_folder"]

    @property
    def model_key(self) -> tuple:
        model = self.summary.get("model", {})
        return model.get("name"), model.get("version"), model.get("threshold")

    @property
    def source_runs(self) -> list[str]:
        """The runs whose rows it holds: its own ID, or a compacted run's folded ones."""
        return self.summary.get("compacted", {}).get("runs", [self.run_id])


@dataclasses.dataclass(frozen=True)
class Plan:
    """The runs to fold into one compacted partition (oldest first) and that partition's ID."""

    runs: list[Run]

    @property
    def run_id(self) -> str:
        """``compacted-<newest run folded>`` (with ``.N`` if a run folded already bears that name)."""
        base = COMPACTED_PREFIX + max(source for run in self.runs for source in run.source_runs)
        taken = {run.run_id for run in self.runs}
        names = [base] + [f"{base}.{n}" for n in range(1, len(taken) + 1)]
        return next(name for name in names if name not in taken)


@dataclasses.dataclass(frozen=True)
class Folded:
    """What one compaction made: its partition, the runs folded, the rows and the files before and after."""

    run_id: str
    runs: int
    results: int
    errors: int
    files_before: int
    files_after: int


def completed(root: str) -> list[Run]:
    """Every completed run under ``root`` (one with a summary.json), by run ID."""
    runs = []
    for uri, _size in storage.match_sizes(summaries_pattern(root)):
        folder = uri.rsplit("/", 1)[0]
        raw = storage.read_bytes(uri)
        summary = {**json.loads(raw), "_folder": folder}
        run_id = folder.rsplit("/", 1)[1].split("=", 1)[1]
        runs.append(
            Run(
                run_id,
                summary,
                hashlib.sha256(raw).hexdigest(),
                _schema(results_pattern(glob.escape(folder))),
                _schema(errors_pattern(glob.escape(folder))),
            )
        )
    return sorted(runs, key=lambda run: run.run_id)


def plan(runs: list[Run]) -> list[Plan]:
    """The compactions worth making: each group of two or more runs of one model and row layout."""
    groups: dict[tuple, list[Run]] = collections.defaultdict(list)
    for run in runs:
        layout = (_without_source(run.results_schema), _without_source(run.errors_schema))
        groups[(run.model_key, *(str(schema) for schema in layout))].append(run)
    return [Plan(group) for group in groups.values() if len(group) > 1]


def leftovers(runs: list[Run]) -> list[Run]:
    """Runs a compaction folded but did not get to delete (it was cut after its commit)."""
    folded = {
        (run_id, digest)
        for run in runs
        for run_id, digest in run.summary.get("compacted", {}).get("folded", {}).items()
    }
    return [run for run in runs if (run.run_id, run.digest) in folded]


def fold(
    root: str,
    plan_: Plan,
    shard_rows: int = DEFAULT_SHARD_ROWS,
    folded_one: Callable[[Run], None] = lambda run: None,
) -> Folded:
    """Writes one compacted partition from ``plan_``'s runs, commits it, then deletes those runs.

    ``folded_one`` is called after each run's rows are written (for progress).
    """
    partial = partial_dir(root, plan_.run_id)
    storage.delete_tree(partial)  # what a cut compaction of the same runs left
    sources = {
        run.run_id: {prefix: _shards(pattern, run.folder) for prefix, pattern in _KINDS.items()}
        for run in plan_.runs
    }
    results = sum(count_rows(shards[RESULTS_PREFIX]) for shards in sources.values())
    buckets = max(1, min(MAX_BUCKETS, math.ceil(results / shard_rows)))
    first = plan_.runs[0]
    schemas = {RESULTS_PREFIX: first.results_schema, ERRORS_PREFIX: first.errors_schema}
    with tempfile.TemporaryDirectory(prefix="beamvision-compact-") as scratch:
        local = partial if storage.is_local(partial) else scratch  # remote: written here, then uploaded
        written = {
            prefix: _Buckets(local, prefix, _with_source(schemas[prefix]), buckets) for prefix in _KINDS
        }
        for run in plan_.runs:
            for prefix, shards in sources[run.run_id].items():
                for batch in _batches(shards):
                    written[prefix].write(_tagged(batch, run.run_id, written[prefix].schema))
            folded_one(run)
        parts = {prefix: shards.close() for prefix, shards in written.items()}
        if local != partial:
            for prefix, paths in parts.items():
                parts[prefix] = [storage.join(partial, os.path.basename(path)) for path in paths]
                for path, uri in zip(paths, parts[prefix], strict=True):
                    storage.write_atomic(uri, local_path=path)
    output = run_dir(root, plan_.run_id)
    commit_run(output, parts[RESULTS_PREFIX], parts[ERRORS_PREFIX], embeddings=False)
    counts = {prefix: shards.rows for prefix, shards in written.items()}
    summary = _summary(plan_, counts[RESULTS_PREFIX], counts[ERRORS_PREFIX], buckets)
    storage.write_atomic(storage.join(output, SUMMARY_FILE), json.dumps(summary, indent=2).encode("utf-8"))
    remove_partial(partial)
    delete_runs(root, plan_.runs)
    return Folded(
        plan_.run_id,
        len(plan_.runs),
        counts[RESULTS_PREFIX],
        counts[ERRORS_PREFIX],
        sum(1 + sum(map(len, shards.values())) for shards in sources.values()),  # and each summary.json
        1 + 2 * buckets,
    )


def delete_runs(root: str, runs: list[Run]) -> None:
    """Deletes folded runs: each one's summary.json first (no longer a completed run), then its files."""
    for run in runs:
        storage.delete(storage.join(run.folder, SUMMARY_FILE))
        storage.delete_tree(run.folder)
        remove_partial(partial_dir(root, run.run_id))  # the litter of a run killed after its commit


def stale_partials(root: str) -> list[str]:
    """Folders that cut compactions left in ``ROOT/_partial``: deleted by the next one."""
    pattern = partial_dir(glob.escape(root), f"{COMPACTED_PREFIX}*")
    return sorted({uri.rsplit("/", 1)[0] for uri, _size in storage.match_sizes(storage.join(pattern, "*"))})


def _summary(plan_: Plan, results: int, errors: int, buckets: int) -> dict[str, Any]:
    newest = plan_.runs[-1].summary
    totals = {name: sum(run.summary.get(name, 0) or 0 for run in plan_.runs) for name in COUNTS}
    return {
        **totals,
        "results": results,  # the rows written, which the counts above should equal
        "errors": errors,
        "model": newest.get("model", {}),
        "compacted": {
            "runs": sorted(source for run in plan_.runs for source in run.source_runs),
            "folded": {run.run_id: run.digest for run in plan_.runs},
            "buckets": buckets,  # shard i holds the rows whose image_uri is in incremental.uri_bucket i
            "at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
    }


class _Buckets:
    """Rows hash-partitioned by ``image_uri`` into ``count`` local Parquet parts, a batch at a time.

    Part ``i`` holds the rows whose URI is in bucket ``i`` (``incremental.uri_bucket``): a night
    looks a file up in its one bucket. Rows wait in memory until a bucket has ``BATCH_ROWS``.
    """

    def __init__(self, folder: str, prefix: str, schema: pa.Schema, count: int):
        self.schema, self.count, self.rows = schema, count, 0
        os.makedirs(folder, exist_ok=True)
        self.paths = [os.path.join(folder, part_name(prefix, f"{i:05d}")) for i in range(count)]
        self._writers: list[pq.ParquetWriter | None] = [None] * count
        self._waiting: list[list[pa.Table]] = [[] for _ in range(count)]
        self._waiting_rows = [0] * count

    def write(self, table: pa.Table) -> None:
        buckets = np.fromiter(
            (uri_bucket(uri, self.count) for uri in table["image_uri"].to_pylist()), np.int64, table.num_rows
        )
        order = np.argsort(buckets, kind="stable")
        table, ends = table.take(order), np.cumsum(np.bincount(buckets, minlength=self.count))
        for bucket, (start, end) in enumerate(zip(np.concatenate([[0], ends[:-1]]), ends, strict=True)):
            if end > start:
                self._waiting[bucket].append(table.slice(start, end - start))
                self._waiting_rows[bucket] += end - start
                if self._waiting_rows[bucket] >= BATCH_ROWS:
                    self._flush(bucket)
        self.rows += table.num_rows

    def close(self) -> list[str]:
        """Writes what waits and ends every part (an empty bucket is an empty part); returns their paths."""
        for bucket in range(self.count):
            self._flush(bucket)
            self._writer(bucket).close()
        return self.paths

    def _flush(self, bucket: int) -> None:
        if self._waiting[bucket]:
            self._writer(bucket).write_table(pa.concat_tables(self._waiting[bucket]))
            self._waiting[bucket], self._waiting_rows[bucket] = [], 0

    def _writer(self, bucket: int) -> pq.ParquetWriter:
        if self._writers[bucket] is None:
            self._writers[bucket] = pq.ParquetWriter(self.paths[bucket], self.schema, **PARQUET_OPTIONS)
        return self._writers[bucket]


_KINDS = {RESULTS_PREFIX: results_pattern, ERRORS_PREFIX: errors_pattern}


def _shards(pattern: Callable[[str], str], folder: str) -> list[str]:
    return [uri for uri, _size in storage.match_sizes(pattern(glob.escape(folder)))]


def _batches(shards: list[str]) -> Iterator[pa.RecordBatch]:
    for uri in shards:
        with FileSystems.open(uri) as f:
            yield from pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS)


def _tagged(batch: pa.RecordBatch, run_id: str, schema: pa.Schema) -> pa.Table:
    """A batch of a run's rows with its ``source_run`` (kept as it is in a compacted run's rows)."""
    table = pa.Table.from_batches([batch])
    if SOURCE_RUN_COLUMN not in table.column_names:
        table = table.append_column(SOURCE_RUN_COLUMN, pa.array([run_id] * table.num_rows, pa.string()))
    return table.select(schema.names).cast(schema)


def _schema(pattern: str) -> pa.Schema:
    """The schema of a run's shards of one kind (the first shard's: a run writes one schema)."""
    shards = storage.match_sizes(pattern)
    if not shards:
        return pa.schema([])
    with FileSystems.open(shards[0][0]) as f:
        return pq.ParquetFile(f).schema_arrow.remove_metadata()


def _with_source(schema: pa.Schema) -> pa.Schema:
    return (
        schema
        if SOURCE_RUN_COLUMN in schema.names
        else schema.append(pa.field(SOURCE_RUN_COLUMN, pa.string()))
    )


def _without_source(schema: pa.Schema) -> pa.Schema:
    index = schema.get_field_index(SOURCE_RUN_COLUMN)
    return schema if index < 0 else schema.remove(index)
