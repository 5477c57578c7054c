"""The ``zimage`` command line: a thin typer layer over settings and the app factory."""

from __future__ import annotations

import logging
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from zimage_server.core.config import Settings
from zimage_server.core.errors import StartupError

app = typer.Typer(help="zimage-server: self-hosted Z-Image-Turbo API.", no_args_is_help=True)
console = Console(stderr=True)


class Device(StrEnum):
    auto = "auto"
    cuda = "cuda"
    cpu = "cpu"


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
            completed=total if done else step,
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
) -> None:
    """Run the HTTP server."""
    import uvicorn

    from zimage_server.api import create_app

    settings = Settings(
        **_overrides(
            model=model,
            tiny=tiny,
            host=host,
            port=port,
            device=device.value if device else None,
            data_dir=data_dir,
        )
    )
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    try:
        application = create_app(settings, on_progress=_LoadProgress())
    except StartupError as exc:
        console.print(f"[bold red]error:[/] {exc.message}", soft_wrap=True)
        raise typer.Exit(2) from None
    if settings.tiny:
        console.print(
            "[yellow]Serving the tiny random model: images are noise, for trying the API.[/]"
        )
    uvicorn.run(application, host=settings.host, port=settings.port, log_level=settings.log_level)


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
