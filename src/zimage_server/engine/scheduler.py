"""The scheduler: one bounded queue of renders, batched by key. No process, pipe or clock
of its own (the clock is injected), so every rule here is unit-tested in milliseconds.

A render is a ``Ticket`` whose future the caller awaits. Dispatchers (one per worker) take
a ``Batch`` (the oldest ticket plus queued ones with an equal ``BatchKey``), ``start`` it,
and end it with ``complete``, ``fail`` or ``requeue``. ``withdraw`` takes one ticket out at
any point: at once while it waits; while it runs, its future is settled and the caller
tells the worker to stop between steps.
"""

from __future__ import annotations

import asyncio
import copy
import math
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from zimage_server.core.errors import Overloaded
from zimage_server.engine.render import BatchKey, RenderResult, RenderSpec

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
FIRST_BATCH_ESTIMATE_S = 1.0  # for Retry-After before any batch has finished
SMOOTHING = 0.3  # weight of the newest batch in the moving average of batch time


@dataclass(eq=False, kw_only=True)
class Ticket:
    """One render, from submit until its future is settled."""

    id: str
    spec: RenderSpec
    future: asyncio.Future[RenderResult]
    enqueued_at: float
    request_id: str = ""
    key: BatchKey = field(init=False)
    started_at: float | None = None
    worker: str | None = None  # set while a worker renders it
    step: tuple[int, int] | None = None  # (step, total) while running

    def __post_init__(self) -> None:
        self.key = self.spec.batch_key()

    @property
    def queue_wait(self) -> float:
        return (self.started_at or self.enqueued_at) - self.enqueued_at


@dataclass(frozen=True, eq=False, kw_only=True)
class Batch:
    """Tickets with one key, rendered in one pipeline call."""

    id: str
    key: BatchKey
    tickets: tuple[Ticket, ...]

    def live(self) -> list[Ticket]:
        """The tickets whose callers still wait."""
        return [ticket for ticket in self.tickets if not ticket.future.done()]


