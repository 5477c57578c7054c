"""Images back through shared memory, and batches sent ahead, with real worker processes
(the null generator: no torch, a process starts in well under a second).

Shared memory must give the pipe's bytes, lend a slot to one batch at a time and leave no
segment behind a dead worker or a stopped handle; the engine must queue the next batch in
the worker while one renders, so the worker never waits for the API between batches.
"""

from __future__ import annotations

import asyncio
import gc
import os
import pickle
import subprocess
import time
from pathlib import Path

import pytest

from tests.unit.test_worker_handle import handle, run
from zimage_server.core.config import EngineSettings
from zimage_server.core.errors import Cancelled, WorkerDied
from zimage_server.engine import Engine, RenderSpec
from zimage_server.engine.handle import WorkerHandle
from zimage_server.engine.null import seed_colour
from zimage_server.engine.pixels import SharedPixels, pixel_view
from zimage_server.engine.protocol import BatchDone, RawImage, RenderBatch, RenderItem
from zimage_server.engine.render import RenderUpdate
from zimage_server.engine.scheduler import Batch, Scheduler
from zimage_server.engine.shared_results import (
    ResultsReady,
    SlotPool,
    SlotWriter,
    segment_prefix,
    sweep_orphans,
)
from zimage_server.images.encode import encode_image

SHM = Path("/dev/shm")  # noqa: S108 - where POSIX shared memory lives, not a temporary file
pytestmark = pytest.mark.skipif(not SHM.is_dir(), reason="needs /dev/shm")


_OTHERS: set[str] = set()


@pytest.fixture(autouse=True)
def _others_ignored() -> None:
    """Segments of servers that other test modules left running in this process (a
    session-scoped in-process server has a worker-0 too) are not this test's."""
    _OTHERS.clear()
    _OTHERS.update(_listed())


def _listed() -> set[str]:
    prefix = segment_prefix("worker-0")
    return {name for name in os.listdir(SHM) if name.startswith(prefix)}


def segments() -> list[str]:
    """This process's segments for worker-0 made during this test, as /dev/shm lists them."""
    return sorted(_listed() - _OTHERS)


async def batch_of(*prompts: str, width: int = 32, height: int = 16, steps: int = 2) -> Batch:
    scheduler = Scheduler(max_queue=8, max_batch_size=8)
    for index, prompt in enumerate(prompts):
        spec = RenderSpec(
            prompt=prompt, seed=index, width=width, height=height, steps=steps, guidance_scale=1.0
        )
        scheduler.submit(spec)
    return await scheduler.next_batch()


def no_steps(_step: int, _total: int) -> None:
    """Renders here do not follow steps."""


def test_a_slot_carries_every_byte_and_is_lent_to_one_batch_at_a_time() -> None:
    """Varied bytes (not a solid colour) through a slot come out identical; a slot lent is
    not lent again until given back; a bigger image grows the slot under a new name."""
    pool, writer = SlotPool("worker-0"), SlotWriter()
    items = tuple(RenderItem(f"job-{i}", "p", i) for i in range(2))
    small = RenderBatch("b1", items, 64, 48, 2, 1.0)
    pixels = [os.urandom(64 * 48 * 3) for _ in items]
    done = BatchDone("b1", tuple(RawImage(f"job-{i}", 64, 48, rgb) for i, rgb in enumerate(pixels)))
    try:
        slots = pool.lend(small)
        assert len({slot.index for slot in slots}) == 2 == len(segments())
        ready = writer.place(done, slots)
        assert all(image.rgb == b"" for image in ready.done.images)  # nothing pickled
        collected = pool.collect(ready)
        assert collected == done and pool.leased == 2
        others = pool.lend(small)
        assert not {s.index for s in others} & {s.index for s in slots}  # still leased
        batch_id = "".join(["b", "1"])  # as the worker's answer names it: equal, not the same
        pool.give_back(slots, batch_id)  # the batch is over, but its images hold the slots
        pool.give_back(others, batch_id)
        again = pool.lend(small)
        assert {s.index for s in again} == {s.index for s in others} and pool.leased == 2
        del collected  # the results are dropped: their slots come back
        assert pool.leased == 0 and len(segments()) == 4
        pool.give_back(again, "b1")
        big = RenderBatch("b2", items[:1], 1024, 1024, 2, 1.0)
        (grown,) = pool.lend(big)
        assert grown.capacity >= 1024 * 1024 * 3 and grown.name not in {s.name for s in slots}
        assert len(segments()) == 4 and grown.name in segments()  # the outgrown one unlinked
        another = SlotPool("worker-0")  # a second engine in this process: its own names
        assert len(another.lend(small)) == 2 and len(segments()) == 6
        another.close()
    finally:
        pool.close()
    assert segments() == []


