"""UMT5 encoder + tokenizer, the official-file loaders and model resolution, and the training flow objective."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import rel_err
from wanalpha import flow
from wanalpha.checkpoints.wan import load_dit, load_t5, parse_model_paths, resolve_model_files
from wanalpha.errors import WanAlphaError
from wanalpha.models.dit import DIT_VARIANTS, WanDiT
from wanalpha.models.t5 import T5Config, T5Tokenizer, TextEncoder, UMT5Encoder, clean_text

TINY_T5 = T5Config(
    vocab_size=512, dim=64, dim_attn=64, dim_ffn=128, num_heads=4, num_layers=2, num_buckets=32, shared_pos=False
)


@pytest.fixture(scope="module")
def t5_state(reference: Path, ref_weights) -> dict:
    shapes = json.loads((reference / "golden/t5.json").read_text())["weights"]["key_shapes"]
    return ref_weights.make_state_dict(shapes, 1234)


def test_t5_layout_and_golden(reference: Path, t5_state: dict, tmp_path: Path) -> None:
    expected = json.loads((reference / "keys_umt5_xxl_encoder.json").read_text())["keys"]
    with torch.device("meta"):
        assert {k: list(v.shape) for k, v in UMT5Encoder().state_dict().items()} == expected
    # The loader: a .pth (weights_only), config read from the shapes, fp32 here to compare with the golden.
    torch.save(t5_state, tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
    encoder = load_t5(tmp_path / "models_t5_umt5-xxl-enc-bf16.pth", dtype=torch.float32)
    assert encoder.config == TINY_T5
    golden = load_file(reference / "golden/t5.safetensors")
    with torch.no_grad():
        out = encoder(golden["ids"], golden["mask"])
    assert rel_err(out, golden["out_full"]) < 1e-4
    assert rel_err(out[0, : int(golden["mask"].sum())], golden["out_trimmed"]) < 1e-4
    bias = encoder.blocks[0].pos_embedding
    rel = torch.arange(12)[None, :] - torch.arange(12)[:, None]
    assert torch.equal(bias.buckets(rel).int(), golden["rel_buckets"])
    assert torch.equal(bias.buckets(torch.arange(-511, 512)).int(), golden["bucket_of_rel_pos_m511_to_511"])
    assert rel_err(bias(12, 12), golden["pos_bias_block0"]) < 1e-6
    # bf16 is kept as bf16.
    assert load_t5(tmp_path / "models_t5_umt5-xxl-enc-bf16.pth").token_embedding.weight.dtype == torch.bfloat16


def _tokenizer_file(path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = ["<pad>", "</s>", "<unk>", "a", "red", "fox", "&", "running", "transparent", "background"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    return path


def test_tokenizer_cleans_appends_eos_and_pads(tmp_path: Path, t5_state: dict) -> None:
    tokenizer = T5Tokenizer(_tokenizer_file(tmp_path / "google/umt5-xxl"), text_len=8)
    ids, mask = tokenizer(["  a   red\n fox &amp;amp; running ", "a fox " * 10])
    assert ids[0].tolist() == [3, 4, 5, 6, 7, 1, 0, 0]  # '&amp;amp;' → '&', whitespace collapsed, EOS, padding
    assert mask[0].tolist() == [1, 1, 1, 1, 1, 1, 0, 0]
    assert ids[1, -1] == 1 and mask[1].sum() == 8  # truncated, EOS kept
    assert clean_text("  x \t y&lt;z ") == "x y<z"
    encoder = UMT5Encoder(TINY_T5)
    encoder.load_state_dict(t5_state)
    contexts = TextEncoder(encoder, tokenizer)(["a red fox", "transparent background a fox running"])
    assert [c.shape for c in contexts] == [(4, 64), (6, 64)]  # trimmed to the true length incl. EOS
    with pytest.raises(WanAlphaError, match="tokenizer file"):
        T5Tokenizer(tmp_path / "nowhere")


def test_sharded_dit_loads_in_bf16(tmp_path: Path, reference: Path, ref_weights) -> None:
    shapes = json.loads((reference / "golden/dit.json").read_text())["weights"]["key_shapes"]
    sd = ref_weights.make_state_dict(shapes, 1234)
    keys = sorted(sd)
    folder = tmp_path / "Wan2.1-T2V-tiny"
    folder.mkdir()
    half = len(keys) // 2
    weight_map = {}
    for i, part in enumerate((keys[:half], keys[half:])):
        name = f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, str(folder / name))
        weight_map |= {k: name for k in part}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for source in (folder, folder / "diffusion_pytorch_model.safetensors.index.json"):
        dit = load_dit(source, config=DIT_VARIANTS["tiny"])
        assert dit.patch_embedding.weight.dtype == torch.bfloat16
        assert torch.equal(dit.state_dict()["blocks.1.ffn.2.weight"], sd["blocks.1.ffn.2.weight"].bfloat16())
    # Without a config the variant is read from the shapes.
    save_file({k: v for k, v in sd.items() if k != "head.head.bias"}, str(tmp_path / "broken.safetensors"))
    with pytest.raises(WanAlphaError, match="missing: head.head.bias"):
        load_dit(tmp_path / "broken.safetensors", config=DIT_VARIANTS["tiny"])
    with pytest.raises(WanAlphaError, match="DiT weights not found"):
        load_dit(tmp_path / "empty_dir_does_not_exist")


def test_dit_variant_is_read_from_shapes() -> None:
    from wanalpha.checkpoints.wan import infer_dit_config

    for variant in ("1.3b", "14b"):
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in WanDiT(DIT_VARIANTS[variant]).state_dict().items()}
        assert infer_dit_config(shapes) == DIT_VARIANTS[variant]


def test_model_resolution_local_and_offline(tmp_path: Path, monkeypatch) -> None:
    spec = (
        "Wan-AI/Wan2.1-T2V-14B:diffusion_pytorch_model*.safetensors,Wan-AI/Wan2.1-T2V-14B:Wan2.1_VAE.pth,"
        "Wan-AI/Wan2.1-T2V-14B:models_t5_umt5-xxl-enc-bf16.pth"
    )
    assert parse_model_paths(spec)[1] == ("Wan-AI/Wan2.1-T2V-14B", "Wan2.1_VAE.pth")
    local = tmp_path / "models/Wan-AI/Wan2.1-T2V-14B"
    local.mkdir(parents=True)
    for name in (
        "diffusion_pytorch_model-00001-of-00002.safetensors",
        "diffusion_pytorch_model-00002-of-00002.safetensors",
        "Wan2.1_VAE.pth",
    ):
        (local / name).write_bytes(b"x")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WanAlphaError, match=r"models_t5_umt5-xxl-enc-bf16.pth of Wan-AI/Wan2.1-T2V-14B not found"):
        resolve_model_files(spec, tmp_path / "models")
    (local / "models_t5_umt5-xxl-enc-bf16.pth").write_bytes(b"x")
    with pytest.raises(WanAlphaError, match=r"google/umt5-xxl/\* of Wan-AI/Wan2.1-T2V-14B not found"):
        resolve_model_files(spec, tmp_path / "models")  # a hub text encoder brings its tokenizer folder
    (local / "google/umt5-xxl").mkdir(parents=True)
    (local / "google/umt5-xxl/tokenizer.json").write_bytes(b"{}")
    files = resolve_model_files(spec, tmp_path / "models")
    assert [p.name for p in files["diffusion_pytorch_model*.safetensors"]] == [
        "diffusion_pytorch_model-00001-of-00002.safetensors",
        "diffusion_pytorch_model-00002-of-00002.safetensors",
    ]
    assert files["Wan2.1_VAE.pth"] == [local / "Wan2.1_VAE.pth"]
    with pytest.raises(WanAlphaError, match="not 'owner/model:file-pattern'"):
        parse_model_paths("Wan2.1_VAE.pth")


def test_training_schedule_matches_official(reference: Path) -> None:
    golden = load_file(reference / "golden/samplers.safetensors")
    schedule = flow.TrainingSchedule.create(shift=5.0)
    assert torch.equal(schedule.timesteps, golden["train_timesteps"])
    assert torch.equal(schedule.sigmas, golden["train_sigmas"])
    # The weights go through float32 exp, whose vectorised CPU kernels differ by an ulp between PyTorch builds (torch
    # 2.13's CPU build: 25 of 1000 entries off the golden's, by at most 4.8e-7 = 2 ulp at the peak of 2.08, where the
    # rescaling to a sum of 1000 doubles an ulp of exp's output).
    torch.testing.assert_close(schedule.weights, golden["train_weights"], rtol=0, atol=5e-7)
    t, sigma, weight = schedule.sample(64, torch.Generator().manual_seed(0))
    assert t.dtype == torch.bfloat16 and sigma.dtype == weight.dtype == torch.float32
    # σ and the weight belong to the schedule entry nearest the bf16-rounded t.
    nearest = (golden["train_timesteps"][None] - t.float()[:, None]).abs().argmin(1)
    assert torch.equal(sigma, golden["train_sigmas"][nearest]) and torch.equal(weight, schedule.weights[nearest])


def test_flow_objective() -> None:
    x0, noise = torch.randn(2, 16, 3, 4, 4), torch.randn(2, 16, 3, 4, 4)
    sigma = torch.tensor([0.0, 1.0])
    xt = flow.add_noise(x0, noise, sigma)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[1], noise[1])
    target = flow.velocity_target(x0, noise)
    assert torch.equal(target, noise - x0)
    weight = torch.tensor([1.0, 2.0])
    pred = target * torch.tensor([0.0, 0.5]).view(2, 1, 1, 1, 1)  # errors: all of target[0], half of target[1]
    expected = ((target[0] ** 2).mean() * 1.0 + ((0.5 * target[1]) ** 2).mean() * 2.0) / 2
    assert torch.isclose(flow.flow_loss(pred, target, weight), expected)


def test_guided_velocity_is_one_batched_call() -> None:
    """Classifier-free guidance (official Wan): the conditional and the negative context in one batched call,
    combined as uncond + scale·(cond − uncond); without a negative context, the conditional call alone."""
    calls = []

    def model(x: torch.Tensor, t: torch.Tensor, contexts: list[torch.Tensor]) -> torch.Tensor:
        calls.append((x.shape[0], t.tolist(), [float(c) for c in contexts]))
        return x * torch.stack(contexts).view(-1, 1) + t.view(-1, 1)

    x, t, context, negative = torch.tensor([[1.0, 2.0]]), torch.tensor([3.0]), torch.tensor(2.0), torch.tensor(0.5)
    v = flow.guided_velocity(model, context, negative, 5.0)(x, t)
    assert calls == [(2, [3.0, 3.0], [2.0, 0.5])]
    cond, uncond = x * 2.0 + 3.0, x * 0.5 + 3.0
    assert torch.equal(v, uncond + 5.0 * (cond - uncond))
    calls.clear()
    assert torch.equal(flow.guided_velocity(model, context, None, 5.0)(x, t), cond)
    assert calls == [(1, [3.0], [2.0])]


@pytest.mark.parametrize(
    ("name", "steps", "sampler"), [("unipc", 50, "unipc"), ("unipc4", 4, "unipc"), ("euler", 50, "euler")]
)
def test_samplers_match_official(reference: Path, name: str, steps: int, sampler: str) -> None:
    golden = load_file(reference / "golden/samplers.safetensors")
    timesteps, sigmas = flow.schedule(steps, 5.0, sampler)
    assert timesteps.dtype == golden[f"{name}_timesteps"].dtype and torch.equal(timesteps, golden[f"{name}_timesteps"])
    assert torch.equal(sigmas, golden[f"{name}_sigmas"])
    seen = []

    def toy(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # the fixture's model: v = 0.3·x − 0.001·t
        seen.append(t.clone())
        return 0.3 * x - 0.001 * t.float().view(-1, 1, 1, 1, 1)

    final = flow.sample(toy, golden["noise"], steps, 5.0, sampler)
    assert rel_err(final, golden[f"{name}_final"]) < 1e-5
    assert torch.equal(torch.cat(seen), golden[f"{name}_timesteps"])  # the model sees the official t values
    # Any batch size: two samples integrate independently.
    both = flow.sample(toy, torch.cat([golden["noise"], -golden["noise"]]), steps, 5.0, sampler)
    assert torch.allclose(both[:1], final, atol=1e-6)


def test_text_encoder_preparation_is_nothing_off_cuda(monkeypatch) -> None:
    """runtime.prepare_text_encoder builds and runs nothing off CUDA (generate calls it on every device)."""
    from wanalpha import runtime
    from wanalpha.models import t5

    monkeypatch.setattr(t5, "UMT5Encoder", lambda *a, **k: pytest.fail("built an encoder on the CPU"))
    runtime.prepare_text_encoder(TINY_T5, 2, 16, torch.device("cpu"))
