"""The engine: a ``Scheduler`` feeding each worker's dispatchers. Never imports torch.

Each dispatcher waits for its worker to be ready, takes a batch, has the worker render it
and settles the batch's tickets. A worker has ``1 + dispatch_ahead`` dispatchers, so the
next batch is already queued in the worker while one renders: the device never waits for
the API (result transfer, settling, the next ``next_batch``) between batches. They form
batches one at a time, and the one sent ahead only once the batch before it has begun its
last step, so renders that arrive meanwhile still join it. A worker
that dies fails its batch with ``WorkerDied`` and is restarted by its handle; queued
renders wait for it. A batch taken while its worker became unavailable goes back to the
front of the queue.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from enum import StrEnum
from typing import TypeVar

from zimage_server.core.config import EngineSettings, Settings
from zimage_server.core.errors import (
    Cancelled,
    DeadlineExceeded,
    NotReady,
    WorkerDied,
    ZImageError,
)
from zimage_server.engine.handle import ProgressCallback, WorkerHandle, WorkerLike, WorkerState
from zimage_server.engine.model_source import (
    detect_devices,
    resolve_controlnet,
    resolve_model,
)
from zimage_server.engine.protocol import BatchDone, Preview, WorkerSpec
from zimage_server.engine.render import (
    RenderListener,
    RenderResult,
    RenderSpec,
    RenderUpdate,
    tell,
)
from zimage_server.engine.scheduler import Batch, Clock, Scheduler, Ticket
from zimage_server.telemetry import context

T = TypeVar("T")
BatchListener = Callable[[str, BatchDone], None]  # worker name, its finished batch
log = logging.getLogger("zimage.engine")


class _Lane:
    """One worker's dispatchers: one forms a batch at a time (``forming``), and the next
    is formed once the latest batch sent has begun its last step (or ended)."""

    def __init__(self) -> None:
        self.forming = asyncio.Lock()
        self.running = 0  # batches sent and not yet answered
        self.busy_since: float | None = None
        self._latest: str | None = None
        self._last_step = asyncio.Event()
        self._last_step.set()

    async def turn(self) -> None:
        if self.running:
            await self._last_step.wait()

    def begin(self, batch: Batch) -> None:
        self.running += 1
        if self.busy_since is None:
            self.busy_since = time.monotonic()
        self._latest = batch.id
        if batch.key.steps_run > 1:
            self._last_step.clear()

    def stepped(self, batch: Batch, step: int, total: int) -> None:
        if batch.id == self._latest and step >= total - 1:
            self._last_step.set()

    def end(self, batch: Batch) -> None:
        self.running -= 1
        if not self.running:
            self.busy_since = None
        if batch.id == self._latest:
            self._last_step.set()


class EngineState(StrEnum):
    STARTING = "STARTING"
    READY = "READY"
    FAILED = "FAILED"
    STOPPED = "STOPPED"


class Engine:
    """Queue, batch and dispatch renders to workers (``WorkerHandle`` processes)."""

    def __init__(
        self,
        settings: EngineSettings,
        workers: Sequence[WorkerLike],
        *,
        clock: Clock = time.monotonic,
    ) -> None:
        self.scheduler = Scheduler(
            max_queue=settings.max_queue,
            max_batch_size=settings.max_batch_size,
            batch_wait_s=settings.batch_wait_ms / 1000,
            clock=clock,
        )
        self._workers = {worker.name: worker for worker in workers}
        self._dispatchers = 1 + settings.dispatch_ahead  # per worker
        self._lanes = {worker.name: _Lane() for worker in workers}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._listeners: list[RenderListener] = []
        self._batch_listeners: list[BatchListener] = []
        self.model_label = "custom workers"

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        on_progress: ProgressCallback | None = None,
        *,
        max_devices: int | None = None,
    ) -> Engine:
        """One worker process per device (at most ``max_devices``), configured from
        ``settings``. Raises ``StartupError`` with a one-line reason when the model or
        the device is missing."""
        source = resolve_model(settings)
        controlnet = resolve_controlnet(settings)
        devices = detect_devices(settings.device)[:max_devices]
        specs = [
            WorkerSpec(
                name=f"worker-{index}",
                model_path=source.path,
                device=device,
                worker=settings.worker,
                speedups=settings.speedups,
                loras=settings.loras,
                compile_cache_dir=str(settings.compile_cache_dir),
                build_tiny_at=source.path if source.build_tiny else None,
                controlnet_path=controlnet,
            )
            for index, device in enumerate(devices)
        ]
        engine = cls(settings.engine, [WorkerHandle(spec, on_progress) for spec in specs])
        engine.model_label = source.label
        return engine

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Spawn the workers and return at once; readiness is reported by ``state``."""
        for worker in self._workers.values():
            worker.start()
            for _ in range(self._dispatchers):
                self._tasks.append(asyncio.create_task(self._dispatch_forever(worker)))

    async def stop(self) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(worker.stop() for worker in self._workers.values()))
        self.scheduler.fail_queued(NotReady("The server is shutting down."))

    # -- state ---------------------------------------------------------------------------
    @property
    def state(self) -> EngineState:
        states = {worker.state for worker in self._workers.values()}
        if states & {WorkerState.READY, WorkerState.BUSY} and not self._stopping:
            return EngineState.READY
        if self._stopping:
            return EngineState.STOPPED
        if states == {WorkerState.FAILED}:
            return EngineState.FAILED
        return EngineState.STARTING

    @property
    def max_queue(self) -> int:
        return self.scheduler.max_queue

    @property
    def failure(self) -> str | None:
        return next((w.failure for w in self._workers.values() if w.failure), None)

    @property
    def depth(self) -> int:
        return self.scheduler.depth

    def restarts(self) -> float:
        return float(sum(worker.restarts for worker in self._workers.values()))

    def load_seconds(self) -> float:
        return max((worker.load_s for worker in self._workers.values()), default=0.0)

    def watch(self, listener: RenderListener) -> None:
        """Tell ``listener`` each render's queueing, start and steps (with previews)."""
        self._listeners.append(listener)

    def watch_batches(self, listener: BatchListener) -> None:
        """Tell ``listener`` each finished batch and its worker: the LoRA cache and the
        device's memory after it (for ``/metrics``)."""
        self._batch_listeners.append(listener)

    def _tell_batch(self, worker: str, done: BatchDone) -> None:
        for listener in self._batch_listeners:
            try:
                listener(worker, done)
            except Exception:  # metrics must not fail a render
                log.exception("a batch listener failed")

    def _tell(self, update: RenderUpdate) -> None:
        tell(self._listeners, update)

    def _tell_steps(
        self, batch: Batch, step: int, total: int, previews: tuple[Preview, ...]
    ) -> None:
        self.scheduler.report_step(batch, step, total)
        by_id = {preview.job_id: preview for preview in previews}
        for ticket in batch.live():
            self._tell(
                RenderUpdate(
                    render_id=ticket.id,
                    stage="step",
                    step=step,
                    total=total,
                    preview=by_id.get(ticket.id),
                )
            )

    # -- requests ------------------------------------------------------------------------
    def admit(self, reserve: str | None = None) -> None:
        """Raise ``Overloaded`` when the queue is full, ``NotReady`` when the model failed;
        ``reserve`` keeps the place taken until that job's render is queued."""
        if self.state == EngineState.FAILED:
            raise NotReady(f"The model failed to load: {self.failure}", retry_after=60)
        self.scheduler.check_room(self._ready_workers())
        if reserve is not None:
            self.scheduler.reserve(reserve)

    def unreserve(self, job_id: str) -> None:
        self.scheduler.unreserve(job_id)

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
        ticket = self.scheduler.submit(spec, ticket_id=job_id, request_id=context.request_id.get())
        self._hint_queued(ticket)
        if self._listeners:
            position = self.scheduler.position(ticket.id)
            self._tell(RenderUpdate(render_id=ticket.id, stage="queued", position=position))
        try:
            result = await asyncio.wait_for(asyncio.shield(ticket.future), max(timeout, 0.001))
        except TimeoutError:
            self._withdraw(ticket)
            raise DeadlineExceeded(
                f"The request did not finish within its {timeout:g}s deadline."
            ) from None
        except asyncio.CancelledError:
            self._withdraw(ticket)
            raise
        return dataclasses.replace(
            result, timings={"queue_wait": ticket.queue_wait, **result.timings}
        )

    def position(self, job_id: str) -> int | None:
        return self.scheduler.position(job_id)

    def progress(self, job_id: str) -> tuple[int, int] | None:
        return self.scheduler.progress(job_id)

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued render at once, or a running one between denoising steps."""
        ticket = self.scheduler.get(job_id)
        if ticket is None:
            return False
        self._withdraw(ticket, Cancelled("The request was cancelled."))
        return True

    def _withdraw(self, ticket: Ticket, error: ZImageError | None = None) -> None:
        worker = self.scheduler.withdraw(ticket, error)
        if worker is not None:
            self._workers[worker].cancel(ticket.id)

    def _ready_workers(self) -> int:
        live = (WorkerState.READY, WorkerState.BUSY)
        return sum(1 for worker in self._workers.values() if worker.state in live)

    # -- dispatch ------------------------------------------------------------------------
    async def _dispatch_forever(self, worker: WorkerLike) -> None:
        lane = self._lanes[worker.name]
        while await worker.wait_ready():
            await lane.forming.acquire()
            try:
                batch = await self._take(worker, lane)
            finally:
                # The next dispatcher wakes only once this one awaits its render: sent.
                lane.forming.release()
            if batch is not None:
                await self._run(worker, batch)
        if self.state == EngineState.FAILED:
            self.scheduler.fail_queued(
                NotReady(f"The model failed to load: {self.failure}", retry_after=60)
            )

    async def _take(self, worker: WorkerLike, lane: _Lane) -> Batch | None:
        await lane.turn()
        batch = await self.scheduler.next_batch()
        if not worker.accepting:  # it died (or took another batch) while we waited
            self.scheduler.requeue(batch)
            return None
        return batch

    async def _run(self, worker: WorkerLike, batch: Batch) -> None:
        self.scheduler.start(batch, worker.name)
        lane = self._lanes[worker.name]
        lane.begin(batch)
        self._hint_next(worker)
        total = batch.key.steps_run  # fewer than ``steps`` for an input image
        for ticket in batch.tickets:
            self._tell(RenderUpdate(render_id=ticket.id, stage="started", total=total))

        def on_step(step: int, total: int, previews: tuple[Preview, ...] = ()) -> None:
            lane.stepped(batch, step, total)
            self._tell_steps(batch, step, total, previews)

        try:
            done = await worker.render(batch, on_step)
        except ZImageError as exc:
            self.scheduler.fail(batch, exc)
        except Exception:  # a bug must neither leave callers waiting nor stop dispatching
            log.exception("batch %s failed in the engine", batch.id)
            self.scheduler.fail(batch, WorkerDied("The engine failed while rendering this."))
        else:
            self.scheduler.complete(batch, _results(done, worker.name))
            self._tell_batch(worker.name, done)
        finally:
            lane.end(batch)

    def _hint_next(self, worker: WorkerLike) -> None:
        """A batch just went to ``worker``: let it encode the next batch's prompts meanwhile."""
        queued = self.scheduler.peek(self.scheduler.max_batch_size)
        if queued and worker.prefetches:
            worker.prefetch(tuple(ticket.spec.cache_key for ticket in queued))

    def _hint_queued(self, ticket: Ticket) -> None:
        """Every worker busy and ``ticket`` in the next round: hint the one that started first."""
        busy = {
            n: lane.busy_since for n, lane in self._lanes.items() if lane.busy_since is not None
        }
        if not busy or len(busy) < len(self._workers):
            return
        first = self._workers[min(busy, key=busy.__getitem__)]
        next_round = self.scheduler.max_batch_size * len(busy)
        if first.prefetches and len(self.scheduler.peek(next_round + 1)) <= next_round:
            first.prefetch((ticket.spec.cache_key,))


def _results(done: BatchDone, worker: str) -> list[RenderResult]:
    """One ``RenderResult`` per image of the batch, in the batch's order."""
    size = len(done.images)
    return [
        RenderResult(
            rgb=image.rgb,
            width=image.width,
            height=image.height,
            timings=dict(done.timings),
            transformer_passes=done.transformer_passes,
            batch_size=size,
            prompt_tokens=_at(done.prompt_tokens, index, 0),
            worker=worker,
            prompt_source=_at(done.prompt_sources, index, ""),
        )
        for index, image in enumerate(done.images)
    ]


def _at(values: tuple[T, ...], index: int, default: T) -> T:
    return values[index] if index < len(values) else default
