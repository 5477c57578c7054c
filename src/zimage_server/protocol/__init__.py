"""The HTTP contract as pydantic models: what clients send and what they get back.

One module per API flavour: ``segmind`` (v1 sync, v2 async jobs), ``openai`` (images and
models) and ``errors`` (both error envelopes). The routes validate and render with these
models, the OpenAPI schema is generated from them, and the SDK in ``zimage_server.client``
parses replies with them. No FastAPI here: the SDK imports this package.
"""

from zimage_server.protocol.errors import Flavour, OpenAIError, SegmindError, error_body
from zimage_server.protocol.openai import (
    ImageGenerationRequest,
    ImageObject,
    ImagesResponse,
    Model,
    ModelList,
)
from zimage_server.protocol.segmind import (
    MODEL_SLUG,
    GenerationParams,
    ImageResponse,
    JobList,
    JobListItem,
    JobMetrics,
    JobProgress,
    JobResult,
    JobStatusBody,
    SubmitRequest,
    SubmittedJob,
    parse_params,
    validate_params,
    validate_submit,
)
from zimage_server.protocol.wire import wire

__all__ = [
    "MODEL_SLUG",
    "Flavour",
    "GenerationParams",
    "ImageGenerationRequest",
    "ImageObject",
    "ImageResponse",
    "ImagesResponse",
    "JobList",
    "JobListItem",
    "JobMetrics",
    "JobProgress",
    "JobResult",
    "JobStatusBody",
    "Model",
    "ModelList",
    "OpenAIError",
    "SegmindError",
    "SubmitRequest",
    "SubmittedJob",
    "error_body",
    "parse_params",
    "validate_params",
    "validate_submit",
    "wire",
]