class Scheduler:
    """Queue, admission bound, batching by key, cancel, requeue and Retry-After."""

    def __init__(
        self,
        *,
        max_queue: int,
        max_batch_size: int,
        batch_wait_s: float = 0.0,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.max_queue = max_queue
        self.max_batch_size = max_batch_size
        self._batch_wait_s = batch_wait_s
        self._clock = clock
        self._sleep = sleep
        self._queue: deque[Ticket] = deque()
        self._tickets: dict[str, Ticket] = {}  # every ticket not yet settled
        self._reserved: set[str] = set()  # admitted jobs whose render is not queued yet
        self._arrived = asyncio.Event()
        self._batch_s = FIRST_BATCH_ESTIMATE_S

    # -- admission and submit ------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Tickets waiting or running, and places reserved: what the queue bound counts."""
        return len(self._tickets) + len(self._reserved)

    def reserve(self, ticket_id: str) -> None:
        """Hold a place (checked by the caller) for a render queued later under this id,
        so admissions that await between check and submit cannot overfill the queue."""
        self._reserved.add(ticket_id)

    def unreserve(self, ticket_id: str) -> None:
        self._reserved.discard(ticket_id)

    def check_room(self, workers: int) -> None:
        """Raise ``Overloaded`` (with a Retry-After estimate) when the queue is full."""
        if self.depth >= self.max_queue:
            raise Overloaded(
                f"The queue is full ({self.max_queue} requests waiting or running). Retry later.",
                retry_after=self.retry_after(workers),
            )

    def retry_after(self, workers: int) -> int:
        """Seconds until the queue has likely drained, from the moving batch time."""
        per_round = max(1, workers) * self.max_batch_size
        return max(1, math.ceil(self._batch_s * self.depth / per_round))

    def submit(
        self, spec: RenderSpec, *, ticket_id: str | None = None, request_id: str = ""
    ) -> Ticket:
        """Queue a render (the caller checked the room); the caller awaits ``ticket.future``."""
        ticket = Ticket(
            id=ticket_id or secrets.token_hex(8),
            spec=spec,
            future=asyncio.get_running_loop().create_future(),
            enqueued_at=self._clock(),
            request_id=request_id,
        )
        self._reserved.discard(ticket.id)
        self._tickets[ticket.id] = ticket
        self._queue.append(ticket)
        self._arrived.set()
        return ticket

    # -- batching ------------------------------------------------------------------------
    async def next_batch(self) -> Batch:
        """Wait for a ticket, then gather queued ones with its key up to the batch size."""
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            first = self._queue.popleft()
            tickets = [first, *self._take(first.key, self.max_batch_size - 1)]
            if self._batch_wait_s and len(tickets) < self.max_batch_size:
                await self._sleep(self._batch_wait_s)
                tickets += self._take(first.key, self.max_batch_size - len(tickets))
            live = [ticket for ticket in tickets if not ticket.future.done()]
            if live:
                return Batch(id=secrets.token_hex(6), key=first.key, tickets=tuple(live))

    def _take(self, key: BatchKey, limit: int) -> list[Ticket]:
        taken = [ticket for ticket in self._queue if ticket.key == key][: max(0, limit)]
        for ticket in taken:
            self._queue.remove(ticket)
        return taken

    def peek(self, count: int) -> list[Ticket]:
        """The next ``count`` queued tickets (for prefetch hints)."""
        return list(self._queue)[:count]

    def start(self, batch: Batch, worker: str) -> None:
        now = self._clock()
        for ticket in batch.tickets:
            ticket.started_at, ticket.worker = now, worker
            ticket.step = (0, ticket.spec.batch_key().steps_run)

    def report_step(self, batch: Batch, step: int, total: int) -> None:
        for ticket in batch.tickets:
            ticket.step = (step, total)

    # -- ending a batch ------------------------------------------------------------------
    def complete(self, batch: Batch, results: Sequence[RenderResult]) -> None:
        """Settle each ticket with its image (``results`` in ticket order)."""
        self._record_batch_time(batch)
        for ticket, result in zip(batch.tickets, results, strict=True):
            self._settle(ticket)
            if not ticket.future.done():
                ticket.future.set_result(result)

    def fail(self, batch: Batch, error: BaseException) -> None:
        """Settle every ticket still waiting with (a copy of) ``error``."""
        self._record_batch_time(batch)
        for ticket in batch.tickets:
            self._settle(ticket)
            if not ticket.future.done():
                ticket.future.set_exception(copy.copy(error))

    def requeue(self, batch: Batch) -> None:
        """Put a batch that never reached a worker back at the front, in order."""
        live = batch.live()
        for ticket in live:
            ticket.started_at = ticket.worker = ticket.step = None
        self._queue.extendleft(reversed(live))
        if live:
            self._arrived.set()

    def fail_queued(self, error: BaseException) -> None:
        """Settle every waiting ticket with ``error`` (the engine failed or is stopping)."""
        while self._queue:
            ticket = self._queue.popleft()
            self._settle(ticket)
            if not ticket.future.done():
                ticket.future.set_exception(copy.copy(error))

    def _record_batch_time(self, batch: Batch) -> None:
        started = batch.tickets[0].started_at
        if started is not None:
            took = self._clock() - started
            self._batch_s = (1 - SMOOTHING) * self._batch_s + SMOOTHING * took

    def _settle(self, ticket: Ticket) -> None:
        self._tickets.pop(ticket.id, None)

    # -- one ticket ----------------------------------------------------------------------
    def get(self, ticket_id: str) -> Ticket | None:
        return self._tickets.get(ticket_id)

    def withdraw(self, ticket: Ticket, error: BaseException | None = None) -> str | None:
        """Take ``ticket`` out: settle it with ``error`` (or cancel its future when nobody
        waits any more). Returns the worker rendering it, which should be told to stop."""
        if ticket in self._queue:
            self._queue.remove(ticket)
        self._settle(ticket)
        if not ticket.future.done():
            if error is None:
                ticket.future.cancel()
            else:
                ticket.future.set_exception(error)
        return ticket.worker

    def position(self, ticket_id: str) -> int | None:
        """0 for the next to run; None when not waiting (running, done or unknown)."""
        ticket = self._tickets.get(ticket_id)
        if ticket is None or ticket.started_at is not None:
            return None
        try:
            return self._queue.index(ticket)
        except ValueError:  # being gathered into a batch
            return 0

    def progress(self, ticket_id: str) -> tuple[int, int] | None:
        """(step, total) of a running render; None when it is not running."""
        ticket = self._tickets.get(ticket_id)
        return ticket.step if ticket is not None else None
