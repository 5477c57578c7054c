"""zimage-server: a self-hosted, Segmind-compatible API for Z-Image-Turbo."""

from zimage_server.core.config import Settings

__all__ = ["Settings", "__version__"]
__version__ = "0.1.0"
