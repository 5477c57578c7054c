"""How a job's request is kept: its params in the job row, its input images apart (they
are megabytes, and every poll reads the row), and the hash of the body as the client sent
it (an Idempotency-Key retry is judged on that, before any image is fetched again)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from zimage_server.protocol import GenerationParams

IMAGE_FIELDS = ("image", "mask_image", "control_image")


def request_hash(model: str, body: Any) -> str:
    """The submitted slug and JSON body, canonical (key order and spacing do not count)."""
    canonical = json.dumps({"model": model, "body": body}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def split_inputs(params: GenerationParams) -> tuple[str, str | None]:
    """The params as the job row keeps them (no images), and the images as JSON (None
    when the task has none)."""
    images = {name: getattr(params, name) for name in IMAGE_FIELDS}
    images = {name: value for name, value in images.items() if value is not None}
    if not images:
        return params.model_dump_json(), None
    bare = params.model_copy(update=dict.fromkeys(images))
    return bare.model_dump_json(), json.dumps(images)


def join_inputs(params: str, images: str | None) -> GenerationParams:
    """The params a job renders with: its row's, with its images put back (a job stored
    before images were kept apart has them in its row, and no ``images``)."""
    parsed = GenerationParams.model_validate_json(params)
    if images is None:
        return parsed
    return parsed.model_copy(update=json.loads(images))
