"""Rendered images cross from the worker to the API process in shared memory, not the pipe.

Pickled through the pipe, a 2048x2048 RGB image costs ~20 ms of copies while the device
waits. Instead the API side owns a small pool of shared-memory segments (``SlotPool``). It
lends each image of a batch a slot when it sends the batch (``RenderInto``); the worker
writes the pixels there (``SlotWriter``) and answers with a small ``ResultsReady``; the
API hands each image on as a lease on its slot (``SharedPixels``), read in place by the
encoder, and slots the worker did not use go back at once. A slot has one holder at a
time (a batch, then a lease): it is lent again only once the lease and every view of its
pixels are gone, so nothing is overwritten while it can be read. Leases held long
(slow encodes, a busy event loop) make the pool grow, up to ``MAX_SLOTS``; past that a
batch's images go through the pipe.

Only the API process creates and unlinks segments: a worker that dies leaks nothing, and
the pool is unlinked when the worker exits or the handle stops (a lease still read keeps
its mapping, not its name, until it is dropped). If the API process itself
is killed, multiprocessing's resource tracker unlinks them; if that is killed with it (a
process group killed at once, as Ray does), the next pool made on this machine unlinks
the segments of API processes that no longer exist. When ``/dev/shm`` cannot hold
a batch (a container's 64 MB default), or ``ZIMAGE_SHARED_MEMORY_RESULTS=false``, the
images go through the pipe as before.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import itertools
import logging
import os
import re
import threading
import time
import weakref
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory
from typing import NamedTuple

from zimage_server.engine.pixels import PixelArray, SharedPixels, pixel_view
from zimage_server.engine.protocol import BatchDone, RawImage, RenderBatch

log = logging.getLogger("zimage.engine")
SEGMENT_PREFIX = "zimage-"  # /dev/shm/zimage-<API pid>-<worker>-<pool>-<slot>.<generation>
_pools = itertools.count()  # several engines in one process (tests) have a worker-0 each
SHM_DIR = "/dev/shm"  # noqa: S108 - where POSIX shared memory lives, not a temporary file
_OWNER = re.compile(rf"{SEGMENT_PREFIX}(\d+)-")
ROUND_TO = 1 << 20  # slots grow in whole MiB, so nearby sizes reuse one slot
MAX_SLOTS = 32  # per worker: 400 MB of /dev/shm at 2048x2048; beyond, the pipe carries them


@dataclass(frozen=True, slots=True)
class Slot:
    """One lent segment: ``index`` is stable, ``name`` changes when the slot grows."""

    index: int
    name: str
    capacity: int


@dataclass(frozen=True, slots=True)
class RenderInto:
    """Render ``batch`` and put image i into ``slots[i]`` (no slots: send pixels inline)."""

    batch: RenderBatch
    slots: tuple[Slot, ...] = ()


@dataclass(frozen=True, slots=True)
class ResultsReady:
    """A finished batch: images whose slot is set have empty ``rgb``, their pixels (``sizes``
    bytes) wait in it. ``ready_at`` and ``placed_at`` are the worker's ``perf_counter``
    when the generator returned and when the pixels were in place (one system-wide
    monotonic clock), so the API can time the transfer and the worker's share of it."""

    done: BatchDone
    slots: tuple[Slot | None, ...]
    sizes: tuple[int, ...]
    ready_at: float
    placed_at: float


class TransferTime(NamedTuple):
    """One batch's images from the generator's return to their ``BatchDone`` in the API
    (``total_s``), and the part the worker spent writing them (``write_s``): only that
    part delays the worker's next batch. ``ready_at``: the generator's return, on the
    system-wide ``perf_counter``, to time later stages from."""

    write_s: float
    total_s: float
    ready_at: float


def segment_prefix(worker: str) -> str:
    """What the names of a worker's segments made by this process start with."""
    return f"{SEGMENT_PREFIX}{os.getpid()}-{worker}-"


def _buffer(block: SharedMemory) -> memoryview:
    if block.buf is None:  # typeshed allows None after close()
        raise RuntimeError(f"shared memory {block.name} is closed")
    return block.buf


