"""CLIP (Radford et al. 2021) for `wanalpha eval`'s text–video score: a ViT image tower and a causal text transformer,
each ending in a linear projection into one embedding space.

Parameter names are those of the Hugging Face CLIP checkpoints (`text_model.…`, `vision_model.…`,
`text_projection`, `visual_projection`, `logit_scale`; its spelling `pre_layrnorm` included), so their
model.safetensors / pytorch_model.bin load as they are (wanalpha.checkpoints.clip). Numerics as there: pre-norm
blocks, attention scaled by 1/√d, quick-GELU (x·σ(1.702x)) for the OpenAI models, the text's causal mask plus its
padding mask, the text embedding taken at the end-of-text token, the image embedding at the class token after
post_layernorm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class CLIPTowerConfig:
    """One tower. Defaults: the text tower of openai/clip-vit-base-patch32 (vision: CLIPConfig's defaults)."""

    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # text only
    vocab_size: int = 49408
    max_position_embeddings: int = 77
    eos_token_id: int = 2  # 2: the legacy rule, the end-of-text token is the sequence's largest id
    # vision only
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3


def _vision_default() -> CLIPTowerConfig:
    return CLIPTowerConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12)


@dataclass(frozen=True)
class CLIPConfig:
    text: CLIPTowerConfig = field(default_factory=CLIPTowerConfig)
    vision: CLIPTowerConfig = field(default_factory=_vision_default)
    projection_dim: int = 512


def _activation(name: str):
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name == "gelu":
        return F.gelu
    if name == "gelu_new":
        return lambda x: F.gelu(x, approximate="tanh")
    raise ValueError(f"unsupported CLIP activation {name!r} (quick_gelu, gelu or gelu_new)")


class CLIPAttention(nn.Module):
    def __init__(self, config: CLIPTowerConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.heads = config.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, dim = x.shape
        q, k, v = (
            p(x).view(b, n, self.heads, dim // self.heads).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1 / math.sqrt(dim // self.heads))
        return self.out_proj(out.transpose(1, 2).reshape(b, n, dim))


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPTowerConfig) -> None:
        super().__init__()
        self.act = _activation(config.hidden_act)
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: CLIPTowerConfig) -> None:
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTowerConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, mask)
        return x


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config: CLIPTowerConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)


class CLIPTextTransformer(nn.Module):
    def __init__(self, config: CLIPTowerConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """ids, attention_mask (B,L) → the pooled (B, hidden) state at each sequence's end-of-text token."""
        b, n = ids.shape
        x = self.embeddings.token_embedding(ids) + self.embeddings.position_embedding.weight[:n]  # (B,L,D)
        causal = torch.ones(n, n, dtype=torch.bool, device=ids.device).tril()
        mask = causal[None, None] & attention_mask.bool()[:, None, None, :]  # (B,1,L,L)
        x = self.final_layer_norm(self.encoder(x, mask))
        if self.config.eos_token_id == 2:  # legacy configs: the end-of-text token has the largest id
            eos = ids.argmax(dim=-1)
        else:
            eos = (ids == self.config.eos_token_id).int().argmax(dim=-1)
        return x[torch.arange(b, device=ids.device), eos]


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, config: CLIPTowerConfig) -> None:
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(config.hidden_size))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, config.patch_size, stride=config.patch_size, bias=False
        )
        patches = (config.image_size // config.patch_size) ** 2
        self.position_embedding = nn.Embedding(patches + 1, config.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (B, patches, D)
        cls = self.class_embedding.expand(len(x), 1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight


class CLIPVisionTransformer(nn.Module):
    def __init__(self, config: CLIPTowerConfig) -> None:
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels (B,3,S,S) → the pooled (B, hidden) class-token state."""
        x = self.encoder(self.pre_layrnorm(self.embeddings(pixels)))
        return self.post_layernorm(x[:, 0])


class CLIPModel(nn.Module):
    def __init__(self, config: CLIPConfig = CLIPConfig()) -> None:  # noqa: B008 - frozen dataclass
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config.text)
        self.vision_model = CLIPVisionTransformer(config.vision)
        self.text_projection = nn.Linear(config.text.hidden_size, config.projection_dim, bias=False)
        self.visual_projection = nn.Linear(config.vision.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def text_features(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B,L) token ids and mask → (B, projection_dim) text embeddings (not normalised)."""
        return self.text_projection(self.text_model(ids, attention_mask))

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B,3,S,S) normalised pixels → (B, projection_dim) image embeddings (not normalised)."""
        return self.visual_projection(self.vision_model(pixels))
