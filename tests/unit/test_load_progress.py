"""The load progress bar of ``zimage serve`` on a terminal."""

from __future__ import annotations

from zimage_server.cli import _LoadProgress


def test_bar_keeps_running_until_the_worker_is_ready() -> None:
    """Warming up is reported as stage 3 of 3 and is the longest: the task must not finish
    there, or its spinner and elapsed clock stop and the server looks hung."""
    bar = _LoadProgress()
    bar("worker-0", "building the tiny model", 0, 3)
    bar("worker-0", "warming up", 3, 3)
    task = bar.progress.tasks[0]
    assert not task.finished and task.completed < task.total
    bar("worker-0", "ready", 3, 3)
    assert task.finished
