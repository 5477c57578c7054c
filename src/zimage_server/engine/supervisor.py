"""API-side half of the engine: a bounded queue, a batcher and one worker process per device.

Never imports torch. Requests wait in one queue; each worker's dispatcher takes the oldest
request plus compatible ones (same size, steps and guidance) up to the batch size, sends
them over the pipe and resolves their futures from the worker's events. A worker that
dies fails its in-flight batch with ``WorkerDied`` and is started again; queued requests
simply wait for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import multiprocessing as mp
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from multiprocessing.connection import Connection
from typing import Any

from zimage_server.core.errors import (
    Cancelled,
    DeadlineExceeded,
    GenerationFailed,
    NotReady,
    Overloaded,
    WorkerDied,
)
from zimage_server.engine.generator import GeneratorConfig
from zimage_server.engine.protocol import (
    BatchDone,
    BatchFailed,
    Cancel,
    Command,
    Event,
    LoadFailed,
    LoadProgress,
    Prefetch,
    Ready,
    RenderBatch,
    RenderItem,
    Shutdown,
    StepProgress,
)
from zimage_server.engine.speedups import Speedups
from zimage_server.engine.worker import WorkerConfig, worker_main
from zimage_server.telemetry import context

log = logging.getLogger("zimage.engine")
ProgressCallback = Callable[[str, str, int, int], None]  # worker, stage, step, total
MAX_LOAD_FAILURES = 3


class EngineState(StrEnum):
    STARTING = "STARTING"
    READY = "READY"
    FAILED = "FAILED"
    STOPPED = "STOPPED"


@dataclass(frozen=True, slots=True)
class RenderSpec:
    """One image to render; width and height are multiples of 16."""

    prompt: str
    seed: int
    width: int
    height: int
    steps: int
    guidance_scale: float

    def batch_key(self) -> tuple[int, int, int, float]:
        return (self.width, self.height, self.steps, self.guidance_scale)


@dataclass(frozen=True, slots=True)
class RenderResult:
    rgb: bytes
    width: int
    height: int
    timings: dict[str, float]
    transformer_passes: int  # for the whole batch
    batch_size: int
    prompt_tokens: int
    worker: str
    prompt_source: str = ""  # encoded | cache | prefetch ("" from a generator without one)


@dataclass
class _Job:
    spec: RenderSpec
    future: asyncio.Future[RenderResult]
    id: str
    enqueued_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    progress: tuple[int, int] = (0, 0)
    request_id: str = field(default_factory=context.request_id.get)


@dataclass(frozen=True)
class EngineConfig:
    model_path: str
    devices: tuple[str, ...]
    max_queue: int = 16
    max_batch_size: int = 1
    batch_wait_s: float = 0.0
    warmup: bool = True
    warmup_size: int = 1024
    warmup_steps: int = 2
    step_delay_s: float = 0.0
    faults: bool = False
    build_tiny_at: str | None = None
    start_timeout_s: float = 900.0
    speedups: Speedups = field(default_factory=Speedups)
    warmup_sizes: tuple[int, ...] = ()


class _Worker:
    """One worker process and the dispatcher that feeds it."""

    def __init__(self, engine: Engine, name: str, device: str) -> None:
        self.engine, self.name, self.device = engine, name, device
        self.ready = asyncio.Event()
        self.state = EngineState.STARTING
        self.failure: str | None = None
        self.load_failures = 0
        self.restarts = 0
        self.process: Any = None
        self.conn: Connection | None = None
        self.batch: tuple[str, list[_Job]] | None = None
        self.batch_started = 0.0
        self.batch_done: asyncio.Future[None] | None = None
        self.last_batch_s = 1.0
        self.load_s = 0.0

    # -- process lifecycle -------------------------------------------------------------
    def spawn(self) -> None:
        cfg = self.engine.config
        gen = GeneratorConfig(
            cfg.model_path,
            self.device,
            cfg.warmup_size,
            cfg.warmup_steps,
            cfg.step_delay_s,
            cfg.faults,
            cfg.speedups,
            cfg.warmup_sizes,
        )
        wcfg = WorkerConfig(gen, cfg.warmup, cfg.build_tiny_at)
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        self.process = ctx.Process(
            target=worker_main, args=(child, wcfg), name=self.name, daemon=True
        )
        self.process.start()
        child.close()
        self.conn = parent
        self.state = EngineState.STARTING
        loop = asyncio.get_running_loop()
        threading.Thread(target=self._read, args=(parent, loop), daemon=True).start()
        log.info("worker %s started on %s (pid %s)", self.name, self.device, self.process.pid)

    def _read(self, conn: Connection, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            try:
                event = conn.recv()
            except (EOFError, OSError):
                break
            loop.call_soon_threadsafe(self.on_event, event)
        with contextlib.suppress(RuntimeError):  # loop closed during shutdown
            loop.call_soon_threadsafe(self.on_exit, conn)

    def send(self, command: Command) -> None:
        if self.conn is not None:
            with contextlib.suppress(OSError):
                self.conn.send(command)

    # -- events --------------------------------------------------------------------------
    def on_event(self, event: Event) -> None:
        if isinstance(event, LoadProgress):
            self.engine.report_progress(self.name, event.stage, event.step, event.total)
        elif isinstance(event, Ready):
            log.info(
                "worker %s ready on %s (%s) in %.1fs",
                self.name,
                event.device,
                event.dtype,
                event.load_s,
            )
            self.state, self.failure, self.load_failures = EngineState.READY, None, 0
            self.load_s = event.load_s
            self.engine.report_progress(self.name, "ready", 1, 1)
            self.ready.set()
        elif isinstance(event, LoadFailed):
            self.load_failures += 1
            self.failure = event.error
            log.error("worker %s failed to load the model: %s", self.name, event.error)
        elif isinstance(event, StepProgress) and self.batch and self.batch[0] == event.batch_id:
            for job in self.batch[1]:
                job.progress = (event.step, event.total)
        elif isinstance(event, BatchDone | BatchFailed):
            self._finish_batch(event)

    def _finish_batch(self, event: BatchDone | BatchFailed) -> None:
        if not self.batch or self.batch[0] != event.batch_id:
            return
        _, jobs = self.batch
        self.batch = None
        if isinstance(event, BatchFailed) and event.kind == "cancelled":
            log.info("batch %s cancelled between steps", event.batch_id)
        for index, job in enumerate(jobs):
            if job.future.done():
                continue
            if isinstance(event, BatchDone):
                job.future.set_result(self._result(job, event, index, len(jobs)))
            else:
                job.future.set_exception(GenerationFailed(_failure_message(event, jobs)))
        if self.batch_done and not self.batch_done.done():
            self.batch_done.set_result(None)

    def _result(self, job: _Job, event: BatchDone, index: int, size: int) -> RenderResult:
        image = event.images[index]
        tokens = event.prompt_tokens[index] if index < len(event.prompt_tokens) else 0
        source = event.prompt_sources[index] if index < len(event.prompt_sources) else ""
        return RenderResult(
            image.rgb,
            image.width,
            image.height,
            dict(event.timings),
            event.transformer_passes,
            size,
            tokens,
            self.name,
            source,
        )

    def on_exit(self, conn: Connection) -> None:
        if conn is not self.conn:
            return
        self.conn = None
        self.ready.clear()
        if self.process is not None:
            # A worker whose pipe is gone is useless even if alive: end it, then reap it
            # (no zombie). It has normally exited already, so this does not wait.
            if self.process.is_alive():
                self.process.kill()
            self.process.join(timeout=1)
        code = self.process.exitcode if self.process else None
        if self.batch:
            _, jobs = self.batch
            self.batch = None
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(
                        WorkerDied(
                            "The worker process died while rendering this request "
                            f"(exit code {code}); it has been restarted. Retry the request."
                        )
                    )
            if self.batch_done and not self.batch_done.done():
                self.batch_done.set_result(None)
        if self.engine.stopping:
            self.state = EngineState.STOPPED
            return
        if self.load_failures >= MAX_LOAD_FAILURES:
            self.state = EngineState.FAILED
            log.error("worker %s gave up after %d failed loads", self.name, self.load_failures)
            self.engine.fail_pending_if_dead()
            return
        self.restarts += 1
        log.warning("worker %s exited (code %s); restarting", self.name, code)
        self.spawn()

    # -- dispatch ------------------------------------------------------------------------
    async def dispatch_forever(self) -> None:
        while not self.engine.stopping:
            await self.ready.wait()
            jobs = await self.engine.take_batch()
            if not jobs or not self.ready.is_set():
                self.engine.requeue(jobs)
                continue
            await self._run(jobs)

    async def _run(self, jobs: list[_Job]) -> None:
        batch_id = secrets.token_hex(6)
        spec = jobs[0].spec
        now = time.perf_counter()
        self.batch_started = now
        for job in jobs:
            job.progress, job.started_at = (0, spec.steps), now
        items = tuple(
            RenderItem(job.id, job.spec.prompt, job.spec.seed, job.request_id) for job in jobs
        )
        self.batch = (batch_id, jobs)
        self.batch_done = asyncio.get_running_loop().create_future()
        self.send(
            RenderBatch(batch_id, items, spec.width, spec.height, spec.steps, spec.guidance_scale)
        )
        self.engine.hint_next(self)
        await self.batch_done
        self.last_batch_s = time.perf_counter() - now

    def cancel(self, job: _Job) -> None:
        if self.batch and job in self.batch[1]:
            self.send(Cancel(job.id))


class Engine:
    """Queue, batch and dispatch renders to worker processes."""

    def __init__(self, config: EngineConfig, on_progress: ProgressCallback | None = None) -> None:
        self.config = config
        self.on_progress = on_progress
        self.stopping = False
        self._pending: deque[_Job] = deque()
        self._wakeup = asyncio.Event()
        self._workers: list[_Worker] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._index: dict[str, _Job] = {}

    async def start(self) -> None:
        """Spawn the workers and return at once; readiness is reported by ``state``."""
        for index, device in enumerate(self.config.devices):
            worker = _Worker(self, f"worker-{index}", device)
            worker.spawn()
            self._workers.append(worker)
            self._tasks.append(asyncio.create_task(worker.dispatch_forever()))

    async def stop(self) -> None:
        self.stopping = True
        for task in self._tasks:
            task.cancel()
        for worker in self._workers:
            worker.send(Shutdown())
        for worker in self._workers:
            if worker.process is not None:
                await asyncio.to_thread(worker.process.join, 10)
                if worker.process.is_alive():
                    worker.process.kill()
        for job in self._pending:
            if not job.future.done():
                job.future.set_exception(NotReady("The server is shutting down."))
        self._pending.clear()

    # -- state -----------------------------------------------------------------------------
    @property
    def state(self) -> EngineState:
        states = {worker.state for worker in self._workers}
        if EngineState.READY in states:
            return EngineState.READY
        if states == {EngineState.FAILED}:
            return EngineState.FAILED
        if self.stopping:
            return EngineState.STOPPED
        return EngineState.STARTING

    @property
    def max_queue(self) -> int:
        return self.config.max_queue

    @property
    def failure(self) -> str | None:
        return next((w.failure for w in self._workers if w.failure), None)

    def restarts(self) -> float:
        return float(sum(w.restarts for w in self._workers))

    def load_seconds(self) -> float:
        return max((w.load_s for w in self._workers), default=0.0)

    @property
    def depth(self) -> int:
        running = sum(len(w.batch[1]) for w in self._workers if w.batch)
        return len(self._pending) + running

    def report_progress(self, worker: str, stage: str, step: int, total: int) -> None:
        if self.on_progress:
            self.on_progress(worker, stage, step, total)

    # -- requests --------------------------------------------------------------------------
    async def render(
        self,
        spec: RenderSpec,
        timeout: float,
        job_id: str | None = None,
        admitted: bool = False,
    ) -> RenderResult:
        """Queue one render and wait for it.

        Raises ``Overloaded`` (queue full; skipped when ``admitted``, e.g. for jobs recovered
        at restart), ``DeadlineExceeded``, ``Cancelled``, ``WorkerDied``, ``GenerationFailed``.
        """
        if not admitted:
            self.admit()
        loop = asyncio.get_running_loop()
        job = _Job(spec, loop.create_future(), job_id or secrets.token_hex(8))
        self._pending.append(job)
        self._index[job.id] = job
        self._wakeup.set()
        self._hint_queued(job)
        try:
            result = await asyncio.wait_for(asyncio.shield(job.future), max(timeout, 0.001))
        except TimeoutError:
            self._abandon(job)
            raise DeadlineExceeded(
                f"The request did not finish within its {timeout:g}s deadline."
            ) from None
        except asyncio.CancelledError:
            self._abandon(job)
            raise
        finally:
            self._index.pop(job.id, None)
        wait = (job.started_at or job.enqueued_at) - job.enqueued_at
        return dataclasses.replace(result, timings={"queue_wait": wait, **result.timings})

    def position(self, job_id: str) -> int | None:
        """0 for the next to run; None when not waiting (running, done or unknown)."""
        job = self._index.get(job_id)
        if job is None or job not in self._pending:
            return None
        return self._pending.index(job)

    def progress(self, job_id: str) -> tuple[int, int] | None:
        """(step, total) of a running render; None when it is not running."""
        job = self._index.get(job_id)
        return job.progress if job is not None and job.started_at is not None else None

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued render at once, or a running one between denoising steps."""
        job = self._index.get(job_id)
        if job is None or job.future.done():
            return False
        job.future.set_exception(Cancelled("The request was cancelled."))
        self._abandon(job)
        return True

    def admit(self) -> None:
        """Raise ``Overloaded`` when the queue is full, ``NotReady`` when the model failed."""
        if self.state == EngineState.FAILED:
            raise NotReady(f"The model failed to load: {self.failure}", retry_after=60)
        if self.depth >= self.config.max_queue:
            raise Overloaded(
                f"The queue is full ({self.config.max_queue} requests waiting or running). "
                "Retry later.",
                retry_after=self._retry_after(),
            )

    def _retry_after(self) -> int:
        ready = max(1, sum(1 for w in self._workers if w.ready.is_set()))
        per_batch = max(w.last_batch_s for w in self._workers) if self._workers else 1.0
        return max(1, math.ceil(per_batch * self.depth / (ready * self.config.max_batch_size)))

    def hint_next(self, worker: _Worker) -> None:
        """A batch just went to ``worker``: let it encode the next batch's prompts meanwhile."""
        if self._pending and self._prefetches(worker):
            queued = list(self._pending)[: self.config.max_batch_size]
            worker.send(Prefetch(tuple(job.spec.prompt for job in queued)))

    def _hint_queued(self, job: _Job) -> None:
        """Every worker busy and ``job`` in the next round: hint the one that started first."""
        busy = [w for w in self._workers if w.ready.is_set() and w.batch is not None]
        if not busy or len(busy) < len(self._workers):
            return
        first = min(busy, key=lambda w: w.batch_started)
        if self._prefetches(first) and len(self._pending) <= self.config.max_batch_size * len(busy):
            first.send(Prefetch((job.spec.prompt,)))

    def _prefetches(self, worker: _Worker) -> bool:
        """Whether ``worker`` acts on hints (``auto``: CUDA only); others would drop them."""
        speedups = self.config.speedups
        return speedups.enabled(speedups.prefetch, worker.device)

    def _abandon(self, job: _Job) -> None:
        if job in self._pending:
            self._pending.remove(job)
        for worker in self._workers:
            worker.cancel(job)
        if not job.future.done():
            job.future.cancel()

    async def take_batch(self) -> list[_Job]:
        """Wait for a request, then gather compatible ones up to the batch size."""
        while not self._pending:
            self._wakeup.clear()
            await self._wakeup.wait()
        first = self._pending.popleft()
        jobs = [first, *self._take_compatible(first, self.config.max_batch_size - 1)]
        if self.config.batch_wait_s and len(jobs) < self.config.max_batch_size:
            await asyncio.sleep(self.config.batch_wait_s)
            jobs += self._take_compatible(first, self.config.max_batch_size - len(jobs))
        return [job for job in jobs if not job.future.done()]

    def _take_compatible(self, first: _Job, limit: int) -> list[_Job]:
        key = first.spec.batch_key()
        taken = [job for job in self._pending if job.spec.batch_key() == key][: max(0, limit)]
        for job in taken:
            self._pending.remove(job)
        return taken

    def fail_pending_if_dead(self) -> None:
        if self.state != EngineState.FAILED:
            return
        while self._pending:
            job = self._pending.popleft()
            if not job.future.done():
                job.future.set_exception(NotReady(f"The model failed to load: {self.failure}", 60))

    def requeue(self, jobs: list[_Job]) -> None:
        self._pending.extendleft(reversed(jobs))


def _failure_message(event: BatchFailed, jobs: list[_Job]) -> str:
    if event.kind == "oom":
        spec = jobs[0].spec
        return (
            f"Out of accelerator memory rendering {len(jobs)} image(s) of "
            f"{spec.width}x{spec.height}; try a smaller size. The server is still serving."
        )
    return f"Generation failed: {event.message}"
