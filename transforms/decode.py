"""Image decoding: bytes in, uint8 pixels at model input size out, or a clear error.

``decode_image`` (a plain function) does the work; ``DecodeImages`` applies it
in a pipeline, on threads ahead of inference, sending failures to error rows.
``decode_image`` is the one decode-and-resize function of beamvision: the
training pipeline (``prepare``) and inference (``classify``) both call it, so
a model sees the same pixels in both.

Policy, in order:

1. Format allow-list: JPEG, PNG, GIF (first frame), WebP, BMP, TIFF. Empty,
   non-image and other formats are errors (``EmptyFile``, ``NotAnImage``,
   ``UnsupportedFormat``).
2. Pixel-count limit, checked from the header before any pixel is decoded, so
   a decompression bomb is an error (``DecompressionBomb``), not an OOM.
3. JPEG draft mode: the DCT decoder downscales by 1/2, 1/4 or 1/8 while it
   decodes, to the smallest scale still at least ``size`` on both sides.
4. EXIF orientation applied; ``width``/``height`` are reported after it, at
   full resolution.
5. Every colour mode to RGB: alpha (and palette transparency) composited on
   white; 16-bit and 32-bit integer images scaled from 0..65535 (or their own
   maximum, if larger), float images from 0..1 (or their own range, if
   outside it), never clipped; CMYK, YCbCr, LAB, palette and 1-bit converted.
6. Resize policy: the whole image is resized to ``size`` x ``size`` (the
   aspect ratio is not kept; nothing is cropped), with Pillow's antialiased
   bilinear filter.

Truncated or corrupt data is an error (``CorruptImage``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager

import apache_beam as beam
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from beamvision.transforms.concurrency import DEFAULT_BUFFER_MB, MB, PIXEL_BYTES, ThreadPoolDoFn
from beamvision.transforms.rows import ERRORS_TAG, ImageKey, error_row, exception_text
from beamvision.transforms.sizing import DEFAULT_SIZING, WorkerSizing

ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")

# Our own max_pixels check replaces Pillow's bomb warning. It is filtered once,
# here, because warnings.catch_warnings is not thread-safe and decode_image runs
# on the decode pool's threads.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
# Damaged EXIF ("Corrupt EXIF data", "Metadata Warning") either decodes or is a CorruptImage row.
warnings.filterwarnings("ignore", category=UserWarning, module="PIL.TiffImagePlugin")
# Pillow stores a large image in blocks (16 MB by default). glibc raises its mmap
# threshold up to 32 MB as such blocks are freed, after which they come from the
# heap and stay in the process's RSS. Blocks above 32 MB are always mapped and
# unmapped: a 7000x7000 scan's pixels leave when it is decoded (measured: 190 MB
# less peak RSS classifying scans among JPEGs).
Image.core.set_block_size(64 * MB)
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default bomb threshold (about 0.25 GB as RGBA).

# EXIF orientations 5..8 rotate by 90 or 270 degrees: width and height swap.
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION = 0x0112


class DecodeError(ValueError):
    """A file cannot be turned into pixels. ``error_type`` names the reason."""

    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type


@dataclasses.dataclass(frozen=True)
class DecodedImage:
    """Pixels at model input size plus what the original image was."""

    pixels: np.ndarray  # uint8 [size, size, 3]
    width: int  # original width after EXIF orientation
    height: int  # original height after EXIF orientation
    format: str  # "JPEG", "PNG", ...


def decode_image(
    data: bytes,
    size: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    hold_pixels: Callable[[int], AbstractContextManager] | None = None,
) -> DecodedImage:
    """Decodes image bytes to RGB uint8 pixels of ``size`` x ``size``.

    Args:
        data: the file's bytes.
        size: side of the square output, in pixels.
        max_pixels: largest width x height accepted.
        hold_pixels: given the bytes the full-resolution decode will take,
            a context manager that waits until they fit in a budget shared
            by the threads that decode, and holds them meanwhile.

    Returns:
        The decoded image (see the module docstring for the policy).

    Raises:
        DecodeError: the file is empty, not an image, of an unsupported format,
            too large, or corrupt; ``error_type`` says which.
    """
    if not data:
        raise DecodeError("EmptyFile", "file is empty")
    image = _open(data)
    file_format = image.format
    width, height = image.size
    if width * height > max_pixels:
        raise DecodeError(
            "DecompressionBomb",
            f"{width}x{height} = {width * height:,} pixels exceeds the limit of {max_pixels:,}",
        )
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
        if orientation in _TRANSPOSING_ORIENTATIONS:
            width, height = height, width
        if image.format == "JPEG":
            image.draft(image.mode if image.mode in ("L", "RGB") else None, (size, size))
        # Full-resolution pixels are the big allocation: wait for room in the budget, if any.
        copies = 2 if orientation != 1 else 1  # a transposed copy exists beside the decoded image
        with hold_pixels(copies * decoded_bytes(image)) if hold_pixels else contextlib.nullcontext():
            if orientation != 1:
                image = ImageOps.exif_transpose(image)  # (without an orientation it would copy the image)
            rgb = to_rgb(image)
            pixels = np.asarray(rgb.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)
    except MemoryError:
        raise DecodeError(
            "OutOfMemory", f"{width}x{height} {file_format} image did not fit in memory"
        ) from None
    except Exception as exc:  # Pillow raises many types on damaged data (struct.error, IndexError, ...)
        raise DecodeError("CorruptImage", f"cannot decode {file_format} data: {_describe(exc)}") from None
    return DecodedImage(pixels=pixels, width=width, height=height, format=file_format)


# Peak bytes per pixel of turning a mode into RGB (to_rgb): the decoded image, its
# conversions and temporaries. RGB is stored 4 bytes a pixel by Pillow.
_BYTES_PER_PIXEL = {"RGB": 4, "L": 5, "1": 5, "P": 5, "CMYK": 8, "YCbCr": 8, "LAB": 8}
_BYTES_PER_PIXEL_WITH_ALPHA = 20  # RGBA, LA, PA, palette transparency: copies composited on white
_BYTES_PER_PIXEL_WIDE = 26  # I, I;16, F: float64 temporaries while scaling to 8 bits


def decoded_bytes(image: Image.Image) -> int:
    """Peak memory of decoding an opened image at its (draft) size and converting it to RGB."""
    width, height = image.size
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        per_pixel = _BYTES_PER_PIXEL_WIDE
    elif "A" in image.mode or "a" in image.mode or "transparency" in image.info:
        per_pixel = _BYTES_PER_PIXEL_WITH_ALPHA
    else:
        per_pixel = _BYTES_PER_PIXEL.get(image.mode, 8)
    return width * height * per_pixel


def _describe(exc: Exception) -> str:
    """A Pillow exception as text: its OSError messages say enough, others need their type."""
    return str(exc) if isinstance(exc, OSError | SyntaxError | ValueError | EOFError) else exception_text(exc)


def _open(data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise DecodeError("DecompressionBomb", str(exc)) from None
    except UnidentifiedImageError:
        pass
    except Exception as exc:  # a damaged header: Pillow raises many types
        raise DecodeError("CorruptImage", f"cannot read image header: {_describe(exc)}") from None
    try:
        other = Image.open(io.BytesIO(data))
    except Exception:  # Pillow raises many types for arbitrary bytes.
        raise DecodeError("NotAnImage", "not a recognised image file") from None
    raise DecodeError(
        "UnsupportedFormat", f"{other.format} is not supported (allowed: {', '.join(ALLOWED_FORMATS)})"
    )


def to_rgb(image: Image.Image) -> Image.Image:
    """Converts any Pillow image mode to 8-bit RGB (see the module docstring)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return Image.fromarray(_scale_to_uint8(np.asarray(image))).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _scale_to_uint8(values: np.ndarray) -> np.ndarray:
    """Scales a single-channel integer or float image to 0..255 without clipping.

    Integers are taken as 16-bit (0..65535), floats as 0..1; values outside
    that nominal range scale by the image's own range instead.
    """
    nominal_high = 1.0 if values.dtype.kind == "f" else 65535.0
    values = values.astype(np.float64)
    low, high = float(np.min(values)), float(np.max(values))
    if low < 0 or high > nominal_high:
        scale_low, span = low, (high - low) or 1.0
    else:
        scale_low, span = 0.0, nominal_high
    return np.round((values - scale_low) / span * 255.0).astype(np.uint8)


