"""The Wan2.1 causal 3D VAE (upstream: Wan2.1 `wan/modules/vae.py`, `WanVAE_`), state-dict compatible.

Video (B,3,T,H,W) in [-1,1] with T = 4n+1  ──encode──▶  normalised latent (B,16,1+(T-1)/4,H/8,W/8)
                                          ◀──decode──  (frames 1+4·(T_lat-1), not clamped)

Streaming: the official code encodes frame 0 alone and then chunks of 4 frames, and decodes one latent frame at a
time; every causal layer carries the frames it needs from the previous chunk. Here that state lives in one explicit
`CausalCache` passed down the call (DESIGN §7.4), keyed by layer. Called without a cache, every layer computes the
equivalent whole-sequence form (reference NOTES §1: zero frames in front, frame 0 skips the temporal resamplers),
which the tests use to check the chunked path.

Numerics that matter (NOTES §1, §8): RMS_norm is an L2 normalisation × √C (not eps-RMSNorm); temporal padding is
front-only; the 2-D downsample pads right/bottom only; upsampling is nearest-exact in float32; latents are normalised
by multiplying with the float32 reciprocal of the std.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from wanalpha.models import kernels
from wanalpha.models.kernels import rms_norm_channels_last

CACHE_T = 2  # frames each kernel-3 causal conv keeps from the previous chunk

# Official Wan2.1 latent statistics (wan/modules/vae.py WanVAE.__init__; reference constants.json).
WAN21_LATENT_MEAN = (
    -0.7571,
    -0.7089,
    -0.9113,
    0.1075,
    -0.1745,
    0.9653,
    -0.1517,
    1.5508,
    0.4134,
    -0.0715,
    0.5517,
    -0.3632,
    -0.1922,
    -0.9497,
    0.2503,
    -0.2921,
)
WAN21_LATENT_STD = (
    2.8184,
    1.4541,
    2.3275,
    2.6558,
    1.2196,
    1.7708,
    2.6052,
    2.0743,
    3.2687,
    2.1526,
    2.8652,
    1.5579,
    1.6382,
    1.1253,
    2.8251,
    1.916,
)


@dataclass(frozen=True)
class VAEConfig:
    """Upstream `_video_vae` settings; the defaults are Wan2.1's (Wan2.1_VAE.pth)."""

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temporal_downsample: tuple[bool, ...] = (False, True, True)  # upstream: `temperal_downsample`
    dropout: float = 0.0
    latent_mean: tuple[float, ...] = field(default=WAN21_LATENT_MEAN)
    latent_std: tuple[float, ...] = field(default=WAN21_LATENT_STD)

    def __post_init__(self) -> None:
        if len(self.latent_mean) != self.z_dim or len(self.latent_std) != self.z_dim:
            raise ValueError(f"latent_mean/latent_std need z_dim={self.z_dim} values each")
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError("temporal_downsample needs one entry per downsampling stage (len(dim_mult) - 1)")

    @property
    def temporal_stride(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    @property
    def spatial_stride(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)


class CausalCache:
    """Streaming state of one chunked encode or decode: per causal layer, what it keeps from the previous chunk.

    Keyed by the layer module itself, so no running index is threaded through the network. One cache per pass
    (and per tile); `clear()` starts a new one.
    """

    def __init__(self, rooms: int = 0) -> None:
        self._state: dict[nn.Module, torch.Tensor] = {}
        # `rooms`: bytes of "rooms" the cache may hold at once: a causal convolution's cached frames may be the front
        # of the buffer its next chunk's input goes into (`_normed_frames`), so that the next chunk does not copy
        # them, for that buffer held across the chunks (the first layers of a chunk take them, up to the budget)
        self.rooms = rooms
        self._rooms: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
        self._room_bytes = 0

    def get(self, layer: nn.Module) -> torch.Tensor | None:
        return self._state.get(layer)

    def room_fits(self, nbytes: int) -> bool:
        """Whether a room of `nbytes` fits the budget beside the rooms held now."""
        return self._room_bytes + nbytes <= self.rooms

    def set_room(self, layer: nn.Module, frames: torch.Tensor, room: torch.Tensor) -> None:
        """Cache `frames`, the first frames of `room`: the buffer the layer's next chunk may fill behind them."""
        self._drop_room(layer)
        self._state[layer] = frames
        self._rooms[layer] = frames, room
        self._room_bytes += room.untyped_storage().nbytes()

    def room(self, layer: nn.Module) -> torch.Tensor | None:
        """The buffer whose first frames are the layer's cached frames (`set_room`), while they are still the ones
        cached (given once: the cache no longer holds it as a room); else None."""
        frames, room = self._drop_room(layer)
        return room if frames is not None and self._state.get(layer) is frames else None

    def _drop_room(self, layer: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        frames, room = self._rooms.pop(layer, (None, None))
        if room is not None:
            self._room_bytes -= room.untyped_storage().nbytes()
        return frames, room

    def set(self, layer: nn.Module, value: torch.Tensor) -> None:
        self._state[layer] = value

    def __contains__(self, layer: nn.Module) -> bool:
        return layer in self._state

    def clear(self) -> None:
        self._state.clear()
        self._rooms.clear()
        self._room_bytes = 0

    def state(self) -> dict[nn.Module, torch.Tensor]:
        """The state as it stands (a copy of the mapping; the tensors are shared): what a chunk starting now needs."""
        return dict(self._state)

    @classmethod
    def from_state(cls, state: dict[nn.Module, torch.Tensor]) -> CausalCache:
        """A cache that continues from `state` (e.g. one saved by `state()`, to recompute a chunk)."""
        cache = cls()
        cache._state = dict(state)
        return cache

    def checkpointed(self, fn, x: torch.Tensor) -> torch.Tensor:
        """`fn(x, cache)` under activation checkpointing: its activations are recomputed in the backward pass.

        The state going in and out is passed as explicit tensors, so the recomputation sees the state of its own
        chunk, not the state later chunks left behind."""
        from torch.utils.checkpoint import checkpoint

        layers, values = list(self._state), list(self._state.values())
        new_layers: list[nn.Module] = []

        def step(x: torch.Tensor, *values: torch.Tensor) -> tuple[torch.Tensor, ...]:
            local = CausalCache()
            local._state = dict(zip(layers, values, strict=True))
            y = fn(x, local)
            new_layers[:] = list(local._state)
            return (y, *local._state.values())

        y, *new_values = checkpoint(step, x, *values, use_reentrant=False)
        self._state = dict(zip(new_layers, new_values, strict=True))
        return y


def _keep_last(prev: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """The CACHE_T frames a causal layer keeps: the last of x, topped up with the previous state's last frame."""
    keep = x[:, :, -CACHE_T:].clone()  # a copy: a view would keep the whole chunk's activation alive
    if keep.shape[2] < CACHE_T and prev is not None:
        keep = torch.cat([prev[:, :, -1:].to(keep.device), keep], dim=2)
    return keep


def _kept_for_weight(conv: nn.Module, slot: str, make) -> torch.Tensor:
    """`make(conv.weight)`, kept in `conv`'s attribute `slot` until the weight changes (its storage, version, dtype or
    device); made anew each call for a parametrised weight (a LoRA's), which is a new tensor at every access (its
    address and version may repeat while its values change)."""
    w = conv.weight
    if parametrize.is_parametrized(conv):
        return make(w)
    key = (w.data_ptr(), w._version, w.dtype, w.device)
    kept = getattr(conv, slot)
    if kept is None or kept[0] != key:
        kept = (key, make(w))
        setattr(conv, slot, kept)
    return kept[1]


class CausalConv3d(nn.Conv3d):
    """Conv3d with symmetric spatial padding and all temporal padding (2·p_t frames) in front.

    The spatial zero padding is the convolution's own (cuDNN pads on the fly); only the frames in front are
    materialised: the previous chunk's cached frames, or zeros. Upstream pads all three dimensions with F.pad, a
    full copy of every input (same values; docs/benchmarks.md)."""

    # True on an instance of kernels.conv3_few_outputs's shape: on a GPU it runs that kernel, not cuDNN
    # (`_few_outputs`). On for the decoders' heads (Decoder3d; 0.91 against cuDNN's 1.24 ms a chunk at 480 × 832, the
    # decode 0.02 s faster on an H100: docs/benchmarks.md), off elsewhere (the merge block's head: not measured).
    few_outputs_kernel = False
    _few_rows: tuple[tuple, torch.Tensor] | None = None  # few_outputs_rows's last result, keyed by the weight's state

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        p_t, p_h, p_w = self.padding
        self.front = 2 * p_t  # causal frames in front
        self.padding = (0, p_h, p_w)

    def takes_few_outputs_kernel(self) -> bool:
        """Whether this convolution is allowed to take kernels.conv3_few_outputs and has its shape."""
        return self.few_outputs_kernel and self.has_few_outputs_shape()

    def has_few_outputs_shape(self) -> bool:
        """Whether this convolution's shape is kernels.conv3_few_outputs's (3 × 3 × 3, stride 1, at most 16 outputs,
        spatial zero padding 1, two causal frames in front)."""
        return (
            self.out_channels <= kernels.FEW_OUTPUTS
            and self.kernel_size == (3, 3, 3)
            and self.padding == (0, 1, 1)
            and self.front == 2
            and self.stride == (1, 1, 1)
            and self.dilation == (1, 1, 1)
            and self.groups == 1
            and self.padding_mode == "zeros"
        )

    def few_outputs_rows(self) -> torch.Tensor:
        """`kernels.few_outputs_weight(self.weight)`, kept until the weight changes (`_kept_for_weight`)."""
        return _kept_for_weight(self, "_few_rows", kernels.few_outputs_weight)

    def forward(
        self, x: torch.Tensor, cache: CausalCache | None = None, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """conv(x with its causal frames in front), plus `residual` when given (a residual block's shortcut)."""
        return _convolved(self, _causal_frames(self, self.front, x, cache), residual)


class Conv2d(nn.Conv2d):
    """nn.Conv2d with its bias added as CausalConv3d's (`_convolved`): the resampling convolutions."""

    _phases: tuple[tuple, torch.Tensor] | None = None  # phase_weight's last result, keyed by the weight's state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _convolved(self, x)

    def phase_weight(self) -> torch.Tensor:
        """`phase_weight(self.weight)`, kept until the weight changes (`_kept_for_weight`)."""
        return _kept_for_weight(self, "_phases", phase_weight)


# Which of a 3-tap kernel's taps land on each source pixel after a ×2 nearest upsampling (padding 1): output 2i
# reads upsampled positions 2i-1, 2i, 2i+1 = source i-1, i, i (taps 0 | 1 + 2), output 2i+1 reads source i, i, i+1
# (taps 0 + 1 | 2). Rows: phase, the 2-tap kernel's tap, the 3-tap kernel's tap.
_PHASE_TAPS = ((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)), ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0))


def phase_weight(weight: torch.Tensor) -> torch.Tensor:
    """The 3×3 kernel of a convolution that follows a ×2 nearest upsampling, (Cout, Cin, 3, 3), as the 2×2 kernels of
    its four output phases, (4·Cout, Cin, 2, 2), phase (a, b) (output pixel (2i+a, 2j+b)) in channel block 2a+b:
    each the sum of the taps that read the same source pixel, summed in float32 (float64 for a float64 weight) and
    rounded once to the weight's dtype."""
    cout, cin = weight.shape[:2]
    taps = torch.tensor(_PHASE_TAPS, dtype=torch.promote_types(weight.dtype, torch.float32), device=weight.device)
    k = torch.einsum("apk,bql,oikl->aboipq", taps, taps, weight.to(taps.dtype))
    # channels-last, as the frames it convolves: cuDNN then writes a channels-last output even for one frame (where
    # PyTorch cannot tell the input's layout from its strides and would follow a contiguous weight's)
    return k.reshape(4 * cout, cin, 2, 2).to(weight.dtype).contiguous(memory_format=torch.channels_last)


def phase_convolved(conv: Conv2d, x: torch.Tensor) -> torch.Tensor | None:
    """conv(×2 nearest upsampling of x) for a 3×3, padding-1 convolution, without the upsampled input: one 2×2
    convolution of x (padding 1: (H+1)×(W+1) positions) with `conv.phase_weight()`, whose four channel blocks are the
    output's four phases, gathered with the bias (if any) by kernels.phase_rows. 4/9 of the upsampled convolution's
    multiply-adds and a quarter of its input's bytes, and no upsampling pass; the values differ from it only by the
    order of the float32 sums (and the summed taps' rounding to the weight's dtype). For a channels-last 4-D input
    where the kernels apply (a GPU, no autograd), else None."""
    bias = conv.bias
    if (
        x.dim() != 4
        or conv.kernel_size != (3, 3)
        or conv.padding != (1, 1)
        or conv.stride != (1, 1)
        or conv.dilation != (1, 1)
        or conv.groups != 1
        or conv.padding_mode != "zeros"
        or not x.is_contiguous(memory_format=torch.channels_last)
        or not kernels.applies(x, conv.weight, *([] if bias is None else [bias]), kernel="phase_rows")
    ):
        return None
    y = F.conv2d(x, conv.phase_weight(), None, padding=1)
    if bias is not None:
        bias = bias.to(y.dtype)  # under autocast the bias is cast with the input
    return kernels.phase_rows(y, bias)


def _convolved(conv: nn.Conv2d | nn.Conv3d, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """conv(x), + residual when given. For a channels-last input where the fused kernels apply (a GPU, no autograd),
    the convolution runs without its bias and kernels.add_row_bias_ adds it (and the residual, in the same pass): the
    bits of PyTorch's cuDNN path, which adds the bias after the convolution too, but with its strided kernel (a (1, C,
    1, 1, 1) bias broadcast onto a channels-last output: 220 ms of an H200's 1.8 s decode), then the residual's add."""
    y = _few_outputs(conv, x)
    if y is not None:
        return y if residual is None else y + residual
    unbiased = _unbiased(conv, x)
    if unbiased is None:
        y = conv._conv_forward(x, conv.weight, conv.bias)
        return y if residual is None else y + residual
    return _biased(*unbiased, residual)


def _few_outputs(conv: nn.Conv2d | nn.Conv3d, x: torch.Tensor) -> torch.Tensor | None:
    """conv(x) with its bias by kernels.conv3_few_outputs, for a causal convolution of its shape (the decoder's 96 → 3
    head: cuDNN ran it at 19 TFLOP/s, 1.2–1.3 ms a chunk at 480 × 832 on an H100, where its bytes need 0.15 ms) over
    a channels-last bf16 or fp16 GPU input with its causal frames in front and a weight of its dtype (under autocast
    the kernel declines: cuDNN's), no autograd; else None. The sums run in another order than cuDNN's and the bias is
    added before the one rounding (cuDNN's path rounds the convolution, then adds the bias and rounds again)."""
    if not isinstance(conv, CausalConv3d) or not conv.takes_few_outputs_kernel():
        return None
    if not kernels.applies(x, conv.weight, kernel="conv3_few_outputs"):
        return None
    bias = None if conv.bias is None else conv.bias.to(x.dtype)
    return kernels.conv3_few_outputs(x, conv.few_outputs_rows(), conv.out_channels, bias)


def _unbiased(conv: nn.Conv2d | nn.Conv3d, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(conv(x) without its bias, the bias in the output's dtype) for a channels-last input where the fused kernels
    apply (a GPU, no autograd), else None: the convolution's bias is then added by a kernel (`_biased`, or the RMS
    norm after it: `_normed_frames`)."""
    bias = conv.bias
    if (
        bias is None
        or not x.is_contiguous(memory_format=_CHANNELS_LAST[x.dim()])
        or not kernels.applies(x, bias, kernel="add_row_bias")
    ):
        return None
    y = conv._conv_forward(x, conv.weight, None)
    return y, bias.to(y.dtype)  # under autocast the convolution's own bias is cast with its input (then added)


def _biased(y: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """y + bias (+ residual), in place: kernels.add_row_bias_'s pass for a channels-last y, else PyTorch's adds."""
    channels = y.shape[1]
    layout = _CHANNELS_LAST[y.dim()]
    if y.is_contiguous(memory_format=layout):
        rows = y.permute(0, *range(2, y.dim()), 1).view(-1, channels)  # a view: the kernel writes y
        fused = residual is not None and residual.shape == y.shape and residual.is_contiguous(memory_format=layout)
        if fused and kernels.add_row_bias_(
            rows, bias, residual=residual.permute(0, *range(2, y.dim()), 1).view(rows.shape)
        ):
            return y
        if kernels.add_row_bias_(rows, bias):
            return y if residual is None else y + residual
    y = y.add_(bias.view(1, channels, *[1] * (y.dim() - 2)))
    return y if residual is None else y + residual


def _causal_frames(layer: nn.Module, front: int, x: torch.Tensor, cache: CausalCache | None) -> torch.Tensor:
    """x with the `front` frames a causal convolution sees before it: the previous chunk's (kept in `cache` under
    `layer`), else zeros."""
    if cache is not None and front > 0:
        prev = cache.get(layer)
        cache.set(layer, _keep_last(prev, x))
        if prev is not None:
            x = torch.cat([prev.to(x.dtype), x], dim=2)
            front -= prev.shape[2]
    if front > 0:
        x = F.pad(x, (0, 0, 0, 0, front, 0))
    return x


@contextlib.contextmanager
def autotuned_convolutions(device: torch.device) -> Iterator[None]:
    """On CUDA, cuDNN times its convolution algorithms for each new input shape and keeps the fastest, inside the
    block only (`cache`: many clips of one size; 1.29 → 1.07 s per RGBA encode at 81×480×832 on an H200, bf16,
    docs/benchmarks.md; generate's decoders, planned ahead by runtime.prepare_decoders). Every algorithm cuDNN has
    for a shape, not PyTorch's default of its heuristics' first 10 (`cudnn.benchmark_limit` 0): on an H100 the
    full-resolution 96-channel convolution runs 1.42 ms instead of 2.14 ms, the two decoders 1.38 s instead of 1.54 s
    (docs/benchmarks.md). Not for one-off passes, which would pay the timing runs."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cudnn.benchmark, torch.backends.cudnn.benchmark_limit
    torch.backends.cudnn.benchmark, torch.backends.cudnn.benchmark_limit = True, 0
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.benchmark_limit = before


_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
ROOMS_SHARE = 4  # WanVAE.room_budget: decodes take up to 1/ROOMS_SHARE of the GPU's free memory for rooms


class RMSNorm(nn.Module):
    """Upstream `RMS_norm`: F.normalize over channels × √C × gamma (an L2 normalisation, no eps-RMS; no bias).

    `silu`: also apply the SiLU that follows it (set by `runtime.set_channels_last`, which makes that SiLU an
    identity)."""

    def __init__(self, dim: int, images: bool = True) -> None:
        super().__init__()
        shape = (dim, 1, 1) if images else (dim, 1, 1, 1)
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(shape))
        self.silu = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        # Channels-last (`channels_last`): the channels are the innermost dimension of memory. Without autograd on the
        # GPU, one Triton pass (norm and SiLU); else, for one dtype, PyTorch's fused RMS norm over that last dimension
        # (with mixed dtypes it would not promote as the product does). The same value: x / max(‖x‖, 1e-12) · √C =
        # x / √(‖x‖² / C) and, with eps = 1e-24 / C, a zero vector stays zero.
        fast = x.dim() in (4, 5) and channels > 1 and x.is_contiguous(memory_format=_CHANNELS_LAST[x.dim()])
        if fast and not (torch.is_grad_enabled() and (x.requires_grad or self.gamma.requires_grad)):
            y = rms_norm_channels_last(x, self.gamma, self.scale, self.silu)
            if y is not None:
                return y
        if fast and x.dtype == self.gamma.dtype:
            last = (0, *range(2, x.dim()), 1)
            first = (0, x.dim() - 1, *range(1, x.dim() - 1))
            y = F.rms_norm(x.permute(last), (channels,), self.gamma.flatten(), 1e-24 / channels).permute(first)
        else:
            y = F.normalize(x, dim=1) * self.scale * self.gamma
        return F.silu(y) if self.silu else y


class Upsample(nn.Upsample):
    """Upsampling computed in float32 (upstream casts for bf16 stability), cast back. The nearest modes (the decoder's
    nearest-exact) only pick values, so they run in x's dtype: the same result without the two casts (a float32 copy
    of the activation each way: 0.19 s of an H200's 1.8 s two-decoder decode with the upsampling itself at twice the
    bytes)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode in ("nearest", "nearest-exact"):
            return super().forward(x)
        return super().forward(x.float()).type_as(x)


def _per_frame(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2-D module to every frame of (B,C,T,H,W)."""
    b, _, t = x.shape[:3]
    y = fn(x.transpose(1, 2).flatten(0, 1))  # (B·T, C, H, W)
    return y.unflatten(0, (b, t)).transpose(1, 2)


class Resample(nn.Module):
    """Spatial ×2 / ÷2 resampling, with a causal temporal ×2 / ÷2 part in the *3d modes.

    upsample3d: frame t → frames (2t, 2t+1) from channels [0:C] and [C:2C] of time_conv; the first frame of the
    sequence skips time_conv. downsample3d: the first frame is kept; later frames go through a stride-2 conv that
    also sees the previous chunk's last frame.
    """

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        self.dim, self.mode = dim, mode
        if mode in ("upsample2d", "upsample3d"):
            self.resample = nn.Sequential(
                Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"), Conv2d(dim, dim // 2, 3, padding=1)
            )
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode in ("downsample2d", "downsample3d"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), Conv2d(dim, dim, 3, stride=(2, 2)))
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=(0, 0, 0))
        else:
            raise ValueError(f"unknown resample mode {mode!r}")

    def _time_up(self, x: torch.Tensor, cache: CausalCache | None) -> torch.Tensor:
        b, c, t, h, w = x.shape
        if cache is None:  # whole sequence: frame 0 as is, frames 1.. doubled by the causal conv
            if t == 1:
                return x
            return torch.cat([x[:, :, :1], self._interleave(self.time_conv(x[:, :, 1:]))], dim=2)
        if self not in cache:  # first chunk: frame 0 skips time_conv; the next chunk pads with zeros
            cache.set(self, x.new_zeros(()))  # a marker: this layer has seen its first chunk
            cache.set(self.time_conv, torch.zeros_like(x[:, :, :1]).expand(-1, -1, CACHE_T, -1, -1))
            return x
        return self._interleave(self.time_conv(x, cache))

    @staticmethod
    def _interleave(y: torch.Tensor) -> torch.Tensor:
        """(B, 2C, T, H, W) → (B, C, 2T, H, W): frame 2t + i from channel block i of frame t. A channels-last input
        gives a channels-last output (the same one copy), so the layout `channels_last` sets up survives the
        temporal upsampling (the stacked form would hand the next blocks a contiguous tensor)."""
        b, c2, t, h, w = y.shape
        c = c2 // 2
        if y.is_contiguous(memory_format=torch.channels_last_3d):
            frames = y.permute(0, 2, 3, 4, 1).reshape(b, t, h, w, 2, c).permute(0, 1, 4, 2, 3, 5)
            # one copy; for one frame (t = 1) the reshape alone would give a view with the frames innermost but one
            return frames.reshape(b, 2 * t, h, w, c).contiguous().permute(0, 4, 1, 2, 3)
        y = y.reshape(b, 2, c, t, h, w)
        return torch.stack((y[:, 0], y[:, 1]), dim=3).reshape(b, c, t * 2, h, w)

    def _time_down(self, x: torch.Tensor, cache: CausalCache | None) -> torch.Tensor:
        if cache is None:  # whole sequence: frame 0 as is, a stride-2 valid conv over all frames
            if x.shape[2] < 3:
                return x[:, :, :1]
            return torch.cat([x[:, :, :1], self.time_conv(x)], dim=2)
        prev = cache.get(self)
        cache.set(self, x[:, :, -1:].clone())
        if prev is None:  # first chunk: frame 0 passes unchanged
            return x
        return self.time_conv(torch.cat([prev, x], dim=2))

    def _upsampled(self, x: torch.Tensor) -> torch.Tensor:
        """The ×2 nearest upsampling and its convolution on frames (N, C, H, W): on a GPU, in the phase form
        (`phase_convolved`) where it applies and both modules are called plainly (no hooks or instance forwards:
        benchmarks/vae.py's levers), else upsampled, then convolved."""
        upsample, conv = self.resample
        if type(conv) is Conv2d and _plain_call(upsample) and _plain_call(conv):
            y = phase_convolved(conv, x)
            if y is not None:
                return y
        return self.resample(x)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        if self.mode == "upsample3d":
            x = self._time_up(x, cache)
        if self.mode.startswith("upsample"):
            return _per_frame(self._upsampled, x)
        x = _per_frame(self.resample, x)
        if self.mode == "downsample3d":
            x = self._time_down(x, cache)
        return x


def upsampling_convolutions(module: nn.Module) -> list[Conv2d]:
    """The 3×3 convolution of every ×2 upsampling (Resample's upsample modes) in `module`: the ones the GPU layout runs
    in phases (`phase_convolved`)."""
    return [m.resample[1] for m in module.modules() if isinstance(m, Resample) and m.mode.startswith("upsample")]


def few_output_convolutions(module: nn.Module) -> list[CausalConv3d]:
    """Every causal convolution in `module` that kernels.conv3_few_outputs takes on a GPU (the decoders' heads)."""
    return [m for m in module.modules() if isinstance(m, CausalConv3d) and m.takes_few_outputs_kernel()]


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim, images=False),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim, images=False),
            nn.SiLU(),
            nn.Dropout(dropout),
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    # On the GPU layout's fused path, a block's sum (its last convolution's output + bias + residual) is left to the
    # RMS norm of the residual block or head after it, which adds it as it reads (kernels.rms_norm_channels_last
    # (residual=, total=)): the bits of the bias pass, without reading the sum back (the decode 0.01 s faster on an
    # H100: docs/benchmarks.md; benchmarks/vae.py's +nosum lever turns it off).
    sum_in_norm = True

    def forward(
        self, x: torch.Tensor | _Pending, cache: CausalCache | None = None, pending: bool = False
    ) -> torch.Tensor | _Pending:
        """The block's output; with `pending` (and a cache), a _Pending where its sum can be left to the next norm.
        A _Pending x (the block before it, `_run`) is summed by this block's first norm where it can."""
        if isinstance(x, _Pending):
            if isinstance(self.shortcut, nn.Identity):
                return _run(self.residual, x, cache, residual=_INPUT_SUM, pending=pending)
            x = x.total()
        return _run(self.residual, x, cache, residual=self.shortcut(x), pending=pending)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H·W positions of each frame (no temporal mixing)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def _frame_attention(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(n, 1, c * 3, h * w).permute(0, 1, 3, 2)  # (N, 1, HW, 3C)
        q, k, v = qkv.contiguous().chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v)  # scale 1/√C
        return self.proj(y.squeeze(1).permute(0, 2, 1).reshape(n, c, h, w))

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        return x + _per_frame(self._frame_attention, x)


