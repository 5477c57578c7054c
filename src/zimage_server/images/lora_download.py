"""Adapters named by HTTPS URL (``ZIMAGE_LORA_ALLOW_URLS``): fetched once, in the API
process, before anything is billed.

A URL is judged like a webhook's (the same address policy and settings), resolved once
and connected to the address that was judged (``outbound``). Redirects are refused, not
followed: a redirect would name a host nobody judged. The body is read up to
``ZIMAGE_LORA_MAX_BYTES`` and no further, its safetensors header checked from the first
bytes (an HTML page is dropped at once) and in full before it is kept. Files are kept by
content hash (``blobs/<sha256>.safetensors``) and each URL's hash beside them
(``urls/<sha256 of the URL>``), so later requests, and renders after a restart, read the
disk: a URL is downloaded again only if its file was removed.

The files take at most ``ZIMAGE_LORA_DOWNLOAD_CACHE_BYTES``: after each download the least
recently used go (a file's mtime is its last use), never the one just fetched nor one a
render holds (``holding``: from the request's check until its image is made).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
import struct
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO

import certifi
import httpx

from zimage_server.core.config import Settings
from zimage_server.core.errors import InvalidRequest
from zimage_server.outbound import Destination, PinnedClient, Resolver
from zimage_server.outbound.policy import IPAddress

HEADER_LIMIT = 100_000_000  # safetensors' own bound on the JSON header
CHUNK = 1 << 16


class Refusal(Exception):
    """Why a URL gives no adapter; the catalog turns it into the request's 400."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class _Body:
    """What has come in so far: size, hash, and the first bytes until the header is read."""

    file: IO[bytes]
    hasher: hashlib._Hash
    size: int = 0
    head: bytes = b""
    header_ok: bool = False


