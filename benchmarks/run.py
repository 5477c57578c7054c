"""Run ``zimage bench`` from a checkout: ``PYTHONPATH=src python benchmarks/run.py --help``."""

import typer

from zimage_server.bench.cli import bench

if __name__ == "__main__":
    typer.run(bench)
