"""LoRA slots in the generator, on the tiny model with adapters PEFT made for it.

Every image is compared with what a fresh generator (a fresh server's worker) renders for
the same request, so a slot left filled, scaled or half-swapped shows up as a difference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.loras import (
    ATTENTION,
    FEED_FORWARD,
    adapter_weights,
    save_diffusers,
    save_kohya,
    save_mismatched,
)
from zimage_server.core.config import LoraSettings, SpeedupSettings, WorkerSettings
from zimage_server.engine.adapters import AdapterError
from zimage_server.engine.generator import DiffusersGenerator
from zimage_server.engine.protocol import (
    AdapterStats,
    LoraRef,
    RenderBatch,
    RenderItem,
    WorkerSpec,
)

Loras = tuple[LoraRef, ...]
OFF = SpeedupSettings(compile="off", prefetch_prompts="off")
SIZE = 64  # the smallest the model takes (4x4 tokens): the slots, not the pixels, are tested


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The tiny model's matmuls are too small to share: on two busy cores, two intra-op
    threads made a LoRA render ~20x slower than one (the images compared run alike)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    a = adapter_weights(tiny_model_dir, ATTENTION, rank=4, seed=1)
    b = adapter_weights(tiny_model_dir, FEED_FORWARD, rank=8, seed=2)
    return {
        "a": save_diffusers(a, root / "a"),
        "a_kohya": save_kohya(a, root / "a_kohya.safetensors"),
        "b": save_diffusers(b, root / "b"),
        "wide": save_mismatched(root / "wide.safetensors"),
    }


def ref(file: Path, scale: float = 1.0) -> LoraRef:
    return LoraRef(name=file.stem, path=str(file), identity=str(file), scale=scale)


def generator(model: Path, loras: LoraSettings | None = None) -> DiffusersGenerator:
    spec = WorkerSpec(
        name="w",
        model_path=str(model),
        device="cpu",
        worker=WorkerSettings(),
        speedups=OFF,
        loras=loras or LoraSettings(lora_max_rank=8),
    )
    made = DiffusersGenerator(spec)
    made.load(lambda *_: None)
    return made


def render(gen: DiffusersGenerator, loras: Loras) -> np.ndarray:
    batch = RenderBatch("b", (RenderItem("j", "a cat", 7),), SIZE, SIZE, 2, 1.0, loras)
    done = gen.generate(batch, lambda *_: None, lambda: False)
    assert ("lora_load" in done.timings) == bool(loras)
    return np.frombuffer(done.images[0].rgb, np.uint8).astype(np.int16)


def test_any_order_of_requests_gives_a_fresh_generators_images(
    tiny_model_dir: Path, adapters: dict[str, Path]
) -> None:
    a, b = ref(adapters["a"]), ref(adapters["b"])
    sequence: list[Loras] = [(), (a,), (b,), (a, b), (), (ref(adapters["a"], 0.0),), (a,)]
    gen = generator(tiny_model_dir)
    served = [render(gen, loras) for loras in sequence]
    fresh = {loras: render(generator(tiny_model_dir), loras) for loras in dict.fromkeys(sequence)}

    for loras, image in zip(sequence, served, strict=True):
        assert np.array_equal(image, fresh[loras]), [lora.name for lora in loras]
    plain, with_a, with_b, both = served[:4]
    assert np.abs(with_a - plain).max() > 8 and np.abs(with_b - plain).max() > 8
    assert np.abs(both - with_a).max() > 8 and np.abs(both - with_b).max() > 8
    assert np.array_equal(served[5], plain)  # scale 0 is the plain image
    assert gen.adapters is not None and gen.adapters.misses == 2  # each file read once


def test_kohya_names_load_as_the_same_adapter(
    tiny_model_dir: Path, adapters: dict[str, Path]
) -> None:
    gen = generator(tiny_model_dir)
    diffusers = render(gen, (ref(adapters["a"]),))
    kohya = render(gen, (ref(adapters["a_kohya"]),))
    assert np.abs(diffusers - kohya).max() <= 1


def test_scale_strengthens_the_adapter(tiny_model_dir: Path, adapters: dict[str, Path]) -> None:
    gen = generator(tiny_model_dir)
    plain = render(gen, ())
    half = np.abs(render(gen, (ref(adapters["a"], 0.5),)) - plain).mean()
    full = np.abs(render(gen, (ref(adapters["a"], 2.0),)) - plain).mean()
    assert 0 < half < full


def test_a_mismatched_adapter_is_refused_and_leaves_nothing_behind(
    tiny_model_dir: Path, adapters: dict[str, Path]
) -> None:
    gen = generator(tiny_model_dir)
    plain = render(gen, ())
    render(gen, (ref(adapters["b"]),))
    with pytest.raises(AdapterError, match="'wide' does not match this model"):
        render(gen, (ref(adapters["a"]), ref(adapters["wide"])))
    assert np.array_equal(render(gen, ()), plain)


def test_too_high_a_rank_is_refused(tiny_model_dir: Path, adapters: dict[str, Path]) -> None:
    gen = generator(tiny_model_dir, LoraSettings(lora_max_rank=4))
    with pytest.raises(AdapterError, match="rank 8; this server takes at most 4"):
        render(gen, (ref(adapters["b"]),))


def test_the_cache_keeps_the_most_recent_within_its_bounds(
    tiny_model_dir: Path, adapters: dict[str, Path]
) -> None:
    gen = generator(tiny_model_dir, LoraSettings(lora_max_rank=8, lora_cache_size=1))
    first = render(gen, (ref(adapters["a"]),))
    render(gen, (ref(adapters["b"]),))
    assert np.array_equal(render(gen, (ref(adapters["a"]),)), first)
    bank = gen.adapters
    assert bank is not None and (bank.misses, bank.hits, bank.evictions) == (3, 0, 2)
    assert list(bank.cache) == [str(adapters["a"])]


def test_each_batch_reports_the_cache_and_what_changed_since_the_last(
    tiny_model_dir: Path, adapters: dict[str, Path]
) -> None:
    """What ``/metrics`` adds up: a count is reported once, a refused adapter's miss with
    the next batch that completes."""
    gen = generator(tiny_model_dir, LoraSettings(lora_max_rank=8, lora_cache_size=1))

    def stats(*loras: LoraRef) -> AdapterStats:
        batch = RenderBatch("b", (RenderItem("j", "a cat", 7),), SIZE, SIZE, 1, 1.0, loras)
        done = gen.generate(batch, lambda *_: None, lambda: False)
        assert done.adapters is not None
        return done.adapters

    a, b = ref(adapters["a"]), ref(adapters["b"])
    first = stats(a)
    assert (first.loaded, first.misses, first.hits, first.evictions) == (1, 1, 0, 0)
    assert len(first.load_s) == 1 and first.memory_bytes > 0
    assert stats(a) == replace(first, misses=0, load_s=())  # the slot already holds it
    with pytest.raises(AdapterError):
        stats(a, ref(adapters["wide"]))
    evicted = stats(b)  # the refused miss (wide) comes with this one, and a's eviction
    assert (evicted.loaded, evicted.misses, evicted.hits, evicted.evictions) == (1, 2, 0, 1)
    assert len(evicted.load_s) == 1  # adapters kept are timed; the refused one is not
    plain = stats()
    assert plain == replace(evicted, misses=0, evictions=0, load_s=())


def test_adapters_off_refuse_a_lora_batch(tiny_model_dir: Path, adapters: dict[str, Path]) -> None:
    gen = generator(tiny_model_dir, LoraSettings(max_loras=0))
    with pytest.raises(AdapterError, match="off on this server"):
        render(gen, (ref(adapters["a"]),))


COMPILED_SWITCHES = """
import json, sys
from pathlib import Path
from torch._dynamo.utils import counters
from zimage_server.core.config import LoraSettings, SpeedupSettings, WorkerSettings
from zimage_server.engine.generator import DiffusersGenerator
from zimage_server.engine.protocol import LoraRef, RenderBatch, RenderItem, WorkerSpec

