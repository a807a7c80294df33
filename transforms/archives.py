"""Image archives as input: ``iter_members`` (a plain function), ``GroupArchives`` and ``Unpacker``.

An input that names a ``.tar``, ``.tar.gz``/``.tgz`` (also ``.tar.bz2``,
``.tar.xz``) or ``.zip`` stands for its image members. A member's URI is
``ARCHIVE_URI!/path/in/archive.jpg`` (as in JAR URLs); a list file or labels
CSV may name such a URI to read just that member.

Archives are streamed, member by member, in one sequential pass: tar through
``tarfile``'s stream mode, zip through ``stream-unzip`` (local headers; the
central directory at the end is never needed, so a truncated zip still yields
the members before the damage). Nothing is extracted to disk and an archive
is never held whole: a process holds the member being read (counted in
``--buffer_mb`` with the reads of plain files) and what decoding holds.
Archives are grouped by URI before they are read, so many archives spread over
workers; one archive is read by one worker.

Archives come from outside, so names and sizes are not trusted:

- Only members whose names are images (by extension) are inputs; others
  (README, WebDataset ``.json``/``.cls`` side files, ``__MACOSX/``) are
  counted per archive (``not_images``) and never read.
- A member name that is absolute or climbs out with ``..`` is an error row
  (``UnsafeMemberName``); names are normalised (``./a.jpg`` is ``a.jpg``).
  Members are only ever read as bytes: nothing is written, no path is opened.
- Symbolic and hard links and other non-files in a tar are error rows
  (``LinkMember``) and are never followed. (A zip's local headers do not say
  what a link is: one is read as the few bytes of its target's name, a
  ``NotAnImage`` row.)
- A member larger than ``MAX_MEMBER_BYTES`` (by its header, or as it
  inflates) is an error row (``MemberTooLarge``); its data is skipped, never
  held.
- A truncated or corrupt archive yields the members before the damage, then
  one error row for the archive (``TruncatedArchive`` or ``CorruptArchive``)
  saying after which member and at which byte it broke.
- Memory does not grow with the number of members.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import tarfile
from collections.abc import Callable, Iterator

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from beamvision.transforms.concurrency import MB, PROCESS_BYTES
from beamvision.transforms.progress import ReportProgress
from beamvision.transforms.rows import ERRORS_TAG, METRICS_NAMESPACE, ImageFile, error_row

MEMBER_SEPARATOR = "!/"
# No image within the default pixel limit (a 16-bit RGBA TIFF of 89M pixels is
# 716 MB) is larger: a member claiming more is refused without being held.
MAX_MEMBER_BYTES = 1024 * MB
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff")
_KINDS = {
    ".tar": "tar",
    ".tar.gz": "tar",
    ".tgz": "tar",
    ".tar.bz2": "tar",
    ".tbz2": "tar",
    ".tar.xz": "tar",
    ".txz": "tar",
    ".zip": "zip",
}
_CHUNK = 4 * MB
_DRIVE = re.compile(r"^[A-Za-z]:")


def archive_kind(uri: str) -> str | None:
    """``tar`` or ``zip`` for a URI whose name is an archive's, else None."""
    name = uri.lower()
    return next((kind for ext, kind in _KINDS.items() if name.endswith(ext)), None)


def split_member_uri(uri: str) -> tuple[str, str] | None:
    """(archive URI, member name) for ``ARCHIVE!/member``; None for any other URI."""
    start = 0
    while (at := uri.find(MEMBER_SEPARATOR, start)) >= 0:
        if archive_kind(uri[:at]):
            return uri[:at], uri[at + len(MEMBER_SEPARATOR) :]
        start = at + 1
    return None


def member_uri(archive: str, name: str) -> str:
    return f"{archive}{MEMBER_SEPARATOR}{name}"


def is_archive_input(uri: str) -> bool:
    """Whether a URI names an archive or a member of one."""
    return archive_kind(uri) is not None or split_member_uri(uri) is not None


def safe_member_name(name: str) -> str | None:
    """A member name normalised (``./a//b.jpg`` -> ``a/b.jpg``); None if absolute, climbing or empty."""
    name = name.replace("\\", "/")
    if "\x00" in name or name.startswith("/") or _DRIVE.match(name):
        return None
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return "/".join(parts)


def is_image_name(name: str) -> bool:
    """Whether a member is an image input, by its name (macOS resource forks are not)."""
    parts = name.replace("\\", "/").split("/")
    return (
        name.lower().endswith(IMAGE_EXTENSIONS) and "__MACOSX" not in parts and not parts[-1].startswith("._")
    )


@dataclasses.dataclass(frozen=True)
class Member:
    """An image member: its normalised name and its bytes, or why it is not read (``error``)."""

    name: str
    size: int | None = None
    data: bytes | None = None
    error: tuple[str, str] | None = None  # (error_type, message)


