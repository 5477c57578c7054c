"""The image encode, measured: time, size and fidelity of each codec setting Pillow offers.

``benchmarks/encode.py`` runs it. For WebP ``method`` 0..6 and JPEG ``optimize`` x chroma
``subsampling`` at each quality (90, the spec's default, unless told), and PNG
``compress_level`` 1..9, it reports the median encode time, the size and, for the lossy
codecs, the PSNR of the decoded image against the original. The image is a deterministic
synthetic scene (below) at 1024x1024 and 256x256, or a real picture given with ``--image``:
codecs are content-sensitive, so a flat test card would mislead.

How the server's defaults (``images/encode.py``) follow from the table. The reference is
the setting the server used before this benchmark existed (Pillow's own defaults: WebP
method 4, PNG level 6, JPEG without ``optimize`` at 4:2:0). A setting is *close* to it
when, at every size measured, its file is at most ``SIZE_TOLERANCE`` (5%) larger and its
PSNR at most ``PSNR_TOLERANCE_DB`` (0.3 dB) lower at the same quality. 0.3 dB is about
what one quality step costs near the default (q89 against q90: 0.2-0.35 dB here) and
below the ~0.5 dB usually taken as a just-noticeable difference.

- WebP: the fastest close method at the spec's default quality (90), used over the band
  of measured qualities around 90 where it stays close; method 4 elsewhere. (The fast
  methods are close near the default but not everywhere: at low qualities they spend
  more bytes for the same PSNR, and at 100 they lose libwebp's size optimisations.)
- PNG: the fastest close level (lossless, so only the size can differ).
- JPEG: the subsampling stays 4:2:0 (what a JPEG quality number means to libjpeg, Pillow
  and browsers; 4:4:4 is a different, larger trade-off, not the same quality faster), and
  ``optimize`` is on only when it costs at most ``OPTIMIZE_MAX_EXTRA`` (15%) more time and
  saves at least ``OPTIMIZE_MIN_SAVING`` (3%) of the size: it only rewrites the Huffman
  tables, so the pixels are identical either way.

``recommend`` applies these rules to the rows and the report carries its answer.
"""

from __future__ import annotations

import io
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from PIL import Image, ImageDraw, ImageFilter, features
from rich.console import Console
from rich.table import Table

from zimage_server.bench.environment import today
from zimage_server.bench.report import write_report
from zimage_server.bench.stats import deviation, percentile
from zimage_server.images.encode import encode_image

DEFAULT_SIZES = (1024, 256)
# The spec's default (90) and a ladder around it: clients may ask for any quality, and the
# fast WebP method is chosen for the band of qualities where it stays close.
DEFAULT_QUALITIES = (100, 99, 95, 90, 85, 80, 75, 70, 50)
DEFAULT_JPEG_QUALITIES = (90, 75)
SPEC_DEFAULT_QUALITY = 90
WEBP_METHODS = range(7)
PNG_LEVELS = range(1, 10)
JPEG_SUBSAMPLING = {"4:2:0": 2, "4:4:4": 0}  # Pillow's codes
REFERENCE_WEBP_METHOD = 4
REFERENCE_PNG_LEVEL = 6
SIZE_TOLERANCE = 0.05
PSNR_TOLERANCE_DB = 0.3
OPTIMIZE_MAX_EXTRA = 0.15
OPTIMIZE_MIN_SAVING = 0.03


@dataclass(frozen=True)
class Setting:
    """One way to save an image: Pillow's format name and ``save`` keyword arguments."""

    codec: str  # "webp" | "jpeg" | "png"
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        names = {2: "4:2:0", 0: "4:4:4"}
        parts = [
            f"{key}={names[value] if key == 'subsampling' else value}"
            for key, value in self.params.items()
            if key != "quality"
        ]
        return " ".join(parts)

    def save(self, image: Image.Image) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, self.codec.upper(), **self.params)
        return buffer.getvalue()


def settings(qualities: Iterable[int], jpeg_qualities: Iterable[int]) -> list[Setting]:
    """Every setting the benchmark measures (PNG once: it has no quality)."""
    rows: list[Setting] = []
    for quality in qualities:
        rows += [Setting("webp", {"quality": quality, "method": m}) for m in WEBP_METHODS]
    for quality in jpeg_qualities:
        rows += [
            Setting("jpeg", {"quality": quality, "optimize": optimize, "subsampling": code})
            for code in JPEG_SUBSAMPLING.values()
            for optimize in (False, True)
        ]
    rows += [Setting("png", {"compress_level": level}) for level in PNG_LEVELS]
    return rows