model, files = sys.argv[1], sys.argv[2:]
spec = WorkerSpec(
    name="w", model_path=model, device="cpu",
    worker=WorkerSettings(warmup_size=256, warmup_steps=1),
    speedups=SpeedupSettings(compile="on", compile_vae="off", prefetch_prompts="off"),
    loras=LoraSettings(lora_max_rank=8),
)
gen = DiffusersGenerator(spec)
gen.load(lambda *_: None)
gen.warmup()
def render(*loras):
    refs = tuple(LoraRef(name=Path(f).stem, path=f, identity=f) for f in loras)
    batch = RenderBatch("b", (RenderItem("j", "a cat", 7),), 256, 256, 1, 1.0, refs)
    return gen.generate(batch, lambda *_: None, lambda: False).images[0].rgb
plain = render()
warm = counters["stats"]["unique_graphs"]
images = [render(f) for f in files] + [render(files[0]), render(*files), render()]
print(json.dumps({"warm": warm, "after": counters["stats"]["unique_graphs"],
    "compiled": gen.compiled, "plain_again": images[-1] == plain,
    "distinct": len(set(images[:-1])), "a_again": images[0] == images[3]}))
"""


def test_switching_adapters_on_the_compiled_path_never_recompiles(
    tiny_model_dir: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    """Three adapters of different ranks and layers, one after another and together."""
    third = save_diffusers(adapter_weights(tiny_model_dir, ATTENTION, rank=2, seed=3), tmp_path)
    files = [str(adapters["a"]), str(adapters["b"]), str(third)]
    args = [sys.executable, "-c", COMPILED_SWITCHES, str(tiny_model_dir), *files]
    # One thread for the kernels and for Inductor's compiles (no pool of compile workers).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    out = subprocess.run(args, capture_output=True, text=True, timeout=400, check=True, env=env)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["compiled"] and result["warm"] > 0
    assert result["after"] == result["warm"], result  # no graph compiled after warm-up
    # A, B, C, A again, A+B+C: four different images, the second A as the first.
    assert result["plain_again"] and result["a_again"] and result["distinct"] == 4
