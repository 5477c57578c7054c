"""Shared fixtures: real servers on loopback, started through the real CLI."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 180


class Server:
    """``zimage serve --tiny`` in a subprocess, on a port the OS picks."""

    def __init__(
        self,
        data_dir: Path,
        env: dict[str, str] | None = None,
        wait: bool = True,
        args: tuple[str, ...] = ("--tiny",),
    ) -> None:
        self.data_dir = data_dir
        self.log_path = data_dir / f"server-{len(list(data_dir.glob('server-*.log')))}.log"
        data_dir.mkdir(parents=True, exist_ok=True)
        full_env = {
            **os.environ,
            "ZIMAGE_DATA_DIR": str(data_dir),
            "ZIMAGE_WARMUP_SIZE": "256",
            "ZIMAGE_WARMUP_STEPS": "1",
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "zimage_server", "serve", *args, "--port", "0"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=data_dir,
        )
        self.url = self._wait_for_port()
        if wait:
            self.wait_ready()

    def _wait_for_port(self) -> str:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            match = re.search(r"Uvicorn running on (http://[\d.]+:\d+)", self.log())
            if match:
                return match.group(1)
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log()}")
            time.sleep(0.1)
        raise RuntimeError(f"server did not bind:\n{self.log()}")

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if requests.get(self.url + "/readyz", timeout=5).status_code == 200:
                return
            time.sleep(0.2)
        raise RuntimeError(f"server not ready:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def post(
        self, body: object, path: str = "/v1/z-image-turbo", **kwargs: object
    ) -> requests.Response:
        return requests.post(self.url + path, json=body, timeout=120, **kwargs)  # type: ignore[arg-type]

    def worker_pids(self) -> list[int]:
        import psutil

        alive = []
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if child.status() == psutil.STATUS_ZOMBIE:
                    continue
                if "spawn_main" in " ".join(child.cmdline()):
                    alive.append(child.pid)
            except psutil.NoSuchProcess:
                continue
        return alive

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def create_key(server: Server, admin_token: str, credits: float = 10, **extra: object) -> str:
    """A new API key through the admin API (the server must have ZIMAGE_ADMIN_TOKEN set)."""
    r = requests.post(
        server.url + "/admin/keys",
        headers={"x-admin-token": admin_token},
        json={"name": "test", "credits": credits, **extra},
        timeout=10,
    )
    assert r.status_code == 201, r.text
    return str(r.json()["key"])


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("server"))
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from zimage_server.engine.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _postgres_admin_url() -> str | None:
    url = os.environ.get("ZIMAGE_TEST_POSTGRES_URL")
    if not url and os.environ.get("CI"):
        raise RuntimeError(
            "CI must run the store tests on PostgreSQL: set ZIMAGE_TEST_POSTGRES_URL"
        )
    return url


def fresh_database_url(kind: str, folder: Path) -> str:
    """A new, empty database of ``kind`` ("sqlite" or "postgresql") for one test or server."""
    if kind == "sqlite":
        return f"sqlite:///{folder / 'store.db'}"
    admin = _postgres_admin_url()
    if admin is None:
        pytest.skip("ZIMAGE_TEST_POSTGRES_URL is not set (scripts/start-postgres prints one)")
    import secrets

    import sqlalchemy as sa

    name = f"zimage_{secrets.token_hex(6)}"
    engine = sa.create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return admin.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return fresh_database_url(request.param, tmp_path)
