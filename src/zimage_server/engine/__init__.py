"""The engine: a worker process per device running the diffusers pipeline, and the
API-side scheduler and dispatchers that queue, batch and hand renders to it."""

from zimage_server.engine.interface import EngineLike
from zimage_server.engine.render import (
    BatchKey,
    RenderListener,
    RenderResult,
    RenderSpec,
    RenderUpdate,
)
from zimage_server.engine.supervisor import Engine, EngineState

__all__ = [
    "BatchKey",
    "Engine",
    "EngineLike",
    "EngineState",
    "RenderListener",
    "RenderResult",
    "RenderSpec",
    "RenderUpdate",
]
