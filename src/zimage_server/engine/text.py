"""Prompt encoding: the pipeline's own tokenizer and text encoder, without stock's waste.

Stock ``ZImagePipeline.encode_prompt`` pads every prompt to 512 tokens and then keeps only
the real tokens: a 30-token prompt pays for 512 through a 4B-parameter encoder. Here a
batch is padded to its longest prompt, rounded up to a bucket (so a compiled or
cuDNN-planned encoder sees few distinct shapes). The text encoder is causal and padding
sits after the real tokens, so the kept embeddings are the same computation. The empty
negative prompt (CFG) is encoded once, and recent prompts are kept in a small LRU cache.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

MAX_SEQUENCE_LENGTH = 512  # Z-Image's text window; longer prompts are truncated.


def chat_text(tokenizer: Any, prompt: str) -> str:
    """Wrap a prompt in the chat template exactly as ``ZImagePipeline._encode_prompt`` does."""
    messages = [{"role": "user", "content": prompt}]
    text: str = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    return text


class PromptEncoder:
    """Encodes prompt batches to per-prompt embeddings (only the real tokens kept).

    ``bucket`` = 0 reproduces stock padding (every prompt to 512 tokens).
    """

    def __init__(self, tokenizer: Any, text_encoder: Any, bucket: int, cache_size: int) -> None:
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.bucket, self.cache_size = bucket, cache_size
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self.hits = 0
        self.padded_tokens = 0  # tokens through the encoder in the last call (padding included)

    def encode(self, prompts: list[str]) -> list[Any]:
        """One embedding tensor ``(tokens, hidden)`` per prompt, in order."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        self.hits += len(prompts) - sum(prompts.count(p) for p in missing)
        self.padded_tokens = 0
        fresh = dict(zip(missing, self._run(missing), strict=True)) if missing else {}
        found = {p: fresh[p] if p in fresh else self._touch(p) for p in prompts}
        for prompt, embedding in fresh.items():
            self._remember(prompt, embedding)
        return [found[p] for p in prompts]

    def _touch(self, prompt: str) -> Any:
        self._cache.move_to_end(prompt)
        return self._cache[prompt]

    def _remember(self, prompt: str, embedding: Any) -> None:
        if self.cache_size <= 0:
            return
        self._cache[prompt] = embedding
        self._cache.move_to_end(prompt)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def _run(self, prompts: list[str]) -> list[Any]:
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
        self.padded_tokens = int(ids.numel())
        hidden = self.text_encoder(
            input_ids=ids, attention_mask=mask, output_hidden_states=True
        ).hidden_states[-2]
        return [hidden[i][mask[i]] for i in range(len(prompts))]
