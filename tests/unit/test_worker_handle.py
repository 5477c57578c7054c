"""The real worker handle around a real worker process (the null generator: no torch, so a
process starts in well under a second): render, death and restart, start timeout, states."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from zimage_server.core.config import SpeedupSettings, WorkerSettings
from zimage_server.core.errors import GenerationFailed, WorkerDied
from zimage_server.engine.handle import MAX_LOAD_FAILURES, WorkerHandle, WorkerState
from zimage_server.engine.null import NULL_MODEL, seed_colour
from zimage_server.engine.protocol import WorkerSpec
from zimage_server.engine.render import RenderSpec
from zimage_server.engine.scheduler import Batch, Scheduler

T = TypeVar("T")


def run(test: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(test(), 60))  # type: ignore[arg-type]


def handle(**worker: object) -> WorkerHandle:
    settings = WorkerSettings(warmup=False, debug_faults=True, **worker)  # type: ignore[arg-type]
    spec = WorkerSpec(
        name="worker-0",
        model_path=NULL_MODEL,
        device="cpu",
        worker=settings,
        speedups=SpeedupSettings(),
    )
    return WorkerHandle(spec)


async def batch_of(*prompts: str) -> Batch:
    scheduler = Scheduler(max_queue=8, max_batch_size=8)
    for index, prompt in enumerate(prompts):
        spec = RenderSpec(
            prompt=prompt, seed=index, width=32, height=16, steps=2, guidance_scale=1.0
        )
        scheduler.submit(spec)
    return await scheduler.next_batch()


def test_a_worker_starts_renders_and_stops() -> None:
    async def scenario() -> None:
        worker = handle()
        worker.start()
        assert worker.state == WorkerState.STARTING
        assert await worker.wait_ready() and worker.state == WorkerState.READY
        batch = await batch_of("a", "b")
        done = await worker.render(batch, lambda _step, _total: None)
        assert [image.job_id for image in done.images] == [t.id for t in batch.tickets]
        assert done.images[1].rgb == seed_colour(1) * (32 * 16)
        assert worker.state == WorkerState.READY
        await worker.stop()
        assert worker.state == WorkerState.STOPPED and not await worker.wait_ready()

    run(scenario)


def test_a_worker_that_dies_mid_batch_fails_it_and_is_restarted() -> None:
    async def scenario() -> None:
        worker = handle()
        worker.start()
        await worker.wait_ready()
        with pytest.raises(WorkerDied, match="exit code 3"):
            await worker.render(await batch_of("[[fault:exit]]"), lambda _s, _t: None)
        assert worker.restarts == 1 and worker.state == WorkerState.STARTING
        assert await worker.wait_ready()
        done = await worker.render(await batch_of("fine"), lambda _s, _t: None)
        assert len(done.images) == 1
        await worker.stop()

    run(scenario)


def test_a_worker_that_does_not_load_in_time_is_ended_then_given_up_on() -> None:
    """``ZIMAGE_WORKER_START_TIMEOUT_S``: each start that overruns it counts as a failed
    load; after the third the worker is FAILED and says why."""

    async def scenario() -> None:
        worker = handle(worker_start_timeout_s=0.001)
        worker.start()
        assert await worker.wait_ready() is False
        assert worker.state == WorkerState.FAILED and worker.restarts == MAX_LOAD_FAILURES - 1
        assert worker.failure is not None and "within 0.001s" in worker.failure
        await worker.stop()

    run(scenario)


def test_state_moves_are_checked() -> None:
    async def scenario() -> None:
        worker = handle()
        with pytest.raises(RuntimeError, match="STARTING -> BUSY is not allowed"):
            await worker.render(await batch_of("x"), lambda _s, _t: None)

    run(scenario)


def test_a_batch_that_fails_in_the_worker_raises_its_error_and_the_worker_serves_on() -> None:
    async def scenario() -> None:
        worker = handle()
        worker.start()
        await worker.wait_ready()
        with pytest.raises(GenerationFailed, match="injected by"):
            await worker.render(await batch_of("[[fault:error]]"), lambda _s, _t: None)
        assert worker.state == WorkerState.READY and worker.restarts == 0
        done = await worker.render(await batch_of("fine"), lambda _s, _t: None)
        assert len(done.images) == 1
        await worker.stop()

    run(scenario)
