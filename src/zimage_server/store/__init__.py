"""Persistent state: the output image store (and, later, the database)."""

from zimage_server.store.outputs import OutputStore

__all__ = ["OutputStore"]
