"""Synchronous SDK client (httpx)."""

from __future__ import annotations

import time
from typing import Any

import httpx

from zimage_server.client._shared import (
    MODEL,
    RETRY_STATUSES,
    GeneratedImage,
    Job,
    generate_body,
    headers,
    job_failure,
    job_output,
    parse_image,
    parse_job,
    parse_result,
    parse_status,
    retry_delay,
    unreachable,
)
from zimage_server.client.errors import JobFailedError
from zimage_server.protocol import wire

TERMINAL = ("COMPLETED", "FAILED", "CANCELLED")


class ZImageClient:
    """Talks to zimage-server, or to Segmind's hosted API with its base URL and key.

    Retries 429/502/503 (honouring ``Retry-After``) up to ``max_retries`` times.
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        *,
        timeout: float = 300.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.max_retries, self.backoff_s = max_retries, backoff_s
        self.retries_done = 0
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers=headers(api_key),
            timeout=timeout,
            transport=transport,
        )

    def __enter__(self) -> ZImageClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(self.max_retries + 1):
            try:
                response = self._http.request(method, url, **kwargs)
            except httpx.TransportError as exc:
                raise unreachable(self._http.base_url, exc) from exc
            if response.status_code not in RETRY_STATUSES or attempt == self.max_retries:
                return response
            self.retries_done += 1
            time.sleep(retry_delay(response, attempt, self.backoff_s))
        raise AssertionError("unreachable")  # pragma: no cover

    def generate(self, prompt: str, *, model: str = MODEL, **options: Any) -> GeneratedImage:
        """Render one image (v1). Options: steps, guidance_scale, seed, width, height,
        image_format, quality, loras (``[{"path": name, "scale": 1.0}]``)."""
        body = generate_body(prompt, options)
        response = self._request("POST", f"/v1/{model}", json=body)
        return parse_image(response)

    def submit(
        self,
        prompt: str,
        *,
        model: str = MODEL,
        webhook_url: str | None = None,
        idempotency_key: str | None = None,
        **options: Any,
    ) -> Job:
        """Queue an async job (v2)."""
        body = {**generate_body(prompt, options), "base_64": False}
        if webhook_url:
            body["webhook_url"] = webhook_url
        extra = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return parse_job(self._request("POST", f"/v2/{model}", json=body, headers=extra))

    def status(self, request_id: str) -> dict[str, Any]:
        response = self._request("GET", f"/v2/requests/{request_id}/status")
        return wire(parse_status(response))

    def cancel(self, request_id: str) -> dict[str, Any]:
        response = self._request("POST", f"/v2/requests/{request_id}/cancel")
        return wire(parse_status(response))

    def wait(
        self,
        request_id: str,
        *,
        timeout: float = 600.0,
        poll_s: float = 0.25,
        image_format: str = "webp",
    ) -> GeneratedImage:
        """Poll until the job ends; return its image or raise ``JobFailedError``."""
        deadline = time.monotonic() + timeout
        while (status := self.status(request_id))["status"] not in TERMINAL:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {request_id} still {status['status']} after {timeout}s")
            time.sleep(poll_s)
        response = self._request("GET", f"/v2/requests/{request_id}")
        result = parse_result(response)
        if result.status != "COMPLETED" or result.output is None:
            raise JobFailedError(response.status_code, job_failure(request_id, result))
        output = result.output
        fetched = self._http.get(output).content if output.startswith("http") else None
        return job_output(result, image_format, fetched)
