"""Soak: minutes of traffic at a sustainable rate through the real pipeline; memory of
the API process and of the worker must stay flat. Figures go to artifacts/soak.json
(RELIABILITY.md reports them). ZIMAGE_SOAK_S sets the duration (default 300 s)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator

import psutil
import pytest
import requests

from tests.conftest import ROOT, Server

BODY = {"prompt": "a soak test", "width": 256, "height": 256, "steps": 2, "image_format": "webp"}
PACE_S = 0.25  # a little idle time between requests: sustainable, not saturating


def rss_mib(server: Server) -> dict[str, float]:
    api = psutil.Process(server.proc.pid).memory_info().rss
    workers = sum(psutil.Process(pid).memory_info().rss for pid in server.worker_pids())
    return {"api_mib": round(api / 2**20, 1), "worker_mib": round(workers / 2**20, 1)}


@pytest.fixture(scope="module")
def soak_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server(tmp_path_factory.mktemp("soak"))
    yield server
    server.stop()


@pytest.mark.timeout(1200)
def test_memory_stays_flat_under_sustained_load(soak_server: Server) -> None:
    duration = float(os.environ.get("ZIMAGE_SOAK_S", "300"))
    for _ in range(30):  # warm caches and allocator pools before the baseline
        assert soak_server.post(BODY).status_code == 200
    start = rss_mib(soak_server)
    statuses: dict[int, int] = {}
    latencies = []
    end_at = time.monotonic() + duration
    while time.monotonic() < end_at:
        began = time.monotonic()
        status = soak_server.post({**BODY, "seed": len(latencies)}).status_code
        latencies.append(time.monotonic() - began)
        statuses[status] = statuses.get(status, 0) + 1
        time.sleep(PACE_S)
    end = rss_mib(soak_server)
    latencies.sort()
    report = {
        "duration_s": duration,
        "requests": len(latencies),
        "statuses": statuses,
        "rate_per_s": round(len(latencies) / duration, 2),
        "p50_s": round(latencies[len(latencies) // 2], 3),
        "p99_s": round(latencies[int(len(latencies) * 0.99)], 3),
        "rss_start": start,
        "rss_end": end,
    }
    out = ROOT / "artifacts"
    out.mkdir(exist_ok=True)
    (out / "soak.json").write_text(json.dumps(report, indent=2) + "\n")
    assert statuses == {200: len(latencies)}
    for part in ("api_mib", "worker_mib"):
        assert end[part] <= start[part] * 1.15 + 40, report
    assert requests.get(soak_server.url + "/readyz", timeout=5).status_code == 200
