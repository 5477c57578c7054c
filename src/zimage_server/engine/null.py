"""A zero-cost generator: a solid colour of the requested size, at once.

Selected by ``--model null``, for benchmarking the server's own overhead (HTTP,
validation, queue, worker IPC, image encode). It runs in the same worker process and
speaks the same protocol as the diffusers generator, so only the model's cost is gone.
Never imports torch.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from zimage_server.core.errors import Cancelled
from zimage_server.engine.protocol import BatchDone, Preview, Prompt, RawImage, RenderBatch

NULL_MODEL = "null"
STAGES = ("text_encode", "denoise", "vae_decode")
ProgressFn = Callable[[str, int, int], None]


def seed_colour(seed: int) -> bytes:
    """One RGB pixel that depends on the seed, so different requests differ."""
    return bytes((seed >> shift) & 0xFF for shift in (16, 8, 0))


class NullGenerator:
    """Implements ``ImageGenerator`` with no model at all. ``step_delay_s``
    (``ZIMAGE_DEBUG_STEP_DELAY_S``) makes each step take that long, cancellable between
    steps, as the diffusers generator does: tests that need renders in flight use it
    without loading torch."""

    dtype_name = "none"

    def __init__(self, step_delay_s: float = 0.0) -> None:
        self.step_delay_s = step_delay_s

    def load(self, progress: ProgressFn) -> None:
        progress("null generator: nothing to load", 1, 1)

    def warmup(self) -> None:
        """Nothing to warm."""

    def device_memory(self) -> None:
        """No device."""

    def generate(
        self,
        batch: RenderBatch,
        on_step: Callable[[int, int, tuple[Preview, ...]], None],
        is_cancelled: Callable[[], bool],
    ) -> BatchDone:
        if self.step_delay_s:
            for step in range(batch.steps):
                time.sleep(self.step_delay_s)
                if is_cancelled():
                    raise Cancelled("every image of the batch was cancelled")
                on_step(step + 1, batch.steps, ())
        pixels = batch.width * batch.height
        images = tuple(
            RawImage(item.job_id, batch.width, batch.height, seed_colour(item.seed) * pixels)
            for item in batch.items
        )
        timings = dict.fromkeys(STAGES, 0.0)
        return BatchDone(batch.batch_id, images, timings, 0, tuple(0 for _ in batch.items))

    def prefetch(self, prompts: list[Prompt]) -> None:
        """No text encoder: nothing to do ahead."""
