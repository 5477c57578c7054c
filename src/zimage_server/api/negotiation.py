"""Content negotiation for ``POST /v1/{model}``: the ``Accept`` header picks JSON or raw
bytes, and, when the body names no ``image_format``, which image format.

Rules (README "Raw bytes and the Accept header"):

- JSON or bytes: whichever of ``application/json`` and our image types ranks higher by
  q-value; a tie (no header, ``*/*``) goes to ``ZIMAGE_V1_DEFAULT_RESPONSE``; a header that
  allows neither answers bytes if it asks for some ``image/...`` type, JSON otherwise.
- The format of raw bytes: the body's ``image_format`` when it names one; else the
  header's best supported type (``image/*`` and ties keep the default, WebP).
- Never 406. Segmind's contract, its clients and our SDK read 406 as "insufficient
  credits", so an Accept that cannot be met is answered as RFC 9110 section 12.5.1 allows,
  with the format the body chose (or the default) and a truthful ``Content-Type``.

The header is parsed by python-mimeparse (q-values, specificity); a malformed header is
treated as absent, as a header the server may ignore.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import mimeparse  # type: ignore[import-untyped]

from zimage_server.images.encode import MEDIA_TYPES

JSON = "application/json"
DEFAULT_FORMAT = "webp"


@dataclass(frozen=True)
class Negotiated:
    raw: bool  # answer the image bytes rather than JSON
    image_format: str | None  # the format Accept chose; None leaves the body's (or default)


def negotiate(accept: str, default_response: str, body_names_format: bool) -> Negotiated:
    """What to answer for this ``Accept`` header (see the module docstring). Clients send
    the same few headers on every request, and parsing one costs ~0.1 ms: short ones are
    remembered (a bounded cache, so odd headers cannot grow it)."""
    if len(accept) <= _CACHED_LENGTH:
        return _negotiate_cached(accept, default_response, body_names_format)
    return _negotiate(accept, default_response, body_names_format)


_CACHED_LENGTH = 200


@lru_cache(maxsize=256)
def _negotiate_cached(accept: str, default_response: str, body_names_format: bool) -> Negotiated:
    return _negotiate(accept, default_response, body_names_format)


def _negotiate(accept: str, default_response: str, body_names_format: bool) -> Negotiated:
    accept = accept.lower()  # media types are case-insensitive; mimeparse compares as is
    if not _well_formed(accept):
        return Negotiated(default_response == "binary", None)
    raw = _wants_bytes(accept, default_response)
    if not raw or body_names_format:
        return Negotiated(raw, None)
    return Negotiated(True, _best_format(accept))


def _well_formed(accept: str) -> bool:
    """False for an absent or malformed header (both treated as no preference)."""
    try:
        return any(mimeparse.parse_media_range(p) for p in accept.split(",") if p.strip())
    except ValueError:  # mimeparse.MimeTypeParseException
        return False


def _wants_bytes(accept: str, default_response: str) -> bool:
    json_q = mimeparse.quality(JSON, accept)
    image_q = max(mimeparse.quality(media, accept) for media in MEDIA_TYPES.values())
    if json_q == image_q == 0:
        return any(part.strip().lower().startswith("image/") for part in accept.split(","))
    if json_q == image_q:
        return default_response == "binary"
    return bool(image_q > json_q)


def _best_format(accept: str) -> str | None:
    """The best supported image type, or None when the header allows none of them.
    ``best_match`` breaks ties in favour of the last candidate: the default goes last."""
    candidates = sorted(MEDIA_TYPES, key=lambda fmt: fmt == DEFAULT_FORMAT)
    best: str = mimeparse.best_match([MEDIA_TYPES[fmt] for fmt in candidates], accept)
    return next((fmt for fmt in candidates if MEDIA_TYPES[fmt] == best), None)
