"""``zimage bench``: the typer-compatible entry point (``benchmarks/run.py`` calls it too)."""

from __future__ import annotations

import shlex
import sys
from dataclasses import replace
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from zimage_server.bench.dispatch import run_dispatch
from zimage_server.bench.environment import resolve_device
from zimage_server.bench.loras import run_lora_switch
from zimage_server.bench.overhead import run_overhead
from zimage_server.bench.previews import run_preview_overhead
from zimage_server.bench.report import result_path, show, write_report
from zimage_server.bench.runner import (
    ABLATION_VARIANTS,
    DEFAULT_PROMPT,
    LOSSY_VARIANTS,
    BenchConfig,
    Variant,
    run_benchmark,
)
from zimage_server.bench.server import BenchError

# Wide enough for the stage columns when piped to a file (rich would assume 80).
console = Console() if sys.stdout.isatty() else Console(width=160)
MIN_SIZE, MAX_SIZE = 256, 2048


class BenchDevice(StrEnum):
    auto = "auto"
    cuda = "cuda"
    cpu = "cpu"


def parse_ints(text: str, name: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise typer.BadParameter(f"{name}: comma-separated integers, got '{text}'") from None
    if not values or min(values) < 1:
        raise typer.BadParameter(f"{name}: at least one positive integer, got '{text}'")
    return values


def parse_sizes(text: str) -> tuple[int, ...]:
    sizes = parse_ints(text, "--sizes")
    for size in sizes:
        if not MIN_SIZE <= size <= MAX_SIZE or size % 16:
            raise typer.BadParameter(f"--sizes: multiples of 16 in 256..2048, got {size}")
    return sizes


def parse_variant(text: str) -> Variant:
    """``NAME:KEY=VALUE[,KEY=VALUE...]``: a server variant and the env that enables it."""
    name, _, settings = text.partition(":")
    env = {}
    for pair in filter(None, settings.split(",")):
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"--variant: expected NAME:KEY=VALUE,..., got '{text}'")
        env[key.strip()] = value.strip()
    if not name.strip() or not env:
        raise typer.BadParameter(f"--variant: expected NAME:KEY=VALUE,..., got '{text}'")
    name = name.strip()
    return Variant(name if name.startswith("ours_") else f"ours_{name}", env)


def preset_variants(device: str, lossy: bool | None, ablation: str | None) -> tuple[Variant, ...]:
    if lossy is None:
        lossy = resolve_device(device).startswith("cuda")
    return (LOSSY_VARIANTS if lossy else ()) + ablation_variants(ablation)


