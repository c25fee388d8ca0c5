"""FlashAttention-4 as the DiT's self-attention kernel (wanalpha.models.fa4): choosing it, and its plumbing (custom
operators, autograd, torch.compile, selective checkpointing) on the CPU, with a float32 stand-in for the package's
two entry points. The real kernels are compared with SDPA on the GPU (tests/test_gpu.py)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import rel_err
from wanalpha.errors import ConfigError
from wanalpha.models import fa4
from wanalpha.models.dit import DIT_VARIANTS, WanDiT
from wanalpha.runtime import compile_blocks, set_attention_kernel


class StandIn:
    """flash_attn.cute.interface's `_flash_attn_fwd` / `_flash_attn_bwd` in float32 math: (B, L, H, d) tensors,
    log-sum-exp (B, H, L), the textbook softmax gradient. Counts its calls."""

    calls = {"forward": 0, "backward": 0}

    @staticmethod
    def _scores(q, k, scale):
        return torch.einsum("blhd,bmhd->bhlm", q.float(), k.float()) * scale

    @classmethod
    def _flash_attn_fwd(cls, q, k, v, *, softmax_scale, return_lse):  # the package's 4th positional is qv
        assert q.dtype == k.dtype == v.dtype and return_lse  # the package wants one dtype
        cls.calls["forward"] += 1
        scores = cls._scores(q, k, softmax_scale)
        lse = scores.logsumexp(-1)
        out = torch.einsum("bhlm,bmhd->blhd", (scores - lse[..., None]).exp(), v.float())
        return out.to(q.dtype), lse, None, None, None  # the package's five (the last three for MLA only)

    @classmethod
    def _flash_attn_bwd(cls, q, k, v, out, dout, lse, *, softmax_scale, deterministic):
        cls.calls["backward"] += 1
        p = (cls._scores(q, k, softmax_scale) - lse[..., None]).exp()  # (B, H, L, M)
        dout, out = dout.float(), out.float()
        dv = torch.einsum("bhlm,blhd->bmhd", p, dout)
        dp = torch.einsum("blhd,bmhd->bhlm", dout, v.float())
        ds = p * (dp - (dout * out).sum(-1).transpose(1, 2)[..., None])
        dq = torch.einsum("bhlm,bmhd->blhd", ds, k.float()) * softmax_scale
        dk = torch.einsum("bhlm,blhd->bmhd", ds, q.float()) * softmax_scale
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@pytest.fixture
def stand_in(monkeypatch):
    """The stand-in as the installed package, usable on the CPU in float32."""
    monkeypatch.setattr(fa4, "_module", StandIn)
    monkeypatch.setattr(fa4, "_missing", None)
    monkeypatch.setattr(fa4, "unsupported", lambda device, dtype, head_dim=128, backward=False: None)
    StandIn.calls.update(forward=0, backward=0)
    return StandIn


def _tiny_dit() -> WanDiT:
    torch.manual_seed(0)
    return WanDiT(DIT_VARIANTS["tiny"]).eval()


def _inputs():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 3, 8, 8, generator=gen)
    return x, torch.tensor([700]), torch.randn(1, 16, 64, generator=gen)


def _train(dit: WanDiT) -> tuple[torch.Tensor, dict]:
    x, t, context = _inputs()
    x.requires_grad_(True)
    out = dit(x, t, context)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in dit.named_parameters() if p.grad is not None} | {"x": x.grad}
    dit.zero_grad(set_to_none=True)
    return out.detach(), grads


def test_kernel_choice() -> None:
    """sdpa is always SDPA; auto falls back to SDPA off Hopper/Blackwell bf16 GPUs; fa4 where it cannot run, and a
    choice that is not one, are one-line config errors saying what to do."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert fa4.kernel("sdpa", cuda, torch.bfloat16) == "sdpa"
    assert fa4.kernel("auto", cpu, torch.bfloat16) == "sdpa"
    assert fa4.kernel("auto", cuda, torch.float32) == "sdpa"
    assert fa4.kernel("auto", cuda, torch.bfloat16, head_dim=64) == "sdpa"  # auto: the Wan head size (measured)
    with pytest.raises(ConfigError, match="runs on NVIDIA CUDA GPUs, not on cpu; use --attention auto or sdpa"):
        fa4.kernel("fa4", cpu, torch.bfloat16)
    with pytest.raises(ConfigError, match="runs bf16 or fp16, not float32"):
        fa4.kernel("fa4", cuda, torch.float32)
    with pytest.raises(ConfigError, match="choose one of auto, sdpa, fa4"):
        fa4.kernel("flash3", cpu, torch.bfloat16)


