"""Text-to-image generation as a service: parameters, encoding and the orchestration
between the engine and the output store. Knows nothing of HTTP."""

from zimage_server.images.params import GenerationParams
from zimage_server.images.service import Generated, GenerationService

__all__ = ["Generated", "GenerationParams", "GenerationService"]