def ablation_variants(names: str | None) -> tuple[Variant, ...]:
    """``all`` or ``eager,pad512,...`` (the variant names without ``ours_``)."""
    if not names:
        return ()
    known = {v.name.removeprefix("ours_"): v for v in ABLATION_VARIANTS}
    if names == "all":
        return ABLATION_VARIANTS
    wanted = [n.strip().removeprefix("ours_") for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise typer.BadParameter(f"--ablation: unknown {unknown}; known: all, {', '.join(known)}")
    return tuple(known[n] for n in wanted)


def current_command() -> str:
    """The command line as the user typed it (near enough to re-run it), key redacted."""
    program = Path(sys.argv[0]).name
    prefix = [program] if program == "zimage" else ["python", sys.argv[0]]
    return shlex.join([*prefix, *redact_key(sys.argv[1:])])


def redact_key(args: list[str]) -> list[str]:
    """The results JSON is committed: never write an API key into it."""
    pairs = zip(["", *args], args, strict=False)
    shown = [("***" if before == "--api-key" else arg) for before, arg in pairs]
    return [("--api-key=***" if arg.startswith("--api-key=") else arg) for arg in shown]


def bench(
    model: Annotated[
        str, typer.Option(help="tiny, random:full, random:small, a diffusers folder or a hub id.")
    ] = "random:full",
    sizes: Annotated[str, typer.Option(help="Square sizes; the first is primary.")] = (
        "1024,512,2048"
    ),
    steps: Annotated[int, typer.Option(min=1, max=75)] = 8,
    warmup: Annotated[int, typer.Option(min=0, help="Untimed requests per size.")] = 1,
    iterations: Annotated[int, typer.Option(min=1, help="Timed requests per size.")] = 5,
    concurrency: Annotated[str, typer.Option(help="Throughput concurrency levels.")] = "1,4,8",
    variant: Annotated[
        list[str] | None,
        typer.Option(help="Opt-in variant NAME:ZIMAGE_KEY=VALUE,... (repeatable)."),
    ] = None,
    lossy: Annotated[
        bool | None,
        typer.Option(help="Also fp8 and step caching, with deviation (default: on a GPU)."),
    ] = None,
    ablation: Annotated[
        str | None,
        typer.Option(help="Lossless speed-ups switched off one at a time: all, or NAME,..."),
    ] = None,
    overhead: Annotated[
        bool, typer.Option("--overhead", help="Measure the server's own overhead instead.")
    ] = False,
    overhead_requests: Annotated[int, typer.Option(min=10)] = 500,
    dispatch: Annotated[
        bool,
        typer.Option(
            "--dispatch",
            help="Measure whether a worker waits for the API between batches instead.",
        ),
    ] = False,
    preview_overhead: Annotated[
        bool,
        typer.Option(
            "--preview-overhead",
            help="Measure what step previews cost a render instead (off vs on, same server).",
        ),
    ] = False,
    lora_switch: Annotated[
        bool,
        typer.Option(
            "--lora-switch",
            help="Measure LoRA switching instead (plain vs round-robin over adapters).",
        ),
    ] = False,
    loras: Annotated[int, typer.Option(min=1, max=16, help="Adapters for --lora-switch.")] = 3,
    lora_rank: Annotated[int, typer.Option(min=1, max=1024, help="Their rank.")] = 32,
    device: Annotated[BenchDevice, typer.Option(help="Where stock and server run.")] = (
        BenchDevice.auto
    ),
    skip_stock: Annotated[bool, typer.Option("--skip-stock")] = False,
    max_batch_size: Annotated[int, typer.Option(min=1, max=16)] = 1,
    peak_tflops: Annotated[float, typer.Option(help="Dense TFLOP/s for the floor.")] = 800.0,
    prompt: Annotated[str, typer.Option()] = DEFAULT_PROMPT,
    seed: Annotated[int, typer.Option(min=0)] = 42,
    data_dir: Annotated[Path | None, typer.Option(help="Default: a temporary folder.")] = None,
    api_key: Annotated[str | None, typer.Option(help="Send this key (else auth is off).")] = None,
    results_dir: Annotated[Path, typer.Option()] = Path("benchmarks/results"),
    output: Annotated[Path | None, typer.Option(help="JSON path (default: results dir).")] = None,
) -> None:
    """Benchmark the server against stock diffusers (or, with --overhead, its own cost)."""
    config = BenchConfig(
        model=model,
        sizes=parse_sizes(sizes),
        steps=steps,
        warmup=warmup,
        iterations=iterations,
        concurrency=parse_ints(concurrency, "--concurrency"),
        variants=preset_variants(device.value, lossy, ablation)
        + tuple(parse_variant(v) for v in variant or ()),
        device=device.value,
        skip_stock=skip_stock,
        max_batch_size=max_batch_size,
        peak_tflops=peak_tflops,
        prompt=prompt,
        seed=seed,
        data_dir=data_dir,
        api_key=api_key,
        overhead_requests=overhead_requests,
    )
    config = replace(config, command=current_command())

    def checkpoint(partial: dict[str, Any]) -> None:
        write_report(partial, output or result_path(partial, results_dir))

    try:
        if overhead:
            report = run_overhead(config)
        elif dispatch:
            report = run_dispatch(config)
        elif preview_overhead:
            report = run_preview_overhead(config)
        elif lora_switch:
            report = run_lora_switch(config, loras, lora_rank)
        else:
            report = run_benchmark(config, checkpoint)
    except BenchError as exc:
        console.print(f"[bold red]bench failed:[/] {exc}", soft_wrap=True)
        raise typer.Exit(1) from None
    show(report, console)
    path = write_report(report, output or result_path(report, results_dir))
    console.print(f"wrote {path}")
