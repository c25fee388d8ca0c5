"""The Wan-Alpha v2.0 RGBA VAE (EncoderFeatureMerge, release-file loading) against golden/v2_mapping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import rel_err
from wanalpha.checkpoints.vae import load_rgba_vae
from wanalpha.errors import WanAlphaError
from wanalpha.models.rgba import EncoderFeatureMerge
from wanalpha.models.vae import CausalCache

TOL = 1e-4  # reference NOTES §10.6


@pytest.fixture(scope="module")
def release(reference: Path, ref_weights) -> dict:
    """A v2 release file as the fixture's inference cross-check built it: decoder LoRAs + the 33 `middle.*` tensors."""
    keys = json.loads((reference / "keys_wan_alpha_v2_vae.json").read_text())["keys"]
    middle = ref_weights.make_state_dict({k: v for k, v in keys.items() if k.startswith("middle.")}, 1238)
    lora = torch.load(reference / "golden/decoder_synthetic.bin", weights_only=True)
    return {k: v for k, v in lora.items() if k != "middle.block.conv1.bias"} | middle


@pytest.fixture(scope="module")
def golden(reference: Path) -> dict:
    return load_file(reference / "golden/v2_mapping.safetensors")


def test_merge_layout_and_parity(reference: Path, release: dict, golden: dict) -> None:
    keys = json.loads((reference / "keys_wan_alpha_v2_vae.json").read_text())["keys"]
    merge = EncoderFeatureMerge()
    expected = {k.removeprefix("middle."): v for k, v in keys.items() if k.startswith("middle.")}
    assert {k: list(v.shape) for k, v in merge.state_dict().items()} == expected
    merge.load_state_dict({k.removeprefix("middle."): v for k, v in release.items() if k.startswith("middle.")})
    seen = {}
    hooks = [
        merge.block.conv1.register_forward_hook(lambda m, i, o: seen.__setitem__("conv1", o)),
        merge.block.middle[4].register_forward_hook(lambda m, i, o: seen.__setitem__("middle", o)),
    ]
    with torch.no_grad():
        out = merge(golden["features_in"])
        for hook in hooks:
            hook.remove()
        cache = CausalCache()  # the official one-latent-frame-at-a-time loop
        streamed = torch.cat([merge(golden["features_in"][:, :, t : t + 1], cache) for t in range(3)], dim=2)
    assert rel_err(out, golden["mapping_out"]) < TOL
    assert rel_err(seen["conv1"], golden["mapping_conv1_out"]) < TOL
    assert rel_err(seen["middle"], golden["mapping_middle_out"]) < TOL
    assert rel_err(streamed, golden["mapping_out"]) < 1e-5


def test_v2_encode_decode_match_official(wan_vae_state_dict, release: dict, golden: dict) -> None:
    rgba = load_rgba_vae(wan_vae_state_dict, release, merge=release, variant="v2")
    with torch.no_grad():
        assert rel_err(rgba.encoder.encode_features(golden["render_hard"]), golden["fgr_features"]) < TOL
        assert rel_err(rgba.encoder.encode_features(golden["video_pha"]), golden["pha_features"]) < TOL
        raw = rgba.encode_raw_v2(golden["render_hard"], golden["video_pha"])
        assert rel_err(raw, golden["merged_latent"]) < TOL
        z = rgba.encode(golden["render_hard"], golden["video_pha"])  # the DiT's (normalised) latent
        assert rel_err(z, golden["merged_latent_normalized"]) < TOL
        assert rel_err(rgba.rgb_decoder.decode_raw(raw), golden["recon_fgr"]) < TOL  # training-time decode
        assert rel_err(rgba.alpha_decoder.decode_raw(raw), golden["recon_pha"]) < TOL
        rgb3, alpha3 = rgba.decode(golden["merged_latent_normalized"], raw=True)  # v2 inference decode
    assert rel_err(rgb3.clamp(-1, 1), golden["inference_fgr"]) < TOL
    assert rel_err(alpha3.clamp(-1, 1), golden["inference_pha"]) < TOL


def test_v2_file_policy(wan_vae_state_dict, release: dict) -> None:
    broken = {k: v for k, v in release.items() if k != "middle.block.head.2.bias"}
    with pytest.raises(WanAlphaError, match="missing: block.head.2.bias"):
        load_rgba_vae(wan_vae_state_dict, release, merge=broken, variant="v2")
    decode_only = load_rgba_vae(wan_vae_state_dict, release, variant="v2", with_encoder=False)
    assert decode_only.encoder is None and decode_only.variant == "v2"
