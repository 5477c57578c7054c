"""API keys, credits and rate limits through the real server, on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import pytest
import requests
import sqlalchemy as sa

from tests.conftest import ADMIN, AUTH_ENV, InProcessServer, fresh_database_url

SMALL = {"prompt": "a paid-for cat", "width": 256, "height": 256, "steps": 1}
PRICE = "0.01"  # 256x256 x 1 step is below the minimum price of 0.01


class Accounts:
    """A server with auth on, plus helpers that act on its store like an operator would."""

    def __init__(self, server: InProcessServer, db_url: str) -> None:
        self.server, self.db_url = server, db_url
        self.keys: list[str] = []

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            "ZIMAGE_DATA_DIR": str(self.server.data_dir),
            "ZIMAGE_DATABASE_URL": self.db_url,
        }
        return subprocess.run(
            [sys.executable, "-m", "zimage_server", "keys", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=False,
        )

    def create(self, credits: str = "1", *extra: str) -> str:
        run = self.cli("create", "--name", "test", "--credits", credits, *extra)
        assert run.returncode == 0, run.stderr
        key = run.stdout.strip()
        self.keys.append(key)
        return key

    def new_key(self, credits: str = "1") -> str:
        """A key through the admin API: in process, where a ``create`` (the CLI) is a Python
        start. The tests of what the CLI does (its options, disable, list) use ``create``."""
        created = self.admin("POST", "/keys", json={"name": "test", "credits": float(credits)})
        assert created.status_code == 201, created.text
        key = str(created.json()["key"])
        self.keys.append(key)
        return key

    def admin(self, method: str, path: str, **kwargs: object) -> requests.Response:
        return requests.request(
            method,
            self.server.url + "/admin" + path,
            timeout=30,
            headers={"Authorization": f"Bearer {ADMIN}"},
            **kwargs,
        )  # type: ignore[arg-type]

    def usage(self, key: str) -> dict[str, str]:
        return self.admin("GET", f"/keys/{key.split('_')[1]}/usage").json()

    def gen(
        self, key: str | None, body: dict[str, object] | None = None, header: str = "x-api-key"
    ) -> requests.Response:
        headers = {} if key is None else {header: key if header == "x-api-key" else f"Bearer {key}"}
        return self.server.post(body or SMALL, headers=headers)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def accounts(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Accounts]:
    """On SQLite, the session's ``auth_server`` (made for these tests too); on PostgreSQL,
    a server of the same settings of its own."""
    own: InProcessServer | None = None
    if request.param == "sqlite":
        server = request.getfixturevalue("auth_server")
    else:
        folder = tmp_path_factory.mktemp(f"accounts-{request.param}")
        db_url = fresh_database_url(request.param, folder)
        own = server = InProcessServer(folder, env={**AUTH_ENV, "ZIMAGE_DATABASE_URL": db_url})
    accounts = Accounts(server, server.settings.resolved_database_url)
    yield accounts
    if own is not None:
        own.stop()
    log = server.log()
    for key in accounts.keys:
        assert key not in log and key.split("_", 2)[2] not in log


def test_missing_and_wrong_keys_are_401(accounts: Accounts) -> None:
    key = accounts.new_key()
    prefix = key.split("_")[1]
    for bad in [None, "nonsense", f"zk_{prefix}_wrongsecret", key + "x", "zk_00000000_abc"]:
        r = accounts.gen(bad)
        assert r.status_code == 401, bad
        assert "API key" in r.json()["error"]
        assert key not in r.text and (bad is None or bad not in r.text)


def test_both_header_styles_work_and_200_has_credit_headers(accounts: Accounts) -> None:
    key = accounts.new_key("1")
    for header in ("x-api-key", "authorization"):
        r = accounts.gen(key, header=header)
        assert r.status_code == 200, r.text
        assert r.headers["x-credits-consumed"] == PRICE
        assert r.headers["x-rate-limit-remaining"].isdigit()
        datetime.fromisoformat(r.headers["x-rate-limit-reset-at-utc"].replace("Z", "+00:00"))
    assert r.headers["x-remaining-credits"] == "0.98"


def test_disabled_key_is_403_until_enabled(accounts: Accounts) -> None:
    key = accounts.create()
    prefix = key.split("_")[1]
    assert accounts.cli("disable", prefix).returncode == 0
    r = accounts.gen(key)
    assert r.status_code == 403 and "disabled" in r.json()["error"]
    assert accounts.admin("POST", f"/keys/{prefix}/enable").status_code == 200
    assert accounts.gen(key).status_code == 200


def test_a_verified_key_disabled_by_another_process_is_refused_at_once(
    accounts: Accounts,
) -> None:
    """The server trusts a key it verified for ``ZIMAGE_KEY_CACHE_S`` without a lookup, but
    the credit hold checks the key too: disabled by another process (the CLI here), it is
    403 at its next request, v1 or v2, and nothing is charged."""
    key = accounts.create()
    prefix = key.split("_")[1]
    assert accounts.gen(key).status_code == 200  # verified: now in the server's cache
    forged = f"zk_{prefix}_" + "A" * 43  # the prefix of a cached key is not enough
    assert accounts.gen(forged).status_code == 401
    assert accounts.cli("disable", prefix).returncode == 0
    for _ in range(2):  # refused by the hold, then by the lookup the refusal brings back
        r = accounts.gen(key)
        assert r.status_code == 403 and f"API key {prefix} is disabled" in r.json()["error"]
    job = requests.post(
        accounts.server.url + "/v2/z-image-turbo",
        json=SMALL,
        headers={"x-api-key": key},
        timeout=30,
    )
    assert job.status_code == 403, job.text
    used = accounts.usage(key)
    assert used["balance"] == "0.99" and used["pending"] == "0" and used["images"] == 1
    assert accounts.cli("enable", prefix).returncode == 0
    assert accounts.gen(key).status_code == 200


def test_key_without_the_scope_is_403(accounts: Accounts) -> None:
    created = accounts.admin("POST", "/keys", json={"name": "no-scope", "credits": 1, "scopes": []})
    assert created.status_code == 201
    key = created.json()["key"]
    accounts.keys.append(key)
    r = accounts.gen(key)
    assert r.status_code == 403 and "'generate' scope" in r.json()["error"]


def test_no_credits_is_406_and_a_top_up_is_visible_at_once(accounts: Accounts) -> None:
    key = accounts.new_key("0")
    r = accounts.gen(key)
    assert r.status_code == 406
    assert "costs 0.01 credits" in r.json()["error"] and "balance is 0" in r.json()["error"]
    top_up = accounts.admin("POST", f"/keys/{key.split('_')[1]}/top-up", json={"credits": 0.02})
    assert top_up.json()["balance"] == "0.02"
    r = accounts.gen(key)
    assert r.status_code == 200 and r.headers["x-remaining-credits"] == "0.01"


def test_exactly_the_affordable_requests_succeed_under_concurrency(accounts: Accounts) -> None:
    key = accounts.new_key("0.03")
    with ThreadPoolExecutor(max_workers=12) as pool:
        statuses = sorted(r.status_code for r in pool.map(lambda _: accounts.gen(key), range(12)))
    assert statuses == [200] * 3 + [406] * 9
    usage = accounts.usage(key)
    assert usage == {
        "prefix": key.split("_")[1],
        "images": 3,
        "spent": "0.03",
        "balance": "0",
        "ledger_sum": "0",
        "pending": "0",
    }
    engine = sa.create_engine(accounts.db_url)
    with engine.connect() as connection:
        total, balance = connection.execute(
            sa.text(
                "SELECT (SELECT SUM(amount) FROM ledger WHERE key_id = k.id), k.balance "
                "FROM api_keys k WHERE k.prefix = :p"
            ),
            {"p": key.split("_")[1]},
        ).one()
    engine.dispose()
    assert total == balance == 0


def test_a_request_whose_worker_dies_is_refunded(accounts: Accounts) -> None:
    import psutil

    key = accounts.new_key("10")
    result: dict[str, requests.Response] = {}
    slow = {**SMALL, "width": 1024, "height": 1024, "steps": 30}  # 3.75 credits
    thread = threading.Thread(target=lambda: result.setdefault("r", accounts.gen(key, slow)))
    thread.start()
    worker = psutil.Process(accounts.server.worker_pids()[0])
    deadline = time.monotonic() + 30
    while worker.cpu_percent(interval=0.2) < 50 and time.monotonic() < deadline:
        pass
    worker.kill()
    thread.join(60)
    assert result["r"].status_code == 502
    accounts.server.wait_ready()
    assert accounts.usage(key)["balance"] == "10" and accounts.usage(key)["images"] == 0


def test_rate_limit_per_key_and_reset(accounts: Accounts) -> None:
    key = accounts.create("1", "--rate-limit", "3/3second")  # a short window to wait out
    # Cheap requests (400: empty prompt) count too, and use up the window at once.
    statuses = [accounts.gen(key, {"prompt": ""}).status_code for _ in range(3)]
    assert statuses == [400, 400, 400]
    limited = accounts.gen(key)
    assert limited.status_code == 429
    assert limited.headers["x-rate-limit-remaining"] == "0"
    reset = datetime.fromisoformat(
        limited.headers["x-rate-limit-reset-at-utc"].replace("Z", "+00:00")
    )
    assert 1 <= int(limited.headers["retry-after"]) <= 3
    time.sleep(max(0.0, (reset - datetime.now(UTC)).total_seconds()) + 1.0)
    assert accounts.gen(key).status_code == 200
    assert accounts.usage(key)["images"] == 1  # neither the 400s nor the 429 were billed


def test_in_flight_limit(accounts: Accounts) -> None:
    key = accounts.create("10", "--max-in-flight", "1")
    result: dict[str, requests.Response] = {}
    slow = {**SMALL, "width": 1024, "height": 1024, "steps": 4}
    thread = threading.Thread(target=lambda: result.setdefault("r", accounts.gen(key, slow)))
    thread.start()
    time.sleep(0.5)
    second = accounts.gen(key)
    thread.join(60)
    assert second.status_code == 429 and "in flight" in second.json()["error"]
    assert result["r"].status_code == 200


def test_admin_api_needs_the_token(accounts: Accounts) -> None:
    url = accounts.server.url + "/admin/keys"
    assert requests.get(url, timeout=10).status_code == 401
    assert requests.get(url, headers={"x-admin-token": "wrong"}, timeout=10).status_code == 401
    listed = accounts.admin("GET", "/keys").json()
    assert listed and all("key" not in item and "key_hash" not in item for item in listed)


def test_cli_lists_prefixes_never_keys(accounts: Accounts) -> None:
    key = accounts.create("2")
    listed = accounts.cli("list")
    assert key.split("_")[1] in listed.stderr + listed.stdout
    assert key not in listed.stderr + listed.stdout
    usage = accounts.cli("usage", key.split("_")[1])
    assert "balance 2" in usage.stderr


def test_admin_api_is_off_without_a_token(server: InProcessServer) -> None:
    assert requests.get(server.url + "/admin/keys", timeout=10).status_code == 404
