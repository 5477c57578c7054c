"""The model behind one small interface: load, warm up, render a batch.

Runs only inside a worker process (it imports torch). ``DiffusersGenerator`` wraps the
stock ``ZImagePipeline`` and splits its call into text encode, denoise and VAE decode so
that each stage is timed and can be optimised on its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from zimage_server.engine.protocol import BatchDone, RawImage, RenderBatch
from zimage_server.engine.random_model import build_random_pipeline, is_random_model

ProgressFn = Callable[[str, int, int], None]
StepFn = Callable[[int, int], None]
MAX_SEQUENCE_LENGTH = 512  # Z-Image's text window; longer prompts are truncated.


class Cancelled(Exception):
    """Every image of the batch was cancelled; raised between denoising steps."""


def diffusers_guidance(guidance_scale: float) -> float:
    """Map the API's guidance convention (1 = off) to diffusers' (0 = off).

    ``ZImagePipeline`` computes ``pos + g * (pos - neg)`` and runs CFG for any g > 0, so
    the API's default 1 passed straight through would double the work and change the
    image. API g <= 1 means a single transformer pass per step.
    """
    return guidance_scale - 1.0 if guidance_scale > 1.0 else 0.0


class ImageGenerator(Protocol):
    @property
    def dtype_name(self) -> str: ...

    def load(self, progress: ProgressFn) -> None: ...

    def warmup(self) -> None: ...

    def generate(
        self, batch: RenderBatch, on_step: StepFn, is_cancelled: Callable[[], bool]
    ) -> BatchDone: ...


@dataclass(frozen=True)
class GeneratorConfig:
    model_path: str
    device: str  # "cpu", "cuda", "cuda:1"
    warmup_size: int = 1024
    warmup_steps: int = 2
    step_delay_s: float = 0.0
    faults: bool = False  # honour [[fault:...]] markers in prompts (tests, chaos drills)


def make_generator(config: GeneratorConfig) -> ImageGenerator:
    """The null generator for ``--model null``; the diffusers pipeline otherwise."""
    from zimage_server.engine.null import NULL_MODEL, NullGenerator

    if config.model_path == NULL_MODEL:
        return NullGenerator()
    return DiffusersGenerator(config)


class DiffusersGenerator:
    """``ZImagePipeline`` on one device, with stage timings and a pass counter."""

    def __init__(self, config: GeneratorConfig) -> None:
        self.config = config
        self.pipe: Any = None
        self.torch: Any = None
        self._passes = 0

    @property
    def dtype_name(self) -> str:
        return "bfloat16" if self.config.device.startswith("cuda") else "float32"

    def load(self, progress: ProgressFn) -> None:
        progress("importing torch and diffusers", 1, 3)
        import torch
        from diffusers import ZImagePipeline

        self.torch = torch
        dtype = getattr(torch, self.dtype_name)
        if is_random_model(self.config.model_path):
            progress("building random weights on " + self.config.device, 2, 3)
            pipe = build_random_pipeline(self.config.model_path, self.config.device, dtype)
        else:
            progress("loading weights", 2, 3)
            pipe = ZImagePipeline.from_pretrained(self.config.model_path, dtype=dtype)
        progress("moving to " + self.config.device, 3, 3)
        pipe.to(self.config.device)
        pipe.set_progress_bar_config(disable=True)
        pipe.transformer.register_forward_pre_hook(self._count_passes)
        self.pipe = pipe

    def _count_passes(self, _module: Any, args: tuple[Any, ...]) -> None:
        self._passes += len(args[0])

    def warmup(self) -> None:
        size = self.config.warmup_size
        batch = RenderBatch("warmup", (), size, size, self.config.warmup_steps, 1.0)
        self._run(batch, ["warm-up"], [0], lambda _s, _t: None, lambda: False)

    def generate(
        self, batch: RenderBatch, on_step: StepFn, is_cancelled: Callable[[], bool]
    ) -> BatchDone:
        prompts = [item.prompt for item in batch.items]
        seeds = [item.seed for item in batch.items]
        pixels, timings, passes, tokens = self._run(batch, prompts, seeds, on_step, is_cancelled)
        images = tuple(
            RawImage(item.job_id, batch.width, batch.height, pixels[i].tobytes())
            for i, item in enumerate(batch.items)
        )
        return BatchDone(batch.batch_id, images, timings, passes, tuple(tokens))

    def _run(
        self,
        batch: RenderBatch,
        prompts: list[str],
        seeds: list[int],
        on_step: StepFn,
        is_cancelled: Callable[[], bool],
    ) -> tuple[Any, dict[str, float], int, list[int]]:
        torch, pipe = self.torch, self.pipe
        guidance = diffusers_guidance(batch.guidance_scale)
        timings: dict[str, float] = {}
        self._passes = 0
        with torch.inference_mode():
            start = time.perf_counter()
            # encode_prompt rewrites the list it is given: pass a copy.
            positive, negative = pipe.encode_prompt(
                prompt=list(prompts),
                device=pipe._execution_device,
                do_classifier_free_guidance=guidance > 0,
                max_sequence_length=MAX_SEQUENCE_LENGTH,
            )
            timings["text_encode"] = self._lap(start)
            latents = self._denoise(
                batch, positive, negative, guidance, seeds, on_step, is_cancelled
            )
            timings["denoise"] = self._lap(start, sum(timings.values()))
            pixels = self._decode(latents)
            timings["vae_decode"] = self._lap(start, sum(timings.values()))
        return pixels, timings, self._passes, [int(p.shape[0]) for p in positive]

    def _denoise(
        self,
        batch: RenderBatch,
        positive: list[Any],
        negative: list[Any],
        guidance: float,
        seeds: list[int],
        on_step: StepFn,
        is_cancelled: Callable[[], bool],
    ) -> Any:
        torch, pipe = self.torch, self.pipe
        device = pipe._execution_device
        generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
        delay = self.config.step_delay_s

        def step_end(_pipe: Any, step: int, _t: Any, _kwargs: dict[str, Any]) -> dict[str, Any]:
            if delay:
                time.sleep(delay)
            if is_cancelled():
                raise Cancelled
            on_step(step + 1, batch.steps)
            return {}

        return pipe(
            prompt_embeds=positive,
            negative_prompt_embeds=negative if guidance > 0 else None,
            height=batch.height,
            width=batch.width,
            num_inference_steps=batch.steps,
            guidance_scale=guidance,
            generator=generators,
            output_type="latent",
            callback_on_step_end=step_end,
        ).images

    def _decode(self, latents: Any) -> Any:
        """VAE decode, then the stock post-processing (denormalise, round to uint8)."""
        torch, vae = self.torch, self.pipe.vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(latents, return_dict=False)[0]
        image = (image.float() / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)
        return image.permute(0, 2, 3, 1).contiguous().cpu().numpy()

    def _lap(self, start: float, before: float = 0.0) -> float:
        if self.config.device.startswith("cuda"):
            self.torch.cuda.synchronize()
        return time.perf_counter() - start - before
