"""Synchronous SDK client (httpx)."""

from __future__ import annotations

import base64
import contextlib
import time
from collections.abc import Iterator
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

    # ---------- event streams ----------

    @contextlib.contextmanager
    def _open_stream(self, method: str, url: str, **kwargs: Any) -> Iterator[httpx.Response]:
        """An event stream's response, once it is one: 429/502/503 before it starts are
        retried like any request, other refusals raise their typed error, and a transport
        failure (at once or mid-stream) is an ``APIConnectionError``."""
        headers = {**STREAM_HEADERS, **kwargs.pop("headers", {})}
        for attempt in range(self.max_retries + 1):
            try:
                with self._http.stream(method, url, headers=headers, **kwargs) as response:
                    if response.status_code in RETRY_STATUSES and attempt < self.max_retries:
                        response.read()
                    else:
                        if not response.is_success:
                            response.read()
                            raise_for(response)
                        yield response
                        return
            except httpx.TransportError as exc:
                raise unreachable(self._http.base_url, exc) from exc
            self.retries_done += 1
            time.sleep(retry_delay(response, attempt, self.backoff_s))

    def stream(self, prompt: str, *, model: str = MODEL, **options: Any) -> Iterator[RenderEvent]:
        """Render one image (v1) and yield its events as it renders, ending with
        ``completed`` (``event.image``). ``preview=True`` or ``preview_size=N`` adds a WebP
        preview to each step. A failure raises its typed error; leaving the loop early
        stops the render (and it is not billed)."""
        body, request_id = generate_body(prompt, options), None
        with self._open_stream("POST", f"/v1/{model}", json=body) as response:
            for sse in EventSource(response).iter_sse():
                event = decode(sse)
                if event is None:
                    continue
                if event.terminal:
                    yield finish_v1(event, request_id)
                    return
                request_id = event.request_id or request_id
                yield event
        raise APIConnectionError(str(self._http.base_url), "the stream ended before the image")

    def events(self, request_id: str, *, last_event_id: int | None = None) -> Iterator[RenderEvent]:
        """A v2 job's events until it ends (``completed`` carries ``image`` and
        ``result``). A dropped connection is resumed with ``Last-Event-ID`` (up to
        ``max_retries`` times in a row); FAILED or CANCELLED raise ``JobFailedError``."""
        failures = 0
        while True:
            headers = {"Last-Event-ID": str(last_event_id)} if last_event_id else {}
            url = f"/v2/requests/{request_id}/events"
            try:
                with self._open_stream("GET", url, headers=headers) as response:
                    for sse in EventSource(response).iter_sse():
                        event = decode(sse)
                        if event is None:
                            continue
                        failures, last_event_id = 0, event.event_id or last_event_id
                        if event.terminal:
                            yield self._finished_job(event)
                            return
                        yield event
                gap = APIConnectionError(str(self._http.base_url) + url, "the stream ended early")
            except APIConnectionError as exc:
                gap = exc
            if failures >= self.max_retries:
                raise gap
            failures += 1
            time.sleep(retry_delay(None, failures - 1, self.backoff_s))

    def _finished_job(self, event: RenderEvent) -> RenderEvent:
        result = v2_result(event)
        output = result.output or ""
        fetched = self._http.get(output).content if output.startswith("http") else None
        data = fetched if fetched is not None else base64.b64decode(output)
        return finish_v2(event, result, job_output(result, image_format_of(data), data))
