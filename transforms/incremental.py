"""Incremental classification: runs under one ROOT, each skipping what earlier runs classified.

    ROOT/run=<ID>/results-*.parquet, errors-*.parquet, summary.json   (Hive-partitioned by run)

A run is *completed* when its summary.json exists (written last). A file is
skipped when a completed run with the same model name and version has a row
for it with the same size and modification time (on Cloud Storage, the time
of its current generation: rewriting an object makes a new one):

- a result row: the file was classified;
- a ``decode`` error row that the same bytes always give (``FINAL_DECODE_ERRORS``).

Other error rows (storage trouble, a worker failure, a pixel limit that may
change) are retried by the next run. Rows without the file version columns
(none of an incremental run lacks them) never make a file skipped.

The test is size and time, as rsync's: a rewrite that keeps both (a copy
preserving times, ``cp -p``, of a same-size file) is not noticed; on Cloud
Storage the time is the object's ``updated``, which also changes on metadata
edits (then the file is classified again, which is safe). Only the model
name and version select the earlier runs: a run with another ``--top_k`` or
``--embeddings`` still skips what they classified (use a new root for that). Earlier rows are joined with the
matched files by URI (``CoGroupByKey``), reading three or four columns of the
earlier runs' Parquet: no run's rows are ever loaded whole into a worker. A
compacted run (``beamvision compact``) is hash-partitioned by URI into
buckets instead (``uri_bucket``): the night groups its files by bucket and
reads each bucket's key columns once, vectorised, so the earlier rows are
never shuffled and the catalog's share of a night stays small however many
nights it holds.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import json
import zlib

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from beamvision import storage
from beamvision.transforms.outputs import (
    ERRORS_PREFIX,
    RESULTS_PREFIX,
    errors_pattern,
    results_pattern,
    shard_name,
    summaries_pattern,
)
from beamvision.transforms.rows import METRICS_NAMESPACE, file_identity

# Decode errors that the same bytes always give: skipped like results. Others
# (DecompressionBomb under another --max_pixels, OutOfMemory on another worker,
# unexpected exceptions) are retried, as read and inference errors are.
FINAL_DECODE_ERRORS = ("EmptyFile", "NotAnImage", "UnsupportedFormat", "CorruptImage")
KEY_COLUMNS = ["image_uri", "file_size", "file_modified"]  # what a night reads of earlier result rows
ERROR_KEY_COLUMNS = [*KEY_COLUMNS, "stage", "error_type"]  # and of earlier error rows (is_final_error)
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


def default_run_id(now: datetime.datetime | None = None) -> str:
    """The run's start in UTC, sortable as text: ``20261128T031500Z``."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return now.strftime("%Y%m%dT%H%M%SZ")


def uri_bucket(uri: str, buckets: int) -> int:
    """The bucket of a compacted run that holds a file's rows: CRC-32 of its URI, modulo ``buckets``.

    The same on every machine and Python (``hash`` is salted per process).
    """
    return zlib.crc32(uri.encode("utf-8")) % buckets


@dataclasses.dataclass(frozen=True)
class EarlierRun:
    """A completed run a night skips against: its folder, and its buckets if compacted (0: not)."""

    folder: str
    buckets: int = 0


def completed_runs(
    root: str, model_name: str, model_version: str, threshold: float | None = None
) -> list[EarlierRun]:
    """The runs under ``root`` that completed with this model name and version.

    ``threshold``: a multi-label model's ``--threshold`` (None: each class's own); a run at
    another one chose other label sets, so its rows are not this run's.
    """
    matches = FileSystems.match([summaries_pattern(root)])[0].metadata_list
    runs = []
    for match in sorted(m.path for m in matches):
        summary = json.loads(storage.read_text(match))
        model = summary.get("model", {})
        if (model.get("name"), model.get("version"), model.get("threshold")) == (
            model_name,
            model_version,
            threshold,
        ):
            buckets = summary.get("compacted", {}).get("buckets", 0)
            runs.append(EarlierRun(match.rsplit("/", 1)[0], buckets))
    return runs


def file_version(size_bytes: int | None, modified) -> tuple[int, int] | None:
    """(size, modification time in microseconds) of a file or of a row; None if either is unknown."""
    if size_bytes is None or modified is None:
        return None
    if not isinstance(modified, datetime.datetime):  # seconds, converted as result rows convert them
        modified = file_identity(size_bytes, modified)["file_modified"]
    return int(size_bytes), (modified - _EPOCH) // datetime.timedelta(microseconds=1)


