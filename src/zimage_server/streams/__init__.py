"""Event streams of renders: the hub that fans each render's progress out to readers."""

from zimage_server.streams.hub import ProgressHub, StreamEvent, Subscription

__all__ = ["ProgressHub", "StreamEvent", "Subscription"]
