"""JSON bodies with base64 images: the same bytes whether built inline or in a thread, and
the same bytes Starlette's ``JSONResponse`` would send for the model's wire dict."""

from __future__ import annotations

import asyncio
import base64
import os
import threading

from fastapi.responses import JSONResponse

from zimage_server.api.responses import image_json, is_large, model_response, render_json
from zimage_server.protocol import ImageResponse, wire


def _image(data: bytes, seed: int = 7) -> ImageResponse:
    return ImageResponse(
        image=base64.b64encode(data).decode(),
        seed=seed,
        width=256,
        height=256,
        image_format="webp",
        quality=90,
        steps=8,
        guidance_scale=1.0,
        generation_time=0.5,
        timings={"denoise": 0.25},
        transformer_passes=8,
        prompt_tokens=3,
    )


def test_render_json_matches_starlette() -> None:
    content = {"image": "é" * 3, "seed": 1, "timings": {"denoise": 0.5}}
    assert render_json(content) == JSONResponse(content).body


def test_model_response_matches_starlette() -> None:
    model = _image(b"abc")
    response = model_response(model, headers={"x-seed": "7"})
    assert response.body == JSONResponse(wire(model)).body
    assert response.headers["content-type"] == "application/json"


def test_large_bodies_are_built_off_the_event_loop() -> None:
    data = os.urandom(64 * 1024)
    threads: list[str] = []

    def build() -> ImageResponse:
        threads.append(threading.current_thread().name)
        return _image(data)

    async def both() -> tuple[bytes, bytes]:
        inline = await image_json(build, False, headers={"x-seed": "7"})
        threaded = await image_json(build, True, status_code=200, headers={"x-seed": "7"})
        assert threaded.headers["x-seed"] == "7"
        assert threaded.headers["content-type"] == inline.headers["content-type"]
        return bytes(inline.body), bytes(threaded.body)

    inline, threaded = asyncio.run(both())
    assert inline == threaded == JSONResponse(wire(_image(data))).body
    assert threads[0] == threading.main_thread().name != threads[1]
    assert is_large(len(data)) and not is_large(1024)
