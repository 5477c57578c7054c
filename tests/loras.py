"""LoRA adapters for the tests, made with PEFT against the tiny model's own transformer.

Saved as safetensors in diffusers' layout (``save_lora_weights``) or a kohya-style one
(``lora_unet_<module>.lora_down/lora_up/alpha``, as sd-scripts and ai-toolkit write them),
which diffusers converts for Z-Image.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import ZImagePipeline, ZImageTransformer2DModel
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import save_file

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
FEED_FORWARD = ["w1", "w2", "w3"]


def adapter_weights(
    model_dir: Path, targets: list[str], rank: int, seed: int
) -> dict[str, torch.Tensor]:
    """PEFT's state dict of a random (non-zero) LoRA on the tiny transformer's ``targets``."""
    transformer = ZImageTransformer2DModel.from_pretrained(model_dir / "transformer")
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False)
    transformer.add_adapter(config, adapter_name="test")
    weights: dict[str, torch.Tensor] = get_peft_model_state_dict(transformer, adapter_name="test")
    return {key: value.contiguous() for key, value in weights.items()}


def save_diffusers(weights: dict[str, torch.Tensor], folder: Path) -> Path:
    """``folder/pytorch_lora_weights.safetensors``, as diffusers saves it."""
    ZImagePipeline.save_lora_weights(folder, transformer_lora_layers=weights)
    return folder / "pytorch_lora_weights.safetensors"


def save_kohya(weights: dict[str, torch.Tensor], file: Path) -> Path:
    """The same adapter with kohya-style names (alpha = rank, so the same scaling)."""
    kohya: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        module, _, part = key.rpartition(".lora_")
        stem = "lora_unet_" + module.replace(".", "_")
        kohya[f"{stem}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = value
        if part.startswith("A"):
            kohya[f"{stem}.alpha"] = torch.tensor(float(value.shape[0]))
    file.parent.mkdir(parents=True, exist_ok=True)
    save_file(kohya, str(file))
    return file


def save_mismatched(file: Path, rank: int = 4) -> Path:
    """A LoRA for a wider model: the tiny transformer's layer names, other sizes."""
    torch.manual_seed(0)
    weights = {
        "transformer.layers.0.attention.to_q.lora_A.weight": torch.randn(rank, 3840),
        "transformer.layers.0.attention.to_q.lora_B.weight": torch.randn(3840, rank),
    }
    file.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(file))
    return file
