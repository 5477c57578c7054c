"""Measure the image encode from a checkout: ``PYTHONPATH=src python benchmarks/encode.py``."""

import typer

from zimage_server.bench.encode import main

if __name__ == "__main__":
    typer.run(main)
