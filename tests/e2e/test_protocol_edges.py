"""Hostile input at the protocol's edges, each provoked against a real server on loopback:
hostile JSON, over-long headers, forged hosts, forwarded headers, cross-site content
types, absurd rate limits, a protected /metrics and slow clients. None may be a 500; the
store-touching ones run on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import ADMIN, InProcessServer, Server, create_key, fresh_database_url

METRICS_TOKEN = "metrics-secret-token"
BODY_TIMEOUT_S = 1.5
HEADER_TIMEOUT_S = 1.5
SMALL = {"prompt": "a red fox", "width": 256, "height": 256, "steps": 1}
BASE_ENV = {
    "ZIMAGE_MODEL": "null",
    "ZIMAGE_AUTH": "true",
    "ZIMAGE_ADMIN_TOKEN": ADMIN,
    "ZIMAGE_MAX_QUEUE": "64",
    "ZIMAGE_DEFAULT_MAX_IN_FLIGHT": "64",
    "ZIMAGE_DEFAULT_RATE_LIMIT": "10000/minute",
}


class Edges:
    def __init__(self, server: InProcessServer, key: str) -> None:
        self.server, self.url, self.key = server, server.url, key
        self.port = server.url.rsplit(":", 1)[1]

    def post(self, path: str, data: bytes | str, **headers: str) -> requests.Response:
        sent = {"x-api-key": self.key, "content-type": "application/json", **headers}
        return requests.post(self.url + path, data=data, headers=sent, timeout=60)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def edges(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Edges]:
    folder = tmp_path_factory.mktemp(f"edges-{request.param}")
    env = {
        **BASE_ENV,
        "ZIMAGE_DATABASE_URL": fresh_database_url(request.param, folder),
        "ZIMAGE_METRICS_TOKEN": METRICS_TOKEN,
        "ZIMAGE_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
    }
    server = InProcessServer(folder, env=env)
    yield Edges(server, create_key(server, ADMIN, credits=1000))
    server.stop()


def _never_a_500(reply: requests.Response) -> None:
    assert reply.status_code < 500, reply.text
    reply.content.decode("utf-8")  # the body is always encodable text
    assert reply.headers["content-type"].startswith("application/json")


GENERATE = ("/v1/z-image-turbo", "/v2/z-image-turbo", "/v1/images/generations")
HOSTILE_JSON = {
    # name: (body, what the 400 must say)
    "nested 100000 deep": ("[" * 100_000 + "]" * 100_000, "nest at most 200 levels"),
    "nested 300 deep in an ignored field": (
        '{"prompt": "x", "extra": ' + "[" * 300 + "]" * 300 + "}",
        "nest at most 200 levels",
    ),
    "5000 digits in an ignored field": (
        '{"prompt": "x", "extra": ' + "9" * 5000 + "}",
        "at most 4300 digits",
    ),
    "5000 digits in steps": ('{"prompt": "x", "steps": -' + "9" * 5000 + "}", "4300 digits"),
    "lone high surrogate in the prompt": ('{"prompt": "a \\ud800 fox"}', "surrogate pairs"),
    "lone low surrogate in the prompt": ('{"prompt": "a \\udfff"}', "surrogate"),
    "lone surrogate in a key": ('{"prompt": "x", "\\ud800": 1}', "surrogate"),
    "lone surrogate in a bad value": ('{"prompt": "x", "steps": "\\udc00"}', "surrogate"),
    "NaN": ('{"prompt": "x", "guidance_scale": NaN}', "not valid JSON"),
}


@pytest.mark.parametrize("name", list(HOSTILE_JSON))
def test_hostile_json_is_a_400_that_names_the_limit(edges: Edges, name: str) -> None:
    body, expected = HOSTILE_JSON[name]
    for path in (*GENERATE, "/admin/keys"):
        r = edges.post(path, body, **{"x-admin-token": ADMIN})
        _never_a_500(r)
        assert r.status_code == 400, (path, r.text)
        assert "not valid JSON" in r.text and expected in r.text, r.text
        assert "9" * 100 not in r.text  # the offending text is never echoed


def test_a_surrogate_pair_is_text_and_renders(edges: Edges) -> None:
    body = json.dumps({**SMALL, "prompt": "a fox \U0001f98a"})  # ensure_ascii: \ud83e\udd8a
    assert "\\ud83e\\udd8a" in body
    r = edges.post("/v1/z-image-turbo", body)
    assert r.status_code == 200, r.text
    job = edges.post("/v2/z-image-turbo", body)
    assert job.status_code == 202, job.text


def test_an_over_long_idempotency_key_is_a_400_before_the_store(edges: Edges) -> None:
    body = json.dumps(SMALL)
    r = edges.post("/v2/z-image-turbo", body, **{"Idempotency-Key": "k" * 201})
    _never_a_500(r)
    assert r.status_code == 400 and r.json()["error"] == (
        "Invalid 'Idempotency-Key' header: at most 200 characters (got 201)."
    )
    longest = "k" * 200
    first = edges.post("/v2/z-image-turbo", body, **{"Idempotency-Key": longest})
    again = edges.post("/v2/z-image-turbo", body, **{"Idempotency-Key": longest})
    assert first.status_code == again.status_code == 202, first.text
    assert again.json()["request_id"] == first.json()["request_id"]
    assert again.headers["Idempotent-Replayed"] == "true"


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("evil.example", "Host 'evil.example' is not served here"),
        ("evil.example:{port}", "Host 'evil.example' is not served here"),
        ("127.0.0.1:80/evil", "Invalid 'Host' header: must be a host name"),
        ("127.0.0.1@evil.example", "Invalid 'Host' header"),
        ("h" * 256, "Invalid 'Host' header: at most 255 characters (got 256)"),
        ("a" * 5000 + ".example", "at most 255 characters"),
    ],
)
def test_a_host_not_served_is_a_400_and_stores_nothing(
    edges: Edges, host: str, expected: str
) -> None:
    host = host.format(port=edges.port)
    before = _recent(edges)
    for path in GENERATE:
        r = edges.post(path, json.dumps(SMALL), Host=host)
        _never_a_500(r)
        assert r.status_code == 400 and expected in r.text, r.text
    assert _recent(edges) == before


def _recent(edges: Edges) -> list[str]:
    r = requests.get(
        edges.url + "/v2/requests?limit=100", headers={"x-api-key": edges.key}, timeout=10
    )
    return [item["request_id"] for item in r.json()["requests"]]


@pytest.mark.parametrize("name", ["localhost", "LOCALHOST", "127.0.0.1", "[::1]"])
def test_served_hosts_go_into_urls_and_the_stored_job(edges: Edges, name: str) -> None:
    host = f"{name}:{edges.port}"
    r = edges.post("/v2/z-image-turbo", json.dumps(SMALL), Host=host)
    assert r.status_code == 202, r.text
    assert r.json()["status_url"].startswith(f"http://{host}/v2/requests/")
    image = edges.post("/v1/z-image-turbo", json.dumps(SMALL), Host=host)
    assert image.json()["image"].startswith(f"http://{host}/v1/outputs/")
    # The stored base URL (what the result and the webhook link to) is the request's.
    job_id = r.json()["request_id"]
    for _ in range(200):
        result = requests.get(
            f"{edges.url}/v2/requests/{job_id}", headers={"x-api-key": edges.key}, timeout=10
        )
        if result.json()["status"] == "COMPLETED":
            break
        time.sleep(0.05)
    assert result.json()["output"].startswith(f"http://{host}/v1/outputs/"), result.text


def test_probes_answer_any_host(edges: Edges) -> None:
    for path in ("/healthz", "/readyz"):
        r = requests.get(edges.url + path, headers={"Host": "10.1.2.3:8000"}, timeout=10)
        assert r.status_code == 200, r.text


def test_forwarded_headers_are_not_believed_by_default(edges: Edges) -> None:
    forged = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.9"}
    r = edges.post("/v2/z-image-turbo", json.dumps(SMALL), **forged)
    assert r.json()["status_url"].startswith(f"http://127.0.0.1:{edges.port}/"), r.text


@pytest.mark.parametrize(
    ("content_type", "path"),
    [
        ("text/plain", "/v1/z-image-turbo"),
        ("text/plain;charset=UTF-8", "/v2/z-image-turbo"),
        ("application/x-www-form-urlencoded", "/v1/images/generations"),
        ("multipart/form-data; boundary=x", "/v1/z-image-turbo"),
        ("", "/v1/z-image-turbo"),
        ("text/plain", "/admin/keys"),
    ],
)
def test_a_json_body_must_say_it_is_json(edges: Edges, content_type: str, path: str) -> None:
    # What a web page may post to another origin without a CORS preflight.
    body = json.dumps({**SMALL, "name": "x"})
    headers = {"x-api-key": edges.key, "x-admin-token": ADMIN, "content-type": content_type}
    r = requests.post(edges.url + path, data=body, headers=headers, timeout=60)
    _never_a_500(r)
    assert r.status_code == 415, r.text
    assert "'Content-Type: application/json'" in r.text, r.text


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "application/x+json"])
def test_json_content_types_are_accepted(edges: Edges, content_type: str) -> None:
    r = edges.post("/v1/z-image-turbo", json.dumps(SMALL), **{"content-type": content_type})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "limit",
    [
        "1/1000000000000000000000000000000 seconds",
        "1 per 99999999999999999 years",
        "1/367 days",
        "1/2 years",
    ],
)
def test_an_absurd_rate_limit_window_is_a_400(edges: Edges, limit: str) -> None:
    body = json.dumps({"name": "x", "rate_limit": limit})
    r = edges.post("/admin/keys", body, **{"x-admin-token": ADMIN})
    _never_a_500(r)
    assert r.status_code == 400 and "'rate_limit'" in r.text and "366 days" in r.text, r.text


def test_the_longest_window_and_largest_amount_work(edges: Edges) -> None:
    for limit in ("1/366 days", "999999999 per second", "5 per 999 hours"):
        key = create_key(edges.server, ADMIN, credits=10, rate_limit=limit)
        r = requests.post(
            edges.url + "/v1/z-image-turbo", json=SMALL, headers={"x-api-key": key}, timeout=60
        )
        assert r.status_code == 200, r.text
    too_many = json.dumps({"name": "x", "rate_limit": "1000000000 per second"})
    r = edges.post("/admin/keys", too_many, **{"x-admin-token": ADMIN})
    assert r.status_code == 400 and "1 to 999999999 requests" in r.text, r.text
    too_long = json.dumps({"name": "x", "rate_limit": "1 per " + "0" * 60 + "1 second"})
    r = edges.post("/admin/keys", too_long, **{"x-admin-token": ADMIN})
    assert r.status_code == 400 and "rate_limit" in r.text, r.text


def test_metrics_need_the_token_when_one_is_set(edges: Edges) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"x-api-key": METRICS_TOKEN}):
        r = requests.get(edges.url + "/metrics", headers=headers, timeout=10)
        assert r.status_code == 401, r.text
        assert r.headers["WWW-Authenticate"] == 'Bearer realm="metrics"'
        assert "zimage_requests_total" not in r.text and METRICS_TOKEN not in r.text
    auth = {"Authorization": f"Bearer {METRICS_TOKEN}"}
    r = requests.get(edges.url + "/metrics", headers=auth, timeout=10)
    assert r.status_code == 200 and "zimage_requests_total" in r.text


def test_metrics_are_open_without_a_token(tmp_path: Path) -> None:
    server = InProcessServer(tmp_path, env={**BASE_ENV, "ZIMAGE_METRICS_TOKEN": "  "})
    try:
        assert requests.get(server.url + "/metrics", timeout=10).status_code == 200
    finally:
        server.stop()


def test_trusted_proxies_and_allowed_hosts(tmp_path: Path) -> None:
    env = {
        **BASE_ENV,
        "ZIMAGE_AUTH": "false",
        "ZIMAGE_TRUSTED_PROXIES": "127.0.0.0/8,::1",
        "ZIMAGE_ALLOWED_HOSTS": "images.example.com,*.cdn.example",
    }
    server = InProcessServer(tmp_path, env=env)
    try:
        body = json.dumps(SMALL)

        def submit(host: str) -> requests.Response:
            headers = {
                "Host": host,
                "X-Forwarded-Proto": "https",
                "content-type": "application/json",
            }
            return requests.post(
                server.url + "/v2/z-image-turbo", data=body, headers=headers, timeout=60
            )

        r = submit("images.example.com")
        assert r.status_code == 202, r.text
        assert r.json()["status_url"].startswith("https://images.example.com/v2/requests/")
        assert submit("eu.cdn.example").status_code == 202
        # The setting replaces the defaults: loopback names are not served now.
        assert submit(f"127.0.0.1:{server.url.rsplit(':', 1)[1]}").status_code == 400
        assert submit("cdn.example.evil").status_code == 400
    finally:
        server.stop()


# ---------- slow clients, on raw sockets ----------


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=30)


def _dribble(sock: socket.socket, data: bytes, interval_s: float) -> int:
    """Send ``data`` a byte every ``interval_s``, until the server closes; bytes sent."""
    for sent, byte in enumerate(data):
        try:
            sock.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            return sent
        time.sleep(interval_s)
    return len(data)


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_a_body_that_dribbles_gets_408_and_the_connection_closes(edges: Edges) -> None:
    body = json.dumps(SMALL).encode()
    head = (
        f"POST /v1/z-image-turbo HTTP/1.1\r\nHost: 127.0.0.1:{edges.port}\r\n"
        f"x-api-key: {edges.key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with _connect(edges.url) as sock:
        start = time.monotonic()
        sock.sendall(head)
        _dribble(sock, body[:8], 0.4)  # never the whole body in time
        reply = _read_all(sock)
        elapsed = time.monotonic() - start
    assert reply.startswith(b"HTTP/1.1 408 "), reply[:200]
    assert b"not received within 1.5 s" in reply
    assert BODY_TIMEOUT_S <= elapsed < BODY_TIMEOUT_S + 2, elapsed
    # The server is unharmed.
    assert edges.post("/v1/z-image-turbo", body).status_code == 200


def test_a_body_that_arrives_in_time_in_pieces_is_served(edges: Edges) -> None:
    body = json.dumps(SMALL).encode()
    head = (
        f"POST /v1/z-image-turbo HTTP/1.1\r\nHost: 127.0.0.1:{edges.port}\r\n"
        f"x-api-key: {edges.key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with _connect(edges.url) as sock:
        sock.sendall(head)
        for piece in (body[:10], body[10:20], body[20:]):
            time.sleep(0.3)
            sock.sendall(piece)
        reply = _read_all(sock)
    assert reply.startswith(b"HTTP/1.1 200 "), reply[:300]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``zimage serve`` itself: the header timeout lives in its HTTP protocol."""
    env = {
        **BASE_ENV,
        "ZIMAGE_AUTH": "false",
        "ZIMAGE_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
    }
    server = Server(tmp_path_factory.mktemp("served"), env=env, args=())
    yield server
    server.stop()


