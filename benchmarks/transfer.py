"""What moving a rendered image from the worker process to the API process costs.

``engine``: the real path, a ``WorkerHandle`` and its worker process (the null generator),
one image per batch, three workers side by side and requests alternated between them: one
with ``ZIMAGE_SHARED_MEMORY_RESULTS=false`` (``BatchDone`` pickled through the pipe), one
whose slot pool copies each image out of its slot on the API's reader thread (the way
before results were leased: ``shared_memory_copy``), and the default (``shared_memory``:
the image is read in place, a lease on its slot). Each is timed from the generator's
return in the worker to the point the encoder can read the pixels (a buffer over them in
the API process, its last byte read), and the part the worker spent writing (the only part
that delays its next batch).

``synthetic``: the mechanisms alone, as a round trip from a bare child process (``go`` ->
image ready in the parent) minus the round trip of an empty message: pickled through the
pipe, or written into one shared block and read in place (no copy out).

``PYTHONPATH=src python benchmarks/transfer.py [--sizes 1024,2048] [--repeats 30]``
writes ``results/<date>-cpu-transfer-zerocopy.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import statistics
import time
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any

from zimage_server.bench.environment import host_info, today
from zimage_server.core.config import SpeedupSettings, WorkerSettings
from zimage_server.engine.handle import WorkerHandle
from zimage_server.engine.null import NULL_MODEL
from zimage_server.engine.pixels import SharedPixels, pixel_view
from zimage_server.engine.protocol import BatchDone, RawImage, WorkerSpec
from zimage_server.engine.render import RenderSpec
from zimage_server.engine.scheduler import Batch, Scheduler
from zimage_server.engine.shared_results import SlotPool


def shared_buffer(block: SharedMemory) -> memoryview:
    if block.buf is None:
        raise RuntimeError("the shared memory block is closed")
    return block.buf


def child(conn: Connection, shm_name: str) -> None:
    """Answers each request with an empty reply, a pickled image, or a shared-memory one."""
    block = SharedMemory(shm_name)
    images: dict[int, bytes] = {}
    while (request := conn.recv()) is not None:
        mode, size = request
        rgb = images.setdefault(size, bytes(range(256)) * (size * size * 3 // 256))
        if mode == "empty":
            conn.send(None)
        elif mode == "pipe":
            conn.send(BatchDone("b", (RawImage("j", size, size, rgb),), {}, 0, (0,)))
        else:
            shared_buffer(block)[: len(rgb)] = rgb  # the worker's one write, into memory both share
            conn.send(("b", "j", size, size, len(rgb)))
    block.close()


def round_trip(conn: Connection, block: SharedMemory, mode: str, size: int) -> float:
    start = time.perf_counter()
    conn.send((mode, size))
    reply = conn.recv()
    if mode == "shm":
        view = shared_buffer(block)[: reply[4]]  # no copy: Image.frombytes reads a buffer
        if view[1] != 1:  # the bytes the child wrote, read in place
            raise RuntimeError("shared memory did not hold the image")
        view.release()
    return time.perf_counter() - start


def measure(sizes: list[int], repeats: int) -> dict[str, Any]:
    block = SharedMemory(create=True, size=max(sizes) ** 2 * 3)
    parent, other = mp.get_context("spawn").Pipe()
    process = mp.get_context("spawn").Process(target=child, args=(other, block.name))
    process.start()
    results: dict[str, Any] = {}
    try:
        for size in sizes:
            times: dict[str, list[float]] = {"empty": [], "pipe": [], "shm": []}
            for _ in range(repeats + 2):  # interleaved; the first two warm up
                for mode in times:
                    times[mode].append(round_trip(parent, block, mode, size))
            p50 = {mode: statistics.median(t[2:]) * 1e3 for mode, t in times.items()}
            results[f"{size}x{size}"] = {
                "megabytes": size * size * 3 / 1e6,
                "empty_round_trip_ms": p50["empty"],
                "pipe_pickled_ms": p50["pipe"] - p50["empty"],
                "shared_memory_ms": p50["shm"] - p50["empty"],
            }
    finally:
        parent.send(None)
        process.join()
        block.close()
        block.unlink()
    return results


ARMS = ("pipe", "shared_memory_copy", "shared_memory")


def engine_worker(arm: str) -> WorkerHandle:
    settings = WorkerSettings(warmup=False, shared_memory_results=arm != "pipe")
    spec = WorkerSpec(
        name=arm, model_path=NULL_MODEL, device="cpu", worker=settings, speedups=SpeedupSettings()
    )
    pool = SlotPool(arm, copy_out=True) if arm == "shared_memory_copy" else None
    return WorkerHandle(spec, pool=pool)


async def to_encoder(worker: WorkerHandle, size: int, seed: int) -> float:
    """One render; seconds from the generator's return to pixels the encoder can read."""
    done = await worker.render(await one_image(size, seed), lambda *_: None)
    pixels = done.images[0].rgb
    with pixel_view(pixels) as view:
        if view[len(view) - 1] is None:  # read, as the encoder would
            raise RuntimeError("no pixels")
        took = time.perf_counter() - worker.transfer.ready_at
    if isinstance(pixels, SharedPixels):
        pixels.close()  # as the service does once encoded: the slot serves the next batch
    return took


