"""GPU paths (marked `gpu`, skipped without CUDA): golden parity in fp32 and bf16 on the device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import rel_err
from wanalpha.checkpoints import load_rgba_vae
from wanalpha.runtime import (
    compile_blocks,
    prepare_dit_kernels,
    set_attention_kernel,
    set_channels_last,
    set_fused_kernels,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# bf16 keeps 8 mantissa bits; through ~40 layers the measured worst relative error on the golden inputs is ~4e-2
# (docs/benchmarks.md). fp32 on the GPU with TF32 off must meet the reference tolerance.
TOLERANCES = {"fp32": 1e-4, "bf16-autocast": 6e-2, "bf16": 6e-2}


@pytest.mark.parametrize("mode", list(TOLERANCES))
def test_golden_parity_on_gpu(mode: str, reference: Path, wan_vae_state_dict, monkeypatch) -> None:
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    weight_dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    model = load_rgba_vae(
        wan_vae_state_dict, reference / "golden/decoder_synthetic.bin", device="cuda", dtype=weight_dtype
    )
    vae_gold = load_file(reference / "golden/vae.safetensors")
    dual_gold = load_file(reference / "golden/vae_dual_decode.safetensors")
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=mode == "bf16-autocast")
    with torch.no_grad(), amp:
        z = model.encoder.encode(vae_gold["video"].cuda().to(weight_dtype))
        rgb3, alpha3 = model.decode(vae_gold["latent_in"].cuda().to(weight_dtype), raw=True)
    tol = TOLERANCES[mode]
    assert rel_err(z.cpu(), vae_gold["latent_mean_normalized"]) < tol
    assert rel_err(rgb3.cpu(), dual_gold["fgr_unclamped"]) < tol
    assert rel_err(alpha3.cpu(), dual_gold["pha_unclamped"]) < tol


def test_dit_golden_on_gpu_bf16(reference: Path, ref_weights) -> None:
    import json

    from wanalpha.models.dit import DIT_VARIANTS, WanDiT

    shapes = json.loads((reference / "golden/dit.json").read_text())["weights"]["key_shapes"]
    dit = WanDiT(DIT_VARIANTS["tiny"])
    dit.load_state_dict(ref_weights.make_state_dict(shapes, 1234))
    dit = dit.cuda().bfloat16()
    golden = load_file(reference / "golden/dit.safetensors")
    with torch.no_grad():
        out = dit(golden["x"][None].cuda().bfloat16(), golden["t"].cuda(), golden["context"][None].cuda().bfloat16())
    assert rel_err(out[0].float().cpu(), golden["out"]) < 3e-2


def test_block_streaming_on_gpu_equals_resident() -> None:
    from wanalpha.models.dit import DIT_VARIANTS, WanDiT
    from wanalpha.offload import BlockStreamer

    torch.manual_seed(0)
    dit = WanDiT(DIT_VARIANTS["tiny"]).eval()
    x, t, ctx = torch.randn(1, 16, 3, 8, 8).cuda(), torch.tensor([500.0]).cuda(), torch.randn(1, 7, 64).cuda()
    with torch.no_grad(), BlockStreamer(dit, "cuda"):
        streamed = dit(x, t, ctx)
        assert all(p.device.type == "cpu" for p in dit.blocks.parameters())  # blocks live on the CPU between calls
    with torch.no_grad():
        resident = dit.cuda()(x, t, ctx)
    assert torch.equal(streamed, resident)


@pytest.mark.parametrize("use_dora", [True, False], ids=["dora", "lora"])
def test_fused_adapters_on_gpu_bf16(use_dora: bool, reference: Path, ref_weights) -> None:
    """train-dit's fused DoRA/LoRA forward on CUDA in bf16: within 1.5 × peft's own error against float32."""
    import json

    from test_dit import fused_and_peft_bf16_errors
    from wanalpha.models.dit import DIT_VARIANTS, WanDiT

    shapes = json.loads((reference / "golden/dit.json").read_text())["weights"]["key_shapes"]
    dit = WanDiT(DIT_VARIANTS["tiny"])
    dit.load_state_dict(ref_weights.make_state_dict(shapes, 1234))
    golden = load_file(reference / "golden/dit.safetensors")
    errors = fused_and_peft_bf16_errors(dit.eval(), golden, use_dora, device="cuda")
    for what, (fused_err, peft_err) in errors.items():
        assert 0 < fused_err < 1.5 * peft_err, (what, fused_err, peft_err)


def test_vae_channels_last_on_gpu_equal(reference: Path, wan_vae_state_dict, monkeypatch) -> None:
    """Channels-last convolutions, and the Triton RMS norm + SiLU their channels-last activations take, change no
    result beyond fp32 rounding."""
    from wanalpha.models import vae

    fused, kernel = [], vae.rms_norm_channels_last

    def counted(*args, **kwargs):
        y = kernel(*args, **kwargs)
        fused.append(y is not None)  # the kernel ran (None: the PyTorch forms took over)
        return y

    monkeypatch.setattr(vae, "rms_norm_channels_last", counted)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model = load_rgba_vae(wan_vae_state_dict, reference / "golden/decoder_synthetic.bin", device="cuda")
    vae_gold = load_file(reference / "golden/vae.safetensors")
    video = vae_gold["video"].cuda()
    alpha = video.mean(1, keepdim=True)
    with torch.no_grad():
        z = model.encode(video, alpha)
        decoded = model.decode(z)
        set_channels_last(model)
        assert rel_err(model.encode(video, alpha).cpu(), z.cpu()) < 1e-5
        for fast, plain in zip(model.decode(z), decoded, strict=True):
            assert rel_err(fast.cpu(), plain.cpu()) < 1e-5
    assert sum(fused) > 50  # the norms of the encoder and both decoders ran fused


def _dual_equals_separate(load, latent: torch.Tensor, dtype: torch.dtype) -> None:
    """Both decoders as one batch of two (decode(dual=True), vae.DecoderPair) on CUDA, in the GPU layout, against the
    decoders one after the other. Each half runs its own convolution on the same shape, but cuDNN may pick another
    algorithm for a half that is a view into the batch (measured on an H200: 2.5e-6 relative in float32, exact with
    cuDNN off), so float32 is compared to its rounding and bf16 by its error against the float32 decode: the batch of
    two within 1.5× the separate decodes' (swapped halves or a lost bias are errors of order 1)."""
    model = load(dtype)
    set_channels_last(model)
    with torch.no_grad():
        separate = model.decode(latent.to(dtype), raw=True)
        dual = model.decode(latent.to(dtype), raw=True, dual=True)
        chunks = list(model.decode_frames(latent.to(dtype), dual=True))
        exact = separate if dtype == torch.float32 else set_channels_last(load(torch.float32)).decode(latent, raw=True)
    for a, b, e in zip(dual, separate, exact, strict=True):
        assert a.dtype == b.dtype == dtype
        if dtype == torch.float32:
            assert rel_err(a.cpu(), b.cpu()) < 1e-5
        else:
            assert rel_err(a.float().cpu(), e.cpu()) <= 1.5 * rel_err(b.float().cpu(), e.cpu()) + 1e-3
    assert torch.equal(torch.cat([c[0] for c in chunks], dim=2), dual[0].float().clamp(-1, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dual_decode_on_gpu_equals_separate(
    dtype: torch.dtype, reference: Path, wan_vae_state_dict, monkeypatch
) -> None:
    """The official widths, the reference's decoder LoRAs and latent."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    decoders = reference / "golden/decoder_synthetic.bin"
    latent = load_file(reference / "golden/vae_dual_decode.safetensors")["latent_in"].cuda()
    _dual_equals_separate(lambda d: load_rgba_vae(wan_vae_state_dict, decoders, device="cuda", dtype=d), latent, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dual_decode_on_gpu_equals_separate_tiny(dtype: torch.dtype, tiny_vae_files, monkeypatch) -> None:
    """The same on the tests' tiny Wan-layout VAE (no reference fixtures needed), over several chunks."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    gen = torch.Generator("cuda").manual_seed(0)
    latent = torch.randn(1, 16, 4, 6, 8, device="cuda", generator=gen)
    _dual_equals_separate(lambda d: load_rgba_vae(*tiny_vae_files, device="cuda", dtype=d), latent, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_side_stream_decode_equals_one_stream(dtype: torch.dtype, tiny_vae_files) -> None:
    """The two decoders side by side on two CUDA streams (RGBAlphaVAE's default on a GPU) give the bits of the
    decoders one after the other on one stream, whole and a chunk at a time, over several chunks; the decode's
    consumer sees finished alpha chunks (a chunk read on the current stream right after it is handed out is the
    one-stream chunk even when the side stream's last kernel for it runs long); one side stream serves every decode,
    so its cached memory is reused."""
    from wanalpha.models.rgba import decoder_side_stream

    gen = torch.Generator("cuda").manual_seed(0)
    latent = torch.randn(1, 16, 4, 6, 8, device="cuda", generator=gen).to(dtype)
    model = set_channels_last(load_rgba_vae(*tiny_vae_files, device="cuda", dtype=dtype))
    with torch.no_grad():
        assert model.side_stream_applies(True, latent) and not model.side_stream_applies(True, latent.cpu())
        serial = model.decode(latent, raw=True, side_stream=False)
        side = model.decode(latent, raw=True)
        serial_chunks = [(r.clone(), a.clone()) for r, a in model.decode_frames(latent, side_stream=False)]
        frames = model.alpha_decoder.decode_frames

        def late_frames(z, tile_size=None, **kwargs):  # each alpha chunk anew after 50 ms of GPU time on its stream
            for chunk in frames(z, tile_size=tile_size, **kwargs):
                torch.cuda._sleep(50_000_000)
                yield chunk * 1

        model.alpha_decoder.decode_frames = late_frames
        side_chunks = [(r.clone(), a.clone()) for r, a in model.decode_frames(latent)]
    for a, b in zip(side, serial, strict=True):
        assert torch.equal(a, b)
    assert len(side_chunks) == len(serial_chunks) == 4
    for (r1, a1), (r2, a2) in zip(side_chunks, serial_chunks, strict=True):
        assert torch.equal(r1, r2) and torch.equal(a1, a2)
    del model.alpha_decoder.decode_frames
    with torch.no_grad():  # one side stream for the process: later decodes reuse its cached blocks
        model.decode(latent)
        reserved = torch.cuda.memory_reserved()
        for _ in range(3):
            model.decode(latent)
    assert torch.cuda.memory_reserved() == reserved
    assert decoder_side_stream(latent.device) is decoder_side_stream(torch.device("cuda"))


@pytest.mark.parametrize(
    ("dtype", "gamma_dtype"), [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, torch.float32)]
)
def test_rms_norm_kernel_on_gpu(dtype: torch.dtype, gamma_dtype: torch.dtype | None) -> None:
    """The Triton RMS norm (+ SiLU) of channels-last activations against the PyTorch form in float64: a float32 result
    (float32 activations, or bf16 ones with float32 gamma as under autocast) to 1e-6; bf16 no further off than the
    PyTorch form computed in bf16. Zero vectors stay zero; 5-D and 4-D layouts, channel counts that are and are not
    powers of two; empty inputs."""
    import torch.nn.functional as F

    from wanalpha.models.kernels import rms_norm_channels_last

    torch.manual_seed(0)
    empty = torch.empty(0, 8, 0, 4, 4, device="cuda", dtype=dtype)
    assert rms_norm_channels_last(empty, torch.ones(8, 1, 1, 1, device="cuda"), 8**0.5, True).shape == empty.shape
    for shape, layout in (
        ((2, 96, 3, 20, 24), torch.channels_last_3d),
        ((3, 384, 10, 12), torch.channels_last),
        ((1, 4, 2, 5, 7), torch.channels_last_3d),
    ):
        x = torch.randn(shape, device="cuda", dtype=dtype) * 3
        x[0, :, 1] = 0
        x = x.contiguous(memory_format=layout)
        gamma = torch.randn(shape[1], *([1] * (len(shape) - 2)), device="cuda", dtype=gamma_dtype or dtype)
        out_dtype = torch.promote_types(dtype, gamma.dtype)
        for silu in (False, True):
            y = rms_norm_channels_last(x, gamma, shape[1] ** 0.5, silu)
            assert y.dtype == out_dtype and y.is_contiguous(memory_format=layout)
            exact = F.normalize(x.double(), dim=1) * shape[1] ** 0.5 * gamma.double()
            exact = F.silu(exact) if silu else exact
            plain = F.normalize(x, dim=1) * shape[1] ** 0.5 * gamma
            plain = F.silu(plain) if silu else plain
            bound = 1e-6 if out_dtype == torch.float32 else rel_err(plain.double(), exact)
            assert rel_err(y.double(), exact) <= bound, (shape, silu, rel_err(y.double(), exact), bound)
            assert torch.equal(y[0, :, 1], torch.zeros_like(y[0, :, 1]))
            # a convolution's bias left to the norm: the bits of the bias added first (PyTorch's add, x's dtype)
            bias = torch.randn(shape[1], device="cuda", dtype=dtype) * 2
            biased = (x + bias.view(1, -1, *([1] * (len(shape) - 2)))).contiguous(memory_format=layout)
            y = rms_norm_channels_last(x, gamma, shape[1] ** 0.5, silu, bias=bias)
            assert torch.equal(y, rms_norm_channels_last(biased, gamma, shape[1] ** 0.5, silu))
            assert rms_norm_channels_last(x, gamma, 1.0, silu, bias=bias.double()) is None  # the bias in x's dtype


def test_rms_norm_kernel_beyond_32_bit_offsets() -> None:
    """A full-resolution decoder activation has more than 2^31 elements: the kernel's offsets are 64-bit."""
    from wanalpha.models.kernels import rms_norm_channels_last

    if torch.cuda.mem_get_info()[0] < 10 * 2**30:
        pytest.skip("needs 10 GiB of free GPU memory")
    x = torch.empty(1, 96, 1, 4800, 4700, device="cuda", dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last_3d
    )
    assert x.numel() > 2**31
    x.normal_()
    gamma = torch.ones(96, 1, 1, 1, device="cuda", dtype=torch.bfloat16)
    y = rms_norm_channels_last(x, gamma, 96**0.5, False)
    tail = (slice(None), slice(None), slice(None), slice(-2, None))  # the last rows, past 2^31 elements
    expected = torch.nn.functional.normalize(x[tail].float(), dim=1) * 96**0.5
    assert rel_err(y[tail].float(), expected) < 1e-2


def test_rms_norm_kernel_launch_failure_falls_back(monkeypatch) -> None:
    """A Triton that cannot compile or launch here (no launch has succeeded): one warning, then the PyTorch forms (the
    VAE keeps working)."""
    from wanalpha.models import kernels
    from wanalpha.models.vae import RMSNorm

    class Broken:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise RuntimeError("no compiler")

            return launch

    monkeypatch.setattr(kernels, "_failed", False)
    monkeypatch.setattr(kernels, "_launched", False)
    monkeypatch.setattr(kernels._sources(), "rms_norm_rows", Broken())
    x = torch.randn(2, 8, 3, 4, 5, device="cuda").contiguous(memory_format=torch.channels_last_3d)
    norm = RMSNorm(8, images=False).cuda()
    with pytest.warns(UserWarning, match="Triton kernels unavailable"):
        assert kernels.rms_norm_channels_last(x, norm.gamma, 8**0.5, False) is None
    assert kernels.rms_norm_channels_last(x, norm.gamma, 8**0.5, False) is None  # no second attempt
    with torch.no_grad():
        assert rel_err(norm(x), torch.nn.functional.normalize(x, dim=1) * 8**0.5) < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dit_kernels_on_gpu_match_pytorch(dtype: torch.dtype) -> None:
    """The fused DiT kernels against the PyTorch forms at the 14B's width (40 heads of 128), 2 samples: the gated
    residual bit for bit; the norms differ on under 1 % of the values, by about one rounding of an intermediate (their
    float32 sums run in another order, which can move the rounding of the normalised value; the modulation can then
    cancel most of it, so the bound is on the output's scale)."""
    from wanalpha.models import kernels
    from wanalpha.models.layers import LayerNorm, RMSNorm, apply_rope, rope_frequencies, rope_grid

    def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
        assert actual.dtype == expected.dtype and actual.shape == expected.shape
        if dtype == torch.float32:
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
            return
        bound = 2 * torch.finfo(dtype).eps * expected.float().abs().max().item()
        torch.testing.assert_close(actual.float(), expected.float(), rtol=2**-7, atol=bound)
        assert (actual != expected).float().mean() < 0.01

    torch.manual_seed(0)
    dim = 5120
    x = (torch.randn(2, 40, dim, device="cuda") * 2 + 0.5).to(dtype)  # 40 tokens, 30 of them rotated (padding)
    shift, scale, gate = (torch.randn(2, 1, dim, device="cuda") for _ in range(3))
    with torch.no_grad():
        norm = LayerNorm(dim, 1e-6, elementwise_affine=False)
        close(
            kernels.layer_norm(x, 1e-6, shift=shift, scale=scale, out_dtype=dtype),
            (norm(x).float() * (1 + scale) + shift).to(dtype),
        )
        affine = LayerNorm(dim, 1e-6).cuda()
        affine.weight.normal_()
        affine.bias.normal_()
        affine = affine.to(dtype)
        close(kernels.layer_norm(x, 1e-6, affine.weight, affine.bias), affine(x))
        rms = RMSNorm(dim).cuda().to(dtype)
        rms.weight.normal_()
        for precision in (torch.complex64, torch.complex128):
            rot = rope_grid(rope_frequencies(128).to(precision).cuda(), 2, 3, 5)
            heads = rms(x).unflatten(-1, (40, 128))
            close(kernels.rms_norm_rope(x, rms.weight, rms.eps, rot, 128), apply_rope(heads, rot).flatten(2).to(dtype))
        close(kernels.rms_norm_rope(x, rms.weight, rms.eps), rms(x))
        y = (torch.randn_like(x.float()) * 3).to(dtype)
        assert torch.equal(kernels.gated_residual(x, y, gate), x + (y * gate).type_as(x))
        assert torch.equal(kernels.gated_residual(x, y, None), x + y.type_as(x))
        stream = x.float() * 7
        assert torch.equal(kernels.gated_residual(stream, y, None), stream + y.type_as(stream))


def test_bias_kernel_on_gpu_equals_pytorch() -> None:
    """kernels.add_row_bias_ on the GPU: the bits of PyTorch's broadcast add_ (a bf16 bias onto bf16 rows; a float32
    per-sample mean onto bf16 attention output), and the VAE's convolutions that use it (channels-last, bf16) give
    PyTorch's convolution with its bias bit for bit (cuDNN's path adds the bias after the convolution too)."""
    from wanalpha.models import kernels
    from wanalpha.models.vae import CausalConv3d, Conv2d

    gen = torch.Generator("cuda").manual_seed(7)
    x = (torch.randn(4099, 96, device="cuda", generator=gen) * 5).bfloat16()
    bias = (torch.randn(96, device="cuda", generator=gen) * 3).bfloat16()
    expected = x.clone().add_(bias)
    assert kernels.add_row_bias_(x, bias) and torch.equal(x, expected)
    out = (torch.randn(2, 1000, 40, 128, device="cuda", generator=gen) * 2).bfloat16()
    mean = torch.randn(2, 40, 128, device="cuda", generator=gen)
    expected = out.clone().add_(mean[:, None])
    assert kernels.add_row_bias_(out.view(2000, 5120), mean.view(2, 5120), tokens=1000)
    assert torch.equal(out, expected)
    torch.manual_seed(7)
    conv3 = CausalConv3d(96, 192, 3, padding=1).cuda().bfloat16()
    conv2 = Conv2d(96, 48, 3, padding=1).cuda().bfloat16()
    conv3.weight.data = conv3.weight.data.contiguous(memory_format=torch.channels_last_3d)
    conv2.weight.data = conv2.weight.data.contiguous(memory_format=torch.channels_last)
    x3 = torch.randn(1, 96, 4, 30, 52, device="cuda").bfloat16().contiguous(memory_format=torch.channels_last_3d)
    x2 = torch.randn(4, 96, 30, 52, device="cuda").bfloat16().contiguous(memory_format=torch.channels_last)
    launched = []
    real = kernels.add_row_bias_
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels, "add_row_bias_", lambda *a, **k: launched.append(1) or real(*a, **k))
        padded = torch.nn.functional.pad(x3, (0, 0, 0, 0, 2, 0))
        assert torch.equal(conv3(x3), torch.nn.functional.conv3d(padded, conv3.weight, conv3.bias, padding=(0, 1, 1)))
        assert torch.equal(conv2(x2), torch.nn.functional.conv2d(x2, conv2.weight, conv2.bias, padding=1))
        # float32 weights under bf16 autocast (cache, validate): the bias rounded to bf16, as autocast does
        conv3.float()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            expected = torch.nn.functional.conv3d(padded, conv3.weight, conv3.bias, padding=(0, 1, 1))
            assert torch.equal(conv3(x3), expected)
    assert len(launched) == 3  # each convolution's bias went through the kernel


@pytest.mark.parametrize("fp8", [False, True])
def test_warm_up_compiles_what_a_forward_launches(fp8: bool) -> None:
    """runtime.prepare_dit_kernels (kernels.warm_up_dit, and with fp8 the FP8 linears: their activations' quantisation
    kernel for each input width, the GEMMs at their real shapes) compiles every fused-kernel variant of a bf16 (or
    FP8) DiT forward under autocast (as generate samples): the forward after it compiles nothing more, at another
    length too."""
    from wanalpha.fp8 import quantize_dit_, scaled_mm_supported
    from wanalpha.models import kernels
    from wanalpha.models.dit import DiTConfig, WanDiT

    if fp8 and not scaled_mm_supported(torch.device("cuda")):
        pytest.skip("FP8 GEMMs need a GPU of compute capability 9.0 or more")
    sources = kernels._sources()
    functions = [sources.layer_norm_rows, sources.rms_norm_rope_rows, sources.residual_rows, sources.fp8_quantize_rows]
    if not all(hasattr(f, "device_caches") for f in functions):
        pytest.skip("this Triton does not expose its kernel caches")

    def compiled() -> int:
        return sum(len(cache[0]) for f in functions for cache in f.device_caches.values())

    config = DiTConfig(dim=640, ffn_dim=1152, num_heads=5, num_layers=2, text_dim=64, text_len=16)  # head size 128
    dit = WanDiT(config).cuda().bfloat16().eval()
    if fp8:
        quantize_dit_(dit)
    dit.rope_precision = "float32"
    prepare_dit_kernels(config, "sdpa", torch.device("cuda"), (3, 6, 10), rope_precision="float32", fp8=fp8)
    before = compiled()
    assert before >= 6  # the variants: 2 LayerNorms, 2 RMSNorms (with and without RoPE), the residual (gated or not)
    launched = []
    real_launch = kernels._launch
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            kernels, "_launch", lambda kernel, *a, **k: launched.append(kernel) or real_launch(kernel, *a, **k)
        )
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            for frames in (1, 3):  # the prepared length (3) and another
                dit(
                    torch.randn(1, 16, frames, 6, 10, device="cuda"),
                    torch.tensor([500.0], device="cuda"),
                    [torch.randn(7, 64, device="cuda")],
                )
    quantised = launched.count(sources.fp8_quantize_rows)
    assert len(launched) - quantised == 2 * (10 * config.num_layers + 1)  # every site took its kernel
    assert quantised >= (2 * 4 * config.num_layers if fp8 else 0)  # the FP8 linears' inputs, quantised
    assert compiled() == before


