"""The scheduler alone: queue, batching by key, cancel, requeue, Retry-After. Milliseconds."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from zimage_server.core.errors import Cancelled, Overloaded, WorkerDied
from zimage_server.engine.render import RenderResult, RenderSpec
from zimage_server.engine.scheduler import Batch, Scheduler

T = TypeVar("T")


def run(test: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(test(), 5))  # type: ignore[arg-type]


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def spec(
    size: int = 256, steps: int = 8, guidance: float = 1.0, prompt: str = "a fox"
) -> RenderSpec:
    return RenderSpec(
        prompt=prompt, seed=1, width=size, height=size, steps=steps, guidance_scale=guidance
    )


def result(tag: str = "") -> RenderResult:
    return RenderResult(rgb=tag.encode(), width=1, height=1)


def scheduler(clock: FakeClock | None = None, **kwargs: object) -> Scheduler:
    options: dict[str, object] = {"max_queue": 16, "max_batch_size": 4, **kwargs}
    return Scheduler(clock=clock or FakeClock(), **options)  # type: ignore[arg-type]


def ids(batch: Batch) -> list[str]:
    return [ticket.id for ticket in batch.tickets]


def test_a_batch_takes_only_renders_with_the_same_key_oldest_first() -> None:
    async def scenario() -> None:
        s = scheduler()
        s.submit(spec(256), ticket_id="a")
        s.submit(spec(512), ticket_id="b")
        s.submit(spec(256), ticket_id="c")
        s.submit(spec(256, steps=4), ticket_id="d")
        s.submit(spec(256, guidance=3.0), ticket_id="e")
        s.submit(spec(256, prompt="other words"), ticket_id="f")  # the prompt is not in the key
        assert ids(await s.next_batch()) == ["a", "c", "f"]
        assert ids(await s.next_batch()) == ["b"]
        assert ids(await s.next_batch()) == ["d"]
        assert ids(await s.next_batch()) == ["e"]

    run(scenario)


def test_a_batch_never_exceeds_the_batch_size() -> None:
    async def scenario() -> None:
        s = scheduler(max_batch_size=2)
        for name in "abcde":
            s.submit(spec(), ticket_id=name)
        sizes = [len((await s.next_batch()).tickets) for _ in range(3)]
        assert sizes == [2, 2, 1]

    run(scenario)


def test_next_batch_waits_for_work() -> None:
    async def scenario() -> None:
        s = scheduler()
        waiting = asyncio.ensure_future(s.next_batch())
        await asyncio.sleep(0)
        assert not waiting.done()
        s.submit(spec(), ticket_id="late")
        assert ids(await waiting) == ["late"]

    run(scenario)


def test_the_batch_wait_gathers_renders_that_arrive_meanwhile() -> None:
    async def scenario() -> None:
        s: Scheduler

        async def sleep(_seconds: float) -> None:  # another compatible request arrives
            s.submit(spec(), ticket_id="second")

        s = Scheduler(max_queue=8, max_batch_size=4, batch_wait_s=0.05, sleep=sleep)
        s.submit(spec(), ticket_id="first")
        assert ids(await s.next_batch()) == ["first", "second"]

    run(scenario)


def test_a_full_queue_is_refused_with_retry_after_from_the_measured_batch_time() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        s = scheduler(clock, max_queue=3, max_batch_size=1)
        for _ in range(3):
            s.submit(spec())
        with pytest.raises(Overloaded) as refused:
            s.check_room(workers=1)
        assert refused.value.retry_after == 3  # 1 s a batch (no measurement yet) x 3 waiting
        batch = await s.next_batch()
        s.start(batch, "w")
        clock.now += 31.0  # a slow batch
        s.complete(batch, [result()])
        s.check_room(workers=1)  # room again
        s.submit(spec())
        with pytest.raises(Overloaded) as slower:
            s.check_room(workers=1)
        assert slower.value.retry_after == 30  # (0.7 x 1 + 0.3 x 31) s x 3
        assert s.retry_after(workers=3) == 10  # three workers drain it three times faster

    run(scenario)


def test_cancel_before_the_batch_removes_the_render_at_once() -> None:
    async def scenario() -> None:
        s = scheduler()
        keep = s.submit(spec(), ticket_id="keep")
        gone = s.submit(spec(), ticket_id="gone")
        assert s.position("gone") == 1
        assert s.withdraw(gone, Cancelled("The request was cancelled.")) is None
        assert s.depth == 1 and s.position("gone") is None and s.get("gone") is None
        with pytest.raises(Cancelled):
            await gone.future
        assert (await s.next_batch()).tickets == (keep,)

    run(scenario)


def test_cancel_during_a_batch_names_the_worker_and_spares_the_others() -> None:
    async def scenario() -> None:
        s = scheduler()
        first = s.submit(spec(), ticket_id="first")
        second = s.submit(spec(), ticket_id="second")
        batch = await s.next_batch()
        s.start(batch, "worker-1")
        assert s.progress("first") == (0, 8) and s.position("first") is None
        s.report_step(batch, 3, 8)
        assert s.progress("second") == (3, 8)
        assert s.withdraw(first, Cancelled("cancelled")) == "worker-1"
        s.complete(batch, [result("1"), result("2")])  # the worker finished anyway
        with pytest.raises(Cancelled):
            await first.future
        assert (await second.future).rgb == b"2"
        assert s.depth == 0

    run(scenario)


def test_an_abandoned_render_is_cancelled_without_an_error() -> None:
    async def scenario() -> None:
        s = scheduler()
        ticket = s.submit(spec())
        s.withdraw(ticket)
        assert ticket.future.cancelled() and s.depth == 0

    run(scenario)


def test_requeue_puts_a_batch_back_at_the_front_in_order() -> None:
    async def scenario() -> None:
        s = scheduler(max_batch_size=2)
        for name in "abc":
            s.submit(spec(), ticket_id=name)
        batch = await s.next_batch()
        s.start(batch, "w")
        s.requeue(batch)
        assert s.position("a") == 0 and s.position("b") == 1 and s.position("c") == 2
        assert s.progress("a") is None
        again = await s.next_batch()
        assert ids(again) == ["a", "b"] and again.tickets[0].worker is None

    run(scenario)


def test_a_failed_batch_fails_each_waiting_render() -> None:
    async def scenario() -> None:
        s = scheduler()
        tickets = [s.submit(spec()) for _ in range(3)]
        batch = await s.next_batch()
        s.start(batch, "w")
        s.fail(batch, WorkerDied("The worker process died."))
        errors = [t.future.exception() for t in tickets]
        assert all(isinstance(e, WorkerDied) for e in errors)
        assert len({id(e) for e in errors}) == 3  # one exception object per caller
        assert s.depth == 0

    run(scenario)


def test_fail_queued_settles_waiting_renders_only() -> None:
    async def scenario() -> None:
        s = scheduler(max_batch_size=1)
        running = s.submit(spec())
        waiting = s.submit(spec())
        s.start(await s.next_batch(), "w")
        s.fail_queued(WorkerDied("gone"))
        assert isinstance(waiting.future.exception(), WorkerDied)
        assert not running.future.done() and s.depth == 1

    run(scenario)


def test_queue_wait_is_measured_on_the_injected_clock() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        s = scheduler(clock)
        ticket = s.submit(spec())
        clock.now += 2.5
        s.start(await s.next_batch(), "w")
        assert ticket.queue_wait == 2.5

    run(scenario)
