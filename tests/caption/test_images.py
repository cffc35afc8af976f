"""Image decoding: awkward but valid images become correct RGB, broken ones a clear error."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from recaption.images import ImageDecodeError, decode_image


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def test_grayscale_becomes_gray_rgb() -> None:
    gray = Image.new("L", (20, 10), 77)
    out = decode_image(_png(gray))
    assert out.mode == "RGB" and out.size == (20, 10)
    assert np.asarray(out)[3, 3].tolist() == [77, 77, 77]


def test_rgba_transparent_pixels_become_white_and_opaque_keep_colour() -> None:
    image = Image.new("RGBA", (20, 10), (10, 200, 30, 255))
    image.putpixel((0, 0), (10, 200, 30, 0))
    out = np.asarray(decode_image(_png(image)))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[5, 5].tolist() == [10, 200, 30]


def test_palette_png_with_transparency_is_composited_on_white() -> None:
    image = Image.new("P", (20, 10), 1)
    image.putpalette([0, 0, 0, 250, 10, 10] + [0] * 762)
    image.putpixel((2, 2), 0)
    image.info["transparency"] = 0
    out = np.asarray(decode_image(_png(image)))
    assert out[2, 2].tolist() == [255, 255, 255]
    assert out[5, 5].tolist() == [250, 10, 10]


def test_16bit_png_is_scaled_not_clipped() -> None:
    ramp = np.array([[0, 32768, 65535] * 4] * 12, dtype=np.uint16)
    out = np.asarray(decode_image(_png(Image.fromarray(ramp))))
    assert out[0, :3, 0].tolist() == [0, 128, 255]


def test_cmyk_jpeg_keeps_its_colours() -> None:
    rgb = Image.new("RGB", (24, 16), (200, 30, 40))
    data = _jpeg(rgb.convert("CMYK"))
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = np.asarray(decode_image(data)).astype(int)
    assert np.abs(out[8, 8] - [200, 30, 40]).max() <= 6


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty image file"),
        (b"<html>404 Not Found</html>", "not a readable image"),
        (b"\xff\xd8\xff\xe0 truncated", "corrupt image data"),
        (_jpeg(Image.new("RGB", (64, 64), (1, 2, 3)))[:150], "corrupt image data"),
        (_png(Image.new("RGB", (1, 40))), "too small"),
        (_png(Image.new("RGB", (40, 3))), "too small"),
    ],
)
def test_broken_images_raise_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(ImageDecodeError, match=reason):
        decode_image(data)


def test_decompression_bomb_is_refused_from_the_header() -> None:
    small_file = _png(Image.new("1", (3000, 2000)))
    assert len(small_file) < 50_000
    with pytest.raises(ImageDecodeError, match="max_image_pixels=5000000"):
        decode_image(small_file, max_pixels=5_000_000)
    assert decode_image(small_file, max_pixels=6_000_000).size == (3000, 2000)