def render_into(pool: SlotPool, batch_id: str, rgb: bytes) -> ResultsReady | None:
    """One 64x48 image written the way a worker does, or None when no slot was lent."""
    batch = RenderBatch(batch_id, (RenderItem("job", "p", 1),), 64, 48, 2, 1.0)
    slots = pool.lend(batch)
    if not slots:
        return None
    return SlotWriter().place(BatchDone(batch_id, (RawImage("job", 64, 48, rgb),)), slots)


def test_a_slot_is_not_lent_again_while_any_view_of_its_pixels_lives() -> None:
    """Pool pressure: two slots at most. A result closed while a view of it is still read
    keeps its slot; with both slots held the next batch gets none (its images take the
    pipe); dropping the view frees the slot. Pickled (Ray), a lease is a copy."""
    pool = SlotPool("worker-0", max_slots=2)
    first_rgb, second_rgb = os.urandom(64 * 48 * 3), os.urandom(64 * 48 * 3)
    try:
        ready = render_into(pool, "b1", first_rgb)
        assert ready is not None
        (first,) = pool.collect(ready).images
        assert isinstance(first.rgb, SharedPixels)
        view = first.rgb.view()[10:]  # a slice: the encoder's kind of reference
        first.rgb.close()
        del first, ready
        assert pool.leased == 1  # closed, but still read
        ready = render_into(pool, "b2", second_rgb)
        assert ready is not None
        (second,) = pool.collect(ready).images
        assert render_into(pool, "b3", first_rgb) is None and len(segments()) == 2
        assert view == first_rgb[10:] and second.rgb == second_rgb  # nothing overwritten
        copied = pickle.loads(pickle.dumps(second))  # noqa: S301 - our own bytes
        assert type(copied.rgb) is bytes and copied.rgb == second_rgb
        del view
        assert pool.leased == 1 and render_into(pool, "b3", first_rgb) is not None
    finally:
        pool.close()
    assert segments() == []  # unlinked even while ``second`` still reads its mapping
    assert bytes(pixel_view(second.rgb)) == second_rgb


async def released(worker: WorkerHandle, timeout_s: float = 10.0) -> None:
    """Until no image of ``worker`` holds a slot: the loop's wake-up call may still hold
    the last batch, and on a loaded machine a batch caught in a reference cycle waits
    for the collector (it failed once at ``sleep(0)`` alone, the pool grown to 4)."""
    pool = worker._pool  # the test's window on the slots
    assert pool is not None
    deadline = time.monotonic() + timeout_s
    while pool.leased and time.monotonic() < deadline:
        gc.collect()
        await asyncio.sleep(0.01)
    assert pool.leased == 0


def test_a_held_result_keeps_its_pixels_while_the_worker_renders_on() -> None:
    async def scenario() -> None:
        worker = handle()
        worker.start()
        await worker.wait_ready()
        first = await worker.render(await batch_of("a", "b", width=64, height=48), no_steps)
        second = await worker.render(await batch_of("c", width=64, height=48), no_steps)
        assert first.images[1].rgb == seed_colour(1) * (64 * 48)  # not overwritten by "c"
        assert second.images[0].rgb == seed_colour(0) * (64 * 48) and len(segments()) == 3
        encoded = encode_image(pixel_view(first.images[1].rgb), (64, 48), (60, 40), "png", 90)
        piped = encode_image(seed_colour(1) * (64 * 48), (64, 48), (60, 40), "png", 90)
        assert encoded == piped
        del first, second
        await released(worker)
        for prompts in ("def", "g", "h"):  # closed at once (the loop still holds each batch)
            done = await worker.render(await batch_of(*prompts, width=64, height=48), no_steps)
            for image in done.images:
                assert isinstance(image.rgb, SharedPixels)
                image.rgb.close()
        assert len(segments()) == 3  # the released slots served the next batches
        await worker.stop()
        assert segments() == []

    run(scenario)


def test_images_through_shared_memory_are_the_bytes_the_pipe_carries() -> None:
    async def scenario() -> None:
        shared, piped = handle(), handle(shared_memory_results=False)
        for worker in (shared, piped):
            worker.start()
        assert await shared.wait_ready() and await piped.wait_ready()
        for width, height in ((32, 16), (1024, 512)):  # the second grows the slots
            batch = await batch_of("a", "b", "c", width=width, height=height)
            via_memory = await shared.render(batch, no_steps)
            via_pipe = await piped.render(batch, no_steps)
            assert via_memory == via_pipe
            assert via_memory.images[2].rgb == seed_colour(2) * (width * height)
        # the small images were still held when the big ones were lent slots: three more
        assert len(segments()) == 6 and shared.transfer.total_s > 0
        await shared.stop()
        await piped.stop()
        assert segments() == []

    run(scenario)