class LoraDownloader:
    """Fetch-once cache of adapters by URL, shared by every request of one API process."""

    def __init__(self, settings: Settings) -> None:
        from zimage_server.jobs.webhooks import WebhookPolicy

        self.root = settings.lora_download_dir
        self.max_bytes = settings.lora_max_bytes
        self.cache_bytes = settings.lora_download_cache_bytes
        self.timeout_s = settings.lora_download_timeout_s
        self.policy = replace(WebhookPolicy.from_settings(settings), enabled=True)
        self.resolver = Resolver(settings.webhook_dns_servers, settings.lora_download_timeout_s)
        self.tls = ssl.create_default_context(cafile=certifi.where())
        if settings.lora_ca_file is not None:
            self.tls.load_verify_locations(settings.lora_ca_file)
        self._inflight: dict[str, asyncio.Future[Path]] = {}
        self._held: Counter[str] = Counter()  # URLs renders are using, and how many

    def cached(self, url: str) -> Path | None:
        """The file this URL was fetched into, if it is still on disk (marked as used now)."""
        digest = self._digest(url)
        if digest is None:
            return None
        blob = self.root / "blobs" / f"{digest}.safetensors"
        try:
            os.utime(blob)  # the eviction's recency
        except OSError:
            return None
        return blob

    def _digest(self, url: str) -> str | None:
        try:
            return (self.root / "urls" / _sha(url.encode())).read_text().strip()
        except OSError:
            return None

    @contextmanager
    def holding(self, urls: Iterable[str]) -> Iterator[None]:
        """While inside, these URLs' files are never evicted (a render reads them)."""
        urls = list(urls)
        self._held.update(urls)
        try:
            yield
        finally:
            self._held.subtract(urls)
            self._held += Counter()  # drop the zeros

    def evict(self, keep: str) -> list[Path]:
        """Least recently used files beyond the bound, except ``keep`` (a digest) and the
        held ones; what was removed."""
        held = {self._digest(url) for url in list(self._held)} | {keep}
        blobs = []
        for blob in (self.root / "blobs").glob("*.safetensors"):
            try:
                stat = blob.stat()
            except OSError:
                continue
            blobs.append((stat.st_mtime_ns, stat.st_size, blob))
        total = sum(size for _, size, _ in blobs)
        removed = []
        for _, size, blob in sorted(blobs):
            if total <= self.cache_bytes:
                break
            if blob.stem not in held:
                blob.unlink(missing_ok=True)
                total -= size
                removed.append(blob)
        return removed

    async def fetch(self, url: str) -> Path:
        """The URL's file, downloaded unless cached. Requests for a URL being fetched wait
        for that one download (which a caller's hang-up does not cancel); Refusal says
        why there is no file."""
        found = await asyncio.to_thread(self.cached, url)
        if found is not None:
            return found
        task = self._inflight.get(url)
        if task is None:
            task = asyncio.ensure_future(self._fetch_once(url))
            self._inflight[url] = task
            task.add_done_callback(lambda _: self._inflight.pop(url, None))
        return await asyncio.shield(task)

    async def _fetch_once(self, url: str) -> Path:
        try:
            async with asyncio.timeout(self.timeout_s):
                destination, addresses = await self._judged(url)
                client = PinnedClient(self.timeout_s, verify=self.tls)
                try:
                    return await self._first_answer(client, destination, addresses, url)
                finally:
                    await client.aclose()
        except TimeoutError:
            raise Refusal(
                f"was not fetched within {self.timeout_s:g} s (ZIMAGE_LORA_DOWNLOAD_TIMEOUT_S)"
            ) from None
        except httpx.HTTPError as exc:
            raise Refusal(f"could not be fetched ({type(exc).__name__})") from None

    async def _judged(self, url: str) -> tuple[Destination, list[IPAddress]]:
        """Resolved once, every address judged by the webhook address policy."""
        try:
            return await self.policy.resolve(url, self.resolver)
        except InvalidRequest as exc:
            raise Refusal("is refused: " + exc.message.split(": ", 1)[-1].rstrip(".")) from None

    async def _first_answer(
        self, client: PinnedClient, destination: Destination, addresses: list[IPAddress], url: str
    ) -> Path:
        """Each judged address in turn until one connects."""
        for address in addresses[:-1]:
            try:
                return await self._get(client, destination, address, url)
            except httpx.ConnectError:
                continue
        return await self._get(client, destination, addresses[-1], url)

    async def _get(
        self, client: PinnedClient, destination: Destination, address: IPAddress, url: str
    ) -> Path:
        headers = {"Accept-Encoding": "identity", "User-Agent": "zimage-server"}
        async with client.stream(destination, address, headers) as response:
            self._check_answer(response)
            folder = self.root / "tmp"
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, delete=False) as file:
                try:
                    body = _Body(file, hashlib.sha256())
                    async for chunk in response.aiter_raw(CHUNK):
                        self._take(body, chunk)
                    file.close()
                    return await asyncio.to_thread(self._keep, url, body)
                finally:
                    Path(file.name).unlink(missing_ok=True)

    def _check_answer(self, response: httpx.Response) -> None:
        status = response.status_code
        if response.is_redirect:
            raise Refusal(
                f"redirects elsewhere (HTTP {status}), and redirects are not followed: name "
                "the final URL"
            )
        if status != 200:
            raise Refusal(f"could not be fetched (HTTP {status})")
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise Refusal(f"is {declared} bytes; at most {self.max_bytes} (ZIMAGE_LORA_MAX_BYTES)")

    def _take(self, body: _Body, chunk: bytes) -> None:
        """Count, hash and write a chunk; stop at the size limit, or at a body that is not
        safetensors (8 bytes of header length, then the JSON header)."""
        body.size += len(chunk)
        if body.size > self.max_bytes:
            raise Refusal(f"is over {self.max_bytes} bytes (ZIMAGE_LORA_MAX_BYTES)")
        if not body.header_ok:
            body.head += chunk[:9]
            if len(body.head) >= 9:
                (length,) = struct.unpack("<Q", body.head[:8])
                if length > min(HEADER_LIMIT, self.max_bytes) or body.head[8:9] != b"{":
                    raise Refusal("is not a safetensors file (it does not start with a header)")
                body.header_ok = True
        body.hasher.update(chunk)
        body.file.write(chunk)

    def _keep(self, url: str, body: _Body) -> Path:
        """A whole, readable safetensors file moves to its hash; the URL notes the hash."""
        from safetensors import SafetensorError, safe_open

        temp = Path(body.file.name)
        try:
            with safe_open(str(temp), framework="numpy") as reader:
                reader.keys()
        except (SafetensorError, OSError, ValueError) as exc:
            raise Refusal(f"is not a valid safetensors file ({exc})") from None
        digest = body.hasher.hexdigest()
        blob = self.root / "blobs" / f"{digest}.safetensors"
        blob.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temp, blob)
        _write_atomic(self.root / "urls" / _sha(url.encode()), digest)
        self.evict(keep=digest)
        return blob


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    temp.write_text(text)
    os.replace(temp, path)
