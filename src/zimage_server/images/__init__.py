"""Text-to-image generation as a service: encoding and the orchestration between the
engine and the output store. Knows nothing of HTTP (the bodies live in ``protocol``)."""

from zimage_server.images.service import Generated, GenerationService

__all__ = ["Generated", "GenerationService"]