class _Pending(NamedTuple):
    """A residual block's output whose sum is left to the RMS norm after it (`_run`'s `pending`): y, the block's last
    convolution's output without its bias, + bias + residual; `total()` adds them in add_row_bias_'s pass."""

    y: torch.Tensor
    bias: torch.Tensor
    residual: torch.Tensor

    def total(self) -> torch.Tensor:
        return _biased(self.y, self.bias, self.residual)


_INPUT_SUM = object()  # _run's residual: the sum that a pending input makes (a residual block's identity shortcut)


def _run(
    layers: nn.Module,
    x: torch.Tensor | _Pending,
    cache: CausalCache | None,
    residual: torch.Tensor | object | None = None,
    pending: bool = False,
) -> torch.Tensor | _Pending:
    """Each layer in turn; the causal ones (and the blocks holding them) with the cache; `residual` added to the last
    layer's output (by a last convolution in its bias pass). An RMS norm that feeds a causal convolution through
    identities writes its output behind the convolution's cached frames where it can (`_normed_frames`).

    Residual blocks' sums left to the norm after them (ResidualBlock.sum_in_norm, the GPU layout's fused path): with
    `pending`, where the last convolution takes `residual` and the fused path applies, the result is a _Pending
    (output, bias, residual) for the next norm to add as it reads; a _Pending x goes to a first norm that feeds a
    convolution (with `residual` _INPUT_SUM: the sum it writes too is the block's residual), or to a residual block
    first, else it is summed first."""
    layers = list(layers)
    end, i = len(layers) - 1, 0
    bias = None  # the bias of the convolution that gave x, not yet added: left to the norm after it
    if isinstance(x, _Pending):
        fed = _fed_convolution(layers, 0) if cache is not None else None
        y = total = None
        if fed is not None and (fed < end or residual is None):  # (the head's: its convolution ends the layers)
            total = torch.empty_like(x.y) if residual is _INPUT_SUM else None
            defer = fed < end and _fed_convolution(layers, fed + 1) is not None
            y = _normed_frames(layers[0], layers[fed], x.y, cache, None, x.bias, defer, addend=x.residual, total=total)
        if y is not None and fed == end:
            return y[0]
        if y is not None:
            (x, bias), i = y, fed + 1
            residual = total if residual is _INPUT_SUM else residual
        elif not (isinstance(layers[0], ResidualBlock) and _plain_call(layers[0])):
            x = x.total()
            residual = x if residual is _INPUT_SUM else residual
    while i <= end:
        layer = layers[i]
        fed = _fed_convolution(layers, i) if cache is not None else None
        if fed is not None:
            defer = fed < end and _fed_convolution(layers, fed + 1) is not None  # its output goes to another such norm
            if fed == end and pending and residual is not None:
                y = _normed_frames(layer, layers[fed], x, cache, None, bias, defer=True)
                if y is not None:
                    return y[0] + residual if y[1] is None else _Pending(y[0], y[1], residual)
            else:
                y = _normed_frames(layer, layers[fed], x, cache, residual if fed == end else None, bias, defer)
            if y is not None and fed == end:
                return y[0]  # the residual is in
            if y is not None:
                (x, bias), i = y, fed + 1
                continue
        if bias is not None:  # the norm could not take it
            x, bias = _biased(x, bias), None
        if residual is not None and i == end and isinstance(layer, (CausalConv3d, PairedConv)) and _plain_call(layer):
            return layer(x, cache, residual=residual)  # (a hooked convolution's hooks see its own output: added after)
        if isinstance(layer, ResidualBlock) and _plain_call(layer):
            # its sum left to the next layer's norm where that is a residual block's (or the caller's, with pending)
            after = pending if i == end else isinstance(layers[i + 1], ResidualBlock)
            x = layer(x, cache, pending=after and layer.sum_in_norm)
        else:
            if isinstance(x, _Pending):
                x = x.total()
            x = layer(x, cache) if isinstance(layer, _STREAMING) else layer(x)
        i += 1
    if isinstance(x, _Pending) and not pending:
        x = x.total()
    return x if residual is None else x + residual


