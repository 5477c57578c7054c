"""Shared fixtures: real servers on loopback.

Two kinds, with one interface (``url``, ``post``, ``log``, ``worker_pids``, ``stop``, ...):

- ``InProcessServer``: the app from ``create_app`` under uvicorn in a thread of the test
  process. Real HTTP on a port the OS picks, real worker processes; no CLI start-up. The
  default for contract tests, and it has a ``clock`` that tests move instead of waiting out
  real TTLs.
- ``Server``: ``zimage serve`` in a subprocess (``zimage_server.launcher``, the benchmark's
  launcher too), for what needs a process of its own: signals, SIGKILL and restart, the
  CLI's logging set-up, the API process's memory.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import itertools
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import requests

from tests.backing import RedisServer
from zimage_server.launcher import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 180
# One admin token for the shared servers (and the modules that bring their own).
ADMIN = "test-admin-token"
# Every server warms up on the smallest render.
BASE_ENV = {"ZIMAGE_WARMUP_SIZE": "256", "ZIMAGE_WARMUP_STEPS": "1"}


# ---------- the tiny model, built once ----------

_tiny_lock = threading.Lock()
_tiny_dir: Path | None = None


def shared_tiny_model() -> Path:
    """The tiny model (seed 0, the one a server builds on first use), built once per run."""
    global _tiny_dir
    with _tiny_lock:
        if _tiny_dir is None:
            from zimage_server.engine.tiny import build_tiny_model

            root = Path(tempfile.mkdtemp(prefix="zimage-tiny-"))
            atexit.register(shutil.rmtree, root, ignore_errors=True)
            _tiny_dir = build_tiny_model(root / "model")
        return _tiny_dir


def seed_tiny_model(data_dir: Path) -> None:
    """Give ``data_dir`` the shared tiny model, where ``--tiny`` looks for it, so the
    server's worker loads it instead of building its own."""
    target = data_dir / "models" / "tiny"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(shared_tiny_model(), target_is_directory=True)


def _next_log(data_dir: Path) -> Path:
    return data_dir / f"server-{len(list(data_dir.glob('server-*.log')))}.log"


# ---------- what both kinds of server offer ----------


class _Http:
    url: str
    data_dir: Path

    def post(
        self, body: object, path: str = "/v1/z-image-turbo", **kwargs: object
    ) -> requests.Response:
        return requests.post(self.url + path, json=body, timeout=120, **kwargs)  # type: ignore[arg-type]


class Server(_Http, ServerProcess):
    """``zimage serve --tiny`` (or ``args``) in a subprocess, on a port the OS picks."""

    def __init__(
        self,
        data_dir: Path,
        env: dict[str, str] | None = None,
        wait: bool = True,
        args: tuple[str, ...] = ("--tiny",),
        seed_tiny: bool = True,
    ) -> None:
        self.data_dir = data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        if seed_tiny and "--tiny" in args:
            seed_tiny_model(data_dir)
        ServerProcess.__init__(
            self,
            args,
            {**BASE_ENV, "ZIMAGE_DATA_DIR": str(data_dir), **(env or {})},
            _next_log(data_dir),
            cwd=data_dir,
            ready_timeout_s=READY_TIMEOUT_S,
            stop_timeout_s=20,
        )
        self.start(ready=wait)

    def worker_pids(self) -> list[int]:
        """The live workers this server started (its log names each one's pid)."""
        return live_workers(self.log(), self.proc.pid)


def live_workers(log: str, server_pid: int) -> list[int]:
    """Pids that ``log`` says were started as workers and that still run under the server
    (workers are forked by its forkserver: grandchildren, hence ``recursive``)."""
    import psutil

    started = {int(pid) for pid in re.findall(r"worker \S+ started on .*\(pid (\d+)\)", log)}
    alive = []
    for child in psutil.Process(server_pid).children(recursive=True):
        try:
            if child.pid in started and child.status() != psutil.STATUS_ZOMBIE:
                alive.append(child.pid)
        except psutil.NoSuchProcess:
            continue
    return alive


# ---------- in process ----------


class Clock:
    """``time.time`` plus an offset a test moves forward: what the server's outputs and
    jobs expire by. ``travel`` moves it for a ``with`` block, so a shared server is back on
    real time for the next test."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    @contextlib.contextmanager
    def travel(self, seconds: float) -> Iterator[None]:
        self.offset += seconds
        try:
            yield
        finally:
            self.offset -= seconds


_server_name: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "zimage_test_server", default=None
)
_environ_lock = threading.Lock()
_names = itertools.count()


@contextlib.contextmanager
def _environ(values: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` with ``values`` for the block: ``Settings`` reads ``ZIMAGE_*`` from
    there, so in-process servers are configured by the same variables as ``zimage serve``."""
    with _environ_lock:
        saved = {name: os.environ.get(name) for name in values}
        os.environ.update(values)
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


