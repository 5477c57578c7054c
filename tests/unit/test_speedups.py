"""Each engine speed-up, on the tiny model: lossless ones change nothing, lossy ones say so."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import ZImagePipeline
from pydantic import ValidationError

from zimage_server.core.config import Settings, SpeedupSettings, WorkerSettings
from zimage_server.core.errors import StartupError, TaskNotConfigured
from zimage_server.engine.generator import DiffusersGenerator
from zimage_server.engine.protocol import (
    BatchDone,
    Prefetch,
    Prompt,
    RenderBatch,
    RenderItem,
    WorkerSpec,
)
from zimage_server.engine.rope import rotate, use_real_rope
from zimage_server.engine.speedups import (
    SpeedupError,
    attention_backend,
    fp8_wanted,
    quantize_fp8,
)
from zimage_server.engine.text import PromptEncoder
from zimage_server.engine.worker import prefetch_forever


def spec(
    model: Path | str, speedups: SpeedupSettings | None = None, cache: str | None = None
) -> WorkerSpec:
    return WorkerSpec(
        name="worker-0",
        model_path=str(model),
        device="cpu",
        worker=WorkerSettings(),
        speedups=speedups or SpeedupSettings(),
        compile_cache_dir=cache,
    )


PROMPTS = ["a cat", "ड्रैगन फ्रूट, a much longer prompt about a lighthouse on a cliff at dawn " * 3]


def render(
    model: Path, speedups: SpeedupSettings, guidance: float = 1.0, steps: int = 3
) -> tuple[DiffusersGenerator, BatchDone, list[np.ndarray]]:
    generator = DiffusersGenerator(spec(model, speedups))
    generator.load(lambda *_: None)
    items = tuple(RenderItem(f"job{i}", p, 11 + i) for i, p in enumerate(PROMPTS))
    batch = RenderBatch("b", items, 256, 256, steps, guidance)
    done = generator.generate(batch, lambda *_: None, lambda: False)
    pixels = [np.frombuffer(image.rgb, np.uint8).astype(np.int16) for image in done.images]
    return generator, done, pixels


def max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> int:
    return max(int(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def stock_padded(tiny_model_dir: Path) -> tuple[BatchDone, list[np.ndarray]]:
    """The reference: every speed-up off, prompts padded to 512 like stock."""
    reference = SpeedupSettings(
        prompt_bucket_tokens=0, prompt_cache_size=0, compile="off", vae_channels_last="off"
    )
    _, done, pixels = render(tiny_model_dir, reference, guidance=2.0)
    return done, pixels


def test_bucketed_prompts_give_stock_embeddings(tiny_model_dir: Path) -> None:
    pipe = ZImagePipeline.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.inference_mode():
        stock, _ = pipe.encode_prompt(list(PROMPTS), do_classifier_free_guidance=False)
        encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder, bucket=64, cache_size=0)
        ours = encoder.encode(list(PROMPTS))
    assert encoder.padded_tokens % 64 == 0 and encoder.padded_tokens < 2 * 512
    assert encoder.padded_tokens == 2 * -(-max(len(e) for e in stock) // 64) * 64
    for theirs, mine in zip(stock, ours, strict=True):
        assert mine.shape == theirs.shape
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-4)


def test_cfg_negative_is_stocks_and_encoded_once_without_a_cache(tiny_model_dir: Path) -> None:
    pipe = ZImagePipeline.from_pretrained(tiny_model_dir, dtype=torch.float32)
    encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder, bucket=64, cache_size=0)
    calls: list[int] = []
    pipe.text_encoder.register_forward_pre_hook(lambda *_: calls.append(1))
    with torch.inference_mode():
        first, second = encoder.negatives(2)
        encoder.negatives(3)
        assert len(calls) == 1 and first is second
        _, stock = pipe.encode_prompt(["x"], do_classifier_free_guidance=True)
    torch.testing.assert_close(first, stock[0], atol=1e-5, rtol=1e-4)


def test_prompt_cache_reuses_and_evicts(tiny_model_dir: Path) -> None:
    pipe = ZImagePipeline.from_pretrained(tiny_model_dir, dtype=torch.float32)
    encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder, bucket=64, cache_size=2)
    with torch.inference_mode():
        first = encoder.encode(["a", "b", "a"])
        assert encoder.hits == 0 and first[0] is first[2]  # encoded once
        again = encoder.encode(["b"])
        assert encoder.hits == 1 and encoder.padded_tokens == 0 and again[0] is first[1]
        encoder.encode(["c"])  # evicts "a", the least recently used
        encoder.encode(["a"])
    assert encoder.hits == 1 and encoder.padded_tokens == 64


def test_prompt_cache_and_prefetch_are_scoped_by_tenant(tiny_model_dir: Path) -> None:
    """One key's cached prompt is never another's hit: a fast encode would tell it that
    the other used that exact prompt."""
    pipe = ZImagePipeline.from_pretrained(tiny_model_dir, dtype=torch.float32)
    encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder, bucket=64, cache_size=8)
    with torch.inference_mode():
        (mine,) = encoder.encode([Prompt("key-1", "a secret plan")])
        (theirs,) = encoder.encode([Prompt("key-2", "a secret plan")])
        assert encoder.sources == ["encoded"] and theirs is not mine
        torch.testing.assert_close(theirs, mine)  # the same embedding, computed anew
        encoder.encode([Prompt("key-1", "a secret plan")])
        assert encoder.sources == ["cache"]
        assert encoder.prefetch([Prompt("key-3", "a secret plan")], lambda _e: None) == 1
        encoder.encode([Prompt("key-3", "a secret plan")])
        assert encoder.sources == ["prefetch"]


def test_default_speedups_render_the_stock_image(
    tiny_model_dir: Path, stock_padded: tuple[BatchDone, list[np.ndarray]]
) -> None:
    _, done, pixels = render(tiny_model_dir, SpeedupSettings(vae_channels_last="on"), guidance=2.0)
    assert max_diff(pixels, stock_padded[1]) <= 1
    assert done.transformer_passes == stock_padded[0].transformer_passes == 2 * 2 * 3


def test_math_attention_backend_renders_the_same_image(
    tiny_model_dir: Path, stock_padded: tuple[BatchDone, list[np.ndarray]]
) -> None:
    _, _, pixels = render(
        tiny_model_dir, SpeedupSettings(attention_backend="_native_math"), guidance=2.0
    )
    assert max_diff(pixels, stock_padded[1]) <= 1
    assert attention_backend("auto", "cpu") == "native"


def test_real_rope_is_the_complex_rotation(
    tiny_model_dir: Path, stock_padded: tuple[BatchDone, list[np.ndarray]]
) -> None:
    x = torch.randn(2, 7, 3, 8)
    angles = torch.randn(2, 7, 4)
    freqs = torch.polar(torch.ones_like(angles), angles)
    complex_x = torch.view_as_complex(x.reshape(2, 7, 3, 4, 2))
    expected = torch.view_as_real(complex_x * freqs[:, :, None]).flatten(3)
    torch.testing.assert_close(rotate(x, torch.view_as_real(freqs)), expected)

    generator = DiffusersGenerator(spec(tiny_model_dir))
    generator.load(lambda *_: None)
    assert use_real_rope(generator.pipe.transformer)
    assert not use_real_rope(generator.pipe.transformer)  # already swapped: left alone
    items = tuple(RenderItem(f"job{i}", p, 11 + i) for i, p in enumerate(PROMPTS))
    done = generator.generate(
        RenderBatch("b", items, 256, 256, 3, 2.0), lambda *_: None, lambda: False
    )
    pixels = [np.frombuffer(image.rgb, np.uint8).astype(np.int16) for image in done.images]
    assert max_diff(pixels, stock_padded[1]) <= 1


def test_step_cache_off_threshold_changes_nothing(
    tiny_model_dir: Path, stock_padded: tuple[BatchDone, list[np.ndarray]]
) -> None:
    generator, done, pixels = render(
        tiny_model_dir, SpeedupSettings(step_cache=1e-12), guidance=2.0
    )
    assert generator.step_cache is not None and generator.step_cache.skipped == 0
    assert max_diff(pixels, stock_padded[1]) <= 1
    assert done.transformer_passes == stock_padded[0].transformer_passes


def test_step_cache_skips_inner_steps_only(
    tiny_model_dir: Path, stock_padded: tuple[BatchDone, list[np.ndarray]]
) -> None:
    steps = 6
    generator, done, pixels = render(tiny_model_dir, SpeedupSettings(step_cache=1.0), 2.0, steps)
    skipped = generator.step_cache.skipped
    assert 0 < skipped <= steps - 2  # the first and the last step always run in full
    assert done.transformer_passes == 2 * 2 * (steps - skipped)
    _, _, full = render(tiny_model_dir, SpeedupSettings(), 2.0, steps)
    assert max_diff(pixels, full) > 0  # lossy, and the benchmark reports by how much


def test_fp8_refuses_a_cpu_with_a_reason(tiny_model_dir: Path) -> None:
    with pytest.raises(SpeedupError, match=r"compute capability 8\.9"):
        quantize_fp8(torch.nn.Linear(16, 16), "cpu")
    with pytest.raises(ValidationError, match="fp8 needs an NVIDIA GPU"):
        Settings(fp8=True, device="cpu")


def test_fp8_takes_the_block_linears_but_not_lora_slots() -> None:
    from peft import LoraConfig, inject_adapter_in_model

    block = torch.nn.Module()
    block.attention = torch.nn.Module()
    block.attention.to_q = torch.nn.Linear(64, 64)
    block.norm = torch.nn.LayerNorm(64)
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([block])
    model.head = torch.nn.Linear(64, 64)
    inject_adapter_in_model(LoraConfig(r=16, target_modules=["to_q"]), model)
    taken = {name for name, module in model.named_modules() if fp8_wanted(module, name)}
    assert taken == {"layers.0.attention.to_q.base_layer"}
    assert fp8_wanted(torch.nn.Linear(64, 64), "layers.0.attention.to_q")
    assert not fp8_wanted(torch.nn.Linear(60, 64), "layers.0.attention.to_q")


def test_speedup_settings_name_the_allowed_values() -> None:
    with pytest.raises(ValidationError, match="0, 16, 32, 64, 128, 256, 512"):
        Settings(prompt_bucket_tokens=100)
    with pytest.raises(ValidationError, match="attention_backend"):
        Settings(attention_backend="fastest")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match=r"256\.\.2048"):
        Settings(warmup_sizes=[4096])


def test_warmup_sizes_read_from_a_comma_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZIMAGE_WARMUP_SIZES", "512, 2048")
    assert Settings().warmup_sizes == [512, 2048]


COMPILE_SCRIPT = """
import json, sys
from torch._dynamo.utils import counters
from zimage_server.core.config import SpeedupSettings, WorkerSettings
from zimage_server.engine.generator import DiffusersGenerator
from zimage_server.engine.protocol import WorkerSpec
from zimage_server.engine.protocol import RenderBatch, RenderItem

