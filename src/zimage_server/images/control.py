"""Control-image pre-processors: what turns an ordinary photo into what a ControlNet reads.

Only those that need no model weights (a depth or pose estimator would be a second model
to ship and load). They run in the API process, on the control image already fitted to the
render size, so an edge's width is the same share of every output whatever the upload's
resolution. The result is what the job stores and the worker receives: pixels, no recipe.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image

# Canny's hysteresis thresholds on 8-bit gradients: the usual pair for ControlNet edge maps
# (strong edges above 200 start a line, weaker ones above 100 continue it).
CANNY_LOW, CANNY_HIGH = 100, 200


def canny(image: Image.Image) -> Image.Image:
    """White edges on black, as the Canny ControlNets were trained on (RGB, 3 equal
    channels). OpenCV is imported here: only requests that ask for it pay its import."""
    import cv2

    gray = np.asarray(image.convert("L"))
    edges = cv2.Canny(gray, CANNY_LOW, CANNY_HIGH)
    return Image.fromarray(edges).convert("RGB")


def as_is(image: Image.Image) -> Image.Image:
    return image.convert("RGB")


PREPROCESSORS: dict[str, Callable[[Image.Image], Image.Image]] = {"none": as_is, "canny": canny}


def preprocess(image: Image.Image, control_type: str) -> Image.Image:
    """``control_type``'s pre-processor applied (the field's values are checked by the
    request model, so every one has an entry)."""
    return PREPROCESSORS[control_type](image)
