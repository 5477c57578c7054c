"""Persistent state: the output image store (and, later, the database)."""

from zimage_server.store.outputs import Outputs, OutputStore, Stored

__all__ = ["OutputStore", "Outputs", "Stored"]
