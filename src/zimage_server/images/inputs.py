"""Input images from untrusted clients: fetched, bounded, decoded and brought to render size.

Everything here runs in the API process before anything is billed, and every refusal is
an ``InvalidRequest`` naming the field. The rules:

- Sources: an http(s) URL (fetched under the outbound address policy, no redirects, with a
  timeout and a byte limit while streaming), a ``data:`` URI, or raw base64.
- Bytes: at most ``input_max_bytes``; formats PNG, JPEG and WebP only (Pillow is told so,
  it never guesses among its other decoders).
- Pixels: at most ``input_max_pixels``, judged from the header before any decoding, so a
  decompression bomb costs nothing.
- EXIF orientation is applied; transparency is composited on white for the input image,
  and read as the mask where the caller's convention says so (OpenAI's).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import re
from dataclasses import dataclass
from typing import cast

import httpx
from PIL import Image, ImageOps, UnidentifiedImageError

from zimage_server.core.config import Settings
from zimage_server.core.errors import InvalidRequest
from zimage_server.outbound import AddressPolicy, Destination, PinnedClient, Resolver
from zimage_server.outbound.policy import IPAddress

FORMATS = ("PNG", "JPEG", "WEBP")
BACKGROUND = (255, 255, 255)  # what transparent pixels of an input image become
MIN_SIDE, MAX_SIDE = 256, 2048  # the output sizes a request may have
_DATA_URI = re.compile(r"^data:image/[a-z0-9.+-]+(?:;[^,;]*)*;base64,", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class InputLimits:
    max_bytes: int
    max_pixels: int

    @classmethod
    def from_settings(cls, settings: Settings) -> InputLimits:
        return cls(settings.input_max_bytes, settings.input_max_pixels)


@dataclass(frozen=True, slots=True)
class InputImages:
    """A request's images at render size, as the worker receives them: ``image`` and
    ``control`` are RGB uint8, ``mask`` is L uint8 (255 = repaint, 0 = keep); an image the
    request has not is empty. ``width`` x ``height`` is the output size (not rounded)."""

    width: int
    height: int
    image: bytes
    mask: bytes = b""
    control: bytes = b""


def _invalid(field: str, reason: str) -> InvalidRequest:
    return InvalidRequest(f"Invalid '{field}': {reason}.", field=field)


def decode_base64(value: str, field: str, limits: InputLimits) -> bytes:
    """A ``data:`` URI or raw base64 as bytes, refused before decoding when too long."""
    match = _DATA_URI.match(value)
    text = value[match.end() :] if match else value
    if len(text) > (limits.max_bytes + 2) // 3 * 4 + 4:
        raise _too_large(field, limits)
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise _invalid(
            field, "must be an http(s) URL, a data URI or base64 of a PNG, JPEG or WebP image"
        ) from None


def _too_large(field: str, limits: InputLimits) -> InvalidRequest:
    return _invalid(field, f"the image is larger than {limits.max_bytes} bytes")


def open_image(data: bytes, field: str, limits: InputLimits) -> Image.Image:
    """Decode untrusted bytes: allowed formats only, pixels judged from the header, EXIF
    orientation applied. The result is fully loaded (no file handle behind it)."""
    if len(data) > limits.max_bytes:
        raise _too_large(field, limits)
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError:  # Pillow's own bound, far above ours
        reason = f"the image has more than the {limits.max_pixels} pixels allowed"
        raise _invalid(field, reason) from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise _invalid(field, "not a PNG, JPEG or WebP image") from None
    width, height = image.size
    if width * height > limits.max_pixels:
        raise _invalid(
            field,
            f"the image has {width}x{height} pixels, more than the {limits.max_pixels} allowed",
        )
    try:
        image.load()
        return ImageOps.exif_transpose(image)
    except (Image.DecompressionBombError, OSError, SyntaxError, ValueError, EOFError):
        raise _invalid(field, f"the {image.format} image is damaged or truncated") from None


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info


def is_transparent(image: Image.Image) -> bool:
    """Whether any pixel is (mostly) transparent."""
    if not has_alpha(image):
        return False
    low, _high = cast(tuple[int, int], image.convert("RGBA").getchannel("A").getextrema())
    return low < 128


def to_rgb(image: Image.Image) -> Image.Image:
    """Transparent pixels become ``BACKGROUND``: a defined colour, not whatever the file
    stored under them."""
    if not has_alpha(image):
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def mask_from_luma(image: Image.Image) -> Image.Image:
    """Segmind's and fal's convention: white repaints, black keeps (threshold at half)."""
    gray = to_rgb(image).convert("L") if has_alpha(image) else image.convert("L")
    return gray.point(lambda v: 255 if v >= 128 else 0)


def mask_from_alpha(image: Image.Image, field: str) -> Image.Image:
    """OpenAI's convention: fully transparent pixels are edited, the rest kept."""
    if not has_alpha(image):
        raise _invalid(field, "the mask must have an alpha channel; transparent areas are edited")
    alpha = image.convert("RGBA").getchannel("A")
    return alpha.point(lambda v: 255 if v < 128 else 0)


