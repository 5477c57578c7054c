"""Is the API process the limit? Throughput with one API process, then two, over one store.

``PYTHONPATH=src python benchmarks/scale_out.py`` starts ``zimage serve --model null`` (no
model: every image is a solid colour, so what is measured is the API's own work, mostly the
WebP encode of each 1024x1024 image) once, then twice over one store, and sends v1 requests
round-robin from ``--concurrency`` client threads for ``--seconds``. With two processes each
encodes on its own core: images/s should roughly double where the machine has the cores.
``--database-url`` puts both on PostgreSQL (default: one SQLite file they share).
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import requests
import typer

from zimage_server.launcher import ServerProcess

BODY = {"prompt": "scale-out", "width": 1024, "height": 1024, "steps": 1, "image_format": "webp"}


def drive(urls: list[str], concurrency: int, seconds: float) -> dict[str, Any]:
    """Requests round-robin over ``urls`` for ``seconds``; images/s and per-process counts."""
    turn = itertools.cycle(urls)
    lock = threading.Lock()
    counts = dict.fromkeys(urls, 0)
    errors = 0
    stop = time.monotonic() + seconds

    def client() -> None:
        nonlocal errors
        session = requests.Session()
        while time.monotonic() < stop:
            with lock:
                url = next(turn)
            reply = session.post(
                url + "/v1/z-image-turbo", json=BODY, headers={"Accept": "image/*"}, timeout=60
            )
            with lock:
                if reply.status_code == 200:
                    counts[url] += 1
                else:
                    errors += 1

    start = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - start
    done = sum(counts.values())
    return {
        "processes": len(urls),
        "images": done,
        "errors": errors,
        "seconds": round(elapsed, 2),
        "images_per_s": round(done / elapsed, 2),
        "per_process": list(counts.values()),
    }


def run(
    processes: int, concurrency: int, seconds: float, database_url: str | None
) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="zimage-scale-"))
    env = {
        "ZIMAGE_DATA_DIR": str(folder),
        "ZIMAGE_MAX_QUEUE": "256",
        "ZIMAGE_V1_DEFAULT_RESPONSE": "binary",
        **({"ZIMAGE_DATABASE_URL": database_url} if database_url else {}),
    }
    servers = [
        ServerProcess(("--model", "null", "--no-auth"), env, folder / f"server-{i}.log", cwd=folder)
        for i in range(processes)
    ]
    try:
        for server in servers:
            server.start()
        urls = [server.url for server in servers]
        drive(urls, concurrency, 2.0)  # warm: connections, first encodes
        return drive(urls, concurrency, seconds)
    finally:
        for server in servers:
            server.stop()


def main(
    concurrency: Annotated[int, typer.Option(min=1)] = 8,
    seconds: Annotated[float, typer.Option(min=1)] = 15.0,
    database_url: Annotated[str | None, typer.Option()] = None,
    output: Annotated[Path | None, typer.Option()] = None,
) -> None:
    one = run(1, concurrency, seconds, database_url)
    two = run(2, concurrency, seconds, database_url)
    result = {
        "benchmark": "scale-out (null generator, 1024x1024 WebP, v1 binary)",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "concurrency": concurrency,
        "one_process": one,
        "two_processes": two,
        "speedup": round(two["images_per_s"] / max(one["images_per_s"], 1e-9), 2),
    }
    path = output or Path("benchmarks/results") / f"{datetime.now(UTC):%Y-%m-%d}-cpu-scale-out.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    typer.echo(json.dumps(result, indent=2))


if __name__ == "__main__":
    typer.run(main)
