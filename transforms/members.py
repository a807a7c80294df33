"""Archive members, in plain Python: member URIs, hostile-name checks and the streamed tar/zip pass.

An input that names a ``.tar``, ``.tar.gz``/``.tgz`` (also ``.tar.bz2``,
``.tar.xz``) or ``.zip`` stands for its image members. A member's URI is
``ARCHIVE_URI!/path/in/archive.jpg`` (as in JAR URLs: ``member_uri``,
``split_member_uri``); a list file or labels CSV may name such a URI to read
just that member.

``iter_members`` streams an archive, member by member, in one sequential
pass: tar through ``tarfile``'s stream mode, zip through ``stream-unzip``
(local headers; the central directory at the end is never needed, so a
truncated zip still yields the members before the damage). Nothing is
extracted to disk and an archive is never held whole.

Archives come from outside, so names and sizes are not trusted:

- Only members whose names are images (by extension) are inputs; others
  (README, WebDataset ``.json``/``.cls`` side files, ``__MACOSX/``) are
  counted per archive (``Tally.not_images``) and never read.
- A member name that is absolute or climbs out with ``..`` is an error
  (``UnsafeMemberName``); names are normalised (``./a.jpg`` is ``a.jpg``).
  Members are only ever read as bytes: nothing is written, no path is opened.
- Symbolic and hard links and other non-files in a tar are errors
  (``LinkMember``) and are never followed. (A zip's local headers do not say
  what a link is: one is read as the few bytes of its target's name.)
- A member larger than ``MAX_MEMBER_BYTES`` (by its header, or as it
  inflates) is an error (``MemberTooLarge``); its data is skipped, never held.
- A truncated or corrupt archive yields the members before the damage, then
  raises ``ArchiveBroken`` (``TruncatedArchive`` or ``CorruptArchive``)
  saying after which member and at which byte it broke.
- Memory does not grow with the number of members.
"""

from __future__ import annotations

import dataclasses
import re
import tarfile
from collections.abc import Callable, Iterator

from beamvision.transforms.concurrency import MB
from beamvision.transforms.rows import exception_text

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
        raise ArchiveBroken(error_type, _where(exception_text(exc), tally, counting.position, size)) from None


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