# -- the test image -----------------------------------------------------------------------


def _pink_noise(rng: np.random.Generator, size: int, exponent: float) -> np.ndarray:
    """A field whose amplitude spectrum falls as 1/f**exponent (natural images: about 1),
    frequencies counted per image so the scene looks alike at every size; unit std."""
    fy = np.fft.fftfreq(size)[:, None] * size
    fx = np.fft.rfftfreq(size)[None, :] * size
    radius = np.hypot(fy, fx)
    radius[0, 0] = np.inf
    shape = radius.shape
    spectrum = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)) / radius**exponent
    noise: np.ndarray = np.fft.irfft2(spectrum, s=(size, size))
    normalised: np.ndarray = (noise - noise.mean()) / noise.std()
    return normalised


def _shapes(size: int, rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    """Hard- and soft-edged objects (a sun, buildings with windows, a road): a colour layer
    and its coverage mask, drawn at 2x and downsampled so the edges are anti-aliased."""
    big = size * 2
    layer = Image.new("RGB", (big, big))
    mask = Image.new("L", (big, big))
    draw, cover = ImageDraw.Draw(layer), ImageDraw.Draw(mask)
    sun = (int(big * 0.72), int(big * 0.2), int(big * 0.07))
    box = (sun[0] - sun[2], sun[1] - sun[2], sun[0] + sun[2], sun[1] + sun[2])
    draw.ellipse(box, fill=(255, 236, 190))
    cover.ellipse(box, fill=255)
    x = 0
    while x < big * 0.6:
        width = int(big * rng.uniform(0.05, 0.12))
        top = int(big * rng.uniform(0.35, 0.55))
        tone = tuple(int(v) for v in rng.integers(40, 140, 3))
        draw.rectangle((x, top, x + width, int(big * 0.75)), fill=tone)
        cover.rectangle((x, top, x + width, int(big * 0.75)), fill=255)
        step = max(4, big // 64)
        for wy in range(top + step, int(big * 0.72), step * 2):
            for wx in range(x + step // 2, x + width - step, step * 2):
                lit = (250, 220, 150) if rng.random() < 0.4 else (30, 32, 40)
                draw.rectangle((wx, wy, wx + step - 1, wy + step - 1), fill=lit)
        x += width + int(big * rng.uniform(0.0, 0.03))
    road = [(int(big * 0.45), big), (int(big * 0.55), int(big * 0.75)), (big, big)]
    draw.polygon(road, fill=(70, 70, 75))
    cover.polygon(road, fill=255)
    soft = mask.filter(ImageFilter.GaussianBlur(big / 512))
    return layer.resize((size, size), Image.Resampling.LANCZOS), soft.resize(
        (size, size), Image.Resampling.LANCZOS
    )


def synthetic_image(size: int, seed: int = 0) -> Image.Image:
    """A deterministic photo-like scene: a sky-to-ground gradient, 1/f texture (strong on
    the ground, faint in the sky, weaker in chroma than in luminance, as in photographs),
    anti-aliased objects with hard edges and fine detail, and a little sensor grain."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0.0, 1.0, size)[:, None, None]
    sky = np.array([0.35, 0.55, 0.85]) * (1 - y) + np.array([0.95, 0.75, 0.55]) * y
    ground = np.array([0.30, 0.38, 0.22])
    horizon = np.clip((y - 0.62) * 12, 0, 1)
    base = sky * (1 - horizon) + ground * horizon
    luminance = _pink_noise(rng, size, 1.0)
    grass = _pink_noise(rng, size, 0.6)  # rougher: foliage, gravel
    chroma = np.stack([_pink_noise(rng, size, 1.2) for _ in range(3)], axis=-1)
    texture = 0.03 + 0.15 * horizon
    detail = luminance + 0.8 * horizon[..., 0] * grass
    pixels = base * (1 + texture * detail[..., None]) + 0.04 * texture * chroma
    layer, mask = _shapes(size, rng)
    alpha = np.asarray(mask, dtype=np.float64)[..., None] / 255
    objects = np.asarray(layer, dtype=np.float64) / 255 * (1 + 0.05 * luminance[..., None])
    pixels = pixels * (1 - alpha) + objects * alpha
    pixels = pixels * 255 + rng.normal(0.0, 1.5, pixels.shape)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def source_image(size: int, source: Path | None = None) -> Image.Image:
    """The synthetic scene, or ``source`` centre-cropped to a square and resized."""
    if source is None:
        return synthetic_image(size)
    with Image.open(source) as opened:
        image = opened.convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    return square.resize((size, size), Image.Resampling.LANCZOS)


# -- measuring ----------------------------------------------------------------------------


def time_ms(run: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``run`` in ms, after one untimed call."""
    run()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        samples.append(time.perf_counter() - start)
    return percentile(samples, 50) * 1e3


def psnr(original: Image.Image, data: bytes) -> float | None:
    """PSNR in dB of the decoded ``data`` against ``original`` (None: identical)."""
    with Image.open(io.BytesIO(data)) as decoded:
        pixels = np.asarray(decoded.convert("RGB"))
    return deviation(np.asarray(original), pixels)["psnr_db"]


def _row(
    image: Image.Image,
    codec: str,
    label: str,
    params: Mapping[str, Any],
    quality: int | None,
    run: Callable[[], bytes],
    repeats: int,
) -> dict[str, Any]:
    data = run()
    return {
        "size": f"{image.width}x{image.height}",
        "codec": codec,
        "setting": label,
        "params": dict(params),
        "quality": quality,
        "p50_ms": time_ms(run, repeats),
        "bytes": len(data),
        "bits_per_pixel": 8 * len(data) / (image.width * image.height),
        "psnr_db": psnr(image, data),
    }


def measure(image: Image.Image, setting: Setting, repeats: int) -> dict[str, Any]:
    quality = setting.params.get("quality")
    return _row(
        image,
        setting.codec,
        setting.label,
        setting.params,
        quality,
        lambda: setting.save(image),
        repeats,
    )


def measure_server(image: Image.Image, codec: str, quality: int, repeats: int) -> dict[str, Any]:
    """The server's own ``encode_image`` with its current defaults (raw RGB in, bytes out)."""
    rgb, size = image.tobytes(), image.size
    shown = quality if codec != "png" else None
    return _row(
        image,
        codec,
        "server default",
        {},
        shown,
        lambda: encode_image(rgb, size, size, codec, quality),
        repeats,
    )


def repeats_for(size: int, repeats: int) -> int:
    """More repeats for small images (cheap, and noisier per call)."""
    return max(repeats, min(4 * repeats, repeats * (1024 // max(size, 1)) ** 2 // 4))


def run_encode_benchmark(
    sizes: Sequence[int] = DEFAULT_SIZES,
    qualities: Sequence[int] = DEFAULT_QUALITIES,
    jpeg_qualities: Sequence[int] = DEFAULT_JPEG_QUALITIES,
    repeats: int = 9,
    source: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """One row per (size, setting), then one per (size, codec) for the server's own
    ``encode_image`` at the spec's default quality."""
    rows = []
    for size in sizes:
        image = source_image(size, source)
        count = repeats_for(size, repeats)
        for setting in settings(qualities, jpeg_qualities):
            if progress:
                progress(f"{size}x{size} {setting.codec} {setting.label}")
            rows.append(measure(image, setting, count))
        for codec in ("webp", "jpeg", "png"):
            rows.append(measure_server(image, codec, SPEC_DEFAULT_QUALITY, count))
    return rows


# -- choosing -----------------------------------------------------------------------------

Row = Mapping[str, Any]


def _groups(rows: Sequence[Row], codec: str) -> dict[tuple[str, Any], dict[Any, Row]]:
    """Measured rows of ``codec`` by (size, quality), each keyed by its varying setting."""
    key = {"webp": "method", "png": "compress_level"}[codec]
    grouped: dict[tuple[str, Any], dict[Any, Row]] = {}
    for row in rows:
        if row["codec"] == codec and row["params"]:
            grouped.setdefault((row["size"], row["quality"]), {})[row["params"][key]] = row
    return grouped


def close(row: Row, reference: Row) -> bool:
    """At most ``SIZE_TOLERANCE`` larger and ``PSNR_TOLERANCE_DB`` less faithful (a
    lossless row must stay lossless)."""
    if row["bytes"] > reference["bytes"] * (1 + SIZE_TOLERANCE):
        return False
    if reference["psnr_db"] is None or row["psnr_db"] is None:
        return bool(row["psnr_db"] == reference["psnr_db"])
    return bool(row["psnr_db"] >= reference["psnr_db"] - PSNR_TOLERANCE_DB)


def _fastest_close(groups: Sequence[Mapping[Any, Row]], reference: Any) -> Any:
    """The setting close to ``reference`` in every group, fastest relative to it on
    average over the groups (the reference itself always qualifies)."""
    speed: dict[Any, float] = {}
    for value in sorted(set.intersection(*(set(group) for group in groups))):
        pairs = [(group[value], group[reference]) for group in groups]
        if all(close(row, ref) for row, ref in pairs):
            speed[value] = sum(row["p50_ms"] / ref["p50_ms"] for row, ref in pairs) / len(pairs)
    return min(speed, key=lambda value: (speed[value], value))


def _webp_choice(rows: Sequence[Row]) -> dict[str, Any]:
    """The fastest close method at the spec's default quality, and the band of measured
    qualities around it where that method stays close at every size."""
    groups = _groups(rows, "webp")
    qualities = sorted({quality for _, quality in groups})
    by_quality = {q: [g for (_, gq), g in groups.items() if gq == q] for q in qualities}
    per_quality = {q: _fastest_close(by_quality[q], REFERENCE_WEBP_METHOD) for q in qualities}
    default = SPEC_DEFAULT_QUALITY if SPEC_DEFAULT_QUALITY in qualities else qualities[-1]
    method = per_quality[default]

    def ok(quality: int) -> bool:
        return all(close(g[method], g[REFERENCE_WEBP_METHOD]) for g in by_quality[quality])

    index = qualities.index(default)
    low = high = index
    while low > 0 and ok(qualities[low - 1]):
        low -= 1
    while high < len(qualities) - 1 and ok(qualities[high + 1]):
        high += 1
    return {
        "webp_method": method,
        "webp_method_qualities": [qualities[low], qualities[high]],
        "webp_method_elsewhere": REFERENCE_WEBP_METHOD,
        "webp_fastest_close_by_quality": {str(q): m for q, m in per_quality.items()},
    }


def _jpeg_optimize(rows: Sequence[Row]) -> bool:
    """``optimize`` at 4:2:0 pays off in every group (see the module docstring)."""
    groups: dict[tuple[str, Any], dict[bool, Row]] = {}
    for row in rows:
        params = row["params"]
        if row["codec"] == "jpeg" and params.get("subsampling") == JPEG_SUBSAMPLING["4:2:0"]:
            groups.setdefault((row["size"], row["quality"]), {})[params["optimize"]] = row
    for pair in groups.values():
        plain, optimized = pair[False], pair[True]
        slower = optimized["p50_ms"] > plain["p50_ms"] * (1 + OPTIMIZE_MAX_EXTRA)
        saving = 1 - optimized["bytes"] / plain["bytes"]
        if slower or saving < OPTIMIZE_MIN_SAVING:
            return False
    return bool(groups)


def recommend(rows: Sequence[Row]) -> dict[str, Any]:
    """The defaults the module docstring's rules pick from ``rows``."""
    return {
        **_webp_choice(rows),
        "png_compress_level": _fastest_close(
            list(_groups(rows, "png").values()), REFERENCE_PNG_LEVEL
        ),
        "jpeg_optimize": _jpeg_optimize(rows),
        "jpeg_subsampling": "4:2:0",
        "rules": {
            "size_tolerance": SIZE_TOLERANCE,
            "psnr_tolerance_db": PSNR_TOLERANCE_DB,
            "reference_webp_method": REFERENCE_WEBP_METHOD,
            "reference_png_level": REFERENCE_PNG_LEVEL,
            "jpeg_optimize_max_extra_time": OPTIMIZE_MAX_EXTRA,
            "jpeg_optimize_min_saving": OPTIMIZE_MIN_SAVING,
        },
    }


def encode_report(
    rows: Sequence[Mapping[str, Any]],
    command: str,
    source: Path | None,
    repeats: int,
    load_at_start: Sequence[float] = (),
) -> dict[str, Any]:
    """The JSON: where and with what it ran (CPU timings are noisy: the load average is
    recorded at the start and the end), the rows and the recommended defaults."""
    from importlib import metadata

    return {
        "benchmark": "encode",
        "device": "cpu",
        "date": today(),
        "command": command,
        "versions": {
            "python": platform.python_version(),
            "pillow": metadata.version("pillow"),
            "libwebp": features.version("webp"),
            "libjpeg": features.version("jpg"),
            "zlib": features.version("zlib"),
            "numpy": np.__version__,
        },
        "host": {
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "load_average_start": [round(value, 2) for value in load_at_start],
            "load_average_end": [round(value, 2) for value in os.getloadavg()],
        },
        "image": str(source) if source else "synthetic (zimage_server.bench.encode)",
        "repeats": repeats,
        "rows": list(rows),
        "recommended": recommend(rows),
    }


def result_path(report: Mapping[str, Any], results_dir: Path) -> Path:
    return results_dir / f"{report['date']}-cpu-encode.json"


# -- output -------------------------------------------------------------------------------


def _cell(value: float | None, fmt: str) -> str:
    return "exact" if value is None else format(value, fmt)


def encode_table(report: Mapping[str, Any]) -> Table:
    table = Table(title=f"image encode on {report['host']['cpu_count']} CPUs (p50 of each)")
    for column in ("size", "codec", "q", "setting", "ms", "bytes", "bits/px", "PSNR dB"):
        table.add_column(column, justify="left" if column in ("codec", "setting") else "right")
    for row in report["rows"]:
        table.add_row(
            row["size"],
            row["codec"],
            "" if row["quality"] is None else str(row["quality"]),
            row["setting"],
            f"{row['p50_ms']:.2f}",
            f"{row['bytes']:,}",
            f"{row['bits_per_pixel']:.2f}",
            _cell(row["psnr_db"], ".2f"),
        )
    return table


def main(
    sizes: Annotated[str, typer.Option(help="Square sizes, comma-separated.")] = ",".join(
        map(str, DEFAULT_SIZES)
    ),
    qualities: Annotated[
        str, typer.Option(help="WebP/JPEG qualities, 2..100 (the spec's default is 90).")
    ] = ",".join(map(str, DEFAULT_QUALITIES)),
    jpeg_qualities: Annotated[str, typer.Option(help="JPEG qualities, 2..100.")] = ",".join(
        map(str, DEFAULT_JPEG_QUALITIES)
    ),
    repeats: Annotated[int, typer.Option(min=1, help="Timed encodes per 1024x1024 row.")] = 9,
    image: Annotated[
        Path | None, typer.Option(help="A real picture instead of the synthetic scene.")
    ] = None,
    results_dir: Annotated[Path, typer.Option()] = Path("benchmarks/results"),
    output: Annotated[Path | None, typer.Option(help="JSON path (default: results dir).")] = None,
) -> None:
    """Time, size and PSNR of every WebP/JPEG/PNG setting; recommends the server's defaults."""
    console = Console() if sys.stdout.isatty() else Console(width=120)
    load = os.getloadavg()
    with console.status("encoding") as status:
        rows = run_encode_benchmark(
            _ints(sizes, 16, 4096),
            _ints(qualities, 1, 100),
            _ints(jpeg_qualities, 1, 100),
            repeats,
            image,
            lambda text: status.update(text),
        )
    report = encode_report(rows, current_command(), image, repeats, load)
    console.print(encode_table(report))
    console.print(f"recommended: {json.dumps(report['recommended'])}", soft_wrap=True)
    path = write_report(report, output or result_path(report, results_dir))
    console.print(f"wrote {path}")


def current_command() -> str:
    """The command line as typed (``bench/cli.py`` has the same for ``zimage bench``)."""
    return shlex.join(["python", sys.argv[0], *sys.argv[1:]])


def _ints(text: str, low: int, high: int) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise typer.BadParameter(f"comma-separated integers, got '{text}'") from None
    if not values or not all(low <= value <= high for value in values):
        raise typer.BadParameter(f"integers in {low}..{high}, got '{text}'")
    return values
