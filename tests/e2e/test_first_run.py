"""What a newcomer meets on the command line: a busy port is one line, at once."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def test_a_port_in_use_is_one_line_and_no_model_is_loaded(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        start = time.monotonic()
        run = subprocess.run(
            [sys.executable, "-m", "zimage_server", "serve", "--tiny", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "ZIMAGE_DATA_DIR": str(tmp_path)},
            check=False,
        )
    took = time.monotonic() - start
    assert run.returncode == 2, run.stdout + run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"Cannot listen on 127.0.0.1:{port}" in errors[0], run.stderr
    assert "--port" in errors[0]
    assert "Traceback" not in run.stderr and "worker" not in run.stdout + run.stderr
    assert not (tmp_path / "models").exists()  # the tiny model was not even built
    assert took < 30
