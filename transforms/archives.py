"""Image archives as input, in a pipeline: ``SplitArchives``, ``GroupArchives`` and ``Unpacker``.

An archive or archive member (``beamvision.transforms.members``: what counts
as one, and how its members are streamed and checked) is split from the plain
files (``SplitArchives``) and grouped by archive URI before it is read
(``GroupArchives``), so many archives spread over workers and one archive is
read once, by one worker. ``Unpacker`` reads it inside ``ReadFiles``: a
process holds the member being read (counted in ``--buffer_mb`` with the
reads of plain files) and what decoding holds. Every image member asked for
ends as (ImageFile, bytes) or an error row; a member the archive's hostile
or damaged content refuses, and the archive itself when it breaks, are error
rows (stage ``read``), as is a member named but not found.
``ListArchiveMembers`` lists the members without reading them;
``CountedInputs`` counts an archive's rows, not the archive, as inputs.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from beamvision.transforms.concurrency import PROCESS_BYTES
from beamvision.transforms.members import (
    ArchiveBroken,
    Member,
    Tally,
    archive_kind,
    is_archive_input,
    iter_members,
    member_uri,
    safe_member_name,
    split_member_uri,
)
from beamvision.transforms.progress import ReportProgress
from beamvision.transforms.rows import ERRORS_TAG, METRICS_NAMESPACE, ImageFile, error_row, exception_text


class SplitArchives(beam.PTransform):
    """``ImageFile``s to ``files`` (plain) and ``archives`` (archives and archive members)."""

    def expand(self, files):
        parts = files | "ArchiveOrNot" >> beam.Partition(lambda f, _: int(is_archive_input(f.uri)), 2)
        return {"files": parts[0], "archives": parts[1]}


@dataclasses.dataclass(frozen=True)
class ArchiveRequest:
    """Everything asked of one archive: itself (all its images) and/or members by name, with their labels."""

    uri: str
    requests: tuple[ImageFile, ...]


class GroupArchives(beam.PTransform):
    """Archive and member ``ImageFile``s to one ``ArchiveRequest`` per archive (each is read once).

    The requests are names, never bytes: ``ReadFiles`` reads them beside plain
    files, so reading, decoding and inference stay one fused stage.
    """

    def expand(self, archives):
        return (
            archives
            | "KeyByArchive" >> beam.Map(_request)
            | "OncePerArchive" >> beam.GroupByKey()
            | "Request" >> beam.MapTuple(lambda uri, requests: ArchiveRequest(uri, tuple(requests)))
        )


class ListArchiveMembers(beam.PTransform):
    """``ArchiveRequest``s to the ``ImageFile`` of every image member, labelled by its folder; nothing kept.

    A names-only pass (prepare's class list). Returns the ImageFiles.
    """

    def expand(self, requests):
        listed = requests | "List" >> beam.ParDo(_ListFn()).with_outputs(
            ERRORS_TAG, "members", "not_images", main="files"
        )
        return listed.files


class CountedInputs(beam.PTransform):
    """The inputs a run counts, one URI each: an archive is not one, each row it makes is.

    Input: a dict of PCollections: ``named`` (URIs matched or listed,
    archives among them), ``unpacked`` (``ReadFiles``' ``members``: one URI
    per row an archive made) and, optionally, ``refused`` (error rows made
    before reading, such as prepare's label errors, whose archive members
    never reach it). Each is also reported as progress (``ReportProgress``:
    the run's total, known for named files before any is read).
    """

    def expand(self, pcolls):
        parts = {
            "named": pcolls["named"] | "NotArchives" >> beam.Filter(lambda uri: not is_archive_input(uri)),
            "unpacked": pcolls["unpacked"],
        }
        if "refused" in pcolls:
            parts["refused"] = (
                pcolls["refused"]
                | "RefusedUris" >> beam.Map(lambda row: row["image_uri"])
                | "RefusedMembers" >> beam.Filter(is_archive_input)
            )
        _ = parts | "Progress" >> ReportProgress("inputs")
        return list(parts.values()) | "AllInputs" >> beam.Flatten()


def _request(image_file: ImageFile) -> tuple[str, ImageFile]:
    parts = split_member_uri(image_file.uri)
    return (parts[0] if parts else image_file.uri), image_file


def _named_members(request: ArchiveRequest) -> dict[str, ImageFile]:
    """The members a request names, by normalised name (an unsafe name as given: its read fails)."""
    named = {}
    for image_file in request.requests:
        parts = split_member_uri(image_file.uri)
        if parts:
            named[safe_member_name(parts[1]) or parts[1]] = image_file
    return named


def folder_of(name: str) -> str | None:
    """A member's class under ``label_from_folder``: its first folder in the archive."""
    parts = name.split("/")
    return parts[0] if len(parts) > 1 else None


class Unpacker:
    """Reads an ``ArchiveRequest``: its outputs, in the shape of ``ReadFiles``' (see ``unpack``).

    ``unpack`` streams the archive once: each image member asked for becomes
    (ImageFile, bytes), within ``buffer_bytes`` of ``PROCESS_BYTES`` (the
    member's bytes are counted from before they are read until the consumer
    has taken them), or an error row; and per row, its URI to the tagged
    output ``members``; and the count of members that are not images to
    ``not_images``. With ``label_from_folder`` a member's class is its
    first folder (``NoLabel`` row if none), unless its request carries one.
    """

    def __init__(self, buffer_bytes: int, label_from_folder: bool = False, read_data: bool = True):
        self._buffer_bytes = buffer_bytes
        self._label_from_folder = label_from_folder
        self._read_data = read_data
        self._archives = Metrics.counter(METRICS_NAMESPACE, "archives_read")
        self._broken = Metrics.counter(METRICS_NAMESPACE, "archives_broken")
        self._read = Metrics.counter(METRICS_NAMESPACE, "images_read")
        self._failed = Metrics.counter(METRICS_NAMESPACE, "images_failed")

    def unpack(self, request: ArchiveRequest) -> Iterator:
        archive = request.uri
        whole = next((r for r in request.requests if r.uri == archive), None)
        named = _named_members(request)
        tally, found = Tally(), set()
        try:
            yield from self._stream(archive, whole, named, tally, found)
            self._archives.inc()
        except Exception as exc:  # every failure of storage or of the archive becomes a row
            self._broken.inc()
            yield from self._broken_rows(archive, whole is not None, sorted(set(named) - found), exc)
            found.update(named)
        for name in sorted(set(named) - found):
            yield from self._error(
                member_uri(archive, name), "read", "FileNotFoundError", f"no member {name!r} in {archive}"
            )
        if tally.not_images:
            yield beam.pvalue.TaggedOutput("not_images", tally.not_images)

    def _stream(
        self,
        archive: str,
        whole: ImageFile | None,
        named: dict[str, ImageFile],
        tally: Tally,
        found: set[str],
    ) -> Iterator:
        """The outputs of every member asked for (all images with ``whole``), each read within the budget.

        ``found`` collects the names in ``named`` that the archive holds.
        """
        held = [0]

        def admit(nbytes: int) -> None:
            PROCESS_BYTES.acquire(2 * nbytes, nbytes, self._buffer_bytes)  # its bytes and its pixels
            held[0] += nbytes

        try:
            metadata = FileSystems.get_filesystem(archive).metadata(archive)
            modified = getattr(metadata, "last_updated_in_seconds", None)
            with FileSystems.open(archive, compression_type=CompressionTypes.UNCOMPRESSED) as f:
                members = iter_members(
                    f,
                    archive_kind(archive),
                    size=metadata.size_in_bytes,
                    wanted=None if whole is not None else set(named),
                    read_data=self._read_data,
                    admit=admit,
                    tally=tally,
                )
                for member in members:
                    if member.name in named:
                        found.add(member.name)  # (only names asked for: memory never follows the members)
                    yield from self._outputs(archive, member, named.get(member.name, whole), modified)
                    PROCESS_BYTES.release(held[0])  # the consumer has taken the member
                    held[0] = 0
        finally:
            PROCESS_BYTES.release(held[0])

    def _broken_rows(self, archive: str, whole: bool, unreached: list[str], exc: Exception) -> Iterator:
        """Error rows for a failed archive: itself if asked for whole, and each named member not reached."""
        error_type = getattr(exc, "error_type", type(exc).__name__)
        if isinstance(exc, ArchiveBroken):
            message = str(exc)
        else:
            message = f"cannot read the archive: {exception_text(exc)}"
        if whole:
            yield from self._error(archive, "read", error_type, message)
        for name in unreached:
            yield from self._error(member_uri(archive, name), "read", error_type, message)

    def _error(self, uri: str, stage: str, error_type: str, message: str, size=None, modified=None):
        self._failed.inc()
        yield beam.pvalue.TaggedOutput(ERRORS_TAG, error_row(uri, stage, error_type, message, size, modified))
        yield beam.pvalue.TaggedOutput("members", uri)

    def _outputs(self, archive: str, member: Member, request: ImageFile | None, modified: float | None):
        uri = member_uri(archive, member.name)
        label = request.label if request is not None else None
        if member.error is None and self._label_from_folder and label is None:
            label = folder_of(member.name)
            if label is None:
                member = dataclasses.replace(member, error=("NoLabel", "member is not inside a class folder"))
        if member.error is not None:
            error_type, message = member.error
            stage = "label" if error_type == "NoLabel" else "read"
            yield from self._error(uri, stage, error_type, message, member.size, modified)
            return
        self._read.inc()
        yield beam.pvalue.TaggedOutput("members", uri)
        image_file = ImageFile(uri, member.size, modified, label)
        if not self._read_data:
            yield image_file
            return
        yield dataclasses.replace(image_file, sha256=hashlib.sha256(member.data).hexdigest()), member.data


class _ListFn(beam.DoFn):
    def __init__(self):
        self._unpacker = Unpacker(0, label_from_folder=True, read_data=False)

    def process(self, request: ArchiveRequest):
        yield from self._unpacker.unpack(request)
