"""An interrupted classify run's finished work: kept by the rerun of the same command.

A run writes its rows as parts into its partial folder while it works
(``WriteParts``, every ``--checkpoint_every`` seconds and at each bundle's
end) and commits them only at its end (``commit_run``: the parts become the
output's shards, then summary.json). A run that dies (Ctrl-C, SIGTERM,
kill -9, a lost machine) leaves its parts; the next run of the same command
into the same output finds them (``plan_resume``) and, when they were made
with the same model and row options (``attempt.json``), keeps them
(``KeepFinished``): a file whose size and modification time equal those of
a kept row is not read again, and that row becomes the new run's own. The
rest is classified as usual.

What is not kept: rows of archive members (an archive is read again whole),
rows of files changed or gone since, error rows other than the decode errors
the same bytes always give (``incremental.is_final_error``: a read or worker
failure is retried, as the next incremental run retries it), and the rows a worker held but had not
flushed when it died (at most ``--checkpoint_every`` seconds of its work).
Parts from several interrupted attempts may name one file twice: one row of
it is kept. A commit cut short leaves some shards in the output and no
summary.json: those rows are kept as the parts are.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import io
import json
import os
import socket
import time
import uuid
from typing import Any

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindows

from beamvision import exits, storage
from beamvision.transforms.incremental import file_version, is_final_error
from beamvision.transforms.outputs import (
    ATTEMPT_FILE,
    ERRORS_PREFIX,
    PARTIAL_DIR,
    RESULTS_PREFIX,
    RUN_PARTITION,
    SUMMARY_FILE,
    errors_pattern,
    part_name,
    partial_dir,
    parts_pattern,
    results_pattern,
    run_dir,
    shard_name,
)
from beamvision.transforms.rows import ERROR_SCHEMA, result_schema

# Short enough that a run of a minute keeps most of its work; each flush is a Parquet part (on
# Dataflow, as with Beam's own sinks, each bundle also ends in one).
DEFAULT_CHECKPOINT_SECONDS = 10.0
PART_MAX_ROWS = 10_000  # a part is also flushed at this many rows, whatever the time
# As Beam's WriteToParquet writes (lists' items named "item"): one schema across old and new runs.
PARQUET_OPTIONS = {"use_compliant_nested_type": False}


@dataclasses.dataclass(frozen=True)
class Resume:
    """What a run keeps of an interrupted one: the Parquet files of its rows, and how many rows they hold."""

    results: list[str] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)
    rows: int = 0

    def __bool__(self) -> bool:
        return bool(self.results or self.errors)


def plan_resume(output: str, partial: str, attempt: dict[str, Any]) -> tuple[Resume, list[str]]:
    """What to keep of an interrupted run into ``output``, and the stale files to delete first.

    ``attempt`` says what this run makes its rows with (model name and
    version, top_k, embeddings); an interrupted run with another one is not
    kept. Call only when ``output`` holds no summary.json (no complete run).
    """
    attempt_uri = storage.join(partial, ATTEMPT_FILE)
    results = _matching(parts_pattern(partial, RESULTS_PREFIX)) + _matching(results_pattern(output))
    errors = _matching(parts_pattern(partial, ERRORS_PREFIX)) + _matching(errors_pattern(output))
    if not results and not errors:
        return Resume(), []
    before = json.loads(storage.read_text(attempt_uri)) if storage.exists(attempt_uri) else {}
    if before.get("rows") != attempt:  # another model or row layout: its rows are not this run's
        return Resume(), results + errors
    return Resume(results, errors, count_rows(results + errors)), []


def write_attempt(partial: str, attempt: dict[str, Any]) -> None:
    """Records what this run's parts are made with (for ``plan_resume`` of a rerun), and who makes them."""
    record = {"rows": attempt, "owner": {"host": socket.gethostname(), "pid": os.getpid()}}
    storage.write_atomic(storage.join(partial, ATTEMPT_FILE), json.dumps(record, indent=2).encode())


