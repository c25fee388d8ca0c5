"""FlashAttention-3 as the DiT's self-attention kernel for inference (wanalpha.models.fa3): choosing it, the per-head
FP8 quantisation of its FP8 forward (means moved out of keys and values, exactly), and its plumbing on the CPU, with
a float32 stand-in for the package's `flash_attn_func` that dequantises as the kernel does. The real kernels run in
tests/test_gpu.py."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import rel_err
from wanalpha.errors import ConfigError
from wanalpha.models import fa3, fa4, kernels
from wanalpha.models.dit import DIT_VARIANTS, WanDiT
from wanalpha.models.layers import attention
from wanalpha.runtime import set_attention_kernel


class StandIn:
    """flash_attn_interface.flash_attn_func in float32: (B, L, H, d) inputs, FP8 ones multiplied by their (B, H)
    descales (as the kernel does), the output bf16 for FP8 inputs and the inputs' dtype otherwise."""

    calls: list[torch.dtype] = []

    @classmethod
    def flash_attn_func(cls, q, k, v, softmax_scale, causal, q_descale=None, k_descale=None, v_descale=None):
        assert q.dtype == k.dtype == v.dtype and not causal and q.is_contiguous()
        cls.calls.append(q.dtype)
        fp8 = q.dtype == fa3.FP8
        if fp8:
            for s in (q_descale, k_descale, v_descale):
                assert s.shape == (q.shape[0], q.shape[2]) and s.dtype == torch.float32
            q, k, v = (t.float() * s[:, None, :, None] for t, s in ((q, q_descale), (k, k_descale), (v, v_descale)))
        scores = torch.einsum("blhd,bmhd->bhlm", q.float(), k.float()) * softmax_scale
        out = torch.einsum("bhlm,bmhd->blhd", scores.softmax(-1), v.float())
        return out.to(torch.bfloat16 if fp8 else q.dtype)


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setattr(fa3, "_module", StandIn)
    monkeypatch.setattr(fa3, "_missing", None)
    StandIn.calls = []
    return StandIn


def _exact(q, k, v):
    scores = torch.einsum("blhd,bmhd->bhlm", q.double(), k.double()) / math.sqrt(q.shape[-1])
    return torch.einsum("bhlm,bmhd->blhd", scores.softmax(-1), v.double())


def _qkv(offset: float = 0.0, length: int = 64, heads: int = 3, d: int = 32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, length, heads, d, generator=gen) for _ in range(3))
    return q, k + offset, v + offset  # keys and values with a common offset


