"""decode_image: every format and mode of the corpus, EXIF, scaling, limits and errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from beamvision.transforms.decode import DecodeError, decode_image, to_rgb

SIZE = 32


def test_every_corpus_file_decodes_or_fails_as_expected(corpus):
    for path, (data, expected) in corpus.items():
        if expected.error_type:
            with pytest.raises(DecodeError) as excinfo:
                decode_image(data, SIZE)
            assert excinfo.value.error_type == expected.error_type, path
            assert str(excinfo.value), path
        else:
            decoded = decode_image(data, SIZE)
            assert decoded.pixels.shape == (SIZE, SIZE, 3), path
            assert decoded.pixels.dtype == np.uint8, path
            assert (decoded.width, decoded.height, decoded.format) == (
                expected.width,
                expected.height,
                expected.format,
            ), path


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_alpha_is_composited_on_white():
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    image.putpixel((0, 0), (0, 0, 0, 0))
    rgb = np.asarray(to_rgb(image))
    assert tuple(rgb[0, 0]) == (255, 255, 255)
    assert tuple(rgb[1, 1]) == (255, 0, 0)


def test_sixteen_bit_is_scaled_not_clipped():
    values = np.array([[0, 257 * 128, 65535]], dtype=np.uint16)
    rgb = np.asarray(to_rgb(Image.fromarray(values)))
    assert rgb[0, :, 0].tolist() == [0, 128, 255]


def test_float_is_scaled_from_unit_range_or_its_own_range():
    unit = np.asarray(to_rgb(Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F")))
    assert unit[0, :, 0].tolist() == [0, 128, 255]
    wide = np.asarray(to_rgb(Image.fromarray(np.array([[-2.0, 0.0, 2.0]], np.float32), "F")))
    assert wide[0, :, 0].tolist() == [0, 128, 255]


def test_exif_orientation_is_applied(photos):
    upright = Image.fromarray(photos[3]).resize((48, 24))
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: viewers turn it 90 degrees clockwise
    upright.save(buffer, "PNG", exif=exif.tobytes())
    decoded = decode_image(buffer.getvalue(), 24)
    expected = np.asarray(upright.transpose(Image.Transpose.ROTATE_270).resize((24, 24), Image.BILINEAR))
    assert (decoded.width, decoded.height) == (24, 48)
    np.testing.assert_array_equal(decoded.pixels, expected)


def test_first_gif_frame_is_used(photos):
    first = Image.fromarray(photos[0]).resize((SIZE, SIZE))
    second = Image.new("RGB", (SIZE, SIZE), (0, 0, 0))
    buffer = io.BytesIO()
    first.save(buffer, "GIF", save_all=True, append_images=[second])
    decoded = decode_image(buffer.getvalue(), SIZE)
    assert decoded.pixels.mean() > 40  # the black second frame would be 0


def test_jpeg_draft_gives_nearly_the_full_decode(photos):
    """DCT-domain downscaling must not change what the model sees, beyond rounding."""
    large = Image.fromarray(photos[0]).resize((1600, 1200))
    buffer = io.BytesIO()
    large.save(buffer, "JPEG", quality=95)
    decoded = decode_image(buffer.getvalue(), 224)
    full = np.asarray(
        Image.open(io.BytesIO(buffer.getvalue())).convert("RGB").resize((224, 224), Image.BILINEAR)
    )
    assert (decoded.width, decoded.height) == (1600, 1200)
    assert np.abs(decoded.pixels.astype(int) - full.astype(int)).mean() < 3.0


def test_pixel_limit_is_a_parameter():
    data = _png(Image.new("RGB", (100, 100)))
    decode_image(data, SIZE, max_pixels=10_000)
    with pytest.raises(DecodeError, match="100x100 = 10,000 pixels exceeds the limit of 9,999"):
        decode_image(data, SIZE, max_pixels=9_999)


def test_resize_policy_squashes_the_whole_image():
    left_red_right_blue = Image.new("RGB", (200, 50), (255, 0, 0))
    left_red_right_blue.paste((0, 0, 255), (100, 0, 200, 50))
    pixels = decode_image(_png(left_red_right_blue), 10).pixels
    assert tuple(pixels[5, 0]) == (255, 0, 0)
    assert tuple(pixels[5, 9]) == (0, 0, 255)


@pytest.mark.parametrize(
    ("name", "raised"),
    [("struct_error", "error"), ("type_error", "TypeError"), ("attribute_error", "AttributeError")],
)
def test_any_exception_pillow_raises_on_damaged_data_is_a_corrupt_image(name, raised, photos):
    from corpus import EXIF_DAMAGE, damaged_exif_jpeg

    data = damaged_exif_jpeg(Image.fromarray(photos[0]), EXIF_DAMAGE[name])
    with pytest.raises(DecodeError) as excinfo:
        decode_image(data, SIZE)
    assert excinfo.value.error_type == "CorruptImage"
    assert f"{raised}: " in str(excinfo.value)
