"""``zimage bench``: our server against stock diffusers, and the server's own overhead.

No FastAPI here: the server under test (and the bare-FastAPI floor, ``bench/floor.py``)
runs as a subprocess and is driven over HTTP, exactly as a client would; the stock
pipeline runs in this process.
"""

from zimage_server.bench.overhead import run_overhead
from zimage_server.bench.runner import BenchConfig, run_benchmark

__all__ = ["BenchConfig", "run_benchmark", "run_overhead"]
