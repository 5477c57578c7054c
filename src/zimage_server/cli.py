"""The ``zimage`` command line: a thin typer layer over settings and the app factory."""

from __future__ import annotations

import logging
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from zimage_server.core.config import Settings
from zimage_server.core.errors import StartupError

app = typer.Typer(help="zimage-server: self-hosted Z-Image-Turbo API.", no_args_is_help=True)
console = Console(stderr=True)


class Device(StrEnum):
    auto = "auto"
    cuda = "cuda"
    cpu = "cpu"


class LogFormat(StrEnum):
    auto = "auto"
    json = "json"
    text = "text"


def _overrides(**values: Any) -> dict[str, Any]:
    """CLI flags that were given; the rest come from ``ZIMAGE_*`` env vars or defaults."""
    return {key: value for key, value in values.items() if value is not None}


class _LoadProgress:
    """Rich progress bar fed by the workers' load events; stops when all are ready."""

    def __init__(self) -> None:
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self.tasks: dict[str, Any] = {}

    def __call__(self, worker: str, stage: str, step: int, total: int) -> None:
        if worker not in self.tasks:
            self.progress.start()
            self.tasks[worker] = self.progress.add_task(f"{worker}: {stage}", total=total)
        done = stage == "ready"
        self.progress.update(
            self.tasks[worker],
            description=f"{worker}: {stage}",
            # Short of full until ready: a finished task's spinner and clock stop, and the
            # last stage (warming up, "3 of 3") is the longest.
            completed=total if done else min(step, total - 1),
            total=total,
        )
        if done and all(self.progress.tasks[t].finished for t in self.tasks.values()):
            self.progress.stop()