class DecodeImages(beam.PTransform):
    """(ImageFile, bytes) to (ImageKey, uint8 pixels) at model input size; failures to error rows.

    Returns a dict of PCollections: ``images`` and ``errors``. Files waiting
    for or in decoding and their full-resolution pixels count against
    ``buffer_mb`` (with the reads, see ``concurrency.PROCESS_BYTES``); threads
    decode together only the images whose pixels fit in it. There are
    ``sizing``'s decode threads: the process's share of the machine's cores.
    """

    def __init__(
        self,
        size: int,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        buffer_mb: int = DEFAULT_BUFFER_MB,
        sizing: WorkerSizing = DEFAULT_SIZING,
    ):
        super().__init__()
        self._size = size
        self._max_pixels = max_pixels
        self._buffer_mb = buffer_mb
        self._sizing = sizing

    def expand(self, files):
        decode = _DecodeFn(self._size, self._max_pixels, self._buffer_mb * MB, self._sizing)
        decoded = files | "Decode" >> beam.ParDo(decode).with_outputs(ERRORS_TAG, main="images")
        return {"images": decoded.images, "errors": decoded[ERRORS_TAG]}


class _DecodeFn(ThreadPoolDoFn):
    """Decodes on the process's share of cores, ahead of inference (Pillow releases the GIL)."""

    def __init__(self, size: int, max_pixels: int, buffer_bytes: int, sizing: WorkerSizing):
        super().__init__(
            threads=functools.partial(sizing.threads, "decode"),
            depth=64,
            ok_counter="images_decoded",
            failed_counter="images_failed",
            release_when_done=True,  # a file's bytes are counted until its pixels are decoded
        )
        self._size = size
        self._max_pixels = max_pixels
        self._buffer_bytes = buffer_bytes

    def setup(self):
        super().setup()
        self._hold_pixels = functools.partial(PIXEL_BYTES.hold, limit=self._buffer_bytes)

    def cost(self, element) -> int:
        return len(element[1])

    def work(self, element) -> list:
        image_file, data = element
        try:
            image = decode_image(data, self._size, self._max_pixels, self._hold_pixels)
        except Exception as exc:  # every input ends in exactly one row, whatever the decoder throws
            error_type = exc.error_type if isinstance(exc, DecodeError) else type(exc).__name__
            return [
                beam.pvalue.TaggedOutput(
                    ERRORS_TAG,
                    error_row(
                        image_file.uri,
                        "decode",
                        error_type,
                        str(exc),
                        image_file.size_bytes,
                        image_file.modified,
                        image_file.sha256,
                    ),
                )
            ]
        key = ImageKey.of(image_file, image.width, image.height, image.format)
        return [(key, image.pixels)]
