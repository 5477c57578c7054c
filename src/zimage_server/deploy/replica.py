"""EngineReplica: the GPU deployment. Each replica runs the single-machine ``Engine`` for one
device: its queue, its batcher and one worker process, exactly as ``zimage serve`` does.

Why the engine's own batcher rather than ``@serve.batch``:

- one code path: batching, compatibility keys (size, steps, guidance), the batch wait and
  the worker protocol are the ones the single-machine server runs and its tests cover;
- cancellation between denoising steps: a cancelled or timed-out request reaches the worker
  through the engine (``Cancel``), which ``@serve.batch`` cannot express for one item of a
  running batch;
- worker crashes: the engine restarts its worker process and reports ``WorkerDied`` for the
  batch it was rendering, without the replica (the Ray actor) dying.

Serve still bounds each replica (``max_ongoing_requests``, about twice the batch size) so
that requests wait in Serve's queue, where any replica can take them, rather than behind one.

Progress: ``render`` is a streaming method. It yields the render's ``started`` and ``step``
updates (with previews when the request asked for them), then the ``RenderResult``; the
ingress feeds the updates into its event streams. The engine's listener only appends to a
per-render buffer that keeps the newest ``STEP_BUFFER`` unread steps, so a slow consumer
(the ingress, Ray's transport) never holds the render back nor grows memory.

Errors cross the actor boundary as themselves: every ``ZImageError`` pickles with its data
(``retry_after``, ...), and the ingress unwraps Ray's ``RayTaskError`` around it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ray import serve

from zimage_server.core.config import Settings
from zimage_server.deploy.options import ENGINE_DEPLOYMENT
from zimage_server.engine import Engine, EngineState, RenderResult, RenderSpec, RenderUpdate
from zimage_server.telemetry import context

log = logging.getLogger("zimage.deploy")
STEP_BUFFER = 8  # unsent steps kept per render; older ones give way to newer


@dataclass(frozen=True, slots=True)
class ReplicaStatus:
    """What a replica tells the ingress about itself."""

    replica: str
    state: str
    failure: str | None
    load_s: float
    restarts: float
    depth: int


@serve.deployment(
    name=ENGINE_DEPLOYMENT,
    ray_actor_options={"num_gpus": 1},  # ray_app.build_application sets it from RayOptions
    health_check_period_s=5,
    graceful_shutdown_timeout_s=30,
)
class EngineReplica:
    """One engine (one worker process) per replica; ``render`` is what the ingress calls."""

    async def __init__(self, settings: Settings, max_ongoing: int) -> None:  # type: ignore[misc]
        # One device per replica (Ray gives each replica its own GPU), and a queue bound
        # that Serve's max_ongoing_requests keeps us below.
        bounded = settings.model_copy(update={"max_queue": max_ongoing})
        self.name = _replica_name()
        self.engine = Engine.from_settings(bounded, max_devices=1)
        self._updates: dict[str, _Updates] = {}  # by render id, while its stream is open
        self.engine.watch(self._tell)
        await self.engine.start()
        await self._wait_ready(settings.worker_start_timeout_s)
        log.info("engine replica %s ready (%s)", self.name, self.engine.model_label)

    async def _wait_ready(self, timeout: float) -> None:
        """Return when the worker has loaded the model: only then does Serve route here."""
        deadline = time.monotonic() + timeout
        while self.engine.state != EngineState.READY:
            if self.engine.state == EngineState.FAILED:
                raise RuntimeError(f"The model failed to load: {self.engine.failure}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"The worker did not load the model within {timeout:g}s")
            await asyncio.sleep(0.1)

    async def render(
        self, spec: RenderSpec, timeout: float, job_id: str, request_id: str
    ) -> AsyncIterator[RenderUpdate | RenderResult]:
        """Stream the render's ``started`` and ``step`` updates, then its result (or raise
        its error). Closing the stream (the ingress cancelled) withdraws the render."""
        updates = self._updates[job_id] = _Updates(STEP_BUFFER)
        token = context.request_id.set(request_id)
        try:  # the task copies the context: its logs carry the request id
            task = asyncio.create_task(self.engine.render(spec, timeout, job_id))
        finally:
            context.request_id.reset(token)
        try:
            while not task.done():
                await updates.wait_for(task)
                for update in updates.take():
                    yield update
            for update in updates.take():
                yield update
            yield _detached(task.result(), self.name)
        finally:
            task.cancel()  # a no-op once done; otherwise the engine withdraws the render
            if self._updates.get(job_id) is updates:
                del self._updates[job_id]

    def _tell(self, update: RenderUpdate) -> None:
        """The engine's listener. Its queue position is not sent: the ingress already said
        ``queued``, and Serve's queue in front of this replica is not counted in it."""
        updates = self._updates.get(update.render_id)
        if updates is not None and update.stage != "queued":
            updates.push(update)

    def cancel(self, job_id: str) -> bool:
        return self.engine.cancel(job_id)

    def status(self) -> ReplicaStatus:
        engine = self.engine
        return ReplicaStatus(
            self.name,
            engine.state.value,
            engine.failure,
            engine.load_seconds(),
            engine.restarts(),
            engine.depth,
        )

    def check_health(self) -> None:
        """Serve replaces a replica whose model can no longer load."""
        if self.engine.state == EngineState.FAILED:
            raise RuntimeError(f"The model failed to load: {self.engine.failure}")

    async def __del__(self) -> None:
        await self.engine.stop()


class _Updates:
    """One render's updates not yet sent. Pushing never waits; beyond ``limit`` unsent
    steps the oldest is dropped (``started`` never is), as a stream reader's buffer does."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._pending: deque[RenderUpdate] = deque()
        self._wake = asyncio.Event()

    def push(self, update: RenderUpdate) -> None:
        if update.stage == "step":
            steps = [pending for pending in self._pending if pending.stage == "step"]
            if len(steps) >= self._limit:
                self._pending.remove(steps[0])
        self._pending.append(update)
        self._wake.set()

    def take(self) -> list[RenderUpdate]:
        taken = list(self._pending)
        self._pending.clear()
        self._wake.clear()
        return taken

    async def wait_for(self, task: asyncio.Task[RenderResult]) -> None:
        """Until an update is pending or ``task`` is done."""
        if self._pending:
            return
        woken = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({task, woken}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()


def _replica_name() -> str:
    try:
        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # outside a replica (unit tests): a name is all we need
        return "local"


def _detached(result: RenderResult, worker: str) -> RenderResult:
    """The result with its pixels copied out of their shared-memory slot, which goes back
    now: Ray pickles the result to send it anyway, so this is the copy pickling would make."""
    try:
        rgb = bytes(result.pixels())
    finally:
        result.close()
    return dataclasses.replace(result, rgb=rgb, worker=worker)
