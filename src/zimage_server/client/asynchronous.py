"""Asynchronous SDK client (httpx); the same surface as ``ZImageClient``."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from httpx_sse import EventSource

from zimage_server.client._events import (
    STREAM_HEADERS,
    RenderEvent,
    decode,
    finish_v1,
    finish_v2,
    image_format_of,
    v2_result,
)
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
    raise_for,
    retry_delay,
    unreachable,
)
from zimage_server.client.errors import APIConnectionError, JobFailedError
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

    # ---------- event streams (as ZImageClient's, awaited) ----------

    @contextlib.asynccontextmanager
    async def _open_stream(
        self, method: str, url: str, **kwargs: Any
    ) -> AsyncIterator[httpx.Response]:
        headers = {**STREAM_HEADERS, **kwargs.pop("headers", {})}
        for attempt in range(self.max_retries + 1):
            try:
                async with self._http.stream(method, url, headers=headers, **kwargs) as response:
                    if response.status_code in RETRY_STATUSES and attempt < self.max_retries:
                        await response.aread()
                    else:
                        if not response.is_success:
                            await response.aread()
                            raise_for(response)
                        yield response
                        return
            except httpx.TransportError as exc:
                raise unreachable(self._http.base_url, exc) from exc
            self.retries_done += 1
            await asyncio.sleep(retry_delay(response, attempt, self.backoff_s))

    async def stream(
        self, prompt: str, *, model: str = MODEL, **options: Any
    ) -> AsyncIterator[RenderEvent]:
        """``async for event in client.stream(...)``: see ``ZImageClient.stream``."""
        body, request_id = generate_body(prompt, options), None
        async with self._open_stream("POST", f"/v1/{model}", json=body) as response:
            async for sse in EventSource(response).aiter_sse():
                event = decode(sse)
                if event is None:
                    continue
                if event.terminal:
                    yield finish_v1(event, request_id)
                    return
                request_id = event.request_id or request_id
                yield event
        raise APIConnectionError(str(self._http.base_url), "the stream ended before the image")

    async def events(
        self, request_id: str, *, last_event_id: int | None = None
    ) -> AsyncIterator[RenderEvent]:
        """A v2 job's events, resumed with ``Last-Event-ID``: see ``ZImageClient.events``."""
        failures = 0
        while True:
            headers = {"Last-Event-ID": str(last_event_id)} if last_event_id else {}
            url = f"/v2/requests/{request_id}/events"
            try:
                async with self._open_stream("GET", url, headers=headers) as response:
                    async for sse in EventSource(response).aiter_sse():
                        event = decode(sse)
                        if event is None:
                            continue
                        failures, last_event_id = 0, event.event_id or last_event_id
                        if event.terminal:
                            yield await self._finished_job(event)
                            return
                        yield event
                gap = APIConnectionError(str(self._http.base_url) + url, "the stream ended early")
            except APIConnectionError as exc:
                gap = exc
            if failures >= self.max_retries:
                raise gap
            failures += 1
            await asyncio.sleep(retry_delay(None, failures - 1, self.backoff_s))

    async def _finished_job(self, event: RenderEvent) -> RenderEvent:
        result = v2_result(event)
        output = result.output or ""
        fetched = (await self._http.get(output)).content if output.startswith("http") else None
        data = fetched if fetched is not None else base64.b64decode(output)
        return finish_v2(event, result, job_output(result, image_format_of(data), data))