def running_owner(partial: str) -> int | None:
    """The pid of the process on this machine that is writing ``partial`` now, if one is (None if none is).

    A run launched elsewhere (another machine, a detached Dataflow job) is
    not seen: the docs say not to rerun one before it has ended.
    """
    attempt_uri = storage.join(partial, ATTEMPT_FILE)
    if not storage.exists(attempt_uri):
        return None
    owner = json.loads(storage.read_text(attempt_uri)).get("owner", {})
    pid = owner.get("pid")
    if owner.get("host") != socket.gethostname() or not pid or pid == os.getpid():
        return None
    return pid if exits.is_alive(pid) else None


def count_rows(uris: list[str]) -> int:
    """The rows in Parquet files, from their footers."""
    total = 0
    for uri in uris:
        with FileSystems.open(uri) as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total


def kept_rows(output: str, partial: str) -> int:
    """How many rows an interrupted run into ``output`` leaves its rerun (parts, a cut commit's shards)."""
    patterns = [parts_pattern(partial, p) for p in (RESULTS_PREFIX, ERRORS_PREFIX)]
    if not storage.exists(storage.join(output, SUMMARY_FILE)):
        patterns += [results_pattern(output), errors_pattern(output)]
    return count_rows([uri for pattern in patterns for uri in _matching(pattern)])


def partial_runs(root: str) -> tuple[list[str], list[str]]:
    """IDs of the incremental runs under ``root`` with a partial folder: (unfinished, committed), sorted.

    A committed run's partial folder is what a run killed between its
    summary.json and its clean-up leaves: litter. A run a process of this
    machine is writing now is neither (``running_owner``).
    """
    attempts = storage.match_sizes(
        storage.join(glob.escape(root), PARTIAL_DIR, f"{RUN_PARTITION}=*", ATTEMPT_FILE)
    )
    unfinished, committed = [], []
    for path, _size in attempts:
        run_id = path.rsplit("/", 2)[-2].split("=", 1)[1]
        done = storage.exists(storage.join(run_dir(root, run_id), SUMMARY_FILE))
        if not done and running_owner(partial_dir(root, run_id)) is not None:
            continue
        (committed if done else unfinished).append(run_id)
    return unfinished, committed


def _matching(pattern: str) -> list[str]:
    return [path for path, _size in storage.match_sizes(pattern)]


class KeepFinished(beam.PTransform):
    """Looked-up ``ImageFile``s to those an interrupted run has no row for, and that run's rows.

    Returns a dict of PCollections: ``files`` (to classify), ``results`` and
    ``errors`` (kept rows, now this run's).
    """

    def __init__(self, resume: Resume):
        super().__init__()
        self._resume = resume

    def expand(self, files):
        pipeline = files.pipeline
        kept = []
        for kind, uris in (("results", self._resume.results), ("errors", self._resume.errors)):
            kept.append(
                pipeline
                | f"Kept{kind.title()}" >> beam.Create(uris)
                | f"Read{kind.title()}" >> beam.io.ReadAllFromParquet()
                | f"Key{kind.title()}" >> beam.Map(lambda row, kind=kind: (row["image_uri"], (kind, row)))
            )
        rows = kept | "KeptRows" >> beam.Flatten()
        now = files | "KeyFiles" >> beam.Map(lambda f: (f.uri, f))
        joined = {"now": now, "kept": rows} | "JoinByUri" >> beam.CoGroupByKey()
        split = joined | "Keep" >> beam.ParDo(_KeepFn()).with_outputs("results", "errors", main="files")
        return {"files": split.files, "results": split.results, "errors": split.errors}


class _KeepFn(beam.DoFn):
    def process(self, element):
        _uri, grouped = element
        # A result before an error: of several attempts' rows for one file, the best is kept.
        # Results and the errors the same bytes always give; other errors (a read, a worker) are retried.
        kept = [(kind, row) for kind, row in grouped["kept"] if kind == "results" or is_final_error(row)]
        kept.sort(key=lambda kind_row: kind_row[0] != "results")
        for image_file in grouped["now"]:
            version = file_version(image_file.size_bytes, image_file.modified)
            match = next(
                (
                    (kind, row)
                    for kind, row in kept
                    if version is not None and file_version(row["file_size"], row["file_modified"]) == version
                ),
                None,
            )
            if match is None:
                yield image_file
            else:
                yield beam.pvalue.TaggedOutput(match[0], match[1])


