"""A corpus of odd and broken image files, generated from real photos, with the expected outcome.

Used by the decode unit tests and by the end-to-end classify tests, which check
the output row by row against ``Expected``.
"""

from __future__ import annotations

import dataclasses
import io
import os

import numpy as np
from PIL import Image


@dataclasses.dataclass(frozen=True)
class Expected:
    """What decoding a corpus file must give: a result (size, format) or an error type."""

    width: int | None = None
    height: int | None = None
    format: str | None = None
    error_type: str | None = None


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def build_corpus(photos: list[np.ndarray]) -> dict[str, tuple[bytes, Expected]]:
    """Relative path -> (file bytes, expected outcome)."""
    astronaut, coffee, chelsea, rocket = (Image.fromarray(p) for p in photos[:4])
    files: dict[str, tuple[bytes, Expected]] = {}

    def ok(path, data, image_size, fmt):
        files[path] = (data, Expected(width=image_size[0], height=image_size[1], format=fmt))

    def error(path, data, error_type):
        files[path] = (data, Expected(error_type=error_type))

    ok("formats/astronaut.jpg", _encode(astronaut, "JPEG", quality=90), astronaut.size, "JPEG")
    ok("formats/coffee.png", _encode(coffee, "PNG"), coffee.size, "PNG")
    ok("formats/chelsea.webp", _encode(chelsea, "WEBP"), chelsea.size, "WEBP")
    ok("formats/rocket.bmp", _encode(rocket, "BMP"), rocket.size, "BMP")
    ok("formats/rocket.tiff", _encode(rocket, "TIFF"), rocket.size, "TIFF")
    frames = [chelsea, chelsea.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    ok(
        "formats/animated.gif",
        _encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        chelsea.size,
        "GIF",
    )

    rgba = coffee.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(coffee.size))
    ok("modes/rgba.png", _encode(rgba, "PNG"), coffee.size, "PNG")
    ok("modes/la.png", _encode(astronaut.convert("LA"), "PNG"), astronaut.size, "PNG")
    palette = chelsea.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    ok("modes/palette_transparent.png", _encode(palette, "PNG", transparency=0), chelsea.size, "PNG")
    ok("modes/gray.jpg", _encode(astronaut.convert("L"), "JPEG"), astronaut.size, "JPEG")
    ok("modes/onebit.png", _encode(astronaut.convert("1"), "PNG"), astronaut.size, "PNG")
    ok("modes/cmyk.jpg", _encode(rocket.convert("CMYK"), "JPEG"), rocket.size, "JPEG")
    ok("modes/cmyk.tiff", _encode(rocket.convert("CMYK"), "TIFF"), rocket.size, "TIFF")
    gray16 = Image.fromarray(np.asarray(astronaut.convert("L"), dtype=np.uint16) * 257)
    ok("modes/gray16.png", _encode(gray16, "PNG"), astronaut.size, "PNG")
    gray_float = Image.fromarray(np.asarray(astronaut.convert("L"), dtype=np.float32) / 255.0, "F")
    ok("modes/float.tiff", _encode(gray_float, "TIFF"), astronaut.size, "TIFF")

    rotated = _encode(rocket.resize((64, 32)), "JPEG", exif=_exif_orientation(6))
    ok("exif/rotated_orientation_6.jpg", rotated, (32, 64), "JPEG")
    ok("sizes/one_pixel.png", _encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), (1, 1), "PNG")
    ok("sizes/very_wide.png", _encode(rocket.resize((4000, 3)), "PNG"), (4000, 3), "PNG")
    big = Image.new("RGB", (6000, 5000), (30, 90, 150))
    ok("sizes/huge_but_valid.png", _encode(big, "PNG"), big.size, "PNG")
    ok("nested/a/b/c/deep.jpg", _encode(chelsea, "JPEG"), chelsea.size, "JPEG")
    ok("names/unicode é ✓ and space.jpg", _encode(coffee, "JPEG"), coffee.size, "JPEG")

    jpeg = _encode(astronaut, "JPEG")
    error("broken/empty.jpg", b"", "EmptyFile")
    error("broken/text_named.jpg", b"this is a text file, not a JPEG\n" * 10, "NotAnImage")
    error("broken/truncated.jpg", jpeg[: len(jpeg) // 3], "CorruptImage")
    png = _encode(coffee, "PNG")
    error("broken/truncated.png", png[: len(png) // 2], "CorruptImage")
    error("broken/bomb.png", _encode(Image.new("1", (10_000, 10_000)), "PNG"), "DecompressionBomb")
    error("broken/netpbm.ppm", _encode(coffee, "PPM"), "UnsupportedFormat")
    # Damaged EXIF blocks on which Pillow raises neither OSError nor ValueError.
    for name, damage in EXIF_DAMAGE.items():
        error(f"broken/exif_{name}.jpg", damaged_exif_jpeg(astronaut, damage), "CorruptImage")
    return files


# Found by fuzzing: (offset from the "Exif" marker, new byte value) -> the exception Pillow raises.
EXIF_DAMAGE = {
    "struct_error": [(17, 17), (92, 100), (94, 209), (118, 145)],
    "type_error": [(17, 30)],
    "attribute_error": [(19, 11), (81, 27), (99, 24)],
}


def damaged_exif_jpeg(photo: Image.Image, damage: list[tuple[int, int]]) -> bytes:
    """A 64x64 JPEG of ``photo`` whose EXIF block (orientation, maker, date) has bytes overwritten."""
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "Maker"
    exif[0x8769] = {0x9003: "2020:01:01 00:00:00"}
    data = bytearray(_encode(photo.resize((64, 64)), "JPEG", exif=exif.tobytes()))
    start = data.index(b"Exif")
    for offset, value in damage:
        data[start + offset] = value
    return bytes(data)


def _exif_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def write_corpus(root: str, corpus: dict[str, tuple[bytes, Expected]]) -> dict[str, Expected]:
    """Writes the corpus under a local ``root``; returns absolute path -> expected."""
    expected = {}
    for relative, (data, outcome) in corpus.items():
        path = os.path.join(root, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        expected[path] = outcome
    return expected
