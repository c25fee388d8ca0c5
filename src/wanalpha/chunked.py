"""Stage-1 losses through the frozen decoders with exact gradients at device memory that does not grow with the clip.

The decoders run one latent frame (a chunk) at a time, each causal layer carrying the last 2 frames of its input to
the next chunk (reference NOTES §1), so chunk i's output depends on every latent frame up to i through that chain of
cache states. Plain autograd keeps every chunk's full-resolution activations; per-chunk activation checkpointing
(`CausalCache.checkpointed`) still keeps every chunk's cache state alive (about 1 GB per decoder and latent frame at
480×832 in bf16, docs/benchmarks.md) and the loss's graph over the whole clip. Here the same gradient comes from
three phases:

1. forward without autograd, chunk by chunk: each decoder's output (3 channels, small) and the cache state entering
   each chunk (`StateStore`: on the device up to a byte budget, beyond it in pinned host memory);
2. the loss, one chunk of frames at a time, with autograd over those frames' outputs only: the loss value and its
   gradient with respect to the outputs. Every stage-1 term is a mean over frames of one size (L1, the per-frame
   Sobel and VGG terms), so the clip's loss is the frame-weighted sum of the chunks' losses (`decoded_loss`);
3. backward through time (the training loop's `backward`), per decoder from the last chunk to the first: recompute
   the chunk with autograd from its saved entry state (as leaves), back-propagate (dLoss/d its output, the gradient
   carried into its exit state) to the entry state (carried to the chunk before), to the chunk's input frame and to
   trainable decoder weights (v2's LoRAs).

Phase 3 is the backward of an autograd Function whose output is the loss, so gradient accumulation's scaling, DDP's
gradient hooks (trainable decoder weights are the Function's inputs) and autocast behave as with plain autograd.
Under a lower-precision autocast the saved states are kept in that precision: every one of them is only ever read
by an autocast convolution (directly, or after being carried into the next state), which casts it to that precision
anyway, so this changes no value.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from wanalpha.models.vae import CausalCache, WanVAE, _run

# Saved cache states kept on the device (bytes, all decoders together); the rest waits in pinned host memory. At
# 81 × 480 × 832 in bf16 a decoder's states total about 34 GiB (1.76 GiB per latent frame). 0: all in host memory,
# which with CHECKPOINT_BLOCKS takes the guide's 81 × 480 × 832 step to 20.6 GiB on an H100 (docs/benchmarks.md).
# None (the default): 0 on a GPU; on the CPU, where the states are in host memory anyway, no limit.
DEFAULT_STATE_BUDGET: int | None = None

# Recompute each chunk with every block of the decoder's upper stages checkpointed as well (`CausalCache.checkpointed`
# per block of `decoder.upsamples`): the chunk's backward then holds one block's graph at a time instead of the
# whole chunk's, for one more forward of those blocks. On: 81 × 480 × 832 at 20.6 GiB and 22.3 s per step against
# 34.1 GiB and 19.7 s with it off and 4 GiB of states on the GPU (H100, docs/benchmarks.md). "gpu" (the default): on
# CUDA devices, where the memory is scarce; on the CPU it would only cost time. True / False: always / never.
CHECKPOINT_BLOCKS: bool | str = "gpu"

ChunkLoss = Callable[[torch.Tensor, torch.Tensor, slice], tuple[torch.Tensor, dict[str, float]]]


def _nbytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class StateStore:
    """The cache states entering each chunk of one decoder pass, by chunk: on the device while `budget` allows
    (shared by the stores of one step through `budget`, a one-element list of the bytes left), else copied to
    (pinned) host memory on a side stream, and fetched back ahead of use in the backward sweep."""

    def __init__(self, device: torch.device, budget: list[int], dtype: torch.dtype | None) -> None:
        self.device, self.budget, self.dtype = device, budget, dtype
        self.states: list[tuple[list[nn.Module], list[torch.Tensor], bool] | None] = []
        self.device_bytes = self.host_bytes = 0  # held now
        self.peak_device_bytes = 0
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._pending: dict[int, list[torch.Tensor]] = {}

    def _compact(self, t: torch.Tensor) -> torch.Tensor:
        if self.dtype is not None and t.is_floating_point() and t.element_size() > self.dtype.itemsize:
            return t.to(self.dtype)
        return t

    def append(self, state: dict[nn.Module, torch.Tensor]) -> None:
        layers, tensors = list(state), [self._compact(t) for t in state.values()]
        nbytes = _nbytes(tensors)
        on_device = nbytes <= self.budget[0]
        if on_device:
            self.budget[0] -= nbytes
            self.device_bytes += nbytes
            self.peak_device_bytes = max(self.peak_device_bytes, self.device_bytes)
        else:
            tensors = [self._to_host(t) for t in tensors]
            self.host_bytes += nbytes
        self.states.append((layers, tensors, on_device))

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type == "cpu":  # already there (CPU training): counted as host memory, not copied
            return t
        if self._stream is None:
            return t.to("cpu")
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            host.copy_(t, non_blocking=True)
        t.record_stream(self._stream)  # its memory is not reused before the copy is done
        return host

    def prefetch(self, i: int) -> None:
        """Start bringing chunk i's state back to the device (on the side stream) while other work runs."""
        layers, tensors, on_device = self.states[i]
        if on_device or i in self._pending:
            return
        if self._stream is None:
            self._pending[i] = [t.to(self.device) for t in tensors]
            return
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            self._pending[i] = [t.to(self.device, non_blocking=True) for t in tensors]

    def get(self, i: int) -> tuple[list[nn.Module], list[torch.Tensor]]:
        self.prefetch(i)
        layers, tensors, on_device = self.states[i]
        if on_device:
            return layers, tensors
        fetched = self._pending.pop(i)
        if self._stream is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self._stream)
            for t in fetched:
                t.record_stream(current)
        return layers, fetched

    def release(self, i: int) -> None:
        layers, tensors, on_device = self.states[i]
        nbytes = _nbytes(tensors)
        if on_device:
            self.budget[0] += nbytes
            self.device_bytes -= nbytes
        else:
            self.host_bytes -= nbytes
        self.states[i] = None

    def clear(self) -> None:
        for i, state in enumerate(self.states):
            if state is not None:
                self.release(i)
        self._pending.clear()


