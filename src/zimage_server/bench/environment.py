"""Where and with what a benchmark ran: device, date and package versions."""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
from importlib import metadata

PACKAGES = ("torch", "diffusers", "transformers", "pillow", "numpy", "httpx")


def resolve_device(choice: str) -> str:
    """``auto``: the first GPU when torch sees one, else the CPU."""
    if choice != "auto":
        return "cuda:0" if choice == "cuda" else choice
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def device_name(device: str) -> str:
    """The GPU's name as torch reports it, or ``cpu``."""
    if not device.startswith("cuda"):
        return "cpu"
    import torch

    return str(torch.cuda.get_device_name(torch.device(device)))


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def today() -> str:
    return dt.datetime.now(dt.UTC).date().isoformat()


def package_versions() -> dict[str, str]:
    from zimage_server import __version__

    versions = {"python": platform.python_version(), "zimage-server": __version__}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    try:
        import torch

        versions["cuda"] = str(torch.version.cuda)
    except ImportError:
        versions["cuda"] = "none"
    return versions


def host_info() -> dict[str, object]:
    """CPU count and load average at the start: CPU-side figures are noisy on a busy host."""
    return {
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
