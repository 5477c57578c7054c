"""How many denoising steps a render runs: one rule for pricing, progress and the engine."""

from __future__ import annotations


def steps_run(steps: int, strength: float) -> int:
    """The steps a pipeline runs at ``strength`` (diffusers' rounding): all of them at 1,
    fewer for an input image kept closer."""
    return steps - int(max(steps - steps * strength, 0))
