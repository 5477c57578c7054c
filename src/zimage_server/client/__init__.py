"""Python SDK for zimage-server (and Segmind's hosted Z-Image-Turbo API).

from zimage_server.client import ZImageClient
with ZImageClient("http://127.0.0.1:8000", api_key="zk_...") as client:
    image = client.generate("a lighthouse at dawn", seed=42)
    image.save("out.webp")
"""

from zimage_server.client._events import RenderEvent
from zimage_server.client._shared import GeneratedImage, Job
from zimage_server.client.asynchronous import AsyncZImageClient
from zimage_server.client.errors import (
    APIConnectionError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    DeadlineExceededError,
    InsufficientCreditsError,
    JobFailedError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    UnavailableError,
    WorkerDiedError,
    ZImageAPIError,
)
from zimage_server.client.sync import ZImageClient

__all__ = [
    "APIConnectionError",
    "AsyncZImageClient",
    "AuthenticationError",
    "BadRequestError",
    "ConflictError",
    "DeadlineExceededError",
    "GeneratedImage",
    "InsufficientCreditsError",
    "Job",
    "JobFailedError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "RenderEvent",
    "ServerError",
    "UnavailableError",
    "WorkerDiedError",
    "ZImageAPIError",
    "ZImageClient",
]
