"""The worker process: owns one device and the pipeline on it.

A reader thread takes commands off the pipe (so a ``Cancel`` lands while a batch is
rendering, and the next batch waits in the inbox: the API sends it ahead, and the device
never waits for the API between batches); the main thread renders batches one at a time,
puts their images into the shared-memory slots lent with them and answers with events.
If the API process goes away the pipe closes and the worker exits. Its log records go
over the same pipe, for the API process to write in its one format.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Protocol

from zimage_server.core.errors import Cancelled, TaskNotConfigured
from zimage_server.engine.adapters import AdapterError
from zimage_server.engine.null import NULL_MODEL, NullGenerator
from zimage_server.engine.protocol import (
    BatchDone,
    BatchFailed,
    Cancel,
    DeviceMemory,
    Event,
    FailureKind,
    LoadFailed,
    LoadProgress,
    Prefetch,
    Preview,
    Prompt,
    Ready,
    RenderBatch,
    Shutdown,
    StepProgress,
    WorkerSpec,
)
from zimage_server.engine.shared_results import RenderInto, ResultsReady, SlotWriter

log = logging.getLogger("zimage.worker")
ProgressFn = Callable[[str, int, int], None]
StepFn = Callable[[int, int, tuple[Preview, ...]], None]


class ImageGenerator(Protocol):
    """The model behind the worker: load, warm up, render a batch, encode ahead."""

    @property
    def dtype_name(self) -> str: ...

    def device_memory(self) -> DeviceMemory | None: ...

    def load(self, progress: ProgressFn) -> None: ...

    def warmup(self) -> None: ...

    def generate(
        self, batch: RenderBatch, on_step: StepFn, is_cancelled: Callable[[], bool]
    ) -> BatchDone: ...

    def prefetch(self, prompts: list[Prompt]) -> None: ...


def make_generator(spec: WorkerSpec) -> ImageGenerator:
    """The null generator for ``--model null`` (no torch at all); diffusers otherwise."""
    if spec.model_path == NULL_MODEL:
        return NullGenerator(spec.worker.debug_step_delay_s)
    from zimage_server.engine.generator import DiffusersGenerator

    return DiffusersGenerator(spec)


class _Outbox:
    """Thread-safe sender: the render loop and the step callback both send."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    def send(self, event: Event | ResultsReady | logging.LogRecord) -> None:
        with self._lock:
            self._conn.send(event)


class _PipeHandler(logging.Handler):
    """Sends each record to the API process, which logs it in the run's one format (JSON,
    or readable on a terminal), instead of a second format interleaved on the same stderr."""

    def __init__(self, out: _Outbox) -> None:
        super().__init__()
        self._out = out

    def emit(self, record: logging.LogRecord) -> None:
        portable = logging.makeLogRecord(vars(record))
        portable.msg = self.format(record)  # with its traceback: those do not pickle
        portable.args = portable.exc_info = portable.exc_text = portable.stack_info = None
        with contextlib.suppress(OSError, ValueError):  # the API process is gone: no one to tell
            self._out.send(portable)


def _log_to_parent(out: _Outbox) -> None:
    root = logging.getLogger()
    root.handlers[:] = [_PipeHandler(out)]
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)


def _quiet_libraries() -> None:
    """diffusers and transformers print tqdm bars and log through handlers of their own,
    straight to the terminal, under the API's output: send their records through ours and
    drop the bars (the load stages reach the API as ``LoadProgress``), unless asked for
    with ``HF_HUB_DISABLE_PROGRESS_BARS=0``."""
    wanted = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").lower() in ("0", "false")
    if not wanted:  # for the libraries not imported yet
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    for name in ("diffusers.utils.logging", "transformers.utils.logging"):
        library = sys.modules.get(name)
        if library is None:
            continue
        library.disable_default_handler()
        library.enable_propagation()
        if not wanted:
            library.disable_progress_bar()
    hub = sys.modules.get("huggingface_hub.utils")
    if hub is not None and not wanted:
        hub.disable_progress_bars()


def _read_commands(
    conn: Connection,
    inbox: queue.Queue[RenderInto | None],
    cancelled: set[str],
    prefetches: queue.Queue[Prefetch] | None,
) -> None:
    while True:
        try:
            command = conn.recv()
        except (EOFError, OSError):
            break
        if isinstance(command, RenderInto):
            inbox.put(command)
        elif isinstance(command, RenderBatch):
            inbox.put(RenderInto(command))
        elif isinstance(command, Cancel):
            cancelled.add(command.job_id)
        elif isinstance(command, Prefetch) and prefetches is not None:
            prefetches.put(command)
        elif isinstance(command, Shutdown):
            break
    inbox.put(None)


