"""The API side of one worker process: it owns the process's whole life.

``WorkerHandle`` spawns the process, watches its pipe, restarts it when it dies, gives up
after repeated failed loads, and renders batches: ``render`` sends the batch and returns
the worker's ``BatchDone`` or raises the typed error it ended with. It takes a batch while
another renders (BUSY): the worker queues it, so the device never waits for the API between
batches. Its state is one enum with checked transitions; the engine never reads anything
else of it.

Images come back in shared-memory slots lent with each batch (``shared_results``), each
as a lease read in place (``SharedPixels``). The pipe is read by a thread rather than
``loop.add_reader``: unpickling an image sent without a slot there keeps that copy off the
event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing as mp
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerContext, SpawnContext
from multiprocessing.process import BaseProcess
from typing import Protocol

from zimage_server.core.errors import (
    Cancelled,
    GenerationFailed,
    InvalidRequest,
    TaskNotConfigured,
    WorkerDied,
    ZImageError,
)
from zimage_server.engine.protocol import (
    BatchDone,
    BatchFailed,
    Cancel,
    Command,
    Event,
    LoadFailed,
    LoadProgress,
    Prefetch,
    Preview,
    Prompt,
    Ready,
    RenderBatch,
    RenderItem,
    Shutdown,
    StepProgress,
    WorkerSpec,
)
from zimage_server.engine.scheduler import Batch
from zimage_server.engine.shared_results import (
    RenderInto,
    ResultsReady,
    Slot,
    SlotPool,
    TransferTime,
)
from zimage_server.engine.worker import worker_main

log = logging.getLogger("zimage.engine")
ProgressCallback = Callable[[str, str, int, int], None]  # worker, stage, step, total


class StepCallback(Protocol):
    """Told each finished step, with the previews of the images that asked for them."""

    def __call__(self, step: int, total: int, previews: tuple[Preview, ...] = ()) -> None: ...


MAX_LOAD_FAILURES = 3
# Restarts back off (0.5, 1, 2, ... up to 30 s) while exits come in a streak: a worker that
# dies at once (killed at import, a segfault) must not be restarted hundreds of times a
# second. A run that stayed up STABLE_RUN_S ends the streak.
RESTART_DELAY_S = 0.5
MAX_RESTART_DELAY_S = 30.0
STABLE_RUN_S = 60.0
# Imported once by the forkserver; an import that fails there is simply done in the worker.
PRELOAD = ("zimage_server.engine.worker", "zimage_server.engine.generator")
STOP_TIMEOUT_S = 10.0
GIB = 2**30


class WorkerState(StrEnum):
    STARTING = "STARTING"  # process spawned, model loading
    READY = "READY"  # idle: can take a batch
    BUSY = "BUSY"  # rendering a batch; takes the next one ahead
    FAILED = "FAILED"  # gave up after MAX_LOAD_FAILURES failed loads
    STOPPED = "STOPPED"

    @property
    def is_terminal(self) -> bool:
        return self in (WorkerState.FAILED, WorkerState.STOPPED)


_MOVES: dict[WorkerState, frozenset[WorkerState]] = {
    WorkerState.STARTING: frozenset(
        {WorkerState.STARTING, WorkerState.READY, WorkerState.FAILED, WorkerState.STOPPED}
    ),
    WorkerState.READY: frozenset({WorkerState.BUSY, WorkerState.STARTING, WorkerState.STOPPED}),
    WorkerState.BUSY: frozenset({WorkerState.READY, WorkerState.STARTING, WorkerState.STOPPED}),
    WorkerState.FAILED: frozenset({WorkerState.STOPPED}),
    WorkerState.STOPPED: frozenset(),
}


class WorkerLike(Protocol):
    """What the engine needs of a worker; tests implement it without a process."""

    name: str

    @property
    def state(self) -> WorkerState: ...

    @property
    def prefetches(self) -> bool: ...

    @property
    def failure(self) -> str | None: ...

    @property
    def restarts(self) -> int: ...

    @property
    def load_s(self) -> float: ...

    @property
    def accepting(self) -> bool:
        """Whether it takes a batch now (a worker that queues batches: also while BUSY)."""

    def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def wait_ready(self) -> bool: ...

    async def render(self, batch: Batch, on_step: StepCallback) -> BatchDone: ...

    def cancel(self, ticket_id: str) -> None: ...

    def prefetch(self, prompts: tuple[Prompt, ...]) -> None: ...


@dataclass(eq=False)
class _InFlight:
    """A batch sent to the worker (rendering, or queued there), and where its outcome goes."""

    batch: Batch
    outcome: asyncio.Future[BatchDone]
    on_step: StepCallback
    slots: tuple[Slot, ...] = ()  # lent until the worker answers for the batch


class WorkerHandle:
    """One worker process on one device: spawn, watch, restart, render."""

    def __init__(
        self,
        spec: WorkerSpec,
        on_progress: ProgressCallback | None = None,
        pool: SlotPool | None = None,  # benchmarks compare pools; None: the default one
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self._on_progress = on_progress
        self._state = WorkerState.STARTING
        self._state_changed = asyncio.Event()
        self._failure: str | None = None
        self._load_error: str | None = None  # why the current start failed, if it said
        self._load_failures = 0
        self._restarts = 0
        self._load_s = 0.0
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None
        self._in_flight: dict[str, _InFlight] = {}  # by batch id, in the order sent
        shared = spec.worker.shared_memory_results
        self._pool = (pool or SlotPool(spec.name)) if shared else None
        self._transfer = TransferTime(0.0, 0.0, 0.0)
        self._start_timer: asyncio.TimerHandle | None = None
        self._restart_timer: asyncio.TimerHandle | None = None
        self._exit_streak = 0
        self._ready_at: float | None = None

    # -- read-only view ------------------------------------------------------------------
    @property
    def state(self) -> WorkerState:
        return self._state

    @property
    def prefetches(self) -> bool:
        return self.spec.prefetches

    @property
    def failure(self) -> str | None:
        return self._failure

    @property
    def restarts(self) -> int:
        return self._restarts

    @property
    def load_s(self) -> float:
        return self._load_s

    @property
    def accepting(self) -> bool:
        return self._state in (WorkerState.READY, WorkerState.BUSY)

    @property
    def transfer(self) -> TransferTime:
        """What moving the last batch's images from the worker took (benchmarks read it)."""
        return self._transfer

    def _move(self, new: WorkerState) -> None:
        if new not in _MOVES[self._state]:
            raise RuntimeError(f"worker {self.name}: {self._state} -> {new} is not allowed")
        self._state = new
        self._state_changed.set()
        self._state_changed = asyncio.Event()

    async def wait_ready(self) -> bool:
        """Wait until the worker can take a batch (idle, or busy and queueing the next);
        False when it never will again."""
        while self._state == WorkerState.STARTING:
            await self._state_changed.wait()
        return self.accepting

    # -- process lifecycle ---------------------------------------------------------------
    def start(self) -> None:
        """Spawn the worker process; a spawn that fails counts as a failed load."""
        try:
            self._spawn()
        except Exception as exc:  # e.g. the forkserver could not be started
            log.exception("worker %s could not be started", self.name)
            self._exited(f"the worker process could not be started ({exc!r})", loaded=False)

    def _spawn(self) -> None:
        self._load_error = None
        ctx = _process_context(self.spec.device)
        parent, child = ctx.Pipe()
        process = ctx.Process(
            target=worker_main, args=(child, self.spec), name=self.name, daemon=True
        )
        process.start()
        child.close()
        self._process, self._conn = process, parent
        loop = asyncio.get_running_loop()
        timeout = self.spec.worker.worker_start_timeout_s
        self._start_timer = loop.call_later(timeout, self._start_timed_out, parent)
        threading.Thread(target=self._read, args=(parent, loop), daemon=True).start()
        log.info("worker %s started on %s (pid %s)", self.name, self.spec.device, process.pid)

    def _read(self, conn: Connection, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            try:
                event = conn.recv()
            except (EOFError, OSError):
                break
            if isinstance(event, logging.LogRecord):
                loop.call_soon_threadsafe(self._relog, event)
            elif isinstance(event, ResultsReady):
                loop.call_soon_threadsafe(self._on_results, self._collect(event), event)
            else:
                loop.call_soon_threadsafe(self._on_event, event)
        with contextlib.suppress(RuntimeError):  # loop closed during shutdown
            loop.call_soon_threadsafe(self._on_exit, conn)

    def _collect(self, ready: ResultsReady) -> BatchDone | BatchFailed:
        """The images leased from their slots (on the reader thread)."""
        if self._pool is None or not any(ready.slots):
            return ready.done
        try:
            return self._pool.collect(ready)
        except RuntimeError as exc:  # the pool was closed under it (stopping)
            return BatchFailed(ready.done.batch_id, "error", str(exc))

    def _on_results(self, done: BatchDone | BatchFailed, ready: ResultsReady) -> None:
        now = time.perf_counter()
        write_s, total_s = ready.placed_at - ready.ready_at, now - ready.ready_at
        self._transfer = TransferTime(write_s, total_s, ready.ready_at)
        self._on_event(done)

    def _relog(self, record: logging.LogRecord) -> None:
        """A worker's record, logged here in the run's one format, named after its worker."""
        logger = logging.getLogger(record.name)
        if logger.isEnabledFor(record.levelno):
            record.msg = f"{self.name}: {record.msg}"
            record.worker = self.name
            record.threadName = threading.current_thread().name  # handled on this loop
            logger.handle(record)

    def _send(self, command: Command | RenderInto) -> bool:
        if self._conn is None:
            return False
        try:
            self._conn.send(command)
        except OSError:
            return False
        return True

    def _start_timed_out(self, conn: Connection) -> None:
        if conn is not self._conn or self._state != WorkerState.STARTING:
            return
        timeout = self.spec.worker.worker_start_timeout_s
        self._failure = self._load_error = f"the worker did not load the model within {timeout:g}s"
        log.error("worker %s: %s; ending it", self.name, self._failure)
        self._kill()

    def _kill(self) -> None:
        if self._process is not None and self._process.is_alive():
            self._process.kill()

    def _on_exit(self, conn: Connection) -> None:
        if conn is not self._conn:
            return
        self._conn = None
        if self._start_timer is not None:
            self._start_timer.cancel()
        code = self._reap()
        if self._pool is not None:  # the worker is gone: nothing writes to them now
            self._pool.close()
        died = WorkerDied(
            "The worker process died while rendering this request "
            f"({_describe_exit(code)}); it is being restarted. Retry the request."
        )
        if self._in_flight:  # the one rendering; those queued behind it go to the next process
            self._fail(next(iter(self._in_flight)), died)
        loaded = self._state != WorkerState.STARTING
        self._exited(f"the worker {_describe_exit(code)}", loaded)

    def _exited(self, why: str, loaded: bool) -> None:
        """Count the exit, then restart after a back-off or, after too many failed loads,
        give up (FAILED, with the reason)."""
        if self._state.is_terminal:
            return
        if not loaded:  # it never became ready: a failed load
            self._load_failures += 1
            self._failure = self._load_error or f"{why} while loading the model"
        if self._load_failures >= MAX_LOAD_FAILURES:
            self._failure = f"{self._failure} ({self._load_failures} failed starts)"
            log.error("worker %s gave up: %s", self.name, self._failure)
            self._move(WorkerState.FAILED)
            self._fail_all(WorkerDied(f"The worker cannot start: {self._failure}."))
            return
        stable = self._ready_at is not None and time.monotonic() - self._ready_at >= STABLE_RUN_S
        self._exit_streak = 1 if stable else self._exit_streak + 1
        self._ready_at = None
        delay = min(RESTART_DELAY_S * 2 ** (self._exit_streak - 1), MAX_RESTART_DELAY_S)
        if loaded:
            self._failure = f"{why} after it was ready"
        log.warning("worker %s: %s; restarting in %gs", self.name, why, delay)
        self._restarts += 1
        self._move(WorkerState.STARTING)
        loop = asyncio.get_running_loop()
        self._restart_timer = loop.call_later(delay, self._restart)

    def _restart(self) -> None:
        self._restart_timer = None
        if self._state == WorkerState.STARTING:
            self.start()

    def _reap(self) -> int | None:
        """End a worker whose pipe is gone (useless even if alive), then reap it: no zombie.
        It has normally exited already, so this does not wait."""
        if self._process is None:
            return None
        self._kill()
        self._process.join(timeout=1)
        return self._process.exitcode

    async def stop(self) -> None:
        if self._restart_timer is not None:
            self._restart_timer.cancel()
        if self._state != WorkerState.STOPPED:
            self._move(WorkerState.STOPPED)
        self._send(Shutdown())
        process = self._process
        if process is not None:
            await asyncio.to_thread(process.join, STOP_TIMEOUT_S)
            if process.is_alive():
                process.kill()
                await asyncio.to_thread(process.join, 1)
        self._fail_all(WorkerDied("The worker was stopped."))
        if self._pool is not None:
            self._pool.close()

    # -- events --------------------------------------------------------------------------
    def _on_event(self, event: Event) -> None:
        if isinstance(event, LoadProgress):
            self._progress(event.stage, event.step, event.total)
        elif isinstance(event, Ready):
            self._on_ready(event)
        elif isinstance(event, LoadFailed):
            self._failure = self._load_error = event.error
            log.error("worker %s failed to load the model: %s", self.name, event.error)
        elif (flight := self._in_flight.get(event.batch_id)) is None:
            return  # about a batch that was already given up on
        elif isinstance(event, StepProgress):
            flight.on_step(event.step, event.total, event.previews)
        elif isinstance(event, BatchDone):
            outcome = self._end_batch(event.batch_id)
            if not outcome.done():  # its awaiter may be gone (cancelled at shutdown)
                outcome.set_result(event)
        else:
            self._fail(event.batch_id, _batch_error(event, flight.batch))

    def _on_ready(self, event: Ready) -> None:
        memory = event.memory
        held = (
            ""
            if memory is None
            else f", {memory.allocated / GIB:.1f} of {memory.total / GIB:.0f} GiB"
        )
        log.info(
            "worker %s ready on %s (%s%s) in %.1fs",
            self.name,
            event.device,
            event.dtype,
            held,
            event.load_s,
        )
        if self._start_timer is not None:
            self._start_timer.cancel()
        self._failure, self._load_failures, self._load_s = None, 0, event.load_s
        self._ready_at = time.monotonic()
        if self._state == WorkerState.STARTING:
            self._move(WorkerState.READY)
            self._resend()
        self._progress("ready", 1, 1)

    def _progress(self, stage: str, step: int, total: int) -> None:
        if self._on_progress is not None:
            self._on_progress(self.name, stage, step, total)

    def _end_batch(self, batch_id: str) -> asyncio.Future[BatchDone]:
        """Forget a batch the worker answered for (or that died with it): its slots are
        free again (but those leased to its images), and with nothing left in flight the
        worker is READY."""
        flight = self._in_flight.pop(batch_id)
        if self._pool is not None:
            self._pool.give_back(flight.slots, batch_id)
        if not self._in_flight and self._state == WorkerState.BUSY:
            self._move(WorkerState.READY)
        return flight.outcome

    def _fail(self, batch_id: str, error: ZImageError) -> None:
        outcome = self._end_batch(batch_id)
        if not outcome.done():
            outcome.set_exception(error)

    def _fail_all(self, error: ZImageError) -> None:
        for batch_id in list(self._in_flight):
            self._fail(batch_id, error)

    # -- rendering -----------------------------------------------------------------------
    async def render(self, batch: Batch, on_step: StepCallback) -> BatchDone:
        """Render ``batch`` (queued behind the one rendering, if any); raises
        ``WorkerDied``, ``GenerationFailed`` or ``Cancelled``."""
        if self._state != WorkerState.BUSY:
            self._move(WorkerState.BUSY)
        flight = _InFlight(batch, asyncio.get_running_loop().create_future(), on_step)
        self._in_flight[batch.id] = flight
        self._dispatch(flight)
        return await flight.outcome

    def _dispatch(self, flight: _InFlight) -> None:
        """Lend the batch its slots and send it."""
        command = _render_command(flight.batch)
        flight.slots = self._pool.lend(command) if self._pool is not None else ()
        if not self._send(RenderInto(command, flight.slots)):
            self._fail(
                flight.batch.id, WorkerDied("The worker process is gone; retry the request.")
            )

    def _resend(self) -> None:
        """A restarted worker gets the batches that were queued in the one that died, in
        order (they never started); those nobody waits for any more end as cancelled."""
        if not self._in_flight:
            return
        self._move(WorkerState.BUSY)
        for flight in list(self._in_flight.values()):
            if flight.batch.live():
                self._dispatch(flight)
            else:
                self._fail(flight.batch.id, Cancelled("The request was cancelled."))

    def cancel(self, ticket_id: str) -> None:
        """Ask the worker to stop between steps once every image of its batch is cancelled."""
        self._send(Cancel(ticket_id))

    def prefetch(self, prompts: tuple[Prompt, ...]) -> None:
        if self.prefetches and prompts:
            self._send(Prefetch(prompts))


def _process_context(device: str) -> ForkServerContext | SpawnContext:
    """CPU workers fork from a server process that has already imported torch and diffusers,
    so a worker (re)starts in a fraction of a second instead of importing them again
    (seconds). Accelerator workers are spawned: importing diffusers (with torchao, say) can
    initialise CUDA in the fork server, and CUDA cannot be used in a process forked after
    that (seen on an H200); a few seconds of imports are small beside loading the weights.
    ``spawn`` too where forkserver does not exist."""
    if device != "cpu" or "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOAD))
    return ctx


def _describe_exit(code: int | None) -> str:
    """``exited with code 1`` or ``was killed by SIGKILL``: what an operator can act on."""
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def _render_command(batch: Batch) -> RenderBatch:
    key = batch.key
    items = tuple(
        RenderItem(
            ticket.id,
            ticket.spec.prompt,
            ticket.spec.seed,
            ticket.request_id,
            ticket.spec.tenant,
            ticket.spec.preview_size,
            ticket.spec.image,
            ticket.spec.mask,
            ticket.spec.control,
        )
        for ticket in batch.tickets
    )
    return RenderBatch(
        batch.id,
        items,
        key.width,
        key.height,
        key.steps,
        key.guidance_scale,
        key.loras,
        key.task,
        key.strength,
        key.control_scale,
    )


def _batch_error(event: BatchFailed, batch: Batch) -> ZImageError:
    if event.kind == "cancelled":
        log.info("batch %s cancelled between steps", event.batch_id)
        return Cancelled("The request was cancelled.")
    if event.kind == "oom":
        key = batch.key
        return GenerationFailed(
            f"Out of accelerator memory rendering {len(batch.tickets)} image(s) of "
            f"{key.width}x{key.height}; try a smaller size. The server is still serving."
        )
    if event.kind == "invalid":
        return InvalidRequest(f"Invalid 'loras': {event.message}", field="loras")
    if event.kind == "unconfigured":
        return TaskNotConfigured(event.message)
    return GenerationFailed(f"Generation failed: {event.message}")
