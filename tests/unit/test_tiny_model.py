"""The tiny model is a real diffusers folder: the stock pipeline loads and runs it."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import torch
from diffusers import ZImagePipeline


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(path.relative_to(folder).as_posix().encode() + path.read_bytes())
    return h.hexdigest()


def test_stock_pipeline_renders_a_batch_of_different_lengths(tiny_model_dir: Path) -> None:
    pipe = ZImagePipeline.from_pretrained(tiny_model_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        ["a cat", "ड्रैगन फ्रूट किसान, a much longer prompt about a farmer and his harvest"],
        height=256,
        width=256,
        num_inference_steps=2,
        guidance_scale=0.0,
        generator=[torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)],
    ).images
    assert [im.size for im in images] == [(256, 256), (256, 256)]
    assert images[0].tobytes() != images[1].tobytes()


def test_tokenizer_has_the_chat_template_the_pipeline_uses(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=True,
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_cli_builds_the_same_model_every_time(tiny_model_dir: Path, tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "zimage_server", "tiny-model", str(tmp_path / "m")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert _digest(tmp_path / "m") == _digest(tiny_model_dir)
