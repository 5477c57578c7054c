"""Where the weights come from: a local folder, the Hugging Face cache, the tiny model, or
no weights at all (``random:full``/``random:small`` built on the device, ``null``).

Resolved in the API process before any worker starts, so a missing model is a one-line
error at ``zimage serve`` rather than a traceback from a child process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from zimage_server.core.config import Settings
from zimage_server.core.errors import StartupError
from zimage_server.engine.null import NULL_MODEL
from zimage_server.engine.random_model import SPECS, is_random_model


@dataclass(frozen=True)
class ModelSource:
    path: str  # a folder in diffusers format (or where the tiny model will be built)
    label: str  # what to show in logs and /readyz
    build_tiny: bool = False


def resolve_model(settings: Settings) -> ModelSource:
    if settings.tiny:
        folder = settings.tiny_model_dir
        return ModelSource(str(folder), "tiny (random weights)", build_tiny=True)
    if settings.model == NULL_MODEL or is_random_model(settings.model):
        return _synthetic(settings.model)
    folder = Path(settings.model).expanduser()
    if folder.is_dir():
        if not (folder / "model_index.json").is_file():
            raise StartupError(f"{folder} is not a diffusers model folder (no model_index.json).")
        return ModelSource(str(folder.resolve()), str(folder))
    return ModelSource(_from_hf_cache(settings.model), settings.model)


def resolve_controlnet(settings: Settings) -> str | None:
    """``ZIMAGE_CONTROLNET`` as a local folder holding a diffusers ``ZImageControlNetModel``
    (its ``config.json``): a folder as given, or a hub id from the local HF cache."""
    if settings.controlnet is None:
        return None
    folder = Path(settings.controlnet).expanduser()
    if not folder.is_dir():
        folder = Path(_from_hf_cache(settings.controlnet, "ZIMAGE_CONTROLNET"))
    if not (folder / "config.json").is_file():
        raise StartupError(
            f"ZIMAGE_CONTROLNET: {folder} is not a diffusers ControlNet folder (no config.json)."
        )
    return str(folder.resolve())


def _synthetic(name: str) -> ModelSource:
    """Models built by the worker itself: nothing to find on disk."""
    if name == NULL_MODEL:
        return ModelSource(name, "null (zero-cost generator, for benchmarks)")
    if name not in SPECS:
        raise StartupError(f"Unknown random model '{name}'; choose one of {', '.join(SPECS)}.")
    return ModelSource(name, f"{name} (random weights, built on the device)")


def _from_hf_cache(repo_id: str, setting: str = "") -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return str(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError, OSError):
        if setting:
            raise StartupError(
                f"{setting} '{repo_id}' is neither a local folder nor in the Hugging Face "
                f"cache. Download it with `hf download {repo_id}`, or point {setting} at a "
                "folder."
            ) from None
        raise StartupError(
            f"Model '{repo_id}' is neither a local folder nor in the Hugging Face cache. "
            f"Download it with `hf download {repo_id}` (or pass --model /path/to/folder), "
            "or try the API without weights: `zimage serve --tiny`."
        ) from None


def detect_devices(choice: str) -> tuple[str, ...]:
    """One device per worker: every visible GPU for auto/cuda, else the CPU.

    Counts GPUs without importing torch (the API process stays light): the
    ``CUDA_VISIBLE_DEVICES`` list when set, else ``nvidia-smi``.
    """
    if choice == "cpu":
        return ("cpu",)
    count = _gpu_count()
    if count == 0:
        if choice == "cuda":
            raise StartupError("--device cuda was requested but no NVIDIA GPU is visible.")
        return ("cpu",)
    return tuple(f"cuda:{i}" for i in range(count))


def _gpu_count() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20, check=True)  # noqa: S603
    except (subprocess.SubprocessError, OSError):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
