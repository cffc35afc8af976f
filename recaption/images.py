"""Decoding downloaded images for a model, with guards against the bad ones found on the web.

:func:`decode_image` turns the bytes of one webdataset image member into an 8-bit RGB
``PIL.Image`` or raises :class:`ImageDecodeError` with a reason a user can act on. It

- refuses empty files, bytes no decoder recognises and data that fails mid-decode;
- refuses images whose header announces more than ``max_pixels`` pixels *before* decoding
  them (a decompression bomb: a few kB that expand to gigabytes);
- refuses degenerate images with a side shorter than ``min_side`` pixels;
- decodes a JPEG straight at a reduced scale (1/2, 1/4, 1/8) when the model needs far fewer
  pixels than the file has (``draft_size``), which is several times faster than decoding in
  full and resizing;
- converts everything else to RGB the way a viewer would show it: grayscale and 1-bit to gray
  RGB, 16-bit to 8-bit by scaling (not clipping), CMYK through PIL's colour conversion,
  palette and alpha images composited on white, EXIF rotation applied.
"""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tiff", "tif")

# PIL's own bomb threshold (about 89.5 megapixels), checked from the header before decoding.
DEFAULT_MAX_PIXELS = 89_478_485
DEFAULT_MIN_SIDE = 8

_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError)


class ImageDecodeError(ValueError):
    """An image member that cannot be captioned; ``str(error)`` says why."""


def _to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB view of any PIL mode (see the module docstring for the rules)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16-bit (or 32-bit) gray: scale the sample range to 0..255 instead of clipping it.
        array = np.asarray(image)
        if mode == "F":
            top = 1.0 if float(array.max(initial=0.0)) <= 1.0 else 255.0
        else:
            top = 65535.0 if int(array.max(initial=0)) > 255 or "16" in mode else 255.0
        gray = np.clip(np.rint(array.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(
    data: bytes,
    *,
    min_side: int = DEFAULT_MIN_SIDE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
) -> Image.Image:
    """Decode image bytes to an 8-bit RGB image, or raise :class:`ImageDecodeError` saying why.

    With ``draft_size``, a JPEG may be decoded at a reduced scale that keeps both sides at
    least ``draft_size`` pixels (the size the model's image processor resizes to anyway).
    """
    if not data:
        raise ImageDecodeError("empty image file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # We apply our own size limit below, from the header, before any pixel is decoded.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    f"image too large: {width}x{height} = {width * height} pixels is over "
                    f"caption.max_image_pixels={max_pixels} (decompression-bomb guard)"
                )
            if min(width, height) < min_side:
                raise ImageDecodeError(
                    f"image too small: {width}x{height}, a side is shorter than "
                    f"caption.min_image_side={min_side} pixels"
                )
            if draft_size and image.format == "JPEG":
                image.draft(None, (draft_size, draft_size))
            image.load()
            image = ImageOps.exif_transpose(image) or image
            return _to_rgb(image)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError(
            f"not a readable image ({len(data)} bytes; starts with {data[:8]!r})"
        ) from None
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"image too large (decompression-bomb guard): {exc}") from None
    except MemoryError:
        raise ImageDecodeError("image too large to decode in memory") from None
    except _DECODE_ERRORS as exc:
        raise ImageDecodeError(f"corrupt image data: {type(exc).__name__}: {exc}") from None
