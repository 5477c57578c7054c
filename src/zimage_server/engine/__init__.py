"""The engine: a worker process per device running the diffusers pipeline, and the
API-side supervisor that queues, batches and dispatches renders to it."""

from zimage_server.engine.interface import EngineLike
from zimage_server.engine.supervisor import Engine, EngineState, RenderResult, RenderSpec

__all__ = ["Engine", "EngineLike", "EngineState", "RenderResult", "RenderSpec"]
