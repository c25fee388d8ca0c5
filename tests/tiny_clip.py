"""A tiny CLIP folder laid out as the hub's CLIP repositories (config.json, tokenizer.json, model.safetensors), with
random weights: what `wanalpha eval --clip-model` reads, built from a config (no network, no real weights)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

WORDS = (
    "a",
    "the",
    "red",
    "yellow",
    "circle",
    "triangle",
    "square",
    "moving",
    "right",
    "left",
    "up",
    "down",
    "growing",
    "shrinking",
    "with",
    "sharp",
    "soft",
    "edges",
    "transparent",
    "background",
    "disc",
    "cat",
)
TEXT = {
    "vocab_size": len(WORDS) + 3,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 16,
    "hidden_act": "quick_gelu",
    "eos_token_id": 2,
}
VISION = {
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "hidden_act": "quick_gelu",
}


def write_tokenizer(path: Path) -> None:
    """A word-level CLIP-like tokenizer: lower-cased words, <|startoftext|> … <|endoftext|> (the largest id, as in
    CLIP's vocabulary, so the legacy end-token rule finds it)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", vocab["<|startoftext|>"]), ("<|endoftext|>", vocab["<|endoftext|>"])],
    )
    tokenizer.save(str(path))


def write_tiny_clip(folder: Path, seed: int = 0) -> Path:
    from wanalpha.checkpoints.clip import read_config
    from wanalpha.models.clip import CLIPModel

    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "clip", "projection_dim": 16, "text_config": TEXT, "vision_config": VISION}
    (folder / "config.json").write_text(json.dumps(config))
    write_tokenizer(folder / "tokenizer.json")
    torch.manual_seed(seed)
    model = CLIPModel(read_config(folder / "config.json"))
    for name, p in model.named_parameters():  # LayerNorm ones and zero biases would hide mistakes: perturb all
        with torch.no_grad():
            p.add_(torch.randn_like(p) * (0.2 if "norm" in name else 0.02))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return folder
