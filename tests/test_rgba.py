"""The RGB-alpha VAE: decoder.bin loading (key policy, merge), parity with the dual-decode golden, merge block."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import rel_err
from wanalpha.checkpoints import load_rgba_vae
from wanalpha.checkpoints.wan_alpha import decoder_lora_pairs
from wanalpha.data.render import BACKGROUND_COLOURS, checkerboard, composite, coverage, from_uint8, to_uint8
from wanalpha.errors import WanAlphaError
from wanalpha.models.lora import lora_delta
from wanalpha.models.rgba import FeatureMergeBlock, RGBAlphaVAE
from wanalpha.models.vae import CausalCache, VAEConfig

TOL = 1e-4


@pytest.fixture(scope="module")
def lora_file(reference: Path) -> Path:
    return reference / "golden/decoder_synthetic.bin"


@pytest.fixture(scope="module")
def rgba(wan_vae_state_dict, lora_file: Path) -> RGBAlphaVAE:
    return load_rgba_vae(base_vae=wan_vae_state_dict, decoder_lora=lora_file)


def test_dual_decode_matches_golden(rgba: RGBAlphaVAE, reference: Path) -> None:
    golden = load_file(reference / "golden/vae_dual_decode.safetensors")
    with torch.no_grad():
        rgb3, alpha3 = rgba.decode(golden["latent_in"], raw=True)
    assert rel_err(rgb3, golden["fgr_unclamped"]) < TOL
    assert rel_err(alpha3, golden["pha_unclamped"]) < TOL
    # The clamped outputs (what decode() without raw=True returns, clamping the raw ones as each chunk here is):
    # generate's chunked decode, frame 0, then 4 at a time, against the golden video.
    with torch.no_grad():
        chunks = list(rgba.decode_frames(golden["latent_in"]))
    assert [c[0].shape[2] for c in chunks] == [1, 4, 4]
    rgb, alpha = (torch.cat(side, 2) for side in zip(*chunks, strict=True))
    assert rel_err(rgb[0], golden["fgr"]) < TOL
    assert alpha.shape == (1, 1, 9, 64, 64)
    assert rel_err(alpha[0], golden["pha"].mean(0, keepdim=True)) < TOL  # mean of the 3 clamped channels
    for key, rows in golden.items():
        if "_merged_rows0to8." in key:
            side, weight = key.split("_merged_rows0to8.")
            decoder = rgba.rgb_decoder if side == "fgr" else rgba.alpha_decoder
            # Bit-exact but for the head's 3-output-channel B·A, whose float32 matmul rounds by one ulp (5e-8) on
            # torch 2.13's CPU kernels where the golden's build did not: within one float32 rounding.
            merged = decoder.state_dict()[weight][:8]
            assert (merged - rows).abs().max() <= 1e-7 * rows.abs().max(), (key, (merged - rows).abs().max())


def _two_decoders(shared_base: bool) -> RGBAlphaVAE:
    """A tiny RGBAlphaVAE whose decoders differ in every convolution weight; with shared_base their norms and biases
    are equal (as Wan-Alpha's: one base, a LoRA merged into each decoder's convolution weights), else every weight
    differs."""
    torch.manual_seed(0)
    model = RGBAlphaVAE(VAEConfig(dim=8), with_encoder=False).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    if shared_base:
        for name, p in model.alpha_decoder.named_parameters():
            if not name.endswith("weight") or "gamma" in name:
                p.data.copy_(model.rgb_decoder.get_parameter(name))
    return model


@pytest.mark.parametrize(("shared_base", "layout"), [(True, "default"), (True, "channels_last"), (False, "default")])
def test_dual_decode_equals_separate(shared_base: bool, layout: str) -> None:
    """Both decoders as one batch of two (the default) equal the two decodes one after the other, to float32
    rounding: several chunks (the causal caches and the temporal upsampling carry state), two samples (the halves of
    a batch of four), whole and streamed, with shared norms (the release's case) or per-half ones."""
    from wanalpha.models.vae import DecoderPair, PairedConv, PerHalf
    from wanalpha.runtime import VAERuntime, apply_vae_runtime

    model = apply_vae_runtime(_two_decoders(shared_base), VAERuntime(layout=layout))
    pair = DecoderPair(model.rgb_decoder, model.alpha_decoder)
    kinds = [type(m) for m in pair.decoder.modules()]
    assert kinds.count(PairedConv) == 38 and kinds.count(PerHalf) == (0 if shared_base else 30)
    z = torch.randn(2, 16, 3, 4, 4)
    with torch.no_grad():
        separate = model.decode(z, raw=True)
        dual = model.decode(z, raw=True, dual=True)
        streamed = list(model.decode_frames(z, dual=True))
        separate_streamed = list(model.decode_frames(z))
    assert dual[0].shape == (2, 3, 9, 32, 32)
    for a, b in zip(dual, separate, strict=True):
        assert rel_err(a, b) < 1e-6
    assert [c[0].shape[2] for c in streamed] == [1, 4, 4]
    for chunk, other in zip(streamed, separate_streamed, strict=True):
        assert all(rel_err(a, b) < 1e-6 for a, b in zip(chunk, other, strict=True))
    assert rel_err(dual[0], dual[1]) > 0.1  # the two decoders really differ
    # two latent frames a chunk (generate's --vae_decode_chunk 2): the pair follows the decoders' chunking
    model.rgb_decoder.decode_chunk = model.alpha_decoder.decode_chunk = 2
    with torch.no_grad():
        paired = list(model.decode_frames(z, dual=True))
    assert [c[0].shape[2] for c in paired] == [1, 8]
    for i in range(2):
        whole = torch.cat([c[i] for c in separate_streamed], dim=2)
        assert rel_err(torch.cat([c[i] for c in paired], dim=2), whole) < 1e-6


def test_dual_decode_applies_without_tiles_and_autograd() -> None:
    """The batch of two is inference's: tiled decoding and decoding under autograd (training) keep the decoders one
    after the other; decoders of different shapes cannot pair."""
    from wanalpha.models.vae import DecoderPair, WanVAE

    model = _two_decoders(shared_base=True)
    assert not model.dual_applies(True)  # autograd is on here
    with torch.no_grad():
        assert model.dual_applies(True) and not model.dual_applies(False)
        assert not model.dual_applies(True, tile_size=(4, 4))
    with pytest.raises(ValueError, match="VAEConfig"):
        DecoderPair(model.rgb_decoder, WanVAE(VAEConfig(dim=16), with_encoder=False))


def test_decoys_and_non_lora_keys_are_ignored(lora_file: Path) -> None:
    lora = torch.load(lora_file, weights_only=True)
    pairs = decoder_lora_pairs(lora)
    assert len(pairs["rgb"]) == len(pairs["alpha"]) == 38  # every Conv2d/Conv3d of the decoder
    assert "decoder.upsamples.3.time_conv.weight" in pairs["rgb"]
    assert all(t.startswith("decoder.") and ".conv3D" not in t for t in pairs["alpha"])
    for decoy in ("vae_fgr.decoder.head.2.conv3D.base_layer.bias", "middle.block.conv1.bias", "vae_fgr.conv2.weight"):
        assert decoy in lora  # present in the file, and the parity test proves it had no effect


def test_key_policy_errors(lora_file: Path, wan_vae_state_dict) -> None:
    lora = torch.load(lora_file, weights_only=True)
    a_key = "vae_pha.decoder.middle.1.proj.lora_A.default.weight"
    broken = {k: v for k, v in lora.items() if k != a_key}
    with pytest.raises(WanAlphaError, match=r"incomplete LoRA pairs: alpha:decoder.middle.1.proj.weight"):
        decoder_lora_pairs(broken)
    renamed = dict(lora)
    for part in ("A", "B"):
        key = f"vae_fgr.decoder.head.2.conv3D.lora_{part}.default.weight"
        renamed[key.replace("head.2", "head.7")] = renamed.pop(key)
    with pytest.raises(WanAlphaError, match=r"match no decoder weight: decoder.head.7.weight"):
        load_rgba_vae(wan_vae_state_dict, renamed)
    only_rgb = {k: v for k, v in lora.items() if not k.startswith("vae_pha.")}
    with pytest.raises(WanAlphaError, match="no usable LoRA pair for the alpha decoder"):
        decoder_lora_pairs(only_rgb)
    with pytest.raises(WanAlphaError, match="variant 'v3' does not exist"):
        load_rgba_vae(wan_vae_state_dict, lora, variant="v3")


def test_lora_delta_is_per_tap_b_at_a_over_rank() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 6, 3, 1, 2, generator=g), torch.randn(5, 4, 1, 1, 1, generator=g)
    expected = torch.zeros(5, 6, 3, 1, 2)
    for i in range(3):
        for k in range(2):
            expected[:, :, i, 0, k] = b[:, :, 0, 0, 0] @ a[:, :, i, 0, k] / 4
    assert torch.allclose(lora_delta(a, b), expected, atol=1e-6)
    a2, b2 = torch.randn(4, 6, 1, 1, generator=g), torch.randn(7, 4, 1, 1, generator=g)  # 1×1 Conv2d
    assert torch.allclose(lora_delta(a2, b2)[:, :, 0, 0], b2[:, :, 0, 0] @ a2[:, :, 0, 0] / 4, atol=1e-6)
    # bf16 files: the product is computed in bf16 (as the official loader does), then added to the fp32 base.
    assert lora_delta(a.bfloat16(), b.bfloat16()).dtype == torch.bfloat16