class SlotPool:
    """The API side: create, lend, lease and unlink one worker's segments.

    Each slot has at most one holder: the batch it is lent to, then the lease its image
    became. Lending runs on the event loop, leasing on the pipe's reader thread, and a
    lease ends on whichever thread drops its last view, so one lock guards them all.
    ``copy_out`` copies images out instead of leasing (the old way, for benchmarks)."""

    def __init__(self, worker: str, max_slots: int = MAX_SLOTS, copy_out: bool = False) -> None:
        number = next(_pools)
        if number == 0:  # the first in this process: clear what killed ones left
            sweep_orphans()
        self._prefix = f"{segment_prefix(worker)}{number}-"
        self._blocks: dict[int, SharedMemory] = {}
        self._holders: dict[int, object] = {}  # slot index -> batch id or lease token
        self._generation = 0
        self._lock = threading.RLock()
        self._max_slots = max_slots
        self._copy_out = copy_out
        self._warned = False

    @property
    def leased(self) -> int:
        """Slots whose pixels are still held by a result (or a view of it)."""
        with self._lock:
            return sum(1 for holder in self._holders.values() if isinstance(holder, _Lease))

    def lend(self, batch: RenderBatch) -> tuple[Slot, ...]:
        """A slot per image of ``batch``, or none at all when shared memory is too small
        or the pool is at its bound."""
        need = batch.width * batch.height * 3
        slots: list[Slot] = []
        with self._lock:
            for _ in batch.items:
                slot = self._take(need, batch.batch_id)
                if slot is None:
                    self.give_back(slots, batch.batch_id)
                    return ()
                slots.append(slot)
        return tuple(slots)

    def _take(self, need: int, holder: str) -> Slot | None:
        free = [i for i in self._blocks if i not in self._holders]
        fits = [i for i in free if self._blocks[i].size >= need]
        if fits:
            index = min(fits, key=lambda i: self._blocks[i].size)
        elif free:
            index = max(free, key=lambda i: self._blocks[i].size)  # grow it
        elif len(self._blocks) < self._max_slots:
            index = max(self._blocks, default=-1) + 1  # never one in use
        else:
            return None
        block = self._blocks.get(index)
        if block is None or block.size < need:
            block = self._create(index, -(-need // ROUND_TO) * ROUND_TO)
            if block is None:
                return None
        self._holders[index] = holder
        return Slot(index, block.name, block.size)

    def _create(self, index: int, size: int) -> SharedMemory | None:
        """A new segment for slot ``index``, its pages reserved now: a full ``/dev/shm``
        fails here (the batch goes through the pipe) instead of killing a writer later."""
        old = self._blocks.pop(index, None)
        if old is not None:
            _unlink(old)
        self._generation += 1
        name = f"{self._prefix}{index}.{self._generation}"
        try:
            block = SharedMemory(name, create=True, size=size)
        except OSError as exc:
            self._warn(size, exc)
            return None
        try:
            _reserve(block)
        except OSError as exc:
            _unlink(block)
            self._warn(size, exc)
            return None
        self._blocks[index] = block
        return block

    def _warn(self, size: int, exc: OSError) -> None:
        if not self._warned:
            self._warned = True
            log.warning(
                "shared memory cannot hold %d bytes more (%s): results go through the pipe; "
                "give /dev/shm more room (docker: --shm-size)",
                size,
                exc,
            )

    def give_back(self, slots: tuple[Slot, ...] | list[Slot], holder: object) -> None:
        """Free those of ``slots`` that ``holder`` still holds: not those whose image became
        a lease, nor those of a closed pool (a worker that died)."""
        with self._lock:
            for slot in slots:
                block = self._blocks.get(slot.index)
                ours = self._holders.get(slot.index) == holder  # ids come unpickled: equal
                if ours and block is not None and block.name == slot.name:
                    del self._holders[slot.index]

    def collect(self, ready: ResultsReady) -> BatchDone:
        """The worker's ``BatchDone`` with each image's pixels leased from its slot.
        Runs on the pipe's reader thread, off the event loop."""
        images = []
        for image, slot, size in zip(ready.done.images, ready.slots, ready.sizes, strict=True):
            if slot is not None:
                image = dataclasses.replace(image, rgb=self._read(slot, size, ready.done))
            images.append(image)
        return dataclasses.replace(ready.done, images=tuple(images))

    def _read(self, slot: Slot, size: int, done: BatchDone) -> bytes | SharedPixels:
        with self._lock:
            block = self._blocks.get(slot.index)
            if block is None or block.name != slot.name:
                raise RuntimeError(f"slot {slot.name} is gone")
            if self._holders.get(slot.index) != done.batch_id:
                raise RuntimeError(f"slot {slot.name} is not lent to batch {done.batch_id}")
            if self._copy_out:
                with _buffer(block)[:size] as view:
                    return bytes(view)
            lease = _Lease()
            self._holders[slot.index] = lease
            pixels: PixelArray = (ctypes.c_ubyte * size).from_buffer(_buffer(block))
        weakref.finalize(pixels, self.give_back, (slot,), lease)
        return SharedPixels(pixels)

    def close(self) -> None:
        """Unlink every segment (a worker still attached, or a lease still read, keeps its
        mapping until it lets go)."""
        with self._lock:
            blocks, self._blocks = list(self._blocks.values()), {}
            self._holders.clear()
        for block in blocks:
            _unlink(block)


class _Lease:
    """A slot's holder while its image is read in place (identity only)."""

    __slots__ = ()


def sweep_orphans() -> list[str]:
    """Unlink the segments of API processes that are gone; returns their names."""
    try:
        names = os.listdir(SHM_DIR)
    except OSError:  # no /dev/shm: nothing of ours can be there
        return []
    swept = []
    for name in names:
        owner = _OWNER.match(name)
        if owner and not _alive(int(owner[1])):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(SHM_DIR, name))
                swept.append(name)
    if swept:
        log.info("unlinked %d shared-memory segments of API processes gone", len(swept))
    return swept


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _reserve(block: SharedMemory) -> None:
    """Allocate the segment's pages (Linux: its file in /dev/shm); elsewhere, nothing."""
    path = os.path.join(SHM_DIR, block.name)
    if not hasattr(os, "posix_fallocate") or not os.path.exists(path):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, block.size)
    finally:
        os.close(fd)