def test_kernel_choice() -> None:
    """fa3 and fa3-fp8 are explicit choices (auto never takes them): where they cannot run, a one-line config
    error says why and what to do; training is refused (forward only)."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with pytest.raises(ConfigError, match=r"'fa3' \(--attention fa3\): .*not on cpu; use --attention auto"):
        fa4.kernel("fa3", cpu, torch.bfloat16)
    with pytest.raises(ConfigError, match="inference only"):
        fa4.kernel("fa3-fp8", cuda, torch.bfloat16, backward=True)
    with pytest.raises(ConfigError, match="not float32"):
        fa4.kernel("fa3", cuda, torch.float32)
    with pytest.raises(ConfigError, match="head sizes 8 to 256 in steps of 8, not 100"):
        fa4.kernel("fa3-fp8", cuda, torch.bfloat16, head_dim=100)
    with pytest.raises(ConfigError, match="choose one of auto, sdpa, fa4, fa3, fa3-fp8"):
        fa4.kernel("fp8", cpu, torch.bfloat16)


def test_kernel_choice_on_hopper(monkeypatch) -> None:
    """On a Hopper GPU: without the package, the error says how to build it; with it, its first run decides;
    other GPUs are refused (its kernels are Hopper's)."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    if fa3.load() is None:
        with pytest.raises(ConfigError, match=r"cannot be imported \(ModuleNotFoundError: .*hopper/"):
            fa4.kernel("fa3", cuda, torch.bfloat16)
    monkeypatch.setattr(fa3, "_module", StandIn)
    monkeypatch.setattr(fa3, "_missing", None)
    monkeypatch.setitem(fa3._probed, (0, False, 128), None)
    monkeypatch.setitem(fa3._probed, (0, True, 128), "its FP8 forward fails on this GPU (RuntimeError: not built)")
    monkeypatch.setitem(fa3._probed, (0, True, 64), None)  # a build holds some head sizes' kernels only
    assert fa4.kernel("fa3", cuda, torch.bfloat16) == "fa3"
    assert fa4.kernel("fa3-fp8", cuda, torch.bfloat16, head_dim=64) == "fa3-fp8"
    assert fa4.kernel("auto", cuda, torch.bfloat16) in ("fa4", "sdpa")  # never fa3 by itself
    with pytest.raises(ConfigError, match=r"FP8 forward fails on this GPU \(RuntimeError: not built\); use"):
        fa4.kernel("fa3-fp8", cuda, torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (10, 0))
    with pytest.raises(ConfigError, match=r"Hopper's \(compute capability 9.x\), not 10.0"):
        fa4.kernel("fa3", cuda, torch.bfloat16)


@pytest.mark.parametrize("center", [False, True])
def test_quantisation_round_trip(center: bool) -> None:
    """codes · scale (+ mean) gives x back within float8_e4m3's rounding (half a step: 2⁻⁴ relative), the largest
    |x − mean| of each sample and head maps to 448, and the mean is the tokens' mean."""
    x, _, _ = _qkv(offset=0.0)
    x = x + 5.0
    codes, scale, mean = fa3.quantize(x, center)
    assert codes.dtype == torch.float8_e4m3fn and scale.shape == (2, 3)
    centred = x - mean[:, None] if center else x
    assert (mean is not None) == center
    if center:
        assert torch.allclose(mean, x.mean(1), atol=1e-6)
    assert torch.equal(codes.float().abs().amax(dim=(1, 3)), torch.full((2, 3), 448.0))
    back = codes.float() * scale[:, None, :, None]
    assert ((back - centred).abs() <= centred.abs() / 16 + scale[:, None, :, None] * 2**-9).all()


def test_fp8_attention_is_exact_in_its_shifts(stand_in) -> None:
    """Moving the keys' and values' means out before quantising changes nothing but the rounding: with a large
    offset common to every key and value (as Wan's heads carry), the FP8 result errs as little as without it (error
    measured on the part of the output that varies), where quantising the raw tensors errs many times more."""
    errors = {}
    for offset in (0.0, 30.0):
        q, k, v = _qkv(offset)
        exact = _exact(q, k, v)
        varying = (exact - v.double().mean(1, keepdim=True)).norm()
        errors[offset] = ((attention(q, k, v, kernel="fa3-fp8").double() - exact).norm() / varying).item()
        raw = [fa3.quantize(t, center=False) for t in (q, k, v)]
        naive = StandIn.flash_attn_func(
            *(c for c, _, _ in raw), 1 / math.sqrt(q.shape[-1]), False, *(s for _, s, _ in raw)
        )
        errors[offset, "raw"] = ((naive.double() - exact).norm() / varying).item()
    assert errors[0.0] < 0.08 and errors[30.0] < 1.1 * errors[0.0], errors
    assert errors[30.0, "raw"] > 10 * errors[30.0], errors
    assert stand_in.calls.count(torch.float8_e4m3fn) == 4


def test_fp8_attention_adds_the_mean_with_one_rounding(stand_in) -> None:
    """The values' mean goes back onto the kernel's bf16 output in place, the float32 sum rounded once: the bf16
    result is the float32 result rounded."""
    q, k, v = (t.bfloat16() for t in _qkv(3.0))
    assert torch.equal(fa3.attention_fp8(q, k, v), fa3.attention_fp8(q, k, v, dtype=torch.float32).bfloat16())


def test_fp8_attention_hands_the_mean_to_the_bias_kernel(stand_in, monkeypatch) -> None:
    """The values' mean goes onto the kernel's output through kernels.add_row_bias_ (PyTorch's broadcast add is its
    strided kernel on the GPU): the output as (tokens of every sample, heads · d) rows and the mean per sample (the
    kernel's own bits are tests/test_kernels.py's and test_gpu.py's; here a PyTorch stand-in adds them)."""
    q, k, v = (t.bfloat16() for t in _qkv(3.0))
    kernel = fa3._call
    monkeypatch.setattr(fa3, "_call", lambda *a, **kw: kernel(*a, **kw).contiguous())  # as FlashAttention-3's output
    fallback = fa3.attention_fp8(q, k, v)  # the CPU: the kernel does not apply, PyTorch's add_
    calls = []

    def add_row_bias_(x, bias, tokens=None):
        calls.append((tuple(x.shape), tuple(bias.shape), tokens, x.is_contiguous()))
        x.view(bias.shape[0], -1, x.shape[1]).add_(bias[:, None])
        return True

    monkeypatch.setattr(fa3.kernels, "add_row_bias_", add_row_bias_)
    out = fa3.attention_fp8(q, k, v)
    b, length, heads, d = q.shape
    assert calls == [((b * length, heads * d), (b, heads * d), length, True)]
    assert torch.equal(out, fallback)


@pytest.mark.parametrize("d", [64, 128])
def test_fp8_reference(stand_in, d: int) -> None:
    """attention_fp8_reference (the kernel's arithmetic in PyTorch, for measuring its error off Hopper) adds the
    rounding of P to float8 to what the dequantising stand-in computes: a little more error, of FP8's size, and the
    same with an offset on keys and values."""
    for offset in (0.0, 30.0):
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(2, 300, 3, d, generator=gen) for _ in range(3))
        k, v = k + offset, v + offset
        exact = _exact(q, k, v)
        varying = (exact - v.double().mean(1, keepdim=True)).norm()
        dequantised = attention(q, k, v, kernel="fa3-fp8").double()
        reference = fa3.attention_fp8_reference(q, k, v, rows=128)
        assert reference.dtype == v.dtype and reference.shape == q.shape
        to_exact = ((reference.double() - exact).norm() / varying).item()
        to_dequantised = ((reference.double() - dequantised).norm() / varying).item()
        assert 0.005 < to_dequantised < 0.05 and to_exact < 0.08, (offset, to_dequantised, to_exact)


