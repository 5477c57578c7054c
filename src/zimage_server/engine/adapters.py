"""LoRA adapters per batch: loaded once, kept on the device, hot-swapped into fixed slots.

The transformer gets ``max_loras`` PEFT LoRA slots of rank ``lora_max_rank`` on every
``Linear``, made before any ``torch.compile`` so the compiled graphs already contain them.
A batch with adapters copies each one's weights into a slot with diffusers' hot-swap
(``load_lora_weights(..., hotswap=True)``: smaller ranks zero-padded, scalings kept as
tensors), so switching adapters changes tensor values, never the graph: no recompile.
Unused slots are zeroed; a batch without adapters runs with the adapters disabled, which
is the base model's exact computation: nothing stays fused or scaled between requests.

Adapters are read from disk once (diffusers converts the trainer formats it knows) and
kept in an LRU bounded by count and bytes. Imported in the worker only; torch is imported
inside the functions, as in ``speedups.py``, so ``worker.py`` can name ``AdapterError``.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections import OrderedDict
from typing import Any

from zimage_server.core.config import LoraSettings
from zimage_server.engine.protocol import AdapterStats, LoraRef

log = logging.getLogger("zimage.worker")
PREFIX = "transformer."
SLOT = "slot{}"


class AdapterError(Exception):
    """The adapter cannot be used with this model; the message names it and says why."""


class AdapterBank:
    """The transformer's LoRA slots and the adapters kept loaded for them."""

    def __init__(self, pipe: Any, settings: LoraSettings) -> None:
        self.pipe = pipe
        self.settings = settings
        self.slots: list[tuple[str, float] | None] = []  # (identity, scale) in each slot
        self.cache: OrderedDict[str, tuple[dict[str, Any], int]] = OrderedDict()
        self.hits = self.misses = self.evictions = 0
        self._reported = (0, 0, 0)  # hits, misses, evictions at the last ``report``
        self._load_s: list[float] = []  # misses since the last ``report``

    @property
    def ready(self) -> bool:
        return bool(self.slots)

    def make_slots(self) -> None:
        """Add the zeroed slots (before compiling: the graphs must contain them)."""
        import torch
        from peft import LoraConfig
        from peft.utils.hotswap import prepare_model_for_compiled_hotswap

        transformer, rank = self.pipe.transformer, self.settings.lora_max_rank
        targets = sorted(
            name for name, module in transformer.named_modules() if type(module) is torch.nn.Linear
        )
        names = [SLOT.format(i) for i in range(self.settings.max_loras)]
        with warnings.catch_warnings():  # "multiple adapters": several slots is the design
            warnings.filterwarnings("ignore", "Already found a `peft_config`", UserWarning)
            for name in names:
                config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets)
                transformer.add_adapter(config, adapter_name=name)
        transformer.set_adapters(names)
        self.slots = [None] * len(names)
        for index in range(len(names)):
            self._zero(index)
        # Scalings become tensors, changed in place: a new adapter's alpha is no recompile.
        prepare_model_for_compiled_hotswap(transformer, target_rank=rank)
        transformer.disable_adapters()

    def apply(self, loras: tuple[LoraRef, ...]) -> float:
        """Put ``loras`` in the slots (or disable them all); the seconds it took."""
        if not loras and not self.slots:
            return 0.0
        start = time.perf_counter()
        if not self.slots:
            self.make_slots()
        try:
            for index in range(len(self.slots)):
                wanted = loras[index] if index < len(loras) else None
                self._fill(index, wanted)
        except Exception:
            self._reset()
            raise
        transformer = self.pipe.transformer
        if loras:
            transformer.enable_adapters()
        else:
            transformer.disable_adapters()
        return time.perf_counter() - start

    def _fill(self, index: int, lora: LoraRef | None) -> None:
        if lora is None:
            if self.slots[index] is not None:
                self._zero(index)
            return
        if self.slots[index] == (lora.identity, lora.scale):
            return
        state = self._load(lora)
        self.slots[index] = None  # until the swap is complete
        self._scale(index, None)
        try:
            self.pipe.load_lora_weights(dict(state), adapter_name=SLOT.format(index), hotswap=True)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise AdapterError(f"adapter '{lora.name}' does not fit this model: {exc}") from exc
        self._scale(index, lora.scale)
        self.slots[index] = (lora.identity, lora.scale)

    def _load(self, lora: LoraRef) -> dict[str, Any]:
        """The adapter's converted weights on the device, from the cache or the file."""
        cached = self.cache.get(lora.identity)
        if cached is not None:
            self.cache.move_to_end(lora.identity)
            self.hits += 1
            return cached[0]
        self.misses += 1
        start = time.perf_counter()
        try:
            state = self.pipe.lora_state_dict(lora.path, use_safetensors=True)
        except Exception as exc:
            raise AdapterError(f"adapter '{lora.name}' could not be read: {exc}") from exc
        state = {key: value.to(self.pipe.transformer.device) for key, value in state.items()}
        check_layers(lora.name, state, self.pipe.transformer, self.settings.lora_max_rank)
        size = sum(value.numel() * value.element_size() for value in state.values())
        self.cache[lora.identity] = (state, size)
        self._evict()
        self._load_s.append(time.perf_counter() - start)
        return state

    def report(self) -> AdapterStats:
        """The cache now, and the counts since the previous report."""
        hits, misses, evictions = self._reported
        stats = AdapterStats(
            loaded=len(self.cache),
            memory_bytes=sum(size for _, size in self.cache.values()),
            hits=self.hits - hits,
            misses=self.misses - misses,
            evictions=self.evictions - evictions,
            load_s=tuple(self._load_s),
        )
        self._reported = (self.hits, self.misses, self.evictions)
        self._load_s.clear()
        return stats

    def _evict(self) -> None:
        """Drop the least recently used beyond the count or memory bound (never the newest)."""
        settings = self.settings
        while len(self.cache) > 1 and (
            len(self.cache) > settings.lora_cache_size
            or sum(size for _, size in self.cache.values()) > settings.lora_cache_bytes
        ):
            self.cache.popitem(last=False)
            self.evictions += 1

    def _layers(self, index: int) -> list[Any]:
        from peft.tuners.lora import LoraLayer

        name = SLOT.format(index)
        return [
            module
            for module in self.pipe.transformer.modules()
            if isinstance(module, LoraLayer) and name in module.lora_A
        ]

    def _zero(self, index: int) -> None:
        name = SLOT.format(index)
        for module in self._layers(index):
            module.lora_A[name].weight.data.zero_()
            module.lora_B[name].weight.data.zero_()
        self.slots[index] = None

    def _scale(self, index: int, scale: float | None) -> None:
        """``None``: scalings back to 1 before a swap (so a multiplied one never lingers);
        a number: the request's scale on top of the alpha/rank the swap set."""
        name = SLOT.format(index)
        for module in self._layers(index):
            scaling = module.scaling[name]
            if scale is None:
                scaling.fill_(1.0)
            else:
                scaling.mul_(scale)

    def _reset(self) -> None:
        """After a failed swap no slot is trusted: zero them all."""
        for index in range(len(self.slots)):
            self._scale(index, None)
            self._zero(index)
        self.pipe.transformer.disable_adapters()

    def warm(self, render: Any) -> None:
        """Compile the adapters-on graphs too (zeroed slots), then switch them off again."""
        if not self.slots:
            return
        self.pipe.transformer.enable_adapters()
        try:
            render()
        finally:
            self.pipe.transformer.disable_adapters()


