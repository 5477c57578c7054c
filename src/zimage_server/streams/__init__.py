"""Event streams of renders: the hub that fans each render's progress out to readers."""

from zimage_server.streams.hub import EventSource, ProgressHub, StreamEvent, Subscription

__all__ = ["EventSource", "ProgressHub", "StreamEvent", "Subscription"]
