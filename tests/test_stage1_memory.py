"""Stage 1 at memory that does not grow with the clip (#25): the chunked backward through the decoders
(`wanalpha.chunked`) gives the gradients of plain autograd, and what a step holds for its backward grows with the
clip only by the clip's own input/output tensors (the saved causal-cache states go to host memory past a budget)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from test_v2_train import ToyDiT  # the v2 tests' stand-in DiT
from wanalpha import chunked
from wanalpha.losses import LossWeights, VGG16Features
from wanalpha.models.rgba import FeatureMergeBlock, RGBAlphaVAE
from wanalpha.models.vae import VAEConfig
from wanalpha.train_merge import DiffusionTerm, V2Trainable, draw_colours, merge_step, v2_step
from wanalpha.training import Draws

CONFIG = VAEConfig(dim=4)
H, W = 16, 24


def _batch(frames: int, batch: int = 1, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "rgb": torch.randint(0, 256, (batch, frames, H, W, 3), generator=g, dtype=torch.uint8),
        "alpha": torch.randint(0, 256, (batch, frames, H, W), generator=g, dtype=torch.uint8),
    }


def _v1_model() -> RGBAlphaVAE:
    torch.manual_seed(0)
    model = RGBAlphaVAE(CONFIG, merge=FeatureMergeBlock(in_dim=32, dim=16, out_dim=16))
    for decoder in (model.rgb_decoder, model.alpha_decoder):  # the two decoders differ, as with decoder.bin
        with torch.no_grad():
            for p in decoder.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return model


def _vgg() -> VGG16Features:
    torch.manual_seed(1)
    vgg = VGG16Features()
    for p in vgg.parameters():
        nn.init.normal_(p, std=0.1)
    return vgg


def _set_chunked(model, on: bool) -> None:
    model.rgb_decoder.gradient_checkpointing = model.alpha_decoder.gradient_checkpointing = on
    model.merge.gradient_checkpointing = on


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _v1_grads(model, batch, weights, vgg, on: bool, budget: int | None = None):
    _set_chunked(model, on)
    model.merge.zero_grad(set_to_none=True)
    colours = draw_colours(Draws(0, 0, list(range(len(batch["rgb"])))), list(range(8)))
    loss, metrics = merge_step(model, batch, colours, weights, vgg)
    (loss * 0.5).backward()  # a scale, as gradient accumulation applies
    return float(loss), metrics, {n: p.grad.clone() for n, p in model.merge.named_parameters()}


@pytest.mark.parametrize("frames", [5, 9, 17])
def test_v1_chunked_gradients_equal_plain_autograd(frames: int, monkeypatch) -> None:
    model, vgg = _v1_model(), _vgg()
    weights = LossWeights(perceptual=0.5)
    batch = _batch(frames, batch=2 if frames == 9 else 1)
    loss0, metrics0, plain = _v1_grads(model, batch, weights, vgg, on=False)
    # A budget of 0: every saved state takes the host path (on the CPU: counted, not copied); blocks: each upper
    # decoder block checkpointed inside the chunk's recomputation as well.
    for budget, blocks in ((2**40, False), (0, False), (2**40, True)):
        monkeypatch.setattr(chunked, "DEFAULT_STATE_BUDGET", budget)
        monkeypatch.setattr(chunked, "CHECKPOINT_BLOCKS", blocks)
        loss1, metrics1, chunked_grads = _v1_grads(model, batch, weights, vgg, on=True)
        assert loss1 == pytest.approx(loss0, rel=1e-6)
        assert metrics1.keys() == metrics0.keys()
        assert all(metrics1[k] == pytest.approx(metrics0[k], rel=1e-5, abs=1e-7) for k in metrics0)
        for name, g in plain.items():
            assert _rel(chunked_grads[name], g) < 1e-5, name


def _v2_setup():
    torch.manual_seed(0)
    model = RGBAlphaVAE(CONFIG, variant="v2")
    trainable = V2Trainable(model, rank=2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # lora_B starts at zero (no gradient for lora_A): give both a value
        for lora in trainable.loras.values():
            for module in lora.values():
                module.lora_B.normal_(std=0.05)
    return model, trainable


def _v2_grads(model, trainable, batch, on: bool, diffusion):
    for decoder in trainable.decoders().values():
        decoder.gradient_checkpointing = on
    trainable.zero_grad(set_to_none=True)
    draws = Draws(0, 0, list(range(len(batch["rgb"]))))
    loss, metrics = v2_step(trainable, model.encoder, batch, draws, LossWeights(), None, diffusion, 0.1)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainable.named_parameters() if p.requires_grad}
    return float(loss), metrics, grads


@pytest.mark.parametrize("frames", [5, 9, 17])
def test_v2_chunked_gradients_equal_plain_autograd_with_lora(frames: int, monkeypatch) -> None:
    model, trainable = _v2_setup()
    diffusion = DiffusionTerm(ToyDiT(), torch.zeros(1, 4))
    batch = _batch(frames)
    loss0, metrics0, plain = _v2_grads(model, trainable, batch, False, diffusion)
    for blocks in (False, True) if frames == 9 else (False,):
        monkeypatch.setattr(chunked, "CHECKPOINT_BLOCKS", blocks)
        loss1, metrics1, chunked_grads = _v2_grads(model, trainable, batch, True, diffusion)
        assert loss1 == pytest.approx(loss0, rel=1e-6) and metrics1.keys() == metrics0.keys()
        assert any(".lora_A" in n for n in plain) and any(n.startswith("merge.") for n in plain)
        for name, g in plain.items():
            assert _rel(chunked_grads[name], g) < 1e-5, (blocks, name)


# ------------------------------------------------------------------------------------------------ memory


def _decoded_node(loss: torch.Tensor):
    """The chunked decode's autograd node in loss's graph (its `run` holds the saved states)."""
    seen, todo = set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if getattr(node, "run", None) is not None:
            return node
        todo.extend(n for n, _ in node.next_functions)
    raise AssertionError("no chunked decode in the graph")


def _live_tensors() -> dict[int, int]:
    gc.collect()
    live = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta:
            try:
                storage = obj.untyped_storage()
                live[storage.data_ptr()] = storage.nbytes()
            except RuntimeError:  # a fake tensor that compiling in an earlier test left alive: no memory of its own
                continue
    return live


def _held_for_backward(step) -> tuple[int, int]:
    """(bytes the step holds for its backward apart from the host-spilled states, those states' bytes): every tensor
    the autograd graph saved (saved-tensor hooks) and every tensor the step left alive, counted once per storage."""
    before = _live_tensors()
    packed: list[weakref.ref] = []

    def pack(t: torch.Tensor):
        packed.append(weakref.ref(t))  # dead once the graph that saved it is gone (the per-chunk loss graphs)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    gc.collect()
    saved = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in (r() for r in packed) if t is not None
    }
    run = _decoded_node(loss).run
    spilled = {}
    for store in run.stores:
        for state in store.states if store is not None else ():
            layers, tensors, on_device = state
            if not on_device:
                spilled |= {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    held = {k: v for k, v in (_live_tensors() | saved).items() if k not in before and k not in spilled}
    del loss, run
    return sum(held.values()), sum(spilled.values())


def _clip_bytes_per_frame(batch: int = 1) -> int:
    """What one more frame of the clip itself costs: the uint8 RGBA frames, the rgb and alpha targets in [-1,1]
    (fp32, 3 + 1 channels) and the gradients w.r.t. both decoders' outputs (fp32, 3 + 3 channels)."""
    return batch * H * W * (4 + 4 * (3 + 1) + 4 * (3 + 3))


def _assert_flat(held: dict[int, tuple[int, int]]) -> None:
    base = min(held)
    allowance = _clip_bytes_per_frame() * 1.05
    for frames, (device_bytes, _) in held.items():
        growth = device_bytes - held[base][0]
        assert growth <= allowance * (frames - base), (frames, growth, allowance * (frames - base), held)
    # The host side holds the cache state entering each latent frame: one state more per latent frame, by design.
    per_state = {f: (host - held[base][1]) / ((f - base) // 4) for f, (_, host) in held.items() if f != base}
    assert max(per_state.values()) == pytest.approx(min(per_state.values()), rel=1e-6), per_state


FRAMES = (5, 9, 17, 33)


def test_v1_step_holds_flat_memory_for_backward(monkeypatch) -> None:
    monkeypatch.setattr(chunked, "DEFAULT_STATE_BUDGET", 0)
    model = _v1_model()
    _set_chunked(model, True)
    held = {}
    colours = draw_colours(Draws(0, 0, [0]), list(range(8)))
    for frames in FRAMES:
        batch = _batch(frames)
        held[frames] = _held_for_backward(lambda b=batch: merge_step(model, b, colours, LossWeights())[0])
    _assert_flat(held)
    # Plain autograd for contrast: its graph grows by far more than the clip per frame.
    _set_chunked(model, False)
    small, large = (_saved_bytes(lambda f=f: merge_step(model, _batch(f), colours, LossWeights())[0]) for f in (5, 17))
    assert large - small > 5 * _clip_bytes_per_frame() * 12


def _saved_bytes(step) -> int:
    packed: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        step()
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in packed}.values())


def test_v2_step_holds_flat_memory_for_backward(monkeypatch) -> None:
    monkeypatch.setattr(chunked, "DEFAULT_STATE_BUDGET", 0)
    model, trainable = _v2_setup()
    for decoder in trainable.decoders().values():
        decoder.gradient_checkpointing = True
    diffusion = DiffusionTerm(ToyDiT(), torch.zeros(1, 4))
    held = {}
    for frames in FRAMES:
        batch = _batch(frames)

        def step(b=batch):
            return v2_step(trainable, model.encoder, b, Draws(0, 0, [0]), LossWeights(), None, diffusion, 0.1)[0]

        held[frames] = _held_for_backward(step)
    _assert_flat(held)


# ------------------------------------------------------------------------------------ inference (validate, cache)


class PeakLive(TorchDispatchMode):
    """The peak of the bytes held by tensors that operators made while active (a CPU stand-in for the CUDA
    allocator's peak): each output's storage counts until it is freed."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                self.live.setdefault(storage._cdata, (StorageWeakRef(storage), storage.nbytes()))
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def test_validate_and_cache_inference_peak_is_flat() -> None:
    """validate's reconstruction and cache's encoding (8 colours) stream through the VAE chunk by chunk: their peak
    grows with the clip by a few clip-sized tensors (inputs, render, outputs), not by the VAE's activations."""
    from wanalpha.cache import encode_clip
    from wanalpha.data.dataset import to_model_space
    from wanalpha.validate import reconstruct

    torch.manual_seed(0)
    model = RGBAlphaVAE(VAEConfig(dim=16)).eval()
    peaks: dict[str, dict[int, int]] = {"validate": {}, "cache": {}}
    for frames in FRAMES:
        clip = _batch(frames)
        rgb_u8, alpha_u8 = clip["rgb"][0].numpy(), clip["alpha"][0].numpy()
        with PeakLive() as tracker:
            reconstruct(model, rgb_u8, alpha_u8, 0, "no")
        peaks["validate"][frames] = tracker.peak
        rgb, alpha = to_model_space(clip["rgb"], clip["alpha"])
        with torch.no_grad(), PeakLive() as tracker:
            encode_clip(model.encoder, rgb, alpha, list(range(8)), "no")
        peaks["cache"][frames] = tracker.peak
    plane = H * W * 4  # one fp32 channel of one frame
    for name, peak in peaks.items():
        per_frame = (peak[33] - peak[5]) / 28
        # A whole-sequence (cache-free) pass would hold 16-64 channels per frame at full resolution in every layer.
        assert per_frame <= 24 * plane, (name, per_frame / plane, peak)
