"""Webhook delivery against hostile DNS and receivers, over real sockets on loopback only.

A name server on 127.0.0.1 that the test scripts (``FakeDns``: answers per query, delays)
stands in for the internet's DNS; the server is pointed at it by
``ZIMAGE_WEBHOOK_DNS_SERVERS``. ``ZIMAGE_WEBHOOK_ALLOWED_NETWORKS`` allows 127.0.0.2 and
nothing else, so 127.0.0.3 plays the internal service an attacker wants to reach: a
receiver listens there too, and must never hear from us. Figures go to
``artifacts/webhook-delivery.json``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import requests
import trustme

from tests.conftest import ROOT, InProcessServer, create_key
from tests.fakedns import FakeDns
from zimage_server.outbound import Destination, PinnedClient

ADMIN = "hooks-admin"
SECRET = "hooks-secret"
TIMEOUT_S = 2.0  # ZIMAGE_WEBHOOK_TIMEOUT_S: one attempt, resolution included
JOB = {"prompt": "a hooked fox", "width": 256, "height": 256, "steps": 1}
FIGURES: dict[str, Any] = {}


class Receiver:
    """An HTTP(S) receiver on ``host:port`` that answers 200 and notes when and what it
    got."""

    def __init__(self, host: str, port: int = 0, tls: ssl.SSLContext | None = None) -> None:
        self.received: list[tuple[float, dict[str, str], bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.received.append((time.monotonic(), dict(self.headers), body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *_args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class Tarpit:
    """Accepts, reads the request, then answers one byte of a status line every 0.2 s,
    forever: no read timeout ever fires, only a total one can end the attempt."""

    def __init__(self, host: str) -> None:
        self.sock = socket.create_server((host, 0))
        self.port = self.sock.getsockname()[1]
        self.open = self.max_open = self.accepted = 0
        self.held: list[float] = []  # seconds each connection was held open by the client
        self._lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._hold, args=(conn,), daemon=True).start()

    def _hold(self, conn: socket.socket) -> None:
        start = time.monotonic()
        with self._lock:
            self.open += 1
            self.accepted += 1
            self.max_open = max(self.max_open, self.open)
        try:
            conn.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\n" * 1000:
                conn.sendall(bytes([byte]))
                readable, _, _ = select.select([conn], [], [], 0.2)
                if readable and not conn.recv(1):  # the client hung up
                    break
        except OSError:
            pass
        finally:
            conn.close()
            with self._lock:
                self.open -= 1
                self.held.append(time.monotonic() - start)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def fake_dns() -> FakeDns:
    return FakeDns()


@pytest.fixture(scope="module")
def hooks(tmp_path_factory: pytest.TempPathFactory, fake_dns: FakeDns) -> Iterator[InProcessServer]:
    server = InProcessServer(
        tmp_path_factory.mktemp("hooks"),
        env={
            "ZIMAGE_MODEL": "null",
            "ZIMAGE_AUTH": "true",
            "ZIMAGE_ADMIN_TOKEN": ADMIN,
            "ZIMAGE_WEBHOOK_SECRET": SECRET,
            "ZIMAGE_WEBHOOK_DNS_SERVERS": json.dumps([fake_dns.address]),
            "ZIMAGE_WEBHOOK_ALLOWED_NETWORKS": '["127.0.0.2/32"]',
            "ZIMAGE_WEBHOOK_TIMEOUT_S": str(TIMEOUT_S),
            "ZIMAGE_WEBHOOK_BACKOFF_S": "0.2",
            "ZIMAGE_WEBHOOK_MAX_IN_FLIGHT_PER_KEY": "2",
            "ZIMAGE_DEFAULT_MAX_IN_FLIGHT": "64",
            "ZIMAGE_DEFAULT_RATE_LIMIT": "1000/minute",
            "ZIMAGE_MAX_QUEUE": "64",
        },
    )
    yield server
    server.stop()
    (ROOT / "artifacts").mkdir(exist_ok=True)
    out = ROOT / "artifacts" / "webhook-delivery.json"
    out.write_text(json.dumps(FIGURES, indent=2, sort_keys=True) + "\n")


def submit(server: InProcessServer, key: str, webhook_url: str) -> requests.Response:
    return requests.post(
        server.url + "/v2/z-image-turbo",
        json={**JOB, "webhook_url": webhook_url},
        headers={"x-api-key": key},
        timeout=30,
    )


def wait_for(condition: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def twin_receivers() -> tuple[Receiver, Receiver]:
    """The allowed receiver on 127.0.0.2 and the forbidden one on 127.0.0.3, one port."""
    allowed = Receiver("127.0.0.2")
    return allowed, Receiver("127.0.0.3", allowed.port)


def test_a_rebinding_name_is_connected_to_where_it_was_judged(
    hooks: InProcessServer, fake_dns: FakeDns
) -> None:
    allowed, forbidden = twin_receivers()
    fake_dns.records["rebind.test"] = [["127.0.0.2"], ["127.0.0.3"]]  # judged, then switched
    fake_dns.records["rebind-back.test"] = [["127.0.0.3"], ["127.0.0.2"]]
    key = create_key(hooks, ADMIN)
    try:
        assert submit(hooks, key, f"http://rebind.test:{allowed.port}/hook").status_code == 202
        wait_for(lambda: len(allowed.received) == 1)
        assert allowed.received[0][1]["Host"] == f"rebind.test:{allowed.port}"
        assert fake_dns.queries[("rebind.test", "A")] == 1  # one resolution, one connection
        # The other way round: the first answer is refused and nothing is sent; the retry
        # resolves anew and is judged anew.
        assert submit(hooks, key, f"http://rebind-back.test:{allowed.port}/h").status_code == 202
        wait_for(lambda: len(allowed.received) == 2)
        time.sleep(0.3)
    finally:
        allowed.close()
        forbidden.close()
    assert forbidden.received == []
    assert "rebind-back.test is (or resolves to) a private or local address (127.0.0.3)" in (
        hooks.log()
    )


def test_an_ipv4_mapped_answer_is_judged_by_its_ipv4_address(
    hooks: InProcessServer, fake_dns: FakeDns
) -> None:
    allowed, forbidden = twin_receivers()
    fake_dns.records["mapped.test"] = [["::ffff:127.0.0.3"]]
    key = create_key(hooks, ADMIN)
    try:
        assert submit(hooks, key, f"http://mapped.test:{forbidden.port}/h").status_code == 202
        wait_for(lambda: "mapped.test is (or resolves to)" in hooks.log())
        time.sleep(0.5)  # a retry or two
    finally:
        allowed.close()
        forbidden.close()
    assert forbidden.received == [] and allowed.received == []


@pytest.mark.parametrize(
    "url",
    [
        f"http://{'a' * 64}.example.com/hook",
        f"http://{'a.' * 130}com/hook",
        "http://xn--zz.example/hook",
        "http://[::1/hook",
        "http://hooks.example:99999/hook",
        "http://[::ffff:127.0.0.3]/hook",
        "http://[64:ff9b::7f00:3]/hook",
    ],
)
def test_malformed_or_forbidden_hosts_are_a_400_naming_the_field(
    hooks: InProcessServer, url: str
) -> None:
    key = create_key(hooks, ADMIN)
    r = submit(hooks, key, url)
    assert r.status_code == 400 and "'webhook_url'" in r.json()["error"], r.text
    usage = requests.get(
        f"{hooks.url}/admin/keys/{key.split('_')[1]}/usage",
        headers={"x-admin-token": ADMIN},
        timeout=10,
    ).json()
    assert usage["balance"] == "10" and usage["images"] == 0


def test_slow_dns_for_some_hosts_stalls_no_request_and_no_other_delivery(
    hooks: InProcessServer, fake_dns: FakeDns
) -> None:
    receiver = Receiver("127.0.0.2")
    # More slow names than asyncio's default thread pool has threads (which the request
    # path uses): resolving there would leave the status polls below waiting.
    slow = [f"slow{i}.test" for i in range(min(32, (os.cpu_count() or 1) + 4) + 2)]
    for name in slow:
        fake_dns.records[name], fake_dns.delays[name] = [["127.0.0.2"]], 30
    fake_dns.records["fast.test"] = [["127.0.0.2"]]
    keys = [create_key(hooks, ADMIN) for _ in range(len(slow) // 2 + 1)]  # 2 in flight a key
    try:
        started = time.monotonic()
        for i, name in enumerate(slow):
            assert (
                submit(hooks, keys[i // 2], f"http://{name}:{receiver.port}/h").status_code == 202
            )
        submit_s = time.monotonic() - started
        wait_for(lambda: fake_dns.pending >= 2 * len(slow))  # every A and AAAA held back
        latencies = []
        job = submit(hooks, keys[-1], f"http://fast.test:{receiver.port}/h").json()
        sent = time.monotonic()
        for _ in range(20):
            t0 = time.monotonic()
            r = requests.get(job["status_url"], headers={"x-api-key": keys[-1]}, timeout=30)
            latencies.append(time.monotonic() - t0)
            assert r.status_code == 200
        wait_for(lambda: len(receiver.received) == 1, timeout=TIMEOUT_S)
        fast_s = receiver.received[0][0] - sent
        assert fake_dns.pending >= 2 * len(slow)  # the slow names are still unanswered
    finally:
        receiver.close()
    FIGURES["slow_dns"] = {
        "slow_names_in_flight": len(slow),
        "dns_delay_s": 30,
        "submit_all_slow_webhooks_s": round(submit_s, 3),
        "status_poll_max_s": round(max(latencies), 3),
        "fast_delivery_after_submit_s": round(fast_s, 3),
    }
    assert submit_s < 2 and max(latencies) < 0.5 and fast_s < 1.5


def test_a_tarpit_receiver_delays_no_other_key_and_is_cut_at_the_timeout(
    hooks: InProcessServer,
) -> None:
    tarpit, receiver = Tarpit("127.0.0.2"), Receiver("127.0.0.2")
    stuck, other = create_key(hooks, ADMIN), create_key(hooks, ADMIN)
    try:
        for _ in range(3):  # one more than ZIMAGE_WEBHOOK_MAX_IN_FLIGHT_PER_KEY
            submit(hooks, stuck, f"http://127.0.0.2:{tarpit.port}/h")
        wait_for(lambda: tarpit.open == 2)
        sent = time.monotonic()
        submit(hooks, other, f"http://127.0.0.2:{receiver.port}/h")
        wait_for(lambda: len(receiver.received) == 1, timeout=TIMEOUT_S)
        other_s = receiver.received[0][0] - sent
        open_meanwhile = tarpit.open
        wait_for(lambda: tarpit.accepted >= 3 and len(tarpit.held) >= 2, timeout=3 * TIMEOUT_S)
    finally:
        tarpit.close()
        receiver.close()
    FIGURES["tarpit"] = {
        "other_key_delivery_after_submit_s": round(other_s, 3),
        "tarpit_connections_at_most": tarpit.max_open,
        "attempt_held_s": [round(s, 2) for s in sorted(tarpit.held)],
        "timeout_s": TIMEOUT_S,
    }
    assert open_meanwhile == 2 and other_s < 1.0
    assert tarpit.max_open == 2  # the per-key bound
    assert all(TIMEOUT_S - 0.3 < s < TIMEOUT_S + 1.0 for s in tarpit.held)


def test_a_pinned_https_post_keeps_the_hostname_for_sni_and_the_certificate() -> None:
    """The URL's host becomes the judged address, yet TLS still names and verifies the
    hostname: a certificate for another name is refused."""
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("hooks.test").configure_cert(server_ctx)
    server_names: list[str | None] = []
    server_ctx.sni_callback = lambda _sock, name, _ctx: server_names.append(name)
    receiver = Receiver("127.0.0.2", tls=server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)

    async def post(url: str) -> int:
        client = PinnedClient(TIMEOUT_S, verify=client_ctx)
        try:
            destination = Destination.parse(url, "webhook_url")
            return await client.post(destination, ipaddress.ip_address("127.0.0.2"), b"{}", {})
        finally:
            await client.aclose()

    try:
        assert asyncio.run(post(f"https://hooks.test:{receiver.port}/h")) == 200
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            asyncio.run(post(f"https://other.test:{receiver.port}/h"))
    finally:
        receiver.close()
    assert server_names[0] == "hooks.test" and "other.test" in server_names
    assert receiver.received[0][1]["Host"] == f"hooks.test:{receiver.port}"