def test_merge_block_spec() -> None:
    block = FeatureMergeBlock()
    assert sum(p.numel() for p in block.parameters()) == 6_668_560  # ≈ 6.7M (seed spec)
    torch.manual_seed(0)
    rgb, alpha = torch.randn(2, 16, 5, 6, 4), torch.randn(2, 16, 5, 6, 4)
    with torch.no_grad():
        whole = block(rgb, alpha)
        cache = CausalCache()
        chunked = torch.cat([block(rgb[:, :, i : i + 1], alpha[:, :, i : i + 1], cache) for i in range(5)], dim=2)
        changed = alpha.clone()
        changed[:, :, 3:] += 1
        later = block(rgb, changed)
    assert whole.shape == (2, 16, 5, 6, 4)
    assert torch.allclose(chunked, whole, atol=1e-5)  # causal: runs chunked like the VAE
    assert torch.equal(later[:, :, :3], whole[:, :, :3])


def test_rgba_encode_decode_and_merge_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = RGBAlphaVAE(VAEConfig(dim=8)).eval()
    assert not any(
        p.requires_grad for m in (model.encoder, model.rgb_decoder, model.alpha_decoder) for p in m.parameters()
    )
    assert all(p.requires_grad for p in model.merge.parameters())
    rgb = torch.rand(1, 3, 9, 32, 16) * 2 - 1
    alpha = torch.rand(1, 1, 9, 32, 16) * 2 - 1
    with torch.no_grad():
        z = model.encode(rgb, alpha)
        z_rgb, z_alpha = model.encode_latents(rgb, alpha)
        out_rgb, out_alpha = model.decode(z)
        raw_rgb, raw_alpha = model.decode(z, raw=True)
    assert z.shape == (1, 16, 3, 4, 2)
    assert torch.equal(z_alpha, model.encoder.encode(alpha.expand(-1, 3, -1, -1, -1)))
    assert torch.allclose(model.merge(z_rgb, z_alpha), z)
    assert out_rgb.shape == (1, 3, 9, 32, 16) and out_alpha.shape == (1, 1, 9, 32, 16)
    assert torch.equal(out_alpha, raw_alpha.clamp(-1, 1).mean(1, keepdim=True))
    assert out_rgb.abs().max() <= 1 and torch.equal(out_rgb, raw_rgb.clamp(-1, 1))
    # Our merge checkpoint (safetensors) loads strictly through load_rgba_vae.
    path = tmp_path / "feature_merge_epoch_0.safetensors"
    save_file(model.merge.state_dict(), path)
    base = {**model.encoder.state_dict(), **model.rgb_decoder.state_dict()}
    lora = {}
    for side in ("fgr", "pha"):
        lora[f"vae_{side}.decoder.head.2.conv3D.lora_A.default.weight"] = torch.zeros(2, 8, 3, 3, 3)
        lora[f"vae_{side}.decoder.head.2.conv3D.lora_B.default.weight"] = torch.zeros(3, 2, 1, 1, 1)
    loaded = load_rgba_vae(base, lora, merge=path, config=VAEConfig(dim=8))
    assert all(torch.equal(loaded.merge.state_dict()[k], v) for k, v in model.merge.state_dict().items())
    save_file({"conv_in.weight": torch.zeros(1)}, tmp_path / "bad.safetensors")
    with pytest.raises(WanAlphaError, match="feature merge checkpoint .* does not match"):
        load_rgba_vae(base, lora, merge=tmp_path / "bad.safetensors", config=VAEConfig(dim=8))


