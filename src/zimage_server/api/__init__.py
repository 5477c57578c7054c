"""The HTTP layer: thin FastAPI routes over the services."""

from zimage_server.api.main import create_app

__all__ = ["create_app"]