def check_layers(name: str, state: dict[str, Any], transformer: Any, max_rank: int) -> None:
    """Every key must name a layer of this transformer with matching sizes, rank <= the slots'."""
    import torch

    keys = [key for key in state if key.startswith(PREFIX)]
    if not keys:
        raise AdapterError(f"adapter '{name}' has no weights for this model's transformer")
    for key in keys:
        module_name, _, part = key.removeprefix(PREFIX).rpartition(".lora_")
        try:
            module = transformer.get_submodule(module_name)
        except AttributeError:
            module = None
        base = getattr(module, "base_layer", module)
        if not isinstance(base, torch.nn.Linear):
            raise AdapterError(
                f"adapter '{name}' targets '{module_name}', not a layer of this model"
            )
        shape = tuple(state[key].shape)
        if part == "A.weight":
            rank, size, expected = shape[0], shape[1], base.in_features
        elif part == "B.weight":
            rank, size, expected = shape[1], shape[0], base.out_features
        else:
            raise AdapterError(f"adapter '{name}' has a weight this server cannot apply: '{key}'")
        if size != expected:
            raise AdapterError(
                f"adapter '{name}' does not match this model: '{module_name}' has "
                f"{expected} features, the adapter {size}"
            )
        if rank > max_rank:
            raise AdapterError(
                f"adapter '{name}' has rank {rank}; this server takes at most {max_rank} "
                "(ZIMAGE_LORA_MAX_RANK)"
            )