def test_headers_that_dribble_get_408_and_the_connection_closes(served: Server) -> None:
    head = b"POST /v1/z-image-turbo HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"a" * 50
    with _connect(served.url) as sock:
        start = time.monotonic()
        sent = _dribble(sock, head, 0.25)  # for up to 20 s
        reply = _read_all(sock)
        elapsed = time.monotonic() - start
    assert reply.startswith(b"HTTP/1.1 408 "), reply[:200]
    assert b"headers not received within 1.5 s" in reply
    assert sent < len(head) and elapsed < HEADER_TIMEOUT_S + 2, (sent, elapsed)


def test_an_idle_connection_is_closed_without_a_reply(served: Server) -> None:
    with _connect(served.url) as sock:
        start = time.monotonic()
        reply = _read_all(sock)
        elapsed = time.monotonic() - start
    assert reply == b"" and HEADER_TIMEOUT_S - 0.2 <= elapsed < HEADER_TIMEOUT_S + 2, elapsed


def test_kept_alive_connections_still_serve_several_requests(served: Server) -> None:
    with requests.Session() as session:
        for _ in range(3):
            r = session.post(served.url + "/v1/z-image-turbo", json=SMALL, timeout=60)
            assert r.status_code == 200, r.text
            time.sleep(1.0)  # under the keep-alive timeout: the same connection
