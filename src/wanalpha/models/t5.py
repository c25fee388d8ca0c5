"""The UMT5-XXL text encoder in Wan's own layout (upstream `wan/modules/t5.py::T5Encoder`), state-dict compatible
with `models_t5_umt5-xxl-enc-bf16.pth`, the tokenizer wrapper (upstream `HuggingfaceTokenizer`), and TextEncoder:
the two together, as the pipelines encode prompts.

Numerics (reference NOTES §3): no attention scaling (T5), a relative position bias per block (shared_pos=False,
bidirectional buckets), masked keys' bias SET to finfo.min, softmax in float32, T5LayerNorm without mean subtraction,
gated tanh-GELU feed-forward, no biases. Every position is computed (padded queries too), as upstream.
"""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class T5Config:
    """Upstream `_t5` settings; the defaults are umt5-xxl's."""

    vocab_size: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    shared_pos: bool = False
    relative_max_dist: int = 128
    eps: float = 1e-6


class T5LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.type_as(self.weight)
        return self.weight * x


class RelativePositionBias(nn.Module):
    """Bidirectional bucketed relative positions (key − query) → an additive (1, heads, Lq, Lk) bias."""

    def __init__(self, num_buckets: int, num_heads: int, max_dist: int = 128) -> None:
        super().__init__()
        self.num_buckets, self.max_dist = num_buckets, max_dist
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def buckets(self, rel: torch.Tensor) -> torch.Tensor:
        half = self.num_buckets // 2
        out = (rel > 0).long() * half
        rel = rel.abs()
        exact = half // 2
        large = exact + (torch.log(rel.float() / exact) / math.log(self.max_dist / exact) * (half - exact)).long()
        large = torch.clamp(large, max=half - 1)
        return out + torch.where(rel < exact, rel, large)

    def forward(self, lq: int, lk: int) -> torch.Tensor:
        device = self.embedding.weight.device
        rel = torch.arange(lk, device=device)[None, :] - torch.arange(lq, device=device)[:, None]
        return self.embedding(self.buckets(rel)).permute(2, 0, 1).unsqueeze(0).contiguous()


class T5Attention(nn.Module):
    def __init__(self, dim: int, dim_attn: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v = (nn.Linear(dim, dim_attn, bias=False) for _ in range(3))
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, pos_bias: torch.Tensor) -> torch.Tensor:
        b, n = x.shape[0], self.num_heads
        q, k, v = (proj(x).view(b, -1, n, proj.out_features // n) for proj in (self.q, self.k, self.v))
        bias = x.new_zeros(b, n, q.shape[1], k.shape[1]) + pos_bias
        if mask is not None:
            bias = bias.masked_fill(mask.view(b, 1, 1, -1) == 0, torch.finfo(x.dtype).min)
        logits = torch.einsum("binc,bjnc->bnij", q, k) + bias  # no 1/√d: the T5 convention
        weights = F.softmax(logits.float(), dim=-1).type_as(logits)
        return self.o(torch.einsum("bnij,bjnc->binc", weights, v).reshape(b, -1, n * v.shape[-1]))


class T5FeedForward(nn.Module):
    def __init__(self, dim: int, dim_ffn: int) -> None:
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.norm1 = T5LayerNorm(cfg.dim, cfg.eps)
        self.attn = T5Attention(cfg.dim, cfg.dim_attn, cfg.num_heads)
        self.norm2 = T5LayerNorm(cfg.dim, cfg.eps)
        self.ffn = T5FeedForward(cfg.dim, cfg.dim_ffn)
        self.pos_embedding = None
        if not cfg.shared_pos:  # one relative position bias per block (umt5)
            self.pos_embedding = RelativePositionBias(cfg.num_buckets, cfg.num_heads, cfg.relative_max_dist)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, pos_bias: torch.Tensor | None) -> torch.Tensor:
        bias = pos_bias if self.pos_embedding is None else self.pos_embedding(x.shape[1], x.shape[1])
        x = _fp16_clamp(x + self.attn(self.norm1(x), mask, bias))
        return _fp16_clamp(x + self.ffn(self.norm2(x)))


def _fp16_clamp(x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.float16 and torch.isinf(x).any():
        limit = torch.finfo(x.dtype).max - 1000
        x = torch.clamp(x, min=-limit, max=limit)
    return x


class UMT5Encoder(nn.Module):
    """ids (B,L) int64 and mask (B,L) → hidden states (B,L,dim); every position is computed."""

    def __init__(self, config: T5Config | None = None) -> None:
        super().__init__()
        self.config = cfg = config or T5Config()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_embedding = (
            RelativePositionBias(cfg.num_buckets, cfg.num_heads, cfg.relative_max_dist) if cfg.shared_pos else None
        )
        self.blocks = nn.ModuleList(T5Block(cfg) for _ in range(cfg.num_layers))
        self.norm = T5LayerNorm(cfg.dim, cfg.eps)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.token_embedding(ids)
        bias = self.pos_embedding(x.shape[1], x.shape[1]) if self.pos_embedding is not None else None
        for block in self.blocks:
            x = block(x, mask, bias)
        return self.norm(x)


# ------------------------------------------------------------------------------------------------ tokenizer


def clean_text(text: str) -> str:
    """Upstream `whitespace` cleaning: ftfy.fix_text, html.unescape twice, strip, collapse whitespace."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:  # ftfy only repairs mojibake; plain prompts are unaffected
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class T5Tokenizer:
    """The umt5-xxl tokenizer from a model folder's `google/umt5-xxl/tokenizer.json` (the `tokenizers` library):
    cleaned text, EOS appended, truncated and padded (id 0) to text_len."""

    def __init__(self, path: str | Path, text_len: int = 512) -> None:
        from tokenizers import Tokenizer

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            from wanalpha.errors import WanAlphaError

            raise WanAlphaError(
                f"tokenizer file {file} does not exist; it comes with the Wan2.1 model folder "
                "(google/umt5-xxl/tokenizer.json)"
            )
        self.tokenizer = Tokenizer.from_file(str(file))
        self.tokenizer.enable_truncation(max_length=text_len)
        self.tokenizer.enable_padding(length=text_len, pad_id=0)
        self.text_len = text_len

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask), both (B, text_len) int64."""
        encodings = self.tokenizer.encode_batch([clean_text(t) for t in texts], add_special_tokens=True)
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.int64)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.int64)
        return ids, mask


class TextEncoder:
    """Prompts → UMT5 states, as every pipeline encodes text (upstream `T5EncoderModel.__call__`): the tokenizer's
    cleaning, EOS, truncation and zero padding to its text_len; every position computed with the padding masked; each
    prompt's states trimmed to its true length (incl. EOS). The DiT pads them back to its text_len with zeros."""

    def __init__(self, encoder: UMT5Encoder, tokenizer: T5Tokenizer) -> None:
        self.encoder, self.tokenizer = encoder, tokenizer

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> list[torch.Tensor]:
        """One batch of prompts → one (length_i, dim) tensor each, on the encoder's device, in its dtype."""
        device = self.encoder.token_embedding.weight.device  # read per call: a BlockStreamer may have moved it
        ids, mask = self.tokenizer(texts)
        hidden = self.encoder(ids.to(device), mask.to(device))
        return [h[: int(n)] for h, n in zip(hidden, mask.sum(dim=1), strict=True)]