def test_fused_dit_on_gpu_matches_pytorch(reference: Path, ref_weights, monkeypatch) -> None:
    """The golden tiny DiT in bf16, guided-step shaped (2 samples): the fused kernels (every site launched) against
    set_fused_kernels(dit, False) and against the golden output. Ten sites a block (the modulated norms before
    self-attention and the FFN, the affine norm before cross-attention, the q and k norms of both attentions, the
    three residual adds) and the head's modulated norm."""
    import json

    from wanalpha.models import kernels
    from wanalpha.models.dit import DIT_VARIANTS, WanDiT

    launched = []
    real_launch = kernels._launch
    monkeypatch.setattr(
        kernels, "_launch", lambda kernel, *a, **k: launched.append(kernel) or real_launch(kernel, *a, **k)
    )
    shapes = json.loads((reference / "golden/dit.json").read_text())["weights"]["key_shapes"]
    dit = WanDiT(DIT_VARIANTS["tiny"])
    dit.load_state_dict(ref_weights.make_state_dict(shapes, 1234))
    dit = dit.cuda().bfloat16()
    golden = load_file(reference / "golden/dit.safetensors")
    x = golden["x"][None].cuda().bfloat16().expand(2, -1, -1, -1, -1)
    t = torch.cat([golden["t"], golden["t"] * 0.5]).cuda()
    context = [golden["context"].cuda().bfloat16()] * 2
    with torch.no_grad():
        fused = dit(x, t, context)
        assert len(launched) == 10 * dit.config.num_layers + 1
        set_fused_kernels(dit, False)
        plain = dit(x, t, context)
    assert len(launched) == 10 * dit.config.num_layers + 1
    assert rel_err(fused.float(), plain.float()) < 1e-2
    assert rel_err(fused[0].float().cpu(), golden["out"]) < 3e-2


