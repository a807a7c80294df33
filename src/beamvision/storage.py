"""Whole-file I/O on any Beam filesystem (local paths, ``gs://``, ...).

Model artifacts, label files and summaries all go through these helpers, so
every storage backend that Beam's ``FileSystems`` knows works the same way.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import uuid

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

_CHUNK = 1 << 24


def exists(uri: str) -> bool:
    """Whether a file exists at ``uri``."""
    return FileSystems.exists(uri)


def join(base: str, *parts: str) -> str:
    """Joins path components the way the filesystem of ``base`` does."""
    return FileSystems.join(base, *parts)


def delete(uri: str) -> None:
    """Deletes the file at ``uri``."""
    FileSystems.delete([uri])


def read_bytes(uri: str) -> bytes:
    """The whole content of the file at ``uri``."""
    with FileSystems.open(uri, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        return f.read()


def read_text(uri: str) -> str:
    """The file at ``uri`` decoded as UTF-8."""
    return read_bytes(uri).decode("utf-8")


def download(uri: str, local_path: str) -> None:
    """Copies the file at ``uri`` to a local path, in chunks."""
    source = FileSystems.open(uri, compression_type=CompressionTypes.UNCOMPRESSED)
    with source as src, open(local_path, "wb") as dst:
        shutil.copyfileobj(src, dst, _CHUNK)


def write_atomic(uri: str, data: bytes | None = None, local_path: str | None = None) -> None:
    """Writes ``data`` (or the local file ``local_path``) to ``uri`` all at once.

    The content goes to a temporary sibling first and is then renamed, so a
    reader sees either no file or the complete one, never a partial write.
    """
    tmp_uri = f"{uri}.tmp-{uuid.uuid4().hex}"
    with FileSystems.create(tmp_uri, compression_type=CompressionTypes.UNCOMPRESSED) as dst:
        if local_path is None:
            dst.write(data)
        else:
            with open(local_path, "rb") as src:
                shutil.copyfileobj(src, dst, _CHUNK)
    if exists(uri):
        delete(uri)
    FileSystems.rename([tmp_uri], [uri])


def rename(source: str, target: str) -> None:
    """Moves the file ``source`` to ``target`` (on the same filesystem), making a local target's folder."""
    if is_local(target):
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    FileSystems.rename([source], [target])


def delete_matching(patterns: list[str]) -> list[str]:
    """Deletes every file (and, locally, folder) matching the globs; returns what was deleted, sorted."""
    matches = FileSystems.match(patterns)
    found = sorted({m.path for match in matches for m in match.metadata_list})
    folders = {pattern for pattern in patterns if is_local(pattern)}
    local_dirs = sorted({path for pattern in folders for path in glob.glob(pattern) if os.path.isdir(path)})
    if found:
        FileSystems.delete(found)
    for path in local_dirs:
        shutil.rmtree(path, ignore_errors=True)
    return sorted(set(found) | set(local_dirs))


def sha256_file(local_path: str) -> str:
    """Hex SHA-256 digest of a local file."""
    digest = hashlib.sha256()
    with open(local_path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def is_local(uri: str) -> bool:
    """Whether ``uri`` is a path on this machine's disk (no scheme such as ``gs://``)."""
    return FileSystems.get_scheme(uri) is None


def absolute(uri: str) -> str:
    """A local path, or an archive member's (``ARCHIVE!/member``), made absolute; other URIs as they are."""
    if not is_local(uri):
        return uri
    archive, found, member = uri.partition("!/")
    return os.path.abspath(archive) + found + member


def size(uri: str) -> int:
    """The size in bytes of the file at ``uri``."""
    return FileSystems.get_filesystem(uri).metadata(uri).size_in_bytes


def match_sizes(pattern: str) -> list[tuple[str, int]]:
    """(path, size in bytes) of each file matching the glob ``pattern``, sorted by path."""
    matches = FileSystems.match([pattern])[0].metadata_list
    return sorted((m.path, m.size_in_bytes) for m in matches)


def list_files(prefix: str) -> list[str]:
    """Every file under the directory ``prefix``, sorted (none when it does not exist)."""
    matches = FileSystems.match([join(prefix, "**")])[0].metadata_list
    return sorted(m.path for m in matches)


def copy_tree(source: str, target: str) -> None:
    """Copies every file under ``source`` to the same relative path under ``target``."""
    files = list_files(source)
    base = source.rstrip("/") + "/"
    targets = [join(target, uri[len(base) :]) for uri in files]
    if FileSystems.get_scheme(target) is None:
        for path in targets:
            os.makedirs(os.path.dirname(path), exist_ok=True)
    if files:
        FileSystems.copy(files, targets)


def delete_tree(prefix: str) -> None:
    """Deletes every file under the directory ``prefix`` (and, locally, the directory)."""
    if FileSystems.get_scheme(prefix) is None:
        shutil.rmtree(prefix, ignore_errors=True)
        return
    files = list_files(prefix)
    if files:
        FileSystems.delete(files)
