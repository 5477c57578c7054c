"""LoRA adapters named by HTTPS URL, through the real server, over real sockets on loopback.

A file server on 127.0.0.2 speaks TLS with a certificate from a test CA (trusted through
``ZIMAGE_LORA_CA_FILE``) for ``lora.test``, which a scripted name server resolves.
127.0.0.2 is allowed the way webhook receivers are (``ZIMAGE_WEBHOOK_ALLOWED_NETWORKS``);
``evil.test`` resolves to 127.0.0.3, which is not. Every refusal is a 400 naming
``loras[0].path`` and why, and costs nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import trustme
from safetensors.numpy import save

from tests.conftest import ADMIN, InProcessServer, create_key, shared_tiny_model
from tests.e2e.test_loras import balance, image, post
from tests.fakedns import FakeDns
from tests.loras import ATTENTION, adapter_weights, save_diffusers
from zimage_server.core.config import Settings
from zimage_server.images.lora_download import LoraDownloader

MAX_BYTES = 256 * 1024
OFFERED = 64 * 2**20  # what the oversized file would send if nobody stopped reading
Route = Callable[[BaseHTTPRequestHandler], None]
# Three small safetensors files, different bytes, the same size: the cache's test.
SMALL = {f"/cache-{i}.safetensors": save({"w": np.full(1024, i, np.float32)}) for i in range(3)}


class FileServer:
    """HTTPS on 127.0.0.2: ``routes[path]`` answers; ``hits`` counts requests per path and
    ``sent`` the body bytes an endless answer got out before the client hung up."""

    def __init__(self, tls: ssl.SSLContext, routes: dict[str, Route]) -> None:
        self.hits: Counter[str] = Counter()
        self.sent: dict[str, int] = {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.hits[self.path] += 1
                routes.get(self.path, lambda h: h.send_error(404))(self)

            def log_message(self, *_args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.2", 0), Handler)
        self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str, host: str = "lora.test") -> str:
        return f"https://{host}:{self.port}{path}"


def file_route(data: bytes) -> Route:
    def answer(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    return answer


def endless_route(server: Callable[[], FileServer], path: str) -> Route:
    """A safetensors-looking start, then zeros with no Content-Length, until hung up on."""

    def answer(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.end_headers()
        sent, chunk = 0, struct.pack("<Q", 2) + b"{}" + bytes(65526)
        try:
            while sent < OFFERED:
                handler.wfile.write(chunk)
                sent += len(chunk)
                chunk = bytes(65536)
        except OSError:
            pass
        server().sent[path] = sent

    return answer


def status_route(status: int, headers: dict[str, str], body: bytes = b"") -> Route:
    def answer(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        for name, value in headers.items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(body)

    return answer


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    weights = adapter_weights(shared_tiny_model(), ATTENTION, rank=4, seed=1)
    return save_diffusers(weights, tmp_path_factory.mktemp("installed") / "style-a")


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def files(ca: trustme.CA, adapter: Path) -> Iterator[FileServer]:
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("lora.test", "evil.test").configure_cert(tls)
    holder: list[FileServer] = []
    html = b"<!DOCTYPE html><html><body>Sign in to download</body></html>"
    routes: dict[str, Route] = {
        "/style-a.safetensors": file_route(adapter.read_bytes()),
        "/huge.safetensors": endless_route(lambda: holder[0], "/huge.safetensors"),
        "/declared.safetensors": status_route(200, {"Content-Length": str(MAX_BYTES + 1)}),
        "/page.safetensors": file_route(html),
        "/moved.safetensors": status_route(302, {"Location": "/style-a.safetensors"}),
        **{path: file_route(data) for path, data in SMALL.items()},
    }
    holder.append(FileServer(tls, routes))
    yield holder[0]
    holder[0].httpd.shutdown()
    holder[0].httpd.server_close()


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, ca: trustme.CA, adapter: Path
) -> Iterator[InProcessServer]:
    dns = FakeDns()
    dns.records["lora.test"] = [["127.0.0.2"]]
    dns.records["evil.test"] = [["127.0.0.3"]]
    folder = tmp_path_factory.mktemp("lora-urls")
    ca_file = folder / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    env = {
        "ZIMAGE_AUTH": "true",
        "ZIMAGE_ADMIN_TOKEN": ADMIN,
        "ZIMAGE_LORA_DIR": str(adapter.parent.parent),
        "ZIMAGE_LORA_ALLOW_URLS": "true",
        "ZIMAGE_LORA_MAX_BYTES": str(MAX_BYTES),
        "ZIMAGE_LORA_CA_FILE": str(ca_file),
        "ZIMAGE_LORA_DOWNLOAD_TIMEOUT_S": "10",
        "ZIMAGE_WEBHOOK_ALLOWED_NETWORKS": '["127.0.0.2/32"]',
        "ZIMAGE_WEBHOOK_DNS_SERVERS": json.dumps([dns.address]),
    }
    live = InProcessServer(folder / "data", env=env)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def key(server: InProcessServer) -> str:
    return create_key(server, ADMIN, credits=100)


def test_a_url_is_fetched_once_and_renders_like_the_installed_file(
    server: InProcessServer, files: FileServer, key: str, adapter: Path
) -> None:
    url = files.url("/style-a.safetensors")
    plain = image(post(server, key))
    installed = image(post(server, key, loras=[{"path": "style-a"}]))
    first = post(server, key, loras=[{"path": url}])
    fetched = image(first)
    assert float(first.headers["x-credits-consumed"]) > 0
    again = image(post(server, key, loras=[{"path": url, "scale": 1}]))

    assert files.hits["/style-a.safetensors"] == 1  # the second request read the disk
    assert np.abs(fetched - plain).max() > 8
    assert np.abs(fetched - installed).max() <= 1 and np.array_equal(again, fetched)
    digest = hashlib.sha256(adapter.read_bytes()).hexdigest()
    assert (server.data_dir / "lora-downloads" / "blobs" / f"{digest}.safetensors").is_file()


@pytest.mark.parametrize(
    ("path", "host", "says"),
    [
        ("/huge.safetensors", "lora.test", f"is over {MAX_BYTES} bytes (ZIMAGE_LORA_MAX_BYTES)"),
        ("/declared.safetensors", "lora.test", f"is {MAX_BYTES + 1} bytes; at most {MAX_BYTES}"),
        ("/page.safetensors", "lora.test", "is not a safetensors file"),
        ("/moved.safetensors", "lora.test", "redirects elsewhere (HTTP 302)"),
        ("/gone.safetensors", "lora.test", "could not be fetched (HTTP 404)"),
        ("/style-a.safetensors", "evil.test", "private or local address (127.0.0.3)"),
        ("/style-a.safetensors", "127.0.0.1", "is refused: 127.0.0.1 is (or resolves to)"),
        ("/style-a.safetensors", "nowhere.test", "cannot resolve host 'nowhere.test'"),
    ],
)
def test_a_bad_url_is_a_400_naming_it_and_costs_nothing(
    server: InProcessServer, files: FileServer, key: str, path: str, host: str, says: str
) -> None:
    before, hits = balance(server, key), files.hits["/style-a.safetensors"]
    r = post(server, key, loras=[{"path": files.url(path, host)}])
    assert r.status_code == 400, r.text
    assert says in r.text and "Invalid 'loras[0].path'" in r.text, r.text
    assert balance(server, key) == before
    assert files.hits["/style-a.safetensors"] == hits  # a redirect was never followed


def test_an_oversized_body_is_not_read_to_its_end(files: FileServer) -> None:
    deadline = time.monotonic() + 10
    while "/huge.safetensors" not in files.sent:
        assert time.monotonic() < deadline, "the file server is still sending"
        time.sleep(0.05)
    # The limit, plus what the sockets' buffers took in before the client hung up.
    assert files.sent["/huge.safetensors"] < OFFERED // 4  # about 10 MiB on Linux


def test_v2_and_openai_fetch_before_billing(
    server: InProcessServer, files: FileServer, key: str
) -> None:
    before = balance(server, key)
    body = {"prompt": "a cat", "loras": [{"path": files.url("/page.safetensors")}]}
    v2 = server.post(body, "/v2/z-image-turbo", headers={"x-api-key": key})
    openai = server.post(body, "/v1/images/generations", headers={"x-api-key": key})
    for r in (v2, openai):
        assert r.status_code == 400 and "is not a safetensors file" in r.text, r.text
    assert openai.json()["error"]["param"] == "loras"
    assert balance(server, key) == before


def test_the_download_cache_evicts_the_least_recently_used_never_a_held_file(
    files: FileServer, ca: trustme.CA, tmp_path: Path
) -> None:
    """The downloader alone, against the same HTTPS file server, bounded to 2.5 files."""
    dns = FakeDns()
    dns.records["lora.test"] = [["127.0.0.2"]]
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    size = len(SMALL["/cache-0.safetensors"])
    settings = Settings(
        data_dir=tmp_path,
        lora_allow_urls=True,
        lora_ca_file=tmp_path / "ca.pem",
        lora_download_cache_bytes=size * 5 // 2,
        webhook_allowed_networks=["127.0.0.2/32"],
        webhook_dns_servers=[dns.address],
    )
    downloads = LoraDownloader(settings)
    one, two, three = (files.url(path) for path in SMALL)
    blob = {
        url: downloads.root / "blobs" / f"{hashlib.sha256(data).hexdigest()}.safetensors"
        for url, data in zip((one, two, three), SMALL.values(), strict=True)
    }

    def kept() -> set[str]:
        return {url for url, path in blob.items() if path.is_file()}

    async def scenario() -> None:
        await downloads.fetch(one)
        await downloads.fetch(two)
        await downloads.fetch(one)  # read from disk: now the most recently used
        await downloads.fetch(three)  # over the bound: the least recently used goes
        assert kept() == {one, three}
        with downloads.holding([one]):  # a render reads it: never evicted
            await downloads.fetch(two)  # downloaded again; 'one' is older but held
            assert kept() == {one, two}
        downloads.cache_bytes = 1  # smaller than any file: the newest alone stays
        await downloads.fetch(three)
        assert kept() == {three}

    asyncio.run(scenario())
    assert files.hits["/cache-1.safetensors"] == 2 and files.hits["/cache-2.safetensors"] == 2
    assert files.hits["/cache-0.safetensors"] == 1


def test_a_request_holds_its_downloads_while_it_fetches_the_next(
    server: InProcessServer, files: FileServer, key: str
) -> None:
    """With a cache bound below one file, fetching a request's second adapter must not
    evict its first (before: a false 400 saying the first had not been downloaded)."""
    downloads = server.app.state.generation.loras.downloads
    bound, downloads.cache_bytes = downloads.cache_bytes, 1
    try:
        before = balance(server, key)
        loras = [
            {"path": files.url("/style-a.safetensors")},
            {"path": files.url("/cache-1.safetensors")},
        ]
        r = post(server, key, loras=loras)
    finally:
        downloads.cache_bytes = bound
    assert "has not been downloaded" not in r.text, r.text
    # Both were on disk at the check; the second is no adapter of this model's layers.
    assert r.status_code == 400 and "loras" in r.text, r.text
    assert balance(server, key) == before
