"""Raw RGB from the worker to the bytes a client asked for (crop, then encode).

The encoder settings are the fastest that keep the requested quality, as measured by
``benchmarks/encode.py`` (``zimage_server.bench.encode`` states the rule): against the
old settings (Pillow's defaults), at most 5% larger and 0.3 dB lower PSNR at the same
quality, on a photo-like image at 1024x1024 and 256x256.

- WebP: method 2 from quality 70 to 99 (2-2.5x faster than method 4: 1024x1024 at q90 in
  ~60 ms instead of 125-165 ms on one core of the CI machine); method 4 elsewhere, where
  method 2 would cost more than 5% in size (below 70; at 100 libwebp's fast methods skip
  its size optimisations and grow files by a third).
- PNG: level 4 (the same size as the default 6 within 0.1%, 1.3-1.5x faster).
- JPEG: Pillow's defaults (4:2:0, no ``optimize``): ``optimize`` takes 2-3x the time to
  save 1-5%, and 4:4:4 is a larger file (+20-25%), not the same quality faster.

The call runs in a worker thread (Pillow's encoders release the GIL), never on the event
loop, and never in the GPU worker process.
"""

from __future__ import annotations

import io

from PIL import Image

MEDIA_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
WEBP_FAST_METHOD = 2  # libwebp: 0 fastest .. 6 smallest
WEBP_FAST_QUALITIES = range(70, 100)  # where method 2 stays close to method 4
WEBP_METHOD = 4  # Pillow's default, for the other qualities
PNG_COMPRESS_LEVEL = 4
JPEG_SUBSAMPLING = "4:2:0"


def round_up_16(pixels: int) -> int:
    """Z-Image renders in 16-pixel units; other sizes render larger and are cropped."""
    return -(-pixels // 16) * 16


def webp_method(quality: int) -> int:
    return WEBP_FAST_METHOD if quality in WEBP_FAST_QUALITIES else WEBP_METHOD


def encode_image(
    rgb: bytes | memoryview,
    render_size: tuple[int, int],
    size: tuple[int, int],
    image_format: str,
    quality: int,
) -> bytes:
    """Centre-crop a render to exactly ``size`` and encode it (``quality``: WebP and JPEG;
    PNG is lossless). ``rgb`` is read once, by ``frombytes``: it may be shared memory."""
    image = Image.frombytes("RGB", render_size, rgb)
    if render_size != size:
        left = (render_size[0] - size[0]) // 2
        top = (render_size[1] - size[1]) // 2
        image = image.crop((left, top, left + size[0], top + size[1]))
    buffer = io.BytesIO()
    if image_format == "webp":
        image.save(buffer, "WEBP", quality=quality, method=webp_method(quality))
    elif image_format == "jpeg":
        image.save(buffer, "JPEG", quality=quality, subsampling=JPEG_SUBSAMPLING)
    else:
        image.save(buffer, "PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


PREVIEW_QUALITY = 70  # a preview lives a fraction of a second: small beats faithful


def encode_preview(rgb: bytes, size: tuple[int, int]) -> bytes:
    """A step preview (raw RGB at preview size) as a small, fast WebP."""
    buffer = io.BytesIO()
    Image.frombytes("RGB", size, rgb).save(buffer, "WEBP", quality=PREVIEW_QUALITY, method=0)
    return buffer.getvalue()
