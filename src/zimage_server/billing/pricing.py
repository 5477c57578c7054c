"""The price of an image: linear in pixels and in steps, which is how GPU time scales.

    price = max(minimum, reference x (width x height / 1024²) x (steps / 8))

``reference`` is the price of the default image (1024x1024, 8 steps); an image with LoRA
adapters costs ``lora_surcharge`` (a share) more, and a ControlNet image
``controlnet_surcharge`` more (its control layers run beside the transformer's at each
step). Amounts are integer micro-credits internally (exact sums) and decimal strings at
the edges.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

MICRO = 1_000_000
REFERENCE_PIXELS = 1024 * 1024
REFERENCE_STEPS = 8


def to_micro(credits: float | Decimal | str) -> int:
    return int((Decimal(str(credits)) * MICRO).to_integral_value())


def format_credits(micro: int) -> str:
    """``1500000`` -> ``"1.5"``: no float artefacts, no trailing zeros."""
    text = f"{Decimal(micro) / MICRO:f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


@dataclass(frozen=True)
class Pricing:
    reference: float = 1.0
    minimum: float = 0.01
    lora_surcharge: float = 0.0
    controlnet_surcharge: float = 0.0

    def price(
        self,
        width: int,
        height: int,
        steps: int,
        images: int = 1,
        loras: bool = False,
        controlnet: bool = False,
    ) -> int:
        """Price in micro-credits of ``images`` images of this size and step count."""
        scale = Decimal(width * height) / REFERENCE_PIXELS * Decimal(steps) / REFERENCE_STEPS
        base = max(to_micro(self.minimum), to_micro(Decimal(str(self.reference)) * scale))
        one = base
        if loras:
            one += to_micro(Decimal(base) / MICRO * Decimal(str(self.lora_surcharge)))
        if controlnet:
            one += to_micro(Decimal(base) / MICRO * Decimal(str(self.controlnet_surcharge)))
        return one * images
