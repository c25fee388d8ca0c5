"""The Wan2.1 causal VAE: official layout, parity with the golden tensors, chunked == whole-sequence semantics."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import rel_err
from wanalpha.checkpoints import load_wan_vae
from wanalpha.errors import WanAlphaError
from wanalpha.models import rgba
from wanalpha.models.vae import CausalCache, VAEConfig, WanVAE, encode_chunks

TOL = 1e-4  # reference NOTES §9: VAE outputs, err = max|a-b| / max|golden| <= 1e-4


def test_state_dict_layout_equals_official(reference: Path) -> None:
    expected = json.loads((reference / "keys_wan21_vae.json").read_text())["keys"]
    with torch.device("meta"):
        vae = WanVAE()
    assert {k: list(v.shape) for k, v in vae.state_dict().items()} == expected
    assert sum(p.numel() for p in vae.parameters()) == 126_892_531


@pytest.fixture(scope="module")
def official_vae(tmp_path_factory, wan_vae_state_dict) -> WanVAE:
    # Round trip through a real .pth file: the loader uses torch.load(weights_only=True), meta build + assign.
    path = tmp_path_factory.mktemp("vae") / "Wan2.1_VAE.pth"
    torch.save(wan_vae_state_dict, path)
    return load_wan_vae(path)


def test_golden_encode(official_vae: WanVAE, reference: Path) -> None:
    golden = load_file(reference / "golden/vae.safetensors")
    conv1_out = {}
    hook = official_vae.conv1.register_forward_hook(lambda m, i, o: conv1_out.__setitem__("x", o))
    with torch.no_grad():
        z = official_vae.encode(golden["video"])
    hook.remove()
    assert rel_err(conv1_out["x"], golden["encode_conv1_out"]) < TOL
    assert z.shape == golden["latent_mean_normalized"].shape
    assert rel_err(z, golden["latent_mean_normalized"]) < TOL


def test_golden_decode(official_vae: WanVAE, reference: Path) -> None:
    golden = load_file(reference / "golden/vae.safetensors")
    conv2_out = {}
    hook = official_vae.conv2.register_forward_hook(lambda m, i, o: conv2_out.__setitem__("x", o))
    with torch.no_grad():
        x = official_vae.decode(golden["latent_in"])
    hook.remove()
    assert rel_err(conv2_out["x"], golden["decode_conv2_out"]) < TOL
    assert x.shape == golden["decoded"].shape  # (1,3,9,64,64): 1 + 4·(3-1) frames, not clamped
    assert rel_err(x, golden["decoded"]) < TOL
    assert x.abs().max() > 1  # proves no clamp


def test_loader_rejects_wrong_files(tmp_path: Path, wan_vae_state_dict) -> None:
    bad = dict(wan_vae_state_dict)
    bad.pop("decoder.head.2.bias")
    bad["extra.weight"] = torch.zeros(1)
    with pytest.raises(WanAlphaError, match=r"missing: decoder.head.2.bias; unexpected: extra.weight"):
        load_wan_vae(bad)
    with pytest.raises(WanAlphaError, match="does not exist"):
        load_wan_vae(tmp_path / "nope.pth")

    torch.save({"a": argparse.Namespace(x=1)}, tmp_path / "code.pth")  # an arbitrary Python object
    with pytest.raises(WanAlphaError, match="never unpickles code"):
        load_wan_vae(tmp_path / "code.pth")


# ------------------------------------------------------------------------- internal consistency (tiny configs)

TINY = VAEConfig(dim=8)


@pytest.fixture(scope="module")
def tiny_vae() -> WanVAE:
    torch.manual_seed(0)
    return WanVAE(TINY).eval()


@pytest.mark.parametrize("frames", [1, 5, 13, 17])
def test_chunked_encode_equals_whole_sequence(tiny_vae: WanVAE, frames: int) -> None:
    video = torch.rand(2, 3, frames, 32, 24, generator=torch.Generator().manual_seed(frames)) * 2 - 1
    with torch.no_grad():
        chunked = tiny_vae.encode_raw(video)
        whole = tiny_vae.conv1(tiny_vae.encoder(video))  # no cache: the whole-sequence form
    assert chunked.shape == (2, 32, 1 + (frames - 1) // 4, 4, 3)
    assert rel_err(chunked, whole) < 1e-5


@pytest.mark.parametrize("latent_frames", [1, 2, 4, 5])
@pytest.mark.parametrize("chunk", [1, 3])
def test_chunked_decode_equals_whole_sequence(tiny_vae: WanVAE, latent_frames: int, chunk: int, monkeypatch) -> None:
    """The decode a chunk at a time (latent frame 0 alone, then `decode_chunk` latent frames each, the last one
    shorter where they do not divide) equals the whole-sequence decoder; decode_frames yields those chunks."""
    z = torch.randn(1, 16, latent_frames, 4, 5, generator=torch.Generator().manual_seed(latent_frames))
    monkeypatch.setattr(tiny_vae, "decode_chunk", chunk)
    with torch.no_grad():
        chunked = tiny_vae.decode(z)
        whole = tiny_vae.decoder(tiny_vae.conv2(tiny_vae.denormalise(z)))
        sizes = [c.shape[2] for c in tiny_vae.decode_frames(z)]
    assert chunked.shape == (1, 3, 1 + 4 * (latent_frames - 1), 32, 40)
    assert rel_err(chunked, whole) < 1e-5
    rest = latent_frames - 1
    assert sizes == [1] + [4 * chunk] * (rest // chunk) + ([4 * (rest % chunk)] if rest % chunk else [])


def test_decode_chunks_must_hold_a_frame() -> None:
    from wanalpha.models.vae import decode_chunks

    assert list(decode_chunks(6, 2)) == [slice(0, 1), slice(1, 3), slice(3, 5), slice(5, 7)]
    with pytest.raises(ValueError, match="decode chunks of 0"):
        list(decode_chunks(6, 0))


def test_encode_is_causal_and_streams(tiny_vae: WanVAE) -> None:
    video = torch.rand(1, 3, 13, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    changed = video.clone()
    changed[:, :, 9:] = 0.5  # only the last chunk differs
    with torch.no_grad():
        a, b = tiny_vae.encode(video), tiny_vae.encode(changed)
        # One cache carried across separately issued chunks gives the same latents as encode().
        cache = CausalCache()
        streamed = torch.cat([tiny_vae.encoder(video[:, :, s], cache) for s in encode_chunks(13)], dim=2)
    assert torch.equal(a[:, :, :3], b[:, :, :3]) and not torch.equal(a[:, :, 3], b[:, :, 3])  # frames 9-12: latent 3
    assert torch.allclose(tiny_vae.conv1(streamed), tiny_vae.encode_raw(video), atol=0, rtol=0)


def test_cache_gives_a_room_once_and_only_with_its_frames() -> None:
    """CausalCache.room: the buffer whose front holds a layer's cached frames (set_room), once, and only while those
    frames are still the cached ones; a cache copied through state() carries none (its frames are copied as usual)."""
    layer, other, room = torch.nn.Identity(), torch.nn.Identity(), torch.zeros(1, 4, 6, 2, 2)
    size = room.numel() * room.element_size()
    cache = CausalCache(rooms=2 * size)
    cache.set_room(layer, room[:, :, :2], room)
    assert cache.get(layer) is not None and cache.room(layer) is room and cache.room(layer) is None
    cache.set_room(layer, room[:, :, :2], room)
    assert CausalCache.from_state(cache.state()).room(layer) is None
    cache.set(layer, torch.zeros(1, 4, 2, 2, 2))  # other frames cached since
    assert cache.room(layer) is None
    # the budget: rooms held now count until given back (or dropped, or cleared)
    cache.set_room(layer, room[:, :, :2], room)
    assert cache.room_fits(size) and not cache.room_fits(size + 1)
    cache.set_room(other, room[:, :, :2], room.clone())
    assert not cache.room_fits(1)
    cache.set_room(layer, room[:, :, :2], room)  # the layer's new room replaces its old one
    assert not cache.room_fits(1) and cache.room(other) is not None and cache.room_fits(size)
    cache.clear()
    assert cache.room(layer) is None and cache.room_fits(2 * size) and not CausalCache().room_fits(1)


def test_decode_rooms_default_to_none_off_the_gpu() -> None:
    """WanVAE.room_budget: an explicit decode_rooms as set; by default none on the CPU (the rooms are the GPU
    layout's); and tiled decoding, the memory-tight form, asks for none (checked by the budget it passes)."""
    vae = WanVAE(VAEConfig(dim=16), with_encoder=False)
    assert vae.decode_rooms is None and vae.room_budget(torch.device("cpu")) == 0
    vae.decode_rooms = 123
    assert vae.room_budget(torch.device("cuda")) == 123
    asked = []
    real = vae._frames
    vae._frames = lambda latent, rooms=None: (asked.append(rooms), real(latent, rooms))[1]
    with torch.no_grad():
        vae.decode(torch.zeros(1, 16, 1, 8, 8), tile_size=(4, 4), tile_overlap=(2, 2))
    assert asked and set(asked) == {0}


@pytest.mark.parametrize("frames", [0, 2, 4, 8, 10])
def test_frame_count_must_be_4n_plus_1(tiny_vae: WanVAE, frames: int) -> None:
    with pytest.raises(ValueError, match=r"4n\+1 frames"):
        tiny_vae.encode(torch.zeros(1, 3, frames, 16, 16))


def test_size_must_be_multiple_of_8(tiny_vae: WanVAE) -> None:
    with pytest.raises(ValueError, match="multiples of 8"):
        tiny_vae.encode(torch.zeros(1, 3, 5, 20, 16))


def test_tiled_decode_matches_untiled() -> None:
    torch.manual_seed(0)
    vae = WanVAE(VAEConfig(dim=16)).eval()
    z = torch.randn(1, 16, 2, 48, 40, generator=torch.Generator().manual_seed(3))  # two chunks through each tile
    with torch.no_grad():
        full = vae.decode(z)
        whole_tile = vae.decode(z, tile_size=(48, 40))
        tiled = vae.decode(z, tile_size=(32, 32), tile_overlap=(16, 16))
    assert torch.equal(whole_tile, full)  # one tile covering the frame is the untiled decode
    assert tiled.shape == full.shape
    # Tolerance: tiles cannot see the whole frame (global middle attention, a receptive field of ~16 latent cells),
    # and random weights spread influence far more than trained ones; with overlap = tile/2 the blended seams keep
    # the mean error under 1% and the worst pixel under 0.25 of an output range of about ±1.6.
    diff = (tiled - full).abs()
    assert diff.mean() < 0.01 * full.abs().max()
    assert diff.max() < 0.25


def test_gradient_checkpointing_gives_the_same_gradients(tiny_vae: WanVAE) -> None:
    z = torch.randn(1, 16, 4, 4, 6, generator=torch.Generator().manual_seed(2), requires_grad=True)
    tiny_vae.requires_grad_(False)
    grads = []
    for checkpointing in (False, True):
        tiny_vae.gradient_checkpointing = checkpointing
        out = tiny_vae.decode(z)
        (out**2).mean().backward()
        grads.append((out.detach(), z.grad.clone()))
        z.grad = None
    tiny_vae.gradient_checkpointing = False
    assert torch.equal(grads[0][0], grads[1][0]) and torch.allclose(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("images", [False, True])
def test_rms_norm_channels_last_same_values_and_gradients(images: bool) -> None:
    """A channels-last input (the VAE's activations on the GPU under `channels_last`) takes the fused RMS norm over the
    innermost channels: the same values and gradients as the default layout's to fp32 rounding, the layout kept, a
    zero feature vector still zero, and in bf16 no further from fp32 than the unfused path. On the GPU the whole VAE
    is compared: tests/test_gpu.py."""
    from wanalpha.models.vae import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(8, images=images)
    with torch.no_grad():
        norm.gamma.normal_()
    x = torch.randn(2, 8, 3, 4, 5)[:, :, 0] if images else torch.randn(2, 8, 3, 4, 5)
    x[0, :, 1] = 0
    layout = torch.channels_last if images else torch.channels_last_3d
    results = []
    for inp in (x.clone(), x.contiguous(memory_format=layout)):
        inp.requires_grad_(True)
        y = norm(inp)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results.append((y.detach(), inp.grad, norm.gamma.grad.clone()))
        norm.gamma.grad = None
    for plain, fused in zip(*results, strict=True):
        assert rel_err(fused, plain) < 1e-6
    y = results[1][0]
    assert y.is_contiguous(memory_format=layout) and torch.equal(y[0, :, 1], torch.zeros_like(y[0, :, 1]))
    low = RMSNorm(8, images=images).bfloat16()
    with torch.no_grad():
        low.gamma.copy_(norm.gamma)
        plain, fused = low(x.bfloat16()).float(), low(x.bfloat16().contiguous(memory_format=layout)).float()
    assert rel_err(fused, results[0][0]) <= rel_err(plain, results[0][0])
    with torch.no_grad():  # bf16 activations, float32 gamma (autocast's case): promoted as the plain product is
        mixed, expected = norm(x.bfloat16().contiguous(memory_format=layout)), norm(x.bfloat16())
    assert mixed.dtype == torch.float32 and rel_err(mixed, expected) < 1e-6


def test_channels_last_fuses_each_norm_with_its_silu(tiny_vae: WanVAE) -> None:
    """`runtime.set_channels_last` hands every SiLU that follows an RMS norm to the norm (the SiLU becomes an
    identity, the state dict is unchanged) and the VAE computes the same values."""
    import copy

    from torch import nn

    from wanalpha.models.vae import RMSNorm
    from wanalpha.runtime import GPU_LAYOUT, apply_vae_runtime, set_channels_last

    unchanged = apply_vae_runtime(copy.deepcopy(tiny_vae), GPU_LAYOUT)  # off CUDA: unchanged
    assert any(isinstance(m, nn.SiLU) for m in unchanged.modules())
    fast = set_channels_last(copy.deepcopy(tiny_vae))
    assert not any(isinstance(m, nn.SiLU) for m in fast.modules())
    assert sum(isinstance(m, RMSNorm) and m.silu for m in fast.modules()) == sum(
        isinstance(m, nn.SiLU) for m in tiny_vae.modules()
    )
    assert fast.state_dict().keys() == tiny_vae.state_dict().keys()
    video = torch.rand(1, 3, 5, 32, 24, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        z = tiny_vae.encode(video)
        assert rel_err(fast.encode(video), z) < 1e-6
        assert rel_err(fast.decode(z), tiny_vae.decode(z)) < 1e-6


def test_temporal_interleave_keeps_channels_last() -> None:
    """The decoder's temporal upsampling interleaves channel blocks into frames; a channels-last input gives the same
    values in a channels-last output, so the blocks after it keep the GPU layout."""
    from wanalpha.models.vae import Resample

    y = torch.randn(2, 6, 3, 4, 5)
    plain = Resample._interleave(y)
    fast = Resample._interleave(y.contiguous(memory_format=torch.channels_last_3d))
    assert torch.equal(fast, plain) and fast.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.equal(plain[:, :, 3], y[:, 3:, 1]) and torch.equal(plain[:, :, 4], y[:, :3, 2])
    one = y[:, :, :1].contiguous(memory_format=torch.channels_last_3d)  # a decode chunk's one latent frame
    fast = Resample._interleave(one)
    assert torch.equal(fast, Resample._interleave(one.contiguous()))
    assert fast.is_contiguous(memory_format=torch.channels_last_3d)
    frames = fast.transpose(1, 2).flatten(0, 1)  # vae._per_frame's batch of frames, for the upsampling after it
    assert frames.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_nearest_upsampling_skips_the_float32_round_trip(dtype: torch.dtype, layout: str) -> None:
    """The decoder's nearest-exact upsampling runs in the activation's dtype (it only picks values): the same bits as
    upstream's float32 round trip, in either memory layout; other modes keep the round trip."""
    from wanalpha.models.vae import Upsample

    x = (torch.randn(3, 8, 5, 7) * 100).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    up = Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact")
    expected = torch.nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact")(x.float()).to(dtype)
    out = up(x)
    assert out.dtype == dtype and torch.equal(out, expected)
    bilinear = Upsample(scale_factor=(2.0, 2.0), mode="bilinear")
    expected = torch.nn.Upsample(scale_factor=(2.0, 2.0), mode="bilinear")(x.float()).to(dtype)
    assert torch.equal(bilinear(x), expected)


@pytest.mark.parametrize("size", [(1, 1), (5, 7), (6, 4)])
def test_phase_weight_is_the_convolution_of_the_upsampled_frames(size: tuple[int, int]) -> None:
    """vae.phase_weight: the 2×2 kernels of the four output phases (padding 1, (H+1)×(W+1) positions), gathered
    pixel (2i+a, 2j+b) from phase (a, b) at (i+a, j+b), give the 3×3 convolution (padding 1) of the ×2 nearest-exact
    upsampled frames, the borders' zero padding included (float64: to its rounding)."""
    from wanalpha.models.vae import phase_weight

    gen = torch.Generator().manual_seed(11)
    weight = torch.randn(5, 3, 3, 3, generator=gen, dtype=torch.float64)
    bias = torch.randn(5, generator=gen, dtype=torch.float64)
    x = torch.randn(2, 3, *size, generator=gen, dtype=torch.float64)
    up = torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest-exact")
    expected = torch.nn.functional.conv2d(up, weight, bias, padding=1)
    y = torch.nn.functional.conv2d(x, phase_weight(weight), None, padding=1).unflatten(1, (2, 2, 5))
    h, w = size
    out = torch.empty_like(expected)
    for a in (0, 1):
        for b in (0, 1):
            out[:, :, a::2, b::2] = y[:, a, b, :, a : a + h, b : b + w] + bias.view(1, 5, 1, 1)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert phase_weight(weight.float()).dtype == torch.float32


def test_a_bias_left_to_the_next_norm_is_added_when_that_norm_cannot_take_it(monkeypatch) -> None:
    """vae._run: a residual block's first convolution may leave its bias to the norm after it (`_normed_frames` with
    `defer`); where that norm's fast form does not apply, the bias is added before the layers run one by one, and
    the block's output is the plain one."""
    from wanalpha.models import vae
    from wanalpha.runtime import set_channels_last

    torch.manual_seed(4)
    block = set_channels_last(vae.ResidualBlock(8, 8).eval())  # the norms apply their SiLU: they feed convolutions
    x = torch.randn(1, 8, 4, 5, 6)
    calls = []

    def first_only(norm, conv, x, cache, residual, bias=None, defer=False):
        calls.append((bias is not None, defer))
        if bias is not None:
            return None  # the second norm cannot take the first convolution's bias
        y = conv(norm(x), cache)
        return (y - conv.bias.view(1, -1, 1, 1, 1), conv.bias) if defer else (y, None)

    with torch.no_grad():
        monkeypatch.setattr(vae, "_normed_frames", lambda *args: None)
        plain = block(x, vae.CausalCache())
        monkeypatch.setattr(vae, "_normed_frames", first_only)
        deferred = block(x, vae.CausalCache())
    assert calls == [(False, True), (True, False)]
    torch.testing.assert_close(deferred, plain, rtol=1e-5, atol=1e-5)


def test_which_norms_write_behind_a_causal_convolutions_frames() -> None:
    """vae._fed_convolution: an RMS norm feeds a causal convolution (the decode writes its output behind the
    convolution's cached frames) only through identities (the SiLU the norm applies itself, a dropout that drops
    nothing), a convolution with frames in front, and modules called plainly: no hooks, no forward of their own."""
    from torch import nn

    from wanalpha.models.vae import CausalConv3d, RMSNorm, _fed_convolution

    def layers(*middle, conv=None):
        return [RMSNorm(4, images=False), *middle, conv or CausalConv3d(4, 4, 3, padding=1)]

    assert _fed_convolution(layers(nn.Identity()), 0) == 2
    assert _fed_convolution(layers(nn.Identity(), nn.Dropout(0.0)), 0) == 3
    assert _fed_convolution(layers(nn.Identity(), nn.Dropout(0.5).eval()), 0) == 3
    assert _fed_convolution(layers(nn.Identity(), nn.Dropout(0.5)), 0) is None  # drops in training
    assert _fed_convolution(layers(nn.SiLU()), 0) is None  # a SiLU of its own: not the fused form
    assert _fed_convolution(layers(conv=CausalConv3d(4, 4, 1)), 0) is None  # no frames in front
    assert _fed_convolution(layers(nn.Identity()), 1) is None  # not a norm
    hooked = layers(nn.Identity())
    hooked[2].register_forward_hook(lambda *a: None)
    assert _fed_convolution(hooked, 0) is None
    patched = layers(nn.Identity())
    patched[0].forward = lambda x: x  # an instance's own forward (benchmarks/vae.py's levers)
    assert _fed_convolution(patched, 0) is None
    handle = nn.modules.module.register_module_forward_pre_hook(lambda *a: None)
    try:
        assert _fed_convolution(layers(nn.Identity()), 0) is None
    finally:
        handle.remove()
    assert _fed_convolution(layers(nn.Identity()), 0) == 2


@pytest.fixture
def autotuning(monkeypatch) -> dict:
    """vae.autotuned_convolutions replaced by a context that records whether it is open: {"on": bool}."""
    import contextlib

    from wanalpha.models import vae as vae_module

    timing = {"on": False}

    @contextlib.contextmanager
    def autotuned(device):
        timing["on"] = True
        yield
        timing["on"] = False

    monkeypatch.setattr(vae_module, "autotuned_convolutions", autotuned)
    return timing


def test_decode_plans_time_three_chunks_of_the_real_latent(autotuning, monkeypatch) -> None:
    """runtime.plan_decode_convolutions runs the whole-latent convolution at the clip's real length and then three
    chunks (never more, whatever the clip's length; fewer where it has fewer), all inside vae.autotuned_convolutions;
    off CUDA nothing is prepared (prepare_decoders)."""
    from wanalpha import runtime
    from wanalpha.models import vae as vae_module

    model = rgba.RGBAlphaVAE(TINY, with_encoder=False).eval()
    seen = []
    for decoder in (model.rgb_decoder, model.alpha_decoder):
        decoder.conv2.register_forward_pre_hook(lambda module, args: seen.append(("whole", args[0].shape[2])))
        decoder.decoder.register_forward_pre_hook(lambda module, args: seen.append(("chunk", autotuning["on"])))
    for frames, chunks in ((7, 3), (2, 2), (1, 1)):
        seen.clear()
        runtime.plan_decode_convolutions(model, (1, TINY.z_dim, frames, 4, 6), torch.device("cpu"))
        assert sorted(seen) == sorted([("whole", frames)] * 2 + [("chunk", True)] * 2 * chunks)
    assert not autotuning["on"]

    def build(*args, **kwargs):
        raise AssertionError("nothing is built off CUDA")

    monkeypatch.setattr(vae_module, "WanVAE", build)
    runtime.prepare_decoders(torch.device("cpu"), torch.bfloat16, (1, 16, 21, 60, 104))


@pytest.mark.parametrize(
    ("frames", "runs"),
    [
        (8, [[1, 2, 2], [1, 2, 2, 1]]),  # 1 + 3 × 2 + 1: the short last chunk comes 5th, planned on 1 + 2 × 2 + 1
        (6, [[1, 2, 2], [1, 2, 2, 1]]),  # 1 + 2 × 2 + 1: 4th
        (4, [[1, 2, 1]]),  # 1 + 2 + 1: the short chunk is the third, among the first three
        (5, [[1, 2, 2]]),  # 1 + 2 × 2: no short chunk
    ],
)
def test_decode_plans_cover_chunks_of_several_frames(autotuning, frames: int, runs: list[list[int]]) -> None:
    """With WanVAE.decode_chunk = 2 (generate's --vae_decode_chunk), plan_decode_convolutions runs the real latent's
    first three chunks and, where the last chunk is shorter and comes fourth or later (so that its steady shapes are
    not among the first three's), a latent whose fourth chunk is that short one; everything inside the autotuning."""
    from wanalpha import runtime

    model = rgba.RGBAlphaVAE(TINY, with_encoder=False).eval()
    model.rgb_decoder.decode_chunk = model.alpha_decoder.decode_chunk = 2
    seen = []
    model.rgb_decoder.conv2.register_forward_pre_hook(lambda module, args: seen.append([]))  # a decode starts
    model.rgb_decoder.decoder.register_forward_pre_hook(
        lambda module, args: seen[-1].append(args[0].shape[2] if autotuning["on"] else None)
    )
    runtime.plan_decode_convolutions(model, (1, TINY.z_dim, frames, 4, 6), torch.device("cpu"))
    assert seen == runs


def test_every_chunk_after_the_second_convolves_the_second_chunks_shapes(monkeypatch) -> None:
    """What plan_decode_convolutions relies on: the decoder's convolutions see the same input and weight shapes in
    every chunk from the second on (the causal caches are padded to their full length), so three chunks plan every
    convolution of a decode of any length."""
    from torch import nn

    shapes: list[tuple] = []
    for kind in (nn.Conv2d, nn.Conv3d):
        real = kind._conv_forward

        def recorded(self, x, weight, bias, real=real):
            shapes.append((tuple(x.shape), tuple(weight.shape)))
            return real(self, x, weight, bias)

        monkeypatch.setattr(kind, "_conv_forward", recorded)
    model = WanVAE(TINY, with_encoder=False).eval()
    per_chunk = []
    with torch.no_grad():
        chunks = model.decode_frames(torch.zeros(1, TINY.z_dim, 6, 4, 6))
        for _ in chunks:
            per_chunk.append(sorted(shapes))
            shapes.clear()
    assert len(per_chunk) == 6 and per_chunk[0] != per_chunk[1]
    assert all(later == per_chunk[1] for later in per_chunk[2:])


def test_side_stream_decode_applies_only_to_cuda_inference_without_tiles() -> None:
    """RGBAlphaVAE.decode's side_stream (the two decoders on two CUDA streams) applies to a CUDA latent, without tiles
    and without autograd; elsewhere decode and decode_frames take the one-stream path, whose values they give."""
    from wanalpha.models.rgba import RGBAlphaVAE
    from wanalpha.models.vae import VAEConfig

    torch.manual_seed(0)
    model = RGBAlphaVAE(VAEConfig(dim=8), with_encoder=False).eval()
    z = torch.randn(1, 16, 3, 4, 4)
    cuda = torch.empty(1, 16, 3, 4, 4, device="meta")
    cuda_like = type("Latent", (), {"is_cuda": True})()
    assert not RGBAlphaVAE.side_stream_applies(True, cuda_like)  # autograd on
    with torch.no_grad():
        assert RGBAlphaVAE.side_stream_applies(True, cuda_like)
        assert not RGBAlphaVAE.side_stream_applies(False, cuda_like)
        assert not RGBAlphaVAE.side_stream_applies(True, cuda_like, tile_size=(2, 2))
        assert not RGBAlphaVAE.side_stream_applies(True, z) and not RGBAlphaVAE.side_stream_applies(True, cuda)
        whole = model.decode(z, raw=True)
        chunks = list(model.decode_frames(z))
        assert all(torch.equal(a, b) for a, b in zip(whole, model.decode(z, raw=True, side_stream=False), strict=True))
    assert torch.equal(torch.cat([c[0] for c in chunks], dim=2), whole[0].clamp(-1, 1))


def test_decoder_kernel_variants_for_the_warm_up() -> None:
    """What generate's warm-up compiles for the real decoders (runtime's lists, read on the meta device): the ×2
    upsampling convolutions' output channels (kernels.phase_rows), every biased convolution's (add_row_bias_) and
    every norm's (channels, silu) in the GPU layout."""
    from wanalpha.models.rgba import RGBAlphaVAE
    from wanalpha.runtime import convolution_bias_channels, fused_norm_variants, upsampling_channels

    with torch.device("meta"):
        decoders = RGBAlphaVAE(with_encoder=False)
    assert upsampling_channels(decoders) == {192, 96}
    assert convolution_bias_channels(decoders) >= {384, 192, 96, 3, 16}
    assert fused_norm_variants(decoders) >= {(384, True), (192, True), (96, True), (384, False)}  # False: attention's


def test_autotuned_convolutions_time_every_algorithm_inside_the_block_only() -> None:
    """vae.autotuned_convolutions on CUDA: cuDNN's autotuning on and every algorithm timed (benchmark_limit 0) inside
    the block, both settings as they were after it, an exception included; off CUDA, nothing changes."""
    from wanalpha.models.vae import autotuned_convolutions

    cudnn = torch.backends.cudnn
    before = cudnn.benchmark, cudnn.benchmark_limit
    with pytest.raises(KeyError), autotuned_convolutions(torch.device("cuda")):
        assert (cudnn.benchmark, cudnn.benchmark_limit) == (True, 0)
        raise KeyError
    assert (cudnn.benchmark, cudnn.benchmark_limit) == before
    with autotuned_convolutions(torch.device("cpu")):
        assert (cudnn.benchmark, cudnn.benchmark_limit) == before
