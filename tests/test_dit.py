"""The Wan DiT and its adapters: official layouts, golden parity (dit, dit_dora, dit_dora_lightx2v), peft == merge."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import rel_err
from wanalpha import adapters, fused_adapter
from wanalpha.errors import WanAlphaError
from wanalpha.models.dit import DIT_VARIANTS, WanDiT
from wanalpha.runtime import compile_blocks

TOL = 1e-4  # reference NOTES §9


@pytest.fixture(scope="module")
def golden(reference: Path) -> dict:
    return load_file(reference / "golden/dit.safetensors")


@pytest.fixture
def tiny_dit(reference: Path, ref_weights) -> WanDiT:
    """The golden's reduced DiT with the reference's synthetic weights (built on meta, assigned)."""
    shapes = json.loads((reference / "golden/dit.json").read_text())["weights"]["key_shapes"]
    with torch.device("meta"):
        dit = WanDiT(DIT_VARIANTS["tiny"])
    dit.load_state_dict(ref_weights.make_state_dict(shapes, 1234), strict=True, assign=True)
    return dit.eval()


def _run(dit: WanDiT, golden: dict) -> torch.Tensor:
    with torch.no_grad():
        return dit(golden["x"][None], golden["t"], golden["context"][None])[0]


@pytest.mark.parametrize("variant", ["1.3b", "14b"])
def test_layout_equals_official(reference: Path, variant: str) -> None:
    expected = json.loads((reference / f"keys_dit_{variant}.json").read_text())
    expected = expected.get("keys", expected)
    with torch.device("meta"):
        dit = WanDiT(DIT_VARIANTS[variant])
    assert {k: list(v.shape) for k, v in dit.state_dict().items()} == expected


def test_golden_forward_and_intermediates(tiny_dit: WanDiT, golden: dict) -> None:
    seen = {}
    for name in ("time_embedding", "time_projection", "text_embedding", "patch_embedding"):
        getattr(tiny_dit, name).register_forward_hook(lambda m, i, o, n=name: seen.__setitem__(n, o))
    for i, block in enumerate(tiny_dit.blocks):
        block.register_forward_hook(lambda m, inp, o, n=f"block_{i}": seen.__setitem__(n, o))
    out = _run(tiny_dit, golden)
    assert out.shape == golden["out"].shape and rel_err(out, golden["out"]) < TOL
    for name, value in seen.items():
        assert rel_err(value.reshape(golden[f"{name}_out"].shape), golden[f"{name}_out"]) < TOL, name


def test_float32_rope_within_reference_tolerance(tiny_dit: WanDiT, golden: dict) -> None:
    exact = _run(tiny_dit, golden)
    tiny_dit.rope_precision = "float32"  # the GPU speed lever: q, k rotated in float32 instead of float64
    fast = _run(tiny_dit, golden)
    tiny_dit.rope_precision = "float64"
    assert rel_err(fast, golden["out"]) < TOL and 0 < rel_err(fast, exact) < 1e-5
    assert rel_err(_run(tiny_dit, golden), exact) == 0  # the float64 table comes back


def test_batch_samples_may_differ_in_t_and_context(tiny_dit: WanDiT, golden: dict) -> None:
    x = torch.stack([golden["x"].flip(2), golden["x"]])
    t = torch.tensor([125.0, 500.0])
    context = [golden["context"][:3] * 2, golden["context"]]  # different lengths too (list form)
    with torch.no_grad():
        both = tiny_dit(x, t, context)
        first = tiny_dit(x[:1], t[:1], context[:1])
    assert rel_err(both[1], golden["out"]) < TOL
    assert rel_err(both[0], first[0]) < 1e-5


def test_gradient_checkpointing_same_gradients(tiny_dit: WanDiT, golden: dict) -> None:
    x = golden["x"][None].clone().requires_grad_(True)
    grads = []
    for on, offload, keep_attention in (
        (False, False, False),
        (True, False, False),
        (True, True, False),
        (True, False, True),
    ):
        tiny_dit.gradient_checkpointing, tiny_dit.checkpoint_offload = on, offload
        tiny_dit.checkpoint_attention = keep_attention  # selective: self-attention outputs saved, not recomputed
        tiny_dit(x, golden["t"], golden["context"][None]).square().mean().backward()
        grads.append(x.grad.clone())
        x.grad = None
    for other in grads[1:]:
        assert torch.allclose(grads[0], other, rtol=1e-5, atol=1e-8)


def test_dora_then_lightx2v_match_golden(tiny_dit: WanDiT, golden: dict, reference: Path) -> None:
    dora_golden = load_file(reference / "golden/dit_dora.safetensors")
    assert adapters.merge_dora(tiny_dit, str(reference / "golden/dora_synthetic.safetensors")) == 20
    assert rel_err(_run(tiny_dit, golden), dora_golden["out"]) < TOL
    weights = tiny_dit.state_dict()
    for key, rows in dora_golden.items():
        if key.startswith("merged_rows0to8."):
            assert rel_err(weights[key.removeprefix("merged_rows0to8.")][:8], rows) < 1e-6, key
    adapters.merge_lora(tiny_dit, str(reference / "golden/lightx2v_synthetic.safetensors"))  # after DoRA, as upstream
    assert rel_err(_run(tiny_dit, golden), load_file(reference / "golden/dit_dora_lightx2v.safetensors")["out"]) < TOL


def test_dora_key_spellings_and_errors(tiny_dit: WanDiT, golden: dict, reference: Path) -> None:
    sd = load_file(reference / "golden/dora_synthetic.safetensors")
    # With a `diffusion_model.` prefix and without the adapter name: the same result.
    renamed = {"diffusion_model." + k.replace(".default.weight", ".weight"): v for k, v in sd.items()}
    adapters.merge_dora(tiny_dit, renamed)
    assert rel_err(_run(tiny_dit, golden), load_file(reference / "golden/dit_dora.safetensors")["out"]) < TOL
    broken = {k: v for k, v in sd.items() if k != "blocks.1.ffn.2.lora_B.default.weight"}
    with pytest.raises(WanAlphaError, match=r"incomplete adapters .*blocks.1.ffn.2"):
        adapters.merge_dora(tiny_dit, broken)
    alien = {k.replace("blocks.1.", "blocks.7."): v for k, v in sd.items()}
    with pytest.raises(WanAlphaError, match=r"modules this DiT does not have: blocks.7"):
        adapters.merge_dora(tiny_dit, alien)
    with pytest.raises(WanAlphaError, match="no DoRA tensors"):
        adapters.merge_dora(tiny_dit, {"something.else": torch.zeros(1)})
    with pytest.raises(WanAlphaError, match="nothing in it fits"):
        adapters.merge_lora(tiny_dit, {"blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 3)})


def test_lora_match_is_reported_and_partial_files_refused(tiny_dit: WanDiT, reference: Path) -> None:
    """The official adapter (lightx2v_lora_adapter.py, _apply_lora_weights) adds whatever fits and skips the rest
    silently; we report how much fit and refuse, before changing anything, a file meant for another DiT."""
    sd = {
        k.removeprefix("diffusion_model."): v
        for k, v in load_file(reference / "golden/lightx2v_synthetic.safetensors").items()
    }
    before = {k: v.clone() for k, v in tiny_dit.state_dict().items()}
    match = adapters.merge_lora(tiny_dit, dict(sd))
    assert match.applied == match.entries > 0 and not match.skipped
    tiny_dit.load_state_dict(before)
    # An image-to-video LoRA (cross-attention k_img/v_img): refused by name, the weights untouched.
    i2v = dict(
        sd,
        **{
            "blocks.0.cross_attn.k_img.lora_down.weight": torch.zeros(4, 64),
            "blocks.0.cross_attn.k_img.lora_up.weight": torch.zeros(128, 4),
        },
    )
    with pytest.raises(WanAlphaError, match="image-to-video DiT .*k_img.*lightx2v_T2V_14B"):
        adapters.merge_lora(tiny_dit, i2v)
    # Mostly alien entries (blocks this DiT lacks): refused with the count; a few strays are skipped and reported.
    alien = {k.replace("blocks.0.", "blocks.9."): v for k, v in sd.items() if k.startswith("blocks.0.")}
    alien |= {k.replace("blocks.0.", "blocks.8."): v for k, v in sd.items() if k.startswith("blocks.0.")}
    alien |= {k: v for k, v in sd.items() if k.startswith("blocks.1.")}
    with pytest.raises(WanAlphaError, match=r"only \d+ of its \d+ tensors fit this DiT"):
        adapters.merge_lora(tiny_dit, alien)
    for key, value in tiny_dit.state_dict().items():
        assert torch.equal(value, before[key]), key
    stray = dict(sd, **{k.replace("blocks.0.", "blocks.9."): v for k, v in sd.items() if k.startswith("blocks.0.")})
    match = adapters.merge_lora(tiny_dit, stray)
    assert match.skipped and match.applied + len(match.skipped) == match.entries


def test_peft_dora_forward_equals_merged_weights(reference: Path, ref_weights, golden: dict) -> None:
    shapes = json.loads((reference / "golden/dit.json").read_text())["weights"]["key_shapes"]
    base = ref_weights.make_state_dict(shapes, 1234)
    trained = WanDiT(DIT_VARIANTS["tiny"])
    trained.load_state_dict(base)
    adapters.inject_dora(trained, rank=4)
    torch.manual_seed(0)
    for name, param in trained.named_parameters():
        assert param.requires_grad == (".lora_" in name)
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)  # as if trained
        if "lora_magnitude_vector" in name:
            param.data.mul_(1.1)
    exported = adapters.dora_state_dict(trained)
    assert all(k.endswith(".default.weight") for k in exported) and len(exported) == 60
    merged = WanDiT(DIT_VARIANTS["tiny"])
    merged.load_state_dict(base)
    adapters.merge_dora(merged, exported)
    assert rel_err(_run(trained, golden), _run(merged, golden)) < 1e-5


def test_dora_names_equal_the_official_14b_file(reference: Path) -> None:
    expected = json.loads((reference / "keys_dora_dit_14b_rank32.json").read_text())["keys"]
    with torch.device("meta"):
        dit = WanDiT(DIT_VARIANTS["14b"])
        adapters.inject_dora(dit, rank=32)
    assert {k: list(v.shape) for k, v in adapters.dora_state_dict(dit).items()} == expected


def test_bf16_weights_and_autocast_paths(tiny_dit: WanDiT, golden: dict) -> None:
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_out = tiny_dit(golden["x"][None], golden["t"], golden["context"][None])[0]
    tiny_dit.bfloat16()
    with torch.no_grad():
        bf16_out = tiny_dit(golden["x"][None].bfloat16(), golden["t"], golden["context"][None].bfloat16())[0]
    assert bf16_out.dtype == torch.bfloat16
    # 8 mantissa bits through 2 blocks: measured ≈ 6e-3 (autocast) and 8e-3 (bf16 weights).
    assert rel_err(autocast_out, golden["out"]) < 3e-2
    assert rel_err(bf16_out, golden["out"]) < 3e-2


def test_model_folder_config_json(tmp_path: Path) -> None:
    """A folder's config.json (the Wan2.1 folders' fields) decides what the shapes cannot: heads and text_len."""
    from safetensors.torch import save_file

    from wanalpha.checkpoints.wan import load_dit
    from wanalpha.models.dit import DiTConfig

    config = DiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32, text_len=24)
    save_file(WanDiT(config).state_dict(), str(tmp_path / "diffusion_pytorch_model.safetensors"))
    assert load_dit(tmp_path).config.num_heads == 1  # without config.json: head_dim 128 is assumed (64 // 128 → 1)
    fields = {
        "_class_name": "WanModel",
        "model_type": "t2v",
        "dim": 64,
        "ffn_dim": 128,
        "num_heads": 2,
        "num_layers": 2,
        "text_len": 24,
        "freq_dim": 256,
        "in_dim": 16,
        "out_dim": 16,
        "eps": 1e-6,
    }
    (tmp_path / "config.json").write_text(json.dumps(fields))
    assert load_dit(tmp_path).config == config
    (tmp_path / "config.json").write_text(json.dumps(fields | {"num_heads": 3}))
    with pytest.raises(WanAlphaError, match="config.json: not a Wan DiT config"):
        load_dit(tmp_path)


def test_selective_checkpointing_does_not_recompute_self_attention(tiny_dit: WanDiT, golden: dict) -> None:
    from torch.utils._python_dispatch import TorchDispatchMode

    from wanalpha.models.dit import _SDPA_OPS

    class CountAttention(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountAttention.calls += func in _SDPA_OPS
            return func(*args, **(kwargs or {}))

    x = golden["x"][None].clone().requires_grad_(True)
    counts = []
    for keep, blocks in ((False, None), (True, None), (True, 1)):
        tiny_dit.gradient_checkpointing, tiny_dit.checkpoint_attention = True, keep
        tiny_dit.checkpoint_attention_blocks = blocks
        CountAttention.calls = 0
        with CountAttention():
            tiny_dit(x, golden["t"], golden["context"][None]).square().mean().backward()
        counts.append(CountAttention.calls)
    layers = tiny_dit.config.num_layers
    # self + cross, forward + recompute; kept: only cross recomputed; kept in the first block only: the rest as before
    assert counts == [4 * layers, 3 * layers, 3 + 4 * (layers - 1)]


def _trained_adapters(dit: WanDiT, use_dora: bool, fused: bool = False, seed: int = 0) -> WanDiT:
    """`dit` with rank-4 adapters moved away from their initialisation (B ≠ 0, magnitudes ≠ the norms), the moves
    drawn from `seed`."""
    adapters.inject_dora(dit, rank=4, use_dora=use_dora, fused=fused)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in dit.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.1 * torch.randn_like(param))
    return dit


def _forward_backward(dit: WanDiT, golden: dict, autocast: bool = False, device: str = "cpu"):
    """Output and gradients (adapters and input) of a squared-output loss, on the CPU, in float32."""
    x = golden["x"][None].to(device).requires_grad_(True)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        out = dit(x, golden["t"].to(device), golden["context"][None].to(device))
    out.float().square().mean().backward()
    grads = {n: p.grad.float().cpu() for n, p in dit.named_parameters() if p.requires_grad} | {"x": x.grad.cpu()}
    dit.zero_grad(set_to_none=True)
    return out.detach().float().cpu(), grads


def bf16_base(dit: WanDiT) -> WanDiT:
    """The frozen base linears in bf16, the adapters in float32, as train-dit loads them."""
    for module in dit.modules():
        if isinstance(module, torch.nn.Linear) and not any(p.requires_grad for p in module.parameters()):
            module.to(torch.bfloat16)
    return dit


def _fused_copy(dit: WanDiT) -> WanDiT:
    """A copy of an adapted `dit` whose adapters are FusedLoraLinears (injected as such), with the same weights."""
    import copy

    fused = copy.deepcopy(dit)
    for name, module in list(fused.named_modules()):  # the peft layers back to plain linears, then injected fused
        if hasattr(module, "base_layer"):
            parent, _, child = name.rpartition(".")
            setattr(fused.get_submodule(parent) if parent else fused, child, module.base_layer)
    use_dora = any("lora_magnitude_vector" in k for k in dit.state_dict())
    rank = next(v.shape[0] for k, v in dit.state_dict().items() if "lora_A" in k)
    adapters.inject_dora(fused, rank=rank, use_dora=use_dora, fused=True)
    source = dit.state_dict()
    with torch.no_grad():  # the same tensors, dtypes and devices
        for name, param in fused.named_parameters():
            param.data = source[name].detach().clone()
    fused.load_state_dict(source)
    return fused


def fused_and_peft_bf16_errors(dit: WanDiT, golden: dict, use_dora: bool, device: str = "cpu") -> dict:
    """bf16 frozen base + float32 adapters under bf16 autocast (train-dit's arithmetic), peft's forward and the fused
    one: {what: (fused error, peft error)} against float32, err = ‖a − exact‖ / ‖exact‖ over the output, the input
    gradient, and all lora_A / lora_B / magnitude gradients together (single tensors are too small to compare)."""
    import copy

    exact_dit = _trained_adapters(dit, use_dora)
    exact, exact_grads = _forward_backward(exact_dit, golden)
    peft_dit = bf16_base(copy.deepcopy(exact_dit).to(device))
    fused = _fused_copy(peft_dit)
    peft_out, peft_grads = _forward_backward(peft_dit, golden, autocast=True, device=device)
    out, grads = _forward_backward(fused, golden, autocast=True, device=device)

    def err(found: dict, names: list[str]) -> float:
        expected = torch.cat([exact_grads[n].flatten() for n in names])
        return float((torch.cat([found[n].flatten() for n in names]) - expected).norm() / expected.norm())

    errors = {"out": (float((out - exact).norm() / exact.norm()), float((peft_out - exact).norm() / exact.norm()))}
    for kind in ("x", "lora_A", "lora_B", "lora_magnitude_vector"):
        names = [n for n in grads if n == kind or f".{kind}." in n]
        if names:
            errors[kind] = (err(grads, names), err(peft_grads, names))
    return errors


@pytest.mark.parametrize("use_dora", [True, False], ids=["dora", "lora"])
def test_fused_adapters_equal_peft(tiny_dit: WanDiT, golden: dict, use_dora: bool) -> None:
    import copy

    base = copy.deepcopy(tiny_dit)
    peft_dit = _trained_adapters(tiny_dit, use_dora)
    fused = _trained_adapters(base, use_dora, fused=True)
    fused.load_state_dict(peft_dit.state_dict())
    kinds = [type(m).__name__ for m in fused.modules()]
    assert kinds.count("FusedLoraLinear") == 10 * tiny_dit.config.num_layers and "Linear" not in {
        type(m).__name__ for m in fused.modules() if hasattr(m, "lora_A")
    }
    expected, expected_grads = _forward_backward(peft_dit, golden)
    out, grads = _forward_backward(fused, golden)
    assert rel_err(out, expected) < 1e-6
    assert set(grads) == set(expected_grads) and len(grads) == (61 if use_dora else 41)
    for name, grad in grads.items():  # x, every lora_A / lora_B and, for DoRA, the magnitudes
        assert rel_err(grad, expected_grads[name]) < 1e-5, name
    with adapters.dora_norm_scope():  # one training micro-step: same numbers
        scoped, scoped_grads = _forward_backward(fused, golden)
    assert torch.equal(scoped, out) and all(torch.equal(scoped_grads[n], g) for n, g in grads.items())
    assert not any(p.grad is not None for p in fused.parameters())


def test_dora_norm_scope_reuses_the_norms(tiny_dit: WanDiT, golden: dict) -> None:
    fused = _trained_adapters(tiny_dit, True, fused=True)
    before = _run(fused, golden)
    lora_a = fused.blocks[0].self_attn.q.lora_A["default"].weight
    with adapters.dora_norm_scope():
        _run(fused, golden)  # computes the norms
        with torch.no_grad():
            lora_a.mul_(3)
        reused = _run(fused, golden)  # the new A flows through x Aᵀ, with the norm of the old one
        seen = []  # on the GPU the backward (with its recomputation) runs on autograd's own thread
        thread = threading.Thread(target=lambda: seen.append(_run(fused, golden)))
        thread.start()
        thread.join()
    fresh = _run(fused, golden)  # outside a scope the norm follows the weights
    assert torch.equal(seen[0], reused) and not torch.equal(reused, fresh) and not torch.equal(fresh, before)
    with torch.no_grad():
        lora_a.div_(3)
    assert rel_err(_run(fused, golden), before) < 1e-6


@pytest.mark.parametrize("use_dora", [True, False], ids=["dora", "lora"])
def test_fused_adapters_bf16_autocast_as_close_as_peft(tiny_dit: WanDiT, golden: dict, use_dora: bool) -> None:
    """The fused forward's bf16 error against float32 is of the order of peft's own (tests/test_gpu.py: on CUDA)."""
    errors = fused_and_peft_bf16_errors(tiny_dit, golden, use_dora)
    assert len(errors) == (5 if use_dora else 4)
    for what, (fused_err, peft_err) in errors.items():
        assert 0 < fused_err < 1.5 * peft_err, (what, fused_err, peft_err)


@pytest.mark.parametrize("rope", ["float32", "float64"])
def test_compiled_blocks_equal_eager(tiny_dit: WanDiT, golden: dict, rope: str) -> None:
    """generate --compile: torch.compile of the blocks (float32 RoPE in real arithmetic; float64 keeps the complex
    multiply) computes the golden forward within the reference tolerance, with no graph break."""
    import torch._dynamo

    torch._dynamo.reset()
    tiny_dit.rope_precision = rope
    eager = _run(tiny_dit, golden)
    compile_blocks(tiny_dit)
    torch._dynamo.utils.counters.clear()
    compiled = _run(tiny_dit, golden)
    assert rel_err(compiled, golden["out"]) < TOL and rel_err(compiled, eager) < 1e-5
    assert not torch._dynamo.utils.counters["graph_break"]


def test_compiled_blocks_train_with_the_same_gradients(tiny_dit: WanDiT, golden: dict) -> None:
    """train-dit --compile: compiled blocks under per-block checkpointing, with fused DoRA, give eager's gradients
    (float32), down to the input's (the patchified tokens enter the blocks contiguous: inductor's backward of a
    transposed-view input was wrong), in one graph per block."""
    import copy

    import torch._dynamo

    torch._dynamo.reset()
    tiny_dit.rope_precision = "float32"
    trained = _trained_adapters(tiny_dit, True, fused=True)
    trained.gradient_checkpointing = True
    compiled = copy.deepcopy(trained)
    compile_blocks(compiled)
    torch._dynamo.utils.counters.clear()
    with adapters.dora_norm_scope():
        expected, expected_grads = _forward_backward(trained, golden)
        out, grads = _forward_backward(compiled, golden)
    assert rel_err(out, expected) < 1e-5 and len(grads) == 61
    for name, grad in grads.items():  # x and every adapter tensor
        assert rel_err(grad, expected_grads[name]) < 1e-5, name
    assert not torch._dynamo.utils.counters["graph_break"]


def test_fused_adapters_fall_back_to_peft_where_they_differ(tiny_dit: WanDiT, golden: dict) -> None:
    """Settings the fused forward does not implement run peft's own forward (peft's lora_bias; a trained base bias);
    fused models pickle (torch.save)."""
    import copy
    import io
    import pickle

    from peft import LoraConfig, inject_adapter_in_model

    def lora_bias(fused: bool) -> WanDiT:
        config = LoraConfig(r=4, lora_alpha=4, target_modules=["q"], lora_bias=True)
        return inject_adapter_in_model(adapters.fused_config(config) if fused else config, copy.deepcopy(tiny_dit))

    def trained_bias(fused: bool) -> WanDiT:
        dit = _trained_adapters(copy.deepcopy(tiny_dit), True, fused=fused)
        for module in dit.modules():
            if hasattr(module, "base_layer"):
                module.base_layer.bias.requires_grad_(True)
        return dit

    for make in (lora_bias, trained_bias):
        dit, fused = make(False), make(True)
        with torch.no_grad():
            for name, param in dit.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.05)  # weights and lora_bias's biases
        fused.load_state_dict(dit.state_dict())
        assert any(type(m).__name__ == "FusedLoraLinear" for m in fused.modules())
        assert torch.equal(_run(fused, golden), _run(dit, golden))
    trained_bias = fused
    pickle.loads(pickle.dumps(trained_bias))
    torch.save(trained_bias, io.BytesIO())


@pytest.mark.parametrize("use_dora", [True, False], ids=["dora", "lora"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("fp8_base", [False, True, "gemm"], ids=["plain", "fp8", "fp8-gemm"])
def test_fused_adapter_operators_pass_opcheck(monkeypatch, use_dora: bool, bias: bool, fp8_base) -> None:
    """The fused linear's forward and backward are custom operators (compiled blocks run them as they run eagerly):
    their schemas, fake implementations (shapes under torch.compile) and autograd registration are consistent, over a
    plain base weight and over an FP8 one (codes, scales and the dequantised dtype), whose forward may be an FP8 GEMM
    (torch._scaled_mm stood in for by its float32 definition on the CPU)."""
    from test_fp8 import standin_scaled_mm
    from wanalpha import fp8

    monkeypatch.setattr(torch, "_scaled_mm", standin_scaled_mm)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 8, generator=gen, requires_grad=True)
    weight, base_bias = torch.randn(6, 8, generator=gen), torch.randn(6, generator=gen) if bias else None
    a = torch.randn(4, 8, generator=gen).requires_grad_(True)
    b = torch.randn(6, 4, generator=gen).requires_grad_(True)
    magnitude = (torch.rand(6, generator=gen) + 0.5).requires_grad_(True) if use_dora else None
    norm = torch.rand(6, generator=gen) + 1 if use_dora else None
    base = fused_adapter.FP8Base(*fp8.quantize_weight(weight), torch.float32) if fp8_base else weight
    w_scaled = fused_adapter._scaled_base(base, magnitude, norm, x.dtype).detach()
    b_scaled = fused_adapter._scaled(b, magnitude, norm, x.dtype, 0.5).detach()
    codes, weight_scale, weight_dtype = base[:3] if fp8_base else (weight, None, None)
    gemm = fp8_base == "gemm"
    w_scaled = w_scaled.new_empty(0) if gemm else w_scaled  # an FP8 GEMM's forward reads the codes
    inputs = (x, codes, weight_scale, weight_dtype, w_scaled, base_bias, a, b, b_scaled, magnitude, norm, 0.5, gemm)
    # The schema check compares the inputs before and after by arithmetic the CPU has no float8 kernel for.
    checks = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(fused_adapter._adapter_linear, inputs, **({"test_utils": checks} if fp8_base else {}))
    y, xa = fused_adapter._adapter_linear(*inputs)
    if gemm:  # the backward's W' (the forward's is not formed)
        w_scaled = fused_adapter._scaled_base(base, magnitude, norm, x.dtype).detach()
    grad = torch.randn(12, 6, generator=gen)
    detached = [None if t is None else t.detach() for t in (x, xa, y if use_dora else None, a, b, magnitude)]
    args = (grad, *detached[:3], w_scaled, base_bias, *detached[3:5], b_scaled, detached[5], norm, 0.5)
    for need in ([True, True, True, use_dora], [False, True, False, False]):
        torch.library.opcheck(fused_adapter._adapter_linear_backward, (*args, need))


@pytest.mark.parametrize("fp8", [False, True])
def test_prepared_linear_shapes_are_the_forwards(fp8: bool) -> None:
    """runtime.dit_linear_shapes, which generate's preparation runs once ahead of the first step, lists exactly the
    (rows, in, out) of every linear a forward runs, with and without guidance's batch of two, and which of them are the
    blocks' linears (FP8Linears with --dit-dtype fp8)."""
    import math

    from wanalpha.fp8 import BLOCK_TARGETS, FP8Linear, quantize_dit_
    from wanalpha.models.dit import DiTConfig
    from wanalpha.runtime import dit_linear_shapes

    config = DiTConfig(dim=64, ffn_dim=96, num_heads=2, num_layers=2, text_dim=48, text_len=24, freq_dim=32)
    dit = WanDiT(config).eval()
    if fp8:
        quantize_dit_(dit)
    seen = set()
    for name, module in dit.named_modules():
        if isinstance(module, (torch.nn.Linear, FP8Linear)):
            block = name.startswith("blocks.") and name.split(".", 2)[2] in BLOCK_TARGETS
            assert isinstance(module, FP8Linear) == (fp8 and block), name
            module.register_forward_pre_hook(
                lambda m, args, block=block: seen.add(
                    (args[0].numel() // m.in_features, m.in_features, m.out_features, block)
                )
            )
    latent = (3, 4, 6)
    tokens = math.prod(size // p for size, p in zip(latent, config.patch_size, strict=True))
    for batch in (1, 2):
        seen.clear()
        with torch.no_grad():
            dit(torch.randn(batch, 16, *latent), torch.full((batch,), 500.0), [torch.randn(7, 48)] * batch)
        assert seen == dit_linear_shapes(config, tokens, batch)
