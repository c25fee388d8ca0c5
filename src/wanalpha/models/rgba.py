"""The RGB-alpha VAE of Wan-Alpha (arXiv 2509.24979 §3.1): one frozen Wan2.1 encoder, a FeatureMergeBlock, and two
frozen Wan2.1 decoders with their own LoRA (`decoder.bin`: `vae_fgr.` → rgb_decoder, `vae_pha.` → alpha_decoder).

    rgb (rendered over its background colour) ─encoder─▶ z_rgb   ┐
    alpha (replicated to 3 channels)          ─encoder─▶ z_alpha ┴─cat (32 ch)─▶ merge ─▶ z (16 ch, normalised)
    z ─rgb_decoder─▶ rgb,  z ─alpha_decoder─▶ alpha (3 channels; their mean is the alpha)

v1 (seed spec): the merge block works on the two NORMALISED latents and outputs the normalised latent the DiT
learns; decoding de-normalises inside each decoder, as the official v1 inference does.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from wanalpha.models.vae import (
    AttentionBlock,
    CausalCache,
    CausalConv3d,
    DecoderPair,
    ResidualBlock,
    RMSNorm,
    VAEConfig,
    WanVAE,
)


class FeatureMergeBlock(nn.Module):
    """concat(RGB latent, alpha latent) → causal conv 32→192 → 3 × (residual block + attention) → causal conv → 16.

    Causal in time (front-padded convs, per-frame attention), so it can run whole-sequence or chunked with a
    `CausalCache` like the VAE; about 6.7M parameters at the defaults.
    """

    def __init__(
        self, in_dim: int = 32, dim: int = 192, out_dim: int = 16, num_blocks: int = 3, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.sizes = {"in_dim": in_dim, "dim": dim, "out_dim": out_dim, "num_blocks": num_blocks}
        self.conv_in = CausalConv3d(in_dim, dim, 3, padding=1)
        self.blocks = nn.ModuleList(ResidualBlock(dim, dim, dropout) for _ in range(num_blocks))
        self.attentions = nn.ModuleList(AttentionBlock(dim) for _ in range(num_blocks))
        self.conv_out = CausalConv3d(dim, out_dim, 3, padding=1)
        # Training: keep only the inputs and recompute the activations in the backward pass (latent-resolution, but
        # ~35 activations of 192 channels per latent frame would otherwise grow with the clip).
        self.gradient_checkpointing = False

    @torch.no_grad()
    def init_identity(self) -> FeatureMergeBlock:
        """Start as the identity on the RGB latent: conv_in copies the RGB latent into the first out_dim channels
        (current-frame centre tap), every residual branch and attention projection ends at zero, and conv_out
        reads those channels back. The decoders and the DiT then see familiar latents from the first step (and
        the output keeps their scale); the rest of conv_in stays random, so every weight gets a gradient."""
        n = self.sizes["out_dim"]
        eye = torch.eye(n, dtype=self.conv_in.weight.dtype)
        self.conv_in.weight[:n].zero_()
        self.conv_in.weight[:n, :n, -1, 1, 1] = eye
        self.conv_in.bias[:n].zero_()
        for block in self.blocks:
            block.residual[-1].weight.zero_()
            block.residual[-1].bias.zero_()
        for attention in self.attentions:
            attention.proj.weight.zero_()
            attention.proj.bias.zero_()
        self.conv_out.weight.zero_()
        self.conv_out.weight[:, :n, -1, 1, 1] = eye
        self.conv_out.bias.zero_()
        return self

    def forward(
        self, rgb_latent: torch.Tensor, alpha_latent: torch.Tensor, cache: CausalCache | None = None
    ) -> torch.Tensor:
        if self.gradient_checkpointing and cache is None and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(self._forward, rgb_latent, alpha_latent, use_reentrant=False)
        return self._forward(rgb_latent, alpha_latent, cache)

    def _forward(
        self, rgb_latent: torch.Tensor, alpha_latent: torch.Tensor, cache: CausalCache | None = None
    ) -> torch.Tensor:
        x = torch.cat([rgb_latent, alpha_latent], dim=1).to(self.conv_in.weight.dtype)  # (B, 32, T, h, w)
        x = self.conv_in(x, cache)  # (B, 192, T, h, w)
        for block, attention in zip(self.blocks, self.attentions, strict=True):
            x = attention(block(x, cache))
        return self.conv_out(x, cache)  # (B, 16, T, h, w)


class _MergeBody(nn.Module):
    """Upstream `BlockWCausal`: conv1 (1×1×1) → Res, Attn, Res, Attn, Res → RMSNorm, SiLU, causal conv → out."""

    def __init__(self, in_dim: int, out_dim: int, mid_dim: int, dropout: float) -> None:
        super().__init__()
        self.conv1 = CausalConv3d(in_dim, mid_dim, 1)
        self.middle = nn.Sequential(
            ResidualBlock(mid_dim, mid_dim, dropout),
            AttentionBlock(mid_dim),
            ResidualBlock(mid_dim, mid_dim, dropout),
            AttentionBlock(mid_dim),
            ResidualBlock(mid_dim, mid_dim, dropout),
        )
        self.head = nn.Sequential(
            RMSNorm(mid_dim, images=False), nn.SiLU(), CausalConv3d(mid_dim, out_dim, 3, padding=1)
        )


class EncoderFeatureMerge(nn.Module):
    """Wan-Alpha v2.0's merge module (upstream `Mapping`; NOTES §10.3): the Wan2.1 encoder's pre-head features of the
    RGB render and of the alpha video, concatenated (B, 768, T, h, w) → the RAW merged latent (B, 16, T, h, w).
    State-dict keys = the release file's `middle.*` entries without `middle.`. Causal in time: the whole-sequence
    form here equals the official one-latent-frame-at-a-time loop (or pass a CausalCache and stream)."""

    def __init__(self, in_dim: int = 768, out_dim: int = 16, mid_dim: int = 384, dropout: float = 0.0) -> None:
        super().__init__()
        self.sizes = {"in_dim": in_dim, "out_dim": out_dim, "mid_dim": mid_dim}
        self.block = _MergeBody(in_dim, out_dim, mid_dim, dropout)

    def forward(self, features: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        x = self.block.conv1(features.to(self.block.conv1.weight.dtype), cache)  # (B, 384, T, h, w)
        for layer in self.block.middle:
            x = layer(x, cache)
        x = self.block.head[1](self.block.head[0](x))
        return self.block.head[2](x, cache)  # (B, 16, T, h, w), raw


class RGBAlphaVAE(nn.Module):
    """Encoder (frozen), merge (trainable), rgb_decoder and alpha_decoder (frozen, LoRA merged into their weights).
    Inference decodes both decoders a latent frame at a time, on a CUDA GPU side by side on two streams
    (`side_stream`), else one after the other; `decode(..., dual=True)` runs them as one batch of two
    (`vae.DecoderPair`), the same values to float32 rounding, measured slower and heavier on an H100
    (docs/benchmarks.md)."""

    def __init__(
        self,
        config: VAEConfig | None = None,
        merge: nn.Module | None = None,
        with_encoder: bool = True,
        with_decoders: bool = True,
        variant: str = "v1",
    ) -> None:
        super().__init__()
        config = config or VAEConfig()
        if variant not in ("v1", "v2"):
            raise ValueError(f"variant must be 'v1' or 'v2', not {variant!r}")
        self.variant = variant
        # Parts can be left out: no encoder when training from cached latents, no decoders when only encoding.
        self.encoder = WanVAE(config, with_decoder=False) if with_encoder else None
        if merge is None and variant == "v1":
            merge = FeatureMergeBlock(in_dim=2 * config.z_dim, out_dim=config.z_dim)
        elif merge is None:  # v2 merges the encoder's 4·dim-channel features of both videos
            merge = EncoderFeatureMerge(in_dim=8 * config.dim, out_dim=config.z_dim, mid_dim=4 * config.dim)
        self.merge = merge
        self.rgb_decoder = WanVAE(config, with_encoder=False) if with_decoders else None
        self.alpha_decoder = WanVAE(config, with_encoder=False) if with_decoders else None
        for frozen in (self.encoder, self.rgb_decoder, self.alpha_decoder):
            if frozen is not None:
                frozen.requires_grad_(False)

    def encode_latents(self, rgb: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two normalised latents the merge block takes (what `wanalpha cache` stores)."""
        if self.encoder is None:
            raise RuntimeError("this RGBAlphaVAE was built without its encoder (with_encoder=False)")
        if alpha.shape[1] == 1:
            alpha = alpha.expand(-1, 3, -1, -1, -1)
        return self.encoder.encode(rgb), self.encoder.encode(alpha)

    def encode_raw_v2(self, rgb: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """v2: the encoder's pre-head features of both videos (RGB first) through EncoderFeatureMerge → the RAW
        merged latent m, what the v2 VAE losses use."""
        if self.encoder is None:
            raise RuntimeError("this RGBAlphaVAE was built without its encoder (with_encoder=False)")
        if alpha.shape[1] == 1:
            alpha = alpha.expand(-1, 3, -1, -1, -1)
        features = torch.cat([self.encoder.encode_features(rgb), self.encoder.encode_features(alpha)], dim=1)
        return self.merge(features)

    def encode(self, rgb: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """rgb (B,3,T,H,W) already rendered over its background colour, alpha (B,1|3,T,H,W), both in [-1,1]
        → merged latent (B,16,T_lat,H/8,W/8) in the normalised space (the DiT's): v1 merges the two normalised
        latents; v2 normalises its raw merged latent with the Wan2.1 mean/std (DESIGN §3)."""
        if self.variant == "v2":
            m = self.encode_raw_v2(rgb, alpha)
            mean, inv_std = self.encoder._stats(m)
            return (m.float() - mean) * inv_std
        return self.merge(*self.encode_latents(rgb, alpha))

    def decode(
        self,
        z: torch.Tensor,
        raw: bool = False,
        tile_size: tuple[int, int] | None = None,
        dual: bool = False,
        side_stream: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Merged (normalised) latent → (rgb (B,3,T,H,W), alpha (B,1,T,H,W)), float32, clamped to [-1,1]; alpha is
        the mean of the alpha decoder's 3 clamped channels. raw=True: both decoders' unclamped 3-channel outputs.
        tile_size: opt-in tiled decoding (see WanVAE.decode). dual: both decoders as one batch of two where that
        applies (`dual_applies`), else one after the other; the same values either way (to float32
        rounding: cuDNN may pick other algorithms for the halves). side_stream: the two decoders side by side on
        two CUDA streams where that applies (`side_stream_applies`; the same kernels and values)."""
        chunks = self._together(z, tile_size, dual, side_stream)
        if chunks is not None:
            rgb, alpha = (torch.cat(side, dim=2) for side in zip(*chunks, strict=True))
        else:
            rgb = self.rgb_decoder.decode(z, tile_size=tile_size)
            alpha = self.alpha_decoder.decode(z, tile_size=tile_size)
        if raw:
            return rgb, alpha
        return _finish(rgb, alpha)

    def decode_frames(
        self, z: torch.Tensor, tile_size: tuple[int, int] | None = None, dual: bool = False, side_stream: bool = True
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """decode() a chunk at a time (WanVAE.decode_frames): both decoders advance one latent frame together (one
        batch of two, side by side on two CUDA streams, or in turn), and each (rgb, alpha) chunk equals the matching
        frames of decode()'s, so that writing can start on the first frames while the rest decode
        (wanalpha.outputs)."""
        chunks = self._together(z, tile_size, dual, side_stream)
        if chunks is None:
            rgb_chunks = self.rgb_decoder.decode_frames(z, tile_size=tile_size)
            chunks = zip(rgb_chunks, self.alpha_decoder.decode_frames(z, tile_size=tile_size), strict=True)
        for rgb, alpha in chunks:
            yield _finish(rgb, alpha)

    def _together(
        self, z: torch.Tensor, tile_size: tuple[int, int] | None, dual: bool, side_stream: bool
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]] | None:
        """Each latent frame's raw (rgb, alpha) chunks where the two decoders run together (one batch of two, or
        side by side on two CUDA streams); None where they run one after the other."""
        if self.dual_applies(dual, tile_size):
            return DecoderPair(self.rgb_decoder, self.alpha_decoder).frames(z)
        if self.side_stream_applies(side_stream, z, tile_size):
            return self._side_by_side(z)
        return None

    def dual_applies(self, dual: bool, tile_size: tuple[int, int] | None = None) -> bool:
        """Whether decode(dual=True) runs both decoders as one batch of two (`vae.DecoderPair`: the same convolutions
        with each decoder's own weights, everything else once for both; about twice one decoder's activation memory
        per chunk): without tiles (tiled decoding is the memory-tight form, one decoder and tile at a time) and
        without autograd (training keeps each decoder's own graph and activation checkpointing)."""
        return dual and tile_size is None and not torch.is_grad_enabled()

    @staticmethod
    def side_stream_applies(side_stream: bool, z: torch.Tensor, tile_size: tuple[int, int] | None = None) -> bool:
        """Whether decode(side_stream=True) runs the alpha decoder on a CUDA stream of its own beside the RGB
        decoder (`_side_by_side`): for a CUDA latent, without tiles (the memory-tight form: one decoder at a time)
        and without autograd (training's graphs stay on one stream)."""
        return side_stream and z.is_cuda and tile_size is None and not torch.is_grad_enabled()

    def _side_by_side(self, z: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Each latent frame's raw (rgb, alpha) chunks, the RGB decoder's on the current CUDA stream and the alpha
        decoder's on a side stream, launched one after the other from this thread: the GPU runs the two decoders'
        kernels side by side, so that one's memory-bound passes (norms, bias passes, upsampling, copies) can fill
        what the other's convolutions leave (81 × 480 × 832 on an H100: 1.64–1.67 s against 1.72–1.74 s one after
        the other, peak 6.5 against 4.7 GiB; docs/benchmarks.md). The same kernels on the same inputs as the separate
        decodes: the same values. The current stream waits for each alpha chunk before it is handed out; the alpha
        decoder's activations and causal cache live on the side stream only (`decoder_side_stream`)."""
        main = torch.cuda.current_stream(z.device)
        side = decoder_side_stream(z.device)
        side.wait_stream(main)  # z and whatever made it
        budget = [decoder.room_budget(z.device, decoders=2) for decoder in (self.rgb_decoder, self.alpha_decoder)]
        rgb_chunks = self.rgb_decoder.decode_frames(z, rooms=budget[0])
        alpha_chunks = self.alpha_decoder.decode_frames(z, rooms=budget[1])
        for rgb in rgb_chunks:
            with torch.cuda.stream(side):
                alpha = next(alpha_chunks, None)
            if alpha is None:
                raise RuntimeError("the alpha decoder gave fewer chunks than the RGB decoder")
            main.wait_stream(side)
            alpha.record_stream(main)  # freed by the consumer on the current stream
            yield rgb, alpha
        with torch.cuda.stream(side):
            if next(alpha_chunks, None) is not None:
                raise RuntimeError("the alpha decoder gave more chunks than the RGB decoder")


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def decoder_side_stream(device: torch.device) -> torch.cuda.Stream:
    """The alpha decoder's CUDA stream on `device`, one for the process: PyTorch's caching allocator keeps the blocks a
    stream freed for that stream, so a fresh stream per decode would strand each decode's activations in the cache
    (a run of many clips, or the decoders' preparation and then the decode) where one stream reuses them."""
    device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


def _finish(rgb: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both decoders' 3-channel outputs → rgb clamped to [-1,1], alpha the mean of its 3 clamped channels. In float32
    whatever the decoders' dtype: bf16 cannot hold the 3-channel mean, nor the 0-255 levels later."""
    return rgb.float().clamp(-1, 1), alpha.float().clamp(-1, 1).mean(dim=1, keepdim=True)