def _small_adapted_dit(use_dora: bool):
    """A 2-block DiT of head size 128 on the GPU: bf16 base, trained-looking fused adapters, float32 RoPE."""
    from test_dit import _trained_adapters, bf16_base
    from wanalpha.models.dit import DiTConfig, WanDiT

    torch.manual_seed(0)
    dit = WanDiT(DiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=64, text_len=16))
    with torch.no_grad():
        for param in dit.parameters():
            param.normal_(0, 0.05)
    dit = bf16_base(_trained_adapters(dit, use_dora, fused=True).cuda())
    dit.rope_precision = "float32"
    return dit


def _training_gradients(dit) -> dict[str, torch.Tensor]:
    """Adapter and input gradients of one bf16-autocast training step of `_small_adapted_dit` on fixed inputs."""
    from wanalpha import adapters

    gen = torch.Generator("cuda").manual_seed(1)
    x = torch.randn(1, 16, 5, 32, 32, device="cuda", generator=gen).requires_grad_(True)
    t, ctx = torch.tensor([500.0], device="cuda"), torch.randn(1, 16, 64, device="cuda", generator=gen)
    with torch.autocast("cuda", dtype=torch.bfloat16), adapters.dora_norm_scope():
        dit(x, t, ctx).float().square().mean().backward()
    grads = {n: p.grad.float().cpu() for n, p in dit.named_parameters() if p.requires_grad}
    return grads | {"x": x.grad.float().cpu()}