model, cache = sys.argv[1], sys.argv[2]
spec = WorkerSpec(
    name="w",
    model_path=model,
    device="cpu",
    worker=WorkerSettings(),
    # The blocks only: compiling the VAE decoder too doubles the cold compile on CPU and
    # adds nothing to what this test checks (the graph cache, RoPE, the image).
    speedups=SpeedupSettings(compile="on", compile_vae="off"),
    compile_cache_dir=cache,
)
generator = DiffusersGenerator(spec)
generator.load(lambda *_: None)
batch = RenderBatch("b", (RenderItem("j", "a cat", 5),), 256, 256, 2, 1.0)
done = generator.generate(batch, lambda *_: None, lambda: False)
hits = counters["inductor"]["fxgraph_cache_hit"]
print(json.dumps({"rgb": done.images[0].rgb.hex(), "hits": hits}))
"""


def test_regional_compile_matches_eager_and_its_cache_serves_a_restart(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Compiled blocks render the eager image; a second process reuses the compiled graphs."""
    cache = tmp_path / "compile-cache"

    def compiled_run() -> dict[str, object]:
        args = [sys.executable, "-c", COMPILE_SCRIPT, str(tiny_model_dir), str(cache)]
        out = subprocess.run(args, capture_output=True, text=True, timeout=280, check=True)
        result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
        # Real-arithmetic RoPE: nothing left that Inductor has to run eagerly.
        assert "does not support code generation for complex" not in out.stderr
        return result

    cold = compiled_run()
    assert any((cache / "inductor").rglob("*")), "the compile cache folder stayed empty"
    warm = compiled_run()
    assert cold["hits"] == 0 and int(warm["hits"]) > 0  # type: ignore[call-overload]

    generator = DiffusersGenerator(spec(tiny_model_dir))
    generator.load(lambda *_: None)
    batch = RenderBatch("b", (RenderItem("j", "a cat", 5),), 256, 256, 2, 1.0)
    eager = generator.generate(batch, lambda *_: None, lambda: False).images[0].rgb
    compiled = np.frombuffer(bytes.fromhex(str(warm["rgb"])), np.uint8).astype(np.int16)
    assert int(np.abs(compiled - np.frombuffer(eager, np.uint8)).max()) <= 1


