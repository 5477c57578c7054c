"""What the services need from an engine. ``Engine`` (worker processes on this machine)
implements it; so does the Ray Serve engine, which forwards renders to GPU replicas."""

from __future__ import annotations

from typing import Protocol

from zimage_server.engine.render import RenderListener, RenderResult, RenderSpec
from zimage_server.engine.supervisor import EngineState


class EngineLike(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def render(
        self, spec: RenderSpec, timeout: float, job_id: str | None = None, admitted: bool = False
    ) -> RenderResult: ...

    def admit(self, reserve: str | None = None) -> None:
        """Raise if a render would be refused now; ``reserve`` holds a place in the queue
        bound under that id until the render with that id arrives or ``unreserve``."""

    def unreserve(self, job_id: str) -> None: ...

    def position(self, job_id: str) -> int | None: ...

    def progress(self, job_id: str) -> tuple[int, int] | None: ...

    def cancel(self, job_id: str) -> bool: ...

    def watch(self, listener: RenderListener) -> None:
        """Tell ``listener`` each render's queueing, start and steps (for event streams)."""

    def restarts(self) -> float: ...

    def load_seconds(self) -> float: ...

    @property
    def state(self) -> EngineState: ...

    @property
    def failure(self) -> str | None: ...

    @property
    def depth(self) -> int: ...

    @property
    def max_queue(self) -> int: ...
