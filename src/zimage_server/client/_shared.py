"""What the sync and async clients share: request bodies, reply parsing and retry timing."""

from __future__ import annotations

import base64
import io
import random
from dataclasses import dataclass, field
from typing import Any

import httpx
from pydantic import ValidationError

from zimage_server.client.errors import APIConnectionError, error_for
from zimage_server.protocol import (
    ImageResponse,
    JobResult,
    JobStatusBody,
    OpenAIError,
    SegmindError,
    SubmittedJob,
)

RETRY_STATUSES = frozenset({429, 502, 503})
MODEL = "z-image-turbo"


@dataclass(frozen=True)
class GeneratedImage:
    """An image from the server: bytes, and how it was made."""

    data: bytes = field(repr=False)  # megabytes: ``repr`` shows its size instead
    seed: int | None
    image_format: str
    width: int | None = None
    height: int | None = None
    generation_time: float | None = None
    timings: dict[str, float] = field(default_factory=dict)
    credits_consumed: str | None = None

    def __repr__(self) -> str:
        size = f"{self.width}x{self.height}" if self.width and self.height else "unknown size"
        return (
            f"GeneratedImage({self.image_format}, {size}, {len(self.data)} bytes, seed={self.seed})"
        )

    def to_pil(self) -> Any:
        from PIL import Image

        return Image.open(io.BytesIO(self.data))

    def save(self, path: str) -> None:
        with open(path, "wb") as out:
            out.write(self.data)


Job = SubmittedJob  # the 202 of a submit: request_id, status and the three URLs


def generate_body(prompt: str, options: dict[str, Any]) -> dict[str, Any]:
    body = {"prompt": prompt, **{k: v for k, v in options.items() if v is not None}}
    body["base_64"] = True
    return body


def headers(api_key: str | None) -> dict[str, str]:
    return {"x-api-key": api_key} if api_key else {}


def unreachable(base_url: httpx.URL, exc: httpx.TransportError) -> APIConnectionError:
    """A transport failure as one readable error (the reason, not a traceback)."""
    reason = str(exc) or type(exc).__name__
    return APIConnectionError(str(base_url).rstrip("/"), reason)


def raise_for(response: httpx.Response) -> None:
    if response.is_success:
        return
    message, request_id = error_of(response)
    raise error_for(response.status_code, message, request_id)


def error_of(response: httpx.Response) -> tuple[str, str | None]:
    """The message (and request id) of an error reply, in either envelope; a reply in
    neither (a proxy's page, say) gives its text."""
    request_id = response.headers.get("x-request-id")
    try:
        body = response.json()
    except ValueError:
        return response.text or response.reason_phrase, request_id
    for model in (SegmindError, OpenAIError):
        try:
            error = model.model_validate(body)
        except ValidationError:
            continue
        if isinstance(error, SegmindError):
            return error.error, request_id or error.request_id
        return error.error.message, request_id
    return response.text, request_id


def parse_image(response: httpx.Response) -> GeneratedImage:
    """A v1 reply: our JSON (base64) or a raw image (Segmind's older style)."""
    raise_for(response)
    seed_header = response.headers.get("x-seed")
    consumed = response.headers.get("x-credits-consumed")
    if response.headers.get("content-type", "").startswith("image/"):
        kind = response.headers["content-type"].split("/", 1)[1]
        width, height = image_size(response.content)
        return GeneratedImage(
            response.content,
            int(seed_header) if seed_header else None,
            kind,
            width=width,
            height=height,
            credits_consumed=consumed,
        )
    return image_of(ImageResponse.model_validate_json(response.content), consumed)


def image_of(body: ImageResponse, consumed: str | None = None) -> GeneratedImage:
    """A v1 JSON body with a base64 image (a reply, or a stream's ``completed``)."""
    return GeneratedImage(
        data=base64.b64decode(body.image),
        seed=body.seed,
        image_format=body.image_format,
        width=body.width,
        height=body.height,
        generation_time=body.generation_time,
        timings=body.timings,
        credits_consumed=consumed,
    )


def parse_job(response: httpx.Response) -> Job:
    raise_for(response)
    return SubmittedJob.model_validate_json(response.content)


def parse_status(response: httpx.Response) -> JobStatusBody:
    """A status (or cancel) reply; a FAILED job's comes with HTTP 422 and is no error."""
    if response.status_code != 422:
        raise_for(response)
    return JobStatusBody.model_validate_json(response.content)


def parse_result(response: httpx.Response) -> JobResult:
    if response.status_code != 422:
        raise_for(response)
    return JobResult.model_validate_json(response.content)


def retry_delay(response: httpx.Response | None, attempt: int, backoff_s: float) -> float:
    """Honour ``Retry-After``; otherwise exponential back-off with jitter."""
    if response is not None:
        value = response.headers.get("retry-after")
        if value and value.replace(".", "", 1).isdigit():
            return float(value)
    return float(backoff_s * 2**attempt * (0.5 + random.random() / 2))  # noqa: S311 - jitter


def job_output(result: JobResult, image_format: str, fetched: bytes | None) -> GeneratedImage:
    if fetched is None and result.output is None:
        raise ValueError(f"request {result.request_id} has no output")
    data = fetched if fetched is not None else base64.b64decode(result.output or "")
    metrics = result.metrics
    width, height = image_size(data)
    return GeneratedImage(
        data=data,
        seed=result.seed,
        image_format=image_format,
        width=width,
        height=height,
        generation_time=metrics.inference_time if metrics else None,
        timings=metrics.timings if metrics else {},
        credits_consumed=metrics.credits if metrics else None,
    )


def image_size(data: bytes) -> tuple[int | None, int | None]:
    """Width and height from the image's header (the v2 result and raw replies do not
    carry them); (None, None) for bytes that are not an image Pillow knows."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except (UnidentifiedImageError, OSError):
        return None, None


def job_failure(request_id: str, result: JobResult) -> str:
    reason = f": {result.error}" if result.error else ""
    return f"Request {request_id} ended {result.status}{reason}"