@dataclasses.dataclass
class Tally:
    """What a pass over an archive saw besides image members."""

    members: int = 0  # image members yielded (read or in error)
    not_images: int = 0  # entries that are neither images nor folders
    last: str | None = None  # the last image member read whole


class ArchiveBroken(Exception):
    """The archive is truncated or corrupt. ``error_type`` is TruncatedArchive or CorruptArchive."""

    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type


class _Counting:
    """A read-only file wrapper counting the bytes read (where an archive broke).

    It also ends reads past the end: tarfile's stream mode skips a member it
    is not asked to read by reading on, block by block, as far as the header
    claims, even past the end of the data (a header claiming 10 TiB would spin
    for hours).
    """

    _EMPTY_READS = 16  # a well-formed archive stops asking after one or two

    def __init__(self, raw):
        self._raw = raw
        self.position = 0
        self._empty = 0

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        self.position += len(data)
        self._empty = 0 if data else self._empty + 1
        if self._empty > self._EMPTY_READS:
            raise EOFError("unexpected end of data: a member claims more bytes than the archive holds")
        return data


def iter_members(
    fileobj,
    kind: str,
    *,
    size: int | None = None,
    wanted: set[str] | None = None,
    read_data: bool = True,
    max_member_bytes: int = MAX_MEMBER_BYTES,
    admit: Callable[[int], None] | None = None,
    tally: Tally | None = None,
) -> Iterator[Member]:
    """The image members of the archive read from ``fileobj``, in archive order, streamed.

    Args:
        fileobj: the archive, read sequentially from its start.
        kind: ``tar`` (any compression) or ``zip``.
        size: the archive's size in bytes, if known (for messages).
        wanted: only these normalised member names (others are passed over unread).
        read_data: False to list members without keeping their bytes.
        max_member_bytes: larger members are ``MemberTooLarge`` errors.
        admit: called with a member's size before its bytes are read (a memory budget).
        tally: filled in with counts as the pass goes.

    Raises:
        ArchiveBroken: after the members before the damage have been yielded.
    """
    tally = tally if tally is not None else Tally()
    counting = _Counting(fileobj)
    entries = _tar_entries(counting) if kind == "tar" else _zip_entries(counting)
    try:
        for raw_name, entry_size, is_file, read in entries:
            name = safe_member_name(raw_name)
            image = is_image_name(raw_name)
            if raw_name.endswith("/") and entry_size in (0, None) and not image:
                continue  # a folder
            if wanted is not None and name not in wanted:
                continue
            if not image:
                if wanted is None:
                    tally.not_images += 1
                    continue
                member = Member(name, entry_size, error=("NotAnImage", "not an image, by its name: not read"))
            else:
                member = _member(
                    name, raw_name, entry_size, is_file, read, read_data, max_member_bytes, admit
                )
            tally.members += 1
            if member.data is not None:
                tally.last = member.name
            yield member
    except ArchiveBroken as exc:
        raise ArchiveBroken(exc.error_type, _where(str(exc), tally, counting.position, size)) from None
    except Exception as exc:  # tarfile, gzip, lzma, zlib and stream-unzip each raise their own types
        text = f"{type(exc).__name__} {exc}".lower()
        truncated = isinstance(exc, EOFError) or "truncated" in text or "end of" in text
        truncated = truncated or bool(size and counting.position >= size)
        error_type = "TruncatedArchive" if truncated else "CorruptArchive"
        raise ArchiveBroken(error_type, _where(_describe(exc), tally, counting.position, size)) from None


def _member(name, raw_name, size, is_file, read, read_data, max_member_bytes, admit) -> Member:
    """An image entry as a Member: read (within the limit), or why not."""
    if name is None:
        return Member(raw_name, size, error=("UnsafeMemberName", _unsafe(raw_name)))
    if not is_file:
        return Member(name, size, error=("LinkMember", "a link or special file: not read, never followed"))
    if size is not None and size > max_member_bytes:
        return Member(name, size, error=("MemberTooLarge", _too_large(size, max_member_bytes)))
    if not read_data:
        return Member(name, size)
    if admit is not None and size is not None:
        admit(size)
    data = read(max_member_bytes)
    if data is None:
        return Member(name, None, error=("MemberTooLarge", _too_large(None, max_member_bytes)))
    if admit is not None and size is None:  # a zip member with a data descriptor: its size is known now
        admit(len(data))
    return Member(name, len(data), data)


def _describe(exc: Exception) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _unsafe(name: str) -> str:
    return f"member name {name!r} is absolute or leaves the archive: not read"


def _too_large(size: int | None, limit: int) -> str:
    claimed = f"{size:,} bytes" if size is not None else "more"
    return f"member holds {claimed}; the limit for one image is {limit:,} bytes: not read"


