"""The fused DiT kernels (wanalpha.models.kernels) against the PyTorch forms they replace, run by Triton's
interpreter on the CPU (skipped where Triton is not installed; tests/test_gpu.py runs them compiled on a GPU, bf16
included: the interpreter truncates where the GPU rounds bf16, so float16 stands for the rounded dtypes here)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from wanalpha.models import kernels
from wanalpha.models.layers import LayerNorm, RMSNorm, apply_rope, rope_frequencies, rope_grid

pytest.importorskip("triton")

DTYPES = [torch.float16, torch.float32]


@pytest.fixture
def interpreted(monkeypatch):
    """The kernel sources compiled for Triton's interpreter (which runs them on CPU tensors), no gradients; counts
    the launches in `launched`."""
    launched = []
    real_launch = kernels._launch

    def counting(kernel, *args, **meta):
        launched.append(getattr(kernel, "__name__", type(kernel).__name__))
        return real_launch(kernel, *args, **meta)

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton's interpreter is off (tests/conftest.py turns it on where there is no CUDA)")
    monkeypatch.setattr(kernels, "interpret_on_cpu", True)
    monkeypatch.setattr(kernels, "_launch", counting)
    monkeypatch.setattr(kernels, "_failed", False)
    monkeypatch.setattr(kernels, "_failed_kernels", set())
    monkeypatch.setattr(kernels, "_failed_variants", set())
    monkeypatch.setattr(kernels, "_launched", False)
    sys.modules.pop("wanalpha.models.triton_kernels", None)  # decorated afresh, for the interpreter
    kernels._sources.cache_clear()
    with torch.no_grad():
        yield launched
    sys.modules.pop("wanalpha.models.triton_kernels", None)
    kernels._sources.cache_clear()


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """float16: bit for bit (the kernels round where the PyTorch forms round); float32: within the last bits (the
    norms' sums run in another order)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if actual.dtype == torch.float16:
        assert torch.equal(actual, expected)
    else:
        torch.testing.assert_close(actual, expected, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_modulate_matches_pytorch(interpreted, dtype) -> None:
    torch.manual_seed(0)
    x = (torch.randn(2, 7, 48) * 3 + 1).to(dtype)
    shift, scale = torch.randn(2, 1, 48), torch.randn(2, 1, 48)  # per sample: the kernel must index them by batch
    norm = LayerNorm(48, 1e-6, elementwise_affine=False)
    for out_dtype in (dtype, torch.float32):
        y = kernels.layer_norm(x, 1e-6, shift=shift, scale=scale, out_dtype=out_dtype)
        _close(y, (norm(x).float() * (1 + scale) + shift).to(out_dtype))
    assert interpreted == ["layer_norm_rows"] * 2


@pytest.mark.parametrize("dtype", DTYPES)
def test_affine_layer_norm_matches_pytorch(interpreted, dtype) -> None:
    torch.manual_seed(1)
    norm = LayerNorm(40, 1e-6, elementwise_affine=True)
    norm.weight.normal_()
    norm.bias.normal_()
    norm = norm.to(dtype)
    x = torch.randn(1, 9, 40).to(dtype)
    _close(kernels.layer_norm(x, 1e-6, norm.weight, norm.bias), norm(x))
    assert interpreted == ["layer_norm_rows"]


ROTATIONS = ["complex64", "complex128", "pairs32", "pairs64", "none"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rotations", ROTATIONS)
def test_rms_norm_rope_matches_pytorch(interpreted, dtype, rotations) -> None:
    """Every rotation form layers.apply_rope takes, float32 and float64 math; 2 samples of 14 tokens with 12 rotated
    (a padded sequence: the last two rows stay unrotated); 4 heads of 8."""
    torch.manual_seed(2)
    norm = RMSNorm(32).to(dtype)
    norm.weight.normal_()
    x = (torch.randn(2, 14, 32) * 2).to(dtype)
    table = rope_frequencies(8)
    rot = None
    if rotations != "none":
        complex_dtype = torch.complex128 if rotations.endswith("64") and rotations != "complex64" else torch.complex64
        rot = rope_grid(table.to(complex_dtype), 2, 2, 3)  # 12 rows
        if rotations.startswith("pairs"):
            rot = torch.view_as_real(rot)
    y = kernels.rms_norm_rope(x, norm.weight, norm.eps, rot, 8)
    heads = norm(x).unflatten(-1, (4, 8))
    expected = (apply_rope(heads, rot) if rot is not None else heads).flatten(2).to(dtype)
    _close(y, expected)
    assert interpreted == ["rms_norm_rope_rows"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_residual_is_exact(interpreted, dtype) -> None:
    torch.manual_seed(3)
    x, y = torch.randn(2, 5, 24).to(dtype), (torch.randn(2, 5, 24) * 4).to(dtype)
    gate = torch.randn(2, 1, 24)
    assert torch.equal(kernels.gated_residual(x, y, gate), x + (y * gate).type_as(x))
    assert interpreted == ["residual_rows"]
    # Without a gate (the cross-attention's residual), a float32 stream and a narrower y, and rows wider than one
    # program's block of channels (the grid's second axis).
    stream, wide = torch.randn(2, 5, 24), torch.randn(3, 4, 2500).to(dtype)
    assert torch.equal(kernels.gated_residual(stream, y, None), stream + y.type_as(stream))
    assert torch.equal(kernels.gated_residual(x, y, None), x + y.type_as(x))
    gate = torch.randn(3, 1, 2500)
    assert torch.equal(kernels.gated_residual(wide, wide * 2, gate), wide + (wide * 2 * gate).type_as(wide))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_dit_forward_matches_pytorch(interpreted, dtype) -> None:
    """A whole tiny DiT forward (2 samples with their own timesteps and prompts, as a guided step) with the fused
    kernels against set_fused_kernels(dit, False); every element-wise site took its kernel."""
    from wanalpha.models.dit import DIT_VARIANTS, WanDiT
    from wanalpha.runtime import set_fused_kernels

    torch.manual_seed(4)
    dit = WanDiT(DIT_VARIANTS["tiny"]).to(dtype).eval()
    dit.rope_precision = "float32"
    x = torch.randn(2, 16, 2, 4, 6)
    t = torch.tensor([900.0, 250.0])
    context = [torch.randn(5, 64), torch.randn(9, 64)]
    fused = dit(x, t, context)
    layers = dit.config.num_layers
    assert sorted(interpreted) == sorted(
        ["layer_norm_rows"] * (3 * layers + 1)
        + ["rms_norm_rope_rows"] * (4 * layers)
        + ["residual_rows"] * (3 * layers)
    )
    set_fused_kernels(dit, False)
    reference = dit(x, t, context)
    assert len(interpreted) == 10 * layers + 1  # no launch without them
    if dtype == torch.float32:
        torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)
    else:  # a last-bit difference in a norm's statistics can move a float16 rounding, and it propagates
        assert (fused.float() - reference.float()).abs().max() < 2e-2 * reference.float().abs().max()


def test_kernels_step_aside(interpreted, monkeypatch) -> None:
    """No kernel where gradients are wanted, or off the GPU without the interpreter."""
    x, gate = torch.randn(1, 3, 8), torch.randn(1, 1, 8)
    weight = torch.nn.Parameter(torch.ones(8))
    with torch.enable_grad():
        assert kernels.rms_norm_rope(x, weight, 1e-6) is None
        assert kernels.gated_residual(x.requires_grad_(), x, gate) is None
    x = x.detach()
    monkeypatch.setattr(kernels, "interpret_on_cpu", False)
    assert kernels.gated_residual(x, x, gate) is None
    assert interpreted == []


class _FailsWhen:
    """A kernel source that raises `error` where its compile-time arguments satisfy `when`, else launches `real`."""

    def __init__(self, real, error: type, when) -> None:
        self.__name__, self.real, self.error, self.when, self.tries = real.__name__, real, error, when, 0

    def __getitem__(self, grid):
        def launch(*args, **meta):
            if self.when(meta):
                self.tries += 1
                raise self.error("out of resource: shared memory" if self.error.__name__ == "OutOfResources" else "bad")
            return self.real[grid](*args, **meta)

        return launch


@pytest.mark.parametrize(
    "error, launched_before, set_aside, warning",
    [
        ("OutOfResources", True, "kernel", "rms_norm_rows does not fit this GPU"),
        ("OutOfResources", False, "kernel", "rms_norm_rows does not fit this GPU"),
        ("CompilationError", True, "variant", "rms_norm_rows failed with .*SILU=True"),
        ("RuntimeError", True, "variant", "rms_norm_rows failed with .*SILU=True"),
        ("CompilationError", False, "all", "Triton kernels unavailable"),
        ("RuntimeError", False, "all", "Triton kernels unavailable"),
    ],
)
def test_a_failed_launch_sets_aside_what_failed(interpreted, monkeypatch, error, launched_before, set_aside, warning):
    """A failed launch: one warning, one attempt, then PyTorch's form for what failed: the kernel in every variant
    where its tiles do not fit the GPU (OutOfResources); after a launch has succeeded here (Triton works), that
    kernel's variant alone (here the norm with its SiLU; the norm without it and the other kernels still run); before
    one has (Triton cannot compile or launch here), every kernel."""
    sources = kernels._sources()
    failing = _FailsWhen(sources.rms_norm_rows, type(error, (Exception,), {}), lambda meta: meta["SILU"])
    monkeypatch.setattr(sources, "rms_norm_rows", failing)
    monkeypatch.setattr(kernels, "_launched", launched_before)
    x = torch.randn(1, 8, 2, 3, 4).contiguous(memory_format=torch.channels_last_3d)
    gamma = torch.ones(8)
    with pytest.warns(UserWarning, match=warning):
        assert kernels.rms_norm_channels_last(x, gamma, 8**0.5, True) is None
    assert kernels.rms_norm_channels_last(x, gamma, 8**0.5, True) is None and failing.tries == 1  # not tried again
    without_silu = kernels.rms_norm_channels_last(x, gamma, 8**0.5, False)  # the same kernel, another variant
    assert (without_silu is not None) == (set_aside == "variant")
    if without_silu is not None:
        torch.testing.assert_close(without_silu, torch.nn.functional.normalize(x, dim=1) * 8**0.5)
    assert (kernels.layer_norm(torch.randn(1, 3, 8), 1e-6) is not None) == (set_aside != "all")
    assert kernels.applies(x, kernel="rms_norm_rows") == (set_aside == "variant")


def test_fp8_quantize_rows_keeps_nan_and_matches_the_eager_scales(interpreted) -> None:
    """FP8Linear's fused per-token quantisation: the rows' scales are the eager form's (wanalpha.fp8), and a NaN
    activation makes its row's scale NaN as torch.amax does (Triton's max and clamp drop NaN unless told: the row would
    come out finite, hiding a diverging run). The codes themselves are compared on the GPU (tests/test_gpu.py): the
    interpreter rounds float8 differently."""
    from wanalpha import fp8

    x = torch.randn(4, 100, generator=torch.Generator().manual_seed(0))
    x[1, 7] = float("nan")
    x[2] = 0
    _, scale = kernels.fp8_quantize_rows(x, fp8.FP8_DTYPE, fp8.FP8_MAX, fp8._RECIPROCAL)
    assert interpreted == ["fp8_quantize_rows"]
    _, eager = fp8.quantize_rows_eager(x)
    assert eager[1].isnan().all() and scale[1].isnan().all()
    assert torch.equal(scale[[0, 2, 3]], eager[[0, 2, 3]])


@pytest.mark.parametrize("scaled", [False, True])
def test_fp8_dequantize_scaled_matches_the_eager_forms(interpreted, scaled) -> None:
    """The fused adapter's W' over an FP8 base in one pass: the dequantised weight rounded to the base's dtype, then
    row-scaled in float32 (float16 stands for bf16 here, see the module's note), as fp8.dequantize then
    fused_adapter._scaled compute it."""
    from wanalpha import fp8
    from wanalpha.fused_adapter import _scaled

    gen = torch.Generator().manual_seed(3)
    q, scale = fp8.quantize_weight(torch.randn(50, 100, generator=gen) * 2)  # 5,000: one program's block and a part
    magnitude = torch.rand(50, generator=gen) + 0.5 if scaled else None
    norm = torch.rand(50, generator=gen) + 0.5 if scaled else None
    factor = None if magnitude is None else magnitude / norm
    out = kernels.fp8_dequantize_scaled(q, scale, torch.float16, factor, torch.float16)
    assert interpreted == ["fp8_dequantize_scaled"]
    assert torch.equal(out, _scaled(fp8.dequantize(q, scale, torch.float16), magnitude, norm, torch.float16))


def test_kernels_refuse_the_tensors_of_a_graph_being_traced(interpreted) -> None:
    """torch 2.11 traces a compiled block's backward with fake tensors while `torch.compiler.is_compiling()` says False
    (as it does here, under a bare FakeTensorMode; patching it would leak into dynamo's tables): the kernels must step
    aside for them, not launch (a failed launch switches every kernel off)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from wanalpha import fp8

    assert not torch.compiler.is_compiling()
    with FakeTensorMode():
        q, scale = torch.empty(4, 8, dtype=fp8.FP8_DTYPE), torch.ones(4)
        assert kernels.fp8_dequantize_scaled(q, scale, torch.float16, None, torch.float16) is None
        assert kernels.fp8_quantize_rows(torch.ones(4, 8), fp8.FP8_DTYPE, fp8.FP8_MAX, fp8._RECIPROCAL) is None
        assert kernels.gated_residual(torch.ones(1, 2, 8), torch.ones(1, 2, 8), torch.ones(1, 1, 8)) is None
    assert interpreted == [] and not kernels._failed
    q, scale = fp8.quantize_weight(torch.ones(4, 8))
    assert kernels.fp8_dequantize_scaled(q, scale[:3], torch.float16, None, torch.float16) is None  # 3 scales, 4 rows
    assert kernels.fp8_dequantize_scaled(q.view(torch.uint8), scale, torch.float16, None, torch.float16) is None
    assert kernels.fp8_dequantize_scaled(q, scale, torch.float16, None, torch.float16) is not None


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_row_bias_is_pytorchs_add(interpreted, dtype) -> None:
    """A bias added in place to rows of channels (kernels.add_row_bias_): per channel (a convolution's, onto its
    channels-last output) and per sample and channel (FP8 attention's values' mean, float32 onto a narrower output),
    the bits of PyTorch's broadcast add_, for row counts and widths that leave partial tiles."""
    gen = torch.Generator().manual_seed(5)
    for rows, channels in ((37, 96), (5, 1100)):
        x = (torch.randn(rows, channels, generator=gen) * 5).to(dtype)
        bias = (torch.randn(channels, generator=gen) * 3).to(dtype)
        expected = x.clone().add_(bias)
        assert kernels.add_row_bias_(x, bias) and torch.equal(x, expected)
    x = (torch.randn(2 * 13, 40, generator=gen) * 5).to(dtype)
    mean = torch.randn(2, 40, generator=gen)  # float32
    expected = x.clone().view(2, 13, 40).add_(mean[:, None]).view(26, 40)
    assert kernels.add_row_bias_(x, mean, tokens=13) and torch.equal(x, expected)
    assert interpreted == ["add_row_bias"] * 3
    assert not kernels.add_row_bias_(x, mean, tokens=12)  # the samples must cover the rows
    square = torch.zeros(40, 40, dtype=dtype)
    assert not kernels.add_row_bias_(square.t(), mean[0])  # not a contiguous (rows, C)
    assert not kernels.add_row_bias_(x, mean[:, None], tokens=13)  # a bias of three dimensions
    assert torch.equal(square, torch.zeros(40, 40, dtype=dtype)) and interpreted == ["add_row_bias"] * 3


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_row_bias_with_a_residual_is_two_adds(interpreted, dtype) -> None:
    """add_row_bias_ with a residual (a residual block's shortcut, added in the bias pass): the bits of PyTorch's
    x.add_(bias) then + residual, each rounded to x's dtype; a residual of another dtype, shape or layout is refused
    with x untouched."""
    gen = torch.Generator().manual_seed(8)
    for rows, channels in ((37, 96), (5, 1100)):
        x = (torch.randn(rows, channels, generator=gen) * 5).to(dtype)
        bias = (torch.randn(channels, generator=gen) * 3).to(dtype)
        residual = (torch.randn(rows, channels, generator=gen) * 4).to(dtype)
        expected = x.clone().add_(bias) + residual
        assert kernels.add_row_bias_(x, bias, residual=residual) and torch.equal(x, expected)
    assert interpreted == ["add_row_bias"] * 2
    before = x.clone()
    other = torch.float32 if dtype == torch.float16 else torch.float16
    for bad in (residual.to(other), residual[:-1], torch.zeros(channels, rows, dtype=dtype).t()):
        assert not kernels.add_row_bias_(x, bias, residual=bad)
    assert torch.equal(x, before) and interpreted == ["add_row_bias"] * 2


def test_vae_convolutions_add_their_bias_by_the_kernel(interpreted) -> None:
    """The VAE's convolutions (causal 3-D, and the 2-D ones of the resampling) on a channels-last input run without
    their bias and add it by add_row_bias_: the convolution with its bias, to float32's rounding; a contiguous input
    keeps PyTorch's own convolution with its bias."""
    from wanalpha.models.vae import CausalConv3d, Conv2d

    torch.manual_seed(6)
    conv3 = CausalConv3d(8, 12, 3, padding=1)
    conv2 = Conv2d(8, 12, 3, padding=1)
    conv3.weight.data = conv3.weight.data.contiguous(memory_format=torch.channels_last_3d)  # runtime.set_channels_last
    conv2.weight.data = conv2.weight.data.contiguous(memory_format=torch.channels_last)
    # cuDNN keeps the channels-last layout in a 3-D convolution's output; PyTorch's CPU convolution does not
    plain = conv3._conv_forward
    conv3._conv_forward = lambda *a: plain(*a).contiguous(memory_format=torch.channels_last_3d)
    x3 = torch.randn(1, 8, 3, 6, 5).contiguous(memory_format=torch.channels_last_3d)
    x2 = torch.randn(2, 8, 6, 5).contiguous(memory_format=torch.channels_last)
    for conv, x in ((conv3, x3), (conv2, x2)):
        padded = x if x.dim() == 4 else torch.nn.functional.pad(x, (0, 0, 0, 0, 2, 0))
        expected = conv._conv_forward(padded, conv.weight, conv.bias)
        interpreted.clear()
        out = conv(x)
        assert interpreted == ["add_row_bias"]
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
        interpreted.clear()
        torch.testing.assert_close(conv(x.contiguous()), expected, rtol=1e-6, atol=1e-6)
        assert interpreted == []


def test_vae_convolution_adds_a_residual_in_its_bias_pass(interpreted) -> None:
    """A causal convolution given a residual (ResidualBlock's shortcut) on a channels-last input adds it in the bias
    pass (one launch): the convolution with its bias plus the residual, to float32's rounding; with a residual in
    another layout, the bias pass and PyTorch's add."""
    from wanalpha.models.vae import CausalConv3d

    torch.manual_seed(9)
    conv = CausalConv3d(8, 12, 3, padding=1)
    conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last_3d)
    plain = conv._conv_forward
    conv._conv_forward = lambda *a: plain(*a).contiguous(memory_format=torch.channels_last_3d)  # as cuDNN's output
    x = torch.randn(1, 8, 3, 6, 5).contiguous(memory_format=torch.channels_last_3d)
    residual = torch.randn(1, 12, 3, 6, 5)
    expected = plain(torch.nn.functional.pad(x, (0, 0, 0, 0, 2, 0)), conv.weight, conv.bias) + residual
    calls = []
    real = kernels.add_row_bias_

    def recording(*args, residual=None, **kwargs):
        calls.append(residual is not None)
        return real(*args, residual=residual, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels, "add_row_bias_", recording)
        for layout, fused in ((torch.channels_last_3d, [True]), (torch.contiguous_format, [False])):
            interpreted.clear(), calls.clear()
            out = conv(x, residual=residual.contiguous(memory_format=layout))
            assert interpreted == ["add_row_bias"] and calls == fused
            torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def _phases_gathered(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """kernels.phase_rows in PyTorch: pixel (2i+a, 2j+b) of the output from channel block 2a+b of y at (i+a, j+b),
    then PyTorch's add of the bias."""
    n, c4, h1, w1 = y.shape
    c, h, w = c4 // 4, h1 - 1, w1 - 1
    y = y.unflatten(1, (2, 2, c))
    out = torch.empty(n, c, 2 * h, 2 * w, dtype=y.dtype)
    for a in (0, 1):
        for b in (0, 1):
            out[:, :, a::2, b::2] = y[:, a, b, :, a : a + h, b : b + w]
    return out if bias is None else out + bias.view(1, c, 1, 1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_phase_rows_gathers_the_four_phases_with_the_bias(interpreted, dtype) -> None:
    """kernels.phase_rows: the upsampled convolution's output gathered from its phases (channels-last), with the
    bias as PyTorch adds it (bit for bit) or without, for sizes that leave partial tiles; inputs that are not a
    channels-last (N, 4C, H+1, W+1) with a (C,) bias of its dtype are refused."""
    gen = torch.Generator().manual_seed(12)
    for n, c, h, w in ((2, 6, 3, 4), (1, 96, 2, 5), (1, 3, 1, 1)):
        y = (torch.randn(n, 4 * c, h + 1, w + 1, generator=gen) * 5).to(dtype)
        y = y.contiguous(memory_format=torch.channels_last)
        bias = (torch.randn(c, generator=gen) * 3).to(dtype)
        for b in (bias, None):
            out = kernels.phase_rows(y, b)
            assert out.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(out, _phases_gathered(y, b))
    assert interpreted == ["phase_rows"] * 6
    assert kernels.phase_rows(y.contiguous(), bias) is None  # not channels-last
    assert kernels.phase_rows(y, bias.double()) is None  # the bias must be y's dtype
    assert kernels.phase_rows(y, torch.zeros(c + 1, dtype=dtype)) is None  # one bias a channel
    assert kernels.phase_rows(y[:, :-1], bias) is None  # not four phases
    assert interpreted == ["phase_rows"] * 6


def test_decoder_upsampling_convolves_in_phases(interpreted) -> None:
    """A decoder's upsampling (Resample, both modes) on channels-last frames where the kernels apply: the phase
    convolution and phase_rows, no upsampled frames, equal to the upsampled convolution (float64) to float32's
    rounding; the phase kernel is kept until the weight changes. A contiguous input, a convolution with a hook or
    an instance forward (benchmarks' levers) upsample as before."""
    import copy

    from wanalpha.models.vae import Resample

    torch.manual_seed(13)
    for mode in ("upsample2d", "upsample3d"):
        resample = Resample(8, mode).eval()
        conv = resample.resample[1]
        conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last)
        x = torch.randn(1, 8, 3, 5, 6).contiguous(memory_format=torch.channels_last_3d)
        exact = copy.deepcopy(resample).double()
        expected = exact(x.double())
        if mode == "upsample3d":  # cuDNN keeps the channels-last layout in a 3-D convolution's output; the CPU does not
            time_conv = resample.time_conv
            plain = time_conv._conv_forward
            time_conv._conv_forward = lambda *a, f=plain: f(*a).contiguous(memory_format=torch.channels_last_3d)
        interpreted.clear()
        out = resample(x)
        assert interpreted.count("phase_rows") == 1 and out.is_contiguous(memory_format=torch.channels_last_3d)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
        kept = conv.phase_weight()
        assert conv.phase_weight() is kept
        interpreted.clear()
        torch.testing.assert_close(resample(x.contiguous()).double(), expected, rtol=1e-5, atol=1e-5)
        assert "phase_rows" not in interpreted
        handle = conv.register_forward_hook(lambda *args: None)
        interpreted.clear()
        torch.testing.assert_close(resample(x).double(), expected, rtol=1e-5, atol=1e-5)
        assert "phase_rows" not in interpreted
        handle.remove()
        conv.weight.mul_(2)  # a changed weight (in place, as load_state_dict and optimisers): a new phase kernel
        assert conv.phase_weight() is not kept
        torch.testing.assert_close(conv.phase_weight(), 2 * kept)


def test_phase_convolution_without_a_bias(interpreted) -> None:
    """vae.phase_convolved for a convolution without a bias: the phases gathered alone (phase_rows without BIAS),
    equal to the upsampled convolution (float64) to float32's rounding."""
    from wanalpha.models.vae import Conv2d, phase_convolved

    torch.manual_seed(15)
    conv = Conv2d(8, 4, 3, padding=1, bias=False)
    x = torch.randn(3, 8, 5, 6).contiguous(memory_format=torch.channels_last)
    up = torch.nn.functional.interpolate(x.double(), scale_factor=2.0, mode="nearest-exact")
    expected = torch.nn.functional.conv2d(up, conv.weight.double(), None, padding=1)
    out = phase_convolved(conv, x)
    assert interpreted == ["phase_rows"]
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_vae_rms_norm_writes_the_next_chunks_cached_frames(interpreted, dtype) -> None:
    """rms_norm_channels_last(tail=): the result's last k frames also in `tail`, from the same pass (the causal
    convolution's cache for the next chunk, vae._normed_frames); the result itself as without it (into `out`, behind
    two cached frames, with a bias). A tail that does not fit (more frames than x, another dtype or layout, two
    samples) is refused: None, nothing written."""
    from wanalpha.models.vae import RMSNorm as VAERMSNorm

    torch.manual_seed(5)
    cl = torch.channels_last_3d
    norm = VAERMSNorm(12, images=False).to(dtype)
    norm.gamma.normal_()
    x = torch.randn(1, 12, 5, 3, 4).to(dtype).contiguous(memory_format=cl)
    bias = torch.randn(12).to(dtype)
    frames = torch.zeros(1, 12, 7, 3, 4, dtype=dtype).contiguous(memory_format=cl)
    tail = torch.full((1, 12, 2, 3, 4), float("nan"), dtype=dtype).contiguous(memory_format=cl)
    y = kernels.rms_norm_channels_last(x, norm.gamma, norm.scale, True, out=frames[:, :, 2:], bias=bias, tail=tail)
    plain = kernels.rms_norm_channels_last(x, norm.gamma, norm.scale, True, bias=bias)
    assert interpreted == ["rms_norm_rows"] * 2
    assert torch.equal(y, plain) and torch.equal(tail, plain[:, :, -2:]) and torch.equal(frames[:, :, :2], 0 * tail)
    biased = (x + bias.view(1, -1, 1, 1, 1)).float()  # the sum rounded to x's dtype, then float32 (the kernel's)
    normed = torch.nn.functional.normalize(biased, dim=1) * norm.scale * norm.gamma.float().view(1, -1, 1, 1, 1)
    torch.testing.assert_close(plain.float(), torch.nn.functional.silu(normed), rtol=1e-2, atol=1e-3)
    for bad in (
        torch.empty(1, 12, 6, 3, 4, dtype=dtype).contiguous(memory_format=cl),  # more frames than x
        torch.empty(1, 12, 2, 3, 4, dtype=torch.float64).contiguous(memory_format=cl),
        torch.empty(1, 12, 2, 3, 4, dtype=dtype),  # not channels-last
    ):
        assert kernels.rms_norm_channels_last(x, norm.gamma, norm.scale, True, tail=bad) is None
    two = torch.randn(2, 12, 5, 3, 4).to(dtype).contiguous(memory_format=cl)
    assert kernels.rms_norm_channels_last(two, norm.gamma, norm.scale, True, tail=tail) is None
    assert len(interpreted) == 2


@pytest.mark.parametrize("dtype", DTYPES)
def test_vae_rms_norm_adds_a_residual_blocks_sum_as_the_bias_pass(interpreted, dtype) -> None:
    """rms_norm_channels_last(residual=, total=): the norm of a residual block's sum, its last convolution's output +
    bias + residual rounded as add_row_bias_ rounds them (in two steps), without that pass: the same bits as the bias
    pass then the norm, with the sum itself in `total`; a residual or total of another shape, dtype or layout, or a
    total without a residual, is refused (None)."""
    from wanalpha.models.vae import RMSNorm as VAERMSNorm

    torch.manual_seed(6)
    cl = torch.channels_last_3d
    norm = VAERMSNorm(12, images=False).to(dtype)
    norm.gamma.normal_()
    y = torch.randn(1, 12, 4, 3, 5).to(dtype).contiguous(memory_format=cl)
    residual = torch.randn(1, 12, 4, 3, 5).to(dtype).contiguous(memory_format=cl)
    bias = torch.randn(12).to(dtype)
    total = torch.full_like(y, float("nan"))
    fused = kernels.rms_norm_channels_last(y, norm.gamma, norm.scale, True, bias=bias, residual=residual, total=total)
    summed = y.clone()
    rows = summed.permute(0, 2, 3, 4, 1).view(-1, 12)
    assert kernels.add_row_bias_(rows, bias, residual=residual.permute(0, 2, 3, 4, 1).reshape(-1, 12))
    plain = kernels.rms_norm_channels_last(summed, norm.gamma, norm.scale, True)
    assert interpreted == ["rms_norm_rows", "add_row_bias", "rms_norm_rows"]
    assert torch.equal(total, summed) and torch.equal(fused, plain)
    alone = kernels.rms_norm_channels_last(y, norm.gamma, norm.scale, True, bias=bias, residual=residual)
    assert torch.equal(alone, plain)
    for bad in (
        {"residual": residual.contiguous()},  # not channels-last
        {"residual": residual.double()},
        {"residual": residual[:, :, :2]},
        {"residual": residual, "total": total.contiguous()},
        {"total": total},  # a sum without a residual
    ):
        assert kernels.rms_norm_channels_last(y, norm.gamma, norm.scale, True, bias=bias, **bad) is None
    assert len(interpreted) == 4


def test_few_output_convolution_equals_the_convolution(interpreted) -> None:
    """kernels.conv3_few_outputs (the decoder's 96 → 3 head on a GPU): a 3 × 3 × 3 convolution over frames with the
    two causal ones in front, spatial zero padding 1, float16 (the interpreter truncates bf16), with and without a
    bias, as the float64 convolution rounded once (a last-bit difference where the float32 sum lands on a tie), for
    sizes that leave partial tiles (up to 64 columns and 16 rows a program) and input channels that fill their
    32-wide blocks or not. Inputs it does not take (float32, not channels-last, more than 16 outputs, rows of another
    dtype): None, nothing launched."""
    gen = torch.Generator().manual_seed(21)
    cl = torch.channels_last_3d
    for cin, cout, frames, height, width, biased in ((32, 3, 1, 17, 20, True), (24, 1, 1, 3, 70, False)):
        x = torch.randn(1, cin, frames + 2, height, width, generator=gen).half().contiguous(memory_format=cl)
        weight = (torch.randn(cout, cin, 3, 3, 3, generator=gen) * 0.1).half()
        bias = torch.randn(cout, generator=gen).half() if biased else None
        out = kernels.conv3_few_outputs(x, kernels.few_outputs_weight(weight), cout, bias)
        exact = torch.nn.functional.conv3d(
            x.double(), weight.double(), None if bias is None else bias.double(), padding=(0, 1, 1)
        )
        assert out.shape == exact.shape and out.is_contiguous(memory_format=cl) and out.dtype == torch.float16
        torch.testing.assert_close(out.double(), exact.half().double(), rtol=2**-10, atol=1e-4)
    assert interpreted == ["conv3_few_outputs"] * 2
    rows = kernels.few_outputs_weight(weight)
    assert rows.shape == (27, 24, 16) and torch.equal(rows[13, :, 0], weight[0, :, 1, 1, 1])  # the centre tap
    assert not rows[:, :, 1:].any()  # the padded outputs
    assert kernels.conv3_few_outputs(x.float(), rows.float(), cout) is None
    assert kernels.conv3_few_outputs(x.contiguous(), rows, cout) is None
    assert kernels.conv3_few_outputs(x, rows, 17) is None
    assert kernels.conv3_few_outputs(x, rows.float(), cout) is None
    assert len(interpreted) == 2


def test_decoder_head_takes_the_few_output_kernel(interpreted) -> None:
    """A decoder's head (RMS norm, SiLU, causal 3 × 3 × 3 convolution to 3 channels) on channels-last float16 frames
    where the kernels apply: conv3_few_outputs with the convolution's bias, as the convolution itself within a
    last-bit rounding, once switched on (few_outputs_kernel, off by default until measured on a GPU: benchmarks/vae.py's
    +fewhead lever); its weight rows kept until the weight changes; switched off, cuDNN's convolution again."""
    from wanalpha.models.vae import CausalCache, CausalConv3d, few_output_convolutions

    torch.manual_seed(22)
    conv = CausalConv3d(16, 3, 3, padding=1).half()
    conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last_3d)
    both = torch.nn.Sequential(conv, CausalConv3d(16, 32, 3, padding=1))
    assert conv.has_few_outputs_shape() and few_output_convolutions(both) == []  # off by default
    conv.few_outputs_kernel = True
    assert few_output_convolutions(both) == [conv]
    x = torch.randn(1, 16, 2, 5, 6).half().contiguous(memory_format=torch.channels_last_3d)
    cache = CausalCache()
    cache.set(conv, torch.randn(1, 16, 2, 5, 6).half().contiguous(memory_format=torch.channels_last_3d))
    frames = torch.cat([cache.get(conv), x], dim=2)
    exact = torch.nn.functional.conv3d(frames.double(), conv.weight.double(), conv.bias.double(), padding=(0, 1, 1))
    out = conv(x, CausalCache.from_state(cache.state()))
    assert interpreted == ["conv3_few_outputs"]
    torch.testing.assert_close(out.double(), exact.half().double(), rtol=2**-10, atol=1e-4)
    kept = conv.few_outputs_rows()
    assert conv.few_outputs_rows() is kept
    conv.weight.mul_(2)  # changed in place: new rows
    assert conv.few_outputs_rows() is not kept
    conv.few_outputs_kernel = False
    interpreted.clear()
    conv(x, CausalCache.from_state(cache.state()))
    assert "conv3_few_outputs" not in interpreted

    class Scaled(torch.nn.Module):  # a parametrised weight (a LoRA's) is a new tensor at every access
        def __init__(self) -> None:
            super().__init__()
            self.k = torch.nn.Parameter(torch.ones((), dtype=torch.float16))

        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return w * self.k

    torch.nn.utils.parametrize.register_parametrization(conv, "weight", Scaled())
    rows = conv.few_outputs_rows()
    conv.parametrizations.weight[0].k.data.fill_(2)
    assert torch.equal(conv.few_outputs_rows(), 2 * rows)  # made anew, not a stale copy


def test_phase_kernel_of_a_parametrised_weight_is_made_anew() -> None:
    """vae.Conv2d.phase_weight of a parametrised weight (a trainable LoRA's: a new tensor at every access, whose
    address and version may repeat while its values change) follows the weight, never a kept copy."""
    from wanalpha.models.vae import Conv2d, phase_weight

    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.k = torch.nn.Parameter(torch.ones(()))

        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return w * self.k

    conv = Conv2d(8, 4, 3, padding=1)
    torch.nn.utils.parametrize.register_parametrization(conv, "weight", Scaled())
    with torch.no_grad():
        first = conv.phase_weight()
        conv.parametrizations.weight[0].k.fill_(3)
        torch.testing.assert_close(conv.phase_weight(), phase_weight(conv.weight))
        torch.testing.assert_close(conv.phase_weight(), 3 * first)
