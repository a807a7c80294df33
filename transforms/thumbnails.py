"""``MakeThumbnails``: image URIs (files, archive members, ``gs://``) to small JPEGs under a folder.

``thumbnail`` (a plain function) turns image bytes into a JPEG no larger than
``size`` on its longer side, EXIF orientation applied, any colour mode as RGB.
``MakeThumbnails`` reads the images as classify does (``ReadFiles``,
archive members, within ``--buffer_mb``) and writes each thumbnail as
``FOLDER/<thumbnail_name(uri)>``; an image that cannot be read or decoded
simply has no thumbnail (the review says so).
"""

from __future__ import annotations

import hashlib
import io

import apache_beam as beam
from PIL import Image, ImageOps

from beamvision import storage
from beamvision.transforms.archives import GroupArchives, SplitArchives
from beamvision.transforms.concurrency import DEFAULT_BUFFER_MB, MB, ThreadPoolDoFn
from beamvision.transforms.decode import DEFAULT_MAX_PIXELS, to_rgb
from beamvision.transforms.read import LookUpFiles, ReadFiles
from beamvision.transforms.rows import ImageFile


def thumbnail_name(uri: str) -> str:
    """The file name of a URI's thumbnail: a digest of the URI (names from outside never become paths)."""
    return hashlib.sha256(uri.encode("utf-8")).hexdigest()[:24] + ".jpg"


def thumbnail(data: bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """JPEG bytes of the image, fitted within ``size`` x ``size``.

    Raises:
        ValueError: the image has more than ``max_pixels`` pixels.
        Exception: Pillow's own, for data that is not a decodable image.
    """
    image = Image.open(io.BytesIO(data))
    if image.size[0] * image.size[1] > max_pixels:
        raise ValueError(f"{image.size[0]}x{image.size[1]} exceeds {max_pixels:,} pixels")
    image.draft("RGB", (size, size))  # JPEG: decode at 1/2, 1/4 or 1/8 scale
    image = to_rgb(ImageOps.exif_transpose(image))
    image.thumbnail((size, size), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=85)
    return out.getvalue()


class MakeThumbnails(beam.PTransform):
    """URIs to thumbnails written under ``folder``; yields the URIs that have one."""

    def __init__(self, folder: str, size: int, buffer_mb: int = DEFAULT_BUFFER_MB):
        super().__init__()
        self._folder = folder
        self._size = size
        self._buffer_bytes = buffer_mb * MB

    def expand(self, uris):
        split = uris | "ToFiles" >> beam.Map(ImageFile) | "SplitArchives" >> SplitArchives()
        found = split["files"] | "LookUpFiles" >> LookUpFiles()
        archives = split["archives"] | "GroupArchives" >> GroupArchives()
        requests = (found["files"], archives) | "FilesAndArchives" >> beam.Flatten()
        read = requests | "ReadFiles" >> ReadFiles(self._buffer_bytes)
        return (
            read["files"]
            | "Thumbnail"
            >> beam.ParDo(_ThumbnailFn(self._folder, self._size)).with_outputs("failed", main="made")
        ).made


class _ThumbnailFn(ThreadPoolDoFn):
    """Decodes, shrinks and writes on threads (Pillow and storage writes release the GIL)."""

    def __init__(self, folder: str, size: int):
        super().__init__(
            threads=4, depth=32, ok_counter="thumbnails_written", failed_counter="thumbnails_failed"
        )
        self._folder = folder
        self._size = size

    def cost(self, element) -> int:
        return len(element[1])

    def work(self, element) -> list:
        image_file, data = element
        try:
            jpeg = thumbnail(data, self._size)
        except Exception:  # no thumbnail; the review shows the row without one
            return [beam.pvalue.TaggedOutput("failed", image_file.uri)]
        storage.write_atomic(storage.join(self._folder, thumbnail_name(image_file.uri)), jpeg)
        return [image_file.uri]