def test_render_colours_and_compositing() -> None:
    assert BACKGROUND_COLOURS.shape == (8, 3)
    assert BACKGROUND_COLOURS[0].tolist() == [-1, -1, -1] and BACKGROUND_COLOURS[1].tolist() == [-1, -1, 1]
    assert BACKGROUND_COLOURS[4].tolist() == [1, -1, -1] and BACKGROUND_COLOURS[7].tolist() == [1, 1, 1]
    rgb = torch.full((2, 3, 1, 2, 2), 0.5)
    alpha = torch.tensor([-1.0, -0.99, 0.0, 1.0]).view(1, 1, 1, 2, 2).expand(2, 1, 1, 2, 2)
    soft = composite(rgb, alpha, 4)  # over red
    assert torch.allclose(soft[0, :, 0, 1, 0], 0.5 * 0.5 + torch.tensor([1.0, -1, -1]) * 0.5)
    assert torch.allclose(soft[0, :, 0, 0, 0], torch.tensor([1.0, -1, -1]))  # fully transparent: background
    hard = composite(rgb, alpha, torch.tensor([1, 6]), hard=True)  # a colour per sample
    assert torch.equal(hard[:, :, 0, 0, 1], torch.full((2, 3), 0.5))  # alpha just above -1 counts as opaque
    assert torch.equal(hard[1, :, 0, 0, 0], torch.tensor([1.0, 1.0, -1.0]))
    assert torch.equal(coverage(alpha, hard=True).flatten()[:4], torch.tensor([0.0, 1, 1, 1]))
    board = checkerboard(64, 70)
    assert board.shape == (3, 64, 70)
    assert (
        abs(board[0, 0, 0] - (140 / 127.5 - 1)) < 1e-6
        and abs(board[0, 0, 30] - (113 / 127.5 - 1)) < 1e-6
        and board[0, 30, 30] == board[0, 0, 0]
    )
    over_board = composite(rgb[:1, :, :, :2, :2], alpha[:1], checkerboard(2, 2))
    assert torch.allclose(over_board[0, :, 0, 0, 0], board[:, 0, 0])
    # uint8 conversion truncates, like the official renderer.
    assert to_uint8(torch.tensor([-1.0, 0.0, 0.999, 1.0, 2.0])).tolist() == [0, 127, 254, 255, 255]
    assert torch.allclose(from_uint8(torch.tensor([0, 255], dtype=torch.uint8)), torch.tensor([-1.0, 1.0]))


def test_loaders_return_frozen_eval_models(tiny_vae_files, tiny_stage2) -> None:
    """Issue #26: the library's loaders give frozen, eval-mode models (the README snippet's tensors carry no graph);
    training asks for what it trains."""
    from wanalpha.checkpoints.vae import load_rgba_vae
    from wanalpha.checkpoints.wan import load_dit, load_t5

    rgba = load_rgba_vae(*tiny_vae_files)
    assert not rgba.training and not any(p.requires_grad for p in rgba.parameters())
    z = torch.randn(1, 16, 2, 4, 4)
    rgb, alpha = rgba.decode(z)
    assert not rgb.requires_grad and not alpha.requires_grad
    trainable = load_rgba_vae(*tiny_vae_files, trainable_merge=True)
    assert all(p.requires_grad for p in trainable.merge.parameters())
    assert not any(p.requires_grad for n, p in trainable.named_parameters() if not n.startswith("merge."))
    for model in (load_dit(tiny_stage2["dit"], dtype=torch.float32), load_t5(tiny_stage2["t5"])):
        assert not model.training and not any(p.requires_grad for p in model.parameters())
