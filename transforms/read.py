"""``ReadImages``: input patterns and URI lists to (ImageFile, bytes), failures to error rows.

Patterns are Beam globs (``*``, ``**``), local or on any Beam filesystem; a
bare directory means every file under it, recursively. A list file holds one
URI a line. Each file is read once even when several patterns or list lines
name it: URIs (never file contents) are grouped, which is also the one fusion
break of the read, spreading the reads over workers.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import os

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystem import BeamIOError, CompressionTypes, FileMetadata
from apache_beam.io.filesystems import FileSystems

from beamvision.transforms.concurrency import ThreadPoolDoFn
from beamvision.transforms.rows import ERRORS_TAG, error_row

_GLOB_CHARS = ("*", "?", "[")


@dataclasses.dataclass(frozen=True)
class ImageFile:
    """An input file: where it is, its size and its modification time (seconds since epoch)."""

    uri: str
    size_bytes: int
    modified: float | None


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


class ReadImages(beam.PTransform):
    """Matches patterns and list files and reads every file once.

    Returns a dict of PCollections: ``files`` (ImageFile, bytes) for each
    readable input, ``inputs`` (one URI per distinct input, for counting) and
    ``errors`` (error rows for inputs that could not be read).
    """

    def __init__(
        self,
        patterns: list[str],
        input_list: str | None = None,
        list_is_csv: bool = False,
        list_root: str | None = None,
    ):
        super().__init__()
        self._patterns = [expand_pattern(p) for p in patterns]
        self._input_list = input_list
        self._list_is_csv = list_is_csv
        self._list_root = list_root

    def expand(self, pbegin):
        candidates = []
        if self._patterns:
            candidates.append(
                pbegin
                | "Patterns" >> beam.Create(self._patterns)
                | "MatchPatterns" >> fileio.MatchAll(fileio.EmptyMatchTreatment.ALLOW)
                | "SkipFolderMarkers" >> beam.Filter(lambda m: not m.path.endswith("/"))
                | "KeyMatches" >> beam.Map(lambda m: (m.path, m))
            )
        if self._input_list:
            candidates.append(
                pbegin
                | "ReadInputList" >> beam.io.ReadFromText(self._input_list)
                | "ListedUris" >> beam.FlatMap(listed_uri, self._list_is_csv, self._list_root)
                | "KeyListed" >> beam.Map(lambda uri: (uri, None))
            )
        unique = (
            candidates
            | "AllCandidates" >> beam.Flatten()
            | "OncePerUri" >> beam.CombinePerKey(_first_metadata)
        )
        read = unique | "ReadFiles" >> beam.ParDo(_ReadFileFn()).with_outputs(ERRORS_TAG, main="files")
        return {
            "files": read.files,
            "inputs": unique | "InputUris" >> beam.Keys(),
            "errors": read[ERRORS_TAG],
        }


def listed_uri(line: str, is_csv: bool = False, root: str | None = None) -> list[str]:
    """The URI a list line names: the whole line, or a CSV's first field.

    Blank lines and a CSV header (first field ``uri``) name nothing. A relative
    path is taken relative to ``root`` when one is given.
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
    if root and FileSystems.get_scheme(uri) is None and not os.path.isabs(uri):
        uri = FileSystems.join(root, uri)
    return [uri]


def _metadata(uri: str) -> FileMetadata:
    """Size and modification time of the one file ``uri`` names ([, * and ? are characters in it)."""
    try:
        return FileSystems.get_filesystem(uri).metadata(uri)
    except BeamIOError:
        if not FileSystems.exists(uri):
            raise FileNotFoundError(f"no such file: {uri}") from None
        raise


def _first_metadata(values) -> FileMetadata | None:
    """Any FileMetadata among the values (list lines carry None)."""
    return next((v for v in values if v is not None), None)


class _ReadFileFn(ThreadPoolDoFn):
    """Reads files on 16 threads: object-store reads are latency-bound."""

    def __init__(self):
        super().__init__(threads=16, depth=64, ok_counter="images_read", failed_counter="images_failed")

    def work(self, element) -> list:
        uri, metadata = element
        try:
            if metadata is None:  # a listed URI names one file: ask for it, never glob or list
                metadata = _metadata(uri)
            with FileSystems.open(uri, compression_type=CompressionTypes.UNCOMPRESSED) as f:
                data = f.read()
        except Exception as exc:  # Every storage failure becomes an error row.
            return [
                beam.pvalue.TaggedOutput(ERRORS_TAG, error_row(uri, "read", type(exc).__name__, str(exc)))
            ]
        modified = getattr(metadata, "last_updated_in_seconds", None)
        return [(ImageFile(uri, metadata.size_in_bytes, modified), data)]
