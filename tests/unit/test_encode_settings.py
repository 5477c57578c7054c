"""The encoder settings keep the requested quality, and the encode benchmark's rules."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from PIL import Image

from zimage_server.bench.encode import (
    Setting,
    psnr,
    recommend,
    run_encode_benchmark,
    synthetic_image,
)
from zimage_server.images.encode import PNG_COMPRESS_LEVEL, encode_image, webp_method


@pytest.fixture(scope="module")
def scene() -> Image.Image:
    return synthetic_image(256)


def reference(image: Image.Image, codec: str, quality: int) -> bytes:
    """What the server sent before the tuning: Pillow's defaults (WebP method 4)."""
    extra = {"method": 4} if codec == "webp" else {}
    return Setting(codec, {"quality": quality, **extra}).save(image)


@pytest.mark.parametrize("quality", [30, 50, 80, 90, 100])
def test_webp_keeps_the_requested_quality(scene: Image.Image, quality: int) -> None:
    data = encode_image(scene.tobytes(), scene.size, scene.size, "webp", quality)
    ref = reference(scene, "webp", quality)
    ours, theirs = psnr(scene, data), psnr(scene, ref)
    assert ours is not None and theirs is not None
    # The benchmark's rule: at most 0.3 dB less faithful, at most 5% larger.
    assert ours >= theirs - 0.3 and len(data) <= 1.05 * len(ref)


def test_webp_psnr_rises_with_quality(scene: Image.Image) -> None:
    scores = [
        psnr(scene, encode_image(scene.tobytes(), scene.size, scene.size, "webp", q))
        for q in (10, 50, 90)
    ]
    assert all(s is not None for s in scores)
    low, mid, high = (float(s or 0) for s in scores)
    assert 25 < low < mid < high and high > 33


@pytest.mark.parametrize("quality", [1, 50, 90, 100])
def test_jpeg_is_pillows_default_encoding(scene: Image.Image, quality: int) -> None:
    data = encode_image(scene.tobytes(), scene.size, scene.size, "jpeg", quality)
    assert data == reference(scene, "jpeg", quality)
    with Image.open(io.BytesIO(data)) as decoded:
        assert decoded.format == "JPEG" and decoded.size == scene.size


def test_png_round_trips_exactly_after_the_crop(scene: Image.Image) -> None:
    data = encode_image(scene.tobytes(), scene.size, (250, 240), "png", 1)
    with Image.open(io.BytesIO(data)) as decoded:
        pixels = np.asarray(decoded.convert("RGB"))
    expected = np.asarray(scene.crop((3, 8, 253, 248)))
    assert pixels.shape == (240, 250, 3) and np.array_equal(pixels, expected)
    assert data == Setting("png", {"compress_level": PNG_COMPRESS_LEVEL}).save(
        Image.fromarray(expected)
    )


@pytest.mark.parametrize(
    ("quality", "method"), [(1, 4), (69, 4), (70, 2), (90, 2), (99, 2), (100, 4)]
)
def test_webp_method_band(quality: int, method: int) -> None:
    assert webp_method(quality) == method


def test_synthetic_image_is_deterministic_and_not_flat() -> None:
    first, second = synthetic_image(64, seed=3), synthetic_image(64, seed=3)
    assert first.tobytes() == second.tobytes()
    assert first.tobytes() != synthetic_image(64, seed=4).tobytes()
    assert first.size == (64, 64) and float(np.asarray(first).std()) > 20


def _row(
    codec: str, key: str, value: Any, ms: float, size: int, db: float | None, **kw: Any
) -> Any:
    """A measured row as ``run_encode_benchmark`` writes it (one image size)."""
    params = {key: value, **kw}
    return {
        "size": "256x256",
        "codec": codec,
        "params": params,
        "quality": params.get("quality"),
        "p50_ms": ms,
        "bytes": size,
        "psnr_db": db,
    }


def test_recommend_picks_the_fastest_close_setting_and_its_quality_band() -> None:
    rows = []
    for quality, fast_ok in ((90, True), (75, True), (50, False), (100, False)):
        rows += [
            _row("webp", "method", 0, 1.0, 1500, 30.0, quality=quality),  # much larger
            _row("webp", "method", 2, 2.0, 1020 if fast_ok else 1100, 29.8, quality=quality),
            _row("webp", "method", 4, 4.0, 1000, 30.0, quality=quality),
            _row("webp", "method", 6, 9.0, 950, 30.1, quality=quality),
        ]
    rows += [
        _row("png", "compress_level", level, ms, size, None)
        for level, ms, size in ((1, 1.0, 1200), (4, 3.0, 1001), (6, 5.0, 1000), (9, 9.0, 999))
    ]
    for optimize, ms, size in ((False, 1.0, 1000), (True, 2.0, 990)):
        rows.append(_row("jpeg", "optimize", optimize, ms, size, 30.0, quality=90, subsampling=2))
    choice = recommend(rows)
    assert choice["webp_method"] == 2
    assert choice["webp_method_qualities"] == [75, 90]
    assert choice["webp_fastest_close_by_quality"]["50"] == 4
    assert choice["png_compress_level"] == 4
    assert choice["jpeg_optimize"] is False  # twice the time for 1% less


def test_benchmark_rows_cover_every_setting() -> None:
    rows = run_encode_benchmark(sizes=(32,), qualities=(90,), jpeg_qualities=(90,), repeats=1)
    settings = [(r["codec"], r["setting"]) for r in rows]
    assert [s for s in settings if s[0] == "webp"][:7] == [
        ("webp", f"method={m}") for m in range(7)
    ]
    assert sum(codec == "jpeg" for codec, _ in settings) == 4 + 1  # + the server's own
    assert sum(codec == "png" for codec, _ in settings) == 9 + 1
    assert all(r["p50_ms"] > 0 and r["bytes"] > 0 for r in rows)
    assert all((r["psnr_db"] is None) == (r["codec"] == "png") for r in rows)
    assert recommend(rows)["webp_method"] in range(7)