WARM_SCRIPT = """
import json, sys
from torch._dynamo.utils import counters
from zimage_server.core.config import SpeedupSettings, WorkerSettings
from zimage_server.engine.generator import DiffusersGenerator
from zimage_server.engine.protocol import RenderBatch, RenderItem, WorkerSpec

spec = WorkerSpec(
    name="w",
    model_path=sys.argv[1],
    device="cpu",
    worker=WorkerSettings(dtype="bfloat16", warmup_size=256, warmup_steps=1),
    speedups=SpeedupSettings(compile="on", compile_vae="off"),
    compile_cache_dir=sys.argv[2],
)
generator = DiffusersGenerator(spec)
generator.load(lambda *_: None)
generator.warmup()
rgb = bytes(range(256)) * (256 * 3)
mask = (bytes([255]) * 128 + bytes(128)) * 256
cat, dog = RenderItem("j", "a cat", 5), RenderItem("k", "a dog", 6)
long = RenderItem("l", "a lighthouse on a rocky cliff at dawn " * 12, 7)
cases = {
    "a long prompt": RenderBatch("b", (long,), 256, 256, 2, 1.0),
    "guidance 3": RenderBatch("b", (cat,), 256, 256, 2, 3.0),
    "a batch of two": RenderBatch("b", (cat, dog), 256, 256, 2, 1.0),
    "img2img": RenderBatch(
        "b", (RenderItem("j", "a cat", 5, image=rgb),), 256, 256, 4, 1.0, task="img2img",
        strength=0.5,
    ),
    "inpaint": RenderBatch(
        "b", (RenderItem("j", "a cat", 5, image=rgb, mask=mask),), 256, 256, 2, 1.0,
        task="inpaint",
    ),
    "512x512": RenderBatch("b", (cat,), 512, 512, 2, 1.0),
}
compiled = {}
for name, batch in cases.items():
    before = counters["stats"]["unique_graphs"]
    generator.generate(batch, lambda *_: None, lambda: False)
    compiled[name] = counters["stats"]["unique_graphs"] - before
print(json.dumps(compiled))
"""


