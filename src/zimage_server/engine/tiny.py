"""Build a tiny random Z-Image model in diffusers format.

The folder uses the real classes (ZImageTransformer2DModel, Qwen3Model, AutoencoderKL,
FlowMatchEulerDiscreteScheduler, a fast tokenizer with Qwen's chat template), so
``ZImagePipeline.from_pretrained`` loads it through exactly the code path of the real
weights. Weights are random but seeded: every build is byte-identical, which keeps
test images reproducible across machines.
"""

from __future__ import annotations

import json
from pathlib import Path

# Qwen3's chat template reduced to what ZImagePipeline uses: one user turn, a generation
# prompt, and the ``enable_thinking`` switch (False adds an empty think block).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif -%}{%- endif -%}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
TEXT_HIDDEN = 32
VOCAB_SIZE = 512
# FLUX.1 VAE latent statistics: the pipeline un-scales latents with them before decoding.
FLUX_VAE_SCALING = 0.3611
FLUX_VAE_SHIFT = 0.1159
_CORPUS = [
    "a photo of a cat sitting on a red chair in the morning light",
    "magazine cover, bold serif title, vivid magenta gradient, studio lighting",
    "ड्रैगन फ्रूट किसान भारत बाज़ार",
    "一幅创意海报 蒸汽小火车 冬日积雪 春天",
    "the quick brown fox jumps over the lazy dog 0123456789",
]


def build_tokenizer(out: Path) -> None:
    """Byte-level BPE: every UTF-8 string tokenizes, whatever its script."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=131072,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out / "tokenizer")


def build_text_encoder(out: Path, vocab_size: int) -> None:
    from transformers import Qwen3Config, Qwen3Model

    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
    )
    Qwen3Model(config).save_pretrained(out / "text_encoder")


def build_transformer(out: Path) -> None:
    from diffusers import ZImageTransformer2DModel

    model = ZImageTransformer2DModel(
        dim=64,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=TEXT_HIDDEN,
        axes_dims=[8, 12, 12],
    )
    model.save_pretrained(out / "transformer")


def build_vae(out: Path) -> None:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 16, 16),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=FLUX_VAE_SCALING,
        shift_factor=FLUX_VAE_SHIFT,
    )
    vae.save_pretrained(out / "vae")


def build_scheduler(out: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(out / "scheduler")


def write_model_index(out: Path) -> None:
    index = {
        "_class_name": "ZImagePipeline",
        "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen3Model"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "transformer": ["diffusers", "ZImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def build_tiny_model(out: Path, seed: int = 0) -> Path:
    """Write the tiny model to ``out`` (created if missing) and return it."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    build_tokenizer(out)
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(out / "tokenizer"))
    build_text_encoder(out, vocab)
    build_transformer(out)
    build_vae(out)
    build_scheduler(out)
    write_model_index(out)
    return out