def prefetch_forever(generator: ImageGenerator, prefetches: queue.Queue[Prefetch]) -> None:
    """Encode the prompts of queued renders while the current batch denoises.

    Best effort: a failure here only means the render encodes its prompt itself.
    """
    while True:
        hint = prefetches.get()
        try:
            generator.prefetch(list(hint.prompts))
        except Exception:
            log.warning("prompt prefetch failed:\n%s", traceback.format_exc())


def _load(spec: WorkerSpec, out: _Outbox) -> ImageGenerator | None:
    start = time.perf_counter()
    try:
        if spec.build_tiny_at and not (Path(spec.build_tiny_at) / "model_index.json").exists():
            from zimage_server.engine.tiny import build_tiny_model

            out.send(LoadProgress("building the tiny model", 0, 3))
            build_tiny_model(Path(spec.build_tiny_at))
        generator = make_generator(spec)
        _quiet_libraries()
        generator.load(lambda stage, i, n: out.send(LoadProgress(stage, i, n)))
        if spec.worker.warmup:
            out.send(LoadProgress("warming up", 3, 3))
            generator.warmup()
    except Exception as exc:  # any load failure is reported, not raised into the void
        log.error("model load failed:\n%s", traceback.format_exc())
        out.send(LoadFailed(f"{type(exc).__name__}: {exc}"))
        return None
    memory = generator.device_memory()
    out.send(Ready(spec.device, generator.dtype_name, time.perf_counter() - start, memory))
    return generator


def inject_faults(batch: RenderBatch) -> None:
    """The fault-injection seam: prompt markers provoke real failures in this process.

    ``[[fault:oom]]`` raises torch's own out-of-memory error, ``[[fault:error]]`` a plain
    exception, ``[[fault:exit]]`` kills the worker mid-batch. Only with ``debug_faults``.
    """
    prompts = " ".join(item.prompt for item in batch.items)
    if "[[fault:exit]]" in prompts:
        os._exit(3)
    if "[[fault:oom]]" in prompts:
        import torch

        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected by [[fault:oom]])")
    if "[[fault:error]]" in prompts:
        raise RuntimeError("injected by [[fault:error]]")


def _render(
    generator: ImageGenerator,
    command: RenderInto,
    cancelled: set[str],
    out: _Outbox,
    writer: SlotWriter,
    faults: bool = False,
) -> None:
    batch = command.batch
    job_ids = {item.job_id for item in batch.items}
    try:
        if job_ids <= cancelled:  # cancelled while it waited behind the batch before
            raise Cancelled("every image of the batch was cancelled")
        if faults:
            inject_faults(batch)
        done = generator.generate(
            batch,
            on_step=lambda step, total, previews: out.send(
                StepProgress(batch.batch_id, step, total, previews)
            ),
            is_cancelled=lambda: job_ids <= cancelled,
        )
        ready = writer.place(done, command.slots)
    except Cancelled:
        out.send(BatchFailed(batch.batch_id, "cancelled", "cancelled"))
    except TaskNotConfigured as exc:
        out.send(BatchFailed(batch.batch_id, "unconfigured", str(exc)))
    except AdapterError as exc:
        log.warning("batch %s: %s", batch.batch_id, exc)
        out.send(BatchFailed(batch.batch_id, "invalid", str(exc)))
    except Exception as exc:
        requests = ",".join(item.request_id or item.job_id for item in batch.items)
        log.error(
            "batch %s (requests %s) failed:\n%s", batch.batch_id, requests, traceback.format_exc()
        )
        kind: FailureKind = "oom" if _out_of_memory(exc) else "error"
        if kind == "oom":
            _release_accelerator_memory()
        out.send(BatchFailed(batch.batch_id, kind, f"{type(exc).__name__}: {exc}"))
    else:
        out.send(ready)
    finally:
        cancelled.difference_update(job_ids)


def _out_of_memory(exc: BaseException) -> bool:
    """torch's own OOM error (never raised where torch was not imported)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(exc, torch.OutOfMemoryError)


def _release_accelerator_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def worker_main(conn: Connection, spec: WorkerSpec) -> None:
    """Entry point of the worker process (spawned, so it starts from a clean interpreter).

    It ignores SIGINT: Ctrl-C reaches the whole process group, and the API process stops
    its workers itself (``Shutdown``) after draining, without a traceback from each."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out = _Outbox(conn)
    _log_to_parent(out)
    _quiet_libraries()
    inbox: queue.Queue[RenderInto | None] = queue.Queue()
    prefetches = queue.Queue[Prefetch]() if spec.prefetches else None
    cancelled: set[str] = set()
    reader = threading.Thread(
        target=_read_commands, args=(conn, inbox, cancelled, prefetches), daemon=True
    )
    reader.start()
    generator = _load(spec, out)
    if generator is None:
        return
    if prefetches is not None:
        args = (generator, prefetches)
        threading.Thread(target=prefetch_forever, args=args, daemon=True).start()
    writer = SlotWriter()
    while (command := inbox.get()) is not None:
        _render(generator, command, cancelled, out, writer, spec.worker.debug_faults)
