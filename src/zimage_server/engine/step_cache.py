"""Step caching (first-block cache): skip the deep blocks on steps that barely change.

Each step runs the first main block; if its residual moved less than ``threshold``
(relative L1) from the last fully computed step, the other blocks are skipped and their
last residual is reused. The first and last steps always run in full. Lossy and opt-in:
the benchmark reports its deviation from the full computation on the same seed.
Imported by the worker only (it needs torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class CacheState:
    threshold: float
    total_steps: int = 0
    step: int = -1
    skip: bool = False
    reference: Any = None  # first-block residual at the last full step
    block_input: Any = None  # first block's output at the last full step
    residual: Any = None  # last block's output minus block_input, at the last full step
    skipped: int = 0
    enabled: bool = True

    def begin(self, total_steps: int, enabled: bool = True) -> None:
        """Forget the previous render (its tensors and counters); ``enabled`` False runs
        every step in full (a pipeline that adds to the blocks' output outside them)."""
        self.total_steps, self.step, self.skip, self.skipped = total_steps, -1, False, 0
        self.reference = self.block_input = self.residual = None
        self.enabled = enabled

    def decide(self, residual: Any) -> bool:
        self.step += 1
        inner = self.enabled and 0 < self.step < self.total_steps - 1
        if inner and self.reference is not None and self.residual is not None:
            change = (residual - self.reference).abs().mean() / self.reference.abs().mean()
            if float(change) < self.threshold:
                self.skipped += 1
                return True
        self.reference = residual
        return False


class _First(torch.nn.Module):
    def __init__(self, block: Any, state: CacheState) -> None:
        super().__init__()
        self.block, self.state = block, state

    def forward(self, x: Any, *args: Any) -> Any:
        out = self.block(x, *args)
        self.state.skip = self.state.decide(out - x)
        if not self.state.skip:
            self.state.block_input = out
        return out


class _Rest(torch.nn.Module):
    def __init__(self, block: Any, state: CacheState, last: bool) -> None:
        super().__init__()
        self.block, self.state, self.last = block, state, last

    def forward(self, x: Any, *args: Any) -> Any:
        if self.state.skip:
            return x + self.state.residual if self.last else x
        out = self.block(x, *args)
        if self.last:
            self.state.residual = out - self.state.block_input
        return out


def install_step_cache(transformer: Any, threshold: float) -> CacheState:
    """Wrap the main blocks in place; returns the state to ``begin()`` before each render."""
    state = CacheState(threshold)
    blocks = list(transformer.layers)
    wrapped: list[torch.nn.Module] = [_First(blocks[0], state)]
    wrapped += [_Rest(b, state, i == len(blocks) - 1) for i, b in enumerate(blocks) if i]
    transformer.layers = torch.nn.ModuleList(wrapped)
    return state
