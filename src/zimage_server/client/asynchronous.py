"""Asynchronous SDK client (httpx); the same surface as ``ZImageClient``."""

from __future__ import annotations

import asyncio
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
from zimage_server.client.sync import TERMINAL
from zimage_server.protocol import wire


class AsyncZImageClient:
    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        *,
        timeout: float = 300.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.max_retries, self.backoff_s = max_retries, backoff_s
        self.retries_done = 0
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers=headers(api_key),
            timeout=timeout,
            transport=transport,
        )

    async def __aenter__(self) -> AsyncZImageClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(self.max_retries + 1):
            try:
                response = await self._http.request(method, url, **kwargs)
            except httpx.TransportError as exc:
                raise unreachable(self._http.base_url, exc) from exc
            if response.status_code not in RETRY_STATUSES or attempt == self.max_retries:
                return response
            self.retries_done += 1
            await asyncio.sleep(retry_delay(response, attempt, self.backoff_s))
        raise AssertionError("unreachable")  # pragma: no cover

    async def generate(self, prompt: str, *, model: str = MODEL, **options: Any) -> GeneratedImage:
        body = generate_body(prompt, options)
        response = await self._request("POST", f"/v1/{model}", json=body)
        return parse_image(response)

    async def submit(
        self,
        prompt: str,
        *,
        model: str = MODEL,
        webhook_url: str | None = None,
        idempotency_key: str | None = None,
        **options: Any,
    ) -> Job:
        body = {**generate_body(prompt, options), "base_64": False}
        if webhook_url:
            body["webhook_url"] = webhook_url
        extra = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return parse_job(await self._request("POST", f"/v2/{model}", json=body, headers=extra))

    async def status(self, request_id: str) -> dict[str, Any]:
        response = await self._request("GET", f"/v2/requests/{request_id}/status")
        return wire(parse_status(response))

    async def cancel(self, request_id: str) -> dict[str, Any]:
        response = await self._request("POST", f"/v2/requests/{request_id}/cancel")
        return wire(parse_status(response))

    async def wait(
        self,
        request_id: str,
        *,
        timeout: float = 600.0,
        poll_s: float = 0.25,
        image_format: str = "webp",
    ) -> GeneratedImage:
        deadline = time.monotonic() + timeout
        while (status := await self.status(request_id))["status"] not in TERMINAL:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {request_id} still {status['status']} after {timeout}s")
            await asyncio.sleep(poll_s)
        response = await self._request("GET", f"/v2/requests/{request_id}")
        result = parse_result(response)
        if result.status != "COMPLETED" or result.output is None:
            raise JobFailedError(response.status_code, job_failure(request_id, result))
        output = result.output
        fetched = (await self._http.get(output)).content if output.startswith("http") else None
        return job_output(result, image_format, fetched)
