"""The real worker handle around a real worker process (the null generator: no torch, so a
process starts in well under a second): render, death and restart, start timeout, states."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import runpy
import signal
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from zimage_server.core.config import SpeedupSettings, WorkerSettings
from zimage_server.core.errors import GenerationFailed, WorkerDied
from zimage_server.engine.handle import (
    MAX_LOAD_FAILURES,
    RESTART_DELAY_S,
    WorkerHandle,
    WorkerState,
)
from zimage_server.engine.null import NULL_MODEL, seed_colour
from zimage_server.engine.protocol import WorkerSpec
from zimage_server.engine.render import RenderSpec
from zimage_server.engine.scheduler import Batch, Scheduler

T = TypeVar("T")


def run(test: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(test(), 60))  # type: ignore[arg-type]


def handle(device: str = "cpu", **worker: object) -> WorkerHandle:
    settings = WorkerSettings(warmup=False, debug_faults=True, **worker)  # type: ignore[arg-type]
    spec = WorkerSpec(
        name="worker-0",
        model_path=NULL_MODEL,
        device=device,
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


def test_an_accelerator_worker_is_spawned_not_forked_and_renders() -> None:
    """CUDA cannot run in a process forked from one where it was initialised (the fork
    server's imports can do that: seen on an H200), so accelerator workers are spawned:
    a fresh interpreter that must find everything it needs by import. The null generator
    never touches the device, so a "cuda:0" worker runs here."""

    async def scenario() -> None:
        worker = handle(device="cuda:0")
        worker.start()
        assert await worker.wait_ready()
        assert worker._process is not None
        assert type(worker._process).__name__ == "SpawnProcess"
        done = await worker.render(await batch_of("a"), lambda _s, _t: None)
        assert done.images[0].rgb == seed_colour(0) * (32 * 16)
        await worker.stop()
        cpu = handle()
        cpu.start()
        assert await cpu.wait_ready() and type(cpu._process).__name__ == "ForkServerProcess"
        await cpu.stop()

    run(scenario)


def test_the_module_entry_point_runs_the_cli_only_as_main() -> None:
    """Spawn re-imports a main script as ``__mp_main__`` (CPython skips ``-m pkg``'s
    ``__main__``, but not ``python src/zimage_server/__main__.py``): that import must not
    start a second CLI (it would parse the worker's argv)."""
    runpy.run_module("zimage_server", run_name="__mp_main__")  # returns, no SystemExit
    with pytest.raises(SystemExit):
        runpy.run_module("zimage_server", run_name="__main__")


def test_a_worker_that_dies_mid_batch_fails_it_and_is_restarted() -> None:
    async def scenario() -> None:
        worker = handle()
        worker.start()
        await worker.wait_ready()
        with pytest.raises(WorkerDied, match="exited with code 3"):
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


class _KillsTheWorker(str):
    """A device name whose unpickling SIGKILLs the process doing it: the worker, before it
    has run a line of its own (as if killed at import, or segfaulting there)."""

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return signal.raise_signal, (signal.SIGKILL,)


def starts(caplog: pytest.LogCaptureFixture) -> list[float]:
    return [r.created for r in caplog.records if "started on" in r.getMessage()]


def test_a_worker_that_dies_before_it_can_report_backs_off_then_fails_with_the_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No hot restart loop: each start waits longer than the one before, and the third
    death before Ready ends in FAILED, which says how it died."""
    caplog.set_level(logging.INFO, "zimage.engine")

    async def scenario() -> None:
        worker = handle()
        worker.spec = dataclasses.replace(worker.spec, device=_KillsTheWorker("cpu"))
        worker.start()
        assert await worker.wait_ready() is False
        assert worker.state == WorkerState.FAILED and worker.restarts == MAX_LOAD_FAILURES - 1
        assert worker.failure == (
            "the worker was killed by SIGKILL while loading the model (3 failed starts)"
        )
        await asyncio.sleep(1.5)  # and nothing restarts it afterwards
        assert len(starts(caplog)) == MAX_LOAD_FAILURES
        await worker.stop()

    run(scenario)
    gaps = [b - a for a, b in itertools.pairwise(starts(caplog))]
    assert gaps[0] >= RESTART_DELAY_S and gaps[1] >= 2 * RESTART_DELAY_S, gaps


def test_a_worker_that_crashes_again_and_again_after_ready_backs_off_each_time() -> None:
    """A worker that loads but keeps dying is restarted every time (it serves between
    crashes), later each time: 0.5 s, 1 s, 2 s."""

    async def scenario() -> list[float]:
        worker = handle()
        worker.start()
        await worker.wait_ready()
        downtimes = []
        for _ in range(3):
            with pytest.raises(WorkerDied, match="exited with code 3"):
                await worker.render(await batch_of("[[fault:exit]]"), lambda _s, _t: None)
            died = time.monotonic()
            assert worker.state == WorkerState.STARTING
            assert worker.failure == "the worker exited with code 3 after it was ready"
            assert await worker.wait_ready() and worker.failure is None
            downtimes.append(time.monotonic() - died)
        assert worker.restarts == 3
        await worker.stop()
        return downtimes

    downtimes = run(scenario)
    for crash, downtime in enumerate(downtimes):
        assert downtime >= RESTART_DELAY_S * 2**crash, downtimes


def test_each_failure_kind_becomes_its_error() -> None:
    """A worker's failure kinds map to the API's errors: a ControlNet batch on a worker
    without the weights (a cluster configured unevenly) is the 404 naming the setting."""
    from zimage_server.core.errors import InvalidRequest, TaskNotConfigured
    from zimage_server.engine.handle import _batch_error
    from zimage_server.engine.protocol import BatchFailed
    from zimage_server.engine.render import BatchKey

    key = BatchKey(width=256, height=256, steps=2, guidance_scale=1.0)
    batch = Batch(id="b", key=key, tickets=())
    unconfigured = _batch_error(BatchFailed("b", "unconfigured", "set ZIMAGE_CONTROLNET"), batch)
    assert isinstance(unconfigured, TaskNotConfigured) and unconfigured.status == 404
    assert "ZIMAGE_CONTROLNET" in str(unconfigured)
    assert isinstance(_batch_error(BatchFailed("b", "invalid", "x"), batch), InvalidRequest)
    assert isinstance(_batch_error(BatchFailed("b", "error", "x"), batch), GenerationFailed)
