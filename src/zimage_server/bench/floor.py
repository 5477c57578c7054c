"""The floor under ``--overhead``: a bare FastAPI endpoint that does only what a v1 request
cannot avoid (parse and validate the body, make the pixels, WebP-encode them in a thread,
base64 them into a JSON response), served by uvicorn like ours and driven by the same client.

Our overhead is reported as a ratio to this: anything above 1 is what the server's own
machinery (auth, credits, the queue, the worker process, metrics) costs per request.

``python -m zimage_server.bench.floor`` binds a free loopback port and prints
``listening on http://127.0.0.1:PORT``, as ``zimage serve`` does, so one launcher starts both.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import sys
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from zimage_server.engine.null import seed_colour
from zimage_server.images.encode import encode_image
from zimage_server.protocol.segmind import GenerationParams, parse_json

app = FastAPI()


@app.get("/readyz")
async def ready() -> dict[str, str]:
    return {"status": "READY"}


@app.post("/v1/z-image-turbo")
async def render(request: Request) -> JSONResponse:
    """The same parse, pixels, encode and response shape as ours, and nothing else."""
    start = time.perf_counter()
    params = GenerationParams.model_validate(parse_json(await request.body()))
    size = (params.width, params.height)
    rgb = seed_colour(params.seed) * (params.width * params.height)
    encode_start = time.perf_counter()
    data = await asyncio.to_thread(
        encode_image, rgb, size, size, str(params.image_format), params.quality
    )
    encoded = time.perf_counter()
    body = {
        "image": base64.b64encode(data).decode("ascii"),
        "seed": params.seed,
        "width": params.width,
        "height": params.height,
        "image_format": str(params.image_format),
        "quality": params.quality,
        "steps": params.steps,
        "guidance_scale": params.guidance_scale,
        "generation_time": encoded - start,
        "timings": {"image_encode": encoded - encode_start},
    }
    return JSONResponse(body)


def main() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)  # before saying so: uvicorn's own listen comes after its imports
    sys.stdout.write(f"listening on http://127.0.0.1:{sock.getsockname()[1]}\n")
    sys.stdout.flush()
    config = uvicorn.Config(app, log_level="warning", access_log=False)
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the SIGINT that stops it
        uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