def test_kernel_choice_without_the_package(monkeypatch) -> None:
    """On a Hopper GPU without flash-attn-4, auto runs SDPA and fa4 says how to install the package."""
    if fa4.load() is not None:
        pytest.skip("flash-attn-4 is installed here")
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    assert fa4.kernel("auto", cuda, torch.bfloat16) == "sdpa"
    with pytest.raises(ConfigError, match=r"cannot be imported \(ModuleNotFoundError: .*pip install --pre flash-"):
        fa4.kernel("fa4", cuda, torch.bfloat16)


def test_auto_takes_fa4_on_hopper_and_blackwell_only(monkeypatch) -> None:
    """auto's GPU gate: the package imports, compute capability 9.x or 10.x, and its forward ran once on the GPU;
    fa4 where one fails says why and what to do instead."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(fa4, "_module", StandIn)
    monkeypatch.setattr(fa4, "_missing", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setitem(fa4._probed, (0, False), None)
    for capability, expected in (((9, 0), "fa4"), ((10, 0), "fa4"), ((8, 0), "sdpa"), ((12, 0), "sdpa")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, c=capability: c)
        assert fa4.kernel("auto", cuda, torch.bfloat16) == expected, capability
    with pytest.raises(ConfigError, match=r"compute capability 9.x, 10.x\), not 12.0; use --attention auto or sdpa"):
        fa4.kernel("fa4", cuda, torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    with pytest.raises(ConfigError, match="head sizes 8 to 128 in steps of 8, not 100"):
        fa4.kernel("fa4", cuda, torch.bfloat16, head_dim=100)
    # A backward that fails its first run: inference still takes FlashAttention-4, training falls back.
    monkeypatch.setitem(fa4._probed, (0, True), "its backward kernel fails on this GPU (RuntimeError: no image)")
    assert fa4.kernel("auto", cuda, torch.bfloat16) == "fa4"
    assert fa4.kernel("auto", cuda, torch.bfloat16, backward=True) == "sdpa"
    with pytest.raises(ConfigError, match=r"backward kernel fails on this GPU \(RuntimeError: no image\); use"):
        fa4.kernel("fa4", cuda, torch.float16, backward=True)
    monkeypatch.setitem(fa4._probed, (0, False), "its forward kernel fails on this GPU (RuntimeError: no image)")
    assert fa4.kernel("auto", cuda, torch.bfloat16) == "sdpa"


def test_runtime_resolves_the_kernel_once_for_every_block(monkeypatch) -> None:
    """runtime.set_attention_kernel asks fa4.kernel once, with the dtype the blocks compute in and whether gradients
    flow through them (as the command says), and hands every block the answer."""
    asked = []
    monkeypatch.setattr(
        fa4, "kernel", lambda choice, device, dtype, head_dim, backward: asked.append((dtype, backward)) or "fa4"
    )
    dit = _tiny_dit()
    assert set_attention_kernel(dit, "auto", torch.device("cpu"), torch.bfloat16, backward=True) == "fa4"
    assert asked == [(torch.bfloat16, True)]  # training probes the backward too
    assert {block.self_attn.kernel for block in dit.blocks} == {"fa4"}
    assert {block.cross_attn.kernel for block in dit.blocks} == {"sdpa"}


def test_operators_pass_opcheck(stand_in) -> None:
    """The forward and backward custom operators: schemas, fake implementations (shapes under torch.compile) and
    the autograd registration agree with what the kernels return."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 3, 8, generator=gen, requires_grad=True) for n in (10, 7, 7))
    torch.library.opcheck(fa4._forward, (q, k, v, 0.3))
    out, lse = fa4._forward(q, k, v, 0.3)
    assert out.shape == q.shape and lse.shape == (2, 3, 10) and lse.dtype == torch.float32
    assert out.requires_grad and not lse.requires_grad  # the log-sum-exp is not differentiable
    grad = torch.randn_like(out)
    torch.library.opcheck(fa4._backward, (grad, *(t.detach() for t in (q, k, v, out, lse)), 0.3))


