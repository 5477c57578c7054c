"""Per-step previews: latents to small RGB with one linear map, on the device, no VAE.

Z-Image-Turbo uses the FLUX.1 VAE, so its 16 latent channels map to RGB by the 16x3
least-squares factors published for FLUX.1 latents (ComfyUI ``comfy/latent_formats.py``,
class ``Flux``: ``latent_rgb_factors`` and ``latent_rgb_factors_bias``), applied to the
latents as the pipeline holds them (scaled and shifted), giving roughly [-1, 1]. A
projection and a resize cost microseconds next to a transformer step; only the small
uint8 result leaves the device. Runs only in a worker process (imports torch).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from zimage_server.engine.protocol import Preview

FLUX_LATENT_RGB = (
    (-0.0346, 0.0244, 0.0681),
    (0.0034, 0.0210, 0.0687),
    (0.0275, -0.0668, -0.0433),
    (-0.0174, 0.0160, 0.0617),
    (0.0859, 0.0721, 0.0329),
    (0.0004, 0.0383, 0.0115),
    (0.0405, 0.0861, 0.0915),
    (-0.0236, -0.0185, -0.0259),
    (-0.0245, 0.0250, 0.1180),
    (0.1008, 0.0755, -0.0421),
    (-0.0515, 0.0201, 0.0011),
    (0.0428, -0.0012, -0.0036),
    (0.0817, 0.0765, 0.0749),
    (-0.1264, -0.0522, -0.1103),
    (-0.0280, -0.0881, -0.0499),
    (-0.1262, -0.0982, -0.0778),
)
FLUX_LATENT_RGB_BIAS = (-0.0329, -0.0718, -0.0851)


def preview_shape(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the longer side ``size``, keeping the render's aspect ratio."""
    scale = size / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


class LatentPreviewer:
    """Holds the projection on the device; ``previews`` makes one step's previews."""

    def __init__(self, device: str | torch.device) -> None:
        self._factors = torch.tensor(FLUX_LATENT_RGB, dtype=torch.float32, device=device)
        self._bias = torch.tensor(FLUX_LATENT_RGB_BIAS, dtype=torch.float32, device=device)

    def previews(
        self,
        latents: Any,
        items: Sequence[tuple[int, str, int]],
        render_size: tuple[int, int],
    ) -> tuple[Preview, ...]:
        """``items`` are (index in the batch, job id, preview size) of those that asked."""
        if not items:
            return ()
        start = time.perf_counter()
        rgb = self._project(latents[[index for index, _, _ in items]])
        arrays = []
        for row, (_, _, size) in enumerate(items):
            width, height = preview_shape(*render_size, size)
            image = F.interpolate(
                rgb[row : row + 1], size=(height, width), mode="bilinear", antialias=True
            )
            arrays.append(image[0].permute(1, 2, 0).mul(255).round().to(torch.uint8))
        host = [array.cpu().numpy() for array in arrays]  # waits for the device once each
        took = time.perf_counter() - start
        return tuple(
            Preview(job_id, array.shape[1], array.shape[0], array.tobytes(), took)
            for (_, job_id, _), array in zip(items, host, strict=True)
        )

    def _project(self, latents: Any) -> Any:
        """(n, 16, h, w) latents to (n, 3, h, w) RGB in [0, 1]."""
        projected = torch.einsum("nchw,cr->nrhw", latents.float(), self._factors)
        projected = projected + self._bias.view(1, 3, 1, 1)
        return ((projected + 1) / 2).clamp(0, 1)