def default_size(size: tuple[int, int]) -> tuple[int, int]:
    """The input's own size, scaled (keeping its shape) into the sides a request may have."""
    width, height = size
    scale = min(1.0, MAX_SIDE / max(width, height))
    scale = max(scale, MIN_SIDE / min(width, height))
    return (
        min(MAX_SIDE, max(MIN_SIDE, round(width * scale))),
        min(MAX_SIDE, max(MIN_SIDE, round(height * scale))),
    )


def to_render_size(
    image: Image.Image,
    mask: Image.Image | None,
    size: tuple[int, int],
    render_size: tuple[int, int],
    mask_field: str,
) -> InputImages:
    """Scale the image to cover ``render_size`` and centre-crop (as the output is cropped),
    the mask likewise; a mask must have the image's size (in either orientation: none)."""
    if mask is not None and mask.size != image.size:
        raise _invalid(
            mask_field,
            f"the mask is {mask.size[0]}x{mask.size[1]} but the image is "
            f"{image.size[0]}x{image.size[1]}; they must be the same size",
        )
    rgb = ImageOps.fit(image, render_size, Image.Resampling.LANCZOS)
    packed = b""
    if mask is not None:
        packed = ImageOps.fit(mask, render_size, Image.Resampling.NEAREST).tobytes()
    return InputImages(size[0], size[1], rgb.tobytes(), packed)


def fit_control(image: Image.Image, render_size: tuple[int, int]) -> Image.Image:
    """The control image scaled to cover ``render_size`` and centre-cropped, as the input
    image is (its own size need not match the input image's)."""
    return ImageOps.fit(image, render_size, Image.Resampling.LANCZOS)


class ImageFetcher:
    """GETs input image URLs: every address judged by the policy before connecting, the
    judged address connected to, no redirects, a deadline and a byte limit."""

    def __init__(self, settings: Settings, limits: InputLimits) -> None:
        self.limits = limits
        self.timeout_s = settings.input_fetch_timeout_s
        self.policy = AddressPolicy(False, tuple(settings.input_allowed_networks))
        self._dns_servers = tuple(settings.webhook_dns_servers)
        self._resolver: Resolver | None = None
        self._client: PinnedClient | None = None

    async def fetch(self, url: str, field: str) -> bytes:
        destination = Destination.parse(url, field)
        try:
            async with asyncio.timeout(self.timeout_s):
                addresses = await self._addresses(destination, field)
                return await self._get(destination, addresses[0], field)
        except TimeoutError:
            reason = f"the image URL did not answer within {self.timeout_s:g} s"
            raise _invalid(field, reason) from None

    async def _addresses(self, destination: Destination, field: str) -> list[IPAddress]:
        if destination.literal is not None:
            addresses = [destination.literal]
        else:
            if self._resolver is None:
                self._resolver = Resolver(self._dns_servers, self.timeout_s)
            addresses = await self._resolver.resolve(destination.host, field)
        refused = [str(a) for a in addresses if not self.policy.allows(a)]
        if refused:
            raise _invalid(
                field,
                f"{destination.host} is (or resolves to) a private or local address "
                f"({', '.join(refused)}) that the operator has not allowed "
                "(ZIMAGE_INPUT_ALLOWED_NETWORKS)",
            )
        return addresses

    async def _get(self, destination: Destination, address: IPAddress, field: str) -> bytes:
        if self._client is None:
            self._client = PinnedClient(self.timeout_s)
        try:
            status, body = await self._client.get(destination, address, self.limits.max_bytes)
        except httpx.HTTPError as exc:
            reason = f"the image URL could not be fetched ({type(exc).__name__})"
            raise _invalid(field, reason) from None
        if 300 <= status < 400:
            raise _invalid(
                field, f"the image URL redirects (HTTP {status}); give the image's final URL"
            )
        if status != 200:
            raise _invalid(field, f"the image URL answered HTTP {status}")
        if body is None:
            raise _too_large(field, self.limits)
        return body

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()


async def load_image(value: str, field: str, fetcher: ImageFetcher) -> Image.Image:
    """A request field's image, from whichever source it names, decoded off the loop."""
    if value.startswith(("http://", "https://")):
        data = await fetcher.fetch(value, field)
    else:
        data = await asyncio.to_thread(decode_base64, value, field, fetcher.limits)
    return await asyncio.to_thread(open_image, data, field, fetcher.limits)


def pack_png(raw: bytes, mode: str, size: tuple[int, int]) -> str | None:
    """Render-size pixels as a PNG data URI (lossless, a fraction of the raw bytes): how a
    v2 job keeps its decoded input images in its stored params. None for no image."""
    if not raw:
        return None
    buffer = io.BytesIO()
    Image.frombytes(mode, size, raw).save(buffer, "PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def unpack_png(value: str | None, mode: str, size: tuple[int, int], field: str) -> bytes:
    """``pack_png`` undone: the stored image's pixels, checked to be what was stored."""
    if value is None:
        return b""
    data = base64.b64decode(value.removeprefix("data:image/png;base64,"))
    with Image.open(io.BytesIO(data), formats=("PNG",)) as image:
        if image.mode != mode or image.size != size:
            raise _invalid(field, f"the stored image is not {mode} at {size[0]}x{size[1]}")
        return image.tobytes()