def _frames_forward(decoder: WanVAE, x: torch.Tensor, store: StateStore | None) -> list[torch.Tensor]:
    """Phase 1 for one decoder: its output chunk by chunk (as `WanVAE.decode_raw`), saving each entry state."""
    cache = CausalCache()
    outs = []
    with parametrize.cached():  # each LoRA-patched weight once for the whole pass
        for i in range(x.shape[2]):
            if store is not None:
                store.append(cache.state())
            outs.append(decoder.decoder(x[:, :, i : i + 1], cache))
    return outs


def _recompute(decoder3d: nn.Module, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
    """`Decoder3d.forward` with each block of `upsamples` under activation checkpointing (its state passed in and
    out explicitly, so its recomputation sees the state its chunk started from)."""
    x = decoder3d.conv1(x, cache)
    x = _run(decoder3d.middle, x, cache)
    for layer in decoder3d.upsamples:
        x = cache.checkpointed(lambda h, c, layer=layer: layer(h, c), x)
    return _run(decoder3d.head, x, cache)


def _frames_backward(
    decoder: WanVAE,
    x: torch.Tensor,
    store: StateStore,
    grad_outs: list[torch.Tensor],
    params: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Phase 3 for one decoder: (dLoss/dx, dLoss/d each of params), from the last chunk to the first."""
    grad_x = torch.zeros_like(x)
    grad_params: list[torch.Tensor | None] = [None] * len(params)
    carried: dict[nn.Module, torch.Tensor] = {}  # the gradient of the state leaving the chunk at hand
    for i in reversed(range(x.shape[2])):
        layers, saved = store.get(i)
        if i > 0:
            store.prefetch(i - 1)
        leaves = [t.detach().requires_grad_(t.is_floating_point() and t.dim() > 0) for t in saved]
        xi = x[:, :, i : i + 1].detach().requires_grad_()
        cache = CausalCache.from_state(dict(zip(layers, leaves, strict=True)))
        with torch.enable_grad():
            blocks = CHECKPOINT_BLOCKS if CHECKPOINT_BLOCKS != "gpu" else xi.is_cuda
            out = _recompute(decoder.decoder, xi, cache) if blocks else decoder.decoder(xi, cache)
        outputs, grads = [out], [grad_outs[i].to(out.dtype)]
        passed: dict[nn.Module, torch.Tensor] = {}  # state entries the chunk left untouched (markers)
        for layer, value in cache.state().items():
            if layer not in carried:
                continue
            if any(value is leaf for leaf in leaves) or not value.requires_grad:
                passed[layer] = carried[layer]
                continue
            outputs.append(value)
            grads.append(carried[layer].to(value.dtype))
        wanted = [leaf for leaf in leaves if leaf.requires_grad]
        got = torch.autograd.grad(outputs, [xi, *wanted, *params], grads, allow_unused=True)
        del outputs, grads, out, cache
        if got[0] is not None:
            grad_x[:, :, i : i + 1] = got[0]
        state_grads = dict(zip([id(leaf) for leaf in wanted], got[1 : 1 + len(wanted)], strict=True))
        carried = {}
        for layer, leaf in zip(layers, leaves, strict=True):
            g = state_grads.get(id(leaf))
            if g is not None:
                carried[layer] = g
            elif layer in passed:
                carried[layer] = passed[layer]
        for k, g in enumerate(got[1 + len(wanted) :]):
            if g is not None:
                grad_params[k] = g if grad_params[k] is None else grad_params[k] + g
        store.release(i)
    return grad_x, grad_params


class _Run:
    """One decoded-loss evaluation: what phase 3 needs, held by the autograd Function until its backward."""

    def __init__(self, decoders, loss_fn: ChunkLoss, n_params: tuple[int, int], budget: int, need_grad: bool):
        self.decoders, self.loss_fn, self.n_params = decoders, loss_fn, n_params
        self.budget, self.need_grad = [budget], need_grad
        self.metrics: dict[str, float] = {}
        self.stores: list[StateStore | None] = [None, None]
        self.stats: dict[str, int] = {}

    def forward(self, xs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        device = xs[0].device
        self.autocast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
        dtype = self.autocast[1] if self.autocast[0] else None
        outs = []
        for k, (decoder, x) in enumerate(zip(self.decoders, xs, strict=True)):
            store = None
            if self.need_grad:
                # The second decoder's states are the same size as the first's: keep them only if all of them fit
                # on the device; otherwise its forward runs again in the backward, after the first's states are gone.
                first = self.stores[0]
                if k == 0 or first.host_bytes == 0 and first.device_bytes <= self.budget[0]:
                    store = StateStore(device, self.budget, dtype)
            self.stores[k] = store
            outs.append(_frames_forward(decoder, x, store))
        stores = [s for s in self.stores if s is not None]
        self.stats = {
            "state_device_bytes": sum(s.device_bytes for s in stores),
            "state_host_bytes": sum(s.host_bytes for s in stores),
        }
        return self._loss(*outs)

    def _loss(self, rgb_outs: list[torch.Tensor], alpha_outs: list[torch.Tensor]) -> torch.Tensor:
        """Phase 2: the loss chunk by chunk (frame-weighted), and its gradient w.r.t. each output chunk."""
        frames = sum(o.shape[2] for o in rgb_outs)
        total = torch.zeros((), dtype=torch.float32, device=rgb_outs[0].device)
        metrics: dict[str, float] = {}
        self.grad_outs: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        start = 0
        for rgb, alpha in zip(rgb_outs, alpha_outs, strict=True):
            n = rgb.shape[2]
            weight = n / frames
            rgb, alpha = rgb.detach().requires_grad_(self.need_grad), alpha.detach().requires_grad_(self.need_grad)
            with torch.enable_grad() if self.need_grad else contextlib.nullcontext():
                loss, chunk_metrics = self.loss_fn(rgb, alpha, slice(start, start + n))
                if self.need_grad:
                    grad_rgb, grad_alpha = torch.autograd.grad(loss * weight, [rgb, alpha], materialize_grads=True)
                    self.grad_outs[0].append(grad_rgb)
                    self.grad_outs[1].append(grad_alpha)
            total += loss.detach().float() * weight
            for key, value in chunk_metrics.items():
                metrics[key] = metrics.get(key, 0.0) + value * weight
            start += n
        self.metrics = metrics
        return total

    def backward(self, grad_loss: torch.Tensor, xs, params) -> list[torch.Tensor | None]:
        device = xs[0].device
        enabled, dtype = self.autocast
        result: list[torch.Tensor | None] = []
        split = (params[: self.n_params[0]], params[self.n_params[0] :])
        with torch.autocast(device.type, dtype=dtype, enabled=enabled):
            grads_x, grads_p = [], []
            for k, (decoder, x) in enumerate(zip(self.decoders, xs, strict=True)):
                store = self.stores[k]
                if store is None:  # its states did not fit beside the other decoder's: run its forward again
                    store = self.stores[k] = StateStore(device, self.budget, dtype if enabled else None)
                    with torch.no_grad():
                        _frames_forward(decoder, x, store)
                grad_outs = [g * grad_loss for g in self.grad_outs[k]]
                self.grad_outs[k].clear()
                gx, gp = _frames_backward(decoder, x, store, grad_outs, split[k])
                store.clear()
                self.stores[k] = None
                grads_x.append(gx)
                grads_p.extend(gp)
        result = [*grads_x, *grads_p]
        return result


class _DecodedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run: _Run, x_rgb: torch.Tensor, x_alpha: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.run = run
        ctx.save_for_backward(x_rgb, x_alpha)  # latent-sized
        ctx.n_params = len(params)
        ctx.params = params  # leaves (parameters): nothing kept alive that is not alive anyway
        return run.forward((x_rgb, x_alpha))

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        x_rgb, x_alpha = ctx.saved_tensors
        grads = ctx.run.backward(grad_loss, (x_rgb, x_alpha), ctx.params)
        ctx.run = None
        return None, *grads


def decoded_loss(
    rgb_decoder: WanVAE,
    alpha_decoder: WanVAE,
    latent: torch.Tensor,
    loss_fn: ChunkLoss,
    normalised: bool,
    params: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]] = ((), ()),
    state_budget: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The stage-1 loss of both decoders' outputs of `latent`, with exact gradients at flat device memory.

    latent: the merged latent (B,16,T_lat,h,w), normalised (v1: each decoder de-normalises first) or raw (v2).
    loss_fn(rgb_pred, alpha_pred, frames) → (loss, metrics) of the decoders' unclamped 3-channel outputs for the
    clip's frames `frames` (a slice): a mean over those frames, so that the frame-weighted sum over chunks is the
    clip's loss (the metrics are weighted the same way). params: trainable weights inside each decoder (v2's LoRA
    A/B), whose gradients flow through the recomputed chunks. state_budget: bytes of saved cache states kept on the
    device (default DEFAULT_STATE_BUDGET); the rest waits in host memory. Returns (loss, metrics); the loss's
    backward (with whatever scale the loop applies) gives every input its gradient."""
    decoders = (rgb_decoder, alpha_decoder)
    xs = [d.decoder_input(d.denormalise(latent) if normalised else latent) for d in decoders]
    flat = [*params[0], *params[1]]
    need_grad = torch.is_grad_enabled() and (any(x.requires_grad for x in xs) or any(p.requires_grad for p in flat))
    budget = DEFAULT_STATE_BUDGET if state_budget is None else state_budget
    if budget is None:
        budget = 0 if xs[0].is_cuda else 2**62
    run = _Run(decoders, loss_fn, (len(params[0]), len(params[1])), budget, need_grad)
    loss = _DecodedLoss.apply(run, *xs, *flat)
    metrics = dict(run.metrics) | {"loss": float(loss.detach())}
    return loss, metrics