def _where(reason: str, tally: Tally, position: int, size: int | None) -> str:
    plural = "" if tally.members == 1 else "s"
    last = f" (last read: {tally.last})" if tally.last else ""
    after = f"after {tally.members} image member{plural}{last}"
    at = f"at byte {position:,}" + (f" of {size:,}" if size else "")
    return f"archive broken {after}, {at}: {reason}"


class _WatchedTarInfo(tarfile.TarInfo):
    """Records on the TarFile why reading headers stopped: tarfile ends quietly on a bad header."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            tar.stopped_by = None  # the end-of-archive marker: a clean end
            raise
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError):
            tar.stopped_by = ("TruncatedArchive", "the data ends before the end-of-archive marker")
            raise
        except tarfile.HeaderError as exc:
            tar.stopped_by = ("CorruptArchive", f"bad tar header: {exc}")
            raise


def _tar_entries(fileobj) -> Iterator[tuple[str, int, bool, Callable]]:
    """(name, size, is regular file, read(limit)) per tar entry, streamed."""
    with tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=_WatchedTarInfo) as tar:
        tar.stopped_by = None
        for info in tar:
            tar.members = []  # stream mode remembers every member otherwise: memory would grow with them

            def read(limit, info=info):
                if info.size > limit:
                    return None
                data = tar.extractfile(info).read()
                if len(data) != info.size:
                    raise EOFError(f"member {info.name} ends after {len(data):,} of {info.size:,} bytes")
                return data

            yield info.name + ("/" if info.isdir() else ""), info.size, info.isreg(), read
        if tar.stopped_by is not None:
            raise ArchiveBroken(*tar.stopped_by)


def _zip_entries(fileobj) -> Iterator[tuple[str, int | None, bool, Callable]]:
    """(name, size, True, read(limit)) per zip entry, from local headers, streamed."""
    from stream_unzip import stream_unzip

    chunks = iter(lambda: fileobj.read(_CHUNK), b"")
    for raw_name, size, unzipped in stream_unzip(chunks, password=None):
        consumed = False

        def read(limit, unzipped=unzipped):
            nonlocal consumed
            consumed = True
            parts, total = [], 0
            for chunk in unzipped:
                total += len(chunk)
                if total <= limit:
                    parts.append(chunk)
                elif parts:
                    parts = []  # too large: the rest is inflated and dropped, never held
            return b"".join(parts) if total <= limit else None

        yield _zip_name(raw_name), size, True, read
        if not consumed:
            for _ in unzipped:  # stream-unzip needs each member consumed before the next
                pass


def _zip_name(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp437")  # the zip format's legacy encoding


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
        whole_request = next((r for r in request.requests if r.uri == archive), None)
        named = {}
        for r in request.requests:
            parts = split_member_uri(r.uri)
            if parts:
                named[safe_member_name(parts[1]) or parts[1]] = r
        whole = whole_request is not None
        tally = Tally()
        held = [0]

        def admit(nbytes: int) -> None:
            PROCESS_BYTES.acquire(2 * nbytes, nbytes, self._buffer_bytes)  # its bytes and its pixels
            held[0] += nbytes

        found = set()
        try:
            metadata = FileSystems.get_filesystem(archive).metadata(archive)
            modified = getattr(metadata, "last_updated_in_seconds", None)
            with FileSystems.open(archive, compression_type=CompressionTypes.UNCOMPRESSED) as f:
                members = iter_members(
                    f,
                    archive_kind(archive),
                    size=metadata.size_in_bytes,
                    wanted=None if whole else set(named),
                    read_data=self._read_data,
                    admit=admit,
                    tally=tally,
                )
                for member in members:
                    if member.name in named:
                        found.add(member.name)  # (only names asked for: memory never follows the members)
                    yield from self._outputs(archive, member, named.get(member.name, whole_request), modified)
                    PROCESS_BYTES.release(held[0])  # the consumer has taken the member
                    held[0] = 0
            self._archives.inc()
        except Exception as exc:  # every failure of storage or of the archive becomes a row
            self._broken.inc()
            error_type = getattr(exc, "error_type", type(exc).__name__)
            message = (
                str(exc) if isinstance(exc, ArchiveBroken) else f"cannot read the archive: {_describe(exc)}"
            )
            if whole:
                yield from self._error(archive, "read", error_type, message)
            for name in sorted(set(named) - found):  # named members never reached: one row each
                yield from self._error(member_uri(archive, name), "read", error_type, message)
            found.update(named)
        finally:
            PROCESS_BYTES.release(held[0])
        for name in sorted(set(named) - found):
            yield from self._error(
                member_uri(archive, name), "read", "FileNotFoundError", f"no member {name!r} in {archive}"
            )
        if tally.not_images:
            yield beam.pvalue.TaggedOutput("not_images", tally.not_images)

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