@pytest.mark.parametrize(
    ("use_dora", "checkpointing", "budget"),
    [(True, "recompute", None), (True, "keep", None), (False, "none", None), (True, "keep", 0.5)],
    ids=["dora-recompute", "dora-keep", "lora-none", "dora-keep-budget"],
)
def test_compiled_training_gradients_on_gpu(use_dora: bool, checkpointing: str, budget: float | None) -> None:
    """train-dit --compile on CUDA (bf16 base, bf16 autocast, fused adapters, head_dim 128 so cuDNN/flash attention
    run; also with --compile-memory-budget): every adapter gradient and the input's within bf16 rounding of eager's.
    The CPU test cannot see this: on CUDA (torch 2.11) an in-place addmm inside the fused adapter's autograd function
    (before it became a custom operator) made every compiled gradient through it zero while the forward stayed
    right."""
    import copy

    import torch._dynamo

    torch._dynamo.reset()
    eager = _small_adapted_dit(use_dora)
    # cuDNN's kernel on both sides (test_fa4_dit_trains_on_gpu_as_sdpa: FlashAttention-4): the blocks' default, "sdpa"
    eager.gradient_checkpointing = checkpointing != "none"
    eager.checkpoint_attention = checkpointing == "keep"
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled, memory_budget=budget)
    expected, got = _training_gradients(eager), _training_gradients(compiled)
    assert len(got) == len(expected) == (61 if use_dora else 41)
    for name, grad in got.items():
        assert rel_err(grad, expected[name]) < 3e-2, name


def _fa4_unavailable() -> str | None:
    from wanalpha.models import fa4

    return fa4.unsupported(torch.device("cuda"), torch.bfloat16) if torch.cuda.is_available() else "needs a CUDA GPU"


