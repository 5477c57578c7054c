"""The benchmark's printed summary warns when our server is slower than stock diffusers with
CFG off (the same computation): on the first H200 run that meant a model cast to float32."""

from __future__ import annotations

from zimage_server.bench.report import summary_lines

WARNING = "WARNING: ours is slower than stock with CFG off"


def report(device: str, speedup: float) -> dict[str, object]:
    return {"device": device, "speedup_vs_stock_cfg_off": speedup, "settings": {}}


def test_a_gpu_run_slower_than_stock_says_so_and_where_to_look() -> None:
    lines = summary_lines(report("NVIDIA H200", 0.17))
    assert "speedup_vs_stock_cfg_off: 0.17x" in lines
    assert any(line.startswith(WARNING) and "ready line" in line for line in lines)


def test_no_warning_when_faster_or_on_a_cpu() -> None:
    assert not any(WARNING in line for line in summary_lines(report("NVIDIA H200", 1.4)))
    # The tiny model on a CPU is overhead-bound: slower than stock there says nothing.
    assert not any(WARNING in line for line in summary_lines(report("cpu", 0.6)))
