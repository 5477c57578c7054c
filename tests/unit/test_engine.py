"""The engine with fake workers: dispatch, batching, death, requeue, failure, cancel.

``FakeWorker`` implements the engine's ``WorkerLike`` interface in memory, so each rule of
the engine is checked without a process (the real handle has its own tests).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from zimage_server.core.config import EngineSettings
from zimage_server.core.errors import (
    Cancelled,
    DeadlineExceeded,
    NotReady,
    Overloaded,
    WorkerDied,
)
from zimage_server.engine import Engine, EngineState, RenderSpec
from zimage_server.engine.handle import WorkerState
from zimage_server.engine.protocol import BatchDone, Prompt, RawImage
from zimage_server.engine.scheduler import Batch

T = TypeVar("T")


def run(test: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(test(), 5))  # type: ignore[arg-type]


class FakeWorker:
    """A worker whose batches finish when the test says so (or at once with ``auto``)."""

    def __init__(self, name: str = "w0", *, auto: bool = True, prefetches: bool = False) -> None:
        self.name = name
        self.auto = auto
        self._state = WorkerState.STARTING
        self._changed = asyncio.Event()
        self.batches: list[Batch] = []
        self.outcome: asyncio.Future[BatchDone] | None = None
        self.cancelled: list[str] = []
        self.hints: list[tuple[Prompt, ...]] = []
        self._prefetches = prefetches
        self.failure: str | None = None
        self.restarts = 0
        self.load_s = 0.5

    @property
    def state(self) -> WorkerState:
        return self._state

    @property
    def prefetches(self) -> bool:
        return self._prefetches

    @property
    def accepting(self) -> bool:
        return self._state == WorkerState.READY  # one batch at a time

    def set(self, state: WorkerState) -> None:
        self._state = state
        self._changed.set()
        self._changed = asyncio.Event()

    def start(self) -> None:
        self.set(WorkerState.READY)

    async def stop(self) -> None:
        self.set(WorkerState.STOPPED)

    async def wait_ready(self) -> bool:
        while self._state in (WorkerState.STARTING, WorkerState.BUSY):
            await self._changed.wait()
        return self._state == WorkerState.READY

    async def render(self, batch: Batch, on_step: Callable[[int, int], None]) -> BatchDone:
        self.batches.append(batch)
        self.set(WorkerState.BUSY)
        on_step(1, batch.key.steps)
        self.outcome = asyncio.get_running_loop().create_future()
        if self.auto:
            self.outcome.set_result(done(batch))
        try:
            return await self.outcome
        finally:
            if self._state == WorkerState.BUSY:
                self.set(WorkerState.READY)

    def die(self) -> None:
        """The process died mid-batch; the handle restarts it."""
        assert self.outcome is not None
        self.restarts += 1
        self.set(WorkerState.STARTING)
        self.outcome.set_exception(WorkerDied("The worker process died."))

    def cancel(self, ticket_id: str) -> None:
        self.cancelled.append(ticket_id)

    def prefetch(self, prompts: tuple[Prompt, ...]) -> None:
        self.hints.append(prompts)


def done(batch: Batch) -> BatchDone:
    images = tuple(
        RawImage(t.id, batch.key.width, batch.key.height, t.spec.prompt.encode())
        for t in batch.tickets
    )
    return BatchDone(batch.id, images, {"denoise": 0.1}, len(images), (7,) * len(images))


def spec(prompt: str = "a fox", size: int = 256) -> RenderSpec:
    return RenderSpec(prompt=prompt, seed=1, width=size, height=size, steps=8, guidance_scale=1.0)


def engine(*workers: FakeWorker, **settings: int) -> Engine:
    return Engine(EngineSettings(**settings), list(workers))


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0)


def test_renders_go_to_a_ready_worker_and_come_back_with_their_image() -> None:
    async def scenario() -> None:
        worker = FakeWorker()
        e = engine(worker)
        assert e.state == EngineState.STARTING
        await e.start()
        assert e.state == EngineState.READY
        result = await e.render(spec("hello"), timeout=5)
        assert result.rgb == b"hello" and result.worker == "w0" and result.prompt_tokens == 7
        assert set(result.timings) == {"queue_wait", "denoise"}
        await e.stop()
        assert e.state == EngineState.STOPPED

    run(scenario)


def test_compatible_renders_queued_behind_a_busy_worker_share_a_batch() -> None:
    async def scenario() -> None:
        worker = FakeWorker(auto=False)
        e = engine(worker, max_batch_size=4)
        await e.start()
        first = asyncio.ensure_future(e.render(spec("first"), 5))
        await until(lambda: worker.outcome is not None)
        later = [
            asyncio.ensure_future(e.render(spec(p, size), 5))
            for p, size in [("b", 256), ("c", 512), ("d", 256)]
        ]
        await until(lambda: e.depth == 4)
        assert e.position(e.scheduler.peek(1)[0].id) == 0
        worker.outcome.set_result(done(worker.batches[0]))  # type: ignore[union-attr]
        await first
        await until(lambda: len(worker.batches) == 2)
        assert [t.spec.prompt for t in worker.batches[1].tickets] == ["b", "d"]
        worker.auto = True
        worker.outcome.set_result(done(worker.batches[1]))  # type: ignore[union-attr]
        results = await asyncio.gather(*later)
        assert [r.batch_size for r in results] == [2, 1, 2]
        await e.stop()

    run(scenario)


def test_a_worker_death_fails_its_batch_and_the_queue_waits_for_the_restart() -> None:
    async def scenario() -> None:
        worker = FakeWorker(auto=False)
        e = engine(worker, max_batch_size=1)
        await e.start()
        running = asyncio.ensure_future(e.render(spec("running"), 5))
        await until(lambda: worker.outcome is not None)
        queued = asyncio.ensure_future(e.render(spec("queued"), 5))
        await until(lambda: e.depth == 2)
        worker.die()
        with pytest.raises(WorkerDied):
            await running
        assert not queued.done() and e.state == EngineState.STARTING and e.restarts() == 1
        worker.auto = True
        worker.set(WorkerState.READY)  # the restarted process loaded the model
        assert (await queued).rgb == b"queued"
        await e.stop()

    run(scenario)


def test_a_batch_taken_while_the_worker_went_away_is_requeued_not_lost() -> None:
    async def scenario() -> None:
        worker = FakeWorker()
        e = engine(worker)
        await e.start()
        await asyncio.sleep(0)  # the dispatcher now waits for work
        worker.set(WorkerState.STARTING)  # the process died while idle
        pending = asyncio.ensure_future(e.render(spec("kept"), 5, admitted=True))
        for _ in range(5):
            await asyncio.sleep(0)
        assert worker.batches == [] and not pending.done()
        assert e.position(e.scheduler.peek(1)[0].id) == 0  # back in the queue
        worker.set(WorkerState.READY)
        assert (await pending).rgb == b"kept"
        await e.stop()

    run(scenario)


def test_when_every_worker_failed_new_renders_are_refused_and_queued_ones_fail() -> None:
    async def scenario() -> None:
        worker = FakeWorker(auto=False)
        e = engine(worker, max_batch_size=1)
        await e.start()
        running = asyncio.ensure_future(e.render(spec(), 5))
        await until(lambda: worker.outcome is not None)
        queued = asyncio.ensure_future(e.render(spec(), 5))
        await until(lambda: e.depth == 2)
        worker.failure = "OSError: no weights"
        worker.die()
        worker.set(WorkerState.FAILED)
        with pytest.raises(WorkerDied):
            await running
        with pytest.raises(NotReady, match="no weights"):
            await queued
        assert e.state == EngineState.FAILED
        with pytest.raises(NotReady, match="failed to load"):
            e.admit()
        await e.stop()

    run(scenario)


def test_cancel_reaches_the_worker_rendering_it() -> None:
    async def scenario() -> None:
        worker = FakeWorker(auto=False)
        e = engine(worker)
        await e.start()
        task = asyncio.ensure_future(e.render(spec(), 5, job_id="job-1"))
        await until(lambda: worker.outcome is not None)
        assert e.progress("job-1") == (1, 8)
        assert e.cancel("job-1") is True
        with pytest.raises(Cancelled):
            await task
        assert worker.cancelled == ["job-1"] and e.cancel("job-1") is False
        assert e.cancel("unknown") is False
        await e.stop()

    run(scenario)


def test_a_missed_deadline_frees_the_slot_and_stops_the_render() -> None:
    async def scenario() -> None:
        worker = FakeWorker(auto=False)
        e = engine(worker)
        await e.start()
        with pytest.raises(DeadlineExceeded, match=r"0\.05s deadline"):
            await e.render(spec(), timeout=0.05, job_id="slow")
        assert worker.cancelled == ["slow"] and e.depth == 0
        await e.stop()

    run(scenario)


def test_a_full_queue_answers_overloaded_with_retry_after() -> None:
    async def scenario() -> None:
        worker = FakeWorker(auto=False)
        e = engine(worker, max_queue=2, max_batch_size=1)
        await e.start()
        tasks = [asyncio.ensure_future(e.render(spec(), 5)) for _ in range(2)]
        await until(lambda: e.depth == 2)
        with pytest.raises(Overloaded) as refused:
            await e.render(spec(), 5)
        assert refused.value.retry_after >= 1
        recovered = asyncio.ensure_future(e.render(spec(), 5, admitted=True))  # skips the bound
        await until(lambda: e.depth == 3)
        worker.auto = True
        worker.outcome.set_result(done(worker.batches[0]))  # type: ignore[union-attr]
        await asyncio.gather(*tasks, recovered)
        await e.stop()

    run(scenario)


def test_queued_prompts_are_hinted_to_a_worker_that_prefetches() -> None:
    async def scenario() -> None:
        worker = FakeWorker(auto=False, prefetches=True)
        e = engine(worker, max_batch_size=1)
        await e.start()
        first = asyncio.ensure_future(e.render(spec("first"), 5))
        await until(lambda: worker.outcome is not None)
        second = asyncio.ensure_future(e.render(spec("second"), 5))
        await until(lambda: e.depth == 2)
        assert worker.hints == [(Prompt("", "second"),)]  # queued while every worker was busy
        worker.auto = True
        worker.outcome.set_result(done(worker.batches[0]))  # type: ignore[union-attr]
        await asyncio.gather(first, second)
        await e.stop()

    run(scenario)


def test_stop_fails_what_is_still_queued() -> None:
    async def scenario() -> None:
        worker = FakeWorker(auto=False)
        e = engine(worker, max_batch_size=1)
        await e.start()
        running = asyncio.ensure_future(e.render(spec(), 5))
        await until(lambda: worker.outcome is not None)
        queued = asyncio.ensure_future(e.render(spec(), 5))
        await until(lambda: e.depth == 2)
        await e.stop()
        running.cancel()
        with pytest.raises(NotReady, match="shutting down"):
            await queued

    run(scenario)


def test_an_unexpected_error_fails_the_batch_and_dispatch_goes_on() -> None:
    async def scenario() -> None:
        worker = FakeWorker(auto=False)
        e = engine(worker, max_batch_size=1)
        await e.start()
        broken = asyncio.ensure_future(e.render(spec(), 5))
        await until(lambda: worker.outcome is not None)
        worker.outcome.set_exception(KeyError("a bug"))  # type: ignore[union-attr]
        with pytest.raises(WorkerDied, match="engine failed"):
            await broken
        worker.auto = True
        assert (await e.render(spec("next"), 5)).rgb == b"next"
        await e.stop()

    run(scenario)
