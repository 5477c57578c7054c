"""JSON bodies with base64 images: the same bytes whether built inline or in a thread."""

from __future__ import annotations

import asyncio
import base64
import os
import threading

from fastapi.responses import JSONResponse

from zimage_server.api.responses import image_json, is_large, render_json


def test_render_json_matches_starlette() -> None:
    content = {"image": "é" * 3, "seed": 1, "timings": {"denoise": 0.5}}
    assert render_json(content) == JSONResponse(content).body


def test_large_bodies_are_built_off_the_event_loop() -> None:
    data = os.urandom(64 * 1024)
    threads: list[str] = []

    def build() -> dict[str, object]:
        threads.append(threading.current_thread().name)
        return {"image": base64.b64encode(data).decode(), "seed": 7}

    async def both() -> tuple[bytes, bytes]:
        inline = await image_json(build, False, headers={"x-seed": "7"})
        threaded = await image_json(build, True, status_code=200, headers={"x-seed": "7"})
        assert threaded.headers["x-seed"] == "7"
        assert threaded.headers["content-type"] == inline.headers["content-type"]
        return bytes(inline.body), bytes(threaded.body)

    inline, threaded = asyncio.run(both())
    assert inline == threaded
    assert threads[0] == threading.main_thread().name != threads[1]
    assert is_large(len(data)) and not is_large(1024)
