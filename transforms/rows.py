"""What pipelines carry and emit: ``ImageFile``, ``ImageKey``, row schemas, ``error_row``, the error tag.

Every step that can fail on an input (read, decode, label, inference) sends an
``error_row`` to its output tagged ``ERRORS_TAG``; ``WriteResults`` and
``WriteErrors`` write rows with these schemas. Beam metrics of every step are
counted under ``METRICS_NAMESPACE``. This module depends on nothing else in
beamvision, so every transform can use it.
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any

import pyarrow as pa

METRICS_NAMESPACE = "beamvision"

# An image's class: one name, or (multi-label) the sorted tuple of its distinct names.
Label = str | tuple[str, ...]


def label_set(label: Label) -> tuple[str, ...]:
    """The names a ``Label`` holds: a one-name tuple for a single class, the set's names for a set."""
    return (label,) if isinstance(label, str) else tuple(label)


@dataclasses.dataclass(frozen=True)
class ImageFile:
    """An input file: where it is, its size, its modification time (seconds since epoch) and its class.

    ``size_bytes`` and ``modified`` are None until the file has been looked
    up; ``label`` is the class a folder or labels file gives it (prepare):
    one name, or under ``prepare --multi_label`` a ``Label`` set, a sorted
    tuple of names (``label_set`` reads either as a tuple).
    """

    uri: str
    size_bytes: int | None = None
    modified: float | None = None
    label: Label | None = None
    sha256: str | None = None  # of the bytes, once read


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImageKey(ImageFile):
    """An ``ImageFile`` once decoded: what travels beside its pixels through inference, to fill its row.

    ``width`` and ``height`` are the original image's, after EXIF orientation.
    """

    width: int
    height: int
    format: str  # "JPEG", "PNG", ...

    @classmethod
    def of(cls, image_file: ImageFile, width: int, height: int, format: str) -> ImageKey:
        """The key of ``image_file`` decoded to an image of that size and format."""
        fields = {field.name: getattr(image_file, field.name) for field in dataclasses.fields(ImageFile)}
        return cls(**fields, width=width, height=height, format=format)


ERRORS_TAG = "errors"  # tagged output of every step that can fail on an input

_TIMESTAMP = pa.timestamp("us", tz="UTC")

# The version of the input file a row is about: an incremental run skips a file
# whose size and modification time (on Cloud Storage, its generation's time)
# are those of an earlier row. Null where the file could not be looked up.
FILE_FIELDS = [pa.field("file_size", pa.int64()), pa.field("file_modified", _TIMESTAMP)]
# SHA-256 (hex) of the bytes read: equal for exact duplicates. Null when nothing was read.
SHA256_FIELD = pa.field("sha256", pa.string())

RESULT_FIELDS = [
    pa.field("image_uri", pa.string(), nullable=False),
    pa.field("label", pa.string(), nullable=False),
    pa.field("score", pa.float32(), nullable=False),
    pa.field("top_k_labels", pa.list_(pa.string()), nullable=False),
    pa.field("top_k_scores", pa.list_(pa.float32()), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("format", pa.string(), nullable=False),
    *FILE_FIELDS,
    SHA256_FIELD,
    pa.field("model_name", pa.string(), nullable=False),
    pa.field("model_version", pa.string(), nullable=False),
    pa.field("processed_at", _TIMESTAMP, nullable=False),
]
EMBEDDING_FIELD = pa.field("embedding", pa.list_(pa.float32()), nullable=False)
# A multi-label model's label set: every class at or above its threshold, best first (may be empty).
LABELS_FIELD = pa.field("labels", pa.list_(pa.string()), nullable=False)

ERROR_SCHEMA = pa.schema(
    [
        pa.field("image_uri", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("error_type", pa.string(), nullable=False),
        pa.field("message", pa.string(), nullable=False),
        *FILE_FIELDS,
        SHA256_FIELD,
        pa.field("processed_at", _TIMESTAMP, nullable=False),
    ]
)


def result_schema(embeddings: bool, multi_label: bool = False) -> pa.Schema:
    """The results schema, with ``labels`` for a multi-label model and ``embedding`` when asked for."""
    return pa.schema(
        RESULT_FIELDS + ([LABELS_FIELD] if multi_label else []) + ([EMBEDDING_FIELD] if embeddings else [])
    )


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def file_identity(size_bytes: int | None, modified: float | None) -> dict[str, Any]:
    """The FILE_FIELDS of a row, from a file's size and modification time (seconds since epoch)."""
    return {
        "file_size": size_bytes,
        "file_modified": None
        if modified is None
        else datetime.datetime.fromtimestamp(modified, datetime.timezone.utc),
    }


def error_row(
    uri: str,
    stage: str,
    error_type: str,
    message: str,
    size_bytes: int | None = None,
    modified: float | None = None,
    sha256: str | None = None,
) -> dict[str, Any]:
    """One row of the errors output. ``stage`` is read, decode, label or inference."""
    return {
        "image_uri": uri,
        "stage": stage,
        "error_type": error_type,
        "message": message[:2000],
        **file_identity(size_bytes, modified),
        "sha256": sha256,
        "processed_at": utc_now(),
    }


def exception_parts(exc: BaseException | tuple | object, unknown: str = "Error") -> tuple[str, str]:
    """(type name, message) of an exception, or of Beam's (type, value, traceback) tuple for one.

    The one way an error row's ``error_type`` and ``message`` are taken from an
    exception that no stage named more precisely; anything else is ``unknown``.
    """
    if isinstance(exc, BaseException):
        return type(exc).__name__, str(exc)
    if isinstance(exc, tuple) and exc and isinstance(exc[0], type):
        return exc[0].__name__, str(exc[1]) if len(exc) > 1 else ""
    return unknown, str(exc)


def exception_text(exc: BaseException) -> str:
    """An exception as one line of text: its type, and its message if it has one."""
    name, message = exception_parts(exc)
    return f"{name}: {message}" if message else name