async def one_image(size: int, seed: int) -> Batch:
    scheduler = Scheduler(max_queue=1, max_batch_size=1)
    scheduler.submit(
        RenderSpec(prompt="x", seed=seed, width=size, height=size, steps=1, guidance_scale=1.0)
    )
    return await scheduler.next_batch()


async def measure_engine(sizes: list[int], repeats: int) -> dict[str, Any]:
    workers = {arm: engine_worker(arm) for arm in ARMS}
    for worker in workers.values():
        worker.start()
    results: dict[str, Any] = {}
    try:
        for worker in workers.values():
            if not await worker.wait_ready():
                raise RuntimeError(f"worker {worker.name} did not start: {worker.failure}")
        for size in sizes:
            total: dict[str, list[float]] = {arm: [] for arm in workers}
            write: list[float] = []
            for index in range(repeats + 2):  # alternated; the first two warm up
                for arm, worker in workers.items():
                    total[arm].append(await to_encoder(worker, size, index))
                write.append(workers["shared_memory"].transfer.write_s)
            p50 = {arm: statistics.median(t[2:]) * 1e3 for arm, t in total.items()}
            results[f"{size}x{size}"] = {
                "megabytes": size * size * 3 / 1e6,
                "pipe_pickled_ms": p50["pipe"],
                "shared_memory_copy_ms": p50["shared_memory_copy"],
                "shared_memory_ms": p50["shared_memory"],
                "shared_memory_worker_write_ms": statistics.median(write[2:]) * 1e3,
            }
    finally:
        for worker in workers.values():
            await worker.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1024,2048")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    report: dict[str, Any] = {
        "benchmark": "transfer",
        "device": "cpu",
        "date": today(),
        "command": f"python benchmarks/transfer.py --sizes {args.sizes} --repeats {args.repeats}",
        "host": host_info(),
        "engine": asyncio.run(measure_engine(sizes, args.repeats)),
        "synthetic": measure(sizes, args.repeats),
    }
    for part in ("engine", "synthetic"):
        for size, figures in report[part].items():
            pipe, shared = figures["pipe_pickled_ms"], figures["shared_memory_ms"]
            print(
                f"{part} {size} ({figures['megabytes']:.1f} MB): pipe, pickled {pipe:.2f} ms; ",
                end="",
            )
            copied = figures.get("shared_memory_copy_ms")
            if copied is not None:
                print(f"shared memory, copied out {copied:.2f} ms; ", end="")
            print(f"shared memory, in place {shared:.2f} ms")
    output = (
        args.output or Path(__file__).parent / "results" / f"{today()}-cpu-transfer-zerocopy.json"
    )
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
