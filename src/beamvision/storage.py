"""Whole-file I/O on any Beam filesystem (local paths, ``gs://``, ...), and the one spelling of a file.

Model artifacts, label files and summaries all go through these helpers, so
every storage backend that Beam's ``FileSystems`` knows works the same way.

``canonical`` is how a file is spelled in every row and wherever URIs are
compared: a URI with a scheme as it is, a local file as its absolute,
normalised path (symlinks kept, no ``file://``), so ``data/x.jpg``,
``./data/x.jpg``, ``/home/me/data/x.jpg`` and ``file:///home/me/data/x.jpg``
are one file.

``check_reachable`` fails fast, in one line (``StorageUnreachable``), when
Cloud Storage cannot be reached from this process or no credentials are
found: the helpers here call it before their first access to an endpoint,
instead of letting the client retry an unresolvable host for minutes. Faults
of a reachable server (429, 503) are still retried by the client, as ever.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import socket
import threading
import time
import urllib.parse
import urllib.request
import uuid

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

_CHUNK = 1 << 24
_FILE_SCHEME = "file://"
_MEMBER_SEPARATOR = "!/"  # ARCHIVE!/member (beamvision.transforms.members): only the archive is a path
_GCS_HOST = "storage.googleapis.com"
_EMULATOR_VARIABLE = "STORAGE_EMULATOR_HOST"  # the google-cloud-storage client's own switch
CHECK_SECONDS = 8.0  # for each of name resolution and connection; credentials take their own time


class StorageUnreachable(Exception):
    """Storage that a command needs cannot be reached, or no credentials were found. One line."""


def canonical(uri: str) -> str:
    """The one spelling of a file: a URI with a scheme unchanged, a local path absolute and normalised.

    A leading ``file://`` is dropped; a relative path is taken from the
    current directory, as the user typed it; ``..`` and ``.`` are folded,
    symlinks are not resolved. In an archive member's URI
    (``ARCHIVE!/member``) only the archive's path changes.
    """
    if uri.startswith(_FILE_SCHEME):
        uri = uri[len(_FILE_SCHEME) :]
    if not uri or FileSystems.get_scheme(uri) is not None:
        return uri
    path, separator, member = uri.partition(_MEMBER_SEPARATOR)
    return os.path.abspath(path) + separator + member


_reachable: set[str] = set()  # endpoints found reachable (a failure is checked again: it may pass)
_checked_lock = threading.Lock()


def check_reachable(*uris: str | None) -> None:
    """Raises ``StorageUnreachable`` unless the storage of each ``gs://`` URI answers and credentials exist.

    Checked until it passes, once per endpoint and process: the host resolves and accepts a
    connection within ``CHECK_SECONDS`` each (through the HTTPS proxy, if one
    is set), and, unless ``STORAGE_EMULATOR_HOST`` names an emulator, Google
    application default credentials are found. Local paths and other schemes
    pass unchecked.
    """
    for uri in uris:
        if uri and uri.startswith("gs://"):
            _check_gcs(uri)


def _check_gcs(uri: str) -> None:
    emulator = os.environ.get(_EMULATOR_VARIABLE)
    endpoint = emulator or _GCS_HOST
    with _checked_lock:
        if endpoint in _reachable:
            return
        problem = _gcs_problem(emulator)
        if not problem:
            _reachable.add(endpoint)
    if problem:
        bucket = uri[len("gs://") :].split("/", 1)[0]
        raise StorageUnreachable(f"{uri}: {problem}, and the bucket name ({bucket})")


def _gcs_problem(emulator: str | None) -> str | None:
    """Why Cloud Storage (or the emulator) cannot be used from here; None when it can."""
    if emulator:
        parsed = urllib.parse.urlsplit(emulator if "://" in emulator else f"http://{emulator}")
        host, port, scheme = parsed.hostname or "", parsed.port, parsed.scheme
    else:
        host, port, scheme = _GCS_HOST, None, "https"
    port = port or (443 if scheme == "https" else 80)
    target = f"{host}:{port}"
    proxy = None if urllib.request.proxy_bypass(host) else urllib.request.getproxies().get(scheme)
    if proxy:
        parsed = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = parsed.hostname or "", parsed.port or 80
    where = ("the storage emulator" if emulator else "Cloud Storage") + f" at {target}"
    where += f" through the proxy {host}:{port}" if proxy else ""
    failure = _connect(host, port)
    if failure:
        check = f"{_EMULATOR_VARIABLE} ({emulator})" if emulator else "the network (or the proxy)"
        return f"cannot reach {where} ({failure}); check {check}"
    if emulator:
        return None  # an emulator takes anonymous requests
    return _credentials_problem()


def _connect(host: str, port: int) -> str | None:
    """Why a TCP connection to ``host:port`` fails (each step bounded in time); None when it opens."""
    found: list = []

    def resolve():
        try:
            found.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as exc:
            found.append(exc)

    resolver = threading.Thread(target=resolve, daemon=True)
    resolver.start()
    resolver.join(CHECK_SECONDS)
    if not found:
        return f"resolving {host} took over {CHECK_SECONDS:g}s"
    if isinstance(found[0], OSError):
        return f"cannot resolve {host}: {found[0].strerror or found[0]}"
    last, deadline = None, time.monotonic() + CHECK_SECONDS  # for all the addresses together
    for family, kind, proto, _, address in found[0]:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            with socket.socket(family, kind, proto) as connection:
                connection.settimeout(left)
                connection.connect(address)
            return None
        except OSError as exc:
            last = exc
    reason = (getattr(last, "strerror", None) or last) if last else f"no answer in {CHECK_SECONDS:g}s"
    return f"cannot connect to {host}:{port}: {reason}"


def _credentials_problem() -> str | None:
    """Why no Google credentials can be used here; None when application default credentials exist."""
    try:
        import google.auth
        from google.auth.exceptions import DefaultCredentialsError
    except ImportError:
        return "google-auth is not installed (pip install 'apache-beam[gcp]')"
    try:
        google.auth.default()
    except DefaultCredentialsError:
        return (
            "no Google Cloud credentials found; check 'gcloud auth application-default login' "
            "or GOOGLE_APPLICATION_CREDENTIALS (a service account key file)"
        )
    return None


def exists(uri: str) -> bool:
    """Whether a file exists at ``uri``."""
    check_reachable(uri)
    return FileSystems.exists(uri)


def join(base: str, *parts: str) -> str:
    """Joins path components the way the filesystem of ``base`` does."""
    return FileSystems.join(base, *parts)


def delete(uri: str) -> None:
    """Deletes the file at ``uri``."""
    check_reachable(uri)
    FileSystems.delete([uri])


def read_bytes(uri: str) -> bytes:
    """The whole content of the file at ``uri``."""
    check_reachable(uri)
    with FileSystems.open(uri, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        return f.read()


def read_text(uri: str) -> str:
    """The file at ``uri`` decoded as UTF-8."""
    return read_bytes(uri).decode("utf-8")


def download(uri: str, local_path: str) -> None:
    """Copies the file at ``uri`` to a local path, in chunks."""
    check_reachable(uri)
    source = FileSystems.open(uri, compression_type=CompressionTypes.UNCOMPRESSED)
    with source as src, open(local_path, "wb") as dst:
        shutil.copyfileobj(src, dst, _CHUNK)


def write_atomic(uri: str, data: bytes | None = None, local_path: str | None = None) -> None:
    """Writes ``data`` (or the local file ``local_path``) to ``uri`` all at once.

    The content goes to a temporary sibling first and is then renamed, so a
    reader sees either no file or the complete one, never a partial write.
    """
    check_reachable(uri)
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


def create_exclusive(uri: str, data: bytes) -> bool:
    """Creates the file ``uri`` holding ``data`` only if no file is there: False if one is.

    One writer wins when several try at once: locally ``O_CREAT | O_EXCL``, on
    Cloud Storage an upload on the condition that no generation exists
    (``ifGenerationMatch=0``). Other filesystems are refused.
    """
    check_reachable(uri)
    scheme = FileSystems.get_scheme(uri)
    if scheme is None:
        os.makedirs(os.path.dirname(os.path.abspath(uri)), exist_ok=True)
        try:
            fd = os.open(uri, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    if scheme != "gs":
        raise ValueError(f"{uri}: no exclusive create on {scheme}://")
    from apache_beam.io.gcp.gcsio import GcsIO, parse_gcs_path
    from google.api_core.exceptions import PreconditionFailed

    bucket, name = parse_gcs_path(uri)
    try:
        GcsIO().client.bucket(bucket).blob(name).upload_from_string(data, if_generation_match=0)
    except PreconditionFailed:
        return False
    return True


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


def size(uri: str) -> int:
    """The size in bytes of the file at ``uri``."""
    check_reachable(uri)
    return FileSystems.get_filesystem(uri).metadata(uri).size_in_bytes


def match_sizes(pattern: str) -> list[tuple[str, int]]:
    """(path, size in bytes) of each file matching the glob ``pattern``, sorted by path."""
    return sorted((m.path, m.size_in_bytes) for m in match(pattern))


def match(pattern: str) -> list:
    """Beam's ``FileMetadata`` of each file matching the glob ``pattern``, sorted by path."""
    check_reachable(pattern)
    return sorted(FileSystems.match([pattern])[0].metadata_list, key=lambda m: m.path)


def list_files(prefix: str) -> list[str]:
    """Every file under the directory ``prefix``, sorted (none when it does not exist)."""
    return [m.path for m in match(join(prefix, "**"))]


def copy_tree(source: str, target: str) -> None:
    """Copies every file under ``source`` to the same relative path under ``target``."""
    check_reachable(source, target)
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