def test_after_warm_up_no_request_compiles_again(tiny_model_dir: Path, tmp_path: Path) -> None:
    """On a GPU a recompile costs the request that meets it tens of seconds (the first H200
    run's first request: 65 s, after warm-up had changed the model's dtype). In bf16, as on
    CUDA: after warm-up, no task, guidance, batch, prompt length or size compiles again."""
    args = [sys.executable, "-c", WARM_SCRIPT, str(tiny_model_dir), str(tmp_path / "cache")]
    out = subprocess.run(args, capture_output=True, text=True, timeout=400, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    compiled = json.loads(out.stdout.strip().splitlines()[-1])
    assert compiled == dict.fromkeys(compiled, 0), compiled


def test_a_failing_compiled_render_falls_back_to_eager(
    tiny_model_dir: Path, stock_padded: tuple[BatchDone, list[np.ndarray]]
) -> None:
    """A compiler failure (here: every compiled block raises) costs speed, not the render."""
    generator = DiffusersGenerator(spec(tiny_model_dir, SpeedupSettings(compile="on")))
    generator.load(lambda *_: None)
    assert generator.compiled

    def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("simulated inductor failure")

    compiled = [m for m in generator.pipe.transformer.modules() if m._compiled_call_impl]
    assert compiled, "compile=on compiled nothing"
    for module in compiled:
        module._compiled_call_impl = broken
    items = tuple(RenderItem(f"job{i}", p, 11 + i) for i, p in enumerate(PROMPTS))
    done = generator.generate(
        RenderBatch("b", items, 256, 256, 3, 2.0), lambda *_: None, lambda: False
    )
    assert not generator.compiled and "simulated inductor failure" in str(generator.compile_error)
    pixels = [np.frombuffer(image.rgb, np.uint8).astype(np.int16) for image in done.images]
    assert max_diff(pixels, stock_padded[1]) <= 1
    assert not any(m._compiled_call_impl for m in generator.pipe.transformer.modules())


def test_prefetched_prompts_are_encoded_once_and_waited_for(tiny_model_dir: Path) -> None:
    """A render whose prompt is being prefetched waits for it instead of encoding it again."""
    pipe = ZImagePipeline.from_pretrained(tiny_model_dir, dtype=torch.float32)
    encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder, bucket=64, cache_size=0)
    calls: list[int] = []
    pipe.text_encoder.register_forward_pre_hook(lambda *_: calls.append(1))
    published = threading.Event()

    def slow_publish(_embeddings: list[object]) -> None:
        published.set()
        time.sleep(0.5)  # the render asks while the prefetch is still publishing

    with torch.inference_mode():
        thread = threading.Thread(target=encoder.prefetch, args=(PROMPTS[:1], slow_publish))
        thread.start()
        assert published.wait(30)
        ours = encoder.encode(PROMPTS[:1])
        thread.join()
        assert encoder.sources == ["prefetch"] and len(calls) == 1
        assert encoder.prefetch(PROMPTS[:1], lambda _e: None) == 1  # used up: encoded again
        both = encoder.encode(PROMPTS)
        assert encoder.sources == ["prefetch", "encoded"] and len(calls) == 3
        fresh, _ = pipe.encode_prompt(list(PROMPTS[:1]), do_classifier_free_guidance=False)
    torch.testing.assert_close(ours[0], fresh[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(both[0], fresh[0], atol=1e-5, rtol=1e-4)


def test_a_failed_prefetch_is_logged_and_the_next_one_still_runs(
    tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Prefetch is best effort: a failure (here the text encoder raising once) is logged."""
    generator = DiffusersGenerator(spec(tiny_model_dir))
    generator.load(lambda *_: None)
    encoder = generator.pipe.text_encoder
    forward = encoder.forward
    failures = iter([RuntimeError("simulated prefetch failure")])

    def flaky(*args: object, **kwargs: object) -> object:
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return forward(*args, **kwargs)

    encoder.forward = flaky
    hints: queue.Queue[Prefetch] = queue.Queue()
    hints.put(Prefetch((Prompt("", "first"),)))
    hints.put(Prefetch((Prompt("", "second"),)))
    args = (generator, hints)
    threading.Thread(target=prefetch_forever, args=args, daemon=True).start()
    deadline = time.monotonic() + 60
    while Prompt("", "second") not in generator.text._prefetched:
        assert time.monotonic() < deadline, "the second prefetch never ran"
        time.sleep(0.05)
    assert "simulated prefetch failure" in caplog.text
    assert "first" not in generator.text._prefetched and not generator.text._in_flight
    with torch.inference_mode():
        generator.text.encode(["first", "second"])
    assert generator.text.sources == ["encoded", "prefetch"]


def control_batch(steps: int) -> RenderBatch:
    control = np.random.default_rng(3).integers(0, 256, (256, 256, 3), np.uint8).tobytes()
    item = RenderItem("job0", PROMPTS[0], 11, control=control)
    return RenderBatch("b", (item,), 256, 256, steps, 1.0, task="controlnet", control_scale=0.75)


def test_step_cache_never_skips_under_a_controlnet(tiny_model_dir: Path, tmp_path: Path) -> None:
    """diffusers adds the control residuals after each block, outside the cached blocks: a
    reused residual would add the last step's control again, so no step is skipped."""
    from tests.e2e.test_controlnet import tiny_controlnet

    folder = tiny_controlnet(tmp_path / "controlnet")
    worker_spec = spec(tiny_model_dir, SpeedupSettings(step_cache=1.0))
    generator = DiffusersGenerator(replace(worker_spec, controlnet_path=str(folder)))
    generator.load(lambda *_: None)
    done = generator.generate(control_batch(6), lambda *_: None, lambda: False)
    assert generator.step_cache.skipped == 0 and done.transformer_passes == 6
    plain = RenderBatch("p", (RenderItem("job1", PROMPTS[0], 11),), 256, 256, 6, 1.0)
    generator.generate(plain, lambda *_: None, lambda: False)
    assert generator.step_cache.skipped > 0  # the same cache still skips without one


def warm_spec(model: Path, controlnet: Path) -> WorkerSpec:
    worker = WorkerSettings(warmup_size=256, warmup_steps=1)
    return replace(spec(model), worker=worker, controlnet_path=str(controlnet))


def test_warm_up_builds_and_runs_the_controlnet_so_no_request_pays_for_it(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A request that builds its task's pipeline says so (``timings.pipeline_build``);
    after warm-up no ControlNet request does, and the pipelines exist already."""
    from tests.e2e.test_controlnet import tiny_controlnet

    worker_spec = warm_spec(tiny_model_dir, tiny_controlnet(tmp_path / "controlnet"))
    cold = DiffusersGenerator(worker_spec)
    cold.load(lambda *_: None)
    first = cold.generate(control_batch(2), lambda *_: None, lambda: False)
    again = cold.generate(control_batch(2), lambda *_: None, lambda: False)
    assert first.timings["pipeline_build"] > 0 and "pipeline_build" not in again.timings
    warm = DiffusersGenerator(worker_spec)
    warm.load(lambda *_: None)
    warm.warmup()
    assert set(warm._task_pipes) == {"img2img", "inpaint", "controlnet", "controlnet-inpaint"}
    done = warm.generate(control_batch(2), lambda *_: None, lambda: False)
    assert "pipeline_build" not in done.timings
    assert done.images[0].rgb == first.images[0].rgb  # warm-up leaves no trace on an image


def test_a_controlnet_that_does_not_fit_the_model_fails_at_warm_up(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A first-generation ControlNet (no inpainting) still starts, its inpainting left to
    fail on its own requests as before. One that loads (its own config is sound) but cannot
    run beside this transformer fails the start naming the setting, instead of every
    ControlNet request failing later."""
    from diffusers import ZImageControlNetModel

    for dim in (64, 96):
        folder = tmp_path / f"controlnet-{dim}"
        ZImageControlNetModel(
            control_layers_places=[0], control_in_dim=16, dim=dim, n_heads=2, n_kv_heads=2
        ).save_pretrained(folder)
    generator = DiffusersGenerator(warm_spec(tiny_model_dir, tmp_path / "controlnet-64"))
    generator.load(lambda *_: None)
    generator.warmup()
    assert "controlnet" in generator._task_pipes
    assert "controlnet-inpaint" not in generator._task_pipes
    generator = DiffusersGenerator(warm_spec(tiny_model_dir, tmp_path / "controlnet-96"))
    generator.load(lambda *_: None)
    with pytest.raises(StartupError, match=r"ZIMAGE_CONTROLNET: .* does not fit this model"):
        generator.warmup()


def test_a_worker_without_controlnet_weights_names_the_setting(tiny_model_dir: Path) -> None:
    generator = DiffusersGenerator(spec(tiny_model_dir))
    generator.load(lambda *_: None)
    with pytest.raises(TaskNotConfigured, match="ZIMAGE_CONTROLNET"):
        generator.generate(control_batch(2), lambda *_: None, lambda: False)
