"""An image's RGB bytes read where the worker wrote them: a lease on a shared-memory slot.

Copying a 2048x2048 result out of its slot costs more than the rest of its transfer, so
the API reads it in place. The slot must then stay out of the pool for as long as anything
can read it. ``SharedPixels`` owns the lease through one exporter object (a ctypes array
over the slot's bytes): every view handed out is a ``memoryview`` of that exporter, and
every slice of it, or array or image decoder reading it, keeps the exporter alive. The
slot returns to the pool only when the exporter dies, so ``close()`` (or dropping the
result) while an encoder thread still reads its view cannot let the next batch overwrite
those pixels: the slot comes back when that thread lets go.

Pickled (Ray sends results between processes), it becomes plain ``bytes``: a copy there
is unavoidable, and the lease stays in the process that holds the slot.
"""

from __future__ import annotations

import ctypes
from typing import Any

PixelArray = ctypes.Array[ctypes.c_ubyte]


class SharedPixels:
    """Raw RGB in a slot, readable in place until closed; compares equal to its bytes."""

    __slots__ = ("_exporter", "_size")

    def __init__(self, exporter: PixelArray) -> None:
        self._exporter: PixelArray | None = exporter
        self._size = len(exporter)

    def view(self) -> memoryview:
        """The pixels, not copied; the slot stays leased while this view (or a slice of it)
        lives, even after ``close()``."""
        if self._exporter is None:
            raise ValueError("the pixels were closed")
        return memoryview(self._exporter).cast("B")

    def close(self) -> None:
        """Done with the pixels: the slot goes back once no view of it is left."""
        self._exporter = None

    @property
    def closed(self) -> bool:
        return self._exporter is None

    def __enter__(self) -> SharedPixels:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return self._size

    def __bytes__(self) -> bytes:
        with self.view() as view:
            return bytes(view)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SharedPixels):
            other = bytes(other)
        if not isinstance(other, bytes | bytearray | memoryview):
            return NotImplemented
        with self.view() as view:
            return view == other

    __hash__ = None  # type: ignore[assignment]  # equal to bytes, but its content can change

    def __reduce__(self) -> tuple[Any, ...]:
        return (bytes, (bytes(self),))

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<SharedPixels {self._size} bytes, {state}>"


Pixels = bytes | SharedPixels


def pixel_view(pixels: Pixels) -> memoryview:
    """A buffer over ``pixels`` for a decoder, without copying either kind."""
    return pixels.view() if isinstance(pixels, SharedPixels) else memoryview(pixels)
