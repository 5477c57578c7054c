"""Logs in one format per run: one JSON object per line for log pipelines (the default
off a terminal), or readable lines through rich on a terminal.

Every record goes through the API process's root logger, the workers' too (they send
theirs over their pipe), so a run never mixes formats.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from rich.console import Console
from rich.logging import RichHandler

# uvicorn's ANSI-coloured copy of its message: noise in a JSON line.
_DROPPED = {"color_message"}
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"} | _DROPPED


class JsonFormatter(logging.Formatter):
    """Every ``extra={...}`` field of a record becomes a JSON field."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class _ReadableFormatter(logging.Formatter):
    """The message, and a request's duration on access lines (rich adds time and level)."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        duration = getattr(record, "duration_ms", None)
        return f"{text} ({duration:g} ms)" if isinstance(duration, int | float) else text


def resolve_format(fmt: str) -> str:
    """``auto``: readable on a terminal, JSON otherwise (a file, a pipe, a log collector)."""
    if fmt != "auto":
        return fmt
    return "text" if sys.stderr.isatty() else "json"


def setup_logging(level: str, fmt: str, console: Console | None = None) -> str:
    """Route every record to one handler on stderr; returns the format chosen.

    ``console`` is the one the CLI draws its progress bar on: rich prints log lines above
    a live bar instead of through it."""
    fmt = resolve_format(fmt)
    handler: logging.Handler
    if fmt == "json":
        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter())
    else:
        handler = RichHandler(
            console=console or Console(stderr=True),
            show_path=False,
            markup=False,
            log_time_format="%H:%M:%S",
            omit_repeated_times=False,
        )
        handler.setFormatter(_ReadableFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    return fmt
