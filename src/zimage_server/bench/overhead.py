"""``--overhead``: the server's own cost per request, against the floor, in one run.

Three servers at once, each on a free loopback port: ``floor`` (``bench/floor.py``, a bare
FastAPI endpoint doing the same parse, encode and response), ``ours`` (``zimage serve
--model null``, auth off) and ``ours_keyed`` (the same with an API key: auth, credits hold
and settle, rate limit, in-flight limit, metrics). Sequential requests in interleaved blocks
(each block rotates which server goes first), so a busy machine slows all three alike; then
each under load (``LOAD_CONCURRENCY`` clients). The figures to trust are the ratios.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from zimage_server.bench.environment import resolve_device
from zimage_server.bench.runner import (
    BenchConfig,
    Variant,
    _data_dir,
    base_report,
    server_env,
    size_key,
)
from zimage_server.bench.server import BenchError, BenchServer, Client, absolute_pythonpath
from zimage_server.bench.stats import Sample, percentile, summarize
from zimage_server.bench.stock import ModelChoice
from zimage_server.launcher import ServerProcess, ServerStartError

OVERHEAD_SIZE = 256  # the API's smallest size
ARMS = ("floor", "ours", "ours_keyed")
BLOCKS = 10
LOAD_CONCURRENCY = 32
KEY_LIMITS = ["--rate-limit", "1000000/minute", "--max-in-flight", "64"]


def run_overhead(config: BenchConfig) -> dict[str, Any]:
    """Floor, ours and ours with a key: sequential p50/p99, then throughput under load."""
    report = base_report(config, resolve_device(config.device), "overhead")
    body = {**config.body(OVERHEAD_SIZE), "steps": 1}
    requests = config.overhead_requests
    with _servers(config) as (clients, data):
        disk = fsync_ms(data)
        try:
            sequential = _interleaved(clients, body, config.warmup, requests)
            load = {
                arm: clients[arm].throughput(body, LOAD_CONCURRENCY, max(requests, 4 * 32))
                for arm in ARMS
            }
        finally:
            for client in clients.values():
                client.close()
    report["overhead"] = {**figures(body, sequential, load), "disk_fsync_ms": disk}
    return report


def fsync_ms(folder: Path, count: int = 200) -> dict[str, float]:
    """The keyed arm's floor under its floor: each credit hold and capture is a commit, and
    a commit waits for one fsync of the database's disk. Timed here, in the same run, on a
    small append like a WAL commit's, because a shared disk's fsync can swing 0.1 -> 4 ms."""
    times = []
    with open(folder / "fsync-probe", "ab") as probe:
        for _ in range(count):
            probe.write(b"x" * 512)
            probe.flush()
            start = time.perf_counter()
            os.fsync(probe.fileno())
            times.append((time.perf_counter() - start) * 1e3)
    (folder / "fsync-probe").unlink()
    return {f"p{q}": percentile(times, q) for q in (10, 50, 90)}


def figures(
    body: Mapping[str, Any],
    sequential: Mapping[str, list[Sample]],
    load: Mapping[str, tuple[float, list[Sample]]],
) -> dict[str, Any]:
    """``ours``' figures at the top (as before the floor existed), each arm's beside them."""
    arms = {arm: _arm(samples) for arm, samples in sequential.items()}
    for arm, (rate, samples) in load.items():
        arms[arm]["load"] = {
            "concurrency": LOAD_CONCURRENCY,
            "requests": len(samples),
            "requests_s": rate,
            "p50_ms": summarize(samples)["e2e_p50_s"] * 1e3,
            "p99_ms": summarize(samples)["e2e_p99_s"] * 1e3,
        }
    floor = arms["floor"]
    return {
        "size": size_key(OVERHEAD_SIZE),
        "image_format": body["image_format"],
        **arms["ours"],
        "arms": arms,
        "ratio_p50": arms["ours"]["p50_ms"] / floor["p50_ms"],
        "ratio_p50_keyed": arms["ours_keyed"]["p50_ms"] / floor["p50_ms"],
        "load_ratio_requests_s": {
            arm: floor["load"]["requests_s"] / arms[arm]["load"]["requests_s"] for arm in ARMS
        },
        "load_ratio_p99": {
            arm: arms[arm]["load"]["p99_ms"] / floor["load"]["p99_ms"] for arm in ARMS
        },
    }


def _arm(samples: list[Sample]) -> dict[str, Any]:
    summary = summarize(samples)
    return {
        "requests": len(samples),
        "p50_ms": summary["e2e_p50_s"] * 1e3,
        "p90_ms": summary["e2e_p90_s"] * 1e3,
        "p99_ms": summary["e2e_p99_s"] * 1e3,
        "stages_p50_ms": {k: v * 1e3 for k, v in summary["stages_p50_s"].items()},
    }


def _interleaved(
    clients: Mapping[str, Client], body: Mapping[str, Any], warmup: int, requests: int
) -> dict[str, list[Sample]]:
    """``requests`` per arm in ``BLOCKS`` blocks; block ``b`` starts with arm ``b % 3``."""
    for client in clients.values():
        client.timed(body, warmup, 0)
    samples: dict[str, list[Sample]] = {arm: [] for arm in ARMS}
    per_block = -(-requests // BLOCKS)
    for block in range(BLOCKS):
        order = ARMS[block % len(ARMS) :] + ARMS[: block % len(ARMS)]
        for arm in order:
            count = min(per_block, requests - len(samples[arm]))
            samples[arm] += clients[arm].timed(body, 0, count)
    return samples


@contextlib.contextmanager
def _servers(config: BenchConfig) -> Iterator[tuple[dict[str, Client], Path]]:
    with _data_dir(config) as data, contextlib.ExitStack() as stack:
        floor = ServerProcess([], {}, data / "server-floor.log", module="zimage_server.bench.floor")
        stack.enter_context(_started(floor))
        plain = stack.enter_context(_null_server(config, data / "plain", {}))
        keyed_dir = data / "keyed"
        key = _create_key(keyed_dir)
        keyed = stack.enter_context(_null_server(config, keyed_dir, {"ZIMAGE_AUTH": "true"}))
        clients = {
            "floor": Client(floor.url),
            "ours": Client(plain.url),
            "ours_keyed": Client(keyed.url, key),
        }
        yield clients, keyed_dir


@contextlib.contextmanager
def _started(server: ServerProcess) -> Iterator[ServerProcess]:
    try:
        with server.start():
            yield server
    except ServerStartError as exc:
        raise BenchError(str(exc)) from exc


def _null_server(
    config: BenchConfig, data: Path, env: Mapping[str, str], name: str | None = None
) -> BenchServer:
    data.mkdir(parents=True, exist_ok=True)
    model = ModelChoice("null", data)
    settings = {**server_env(config, data, Variant("null")), "ZIMAGE_MAX_QUEUE": "128", **env}
    name = name or ("keyed" if env else "plain")
    return BenchServer(
        [*model.server_args, "--device", "cpu"], settings, data / f"server-{name}.log"
    )


def _create_key(data: Path) -> str:
    """A key with credits for the whole run and limits the load step cannot hit."""
    data.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "zimage_server", "keys", "create", "--name", "bench"]
    env = {**os.environ, **absolute_pythonpath(), "ZIMAGE_DATA_DIR": str(data)}
    done = subprocess.run(  # noqa: S603 (our own interpreter and module)
        [*command, "--credits", "1000000000", *KEY_LIMITS],
        capture_output=True,
        text=True,
        env=env,
        cwd=data,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"could not create a bench key: {done.stderr[-2000:]}")
    return done.stdout.strip().splitlines()[-1]
