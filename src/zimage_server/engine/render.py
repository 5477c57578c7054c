"""The engine's values: what to render, which renders may share a batch, what came back."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from zimage_server.core.denoise import steps_run
from zimage_server.engine.pixels import Pixels, SharedPixels, pixel_view
from zimage_server.engine.protocol import LoraRef, Preview, Prompt

log = logging.getLogger("zimage.engine")


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchKey:
    """Renders with equal keys can run in one pipeline call.

    A value, so that new tasks (input images, adapters) extend the key here and the
    scheduler, which only compares keys, does not change.
    """

    width: int
    height: int
    steps: int
    guidance_scale: float
    loras: tuple[LoraRef, ...] = ()  # the adapter set and scales: batches never mix them
    task: str = "text-to-image"  # img2img, inpaint: a batch is one pipeline, one task
    strength: float = 1.0  # the steps that run depend on it
    control_scale: float = 0.0  # controlnet: one conditioning scale per pipeline call

    @property
    def steps_run(self) -> int:
        return steps_run(self.steps, self.strength)


@dataclass(frozen=True, slots=True, kw_only=True)
class RenderSpec:
    """One image to render; width and height are multiples of 16."""

    prompt: str
    seed: int
    width: int
    height: int
    steps: int
    guidance_scale: float
    tenant: str = ""  # whose request: cached prompt embeddings are shared only within one
    preview_size: int = 0  # per-step previews this many pixels on the longer side; 0: none
    loras: tuple[LoraRef, ...] = ()
    task: str = "text-to-image"
    strength: float = 1.0
    image: bytes = b""  # img2img/inpaint: the input, RGB uint8 at width x height
    mask: bytes = b""  # inpaint: L uint8 at width x height, 255 = repaint
    control: bytes = b""  # controlnet: the control image, RGB uint8 at width x height
    control_scale: float = 0.0

    @property
    def cache_key(self) -> Prompt:
        return Prompt(self.tenant, self.prompt)

    def batch_key(self) -> BatchKey:
        return BatchKey(
            width=self.width,
            height=self.height,
            steps=self.steps,
            guidance_scale=self.guidance_scale,
            loras=self.loras,
            task=self.task,
            strength=self.strength,
            control_scale=self.control_scale,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class RenderResult:
    """One rendered image as raw RGB at render size, and how it was made.

    ``rgb`` may be read in place from shared memory: whoever consumes it reads it through
    ``pixels()`` and calls ``close()`` when done, so its slot serves the next batch."""

    rgb: Pixels
    width: int
    height: int
    timings: dict[str, float] = field(default_factory=dict)
    transformer_passes: int = 0  # for the whole batch
    batch_size: int = 1
    prompt_tokens: int = 0
    worker: str = ""
    prompt_source: str = ""  # encoded | cache | prefetch ("" from a generator without one)

    def pixels(self) -> memoryview:
        """The RGB bytes, not copied (valid even after ``close()``, for as long as held)."""
        return pixel_view(self.rgb)

    def close(self) -> None:
        """Done with the pixels: a shared-memory slot returns once no view is left."""
        if isinstance(self.rgb, SharedPixels):
            self.rgb.close()


@dataclass(frozen=True, slots=True, kw_only=True)
class RenderUpdate:
    """What happened to one render, for whoever streams its progress: ``queued`` (with
    the place in the queue, 0 = next), ``started``, or ``step`` (with its preview)."""

    render_id: str
    stage: Literal["queued", "started", "step"]
    step: int = 0
    total: int = 0
    position: int | None = None
    preview: Preview | None = None


RenderListener = Callable[[RenderUpdate], None]


def tell(listeners: list[RenderListener], update: RenderUpdate) -> None:
    """Hand ``update`` to every listener; one listener's bug never fails the render."""
    for listener in listeners:
        try:
            listener(update)
        except Exception:
            log.exception("a render listener failed on %s", update.stage)
