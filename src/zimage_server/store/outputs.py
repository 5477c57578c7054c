"""Generated images, served by unguessable id until their TTL runs out: in a local (or
shared) folder by default, or in an S3-compatible bucket (``store/buckets.py``).

Ids are 192 random bits (``secrets.token_urlsafe``) plus the format extension; anything
else is refused before touching the filesystem, so path tricks cannot escape the folder.
"""

from __future__ import annotations

import errno
import math
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from zimage_server.core.errors import InsufficientStorage, OutputNotFound

_ID = re.compile(r"^[A-Za-z0-9_-]{32}\.(webp|png|jpeg)$")
SPACE_RECHECK_S = 1.0  # a free-space reading that found room is trusted this long


@dataclass(frozen=True)
class Stored:
    """An output to send: a local file, or chunks streamed from a bucket."""

    media_type: str
    path: Path | None = None
    chunks: Iterator[bytes] | None = None
    size: int | None = None


def media_type_of(output_id: str) -> str:
    return {"webp": "image/webp", "png": "image/png", "jpeg": "image/jpeg"}[
        output_id.rsplit(".", 1)[1]
    ]


def check_id(output_id: str) -> None:
    if not _ID.match(output_id):
        raise OutputNotFound(f"No output named '{output_id[:80]}'.")


class Outputs(Protocol):
    """Where images go: ``OutputStore`` (a folder) or ``BucketStore`` (S3)."""

    ttl_s: int

    def room_recently_seen(self) -> bool: ...

    def check_space(self) -> None: ...

    def save(self, data: bytes, image_format: str) -> str: ...

    def read(self, output_id: str) -> bytes: ...

    def open(self, output_id: str) -> Stored: ...

    def url(self, output_id: str, base_url: str) -> str:
        """The image URL a client is given (``base_url``: this API's public base)."""
        ...

    def sweep(self) -> int: ...


class OutputStore:
    """``clock`` (wall time) says when an output has expired; tests move it instead of
    waiting out the TTL."""

    def __init__(
        self,
        folder: Path,
        ttl_s: int,
        min_free_bytes: int = 0,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.folder = folder
        self.ttl_s = ttl_s
        self.min_free_bytes = min_free_bytes
        self.clock = clock
        self._room_seen_at = -math.inf
        folder.mkdir(parents=True, exist_ok=True)

    def room_recently_seen(self) -> bool:
        """True when a check under ``SPACE_RECHECK_S`` ago found room: callers may skip
        the next one (a thread hop per request). A full disk is checked every time, so
        the 507s stop as soon as space is freed; ``save`` still turns ENOSPC into 507."""
        return time.monotonic() - self._room_seen_at < SPACE_RECHECK_S

    def check_space(self) -> None:
        """Refuse new work before rendering when the disk is (nearly) full."""
        free = shutil.disk_usage(self.folder).free
        if free < self.min_free_bytes:
            raise InsufficientStorage(
                f"The output disk is full ({free // 2**20} MiB free, "
                f"{self.min_free_bytes // 2**20} MiB required); nothing was charged."
            )
        self._room_seen_at = time.monotonic()

    def save(self, data: bytes, image_format: str) -> str:
        output_id = f"{secrets.token_urlsafe(24)}.{image_format}"
        tmp = self.folder / f".{output_id}.tmp"
        try:
            tmp.write_bytes(data)
            os.replace(tmp, self.folder / output_id)  # readers never see a partial file
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise InsufficientStorage("The output disk is full; nothing was charged.") from exc
            raise
        return output_id

    def path(self, output_id: str) -> Path:
        """The file for ``output_id``; raises ``OutputNotFound`` if unknown or expired."""
        check_id(output_id)
        path = self.folder / output_id
        try:
            age = self.clock() - path.stat().st_mtime
        except FileNotFoundError:
            raise OutputNotFound(
                f"No output named '{output_id}': it never existed or has expired "
                f"(outputs are kept for {self.ttl_s} s)."
            ) from None
        if age > self.ttl_s:
            path.unlink(missing_ok=True)
            raise OutputNotFound(
                f"Output '{output_id}' has expired (outputs are kept for {self.ttl_s} s)."
            )
        return path

    def read(self, output_id: str) -> bytes:
        return self.path(output_id).read_bytes()

    def open(self, output_id: str) -> Stored:
        path = self.path(output_id)  # checks the id first
        return Stored(media_type_of(output_id), path=path)

    def url(self, output_id: str, base_url: str) -> str:
        return f"{base_url}/v1/outputs/{output_id}"

    def sweep(self) -> int:
        """Delete expired outputs; returns how many were removed."""
        cutoff = self.clock() - self.ttl_s
        removed = 0
        for path in self.folder.iterdir():
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed
