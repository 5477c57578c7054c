"""The worker process: owns one device and the pipeline on it.

A reader thread takes commands off the pipe (so a ``Cancel`` lands while a batch is
rendering); the main thread renders batches one at a time and answers with events.
If the API process goes away the pipe closes and the worker exits.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from zimage_server.engine.generator import (
    Cancelled,
    GeneratorConfig,
    ImageGenerator,
    make_generator,
)
from zimage_server.engine.protocol import (
    BatchFailed,
    Cancel,
    Event,
    LoadFailed,
    LoadProgress,
    Prefetch,
    Ready,
    RenderBatch,
    Shutdown,
    StepProgress,
)

log = logging.getLogger("zimage.worker")


@dataclass(frozen=True)
class WorkerConfig:
    generator: GeneratorConfig
    warmup: bool = True
    build_tiny_at: str | None = None  # build the tiny model here first if it is missing


class _Outbox:
    """Thread-safe sender: the render loop and the step callback both send."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    def send(self, event: Event) -> None:
        with self._lock:
            self._conn.send(event)


def _read_commands(
    conn: Connection,
    inbox: queue.Queue[RenderBatch | None],
    cancelled: set[str],
    prefetches: queue.Queue[Prefetch] | None,
) -> None:
    while True:
        try:
            command = conn.recv()
        except (EOFError, OSError):
            break
        if isinstance(command, RenderBatch):
            inbox.put(command)
        elif isinstance(command, Cancel):
            cancelled.add(command.job_id)
        elif isinstance(command, Prefetch) and prefetches is not None:
            prefetches.put(command)
        elif isinstance(command, Shutdown):
            break
    inbox.put(None)


def prefetch_forever(generator: ImageGenerator, prefetches: queue.Queue[Prefetch]) -> None:
    """Encode the prompts of queued renders while the current batch denoises.

    Best effort: a failure here only means the render encodes its prompt itself.
    """
    while True:
        hint = prefetches.get()
        try:
            generator.prefetch(list(hint.prompts))
        except Exception:
            log.warning("prompt prefetch failed:\n%s", traceback.format_exc())


def _load(config: WorkerConfig, out: _Outbox) -> ImageGenerator | None:
    start = time.perf_counter()
    try:
        if config.build_tiny_at and not (Path(config.build_tiny_at) / "model_index.json").exists():
            from zimage_server.engine.tiny import build_tiny_model

            out.send(LoadProgress("building the tiny model", 0, 3))
            build_tiny_model(Path(config.build_tiny_at))
        generator = make_generator(config.generator)
        generator.load(lambda stage, i, n: out.send(LoadProgress(stage, i, n)))
        if config.warmup:
            out.send(LoadProgress("warming up", 3, 3))
            generator.warmup()
    except Exception as exc:  # any load failure is reported, not raised into the void
        log.error("model load failed:\n%s", traceback.format_exc())
        out.send(LoadFailed(f"{type(exc).__name__}: {exc}"))
        return None
    out.send(Ready(config.generator.device, generator.dtype_name, time.perf_counter() - start))
    return generator


def inject_faults(batch: RenderBatch) -> None:
    """The fault-injection seam: prompt markers provoke real failures in this process.

    ``[[fault:oom]]`` raises torch's own out-of-memory error, ``[[fault:error]]`` a plain
    exception, ``[[fault:exit]]`` kills the worker mid-batch. Only with ``debug_faults``.
    """
    prompts = " ".join(item.prompt for item in batch.items)
    if "[[fault:exit]]" in prompts:
        os._exit(3)
    if "[[fault:oom]]" in prompts:
        import torch

        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected by [[fault:oom]])")
    if "[[fault:error]]" in prompts:
        raise RuntimeError("injected by [[fault:error]]")


def _render(
    generator: ImageGenerator,
    batch: RenderBatch,
    cancelled: set[str],
    out: _Outbox,
    faults: bool = False,
) -> None:
    job_ids = {item.job_id for item in batch.items}
    try:
        if faults:
            inject_faults(batch)
        done = generator.generate(
            batch,
            on_step=lambda step, total: out.send(StepProgress(batch.batch_id, step, total)),
            is_cancelled=lambda: job_ids <= cancelled,
        )
    except Cancelled:
        out.send(BatchFailed(batch.batch_id, "cancelled", "cancelled"))
    except Exception as exc:
        requests = ",".join(item.request_id or item.job_id for item in batch.items)
        log.error(
            "batch %s (requests %s) failed:\n%s", batch.batch_id, requests, traceback.format_exc()
        )
        kind = "oom" if "OutOfMemory" in type(exc).__name__ else "error"
        if kind == "oom":
            _release_accelerator_memory()
        out.send(BatchFailed(batch.batch_id, kind, f"{type(exc).__name__}: {exc}"))
    else:
        out.send(done)
    finally:
        cancelled.difference_update(job_ids)


def _release_accelerator_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def worker_main(conn: Connection, config: WorkerConfig) -> None:
    """Entry point of the worker process (spawned, so it starts from a clean interpreter)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(message)s")
    out = _Outbox(conn)
    inbox: queue.Queue[RenderBatch | None] = queue.Queue()
    speedups, device = config.generator.speedups, config.generator.device
    prefetches = queue.Queue[Prefetch]() if speedups.enabled(speedups.prefetch, device) else None
    cancelled: set[str] = set()
    reader = threading.Thread(
        target=_read_commands, args=(conn, inbox, cancelled, prefetches), daemon=True
    )
    reader.start()
    generator = _load(config, out)
    if generator is None:
        return
    if prefetches is not None:
        args = (generator, prefetches)
        threading.Thread(target=prefetch_forever, args=args, daemon=True).start()
    while (batch := inbox.get()) is not None:
        _render(generator, batch, cancelled, out, config.generator.faults)