@pytest.mark.skipif(_fa4_unavailable() is not None, reason=f"FlashAttention-4: {_fa4_unavailable()}")
@pytest.mark.parametrize("keys", [2000, 512], ids=["self", "cross"])
def test_fa4_attention_on_gpu_as_accurate_as_sdpa(keys: int) -> None:
    """FlashAttention-4 through wanalpha's operators: output and gradients as close to float32 attention as cuDNN's
    SDPA kernel is (bf16 inputs, head size 128, a query length that is not a multiple of the tiles)."""
    import math

    from torch.nn.attention import SDPBackend, sdpa_kernel

    from wanalpha.models import fa4
    from wanalpha.models.layers import attention

    gen = torch.Generator("cuda").manual_seed(0)
    q = torch.randn(2, 2000 + 77, 4, 128, device="cuda", generator=gen)
    k, v = (torch.randn(2, keys, 4, 128, device="cuda", generator=gen) for _ in range(2))
    grad = torch.randn(2, 2000 + 77, 4, 128, device="cuda", generator=gen)

    def run(kernel: str, dtype: torch.dtype) -> list[torch.Tensor]:
        inputs = [t.detach().clone().to(dtype).requires_grad_(True) for t in (q, k, v)]  # fresh leaves
        if kernel == "math":  # float32 softmax(q kᵀ/√d) v
            scores = torch.einsum("blhd,bmhd->bhlm", *inputs[:2]) / math.sqrt(128)
            out = torch.einsum("bhlm,bmhd->blhd", scores.softmax(-1), inputs[2])
        else:
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                out = attention(*inputs, kernel=kernel)
        out.backward(grad.to(dtype))
        return [t.float() for t in (out.detach(), *(x.grad for x in inputs))]

    exact = run("math", torch.float32)
    fast, cudnn = run("fa4", torch.bfloat16), run("sdpa", torch.bfloat16)
    assert fa4.kernel("auto", torch.device("cuda"), torch.bfloat16) == "fa4"
    for name, e, f, c in zip(("out", "dq", "dk", "dv"), exact, fast, cudnn, strict=True):
        assert rel_err(f, e) <= 1.5 * rel_err(c, e) + 1e-3, name
        assert rel_err(f, e) < 2e-2, name


@pytest.mark.skipif(_fa4_unavailable() is not None, reason=f"FlashAttention-4: {_fa4_unavailable()}")
def test_fa4_dit_trains_on_gpu_as_sdpa() -> None:
    """A DoRA training step of a small DiT (head size 128) with compiled blocks and kept self-attention outputs:
    FlashAttention-4 (the default "auto" here) gives the gradients eager SDPA gives, within bf16 rounding."""
    import copy

    import torch._dynamo

    torch._dynamo.reset()
    eager = _small_adapted_dit(True)
    eager.gradient_checkpointing = eager.checkpoint_attention = True
    fast = copy.deepcopy(eager)
    set_attention_kernel(fast, "auto", torch.device("cuda"), torch.bfloat16, backward=True)
    compile_blocks(fast)
    expected, got = _training_gradients(eager), _training_gradients(fast)
    assert {b.self_attn.kernel for b in fast.blocks} == {"fa4"} and eager.blocks[0].self_attn.kernel == "sdpa"
    assert len(got) == len(expected) == 61
    for name, grad in got.items():
        assert rel_err(grad, expected[name]) < 3e-2, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("width", [64, 5120, 13824, 2056])
def test_fp8_quantize_rows_kernel_equals_eager(width: int, dtype: torch.dtype) -> None:
    """FP8Linear's fused per-token quantisation (one Triton pass) gives the eager form's bits: scales and codes, with
    an all-zero row, a row of huge values and one of subnormal-sized ones among them."""
    from wanalpha import fp8
    from wanalpha.models import kernels

    gen = torch.Generator("cuda").manual_seed(width)
    x = torch.randn(37, width, device="cuda", generator=gen).to(dtype) * 3
    x[3] = 0
    x[5] *= 1e4
    x[7] *= 1e-30 if dtype == torch.float32 else 1e-20
    fused = fp8.quantize_rows(x)
    assert kernels.fp8_quantize_rows(x, fp8.FP8_DTYPE, fp8.FP8_MAX, fp8._RECIPROCAL) is not None  # the kernel ran
    q, scale = fp8.quantize_rows_eager(x)
    assert torch.equal(fused[1], scale)
    assert torch.equal(fused[0].view(torch.uint8), q.view(torch.uint8))


def test_fp8_gemm_settings_keep_the_product(monkeypatch) -> None:
    """FP8Linear's GEMM settings on Hopper, at ffn.2's 13,824-long reduction: the bias added in the epilogue gives the
    separate add's product within bf16's rounding of the result (one rounding instead of two; a unit in the last
    place is at most 2⁻⁷ of a value), and fast accumulation (with it, the default) errs against float32 within 1.5×
    the full accumulation's error (measured at the 14B shapes: 3.75e-2 either way)."""
    from wanalpha import fp8

    if not fp8.scaled_mm_supported(torch.device("cuda")):
        pytest.skip("FP8 GEMMs need compute capability 9.0")
    assert fp8.GEMM == {"bias_in_gemm": True, "fast_accum": True}
    gen = torch.Generator("cuda").manual_seed(0)
    with torch.no_grad():
        linear = torch.nn.Linear(13824, 512, device="cuda", dtype=torch.bfloat16)
        linear.weight.normal_(0, 0.02, generator=gen)
        linear.bias.normal_(0, 0.5, generator=gen)
        x = torch.randn(1000, 13824, device="cuda", dtype=torch.bfloat16, generator=gen)
        exact = x.float() @ linear.weight.float().t() + linear.bias.float()
        layer = fp8.FP8Linear.from_linear(linear)
        out = {}
        for bias_in_gemm, fast_accum in ((False, False), (True, False), (True, True)):
            monkeypatch.setattr(fp8, "GEMM", {"bias_in_gemm": bias_in_gemm, "fast_accum": fast_accum})
            out[bias_in_gemm, fast_accum] = layer(x).float()
    separate, in_gemm, fast = out[False, False], out[True, False], out[True, True]
    assert rel_err(separate, exact) < 5e-2
    assert 0 < rel_err(in_gemm, separate) < 2**-6
    assert rel_err(fast, exact) < 1.5 * rel_err(in_gemm, exact)


@pytest.mark.parametrize("shape", [(5120, 5120), (13824, 5120), (80, 48)])
@pytest.mark.parametrize("scaled", [False, True])
def test_fp8_dequantize_scaled_kernel_equals_eager(shape: tuple[int, int], scaled: bool) -> None:
    """The fused adapter's W' over an FP8 base in one Triton pass gives the eager forms' bits (fp8.dequantize to bf16,
    then fused_adapter._scaled), at the 14B shapes and a ragged one."""
    from wanalpha import fp8
    from wanalpha.fused_adapter import _scaled
    from wanalpha.models import kernels

    gen = torch.Generator("cuda").manual_seed(shape[0])
    q, scale = fp8.quantize_weight(torch.randn(shape, device="cuda", generator=gen) * 0.02)
    magnitude = torch.rand(shape[0], device="cuda", generator=gen) + 0.5 if scaled else None
    norm = torch.rand(shape[0], device="cuda", generator=gen) + 0.5 if scaled else None
    factor = None if magnitude is None else magnitude / norm
    out = kernels.fp8_dequantize_scaled(q, scale, torch.bfloat16, factor, torch.bfloat16)
    assert out is not None
    assert torch.equal(out, _scaled(fp8.dequantize(q, scale, torch.bfloat16), magnitude, norm, torch.bfloat16))


