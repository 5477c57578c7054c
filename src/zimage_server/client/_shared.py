"""What the sync and async clients share: request bodies, reply parsing and retry timing."""

from __future__ import annotations

import base64
import io
import random
from dataclasses import dataclass, field
from typing import Any

import httpx

from zimage_server.client.errors import error_for

RETRY_STATUSES = frozenset({429, 502, 503})
MODEL = "z-image-turbo"


@dataclass(frozen=True)
class GeneratedImage:
    """An image from the server: bytes, and how it was made."""

    data: bytes
    seed: int | None
    image_format: str
    width: int | None = None
    height: int | None = None
    generation_time: float | None = None
    timings: dict[str, float] = field(default_factory=dict)
    credits_consumed: str | None = None

    def to_pil(self) -> Any:
        from PIL import Image

        return Image.open(io.BytesIO(self.data))

    def save(self, path: str) -> None:
        with open(path, "wb") as out:
            out.write(self.data)


@dataclass(frozen=True)
class Job:
    request_id: str
    status: str
    status_url: str
    response_url: str
    cancel_url: str


def generate_body(prompt: str, options: dict[str, Any]) -> dict[str, Any]:
    body = {"prompt": prompt, **{k: v for k, v in options.items() if v is not None}}
    body["base_64"] = True
    return body


def headers(api_key: str | None) -> dict[str, str]:
    return {"x-api-key": api_key} if api_key else {}


def raise_for(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        error = response.json().get("error", response.text)
        message = error.get("message", str(error)) if isinstance(error, dict) else str(error)
    except ValueError:
        message = response.text or response.reason_phrase
    raise error_for(response.status_code, message, response.headers.get("x-request-id"))


def parse_image(response: httpx.Response, image_format: str) -> GeneratedImage:
    """A v1 reply: our JSON (base64) or a raw image (Segmind's older style)."""
    raise_for(response)
    seed_header = response.headers.get("x-seed")
    consumed = response.headers.get("x-credits-consumed")
    if response.headers.get("content-type", "").startswith("image/"):
        kind = response.headers["content-type"].split("/", 1)[1]
        return GeneratedImage(
            response.content,
            int(seed_header) if seed_header else None,
            kind,
            credits_consumed=consumed,
        )
    body = response.json()
    return GeneratedImage(
        data=base64.b64decode(body["image"]),
        seed=body.get("seed", int(seed_header) if seed_header else None),
        image_format=body.get("image_format", image_format),
        width=body.get("width"),
        height=body.get("height"),
        generation_time=body.get("generation_time"),
        timings=body.get("timings", {}),
        credits_consumed=consumed,
    )


def parse_job(response: httpx.Response) -> Job:
    raise_for(response)
    body = response.json()
    return Job(
        body["request_id"],
        body["status"],
        body["status_url"],
        body["response_url"],
        body["cancel_url"],
    )


def retry_delay(response: httpx.Response | None, attempt: int, backoff_s: float) -> float:
    """Honour ``Retry-After``; otherwise exponential back-off with jitter."""
    if response is not None:
        value = response.headers.get("retry-after")
        if value and value.replace(".", "", 1).isdigit():
            return float(value)
    return float(backoff_s * 2**attempt * (0.5 + random.random() / 2))  # noqa: S311 - jitter


def job_output(body: dict[str, Any], image_format: str, fetch: bytes | None) -> GeneratedImage:
    data = fetch if fetch is not None else base64.b64decode(body["output"])
    metrics = body.get("metrics") or {}
    return GeneratedImage(
        data=data,
        seed=body.get("seed"),
        image_format=image_format,
        generation_time=metrics.get("inference_time"),
        timings=metrics.get("timings", {}),
        credits_consumed=metrics.get("credits"),
    )


def job_failure(request_id: str, body: dict[str, Any]) -> str:
    reason = f": {body['error']}" if body.get("error") else ""
    return f"Request {request_id} ended {body['status']}{reason}"
