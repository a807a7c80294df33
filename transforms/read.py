"""``MatchInputs``, ``LookUpFiles`` and ``ReadFiles``: input patterns and lists to (ImageFile, bytes).

Patterns are Beam globs (``*``, ``**``), local or on any Beam filesystem; a
bare directory means every file under it, recursively. A list file holds one
URI a line, or an inventory: a CSV or Parquet file whose column
``--input_list_column`` holds the URIs, read in parallel (splittable). Each file is read once
even when several patterns or list lines name it: URIs (never file contents)
are grouped, which is also a fusion break before the read, spreading the
reads over workers.

Every URI is spelled ``storage.canonical``: patterns are matched, and list
lines taken, as absolute paths (a relative one from the current directory),
so a row's ``image_uri`` is the same however the input was typed.

Matching yields ``ImageFile`` records (URI, size, modification time); a listed
URI is looked up on its own (never globbed) on a pool of threads, so its size
is known before it is read. Reads then run on threads ahead of decoding, at
most ``buffer_bytes`` of file contents and pixels at a time, counted with the
decodes downstream (``concurrency.PROCESS_BYTES``): memory follows the bytes
in flight, not the number of files (a single larger file is still read, alone).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import functools
import glob
import hashlib
import os

import apache_beam as beam
from apache_beam.io.filesystem import BeamIOError, CompressionTypes, FileMetadata
from apache_beam.io.filesystems import FileSystems

from beamvision import storage
from beamvision.transforms.archives import ArchiveRequest, Unpacker
from beamvision.transforms.concurrency import DEFAULT_BUFFER_MB, MB, ThreadPoolDoFn
from beamvision.transforms.rows import ERRORS_TAG, ImageFile, error_row
from beamvision.transforms.sizing import DEFAULT_SIZING, WorkerSizing

_GLOB_CHARS = ("*", "?", "[")


def expand_pattern(pattern: str) -> str:
    """A user's ``--input`` as a Beam glob: a bare directory becomes ``DIR/**``.

    A pattern with glob characters is kept. Without them it is a file if one
    exists at that path; otherwise (a local directory, or a prefix on an
    object store, where directories are not objects) every file under it.
    """
    if any(char in pattern for char in _GLOB_CHARS):
        return pattern
    if FileSystems.get_scheme(pattern) is None:  # local path
        if os.path.isdir(pattern):
            return os.path.join(glob.escape(pattern.rstrip(os.sep)), "**")
        return pattern
    if pattern.endswith("/") or not FileSystems.exists(pattern):
        return pattern.rstrip("/") + "/**"
    return pattern


class MatchInputs(beam.PTransform):
    """Patterns and a list file to one ``ImageFile`` per distinct URI (not yet looked up if listed).

    Returns a dict of PCollections: ``files`` (ImageFile), ``inputs`` (one
    URI per distinct input, for counting) and ``patterns`` ((pattern as
    given, number of files it matched), so a pattern that matched nothing can
    be reported).
    """

    def __init__(self, patterns: list[str], input_list: str | None = None, list_column: str = "uri"):
        super().__init__()
        # (as given, for the counts; canonical, to match): made here, in the launcher's directory.
        self._patterns = [(pattern, storage.canonical(pattern)) for pattern in patterns]
        self._input_list = input_list
        self._list_column = list_column

    def expand(self, pbegin):
        candidates = []
        matched = (
            pbegin
            | "Patterns" >> beam.Create(self._patterns)
            | "MatchPatterns" >> beam.ParDo(_MatchPatternFn()).with_outputs("counts", main="files")
        )
        candidates.append(matched.files)
        if self._input_list:
            listed = pbegin | "ReadInputList" >> _read_list(self._input_list, self._list_column)
            candidates.append(listed | "KeyListed" >> beam.Map(lambda uri: (uri, ImageFile(uri))))
        unique = (
            candidates | "AllCandidates" >> beam.Flatten() | "OncePerUri" >> beam.CombinePerKey(_best_known)
        )
        return {
            "files": unique | "Files" >> beam.Values(),
            "inputs": unique | "InputUris" >> beam.Keys(),
            "patterns": matched.counts,
        }


class LookUpFiles(beam.PTransform):
    """``ImageFile`` to the same with its size and modification time, looked up where not yet known.

    Returns a dict of PCollections: ``files`` and ``errors`` (error rows of
    stage ``read`` for files that are missing or cannot be looked up). Look-ups
    run on ``sizing``'s read threads.
    """

    def __init__(self, sizing: WorkerSizing = DEFAULT_SIZING):
        super().__init__()
        self._sizing = sizing

    def expand(self, files):
        lookup = _LookUpFn(self._sizing)
        found = files | "LookUp" >> beam.ParDo(lookup).with_outputs(ERRORS_TAG, main="files")
        return {"files": found.files, "errors": found[ERRORS_TAG]}


class ReadFiles(beam.PTransform):
    """Looked-up ``ImageFile``s and ``ArchiveRequest``s to (ImageFile, bytes), within ``buffer_bytes``.

    Plain files are read on threads (see the module); an archive is streamed
    member by member (``archives.Unpacker``; with ``label_from_folder``, a
    member's class is its first folder). Both arrive here as names, so that
    reading, decoding and inference fuse into one stage: bytes never wait in
    a runner's buffer. Returns a dict of PCollections: ``files``,
    ``errors`` (rows of stage ``read``, and ``label`` for members),
    ``members`` (one URI per row an archive made, for counting) and
    ``not_images`` (per archive, members passed over). Files are read on
    ``sizing``'s read threads.
    """

    def __init__(
        self,
        buffer_bytes: int = DEFAULT_BUFFER_MB * MB,
        label_from_folder: bool = False,
        sizing: WorkerSizing = DEFAULT_SIZING,
    ):
        super().__init__()
        self._buffer_bytes = buffer_bytes
        self._label_from_folder = label_from_folder
        self._sizing = sizing

    def expand(self, files):
        read = files | "Read" >> beam.ParDo(
            _ReadFileFn(self._buffer_bytes, self._label_from_folder, self._sizing)
        ).with_outputs(ERRORS_TAG, "members", "not_images", main="files")
        return {
            "files": read.files,
            "errors": read[ERRORS_TAG],
            "members": read.members,
            "not_images": read.not_images,
        }


def listed_uri(line: str, is_csv: bool = False) -> list[str]:
    """The URI a list line names, canonical: the whole line, or a CSV's first field.

    Blank lines and a CSV header (first field ``uri``) name nothing. A relative
    path is taken from the current directory, as the user typed it.
    """
    if is_csv:
        fields = next(csv.reader([line]), [])
        uri = fields[0].strip() if fields else ""
        if uri.lower() == "uri":
            return []
    else:
        uri = line.strip()
    if not uri:
        return []
    return [storage.canonical(uri)]


def list_format(uri: str) -> str:
    """How ``--input_list`` is read, from its name: ``parquet``, ``csv`` or ``text`` (one URI a line)."""
    name = uri.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".csv", ".csv.gz")):
        return "csv"
    return "text"


def csv_column_index(uri: str, column: str) -> int:
    """The position of ``column`` in the header line of the CSV at ``uri``.

    Raises:
        ValueError: the header has no such column.
    """
    with FileSystems.open(uri) as f:  # only the first line is read, however large the inventory
        header = f.readline().decode("utf-8-sig")
    names = [name.strip() for name in next(csv.reader([header]), [])]
    if column not in names:
        raise ValueError(f"its header has no column {column!r} (columns: {', '.join(names)})")
    return names.index(column)


def parquet_has_column(uri: str, column: str) -> None:
    """Raises ValueError when the Parquet file at ``uri`` has no ``column``."""
    import pyarrow.parquet as pq

    with FileSystems.open(uri) as f:
        names = pq.ParquetFile(f).schema_arrow.names
    if column not in names:
        raise ValueError(f"it has no column {column!r} (columns: {', '.join(names)})")


def _read_list(uri: str, column: str) -> beam.PTransform:
    """A splittable read of the URIs an input list names (text lines, or a CSV or Parquet column)."""
    form = list_format(uri)
    if form == "parquet":
        return beam.io.ReadFromParquet(uri, columns=[column]) | beam.FlatMap(
            lambda row: [storage.canonical(row[column])] if row[column] else []
        )
    if form == "csv":
        index = csv_column_index(uri, column)
        return beam.io.ReadFromText(uri, skip_header_lines=1) | beam.FlatMap(_csv_field, index)
    return beam.io.ReadFromText(uri) | beam.FlatMap(listed_uri)


def _csv_field(line: str, index: int) -> list[str]:
    fields = next(csv.reader([line]), [])
    value = fields[index].strip() if len(fields) > index else ""
    return [storage.canonical(value)] if value else []


def unmatched_patterns(counts) -> list[str]:
    """The patterns, among (pattern, files matched) pairs, that matched no file."""
    total = collections.Counter()
    for pattern, count in counts:
        total[pattern] += count
    return sorted(pattern for pattern, count in total.items() if count == 0)


def _metadata(uri: str) -> FileMetadata:
    """Size and modification time of the one file ``uri`` names ([, * and ? are characters in it)."""
    try:
        return FileSystems.get_filesystem(uri).metadata(uri)
    except BeamIOError:
        if not FileSystems.exists(uri):
            raise FileNotFoundError(f"no such file: {uri}") from None
        raise


def _image_file(metadata: FileMetadata) -> ImageFile:
    return ImageFile(
        metadata.path, metadata.size_in_bytes, getattr(metadata, "last_updated_in_seconds", None)
    )


def _best_known(files) -> ImageFile:
    """One ImageFile for a URI named more than once: a looked-up one if any (list lines know nothing)."""
    files = list(files)
    return next((f for f in files if f.size_bytes is not None), files[0])


class _MatchPatternFn(beam.DoFn):
    """(pattern, canonical) to (uri, ImageFile) per file it matches, and (pattern, count) to ``counts``."""

    def process(self, patterns: tuple[str, str]):
        pattern, canonical = patterns
        matches = FileSystems.match([expand_pattern(canonical)])[0].metadata_list
        count = 0
        for metadata in matches:
            if not metadata.path.endswith("/"):  # folder markers on object stores
                count += 1
                yield metadata.path, _image_file(metadata)
        yield beam.pvalue.TaggedOutput("counts", (pattern, count))


class _LookUpFn(ThreadPoolDoFn):
    """Fills in the size and modification time of listed files, on threads (object-store latency)."""

    def __init__(self, sizing: WorkerSizing):
        super().__init__(
            threads=functools.partial(sizing.threads, "read"),
            depth=256,
            ok_counter="files_found",
            failed_counter="images_failed",
        )

    def work(self, image_file: ImageFile) -> list:
        if image_file.size_bytes is not None:
            return [image_file]
        try:
            found = _image_file(_metadata(image_file.uri))
        except Exception as exc:  # Every storage failure becomes an error row.
            return [_read_error(image_file, exc)]
        return [dataclasses.replace(found, uri=image_file.uri, label=image_file.label)]


class _ReadFileFn(ThreadPoolDoFn):
    """Reads files on threads while the process holds less than ``buffer_bytes`` (see the module).

    An ``ArchiveRequest`` is streamed on the bundle's thread, after the
    files read ahead have been emitted (members wait for room in the same
    budget, which those files would otherwise hold).
    """

    def __init__(self, buffer_bytes: int, label_from_folder: bool, sizing: WorkerSizing):
        super().__init__(
            threads=functools.partial(sizing.threads, "read"),
            depth=64,
            ok_counter="images_read",
            failed_counter="images_failed",
            budget=buffer_bytes,
        )
        self._unpacker = Unpacker(buffer_bytes, label_from_folder)

    def process(self, element):
        if isinstance(element, ArchiveRequest):
            yield from self.emit_pending()
            yield from self._unpacker.unpack(element)
        else:
            yield from super().process(element)

    def cost(self, image_file: ImageFile) -> int:
        return image_file.size_bytes or 0

    def room(self, image_file: ImageFile) -> int:
        # Its bytes, and as much again for the pixels decoding will make of them (an
        # uncompressed scan decodes to about its size; a JPEG to much less).
        return 2 * self.cost(image_file)

    def work(self, image_file: ImageFile) -> list:
        try:
            with FileSystems.open(image_file.uri, compression_type=CompressionTypes.UNCOMPRESSED) as f:
                data = f.read()
        except Exception as exc:  # Every storage failure becomes an error row.
            return [_read_error(image_file, exc)]
        return [(dataclasses.replace(image_file, sha256=hashlib.sha256(data).hexdigest()), data)]


def _read_error(image_file: ImageFile, exc: Exception):
    row = error_row(
        image_file.uri, "read", type(exc).__name__, str(exc), image_file.size_bytes, image_file.modified
    )
    return beam.pvalue.TaggedOutput(ERRORS_TAG, row)