@app.command()
def serve(
    model: Annotated[
        str | None, typer.Option(help="Hub id (in the local HF cache) or a diffusers folder.")
    ] = None,
    tiny: Annotated[
        bool | None,
        typer.Option("--tiny", help="Serve the tiny random model: no GPU or weights needed."),
    ] = None,
    host: Annotated[str | None, typer.Option(help="Interface to bind.")] = None,
    port: Annotated[int | None, typer.Option(help="Port to bind.")] = None,
    device: Annotated[Device | None, typer.Option(help="Where the model runs.")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Folder for outputs and caches.")] = None,
    no_auth: Annotated[
        bool, typer.Option("--no-auth", help="Serve without API keys (local use only).")
    ] = False,
    ray: Annotated[
        bool, typer.Option("--ray", help="Deploy on Ray Serve (a local Ray, or --ray-address).")
    ] = False,
    ray_address: Annotated[
        str | None, typer.Option(help="With --ray: auto, or ray://head:10001.")
    ] = None,
    replicas: Annotated[
        int | None, typer.Option(min=1, help="With --ray: a fixed number of engine replicas.")
    ] = None,
    min_replicas: Annotated[
        int | None, typer.Option(min=0, help="With --ray: autoscaling floor (0 = scale to zero).")
    ] = None,
    max_replicas: Annotated[
        int | None, typer.Option(min=1, help="With --ray: autoscaling ceiling.")
    ] = None,
    api_replicas: Annotated[
        int | None,
        typer.Option(min=1, help="With --ray: API ingress replicas (default 2)."),
    ] = None,
    log_format: Annotated[
        LogFormat | None,
        typer.Option(help="auto: readable on a terminal, JSON lines otherwise."),
    ] = None,
) -> None:
    """Run the HTTP server (on this machine, or on Ray Serve with --ray)."""
    from zimage_server.api import create_app, serving
    from zimage_server.telemetry.logs import setup_logging

    settings = Settings(
        **_overrides(
            model=model,
            tiny=tiny,
            host=host,
            port=port,
            device=device.value if device else None,
            data_dir=data_dir,
            auth=False if no_auth else None,
            log_format=log_format.value if log_format else None,
        )
    )
    readable = setup_logging(settings.log_level, settings.log_format, console) == "text"
    _warn(settings)
    # The bar only where lines are readable: off a terminal it would break the JSON lines.
    progress = _LoadProgress() if readable else None
    try:
        if ray:
            from zimage_server.deploy.cli import serve_ray

            serve_ray(settings, ray_address, replicas, min_replicas, max_replicas, api_replicas)
            return
        sock = serving.listen(settings)
        application = create_app(settings, on_progress=progress)
        serving.run(application, settings, sock)
    except StartupError as exc:
        _error(exc.message)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:  # Ctrl-C before the server took over the signal
        raise typer.Exit(130) from None
    finally:
        if progress is not None:
            progress.progress.stop()


def _error(message: str, label: str = "error") -> None:
    """One red line; the message is printed as is (``[ray]`` is not console markup)."""
    console.print(f"[bold red]{label}:[/] {escape(message)}", soft_wrap=True)


def _warn(settings: Settings) -> None:
    """Logged, not printed: in the run's one format (a JSON line off a terminal)."""
    log = logging.getLogger("zimage.cli")
    if not settings.auth_required:
        log.warning(
            "authentication is OFF: anyone who can reach %s:%s can generate images. "
            "Use it only locally.",
            settings.host,
            settings.port,
        )
    if settings.tiny:
        log.warning("serving the tiny random model: images are noise, for trying the API.")


@app.command("tiny-model")
def tiny_model(
    directory: Annotated[Path, typer.Argument(help="Folder to write the model to.")],
) -> None:
    """Write the tiny random Z-Image model (diffusers format, real classes)."""
    from zimage_server.engine.tiny import build_tiny_model

    with console.status(f"Building the tiny model in {directory} ..."):
        build_tiny_model(directory)
    console.print(
        f"Wrote the tiny model to {directory} (load it with ZImagePipeline.from_pretrained)."
    )


def _register_bench() -> None:
    from zimage_server.bench.cli import bench

    app.command("bench", help="Benchmark stock diffusers against this server (JSON + table).")(
        bench
    )


_register_bench()

keys_app = typer.Typer(
    help="Manage API keys and credits (on the ZIMAGE_DATA_DIR / ZIMAGE_DATABASE_URL store)."
)
db_app = typer.Typer(help="Database maintenance.")
app.add_typer(keys_app, name="keys")
app.add_typer(db_app, name="db")


def _services() -> tuple[Any, Any]:
    from zimage_server.accounts import KeyService
    from zimage_server.billing import Ledger
    from zimage_server.store.db import Database

    db = Database(Settings().resolved_database_url)
    db.upgrade()
    ledger = Ledger(db)
    return KeyService(db, ledger), ledger


def _run(action: Any) -> Any:
    """Run a store action; domain errors become a one-line message and exit code 1."""
    from zimage_server.core.errors import ZImageError

    try:
        return action()
    except ZImageError as exc:
        _error(exc.message)
        raise typer.Exit(1) from None


def _show(info: Any) -> None:
    from zimage_server.billing import format_credits

    state = "[red]disabled[/]" if info.disabled else "[green]enabled[/]"
    console.print(
        f"{info.prefix}  {info.name}  {state}  balance {format_credits(info.balance)}  "
        f"scopes {','.join(info.scopes)}  rate {info.rate_limit or 'default'}  "
        f"in-flight {info.max_in_flight or 'default'}",
        soft_wrap=True,
    )


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply database migrations (the server also does this at start)."""
    from zimage_server.store.db import Database

    url = Settings().resolved_database_url
    Database(url).upgrade()
    console.print(f"Database at {url.split('@')[-1]} is up to date.")


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="Who or what the key is for.")],
    credits: Annotated[float, typer.Option(help="Initial credits.")] = 0,
    scope: Annotated[list[str] | None, typer.Option(help="Scope (repeatable).")] = None,
    rate_limit: Annotated[str | None, typer.Option(help="e.g. 60/minute.")] = None,
    max_in_flight: Annotated[int | None, typer.Option(help="Concurrent requests.")] = None,
) -> None:
    """Create a key and print it (on stdout, once: only its hash is stored)."""
    from zimage_server.billing import to_micro

    keys, _ = _services()
    scopes = frozenset(scope or ["generate"])
    key, info = _run(
        lambda: keys.create(name, to_micro(credits), scopes, rate_limit, max_in_flight)
    )
    _show(info)
    typer.echo(key)


@keys_app.command("list")
def keys_list() -> None:
    """List keys (prefixes only; keys themselves are never stored)."""
    keys, _ = _services()
    for info in keys.list():
        _show(info)


@keys_app.command("disable")
def keys_disable(prefix: str) -> None:
    """Disable a key: it gets 403 from now on."""
    keys, _ = _services()
    _show(_run(lambda: keys.set_disabled(prefix, True)))


@keys_app.command("enable")
def keys_enable(prefix: str) -> None:
    """Enable a disabled key."""
    keys, _ = _services()
    _show(_run(lambda: keys.set_disabled(prefix, False)))


@keys_app.command("top-up")
def keys_top_up(prefix: str, credits: float) -> None:
    """Add credits to a key."""
    from zimage_server.billing import to_micro

    keys, _ = _services()
    _show(_run(lambda: keys.top_up(prefix, to_micro(credits))))


@keys_app.command("usage")
def keys_usage(prefix: str) -> None:
    """Images rendered, credits spent and balance of a key."""
    from zimage_server.billing import format_credits

    keys, ledger = _services()
    used = _run(lambda: ledger.usage(keys.key_id(prefix)))
    console.print(
        f"{prefix}: {used.images} images, {format_credits(used.spent)} credits spent, "
        f"balance {format_credits(used.balance)}"
        + (f", {format_credits(used.pending)} held for running requests" if used.pending else "")
    )


class ImageFormat(StrEnum):
    webp = "webp"
    png = "png"
    jpeg = "jpeg"


def lora_entry(text: str) -> dict[str, Any]:
    """``NAME[:SCALE]`` as a request's ``loras`` entry (a URL's own colons stay in the name)."""
    name, _, scale = text.rpartition(":")
    try:
        return {"path": name, "scale": float(scale)} if name else {"path": text}
    except ValueError:
        return {"path": text}


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="What to draw.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Image file to write.")] = Path(
        "out.webp"
    ),
    url: Annotated[str, typer.Option(envvar="ZIMAGE_URL", help="Server base URL.")] = (
        "http://127.0.0.1:8000"
    ),
    api_key: Annotated[str | None, typer.Option(envvar="ZIMAGE_API_KEY", help="API key.")] = None,
    steps: Annotated[int | None, typer.Option(min=1, max=75)] = None,
    guidance_scale: Annotated[float | None, typer.Option(min=0, max=15)] = None,
    seed: Annotated[int | None, typer.Option(help="-1 or unset: the server picks.")] = None,
    width: Annotated[int | None, typer.Option(min=256, max=2048)] = None,
    height: Annotated[int | None, typer.Option(min=256, max=2048)] = None,
    image_format: Annotated[ImageFormat | None, typer.Option("--format")] = None,
    quality: Annotated[int | None, typer.Option(min=1, max=100)] = None,
    lora: Annotated[
        list[str] | None,
        typer.Option(help="An adapter as NAME[:SCALE] (repeat for several; see GET /v1/loras)."),
    ] = None,
    watch: Annotated[
        bool, typer.Option("--watch", help="Show the queue position, then a bar of the steps.")
    ] = False,
) -> None:
    """Generate an image on a running server and save it."""
    from zimage_server.client import APIConnectionError, ZImageAPIError, ZImageClient

    fmt = image_format.value if image_format else (output.suffix.lstrip(".").lower() or "webp")
    fmt = {"jpg": "jpeg"}.get(fmt, fmt)
    options: dict[str, Any] = {
        "steps": steps,
        "guidance_scale": guidance_scale,
        "seed": seed,
        "width": width,
        "height": height,
        "image_format": fmt,
        "quality": quality,
        "loras": [lora_entry(text) for text in lora] if lora else None,
    }
    try:
        with ZImageClient(url, api_key) as client:
            if watch:
                image = _watch(client, prompt, options)
            else:
                with console.status(f"Generating on {url} ..."):
                    image = client.generate(prompt, **options)
    except ZImageAPIError as exc:
        _error(exc.message, f"error {exc.status}")
        raise typer.Exit(1) from None
    except APIConnectionError as exc:
        _error(str(exc))
        raise typer.Exit(1) from None
    image.save(str(output))
    took = f" in {image.generation_time:.2f}s" if image.generation_time is not None else ""
    console.print(f"Saved {output} (seed {image.seed}{took}).")


def _watch(client: Any, prompt: str, options: dict[str, Any]) -> Any:
    """``--watch``: the render's event stream as a bar (its queue position while it waits,
    then its steps). No image preview: rich draws no images, and no terminal-graphics
    library is a dependency here."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("sent", total=None)
        for event in client.stream(prompt, **options):
            if event.kind == "queued":
                progress.update(task, description=f"queued: position {event.queue_position}")
            elif event.step is not None:
                progress.update(task, description="rendering", completed=event.step)
                progress.update(task, total=event.total)
            if event.image is not None:
                return event.image
    raise RuntimeError("the stream ended without an image")  # stream() raises first