def _fed_convolution(layers: list[nn.Module], i: int) -> int | None:
    """The index of the causal convolution that the RMS norm at layers[i] feeds through identities (the SiLU it
    applies itself in the GPU layout, a dropout that drops nothing), or None; None too where a module on the way has
    hooks or a forward of its own instance (benchmarks/vae.py's before/after levers): those are called as they are."""
    if not isinstance(layers[i], RMSNorm) or not _plain_call(layers[i]):
        return None
    for j in range(i + 1, len(layers)):
        layer = layers[j]
        if not _plain_call(layer):
            return None
        if isinstance(layer, CausalConv3d):
            return j if layer.front > 0 else None
        if not (
            isinstance(layer, nn.Identity) or (isinstance(layer, nn.Dropout) and (layer.p == 0 or not layer.training))
        ):
            return None
    return None


def _plain_call(module: nn.Module) -> bool:
    """Whether calling `module` runs its class's forward and nothing else: no forward of its own instance, no hooks
    of its own or registered for every module."""
    hooks = nn.modules.module
    return not (
        "forward" in vars(module)
        or module._forward_hooks
        or module._forward_pre_hooks
        or hooks._global_forward_hooks
        or hooks._global_forward_pre_hooks
    )


def _normed_frames(
    norm: RMSNorm,
    conv: CausalConv3d,
    x: torch.Tensor,
    cache: CausalCache,
    residual: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    defer: bool = False,
    addend: torch.Tensor | None = None,
    total: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(conv(norm(x)), None) with the convolution's cached frames in front, the norm writing into the frames behind
    them in one buffer: the same values as the norm's output concatenated behind the cached frames, without the
    concatenation's copy of every frame (the decode's device-to-device copies: 143 ms of an H200's 1.8 s), and the
    norm writing the chunk's last frames into the next chunk's cache too, without copying them after. The frames in
    front that the cache does not hold yet (the first chunk's two, the second's first) are zeros, as `_causal_frames`
    pads them, here without its padding copy of every frame. `bias`: x's own convolution's bias, not yet added (the
    norm adds it as it reads x: the bits of the bias pass, without it). `defer` (no residual): the convolution's
    output without its bias, and that bias, for the next norm to add. `addend` (with `bias`): x is a residual block's
    last convolution's output, normed as x + bias + addend rounded as the bias pass rounds them, that sum also
    written into `total` where given (`_Pending`). For a single-sample channels-last GPU activation without autograd,
    else None, nothing done (the layers then run one by one)."""
    prev = cache.get(conv)
    front = conv.front
    cached = 0 if prev is None else prev.shape[2]
    if (
        front == 0
        or cached > front
        or x.dim() != 5
        or x.shape[0] != 1
        or x.shape[1] < 2
        or not x.is_contiguous(memory_format=torch.channels_last_3d)
        or not x.is_cuda
        # the kernels' own test: Triton there and working, no autograd
        or not kernels.applies(x, norm.gamma, kernel="rms_norm_rows")
    ):
        return None
    n, c, t, h, w = x.shape
    shape, dtype = (n, c, front + t, h, w), torch.promote_types(x.dtype, norm.gamma.dtype)
    frames = cache.room(conv)  # with the cached frames in front already (CausalCache.rooms), where it fits
    if frames is not None and (frames.shape != shape or frames.dtype != dtype or frames.device != x.device):
        frames = None
    filled = frames is not None
    if frames is None:
        frames = torch.empty(shape, dtype=dtype, device=x.device, memory_format=torch.channels_last_3d)
    # the next chunk's cached frames, written by the norm in the same pass (where the chunk has as many): with rooms,
    # into the front of the next chunk's buffer (of this chunk's size: the steady chunks'), else alone
    tail = room = None
    if t >= CACHE_T:
        if front == CACHE_T and cache.room_fits(math.prod(shape) * dtype.itemsize):
            room = torch.empty(shape, dtype=dtype, device=x.device, memory_format=torch.channels_last_3d)
            tail = room[:, :, :CACHE_T]
        else:
            tail = torch.empty(
                (n, c, CACHE_T, h, w), dtype=dtype, device=x.device, memory_format=torch.channels_last_3d
            )
    normed = rms_norm_channels_last(
        x,
        norm.gamma,
        norm.scale,
        norm.silu,
        out=frames[:, :, front:],
        bias=bias,
        tail=tail,
        residual=addend,
        total=total,
    )
    if normed is None:
        return None
    if not filled and cached < front:
        frames[:, :, : front - cached].zero_()
    if not filled and cached:
        frames[:, :, front - cached : front].copy_(prev)
    if room is not None:
        cache.set_room(conv, tail, room)
    else:
        cache.set(conv, tail if tail is not None else _keep_last(prev, frames[:, :, front:]))
    unbiased = _unbiased(conv, frames) if defer and residual is None else None
    return unbiased if unbiased is not None else (_convolved(conv, frames, residual), None)


class Encoder3d(nn.Module):
    def __init__(self, cfg: VAEConfig, z_dim: int) -> None:
        super().__init__()
        dims = [cfg.dim * u for u in (1, *cfg.dim_mult)]
        scale = 1.0
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        downsamples: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            for _ in range(cfg.num_res_blocks):
                downsamples.append(ResidualBlock(in_dim, out_dim, cfg.dropout))
                if scale in cfg.attn_scales:
                    downsamples.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != len(cfg.dim_mult) - 1:
                mode = "downsample3d" if cfg.temporal_downsample[i] else "downsample2d"
                downsamples.append(Resample(out_dim, mode))
                scale /= 2.0
        self.downsamples = nn.Sequential(*downsamples)
        self.middle = nn.Sequential(
            ResidualBlock(dims[-1], dims[-1], cfg.dropout),
            AttentionBlock(dims[-1]),
            ResidualBlock(dims[-1], dims[-1], cfg.dropout),
        )
        self.head = nn.Sequential(
            RMSNorm(dims[-1], images=False), nn.SiLU(), CausalConv3d(dims[-1], z_dim, 3, padding=1)
        )

    def features(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        """Everything before the head: (B, 4·dim, T', H/8, W/8) (the v2 merge block's input)."""
        x = self.conv1(x, cache)
        x = _run(self.downsamples, x, cache)
        return _run(self.middle, x, cache)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        return _run(self.head, self.features(x, cache), cache)


class Decoder3d(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        dims = [cfg.dim * u for u in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
        temporal_upsample = cfg.temporal_downsample[::-1]
        scale = 1.0 / 2 ** (len(cfg.dim_mult) - 2)
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(
            ResidualBlock(dims[0], dims[0], cfg.dropout),
            AttentionBlock(dims[0]),
            ResidualBlock(dims[0], dims[0], cfg.dropout),
        )
        upsamples: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            if i in (1, 2, 3):  # a Resample upsample halves the channels
                in_dim = in_dim // 2
            for _ in range(cfg.num_res_blocks + 1):
                upsamples.append(ResidualBlock(in_dim, out_dim, cfg.dropout))
                if scale in cfg.attn_scales:
                    upsamples.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != len(cfg.dim_mult) - 1:
                mode = "upsample3d" if temporal_upsample[i] else "upsample2d"
                upsamples.append(Resample(out_dim, mode))
                scale *= 2.0
        self.upsamples = nn.Sequential(*upsamples)
        self.head = nn.Sequential(RMSNorm(dims[-1], images=False), nn.SiLU(), CausalConv3d(dims[-1], 3, 3, padding=1))
        self.head[-1].few_outputs_kernel = True  # kernels.conv3_few_outputs on a GPU (CausalConv3d.few_outputs_kernel)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        x = self.conv1(x, cache)
        x = _run(self.middle, x, cache, pending=True)  # a last residual block's sum may go to the next one's norm
        x = _run(self.upsamples, x, cache, pending=True)  # and to the head's
        return _run(self.head, x, cache)


def _tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size `tile` overlapping by `overlap` that cover [0, n); the last one ends at n."""
    starts = list(range(0, max(n - tile, 0) + 1, tile - overlap))
    if starts[-1] + tile < n:
        starts.append(n - tile)
    return starts


def _ramp(size: int, overlap: int, rise: bool, fall: bool, device: torch.device) -> torch.Tensor:
    """Blend weights along one axis of a tile: linear ramps over the overlap on sides that have a neighbour."""
    weights = torch.ones(size, dtype=torch.float32, device=device)
    if overlap > 0:
        ramp = (torch.arange(overlap, dtype=torch.float32, device=device) + 0.5) / overlap
        if rise:
            weights[:overlap] = ramp
        if fall:
            weights[-overlap:] = ramp.flip(0)
    return weights


def decode_chunks(latent_frames: int, size: int = 1) -> Iterator[slice]:
    """The decode schedule: latent frame 0 alone, then chunks of `size` latent frames (upstream: 1)."""
    if size < 1:
        raise ValueError(f"decode chunks of {size} latent frames: give 1 or more")
    yield slice(0, 1)
    for start in range(1, latent_frames, size):
        yield slice(start, start + size)


def encode_chunks(num_frames: int, temporal_stride: int = 4) -> Iterator[slice]:
    """The official encode schedule: frame 0 alone, then chunks of `temporal_stride` frames."""
    yield slice(0, 1)
    for start in range(1, num_frames, temporal_stride):
        yield slice(start, start + temporal_stride)


class WanVAE(nn.Module):
    """Wan2.1 VAE with the official state-dict layout: `encoder.*`, `conv1.*`, `conv2.*`, `decoder.*`.

    `with_encoder=False` / `with_decoder=False` build only one half (the RGB-alpha VAE keeps one encoder and two
    decoders); its state dict then holds only that half's official keys.
    """

    def __init__(self, config: VAEConfig | None = None, with_encoder: bool = True, with_decoder: bool = True) -> None:
        super().__init__()
        self.config = cfg = config or VAEConfig()
        if with_encoder:
            self.encoder = Encoder3d(cfg, cfg.z_dim * 2)
            self.conv1 = CausalConv3d(cfg.z_dim * 2, cfg.z_dim * 2, 1)
        if with_decoder:
            self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
            self.decoder = Decoder3d(cfg)
        # Training through the decoder (stage 1): recompute each latent frame's activations in the backward pass
        # instead of keeping them (full-resolution activations dominate memory).
        self.gradient_checkpointing = False
        # Latent frames a decode chunk holds after the first (which is frame 0 alone, as upstream: it skips the
        # temporal upsampling): upstream decodes one at a time; more, the same values (every causal layer carries its
        # frames across chunks) with fewer cache copies and launches, and a chunk's activations that many times.
        self.decode_chunk = 1
        # Bytes of "rooms" a decode may hold (CausalCache.rooms): a causal convolution's cached frames written into
        # the front of its next chunk's input buffer by the norm before it (the GPU layout's fused path), so that no
        # chunk copies them, for those buffers held across the chunks; the same bits either way. None: `room_budget`'s
        # share of the GPU's free memory; 0: none.
        self.decode_rooms: int | None = None

    def _stats(self, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1, 1, 1, 1)
        mean = torch.tensor(self.config.latent_mean, dtype=torch.float32, device=ref.device).view(shape)
        inv_std = 1.0 / torch.tensor(self.config.latent_std, dtype=torch.float32, device=ref.device).view(shape)
        return mean, inv_std

    def check_video(self, video: torch.Tensor) -> None:
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"expected a video (B,3,T,H,W), got shape {tuple(video.shape)}")
        t, h, w = video.shape[2:]
        ts, ss = self.config.temporal_stride, self.config.spatial_stride
        if (t - 1) % ts:
            lo, hi = 1 + ts * ((t - 1) // ts), 1 + ts * ((t - 1) // ts + 1)
            raise ValueError(f"the Wan VAE needs {ts}n+1 frames (1, 5, 9, …, 81); got {t}: use {lo} or {hi}")
        if h % ss or w % ss:
            raise ValueError(f"height and width must be multiples of {ss}; got {h}x{w}")

    def encode_raw(self, video: torch.Tensor) -> torch.Tensor:
        """Chunked encode to the raw [mu, log_var] output of conv1: (B, 2·z_dim, T_lat, H/8, W/8)."""
        self.check_video(video)
        cache = CausalCache()
        h = torch.cat([self.encoder(video[:, :, s], cache) for s in encode_chunks(video.shape[2])], dim=2)
        return self.conv1(h)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """(B,3,T,H,W) in [-1,1] → the normalised latent mean (B, z_dim, T_lat, H/8, W/8); never samples."""
        mu = self.encode_raw(video)[:, : self.config.z_dim]
        mean, inv_std = self._stats(mu)
        return (mu - mean) * inv_std

    def encode_features(self, video: torch.Tensor) -> torch.Tensor:
        """Chunked encoder features before the head (Wan-Alpha v2 `encode_simple`): (B, 4·dim, T_lat, H/8, W/8)."""
        self.check_video(video)
        cache = CausalCache()
        return torch.cat([self.encoder.features(video[:, :, s], cache) for s in encode_chunks(video.shape[2])], dim=2)

    def denormalise(self, z: torch.Tensor) -> torch.Tensor:
        mean, inv_std = self._stats(z)
        return z / inv_std + mean

    def decode_raw(self, latent: torch.Tensor, rooms: int | None = None) -> torch.Tensor:
        """Decode a RAW (de-normalised) latent: conv2 on the whole latent, then one latent frame at a time (`rooms`:
        as decode_frames)."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            x = self._conv2(latent)
            cache = CausalCache()
            return torch.cat([cache.checkpointed(self.decoder, x[:, :, i : i + 1]) for i in range(x.shape[2])], dim=2)
        return torch.cat(list(self._frames(latent, rooms)), dim=2)

    def decoder_input(self, latent: torch.Tensor) -> torch.Tensor:
        """conv2 of a RAW latent: what `decoder` then takes one latent frame (chunk) at a time with a CausalCache."""
        return self._conv2(latent)

    def check_latent(self, latent: torch.Tensor) -> None:
        if latent.ndim != 5 or latent.shape[1] != self.config.z_dim:
            raise ValueError(f"expected a latent (B,{self.config.z_dim},T,h,w), got shape {tuple(latent.shape)}")

    def _conv2(self, latent: torch.Tensor) -> torch.Tensor:
        self.check_latent(latent)
        return self.conv2(latent.to(self.conv2.weight.dtype))

    def room_budget(self, device: torch.device, decoders: int = 1) -> int:
        """The bytes of rooms a decode on `device` may hold (`decode_rooms`; for None, on a CUDA device, a quarter of
        its free memory now, the caching allocator's unused blocks included, shared by `decoders` decoding at once: at
        81 × 480 × 832 both decoders' rooms take 6 GiB and 0.04 s off an H100's 1.25 s, docs/benchmarks.md; elsewhere
        none)."""
        if self.decode_rooms is not None:
            return self.decode_rooms
        if device.type != "cuda":
            return 0
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free // ROOMS_SHARE // decoders

    def _frames(self, latent: torch.Tensor, rooms: int | None = None) -> Iterator[torch.Tensor]:
        x = self._conv2(latent)
        cache = CausalCache(rooms=self.room_budget(x.device) if rooms is None else rooms)
        for chunk in decode_chunks(x.shape[2], self.decode_chunk):
            yield self.decoder(x[:, :, chunk], cache)

    def decode(
        self, z: torch.Tensor, tile_size: tuple[int, int] | None = None, tile_overlap: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Normalised latent → video (B,3,1+4·(T_lat-1),8h,8w), NOT clamped (as upstream `WanVAE_.decode`).

        tile_size=(h, w) (latent cells) decodes overlapping spatial tiles one after another and blends the seams
        linearly: peak memory follows the tile, not the frame. Opt-in, since tiles cannot see the whole frame
        (the decoder's middle attention is global): expect small differences near seams.
        """
        latent = self.denormalise(z)
        if tile_size is None:
            return self.decode_raw(latent)
        return self._decode_tiled(latent, tile_size, tile_overlap)

    def decode_frames(
        self,
        z: torch.Tensor,
        tile_size: tuple[int, int] | None = None,
        tile_overlap: tuple[int, int] | None = None,
        rooms: int | None = None,
    ) -> Iterator[torch.Tensor]:
        """decode() a chunk at a time, for consumers that start on the first frames while the rest decode: the
        frames of each latent frame in turn (1, then 4 each), equal to the matching slices of decode()'s video. Tiled
        decoding decodes the whole video first (each tile runs through every frame), then yields it in chunks.
        `rooms`: the bytes of rooms it may hold (else `room_budget`'s)."""
        if tile_size is None:
            yield from self._frames(self.denormalise(z), rooms)
            return
        video = self.decode(z, tile_size, tile_overlap)
        stride = self.config.temporal_stride
        yield video[:, :, :1]
        for start in range(1, video.shape[2], stride):
            yield video[:, :, start : start + stride]

    def _decode_tiled(
        self, latent: torch.Tensor, tile_size: tuple[int, int], tile_overlap: tuple[int, int] | None
    ) -> torch.Tensor:
        h, w = latent.shape[-2:]
        th, tw = min(tile_size[0], h), min(tile_size[1], w)
        oh, ow = tile_overlap if tile_overlap is not None else (th // 2, tw // 2)
        if not (0 <= oh < th and 0 <= ow < tw):
            raise ValueError(f"tile_overlap {tile_overlap} must be smaller than tile_size {tile_size}")
        s = self.config.spatial_stride
        out = weight = None
        for y0 in _tile_starts(h, th, oh):
            for x0 in _tile_starts(w, tw, ow):
                tile = self.decode_raw(latent[..., y0 : y0 + th, x0 : x0 + tw], rooms=0)  # the memory-tight form
                ramp_y = _ramp(th * s, oh * s, y0 > 0, y0 + th < h, tile.device)
                ramp_x = _ramp(tw * s, ow * s, x0 > 0, x0 + tw < w, tile.device)
                mask = ramp_y[:, None] * ramp_x[None, :]
                if out is None:  # accumulate in float32 whatever the compute dtype
                    out = torch.zeros(*tile.shape[:3], h * s, w * s, dtype=torch.float32, device=tile.device)
                    weight = torch.zeros(h * s, w * s, dtype=torch.float32, device=tile.device)
                ys, xs = slice(y0 * s, (y0 + th) * s), slice(x0 * s, (x0 + tw) * s)
                out[..., ys, xs] += tile.float() * mask
                weight[ys, xs] += mask
        return (out / weight).to(tile.dtype)


# --------------------------------------------------------------------------------------- two decoders, one batch


class PairedConv(nn.Module):
    """Two convolutions of one shape over one batch: its first half through `first`, its second half through `second`
    (each with its own weight), concatenated. The causal frames in front (a CausalConv3d's) are materialised once
    for the whole batch, under this module's own cache entry. (A CUDA form that had cuDNN write each half straight
    into one output, `cudnn_convolution.out`, gave wrong values on an H100, PSNR 25 dB against 48: removed.)"""

    def __init__(self, first: nn.Conv2d | nn.Conv3d, second: nn.Conv2d | nn.Conv3d) -> None:
        super().__init__()
        self.first, self.second = first, second
        self.front = getattr(first, "front", 0)

    def forward(
        self, x: torch.Tensor, cache: CausalCache | None = None, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = _causal_frames(self, self.front, x, cache)
        n = x.shape[0] // 2
        first, second = self.first, self.second
        y = torch.cat(
            [
                _convolved(first, x[:n]),
                _convolved(second, x[n:]),
            ]
        )
        return y if residual is None else y + residual


class PerHalf(nn.Module):
    """Two modules of one kind over one batch, each on its half (a norm whose weights differ between the two
    decoders); the halves are concatenated."""

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0] // 2
        return torch.cat([self.first(x[:n]), self.second(x[n:])])


_STREAMING = (CausalConv3d, PairedConv, Resample, ResidualBlock, AttentionBlock)  # layers `_run` passes the cache


def pair_modules(first: nn.Module, second: nn.Module) -> nn.Module:
    """One module that runs `first` on the first half of a batch and `second` on the second half, for two modules of
    one architecture whose weights may differ: every convolution becomes a PairedConv of the two; any other module
    with weights is shared where its weights are equal (else a PerHalf of the two); modules without weights are
    shared; containers are shallow copies of `first`'s with paired children, so their own forward runs unchanged on
    the batch of two. The result holds the two modules (no weight is copied) and reads their weights when it runs.
    Raises ValueError where the two differ in structure."""
    checks: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
    _weights_to_compare(first, second, checks)
    equal = {id(a): True for a, _, _ in checks}
    if checks:  # every comparison at once: one device sync
        for (a, _, _), same in zip(checks, torch.stack([(p == q).all() for _, p, q in checks]).tolist(), strict=True):
            equal[id(a)] = equal[id(a)] and same
    return _pair(first, second, equal)


def _weights_to_compare(first: nn.Module, second: nn.Module, out: list) -> None:
    """(module, its weight, the other's) for what pair_modules may share: the weights of modules other than
    convolutions (every convolution becomes a PairedConv, each half with its own weight and bias)."""
    kinds = [parametrize.type_before_parametrizations(m) for m in (first, second)]  # LoRA-parametrised convs too
    if kinds[0] is not kinds[1]:
        raise ValueError(f"pair_modules: a {kinds[0].__name__} paired with a {kinds[1].__name__}")
    if isinstance(first, (nn.Conv2d, nn.Conv3d)):
        return
    own = list(zip(first.parameters(recurse=False), second.parameters(recurse=False), strict=False))
    for p, q in own:
        if p.shape != q.shape:
            raise ValueError(f"pair_modules: {type(first).__name__} weights of shapes {p.shape} and {q.shape}")
        out.append((first, p, q))
    if own:
        return
    names = [name for name, _ in first.named_children()]
    if names != [name for name, _ in second.named_children()]:
        raise ValueError(f"pair_modules: two {type(first).__name__}s with different parts")
    for name in names:
        _weights_to_compare(first.get_submodule(name), second.get_submodule(name), out)


_CONV_SHAPE = ("stride", "padding", "dilation", "groups", "padding_mode", "front")


def _pair(first: nn.Module, second: nn.Module, equal: dict[int, bool]) -> nn.Module:
    if isinstance(first, (nn.Conv2d, nn.Conv3d)):
        differs = [k for k in _CONV_SHAPE if getattr(first, k, None) != getattr(second, k, None)]
        if first.weight.shape != second.weight.shape or differs or (first.bias is None) != (second.bias is None):
            raise ValueError(f"pair_modules: two convolutions of different shapes ({first} and {second})")
        return PairedConv(first, second)
    if next(first.parameters(recurse=False), None) is not None:
        return first if equal[id(first)] else PerHalf(first, second)
    children = dict(first.named_children())
    if not children:
        return first
    paired = copy.copy(first)
    paired._modules = {name: _pair(child, second.get_submodule(name), equal) for name, child in children.items()}
    return paired


class DecoderPair(nn.Module):
    """Two WanVAE decoders of one architecture (Wan-Alpha's rgb_decoder and alpha_decoder) decoding one latent as one
    batch of two: `frames(z)` yields each latent frame's (first, second) chunk, equal to `first.decode_frames(z)`'s
    and `second.decode_frames(z)`'s to float32 rounding (each half runs its own convolution on the separate decode's
    shape, but cuDNN may pick another algorithm for a half that is a view into the batch: 2.5e-6 relative in float32
    on an H200, tests/test_gpu.py).

    Why this form. Wan-Alpha's decoders are one base decoder, each with a rank-128 LoRA on all 38 convolutions that is
    merged into its weights when loaded (`checkpoints.vae.merge_lora`, as the official loader); norms, biases and the
    latent convolution stay the base's. Three ways to run both at once were weighed, for an H100:
    - base convolution on the batch + each half's low-rank path (a k×k×k down-convolution to 128 channels, a 1×1 up):
      the batched base costs the FLOPs of two separate convolutions, and at rank 128 the low-rank path costs a third
      of a 384-channel convolution and more than a whole 96-channel one (the full-resolution stages, most of the
      work); bf16 would also round W and the delta apart, not their sum as the separate decoders do;
    - one grouped convolution (2 groups, both merged weights stacked): the halves must be channel groups of one
      sample, which the channels-last GPU layout does not give without a copy of every activation, cuDNN's grouped
      3-D kernels are slower than its dense ones, and every norm, attention and temporal interleave would have to
      know the groups;
    - (this) each half's convolution with its decoder's merged weights, concatenated, and everything else — norms,
      SiLU, causal padding and cache copies, upsampling, attention, the temporal interleave — once over the batch of
      two: the same convolutions as the separate decodes (their values to float32 rounding) and half the launches of
      all other work.
    Memory: one chunk's activations for both decoders are alive at once (twice one decoder's), where the separate
    decodes hold one decoder's chunk at a time; both keep both causal caches.
    Measured on an H100 at 81 × 480 × 832 (docs/benchmarks.md): the separate decodes' PSNR against fp32, but slower
    (bf16 channels-last 2.25 s against 2.01 s) and heavier (8.7 against 5.1 GiB): the kernels already ran back to
    back, and the concatenations add bytes. So RGBAlphaVAE decodes one decoder after the other unless asked
    (`dual=True`).
    """

    def __init__(self, first: WanVAE, second: WanVAE) -> None:
        super().__init__()
        if first.config != second.config:
            raise ValueError("DecoderPair: the two decoders have different VAEConfigs")
        self.first, self.second = first, second
        self.conv2 = pair_modules(first.conv2, second.conv2)
        self.decoder = pair_modules(first.decoder, second.decoder)

    def frames(self, z: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Normalised latent (B, z_dim, T, h, w) → for each decode chunk (latent frame 0, then `first.decode_chunk`
        latent frames at a time), (first's, second's) video chunk."""
        latent = self.first.denormalise(z)
        self.first.check_latent(latent)
        latent = latent.to(self.first.conv2.weight.dtype)
        x = self.conv2(torch.cat([latent, latent]))
        cache = CausalCache()  # a batch of two: the norms write no rooms (_normed_frames takes one sample)
        n = z.shape[0]
        for chunk in decode_chunks(x.shape[2], self.first.decode_chunk):
            y = self.decoder(x[:, :, chunk], cache)
            yield y[:n], y[n:]