def test_bf16_attention_equals_sdpa(stand_in) -> None:
    """kernel="fa3" hands the package bf16 (v's dtype) contiguous tensors and returns its output."""
    q, k, v = (t.bfloat16() for t in _qkv())
    expected = attention(q, k, v, kernel="sdpa")
    assert rel_err(attention(q.float(), k, v, kernel="fa3"), expected) < 1e-2
    assert stand_in.calls == [torch.bfloat16]


def test_dit_with_fp8_attention(stand_in) -> None:
    """A DiT whose self-attention runs "fa3-fp8" (cross-attention stays on SDPA) gives the SDPA forward within FP8
    attention's error, every block through the FP8 path."""
    torch.manual_seed(0)
    dit = WanDiT(DIT_VARIANTS["tiny"]).eval()
    gen = torch.Generator().manual_seed(1)
    x, context = torch.randn(1, 16, 3, 8, 8, generator=gen), torch.randn(1, 16, 64, generator=gen)
    t = torch.tensor([700])
    with torch.no_grad():
        expected = dit(x, t, context)
        dit.blocks[0].self_attn.kernel = "x"  # set_attention_kernel hands every block the kernel
        set_attention_kernel(dit, "sdpa", torch.device("cpu"), torch.float32, backward=False)
        for block in dit.blocks:
            block.self_attn.kernel = "fa3-fp8"  # the stand-in needs no GPU; fa4.kernel would refuse the CPU
        out = dit(x, t, context)
    assert stand_in.calls == [torch.float8_e4m3fn] * dit.config.num_layers
    assert 0 < rel_err(out, expected) < 3e-2


def test_fused_quantisation_in_the_interpreter(monkeypatch) -> None:
    """kernels.head_stats and head_quantize (Triton's interpreter on the CPU): the statistics are PyTorch's to
    float32 rounding (a fixed summation order, chunks of 64 tokens, a partial last one), and the clamped quotients
    before the rounding to float8 are the eager form's bit for bit (the interpreter rounds float8 its own way, wrongly
    at powers of two; the GPU test compares the codes' bits)."""
    pytest.importorskip("triton")
    import os
    import sys

    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton's interpreter runs only where tests/conftest.py turned it on (no CUDA)")
    monkeypatch.setattr(kernels, "interpret_on_cpu", True)
    monkeypatch.setattr(kernels, "_failed", False)
    sys.modules.pop("wanalpha.models.triton_kernels", None)
    kernels._sources.cache_clear()
    try:
        gen = torch.Generator().manual_seed(3)
        x = (torch.randn(2, 600, 2, 16, generator=gen) * 3 + 1).bfloat16()
        total, low, high = kernels.head_stats(x)
        xf = x.float()
        assert torch.allclose(total, xf.sum(1), rtol=1e-5, atol=1e-4)
        assert torch.equal(low, xf.amin(1)) and torch.equal(high, xf.amax(1))
        mean, scale = fa3.scales(x, center=True)
        for centre in (mean, None):
            quotient = kernels.head_quantize(x, centre, scale, torch.float32, fa3.FP8_MAX)
            expected = x.float() - centre[:, None] if centre is not None else x.float()
            assert torch.equal(quotient, (expected / scale[:, None, :, None]).clamp(-fa3.FP8_MAX, fa3.FP8_MAX))
    finally:
        sys.modules.pop("wanalpha.models.triton_kernels", None)
        kernels._sources.cache_clear()