def test_attention_equals_sdpa_with_gradients(stand_in) -> None:
    """layers.attention(kernel="fa4") computes softmax(q·kᵀ/√d)·v, and its gradients, as SDPA does."""
    from wanalpha.models.layers import attention

    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(1, 12, 2, 16, generator=gen) for _ in range(3)]
    results = []
    for kernel in ("sdpa", "fa4"):
        q, k, v = (t.clone().requires_grad_(True) for t in tensors)
        out = attention(q, k, v, kernel=kernel)
        out.backward(torch.ones_like(out) / math.pi)
        results.append((out.detach(), q.grad, k.grad, v.grad))
    for expected, got in zip(*results, strict=True):
        assert rel_err(got, expected) < 1e-5
    assert stand_in.calls == {"forward": 1, "backward": 1}


def test_dit_trains_with_fa4_as_with_sdpa(stand_in) -> None:
    """With attention = "fa4" the DiT's self-attention (and only it: cross-attention stays on SDPA) runs the
    operators, with the gradients SDPA gives; selective checkpointing keeps their output instead of recomputing
    it, as it keeps SDPA's."""
    dit = _tiny_dit()
    set_attention_kernel(dit, "sdpa", torch.device("cpu"), torch.float32, backward=True)
    expected, expected_grads = _train(dit)
    set_attention_kernel(dit, "fa4", torch.device("cpu"), torch.float32, backward=True)
    layers = dit.config.num_layers
    for checkpointing, keep, forwards in ((False, False, layers), (True, False, 2 * layers), (True, True, layers)):
        dit.gradient_checkpointing, dit.checkpoint_attention = checkpointing, keep
        stand_in.calls.update(forward=0, backward=0)
        out, grads = _train(dit)
        assert stand_in.calls == {"forward": forwards, "backward": layers}, (checkpointing, keep)
        assert rel_err(out, expected) < 1e-5
        assert grads.keys() == expected_grads.keys()
        for name, grad in grads.items():
            assert rel_err(grad, expected_grads[name]) < 1e-4, name
    assert {block.self_attn.kernel for block in dit.blocks} == {"fa4"}
    assert {block.cross_attn.kernel for block in dit.blocks} == {"sdpa"}


def test_compiled_blocks_run_the_operators(stand_in) -> None:
    """Compiled blocks call the operators as opaque kernels: the eager forward and gradients, one graph per block
    (no graph break), and the choice switches back to SDPA by recompiling."""
    import torch._dynamo

    torch._dynamo.reset()
    dit = _tiny_dit()
    set_attention_kernel(dit, "fa4", torch.device("cpu"), torch.float32, backward=True)
    dit.rope_precision = "float32"
    dit.gradient_checkpointing = dit.checkpoint_attention = True
    expected, expected_grads = _train(dit)
    compiled = copy.deepcopy(dit)
    compile_blocks(compiled)
    torch._dynamo.utils.counters.clear()
    stand_in.calls.update(forward=0, backward=0)
    out, grads = _train(compiled)
    assert stand_in.calls == {"forward": dit.config.num_layers, "backward": dit.config.num_layers}
    assert rel_err(out, expected) < 1e-5
    for name, grad in grads.items():
        assert rel_err(grad, expected_grads[name]) < 1e-4, name
    assert not torch._dynamo.utils.counters["graph_break"]
    set_attention_kernel(compiled, "sdpa", torch.device("cpu"), torch.float32, backward=False)
    stand_in.calls.update(forward=0, backward=0)
    with torch.no_grad():
        again = compiled(*_inputs())
    assert stand_in.calls["forward"] == 0 and rel_err(again, expected) < 1e-5