class WriteParts(beam.PTransform):
    """Rows to Parquet parts in ``partial``: flushed every ``seconds``, PART_MAX_ROWS rows, and bundle end.

    Each part is written whole, then renamed (``storage.write_atomic``):
    whatever stops the run, a part is complete or absent. Yields the URI of
    every part written, which ``commit_run`` takes (never the parts a failed
    and retried bundle left behind).
    """

    def __init__(self, partial: str, prefix: str, schema: pa.Schema, seconds: float):
        super().__init__()
        self._fn = _WritePartsFn(partial, prefix, schema, seconds)

    def expand(self, rows):
        return rows | "WriteParts" >> beam.ParDo(self._fn)


class _WritePartsFn(beam.DoFn):
    def __init__(self, partial: str, prefix: str, schema: pa.Schema, seconds: float):
        self._partial = partial
        self._prefix = prefix
        self._schema = schema
        self._seconds = seconds

    def start_bundle(self):
        self._rows: list[dict] = []
        self._since = time.monotonic()

    def process(self, row):
        self._rows.append(row)
        if len(self._rows) >= PART_MAX_ROWS or time.monotonic() - self._since >= self._seconds:
            yield self._flush()

    def finish_bundle(self):
        if self._rows:
            yield GlobalWindows.windowed_value(self._flush())

    def _flush(self) -> str:
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(self._rows, schema=self._schema), buffer, **PARQUET_OPTIONS)
        uri = storage.join(self._partial, part_name(self._prefix, uuid.uuid4().hex))
        storage.write_atomic(uri, buffer.getvalue())
        self._rows, self._since = [], time.monotonic()
        return uri


def remove_partial(partial: str) -> None:
    """Deletes a committed run's partial folder, and a local ``_partial`` its last run left empty."""
    storage.delete_tree(partial)
    parent = os.path.dirname(partial.rstrip("/"))
    if storage.is_local(partial) and os.path.basename(parent) == PARTIAL_DIR:
        with contextlib.suppress(OSError):  # another run's partial folder is still there
            os.rmdir(parent)


def commit_run(
    output: str, result_parts: list[str], error_parts: list[str], embeddings: bool, multi_label: bool = False
) -> None:
    """Makes a run's parts its output's shards: stale shards deleted, parts renamed (an empty shard if none).

    The caller writes summary.json next, the commit point, and then deletes
    the partial folder.
    """
    targets: dict[str, str] = {}  # shard -> the part that becomes it ("" for an empty shard)
    for prefix, parts in ((RESULTS_PREFIX, result_parts), (ERRORS_PREFIX, error_parts)):
        parts = sorted(set(parts))
        names = [storage.join(output, shard_name(prefix, i, len(parts))) for i in range(len(parts))]
        targets.update(
            zip(names, parts, strict=True) if parts else {storage.join(output, shard_name(prefix, 0, 1)): ""}
        )
    # Idempotent, as a retried step must be: shards of a cut commit of another attempt go, this
    # commit's own (renamed by an attempt of this step that failed after) stay.
    stale = [
        uri for pattern in (results_pattern(output), errors_pattern(output)) for uri in _matching(pattern)
    ]
    storage.delete_matching([glob.escape(uri) for uri in stale if uri not in targets])
    moves = [(part, shard) for shard, part in sorted(targets.items()) if part and storage.exists(part)]
    if moves:
        if storage.is_local(output):
            os.makedirs(output, exist_ok=True)
        FileSystems.rename([part for part, _ in moves], [shard for _, shard in moves])
    for shard, part in targets.items():
        if not part and not storage.exists(shard):  # readers find the schema, as in an empty Beam sink
            schema = (
                result_schema(embeddings, multi_label)
                if os.path.basename(shard).startswith(RESULTS_PREFIX)
                else ERROR_SCHEMA
            )
            buffer = io.BytesIO()
            pq.write_table(schema.empty_table(), buffer, **PARQUET_OPTIONS)
            storage.write_atomic(shard, buffer.getvalue())
