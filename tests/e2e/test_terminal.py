"""``zimage serve`` as a person starts it: on a terminal (a real pseudo-terminal), then
stopped with Ctrl-C (SIGINT to the whole process group, as the terminal sends it); and
off a terminal, where every line stays JSON."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import psutil
import requests

from tests.conftest import BASE_ENV, ROOT, Server, seed_tiny_model
from zimage_server.launcher import absolute_pythonpath

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# \s+: a narrow terminal wraps the line (rich indents the continuation)
READY = re.compile(
    r"ready: playground (http://127\.0\.0\.1:(\d+))/\s+docs\s+\1/docs\s+API\s+\1/v1/"
)


class Terminal:
    """The CLI on a pseudo-terminal of 160 columns, in a session (process group) of its own."""

    def __init__(self, data_dir: Path, *args: str) -> None:
        seed_tiny_model(data_dir)
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
        env = {**os.environ, **BASE_ENV, **absolute_pythonpath(), "TERM": "xterm-256color"}
        env.update({"ZIMAGE_DATA_DIR": str(data_dir), "ZIMAGE_LOG_FORMAT": "auto"})
        env.update({"COLUMNS": "160", "LINES": "40"})  # the pty's size, whatever the runner set
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "zimage_server", "serve", "--port", "0", *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            cwd=data_dir,
            start_new_session=True,
        )
        os.close(slave)
        self.master = master
        self.raw = b""

    def read(self, seconds: float) -> bool:
        """Collect output for ``seconds``; False once the terminal is closed."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if select.select([self.master], [], [], 0.05)[0]:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:  # EIO: every process holding the terminal has exited
                    return False
                if not chunk:
                    return False
                self.raw += chunk
        return True

    @property
    def text(self) -> str:
        return ANSI.sub("", self.raw.decode(errors="replace"))

    def wait_for(self, pattern: re.Pattern[str], timeout: float = 180) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while (match := pattern.search(self.text)) is None:
            assert time.monotonic() < deadline and self.proc.poll() is None, self.text[-3000:]
            self.read(0.2)
        return match

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        os.close(self.master)


def test_on_a_terminal_one_readable_format_a_ready_line_and_a_clean_ctrl_c(
    tmp_path: Path,
) -> None:
    term = Terminal(tmp_path, "--tiny", "--no-auth")
    try:
        ready = term.wait_for(READY)
        url, port = ready.group(1), int(ready.group(2))
        assert port != 0 and f"listening on {url}" in term.text
        assert requests.get(url + "/readyz", timeout=10).status_code == 200
        children = psutil.Process(term.proc.pid).children(recursive=True)  # workers, forkserver
        term.read(0.5)
        started = time.monotonic()
        os.killpg(term.proc.pid, signal.SIGINT)  # Ctrl-C: the whole foreground group
        while term.read(0.2) and time.monotonic() - started < 60:
            pass
        assert term.proc.wait(timeout=30) == 0
        stop_s = time.monotonic() - started
    finally:
        term.close()
    text = term.text
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    assert not [line for line in lines if line.startswith("{")], "a JSON line on a terminal"
    for noise in ("color_message", "it/s]", "Traceback", "KeyboardInterrupt", "Error"):
        assert noise not in text, f"{noise!r} in:\n{text}"
    assert re.search(r"\d\d:\d\d:\d\d +INFO +worker-0: speed-ups on cpu", text), text
    assert re.search(r"\d\d:\d\d:\d\d +WARNING +authentication is OFF", text), text
    assert "Finished server process" in text and stop_s < 30
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, [(p.pid, p.cmdline()) for p in alive]
    (ROOT / "artifacts").mkdir(exist_ok=True)
    (ROOT / "artifacts" / "ctrl-c.json").write_text(json.dumps({"stop_s": round(stop_s, 2)}))


def test_json_by_flag_on_a_terminal(tmp_path: Path) -> None:
    term = Terminal(tmp_path, "--model", "null", "--log-format", "json")
    try:
        term.wait_for(re.compile(r'"message": "ready: playground http://127\.0\.0\.1:\d+/'))
    finally:
        term.close()
    lines = [line.strip() for line in term.text.splitlines() if line.strip()]
    assert lines and all(line.startswith("{") for line in lines), term.text
    assert "color_message" not in term.text


def test_off_a_terminal_every_line_is_json(tmp_path: Path) -> None:
    server = Server(tmp_path, env={"ZIMAGE_LOG_FORMAT": "auto"})
    try:
        deadline = time.monotonic() + 10
        while '"message": "ready: playground' not in server.log():
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.1)
    finally:
        server.stop()
    entries = [json.loads(line) for line in server.log().splitlines() if line.strip()]
    assert not [entry for entry in entries if "color_message" in entry]
    ready = next(entry for entry in entries if entry["message"].startswith("ready:"))
    assert ready["url"] == server.url
    workers = [entry for entry in entries if entry.get("worker") == "worker-0"]
    assert workers and workers[0]["message"].startswith("worker-0: ")