# Unlinked segments whose pixels a lease still reads: kept referenced (their name is gone,
# their mapping stays) until a later ``_unlink`` finds them unread and closes them, so that
# no ``SharedMemory.__del__`` ever tries to close one under a live view.
_retired: list[SharedMemory] = []
_retired_lock = threading.Lock()


def _unlink(block: SharedMemory) -> None:
    with contextlib.suppress(FileNotFoundError):
        block.unlink()
    with _retired_lock:
        blocks = [block, *_retired]
        _retired.clear()
        for each in blocks:
            try:
                each.close()
            except BufferError:  # a view still read elsewhere
                _retired.append(each)


class SlotWriter:
    """The worker side: attach each lent slot once and write finished images into it."""

    def __init__(self) -> None:
        self._attached: dict[int, SharedMemory] = {}

    def place(self, done: BatchDone, slots: tuple[Slot, ...]) -> ResultsReady:
        """``done`` with its pixels moved into ``slots`` (kept inline where one cannot be
        used: no slots lent, or a slot that is gone or too small)."""
        ready_at = time.perf_counter()
        if not slots:
            count = len(done.images)
            return ResultsReady(done, (None,) * count, (0,) * count, ready_at, ready_at)
        images: list[RawImage] = []
        used: list[Slot | None] = []
        for image, slot in zip(done.images, slots, strict=True):
            block = self._attach(slot) if len(image.rgb) <= slot.capacity else None
            if block is None:
                images.append(image)
                used.append(None)
                continue
            _buffer(block)[: len(image.rgb)] = pixel_view(image.rgb)
            images.append(dataclasses.replace(image, rgb=b""))
            used.append(slot)
        sizes = tuple(len(image.rgb) for image in done.images)
        placed = dataclasses.replace(done, images=tuple(images))
        return ResultsReady(placed, tuple(used), sizes, ready_at, time.perf_counter())

    def _attach(self, slot: Slot) -> SharedMemory | None:
        block = self._attached.get(slot.index)
        if block is not None and block.name == slot.name:
            return block
        if block is not None:  # the slot grew: the API unlinked the old segment
            block.close()
            del self._attached[slot.index]
        try:
            block = SharedMemory(slot.name)
        except FileNotFoundError:
            return None
        self._attached[slot.index] = block
        return block