class SkipClassified(beam.PTransform):
    """Looked-up ``ImageFile``s to those no earlier run in ``runs`` has final rows for.

    Each compacted run is looked up bucket by bucket (``_LookUpBuckets``); the
    rest are joined by URI. Returns a dict of PCollections: ``files`` (to
    classify) and ``skipped``.
    """

    def __init__(self, runs: list[EarlierRun]):
        super().__init__()
        self._runs = list(runs)

    def expand(self, files):
        skipped = []
        for index, run in enumerate(r for r in self._runs if r.buckets):
            found = files | f"LookUpCompacted{index}" >> _LookUpBuckets(run)
            files = found["files"]
            skipped.append(found["skipped"])
        plain = [run.folder for run in self._runs if not run.buckets]
        if plain or not skipped:
            joined = files | "JoinEarlierRuns" >> _JoinRuns(plain)
            files = joined["files"]
            skipped.append(joined["skipped"])
        return {"files": files, "skipped": tuple(skipped) | "Skipped" >> beam.Flatten()}


class _LookUpBuckets(beam.PTransform):
    """Files looked up in a compacted run: grouped by bucket, each bucket's key columns read once."""

    def __init__(self, run: EarlierRun):
        super().__init__()
        self._run = run

    def expand(self, files):
        buckets = self._run.buckets
        split = (
            files
            | "KeyByBucket" >> beam.Map(lambda f: (uri_bucket(f.uri, buckets), f))
            | "GroupByBucket" >> beam.GroupByKey()
            | "LookUp" >> beam.ParDo(_BucketLookUpFn(self._run)).with_outputs("skipped", main="files")
        )
        return {"files": split.files, "skipped": split.skipped}


class _BucketLookUpFn(beam.DoFn):
    def __init__(self, run: EarlierRun):
        self._run = run
        self._skipped = Metrics.counter(METRICS_NAMESPACE, "images_skipped")

    def process(self, element):
        bucket, files = element
        files = list(files)
        uris = pa.array(sorted({f.uri for f in files}), pa.string())
        versions: dict[str, set] = collections.defaultdict(set)
        for prefix, columns, keep in (
            (RESULTS_PREFIX, KEY_COLUMNS, None),
            (ERRORS_PREFIX, ERROR_KEY_COLUMNS, is_final_error),
        ):
            shard = storage.join(self._run.folder, shard_name(prefix, bucket, self._run.buckets))
            with FileSystems.open(shard) as f:
                table = pq.read_table(f, columns=columns)
            table = table.filter(pc.is_in(table["image_uri"], value_set=uris))
            for row in table.to_pylist():
                if keep is None or keep(row):
                    versions[row["image_uri"]].add(file_version(row["file_size"], row["file_modified"]))
        for image_file in files:
            yield from _skip_or_keep(image_file, versions.get(image_file.uri, ()), self._skipped)


class _JoinRuns(beam.PTransform):
    """Files joined by URI with the key columns of runs not compacted (``CoGroupByKey``)."""

    def __init__(self, runs: list[str]):
        super().__init__()
        self._runs = runs

    def expand(self, files):
        pipeline = files.pipeline
        results = (
            pipeline
            | "ResultShards" >> beam.Create([results_pattern(r) for r in self._runs])
            | "ReadResults" >> beam.io.ReadAllFromParquet(columns=KEY_COLUMNS)
        )
        errors = (
            pipeline
            | "ErrorShards" >> beam.Create([errors_pattern(r) for r in self._runs])
            | "ReadErrors" >> beam.io.ReadAllFromParquet(columns=ERROR_KEY_COLUMNS)
            | "FinalErrors" >> beam.Filter(is_final_error)
        )
        earlier = (
            (results, errors)
            | "EarlierRows" >> beam.Flatten()
            | "KeyEarlier"
            >> beam.Map(
                lambda row: (
                    storage.canonical(row["image_uri"]),  # rows of runs before URIs were canonical
                    file_version(row.get("file_size"), row.get("file_modified")),
                )
            )
        )
        now = files | "KeyFiles" >> beam.Map(lambda f: (f.uri, f))
        joined = {"now": now, "before": earlier} | "JoinByUri" >> beam.CoGroupByKey()
        split = joined | "Skip" >> beam.ParDo(_SkipFn()).with_outputs("skipped", main="files")
        return {"files": split.files, "skipped": split.skipped}


def is_final_error(row: dict) -> bool:
    """Whether an error row is one the same bytes always give (``FINAL_DECODE_ERRORS``): never retried."""
    return row.get("stage") == "decode" and row.get("error_type") in FINAL_DECODE_ERRORS


class _SkipFn(beam.DoFn):
    def __init__(self):
        self._skipped = Metrics.counter(METRICS_NAMESPACE, "images_skipped")

    def process(self, element):
        _uri, grouped = element
        versions = {v for v in grouped["before"] if v is not None}
        for image_file in grouped["now"]:
            yield from _skip_or_keep(image_file, versions, self._skipped)


def _skip_or_keep(image_file, versions, skipped):
    """The file to ``skipped`` (counted) if an earlier row has its version, else to the main output."""
    if file_version(image_file.size_bytes, image_file.modified) in versions:
        skipped.inc()
        yield beam.pvalue.TaggedOutput("skipped", image_file)
    else:
        yield image_file