def test_fused_dora_over_fp8_base_on_gpu_equals_its_dequantised_base(monkeypatch) -> None:
    """A fused DoRA linear over an FP8 base (the one-pass dequantise-and-scale in forward and backward) gives, bit for
    bit, the output and gradients of the same linear over the dequantised bf16 weight."""
    from wanalpha import fp8
    from wanalpha.fused_adapter import FP8Base, fused_linear
    from wanalpha.models import kernels

    ran, kernel = [], kernels.fp8_dequantize_scaled

    def counted(*args, **kwargs):
        out = kernel(*args, **kwargs)
        ran.append(out is not None)
        return out

    monkeypatch.setattr(kernels, "fp8_dequantize_scaled", counted)

    gen = torch.Generator("cuda").manual_seed(0)
    q, scale = fp8.quantize_weight(torch.randn(384, 256, device="cuda", generator=gen) * 0.05)
    bias = torch.randn(384, device="cuda", generator=gen).bfloat16()

    def run(weight):
        torch.manual_seed(0)
        x = torch.randn(77, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        a = (torch.randn(8, 256, device="cuda") * 0.05).requires_grad_()
        b = (torch.randn(384, 8, device="cuda") * 0.05).requires_grad_()
        m = (torch.rand(384, device="cuda") + 0.5).requires_grad_()
        y = fused_linear(torch.nn.Identity(), x, weight, bias, a, b, 2.0, m)
        y.float().square().mean().backward()
        return [y.detach(), x.grad, a.grad, b.grad, m.grad]

    over_fp8 = run(FP8Base(q, scale, torch.bfloat16))
    assert ran.count(True) >= 3  # the kernel formed the norm's weight, W' for the forward and for the backward
    over_bf16 = run(fp8.dequantize(q, scale, torch.bfloat16))
    for name, got, expected in zip(("y", "x", "a", "b", "m"), over_fp8, over_bf16, strict=True):
        assert torch.equal(got, expected), name


def _fa3_unavailable(fp8: bool) -> str | None:
    from wanalpha.models import fa3

    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    return fa3.unsupported(torch.device("cuda"), torch.bfloat16, fp8=fp8)


@pytest.mark.skipif(_fa3_unavailable(False) is not None, reason=f"FlashAttention-3: {_fa3_unavailable(False)}")
@pytest.mark.parametrize("keys", [2000, 512], ids=["self", "cross"])
def test_fa3_attention_on_gpu(keys: int) -> None:
    """FlashAttention-3 in bf16: as close to float32 attention as cuDNN's SDPA kernel; its FP8 forward (where built):
    within FP8's error, on inputs whose keys and values carry a common offset (which the quantisation moves out)."""
    import math

    from torch.nn.attention import SDPBackend, sdpa_kernel

    from wanalpha.models import fa3
    from wanalpha.models.layers import attention

    gen = torch.Generator("cuda").manual_seed(0)
    q = torch.randn(2, 2000 + 77, 4, 128, device="cuda", generator=gen)
    k, v = (torch.randn(2, keys, 4, 128, device="cuda", generator=gen) + 3 for _ in range(2))
    scores = torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(128)
    exact = torch.einsum("bhlm,bmhd->blhd", scores.softmax(-1), v)
    q, k, v = (t.bfloat16() for t in (q, k, v))
    with torch.no_grad():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            cudnn = attention(q, k, v, kernel="sdpa").float()
        bf16 = attention(q, k, v, kernel="fa3").float()
        assert rel_err(bf16, exact) <= 1.5 * rel_err(cudnn, exact) + 1e-3
        if _fa3_unavailable(True) is None:
            assert attention(q, k, v, kernel="fa3-fp8").dtype == torch.bfloat16
            # Its error before the output's rounding to bf16 (which, with v's mean of 3 added back, keeps 8 bits of
            # the mean and errs ~0.1 of the varying part by itself, in any kernel that returns bf16).
            fp8 = fa3.attention_fp8(q, k, v, dtype=torch.float32)
            varying = exact - v.float().mean(1, keepdim=True)
            error = ((fp8 - exact).norm() / varying.norm()).item()
            # The PyTorch form of the kernel's arithmetic (what measures FP8 attention off Hopper) predicts it: 0.072
            # (2000 keys) and 0.067 (512) on the CPU's draws of these inputs.
            reference = fa3.attention_fp8_reference(q, k, v, dtype=torch.float32)
            predicted = ((reference - exact).norm() / varying.norm()).item()
            assert error < 0.1, (error, predicted)
            assert 0.7 * predicted < error < 1.25 * predicted, (error, predicted)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_head_quantisation_on_gpu_equals_eager() -> None:
    """kernels.head_stats / head_quantize on the GPU: the statistics are PyTorch's (the sums to float32 rounding),
    the float8 codes the eager form's bit for bit (centred and not), at the 14B's head layout and a ragged length."""
    from wanalpha.models import fa3, kernels

    gen = torch.Generator("cuda").manual_seed(0)
    x = (torch.randn(2, 1000 + 13, 40, 128, device="cuda", generator=gen) * 2 + 0.5).bfloat16()
    total, low, high = kernels.head_stats(x)
    xf = x.float()
    assert torch.allclose(total, xf.sum(1), rtol=1e-5, atol=1e-3)
    assert torch.equal(low, xf.amin(1)) and torch.equal(high, xf.amax(1))
    for center in (True, False):
        mean, scale = fa3.scales(x, center)
        codes = kernels.head_quantize(x, mean, scale, fa3.FP8, fa3.FP8_MAX)
        assert codes is not None
        assert torch.equal(codes.view(torch.uint8), fa3.quantize_eager(x, mean, scale).view(torch.uint8)), center


@pytest.mark.skipif(_fa3_unavailable(True) is not None, reason=f"FlashAttention-3 FP8: {_fa3_unavailable(True)}")
def test_fa3_fp8_dit_forward_on_gpu() -> None:
    """A small DiT of head size 128 with its self-attention on FlashAttention-3's FP8 forward gives the SDPA
    forward within FP8 attention's error; bf16 FlashAttention-3 within bf16's."""
    dit = _small_adapted_dit(False).eval()
    gen = torch.Generator("cuda").manual_seed(1)
    x = torch.randn(1, 16, 5, 32, 32, device="cuda", generator=gen)
    t, ctx = torch.tensor([500.0], device="cuda"), torch.randn(1, 16, 64, device="cuda", generator=gen)
    outputs = {}
    with torch.no_grad():
        for kernel in ("sdpa", "fa3", "fa3-fp8"):
            set_attention_kernel(dit, kernel, torch.device("cuda"), torch.bfloat16, backward=False)
            outputs[kernel] = dit(x, t, ctx).float()
    assert rel_err(outputs["fa3"], outputs["sdpa"]) < 1e-2
    assert 0 < rel_err(outputs["fa3-fp8"], outputs["sdpa"]) < 0.1


def test_text_encoder_preparation_runs_one_layer_at_the_real_shape_and_frees_it(monkeypatch) -> None:
    """runtime.prepare_text_encoder runs one UMT5 layer of the config's sizes once on the GPU at the real input shape
    (the batch, padded to text_len, part of it masked) and leaves no memory allocated."""
    from wanalpha.models import t5
    from wanalpha.runtime import prepare_text_encoder

    config = t5.T5Config(vocab_size=512, dim=64, dim_attn=64, dim_ffn=128, num_heads=4, num_layers=3)
    calls = []
    real_forward = t5.UMT5Encoder.forward

    def forward(self, ids, mask=None):
        calls.append((len(self.blocks), tuple(ids.shape), ids.device.type, int(mask.sum()), self.norm.weight.dtype))
        return real_forward(self, ids, mask)

    monkeypatch.setattr(t5.UMT5Encoder, "forward", forward)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    prepare_text_encoder(config, 3, 32, torch.device("cuda"))
    assert calls == [(1, (3, 32), "cuda", 3 * 16, torch.bfloat16)]
    assert torch.cuda.memory_allocated() == before


def test_decode_writes_norms_behind_the_cached_frames_and_residuals_in_the_bias_pass() -> None:
    """The channels-last bf16 decode (generate's): in every chunk each RMS norm that feeds a causal convolution
    writes behind that convolution's cached frames (vae._normed_frames: no concatenation; zeros in front where the
    cache holds fewer), and each residual block's sum is added in its last convolution's bias pass, and the bias of
    its first convolution by the norm after it; the video is the one of the layers run one by one with the
    concatenation, the bias passes and PyTorch's add, bit for bit, and so are the decodes whose norms write the cached
    frames into the next chunk's buffers (WanVAE.decode_rooms: every layer's, or as the default budget allows), which
    copy fewer bytes. The encoder's cached chunks take the same path."""
    from wanalpha.models import kernels, vae
    from wanalpha.runtime import GPU_LAYOUT, apply_vae_runtime

    torch.manual_seed(3)
    model = vae.WanVAE(vae.VAEConfig(dim=32)).cuda().bfloat16().eval()
    model = apply_vae_runtime(model, GPU_LAYOUT)
    model.decode_rooms = 0  # no rooms: the cached frames copied in front of each chunk
    z = torch.randn(1, 16, 4, 12, 20, device="cuda")
    video = torch.rand(1, 3, 9, 96, 160, device="cuda", dtype=torch.bfloat16) * 2 - 1
    real_frames, real_bias = vae._normed_frames, kernels.add_row_bias_
    counts = {"frames": 0, "residual": 0, "deferred": 0}

    def frames(*args, **kwargs):
        y = real_frames(*args, **kwargs)
        counts["frames"] += y is not None
        counts["deferred"] += y is not None and args[5] is not None  # the norm added the convolution's bias before it
        return y

    def bias(*args, residual=None, **kwargs):
        done = real_bias(*args, residual=residual, **kwargs)
        counts["residual"] += done and residual is not None
        return done

    norms = sum(  # the RMS norms that feed a causal convolution, once a chunk
        isinstance(m, vae.RMSNorm) and vae._fed_convolution(list(seq), i) is not None
        for seq in model.decoder.modules()
        if isinstance(seq, torch.nn.Sequential)
        for i, m in enumerate(seq)
    )
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(vae, "_normed_frames", frames)
        patch.setattr(kernels, "add_row_bias_", bias)
        fused = model.decode(z)
        assert counts["frames"] == norms * z.shape[2]  # every chunk, the first two included
        fused = fused, model.encode(video)
        assert counts["residual"] > 0 and counts["deferred"] > 0
        copied = _copied_bytes(lambda: model.decode(z))
        model.decode_rooms = 1 << 40
        roomy, roomy_copied = model.decode(z), _copied_bytes(lambda: model.decode(z))
        model.decode_rooms = None  # the default: a share of the free memory (here enough for every layer)
        auto, auto_copied = model.decode(z), _copied_bytes(lambda: model.decode(z))
        model.decode_rooms = 0
        sums = []
        patch.setattr(
            kernels,
            "add_row_bias_",
            lambda *a, residual=None, **k: sums.append(residual is not None) or bias(*a, residual=residual, **k),
        )
        for block in model.modules():
            if isinstance(block, vae.ResidualBlock):
                block.sum_in_norm = True
        summed = model.decode(z), model.encode(video)
        for block in model.modules():
            if isinstance(block, vae.ResidualBlock):
                block.sum_in_norm = False
        summed_passes = sum(sums)
        sums.clear()
        model.decode(z), model.encode(video)
        assert 0 < summed_passes < sum(sums)  # the sums the norms took are not added in a pass of their own
        patch.setattr(vae, "_normed_frames", lambda *args, **kwargs: None)
        patch.setattr(kernels, "add_row_bias_", lambda *a, residual=None, **k: residual is None and real_bias(*a, **k))
        plain = model.decode(z), model.encode(video)
    assert torch.equal(fused[0], plain[0]) and torch.equal(fused[1], plain[1])
    assert torch.equal(roomy, plain[0]) and torch.equal(auto, plain[0])
    assert torch.equal(summed[0], plain[0]) and torch.equal(summed[1], plain[1])
    assert auto_copied == roomy_copied < copied / 2


def _copied_bytes(fn) -> int:
    """The bytes that fn's device-to-device copies (copy_ and clone between equal dtypes) write."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (torch.ops.aten.copy_.default, torch.ops.aten.clone.default):
                target = args[0] if func is torch.ops.aten.copy_.default else out
                Count.total += target.numel() * target.element_size()
            return out

    with Count():
        fn()
    return Count.total


def _tiny_decoders(seed: int, latent_frames: int):
    """A tiny float32 Wan decoder on the GPU (default layout), its bf16 copy in the GPU layout, and a latent."""
    from wanalpha.models import vae
    from wanalpha.runtime import GPU_LAYOUT, apply_vae_runtime

    torch.manual_seed(seed)
    base = vae.WanVAE(vae.VAEConfig(dim=32), with_encoder=False).cuda().eval()
    z = torch.randn(1, 16, latent_frames, 16, 24, device="cuda")
    bf16 = vae.WanVAE(vae.VAEConfig(dim=32), with_encoder=False)
    bf16.load_state_dict(base.state_dict())
    return base, apply_vae_runtime(bf16.cuda().bfloat16().eval(), GPU_LAYOUT), z


def _recording(fn, ran: list):
    """fn, appending to `ran` whether each call gave a result (not None: the kernel's form ran)."""

    def recorded(*args):
        out = fn(*args)
        ran.append(out is not None)
        return out

    return recorded


def test_upsampling_in_phases_on_gpu() -> None:
    """The decoder's ×2 upsampling convolutions in the phase form on the GPU (vae.phase_convolved): kernels.phase_rows
    gathers the phases with the bias as PyTorch's add would (bf16, bit for bit, at a decoder's channel count); a bf16
    channels-last decode that takes it for every upsampling is within 25 % of the upsampled form's error against the
    float32 decode (TF32 off, upsampled form), and the float32 decode in phases equals it to float32's rounding."""
    from test_kernels import _phases_gathered
    from wanalpha.models import kernels, vae
    from wanalpha.runtime import GPU_LAYOUT, apply_vae_runtime

    gen = torch.Generator("cuda").manual_seed(14)
    y = (torch.randn(3, 4 * 96, 31, 53, device="cuda", generator=gen) * 4).bfloat16()
    y = y.contiguous(memory_format=torch.channels_last)
    bias = (torch.randn(96, device="cuda", generator=gen) * 2).bfloat16()
    assert torch.equal(kernels.phase_rows(y, bias).cpu(), _phases_gathered(y.cpu(), bias.cpu()))

    base, bf16, z = _tiny_decoders(14, latent_frames=5)
    real, phased = vae.phase_convolved, []
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.backends.cudnn, "allow_tf32", False)
        patch.setattr(vae, "phase_convolved", lambda *args: None)
        exact = base.decode(z)
        fp32_fast = apply_vae_runtime(base, GPU_LAYOUT)
        plain32, plain16 = fp32_fast.decode(z), bf16.decode(z)
        patch.setattr(vae, "phase_convolved", _recording(real, phased))
        phase32, phase16 = fp32_fast.decode(z), bf16.decode(z)
    assert len(phased) == 2 * 3 * 5 and all(phased)  # 3 upsamplings a chunk, 5 chunks, two decodes
    assert rel_err(phase32.cpu(), exact.cpu()) < 1e-5 and rel_err(plain32.cpu(), exact.cpu()) < 1e-5
    assert 0 < rel_err(phase16.cpu(), exact.cpu()) < 1.25 * rel_err(plain16.cpu(), exact.cpu())


def test_few_output_convolution_on_gpu() -> None:
    """kernels.conv3_few_outputs compiled on the GPU (the decoders' 96 → 3 heads and smaller ones, whose loops run
    unpipelined: 32, 48 and 64 input channels; bf16 channels-last, frames of a size that leaves partial tiles and of
    the tiny decoder's): the float64 convolution rounded once, but on a small share of the outputs, each
    within a bf16 step of its value plus the float32 sums' error (2⁻¹⁶ of the sum of the products' magnitudes: an
    output that cancels to near zero can land several of its own steps away, as on the H100, 2.06); a bf16 decode
    whose heads take it is as close to the float32 decode (TF32 off) as the one whose heads run on cuDNN, and the
    head ran the kernel in every chunk."""
    from wanalpha.models import kernels

    conv3d = torch.nn.functional.conv3d
    for cin, size in ((96, (37, 131)), (64, (128, 192)), (48, (37, 131)), (32, (128, 192)), (32, (37, 131))):
        gen = torch.Generator("cuda").manual_seed(23)
        x = torch.randn(1, cin, 6, *size, device="cuda", generator=gen).bfloat16()
        x = x.contiguous(memory_format=torch.channels_last_3d)
        weight = (torch.randn(3, cin, 3, 3, 3, device="cuda", generator=gen) * 0.05).bfloat16()
        bias = torch.randn(3, device="cuda", generator=gen).bfloat16()
        out = kernels.conv3_few_outputs(x, kernels.few_outputs_weight(weight), 3, bias)
        exact = conv3d(x.double(), weight.double(), bias.double(), padding=(0, 1, 1))
        rounded = exact.bfloat16()
        magnitude = conv3d(x.double().abs(), weight.double().abs(), bias.double().abs(), padding=(0, 1, 1))
        allowed = exact.abs() * 2**-7 + magnitude * 2**-16
        assert out.is_contiguous(memory_format=torch.channels_last_3d)
        assert ((out.double() - exact).abs() <= allowed).all(), cin
        assert (out != rounded).float().mean() < 0.02, cin

    base, bf16, z = _tiny_decoders(23, latent_frames=4)
    used = []
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.backends.cudnn, "allow_tf32", False)
        assert bf16.decoder.head[-1].few_outputs_kernel  # the decoders' heads take it by default
        bf16.decoder.head[-1].few_outputs_kernel = False
        exact, cudnn = base.decode(z), bf16.decode(z)
        bf16.decoder.head[-1].few_outputs_kernel = True
        patch.setattr(kernels, "conv3_few_outputs", _recording(kernels.conv3_few_outputs, used))
        fast = bf16.decode(z)
    assert len(used) == 4 and all(used[1:])  # the first chunk's zero-padded frames may not be channels-last
    assert 0 < rel_err(fast.cpu(), exact.cpu()) < 1.1 * rel_err(cudnn.cpu(), exact.cpu())


