"""Prompt encoding: the pipeline's own tokenizer and text encoder, without stock's waste.

Stock ``ZImagePipeline.encode_prompt`` pads every prompt to 512 tokens and then keeps only
the real tokens: a 30-token prompt pays for 512 through a 4B-parameter encoder. Here a
batch is padded to its longest prompt, rounded up to a bucket (so a compiled or
cuDNN-planned encoder sees few distinct shapes). The text encoder is causal and padding
sits after the real tokens, so the kept embeddings are the same computation. The empty CFG
negative is encoded once and kept.

Three sources, in order: prompts prefetched while the previous batch was denoising
(``prefetch``, run from another thread), a small LRU cache of recent prompts, and the
encoder itself. The first two are keyed by ``Prompt`` (tenant and text): one tenant's
prompts are never served from another's, so a fast encode reveals nothing across keys.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from zimage_server.engine.protocol import Prompt

MAX_SEQUENCE_LENGTH = 512  # Z-Image's text window; longer prompts are truncated.
PREFETCH_LIMIT = 64  # embeddings encoded ahead and not yet used


def chat_text(tokenizer: Any, prompt: str) -> str:
    """Wrap a prompt in the chat template exactly as ``ZImagePipeline._encode_prompt`` does."""
    messages = [{"role": "user", "content": prompt}]
    text: str = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    return text


def as_prompt(prompt: str | Prompt) -> Prompt:
    return prompt if isinstance(prompt, Prompt) else Prompt("", prompt)


class PromptEncoder:
    """Encodes prompt batches to per-prompt embeddings (only the real tokens kept).

    ``bucket`` = 0 reproduces stock padding (every prompt to 512 tokens). Thread-safe:
    the render thread calls ``encode``, a prefetch thread ``prefetch``.
    """

    def __init__(self, tokenizer: Any, text_encoder: Any, bucket: int, cache_size: int) -> None:
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.bucket, self.cache_size = bucket, cache_size
        self._cache: OrderedDict[Prompt, Any] = OrderedDict()
        self._prefetched: OrderedDict[Prompt, Any] = OrderedDict()
        self._in_flight: dict[Prompt, threading.Event] = {}
        self._lock = threading.Lock()
        self._empty: Any = None  # the CFG negative, kept whatever the cache size
        self.hits = 0  # prompts served from the LRU cache
        self.padded_tokens = 0  # tokens through the encoder in the last call (padding included)
        self.sources: list[str] = []  # per prompt of the last call: encoded | cache | prefetch

    def encode(self, texts: Sequence[str | Prompt]) -> list[Any]:
        """One embedding tensor ``(tokens, hidden)`` per prompt, in order (a bare string
        is a prompt of the anonymous tenant)."""
        prompts = [as_prompt(p) for p in texts]
        self._await_prefetch(prompts)
        found: dict[Prompt, tuple[Any, str]] = {}
        with self._lock:
            for prompt in dict.fromkeys(prompts):
                if prompt in self._prefetched:
                    found[prompt] = (self._prefetched.pop(prompt), "prefetch")
                elif prompt in self._cache:
                    self._cache.move_to_end(prompt)
                    found[prompt] = (self._cache[prompt], "cache")
        missing = [p for p in dict.fromkeys(prompts) if p not in found]
        self.padded_tokens = 0
        if missing:
            embeddings, self.padded_tokens = self._run([p.text for p in missing])
            found.update(zip(missing, ((e, "encoded") for e in embeddings), strict=True))
        with self._lock:
            for prompt, (embedding, source) in found.items():
                if source != "cache":
                    self._remember(prompt, embedding)
        self.sources = [found[p][1] for p in prompts]
        self.hits += self.sources.count("cache")
        return [found[p][0] for p in prompts]

    def negatives(self, count: int) -> list[Any]:
        """The empty prompt's embedding ``count`` times: CFG's negative, encoded once."""
        if self._empty is None:
            (self._empty,), _tokens = self._run([""])
        return [self._empty] * count

    def prefetch(self, texts: Sequence[str | Prompt], publish: Callable[[list[Any]], None]) -> int:
        """Encode prompts ahead of their batch; ``publish`` runs before others may use them
        (on a GPU it waits for the side stream). Returns how many were encoded."""
        prompts = [as_prompt(p) for p in texts]
        with self._lock:
            todo = [
                p
                for p in dict.fromkeys(prompts)
                if p not in self._cache and p not in self._prefetched and p not in self._in_flight
            ]
            for prompt in todo:
                self._in_flight[prompt] = threading.Event()
        if not todo:
            return 0
        try:
            embeddings, _tokens = self._run([p.text for p in todo])
            publish(embeddings)
            with self._lock:
                self._prefetched.update(zip(todo, embeddings, strict=True))
                while len(self._prefetched) > PREFETCH_LIMIT:
                    self._prefetched.popitem(last=False)
        finally:
            with self._lock:
                for prompt in todo:
                    self._in_flight.pop(prompt).set()
        return len(todo)

    def _await_prefetch(self, prompts: list[Prompt]) -> None:
        """A prompt being prefetched right now is nearly done: wait rather than encode twice."""
        with self._lock:
            events = [self._in_flight[p] for p in prompts if p in self._in_flight]
        for event in events:
            event.wait()

    def _remember(self, prompt: Prompt, embedding: Any) -> None:
        if self.cache_size <= 0:
            return
        self._cache[prompt] = embedding
        self._cache.move_to_end(prompt)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def _run(self, prompts: list[str]) -> tuple[list[Any], int]:
        """Embeddings of ``prompts``, and the tokens that went through (padding included)."""
        texts = [chat_text(self.tokenizer, p) for p in prompts]
        if self.bucket:
            padding: dict[str, Any] = {"padding": "longest", "pad_to_multiple_of": self.bucket}
        else:
            padding = {"padding": "max_length"}
        inputs = self.tokenizer(
            texts,
            max_length=MAX_SEQUENCE_LENGTH,
            truncation=True,
            return_tensors="pt",
            **padding,
        )
        device = self.text_encoder.device
        ids = inputs.input_ids.to(device)
        mask = inputs.attention_mask.to(device).bool()
        hidden = self.text_encoder(
            input_ids=ids, attention_mask=mask, output_hidden_states=True
        ).hidden_states[-2]
        return [hidden[i][mask[i]] for i in range(len(prompts))], int(ids.numel())
