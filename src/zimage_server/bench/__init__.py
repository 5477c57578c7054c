"""``zimage bench``: our server against stock diffusers, and the server's own overhead.

No FastAPI here: the server under test runs as a subprocess and is driven over HTTP,
exactly as a client would; the stock pipeline runs in this process.
"""

from zimage_server.bench.runner import BenchConfig, run_benchmark, run_overhead

__all__ = ["BenchConfig", "run_benchmark", "run_overhead"]