class _Owned(logging.Filter):
    """Records logged by one in-process server: anything on its event loop's thread (named
    after the server), and work its tasks hand to other threads (which inherit the
    server's name in a context variable)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.owner = name

    def filter(self, record: logging.LogRecord) -> bool:
        return record.threadName == self.owner or _server_name.get() == self.owner


class InProcessServer(_Http):
    """``create_app(settings)`` under uvicorn in a thread of the test process.

    Configured by ``ZIMAGE_*`` variables like ``zimage serve`` (``--tiny`` unless ``env``
    names a ``ZIMAGE_MODEL``). Its API-side log records (JSON lines, as the CLI writes
    them) go to ``log()``; its workers are real processes, whose own output goes to the
    test process's stderr.
    """

    def __init__(
        self,
        data_dir: Path,
        env: dict[str, str] | None = None,
        wait: bool = True,
        port: int = 0,  # a stopped server's port, to bring "it" back at the same URL
    ) -> None:
        from zimage_server.api.main import create_app
        from zimage_server.core.config import Settings
        from zimage_server.telemetry.logs import JsonFormatter

        self.data_dir = data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        values = {**BASE_ENV, "ZIMAGE_DATA_DIR": str(data_dir), **(env or {})}
        if "ZIMAGE_MODEL" not in values:
            values.setdefault("ZIMAGE_TINY", "true")
            seed_tiny_model(data_dir)
        self.name = f"server-{next(_names)}"
        self.log_path = _next_log(data_dir)
        self._handler = logging.FileHandler(self.log_path)
        self._handler.setFormatter(JsonFormatter())
        self._handler.addFilter(_Owned(self.name))
        root = logging.getLogger()
        root.addHandler(self._handler)
        root.setLevel(min(root.level or logging.INFO, logging.INFO))

        try:
            with _environ(values):
                self.settings = Settings(_env_file=None, host="127.0.0.1", port=0)  # type: ignore[call-arg]
            self.clock = Clock()
            self.app = create_app(self.settings, clock=self.clock)
        except BaseException:
            root.removeHandler(self._handler)
            self._handler.close()
            raise

        import uvicorn

        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", port))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        config = uvicorn.Config(
            self.app,
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=5,
            proxy_headers=False,  # as `zimage serve`: forwarded headers are the app's to trust
        )
        self._uvicorn = uvicorn.Server(config)
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
        self._thread.start()
        try:
            self._wait_started()
            if wait:
                self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def _serve(self) -> None:
        _server_name.set(self.name)  # the loop's tasks, and their threads, inherit it
        try:
            self._uvicorn.run(sockets=[self._sock])
        except BaseException as exc:  # SystemExit when the lifespan fails to start
            self._failure = exc

    def _wait_started(self) -> None:
        deadline = time.monotonic() + 60
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start ({self._failure!r}):\n{self.log()}")
            time.sleep(0.01)

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reply = requests.get(self.url + "/readyz", timeout=10)
            if reply.status_code == 200:
                return
            if reply.json().get("status") == "FAILED":
                raise RuntimeError(f"the model failed to load:\n{self.log()}")
            time.sleep(0.05)
        raise RuntimeError(f"server not ready:\n{self.log()}")

    def log(self) -> str:
        self._handler.flush()
        return self.log_path.read_text(errors="replace")

    def worker_pids(self) -> list[int]:
        """The live workers this server started (its log names each one's pid)."""
        return live_workers(self.log(), os.getpid())

    def stop(self) -> None:
        self._uvicorn.should_exit = True
        self._thread.join(60)
        self._sock.close()
        logging.getLogger().removeHandler(self._handler)
        self._handler.close()


AnyServer = InProcessServer | Server


def create_key(server: AnyServer, admin_token: str, credits: float = 10, **extra: object) -> str:
    """A new API key through the admin API (the server must have ZIMAGE_ADMIN_TOKEN set)."""
    r = requests.post(
        server.url + "/admin/keys",
        headers={"x-admin-token": admin_token},
        json={"name": "test", "credits": credits, **extra},
        timeout=10,
    )
    assert r.status_code == 201, r.text
    return str(r.json()["key"])


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real ``redis-server`` on loopback, for the modules that share limits or events."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    """The default tiny server: no keys, default settings."""
    srv = InProcessServer(tmp_path_factory.mktemp("server"))
    yield srv
    srv.stop()


# Keys on, the admin API on, and room for the concurrency tests of the modules that share
# it (test_accounts on SQLite, test_clients, test_playground).
AUTH_ENV = {
    "ZIMAGE_AUTH": "true",
    "ZIMAGE_ADMIN_TOKEN": ADMIN,
    "ZIMAGE_DEFAULT_MAX_IN_FLIGHT": "16",
    "ZIMAGE_MAX_QUEUE": "32",
    "ZIMAGE_MAX_BATCH_SIZE": "4",
}


@pytest.fixture(scope="session")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    """A tiny server with API keys and the admin API (token ``ADMIN``), on SQLite."""
    folder = tmp_path_factory.mktemp("auth")
    env = {**AUTH_ENV, "ZIMAGE_DATABASE_URL": fresh_database_url("sqlite", folder)}
    srv = InProcessServer(folder, env=env)
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


class PostgresOutage:
    """Turns a test database's connections off (backends ended) and on again: the
    server's store becomes unreachable as in an outage, while the server runs on."""

    def __init__(self, url: str) -> None:
        import sqlalchemy as sa

        self._sa = sa
        self.name = url.rsplit("/", 1)[1]
        admin = _postgres_admin_url()
        assert admin is not None, "a PostgreSQL test database needs ZIMAGE_TEST_POSTGRES_URL"
        self._admin = sa.create_engine(admin, isolation_level="AUTOCOMMIT")

    def begin(self) -> None:
        text = self._sa.text
        with self._admin.connect() as c:
            c.execute(text(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS false'))
            c.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
                {"n": self.name},
            )

    def end(self) -> None:
        with self._admin.connect() as c:
            c.execute(self._sa.text(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS true'))

    def close(self) -> None:
        self._admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return fresh_database_url(request.param, tmp_path)
