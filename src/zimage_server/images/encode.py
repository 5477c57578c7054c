"""Raw RGB from the worker to the bytes a client asked for (crop, then encode)."""

from __future__ import annotations

import io

from PIL import Image

MEDIA_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
WEBP_METHOD = 4  # Pillow's default speed/size trade-off (0 fastest .. 6 smallest)


def round_up_16(pixels: int) -> int:
    """Z-Image renders in 16-pixel units; other sizes render larger and are cropped."""
    return -(-pixels // 16) * 16


def encode_image(
    rgb: bytes,
    render_size: tuple[int, int],
    size: tuple[int, int],
    image_format: str,
    quality: int,
) -> bytes:
    """Centre-crop a render to exactly ``size`` and encode it."""
    image = Image.frombytes("RGB", render_size, rgb)
    if render_size != size:
        left = (render_size[0] - size[0]) // 2
        top = (render_size[1] - size[1]) // 2
        image = image.crop((left, top, left + size[0], top + size[1]))
    buffer = io.BytesIO()
    if image_format == "webp":
        image.save(buffer, "WEBP", quality=quality, method=WEBP_METHOD)
    elif image_format == "jpeg":
        image.save(buffer, "JPEG", quality=quality)
    else:
        image.save(buffer, "PNG")
    return buffer.getvalue()