def test_prepared_decoders_leave_no_convolution_to_plan_on_this_thread() -> None:
    """runtime.prepare_decoders on this thread: a decode after it with cuDNN's autotuning on (which times every shape
    the thread has no plan for) launches exactly the kernels of a decode whose plans are all cached: no timing runs.
    On another thread the same decode times its own (PyTorch keeps the plans per thread). The placeholder's memory is
    freed and cudnn.benchmark is as it was."""
    import threading

    from torch.autograd import DeviceType

    from wanalpha.models import vae as vae_module
    from wanalpha.models.rgba import RGBAlphaVAE
    from wanalpha.runtime import GPU_LAYOUT, apply_vae_runtime, prepare_decoders

    device, latent = torch.device("cuda"), (1, 16, 5, 12, 16)
    flag = torch.backends.cudnn.benchmark
    prepare_decoders(device, torch.bfloat16, latent)  # a first call also makes this thread's library handles
    before = torch.cuda.memory_allocated()
    prepare_decoders(device, torch.bfloat16, latent)
    assert torch.cuda.memory_allocated() == before and torch.backends.cudnn.benchmark == flag
    torch.manual_seed(0)
    vae = apply_vae_runtime(RGBAlphaVAE(with_encoder=False).to(device, torch.bfloat16).eval(), GPU_LAYOUT)
    # the upsamplings' phase kernels are made by the runtime, not by the first decode (whose launches exceeded the
    # second's by their 54 kernels before)
    upsamplings = vae_module.upsampling_convolutions(vae)
    assert len(upsamplings) == 6 and all(conv._phases is not None for conv in upsamplings)
    z = torch.randn(latent, device=device)

    def launches() -> int:
        activities = [torch.profiler.ProfilerActivity.CUDA]
        with (
            torch.no_grad(),
            vae_module.autotuned_convolutions(device),
            torch.profiler.profile(activities=activities) as p,
        ):
            for _ in vae.decode_frames(z):
                pass
            torch.cuda.synchronize()
        return sum(1 for event in p.events() if event.device_type == DeviceType.CUDA)

    first, again = launches(), launches()
    assert first == again  # nothing was timed: every shape had its plan
    elsewhere = []
    thread = threading.Thread(target=lambda: elsewhere.append(launches()))
    thread.start()
    thread.join()
    assert elsewhere[0] > again  # another thread times its own plans


