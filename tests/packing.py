"""Packs files into tar, tar.gz and zip archives the way users' tools do, and damages them.

``pack`` writes regular members with the standard library's writers (as
``tar``/``zip`` would); ``tar_with`` writes hand-made entries (links, forged
sizes, names that climb out) that only a hostile or broken archive holds.
"""

from __future__ import annotations

import io
import os
import tarfile
import zipfile

TAR_MODES = {"tar": "w", "tar.gz": "w:gz", "tgz": "w:gz"}


def pack(path: str, members: dict[str, bytes]) -> str:
    """Writes ``members`` (name -> bytes) into the archive ``path``; its extension picks the format."""
    if path.endswith(".zip"):
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, data in members.items():
                archive.writestr(name, data)
        return path
    mode = next(mode for ext, mode in TAR_MODES.items() if path.endswith("." + ext))
    with tarfile.open(path, mode) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            archive.addfile(info, io.BytesIO(data))
    return path


def pack_folder(path: str, root: str) -> dict[str, bytes]:
    """Packs every file under ``root`` by its path relative to it; returns what was packed."""
    members = {}
    for folder, _, names in os.walk(root):
        for name in sorted(names):
            full = os.path.join(folder, name)
            with open(full, "rb") as f:
                members[os.path.relpath(full, root).replace(os.sep, "/")] = f.read()
    pack(path, members)
    return members


def truncate(path: str, keep: float) -> int:
    """Cuts the file at ``path`` to the first ``keep`` fraction of its bytes; returns the new size."""
    size = int(os.path.getsize(path) * keep)
    with open(path, "r+b") as f:
        f.truncate(size)
    return size


def tar_with(entries: list[tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]]) -> bytes:
    """An uncompressed tar of hand-made entries: a TarInfo alone (links), or with its data."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for entry in entries:
            info, data = entry if isinstance(entry, tuple) else (entry, None)
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def regular(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def forged_size_header(name: str, claimed: int) -> bytes:
    """A tar header for ``name`` that claims ``claimed`` bytes, without them (a lying archive)."""
    info = tarfile.TarInfo(name)
    info.size = claimed
    return info.tobuf(format=tarfile.GNU_FORMAT)
