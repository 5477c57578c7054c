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

Errors cross the actor boundary as themselves: every ``ZImageError`` pickles with its data
(``retry_after``, ...), and the ingress unwraps Ray's ``RayTaskError`` around it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass

from ray import serve

from zimage_server.core.config import Settings
from zimage_server.deploy.options import ENGINE_DEPLOYMENT
from zimage_server.engine import Engine, EngineState, RenderResult, RenderSpec
from zimage_server.telemetry import context

log = logging.getLogger("zimage.deploy")


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
    ) -> RenderResult:
        token = context.request_id.set(request_id)
        try:
            result = await self.engine.render(spec, timeout, job_id)
        finally:
            context.request_id.reset(token)
        return dataclasses.replace(result, worker=self.name)

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


def _replica_name() -> str:
    try:
        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # outside a replica (unit tests): a name is all we need
        return "local"
