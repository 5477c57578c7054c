"""RayEngine: the ``EngineLike`` of the ingress. It keeps the API's admission bound and
forwards each render to the GPU deployment through its ``DeploymentHandle``.

Each render is a stream (``stream=True``): the replica sends ``started`` and each ``step``
(with its preview when asked for), then the result. The updates go to the engine's listeners
(the ingress's progress hub, which never blocks) and feed ``progress``, so event streams,
v2 status and the price of a cancelled render's steps work as on one machine.

Ray's failures become our errors: a replica that died mid-request is sent again
(``replica_retries``, deadline allowing) and then is ``WorkerDied`` (502); Serve's
backpressure is ``Overloaded`` (429 with ``Retry-After``). Readiness: READY once a replica
answers READY (replicas answer only once their model is loaded), or at once when the
deployment scales to zero (a request then waits, within its deadline, for a replica).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from zimage_server.core.errors import (
    Cancelled,
    DeadlineExceeded,
    NotReady,
    Overloaded,
    WorkerDied,
    ZImageError,
)
from zimage_server.deploy.replica import ReplicaStatus
from zimage_server.engine import (
    EngineState,
    RenderListener,
    RenderResult,
    RenderSpec,
    RenderUpdate,
)
from zimage_server.engine.render import tell
from zimage_server.telemetry import context

log = logging.getLogger("zimage.deploy")
POLL_S = 1.0  # until the first replica is ready
POLL_TIMEOUT_S = 5.0


@dataclass
class _Call:
    job_id: str
    timeout: float
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    response: Any = None
    progress: tuple[int, int] | None = None  # (step, total) once the replica started it


class RayEngine:
    """Forward renders to the ``EngineReplica`` deployment; bound what is in flight."""

    def __init__(
        self,
        handle: Any,
        max_queue: int,
        scales_to_zero: bool = False,
        replica_retries: int = 1,
    ) -> None:
        self._handle = handle
        self._stream = handle.options(stream=True)
        self._max_queue = max_queue
        self._scales_to_zero = scales_to_zero
        self._retries = replica_retries
        self._calls: dict[str, _Call] = {}
        self._reserved: set[str] = set()
        self._listeners: list[RenderListener] = []
        self._state = EngineState.STARTING
        self._failure: str | None = None
        self._load_s = 0.0
        self._replica_deaths = 0
        self._render_s = 1.0  # moving average, for Retry-After
        self._poller: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        if self._scales_to_zero:
            # Asking a replica would start one; requests wait for Serve to start it instead.
            self._state = EngineState.READY
            return
        self._poller = asyncio.create_task(self._poll_forever())

    async def stop(self) -> None:
        self._state = EngineState.STOPPED
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        for call in list(self._calls.values()):
            call.cancelled.set()

    async def _poll_forever(self) -> None:
        """Ask until one replica is READY, then stop: later polls would keep replicas busy
        (and wake a deployment that scales to zero). Serve replaces dead replicas itself, and
        a replica whose model cannot load fails its own health check."""
        while self._state != EngineState.READY:
            status = await self._ask_status()
            if status is not None:
                self._state = EngineState(status.state)
                self._failure, self._load_s = status.failure, status.load_s
            if self._state != EngineState.READY:
                await asyncio.sleep(POLL_S)

    async def _ask_status(self) -> ReplicaStatus | None:
        """One replica's status, or None when none answers in time (busy or starting)."""
        response = self._handle.status.remote()
        try:
            status: ReplicaStatus = await asyncio.wait_for(_awaited(response), POLL_TIMEOUT_S)
        except (TimeoutError, RayActorError, BackPressureError, DeploymentUnavailableError):
            response.cancel()
            return None
        return status

    # -- EngineLike --------------------------------------------------------------------------
    @property
    def state(self) -> EngineState:
        return self._state

    @property
    def failure(self) -> str | None:
        return self._failure

    @property
    def depth(self) -> int:
        return len(self._calls) + len(self._reserved)

    @property
    def max_queue(self) -> int:
        return self._max_queue

    def restarts(self) -> float:
        return float(self._replica_deaths)

    def load_seconds(self) -> float:
        return self._load_s

    def position(self, job_id: str) -> int | None:
        return None  # the queue lives in Serve and the replicas: not known here

    def progress(self, job_id: str) -> tuple[int, int] | None:
        call = self._calls.get(job_id)
        return None if call is None else call.progress

    def watch(self, listener: RenderListener) -> None:
        """Tell ``listener`` each render's ``queued`` (here, without a position), then the
        ``started`` and ``step`` updates its replica streams back."""
        self._listeners.append(listener)

    def _tell(self, update: RenderUpdate) -> None:
        tell(self._listeners, update)

    def admit(self, reserve: str | None = None) -> None:
        """Raise ``NotReady`` when the model failed, ``Overloaded`` when the bound is hit;
        ``reserve`` keeps the place taken until that job's render arrives."""
        if self._state == EngineState.FAILED:
            raise NotReady(f"The model failed to load: {self._failure}", retry_after=60)
        if self.depth >= self._max_queue:
            raise Overloaded(
                f"The queue is full ({self._max_queue} requests waiting or running). Retry later.",
                retry_after=max(1, math.ceil(self._render_s)),
            )
        if reserve is not None:
            self._reserved.add(reserve)

    def unreserve(self, job_id: str) -> None:
        self._reserved.discard(job_id)

    def cancel(self, job_id: str) -> bool:
        call = self._calls.get(job_id)
        if call is None or call.cancelled.is_set():
            return False
        call.cancelled.set()
        if call.response is not None:
            call.response.cancel()
        return True

    async def render(
        self, spec: RenderSpec, timeout: float, job_id: str | None = None, admitted: bool = False
    ) -> RenderResult:
        if not admitted:
            self.admit()
        call = _Call(job_id or secrets.token_hex(8), timeout)
        self._reserved.discard(call.job_id)
        self._calls[call.job_id] = call
        self._tell(RenderUpdate(render_id=call.job_id, stage="queued"))
        start = time.perf_counter()
        deadline = time.monotonic() + max(timeout, 0.001)
        try:
            for attempt in range(self._retries + 1):
                try:
                    result = await self._send(call, spec, deadline)
                except RayActorError as exc:
                    self._replica_deaths += 1
                    log.warning("engine replica died during a render: %s", exc)
                    if attempt < self._retries and deadline - time.monotonic() > 1:
                        continue
                    raise WorkerDied(
                        "The engine replica died while rendering this request; Ray Serve is "
                        "replacing it. Retry the request."
                    ) from None
                break
        finally:
            self._calls.pop(call.job_id, None)
        took = time.perf_counter() - start
        self._render_s = 0.8 * self._render_s + 0.2 * took
        return result

    async def _send(self, call: _Call, spec: RenderSpec, deadline: float) -> RenderResult:
        remaining = deadline - time.monotonic()
        response = self._stream.render.remote(
            spec, remaining, call.job_id, context.request_id.get()
        )
        call.response, call.progress = response, None
        answer = asyncio.ensure_future(self._follow(call, response))
        cancelled = asyncio.ensure_future(call.cancelled.wait())
        try:
            done, _ = await asyncio.wait(
                {answer, cancelled},
                timeout=max(remaining, 0.001),
                return_when=asyncio.FIRST_COMPLETED,
            )
        except asyncio.CancelledError:  # the client went away
            response.cancel()
            answer.cancel()
            raise
        finally:
            cancelled.cancel()
        if answer not in done:
            response.cancel()
            answer.cancel()
            if call.cancelled.is_set():
                raise Cancelled("The request was cancelled.")
            raise DeadlineExceeded(
                f"The request did not finish within its {call.timeout:g}s deadline."
            )
        try:
            outcome = answer.result()
        except BackPressureError as exc:
            wait = exc.args[3] if len(exc.args) > 3 and exc.args[3] else self._render_s
            raise Overloaded(
                "Every engine replica is busy and Serve's queue is full. Retry later.",
                retry_after=max(1, math.ceil(wait)),
            ) from None
        except DeploymentUnavailableError:
            raise NotReady("The engine deployment is not available.", retry_after=10) from None
        except RayTaskError as exc:  # the replica raised: ours are re-raised as they were
            if isinstance(exc.cause, ZImageError):
                raise exc.cause from None
            raise
        result: RenderResult = outcome
        return result

    async def _follow(self, call: _Call, stream: Any) -> RenderResult:
        """Pass the replica's updates on as they come; return the result it ends with."""
        async for item in stream:
            if isinstance(item, RenderResult):
                return item
            update: RenderUpdate = item
            call.progress = (update.step, update.total)
            self._tell(update)
        raise WorkerDied("The engine replica ended the render without its result.")


async def _awaited(response: Any) -> Any:
    return await response