def test_no_segment_outlives_a_killed_worker_or_a_stop() -> None:
    async def scenario() -> None:
        worker = handle()
        worker.start()
        await worker.wait_ready()
        await worker.render(await batch_of("fine"), no_steps)
        assert len(segments()) == 1
        with pytest.raises(WorkerDied, match="exited with code 3"):
            await worker.render(await batch_of("[[fault:exit]]"), no_steps)
        assert segments() == []  # unlinked as soon as the worker is gone
        assert await worker.wait_ready()
        done = await worker.render(await batch_of("again"), no_steps)
        assert done.images[0].rgb == seed_colour(0) * (32 * 16)
        assert len(segments()) == 1  # the restarted worker got a fresh one
        await worker.stop()
        assert segments() == []

    run(scenario)


def test_a_batch_queued_in_a_worker_that_dies_renders_on_its_successor() -> None:
    """The worker dies on the batch it renders; the one sent ahead behind it never started,
    so the restarted worker renders it instead of failing an innocent request."""

    async def scenario() -> None:
        worker = handle()
        worker.start()
        await worker.wait_ready()
        dying = asyncio.ensure_future(worker.render(await batch_of("[[fault:exit]]"), no_steps))
        behind = asyncio.ensure_future(worker.render(await batch_of("innocent"), no_steps))
        with pytest.raises(WorkerDied):
            await dying
        done = await behind
        assert done.images[0].rgb == seed_colour(0) * (32 * 16) and worker.restarts == 1
        await worker.stop()

    run(scenario)


def engine_with(worker: WorkerHandle) -> Engine:
    return Engine(EngineSettings(max_batch_size=1), [worker])


def spec(prompt: str, steps: int = 2) -> RenderSpec:
    return RenderSpec(prompt=prompt, seed=1, width=32, height=16, steps=steps, guidance_scale=1.0)


def test_the_next_batch_waits_in_the_worker_so_it_never_waits_for_the_api() -> None:
    """While the first render runs, the second is sent ahead (no longer queued in the API).
    Then the API's event loop is blocked for longer than both renders take: the worker
    still finishes the second one meanwhile, because it already had it."""

    async def scenario() -> None:
        worker = handle(debug_step_delay_s=0.05)
        engine = engine_with(worker)
        steps: list[str] = []
        engine.watch(lambda u: steps.append(u.render_id) if u.stage == "step" else None)
        await engine.start()
        await worker.wait_ready()
        first = asyncio.ensure_future(engine.render(spec("first"), 30, "first"))
        second = asyncio.ensure_future(engine.render(spec("second"), 30, "second"))
        while engine.progress("second") != (0, 2):  # sent once the first began its last step
            await asyncio.sleep(0.005)
        assert engine.position("second") is None and steps == ["first"]
        time.sleep(1.0)  # the API cannot send anything now (4 steps of 0.05 s to render)
        unblocked = time.perf_counter()
        await first
        await second
        second_ready_at = time.perf_counter() - worker.transfer.total_s
        assert second_ready_at < unblocked  # rendered while the API was blocked
        assert steps.count("second") == 2
        await engine.stop()

    run(scenario)


def test_a_batch_cancelled_while_it_waits_in_the_worker_is_never_rendered() -> None:
    async def scenario() -> None:
        worker = handle(debug_step_delay_s=0.05)
        engine = engine_with(worker)
        updates: list[RenderUpdate] = []
        engine.watch(updates.append)
        await engine.start()
        await worker.wait_ready()
        first = asyncio.ensure_future(engine.render(spec("first", steps=4), 30, "first"))
        second = asyncio.ensure_future(engine.render(spec("second"), 30, "second"))
        while engine.progress("second") != (0, 2):  # sent ahead, not started
            await asyncio.sleep(0.005)
        assert engine.cancel("second")
        with pytest.raises(Cancelled):
            await second
        assert (await first).rgb == seed_colour(1) * (32 * 16)
        after = await engine.render(spec("third"), 30, "third")  # the worker serves on
        assert after.rgb == seed_colour(1) * (32 * 16)
        assert not [u for u in updates if u.render_id == "second" and u.stage == "step"]
        await engine.stop()

    run(scenario)


def test_segments_of_an_api_process_killed_with_its_resource_tracker_are_swept() -> None:
    """Killed as a process group (Ray does), nobody unlinked them: the next pool made on
    the machine does, and leaves those of live processes alone."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    orphan = SHM / f"zimage-{gone.pid}-worker-0-0-0.1"
    orphan.write_bytes(b"left behind")
    pool = SlotPool("worker-0")
    try:
        pool.lend(RenderBatch("b", (RenderItem("job", "p", 1),), 16, 16, 1, 1.0))
        sweep_orphans()  # what the first pool of a process does
        assert not orphan.exists()
        assert len(segments()) == 1  # this live process's own
    finally:
        pool.close()
