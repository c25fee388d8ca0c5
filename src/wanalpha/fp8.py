"""FP8 weights for the DiT's block linears (issue #29): per-output-channel scaled float8_e4m3fn weights, an FP8 linear
that runs them, the module surgery that puts it into a WanDiT, and the streamed quantisation of a checkpoint.

Format. A linear of weight W (out, in) becomes q = saturate(W / s) in float8_e4m3fn and s (out,) float32 with
s_j = max|W_j·| / 448 (448: e4m3fn's largest finite value; an all-zero row gets s_j = 1), so W ≈ diag(s) q. Each
element is rounded once, to 4 significant bits: |W − diag(s) q| ≤ max(2⁻⁴ |W|, 2⁻¹⁰ s_j) elementwise (the second
term is the spacing of e4m3's subnormals, below 2⁻⁶ in the scaled units). The state dict of an `FP8Linear` holds
`weight` (float8_e4m3fn, (out, in)), `weight_scale` (float32, (out,)) and `bias` (the model dtype).

ComfyUI's FP8 checkpoints (read from comfyanonymous/ComfyUI `comfy/utils.py::convert_old_quants`, `comfy/ops.py`,
`comfy/quant_ops.py`, 2025): the older "fp8_scaled" files (e.g. the Wan2.1 `*_fp8_scaled.safetensors` releases) mark
themselves with a `scaled_fp8` tensor and store `<layer>.weight` (float8_e4m3fn) with `<layer>.scale_weight`, a
float32 *per-tensor* scale (and optionally `<layer>.scale_input`, a static activation scale); the newer files store
`<layer>.weight_scale` (per-tensor) with a `<layer>.comfy_quant` tensor (JSON bytes, {"format": "float8_e4m3fn"}) or a
`_quantization_metadata` header. Plain `*_fp8_e4m3fn` files hold unscaled float8 weights (scale 1). All of these are
read here (`read_fp8_state_dict_streaming`): a per-tensor scale is the per-channel scale with every s_j equal, so the
dequantised weights are exactly ComfyUI's (up to its bf16 rounding of the product). ComfyUI cannot read our files:
its FP8 layout takes one scale per tensor, and a (out,) `weight_scale` would broadcast over the wrong dimension; our
files carry no `comfy_quant` marker, so ComfyUI never takes them for its own.

Compute. On CUDA GPUs of compute capability 9.0 (Hopper) or newer, without gradients through the input, `FP8Linear`
runs one FP8 GEMM (`torch._scaled_mm`, rowwise scaling): the activations are quantised per token (one scale per row
of x, its max|x| / 448) and the weight keeps its per-output-channel scale, so the GEMM output is rescaled by
s_x(token) · s_w(channel); the bias is added in the GEMM's epilogue, with Hopper's fast accumulation (`GEMM`).
Everywhere else (CPU, older GPUs, training through the layer) it dequantises the weight to the compute dtype and runs
F.linear: weight-only quantisation, the path the CPU tests check.

Adapters. `FP8Linear` is an `nn.Linear` whose `weight` is a property returning the dequantised weight in its compute
dtype, so peft's LoRA/DoRA injection (`adapters.inject_dora`) wraps it as any linear and DoRA's weight norm reads the
dequantised base: training differentiates the adapters through the dequantised FP8 base (the base stays frozen).
For generation, merge DoRA/LoRA files into the bf16 weights (`adapters.merge_dora` / `merge_lora`) *before*
`quantize_dit_`: a merge after it finds no parameter to change.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from wanalpha.errors import WanAlphaError
from wanalpha.models import kernels
from wanalpha.runtime import compute_dtype

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
_RECIPROCAL = 1.0 / FP8_MAX  # rounded to float32 where it multiplies (quantize_rows_eager)

# The block linears that become FP8 (relative to a DiTBlock); norms, embeddings, modulation and the head stay.
BLOCK_TARGETS = (
    "self_attn.q",
    "self_attn.k",
    "self_attn.v",
    "self_attn.o",
    "cross_attn.q",
    "cross_attn.k",
    "cross_attn.v",
    "cross_attn.o",
    "ffn.0",
    "ffn.2",
)


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A (out, in) weight → (q, scale): q float8_e4m3fn (out, in), scale float32 (out,), w ≈ scale[:, None] · q.
    Computed in float32; the scale of an all-zero row (or one too small for a normal float32 scale) is 1."""
    if w.ndim != 2:
        raise ValueError(f"quantize_weight takes a 2-D (out, in) weight, got shape {tuple(w.shape)}")
    w32 = w.float()
    scale = w32.abs().amax(dim=1) / FP8_MAX
    scale = torch.where(scale >= torch.finfo(torch.float32).tiny, scale, torch.ones_like(scale))
    q = (w32 / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """scale[:, None] · q, computed in float32 and rounded once to `dtype`."""
    return (q.float() * scale.float()[:, None]).to(dtype)


def scaled_mm_supported(device: torch.device) -> bool:
    """Whether FP8Linear can run an FP8 GEMM on `device`: CUDA of compute capability ≥ 9.0 with torch._scaled_mm."""
    return (
        device.type == "cuda"
        and hasattr(torch, "_scaled_mm")
        and torch.cuda.is_available()
        and torch.cuda.get_device_capability(device) >= (9, 0)
    )


def gemm_takes(out_features: int, in_features: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether an FP8 GEMM (torch._scaled_mm) takes an (out_features, in_features) weight's product computed in
    `dtype` on `device`: bf16, both sizes multiples of 16, a device with the GEMM (scaled_mm_supported). FP8Linear's
    forward and the fused adapter linear's (train-dit --fp8-gemm) ask it."""
    return dtype == torch.bfloat16 and out_features % 16 == 0 and in_features % 16 == 0 and scaled_mm_supported(device)


def check_device(device: torch.device) -> None:
    """Refuse, in one line, a device that cannot hold and convert float8 tensors (--dit-dtype fp8 needs only that:
    elsewhere than on Hopper FP8Linear dequantises its weights and multiplies in bf16)."""
    try:
        probe = torch.ones(2, 2, device=device).to(FP8_DTYPE)
        dequantize(probe, torch.ones(2, device=device))
    except (RuntimeError, TypeError, NotImplementedError, AssertionError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0].split(". ")[0][:120]
        raise WanAlphaError(
            f"--dit-dtype fp8: the device {device} has no float8 support ({reason}); use --dit-dtype bf16"
        ) from None


def quantize_rows_eager(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition quantize_rows computes: scale = max(max|x_row| · (1/448), float32 tiny), the product in float32
    (a multiplication by the float32 reciprocal, the same bits on every device: PyTorch divides by a Python scalar
    through its reciprocal on CUDA but not on the CPU), then q = clamp(x / scale, ±448) rounded to float8_e4m3fn."""
    scale = (x.abs().amax(dim=1, keepdim=True).float() * _RECIPROCAL).clamp(min=torch.finfo(torch.float32).tiny)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A (rows, in) activation → (q, scale): q float8_e4m3fn, scale (rows, 1) float32, x ≈ scale · q, as
    quantize_rows_eager defines them. On CUDA one fused Triton pass (wanalpha.models.kernels.fp8_quantize_rows, the same
    bits); the eager form writes four float32-sized intermediates, which made the FP8 GEMM slower than bf16's."""
    fused = kernels.fp8_quantize_rows(x.contiguous(), FP8_DTYPE, FP8_MAX, _RECIPROCAL)
    return quantize_rows_eager(x) if fused is None else fused


# How FP8Linear's GEMM runs (benchmarks/fp8.py measures each; docs/benchmarks.md): "bias_in_gemm" adds the bias in
# the GEMM's epilogue (to the float32 result, one rounding to bf16) rather than as a second pass over the bf16 output;
# "fast_accum" takes Hopper's fast FP8 accumulation (use_fast_accum: the partial sums are not promoted to full float32
# at intervals). Both on: at the 14B shapes on an H200 they take 0.2 s off a forward (2.506 → 2.307 s) for an output
# error against bf16 of 6.16e-2 where the full accumulation's is 5.94e-2 (3.75e-2 per linear either way).
GEMM = {"bias_in_gemm": True, "fast_accum": True}


@contextlib.contextmanager
def gemm_settings(**settings: bool) -> Iterator[None]:
    """GEMM's settings changed inside the block (generate's --fp8-accumulation full: fast_accum=False), restored
    after it; a torch.compile'd model reads them when it is traced."""
    unknown = sorted(set(settings) - set(GEMM))
    if unknown:
        raise ValueError(f"unknown FP8 GEMM setting(s) {', '.join(unknown)}: choose from {', '.join(GEMM)}")
    before = dict(GEMM)
    GEMM.update(settings)
    try:
        yield
    finally:
        GEMM.clear()
        GEMM.update(before)


def _scaled_mm_linear(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias, out_dtype, quantize=None
) -> torch.Tensor:
    """x (…, in) @ (diag(scale) q)ᵀ + bias by one FP8 GEMM: x quantised per token (rowwise scales, by `quantize`:
    quantize_rows by default, or quantize_rows_eager for the benchmarks' before/after), bf16 output; GEMM's
    settings."""
    xq, x_scale = (quantize or quantize_rows)(x.reshape(-1, x.shape[-1]))
    return fp8_gemm(xq, x_scale, q, scale, bias, out_dtype).view(*x.shape[:-1], q.shape[0])


def fp8_gemm(
    xq: torch.Tensor, x_scale: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias, out_dtype
) -> torch.Tensor:
    """The FP8 GEMM of quantised rows (xq, x_scale) with a quantised weight: (rows, out) in out_dtype."""
    fused_bias = bias is not None and GEMM["bias_in_gemm"]
    y = torch._scaled_mm(
        xq,
        q.t(),
        scale_a=x_scale,
        scale_b=scale.float()[None, :],
        bias=bias.to(out_dtype) if fused_bias else None,
        out_dtype=out_dtype,
        use_fast_accum=GEMM["fast_accum"],
    )
    if bias is not None and not fused_bias:
        y = y + bias.to(out_dtype)
    return y


def use_adapter_fp8_gemm(model: nn.Module, on: bool = True) -> int:
    """Set every FP8Linear of `model` to run (or not) its trained adapters' forward base GEMM in FP8
    (FP8Linear.adapter_fp8_gemm; train-dit --fp8-gemm); the number of FP8Linears."""
    layers = [m for m in model.modules() if isinstance(m, FP8Linear)]
    for layer in layers:
        layer.adapter_fp8_gemm = on
    return len(layers)


class FP8Linear(nn.Linear):
    """A frozen linear with an FP8 weight (per-output-channel scale) and a bias in `compute_dtype`. `weight` is the
    dequantised weight (computed on each access, in compute_dtype); the stored FP8 data is the `weight_fp8` buffer,
    saved and loaded under the state-dict key `weight`, beside `weight_scale`."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        nn.Module.__init__(self)  # not nn.Linear's: it would create a full-precision weight parameter
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = dtype  # also what peft reads for the adapters' dtype (as for bitsandbytes' linears)
        self.fp8_compute = True  # FP8 GEMMs where scaled_mm_supported; False: always the weight-only fallback
        # Under trained adapters (the fused adapter linear, wanalpha.fused_adapter): whether their forward's base GEMM
        # is FP8 too (train-dit --fp8-gemm); off, the adapters train through the dequantised weight.
        self.adapter_fp8_gemm = False
        # Not "qweight": peft takes a base layer with a `qweight` for a GPTQ linear and reads its dtype from it.
        self.register_buffer("weight_fp8", torch.zeros(out_features, in_features, dtype=FP8_DTYPE, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> FP8Linear:
        """An FP8Linear with `linear`'s quantised weight and its bias, computing in `linear`'s weight dtype. A linear
        on the meta device gives a meta FP8Linear (for loading a quantised state dict with assign=True)."""
        weight = linear.weight
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, weight.device, weight.dtype)
        if not weight.is_meta:
            with torch.no_grad():
                q, scale = quantize_weight(weight.detach())
                module.weight_fp8.copy_(q)
                module.weight_scale.copy_(scale)
                if linear.bias is not None:
                    module.bias.copy_(linear.bias.detach())
        return module

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return dequantize(self.weight_fp8, self.weight_scale, self.compute_dtype)

    def _gemm_applies(self, x: torch.Tensor, dtype: torch.dtype) -> bool:
        """Whether x goes through the FP8 GEMM (else: the weight-only fallback)."""
        return (
            self.fp8_compute
            and not (torch.is_grad_enabled() and x.requires_grad)
            and gemm_takes(self.out_features, self.in_features, dtype, x.device)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x.device, x.dtype)
        if self._gemm_applies(x, dtype):
            return _scaled_mm_linear(x, self.weight_fp8, self.weight_scale, self.bias, dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), dequantize(self.weight_fp8, self.weight_scale, dtype), bias)

    @staticmethod
    def shared_input(layers: Sequence[FP8Linear], x: torch.Tensor) -> list[torch.Tensor] | None:
        """[layer(x) for layer in layers] for FP8Linears that read one x (a self-attention's q, k and v) with x
        quantised once for all their FP8 GEMMs: the codes and scales each layer would compute for itself, so the same
        outputs bit for bit, less a quantisation pass over x per extra layer. None where one of them would not take
        its FP8 GEMM or carries hooks of its own (the caller then calls each layer)."""
        dtype = compute_dtype(x.device, x.dtype)
        if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
            return None  # hooks registered for every module's call: each layer is called
        if not all(
            type(layer) is FP8Linear
            and layer.in_features == x.shape[-1]
            and layer._gemm_applies(x, dtype)
            and not (layer._forward_hooks or layer._forward_pre_hooks)
            for layer in layers
        ):
            return None
        xq, x_scale = quantize_rows(x.reshape(-1, x.shape[-1]))
        return [
            fp8_gemm(xq, x_scale, layer.weight_fp8, layer.weight_scale, layer.bias, dtype).view(
                *x.shape[:-1], layer.out_features
            )
            for layer in layers
        ]

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = destination.pop(prefix + "weight_fp8")

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        key = prefix + "weight"
        if key in state_dict:
            weight = state_dict.pop(key)
            if weight.dtype != FP8_DTYPE:
                error_msgs.append(
                    f"{key}: a {weight.dtype} weight for an FP8 linear; quantise it first "
                    "(wanalpha.fp8.quantize_state_dict_streaming)"
                )
                return
            state_dict[prefix + "weight_fp8"] = weight
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if prefix + "weight_fp8" in missing_keys:
            missing_keys[missing_keys.index(prefix + "weight_fp8")] = key

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8=e4m3fn, compute_dtype={self.compute_dtype}"


def quantize_dit_(dit: nn.Module, targets: Sequence[str] = BLOCK_TARGETS) -> int:
    """Replace the block linears `targets` (paths within each block, default BLOCK_TARGETS) of a WanDiT with
    FP8Linears, in place, once at build time (before adapters are injected); returns how many were replaced. Linears
    that are FP8 already are left; a peft-wrapped one is refused (merge or inject adapters around the FP8 model)."""
    count = 0
    for index, block in enumerate(dit.blocks):
        for path in targets:
            parent_path, _, name = path.rpartition(".")
            parent = block.get_submodule(parent_path) if parent_path else block
            module = getattr(parent, name)
            if isinstance(module, FP8Linear):
                continue
            if type(module) is not nn.Linear:
                raise WanAlphaError(
                    f"blocks.{index}.{path} is a {type(module).__name__}, not a plain linear: quantise the DiT "
                    "before injecting adapters (merge DoRA/LoRA files into the bf16 weights first)"
                )
            setattr(parent, name, FP8Linear.from_linear(module))
            count += 1
    return count


def _target_pattern(targets: Sequence[str]) -> re.Pattern:
    return re.compile(r"blocks\.\d+\.(" + "|".join(re.escape(t) for t in targets) + r")\.weight")


def quantize_state_dict_streaming(
    tensors: Iterable[tuple[str, torch.Tensor]], targets: Sequence[str] = BLOCK_TARGETS
) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) pairs of a DiT checkpoint (e.g. read one at a time from safetensors shards) → the pairs of the
    FP8 model's state dict: each block-linear weight is quantised as it arrives (`…weight` float8 and
    `…weight_scale` float32 in its place), everything else passes through unchanged (the loader casts it). Holds
    one tensor at a time."""
    pattern = _target_pattern(targets)
    for key, tensor in tensors:
        if pattern.fullmatch(key):
            q, scale = quantize_weight(tensor)
            yield key, q
            yield key[: -len("weight")] + "weight_scale", scale
        else:
            yield key, tensor


COMFY_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def read_fp8_state_dict_streaming(
    tensors: Iterable[tuple[str, torch.Tensor]],
    targets: Sequence[str] = BLOCK_TARGETS,
    name: str = "(state dict)",
    quantise: bool = True,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) pairs of any DiT checkpoint → the FP8 model's state-dict pairs: a bf16/fp32 release (quantised
    as it streams), our own FP8 files, or ComfyUI's FP8 Wan files (`scaled_fp8` + `scale_weight`, `weight_scale` +
    `comfy_quant`, plain float8 weights; `model.diffusion_model.` prefixes dropped). A target linear's per-tensor
    scale becomes the per-channel one (equal entries); a float8 weight outside the targets is dequantised (float32).
    Static activation scales (`scale_input`, `input_scale`) are dropped: the FP8 GEMM scales activations per token.
    A float8 weight waits (in float8) until its scale has been read; nothing else is held. quantise=False: the
    unquantised tensors pass through as they are (the loader quantises them after merging adapters)."""
    pattern = _target_pattern(targets)
    waiting: dict[str, torch.Tensor] = {}  # layer → float8 weight without its scale yet
    scales: dict[str, torch.Tensor] = {}  # layer → scale read before its weight

    def finish(layer: str, weight: torch.Tensor, scale: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        scale = scale.float().reshape(-1)
        if scale.numel() == 1:
            scale = scale.expand(weight.shape[0]).clone()
        if scale.numel() != weight.shape[0]:
            raise WanAlphaError(
                f"{name}: {layer}.weight_scale has {scale.numel()} entries for a weight of {weight.shape[0]} rows; "
                "only per-tensor and per-output-channel FP8 scales are supported"
            )
        if weight.dtype != FP8_DTYPE:  # float8_e5m2 or another: requantised to e4m3fn
            weight, scale = quantize_weight(dequantize(weight, scale, torch.float32))
        if pattern.fullmatch(f"{layer}.weight"):
            yield f"{layer}.weight", weight
            yield f"{layer}.weight_scale", scale
        else:
            yield f"{layer}.weight", dequantize(weight, scale, torch.float32)

    for key, tensor in tensors:
        for prefix in COMFY_PREFIXES:
            key = key.removeprefix(prefix)
        layer, _, leaf = key.rpartition(".")
        if key == "scaled_fp8" or leaf in ("scale_input", "input_scale"):
            continue
        if leaf == "comfy_quant":
            fmt = json.loads(bytes(tensor.tolist()).decode("utf-8")).get("format")
            if fmt not in ("float8_e4m3fn", "float8_e5m2"):
                raise WanAlphaError(f"{name}: {layer} is quantised as {fmt!r}; only FP8 (float8_e4m3fn) is supported")
            continue
        if leaf in ("scale_weight", "weight_scale"):
            if layer in waiting:
                yield from finish(layer, waiting.pop(layer), tensor)
            else:
                scales[layer] = tensor
            continue
        if leaf == "weight" and tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            if layer in scales:
                yield from finish(layer, tensor, scales.pop(layer))
            else:
                waiting[layer] = tensor
            continue
        yield from quantize_state_dict_streaming([(key, tensor)], targets if quantise else ())
    for layer, weight in waiting.items():  # float8 weights without a scale: plain fp8 files (scale 1)
        yield from finish(layer, weight, torch.ones(1))
    if scales:
        raise WanAlphaError(
            f"{name}: scales without float8 weights for {', '.join(sorted(scales)[:3])}; the file is damaged"
        )