def test_host_frames_copy_behind_the_kernels_into_fresh_buffers() -> None:
    """generate.HostFrames on a GPU: a chunk's (permuted, non-contiguous) uint8 frames arrive in host memory as the
    same contiguous arrays `.cpu().numpy()` gives, each chunk in buffers of its own (the writers may still hold the
    previous chunk's while the next one is copied)."""
    import numpy as np

    from wanalpha.data.render import to_uint8
    from wanalpha.generate import HostFrames

    torch.manual_seed(0)
    video = torch.rand(1, 3, 4, 48, 64, device="cuda") * 2 - 1
    rgb = to_uint8(video)[0].permute(1, 2, 3, 0)  # (t,H,W,3), not contiguous
    alphas, flipped = to_uint8(video)[0], rgb.flip(0)
    # CUDA loads a kernel at its first use (lazy loading), which may wait for the GPU: the copies' kernels once first
    HostFrames(rgb, alphas[0]).arrays()
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # the GPU busy for a while: the copies wait behind it
    first, second = HostFrames(rgb, alphas[0]), HostFrames(flipped, alphas[1])
    assert not first.done.query()  # queued, not waited for
    a, b = first.arrays(), second.arrays()
    assert np.array_equal(a[0], rgb.cpu().numpy()) and np.array_equal(a[1], to_uint8(video)[0, 0].cpu().numpy())
    assert np.array_equal(b[0], rgb.flip(0).cpu().numpy()) and a[0].flags["C_CONTIGUOUS"]
    assert not np.shares_memory(a[0], b[0]) and first.host[0].is_pinned()
