"""Our generator against a plain ``ZImagePipeline`` call, end to end, on the tiny model.

With the speed-ups off, the image we return must be the image the stock pipeline makes
for the same prompt and seed (the guidance convention mapped: our 1 is diffusers' 0).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import ZImagePipeline

from zimage_server.core.config import SpeedupSettings, WorkerSettings
from zimage_server.engine.generator import (
    DiffusersGenerator,
    GenerationOverflow,
    diffusers_guidance,
)
from zimage_server.engine.protocol import RenderBatch, RenderItem, WorkerSpec

OFF = SpeedupSettings(
    prompt_bucket_tokens=0,
    prompt_cache_size=0,
    compile="off",
    vae_channels_last="off",
    prefetch_prompts="off",
)
PROMPT = "a lighthouse on a cliff at dawn"


def loaded(tiny_model_dir: Path) -> DiffusersGenerator:
    """The tiny model on the CPU with the speed-ups off, loaded (a fresh one per call)."""
    spec = WorkerSpec(
        name="w",
        model_path=str(tiny_model_dir),
        device="cpu",
        worker=WorkerSettings(),
        speedups=OFF,
    )
    generator = DiffusersGenerator(spec)
    generator.load(lambda *_: None)
    return generator


@pytest.fixture(scope="module")
def generator(tiny_model_dir: Path) -> DiffusersGenerator:
    return loaded(tiny_model_dir)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_our_image_is_the_stock_pipelines_image(
    generator: DiffusersGenerator, tiny_model_dir: Path, guidance: float
) -> None:
    batch = RenderBatch("b", (RenderItem("job", PROMPT, 1234),), 256, 256, 3, guidance)
    done = generator.generate(batch, lambda *_: None, lambda: False)
    ours = np.frombuffer(done.images[0].rgb, np.uint8).reshape(256, 256, 3)

    pipe = ZImagePipeline.from_pretrained(tiny_model_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    stock = pipe(
        prompt=PROMPT,
        height=256,
        width=256,
        num_inference_steps=3,
        guidance_scale=diffusers_guidance(guidance),
        generator=torch.Generator("cpu").manual_seed(1234),
        output_type="pil",
    ).images[0]
    expected = np.asarray(stock.convert("RGB"))
    assert expected.shape == ours.shape
    assert np.array_equal(ours, expected), int(np.abs(ours.astype(int) - expected).max())
    assert done.transformer_passes == 3 * (2 if guidance > 1 else 1)


def test_building_the_other_tasks_pipelines_keeps_the_models_dtype(tiny_model_dir: Path) -> None:
    """Warm-up builds img2img/inpaint over the shared modules with ``from_pipe``, which
    casts them to float32 unless told otherwise: on a GPU that made the bf16 model fp32
    (twice the memory, 5-7x slower renders). The model is bf16 here as it is on CUDA."""
    generator = loaded(tiny_model_dir)
    generator.pipe.to(dtype=torch.bfloat16)
    generator._warm_tasks()
    assert generator._task_pipes, "warm-up built no task pipeline"
    for task, pipe in generator._task_pipes.items():
        assert pipe.transformer is generator.pipe.transformer, task  # shared, not copied
    for name in ("transformer", "text_encoder", "vae"):
        dtypes = {p.dtype for p in getattr(generator.pipe, name).parameters()}
        assert dtypes == {torch.bfloat16}, (name, dtypes)


def test_a_render_that_overflows_is_refused_not_delivered(tiny_model_dir: Path) -> None:
    """NaN or infinite values would round to a black image, delivered and billed as a
    success; the render fails instead (the API refunds it). Here the model itself overflows,
    so no adapter is to blame: the server's fault."""
    generator = loaded(tiny_model_dir)
    with torch.no_grad():
        for weight in generator.pipe.transformer.layers[0].parameters():
            weight.mul_(1e30)
    batch = RenderBatch("b", (RenderItem("job", PROMPT, 1),), 256, 256, 2, 1.0)
    with pytest.raises(GenerationOverflow, match=r"overflowed \(NaN or infinite values\)"):
        generator.generate(batch, lambda *_: None, lambda: False)
