"""How the models run: device and precision choices shared by the commands, and the typed runtimes (DiTRuntime,
VAERuntime) that the commands apply once to the pure models."""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass

import torch
from torch import nn


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' → bf16 on a GPU, 'no' (fp32) elsewhere; other values pass through."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "no"
    return precision


def precision_dtype(precision: str, default: torch.dtype) -> torch.dtype:
    """The autocast dtype of a mixed precision ('bf16' / 'fp16'); `default` for 'no'."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, default)


def autocast(device: torch.device, precision: str):
    """A torch.autocast context for 'bf16'/'fp16', or a no-op for 'no'."""
    if precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=precision_dtype(precision, torch.float32))


def dit_weights_dtype(choice: str) -> torch.dtype:
    """--dit-dtype → the dtype of the DiT's unquantised tensors: bf16, fp32, or for fp8 bf16 (only the block
    linears' weights are float8, wanalpha.fp8; they compute in bf16)."""
    return {"bf16": torch.bfloat16, "fp32": torch.float32, "fp8": torch.bfloat16}[choice]


def compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype that tensors of `dtype` on `device` compute in here: autocast's where it is on, else their own."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else dtype


# --- how the models run ------------------------------------------------------------------------------------------
#
# The models (wanalpha.models) are pure Wan: weights and the official computation. Everything about *how* they run
# here — which attention kernel, RoPE precision, fused element-wise kernels, activation checkpointing, sequence
# parallelism, compilation, the VAE's memory layout — is one typed runtime per model, applied once after the model is
# built (and its adapters injected), in a fixed order, each step a plain function (torchtitan's `parallelize_*`).
# `generate` and `train-dit` build a DiTRuntime from their flags and call `apply_dit_runtime` once; the VAE commands
# call `apply_vae_runtime`.


@dataclass(frozen=True)
class DiTRuntime:
    """How a WanDiT runs. The defaults are the pure model's (SDPA attention, upstream float64 RoPE, no
    checkpointing, eager), except the fused element-wise kernels, which apply only where they are exact (CUDA, no
    gradients) and change nothing elsewhere."""

    attention: str = "sdpa"  # one of wanalpha.models.fa4.KERNELS ("auto", "sdpa", "fa4", "fa3", "fa3-fp8"), resolved
    rope_precision: str = "float64"  # or "float32": the table rounded once to complex64 (a GPU speed lever)
    fused_kernels: bool = True  # wanalpha.models.kernels for norms, modulation, RoPE and gated residuals
    gradient_checkpointing: bool = False  # recompute each block in the backward pass
    checkpoint_offload: bool = False  # what checkpointing keeps goes to (pinned) host memory
    checkpoint_attention: bool = False  # selective: keep self-attention's output instead of recomputing it
    checkpoint_attention_blocks: int | None = None  # …only in the first N blocks (None: all)
    compile: bool = False  # torch.compile every block (last: it captures the settings above)
    compile_memory_budget: float | None = None  # the partitioner's activation memory budget in (0, 1]
    sequence_parallel: object | None = None  # a wanalpha.parallel.SequenceParallel (inference only)


def set_attention_kernel(dit, choice: str, device: torch.device, dtype: torch.dtype, backward: bool) -> str:
    """Every block's self-attention kernel: `choice` resolved for tensors of `dtype` on `device` (with gradients
    through it when `backward`); raises ConfigError where "fa4" cannot run. Returns the kernel ("fa4" or "sdpa")."""
    from wanalpha.models import fa4

    kernel = fa4.kernel(choice, device, dtype, dit.config.head_dim, backward=backward)
    for block in dit.blocks:
        block.self_attn.kernel = kernel
    return kernel


def set_rope_precision(dit, precision: str) -> None:
    if precision not in ("float64", "float32"):
        raise ValueError(f"rope precision {precision!r}: choose float64 or float32")
    dit.rope_precision = precision


def set_fused_kernels(dit, enabled: bool) -> None:
    """The fused element-wise kernels on or off in every block and the head (compiled blocks guard on the flag)."""
    from wanalpha.models.dit import DiTBlock, Head, SelfAttention

    for module in dit.modules():
        if isinstance(module, (DiTBlock, SelfAttention, Head)):
            module.fused = enabled


def set_checkpointing(dit, runtime: DiTRuntime) -> None:
    dit.gradient_checkpointing = runtime.gradient_checkpointing
    dit.checkpoint_offload = runtime.checkpoint_offload
    dit.checkpoint_attention = runtime.checkpoint_attention or runtime.checkpoint_attention_blocks is not None
    dit.checkpoint_attention_blocks = runtime.checkpoint_attention_blocks


def set_sequence_parallel(dit, parallel) -> None:
    """Split the video tokens over the processes of a wanalpha.parallel.SequenceParallel (Ulysses) in every forward;
    None turns it off. Inference only."""
    if parallel is not None and dit.config.num_heads % parallel.world:
        raise ValueError(
            f"sequence parallelism over {parallel.world} processes needs num_heads "
            f"({dit.config.num_heads}) divisible by it"
        )
    dit.parallel = parallel
    for block in dit.blocks:
        block.self_attn.parallel = parallel


def compile_blocks(dit, memory_budget: float | None = None) -> None:
    """torch.compile every block (generate --compile, train-dit --compile: inductor fuses the norms, modulation, RoPE
    and residual arithmetic between the matmuls and attention; docs/benchmarks.md). All blocks share one compiled
    graph (same code, parameters as inputs); fused adapters and checkpointing compose with it (same gradients,
    tests/test_dit.py). The rotation then runs in real arithmetic (float32 or float64 pairs). Sets for the whole
    process (and whatever it compiles later): inductor's emulate_precision_casts (compiled code rounds where eager
    rounds) and the partitioner's activation memory budget (`memory_budget` in (0, 1]: what each block's backward
    keeps, against the default partitioner's 1; train-dit --compile-memory-budget). The budget is read when a block
    first compiles, and compiled graphs are shared by every model of this code: a second model compiled in the same
    process with another budget needs `torch._dynamo.reset()` first."""
    import torch._functorch.config
    import torch._inductor.config

    if memory_budget is not None and not 0 < memory_budget <= 1:
        raise ValueError(f"memory_budget must be in (0, 1], got {memory_budget}")
    # Round where eager rounds (bf16 casts between ops), so compiled and eager bf16 runs agree closely.
    torch._inductor.config.emulate_precision_casts = True
    torch._functorch.config.activation_memory_budget = 1.0 if memory_budget is None else memory_budget
    dit.rope_as_real = True  # real (cos, sin) pairs: inductor generates no complex code
    for block in dit.blocks:
        block.compile(dynamic=False)


def apply_dit_runtime(
    dit, runtime: DiTRuntime, device: torch.device, dtype: torch.dtype, backward: bool = False
) -> str:
    """Apply `runtime` to a built DiT (adapters already injected), once, in this order: attention kernel, RoPE
    precision, fused kernels, checkpointing, sequence parallelism, compilation. `dtype`: what the blocks compute in
    (autocast's where the command runs under autocast, else the weights'); `backward`: the run trains through it.
    Returns the self-attention kernel chosen (for the run's records)."""
    kernel = set_attention_kernel(dit, runtime.attention, device, dtype, backward)
    set_rope_precision(dit, runtime.rope_precision)
    set_fused_kernels(dit, runtime.fused_kernels)
    set_checkpointing(dit, runtime)
    set_sequence_parallel(dit, runtime.sequence_parallel)
    if runtime.compile:
        compile_blocks(dit, runtime.compile_memory_budget)
    return kernel


def dit_linear_shapes(config, tokens: int, batch: int) -> set[tuple[int, int, int, bool]]:
    """(rows, in, out, block) of every linear of a DiT forward over `batch` samples of `tokens` tokens each (the text
    padded to text_len): `block` for the blocks' linears (wanalpha.fp8.BLOCK_TARGETS, FP8Linears with --dit-dtype
    fp8), the others (the text and time embeddings, the time projection, the head) in bf16 under autocast."""
    import math

    dim, rows, text = config.dim, batch * tokens, batch * config.text_len
    return {
        (rows, dim, dim, True),  # self-attention's q, k, v, o; cross-attention's q, o
        (text, dim, dim, True),  # cross-attention's k, v over the text
        (rows, dim, config.ffn_dim, True),
        (rows, config.ffn_dim, dim, True),
        (text, config.text_dim, dim, False),  # the text embedding
        (text, dim, dim, False),
        (batch, config.freq_dim, dim, False),  # the time embedding
        (batch, dim, dim, False),
        (batch, dim, 6 * dim, False),  # the time projection
        (rows, dim, config.out_dim * math.prod(config.patch_size), False),  # the head
    }


def prepare_dit_kernels(
    config,
    kernel: str,
    device: torch.device,
    latent: tuple[int, ...],
    batch: int = 1,
    weight_dtype: torch.dtype = torch.bfloat16,
    compute: torch.dtype = torch.bfloat16,
    rope_precision: str = "float64",
    attention_shapes: bool = True,
    fp8: bool = False,
) -> None:
    """Ahead of the first inference forward of a DiT of this config on `device` (`batch` samples of a latent whose
    last three sizes are `latent`'s: frames, height, width; weights in weight_dtype, computing in `compute`; `fp8`:
    its block linears FP8Linears), compile the fused kernels it launches (kernels.warm_up_dit), run every linear of the
    forward once on zeros (`dit_linear_shapes`: the FP8 GEMMs with their activations' quantisation kernel where `fp8`)
    and, with attention_shapes, at their real row counts, with the patch embedding's convolution and self-attention
    (with `kernel`) and cross-attention, so that the GEMM libraries' kernels for them are loaded, FlashAttention-4's
    kernel is compiled (or loaded from its cache), the attention kernels' code is loaded and cuDNN's cross-attention
    and convolution plans are made. cuDNN's
    plans are the thread's own (PyTorch keeps them per thread: run on another thread, the first forward still planned
    its cross-attention, 57 ms at the 14B's shape on an H100, where the next call takes 0.9 ms; docs/benchmarks.md),
    so generate runs this on the thread that samples, while a helper thread reads the weights. Needs no weights. Off
    CUDA, nothing."""
    import math

    from wanalpha.fp8 import FP8Linear
    from wanalpha.models import kernels
    from wanalpha.models.layers import attention

    if device.type != "cuda":
        return
    rope = torch.float64 if rope_precision == "float64" else torch.float32
    kernels.warm_up_dit(device, config.dim, config.head_dim, weight_dtype, compute, rope)
    tokens = math.prod(size // p for size, p in zip(latent[-3:], config.patch_size, strict=True))
    with torch.no_grad():
        for rows, inputs, outputs, block in sorted(dit_linear_shapes(config, tokens, batch)):
            x = torch.zeros(rows if attention_shapes else 1, inputs, device=device, dtype=compute)
            if block and fp8:  # as the forward's: the FP8 GEMM where it applies, else the weight-only fallback
                FP8Linear(inputs, outputs, device=device, dtype=compute)(x)
            else:
                weight = torch.zeros(outputs, inputs, device=device, dtype=compute)
                torch.nn.functional.linear(x, weight, torch.zeros(outputs, device=device, dtype=compute))
            del x
        if attention_shapes:
            x = torch.zeros(batch, config.in_dim, *latent[-3:], device=device, dtype=compute)
            weight = torch.zeros(config.dim, config.in_dim, *config.patch_size, device=device, dtype=compute)
            bias = torch.zeros(config.dim, device=device, dtype=compute)
            torch.nn.functional.conv3d(x, weight, bias, config.patch_size)
            del x, weight
            video = torch.zeros(batch, tokens, config.num_heads, config.head_dim, device=device, dtype=compute)
            text = torch.zeros(batch, config.text_len, config.num_heads, config.head_dim, device=device, dtype=compute)
            attention(video, video, video, kernel=kernel)
            attention(video, text, text)
            del video, text
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()  # its GBs of zeros do not stay reserved while the weights arrive


def prepare_text_encoder(config, batch: int, text_len: int, device: torch.device, dtype=torch.bfloat16) -> None:
    """Ahead of a UMT5 encoder's first call on `device` (`batch` prompts padded to `text_len` tokens), run one layer of
    an encoder of this config's sizes once, with placeholder weights, at that input shape: UMT5-XXL's first call on an
    H100 took 0.77 s where the next took 0.05 s (docs/benchmarks.md): the CUDA libraries' kernels loaded at their
    first use and cuBLAS's first plans for each shape, which one layer of the same sizes pays in its place (0.4 GB).
    What it saves is the process's, not the thread's: generate runs it while a helper thread reads the encoder's
    checkpoint and then encodes (the benchmark measured the first call on another thread than the preparation's).
    Needs no weights. Off CUDA, nothing."""
    import dataclasses

    from wanalpha.models.t5 import UMT5Encoder

    if device.type != "cuda":
        return
    with torch.device("meta"):  # one layer, a small vocabulary: the lookup's kernel does not depend on its size
        encoder = UMT5Encoder(dataclasses.replace(config, num_layers=1, vocab_size=min(config.vocab_size, 256)))
    encoder = encoder.to(dtype).to_empty(device=device).requires_grad_(False)  # no float32 copy on the GPU
    with torch.no_grad():
        for param in encoder.parameters():
            param.normal_(0, 0.02)
        ids = torch.ones(batch, text_len, dtype=torch.long, device=device)
        mask = torch.ones_like(ids)
        mask[:, text_len // 2 :] = 0  # padding, masked as a real prompt's
        encoder(ids, mask)
    del encoder
    torch.cuda.synchronize(device)


def prepare_decoders(device: torch.device, dtype: torch.dtype, latent: tuple[int, ...], decode_chunk: int = 1) -> None:
    """Ahead of the RGBA decoders' first decode on `device` and on this thread (latents of `latent`'s shape: batch,
    channels, frames, height, width; weights in `dtype`; `decode_chunk` latent frames a chunk after the first, as
    WanVAE.decode_chunk), `plan_decode_convolutions` through one placeholder decoder of the decoders' build and GPU
    layout (both decoders run the same shapes; one holds half the memory), then its memory goes back to the device.
    cuDNN's timing runs take whatever memory is free for their workspaces: generate runs this while nothing else of
    the run allocates on the GPU (the other thread reads UMT5's file meanwhile). Needs no weights. Off CUDA,
    nothing."""
    from wanalpha.models.vae import WanVAE

    if device.type != "cuda":
        return
    with torch.device("meta"):
        decoder = WanVAE(with_encoder=False)
    decoder = decoder.to(dtype).to_empty(device=device).requires_grad_(False)
    decoder.decode_chunk = decode_chunk
    with torch.no_grad():
        for param in decoder.parameters():  # the convolutions' plans do not depend on the values
            param.zero_()
    plan_decode_convolutions(apply_vae_runtime(decoder, GPU_LAYOUT), latent, device)
    del decoder
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()  # the timing runs' workspaces go back to the device before the DiT's weights arrive


def plan_decode_convolutions(vae: nn.Module, latent: tuple[int, ...], device: torch.device) -> None:
    """The first three chunks of a decode of a latent of `latent`'s shape through `vae` (a WanVAE's decoder or an
    RGBAlphaVAE's two: anything with `decode_frames`), with cuDNN's autotuning on (`vae.autotuned_convolutions`):
    the whole-latent convolution at its real length, the first chunk's shapes, and from the second chunk on the
    steady shapes that every later chunk has (the causal caches padded to their full length; the third chunk runs
    the layout of every later one, its norms writing behind the cached frames). PyTorch keeps the plans a thread
    found for each convolution's shapes, by heuristics or by timing, and uses them whatever `cudnn.benchmark` says
    after, so a decode that follows on this thread pays no planning and runs with the timed plans (the decoders in
    1.852 s timed against 2.135 s with heuristic plans on an H100, docs/benchmarks.md). The plans are the thread's
    own: a decode on another thread gains nothing. With chunks of n > 1 latent frames (WanVAE.decode_chunk) whose
    last is shorter and comes fourth or later, that last chunk's steady shapes too: a latent of 1 + 2n + r frames
    (r: the last chunk's), decoded whole."""
    from wanalpha.models import vae as vae_module

    n = getattr(getattr(vae, "rgb_decoder", vae), "decode_chunk", 1)
    after_first = latent[2] - 1
    runs = [(latent, 3)]
    if after_first % n and after_first // n >= 2:  # the short last chunk: 4th or later, with full caches
        runs.append(((*latent[:2], 1 + 2 * n + after_first % n, *latent[3:]), 4))
    with torch.no_grad(), vae_module.autotuned_convolutions(device):
        for shape, count in runs:
            chunks = vae.decode_frames(torch.zeros(shape, device=device))
            for _ in itertools.islice(chunks, count):
                pass
            chunks.close()


@dataclass(frozen=True)
class VAERuntime:
    """How a Wan VAE (or the RGBA VAE's encoder and decoders) runs: `layout` "channels_last" (the GPU inference
    layout: `set_channels_last`), "default", or "auto" (channels-last where the weights are on CUDA);
    `gradient_checkpointing` for the decoders and merge block in stage-1 training."""

    layout: str = "default"
    gradient_checkpointing: bool = False


# The inference commands' VAE runtime (generate's decode, validate, cache): channels-last convolutions and fused norms
# on CUDA (same values, a third faster), unchanged elsewhere (the CPU's convolutions do not keep that layout, and the
# fused norm needs CUDA).
GPU_LAYOUT = VAERuntime(layout="auto")


def set_channels_last(module: nn.Module) -> nn.Module:
    """The VAE's GPU inference layout (a speed lever, docs/benchmarks.md): every 3-D convolution's weight stored
    channels-last (NDHWC), so cuDNN runs the convolutions and keeps the activations in that layout, and each RMS norm
    applies the SiLU after it itself (one kernel over the contiguous channels, `RMSNorm.forward`; that SiLU becomes an
    identity, no parameter moves). The values are unchanged, results within rounding (cuDNN picks other algorithms;
    the norm computes in float32). On CUDA, each ×2 upsampling's phase kernels (`vae.Conv2d.phase_weight`) and the
    few-output convolutions' weight rows (`vae.CausalConv3d.few_outputs_rows`), which the decode uses there, are made
    now, not in the first decode's first chunk."""
    from wanalpha.models.vae import RMSNorm, few_output_convolutions, upsampling_convolutions

    for conv in module.modules():
        if isinstance(conv, nn.Conv3d):
            conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        for conv in upsampling_convolutions(module):
            if conv.weight.is_cuda:
                conv.phase_weight()
        for conv in few_output_convolutions(module):
            if conv.weight.is_cuda:
                conv.few_outputs_rows()
    for seq in module.modules():
        if isinstance(seq, nn.Sequential):
            for i in range(len(seq) - 1):
                if isinstance(seq[i], RMSNorm) and isinstance(seq[i + 1], nn.SiLU) and not seq[i].silu:
                    seq[i].silu, seq[i + 1] = True, nn.Identity()
    return module


def convolution_bias_channels(module: nn.Module) -> set[int]:
    """The output channels of every biased convolution of `module` whose bias goes through kernels.add_row_bias_ in the
    GPU layout (the VAE's CausalConv3d and Conv2d: vae._convolved; kernels.warm_up_rms_norms compiles it for each);
    `module` may live on the meta device."""
    from wanalpha.models.vae import CausalConv3d, Conv2d

    return {m.out_channels for m in module.modules() if isinstance(m, (CausalConv3d, Conv2d)) and m.bias is not None}


def upsampling_channels(module: nn.Module) -> set[int]:
    """The output channels of every ×2 upsampling convolution of `module` (vae.Resample's, which the GPU layout runs
    in phases: kernels.phase_rows, compiled for each by kernels.warm_up_rms_norms); `module` may live on the meta
    device."""
    from wanalpha.models.vae import upsampling_convolutions

    return {conv.out_channels for conv in upsampling_convolutions(module)}


def few_output_shapes(module: nn.Module) -> set[tuple[int, int, bool]]:
    """The (input channels, output channels, biased) of every convolution of `module` that the GPU layout runs with
    kernels.conv3_few_outputs (the decoders' heads; compiled for each by kernels.warm_up_rms_norms); `module` may live
    on the meta device."""
    from wanalpha.models.vae import few_output_convolutions

    return {(m.in_channels, m.out_channels, m.bias is not None) for m in few_output_convolutions(module)}


def fused_norm_variants(module: nn.Module) -> set[tuple[int, bool]]:
    """The (channels, silu) of every RMS norm of `module` in its GPU layout (kernels.warm_up_rms_norms); `module` may
    live on the meta device."""
    from wanalpha.models.vae import RMSNorm

    return {(m.gamma.shape[0], m.silu) for m in set_channels_last(module).modules() if isinstance(m, RMSNorm)}


def apply_vae_runtime(module: nn.Module, runtime: VAERuntime) -> nn.Module:
    """Apply `runtime` to a built VAE module (a WanVAE, an RGBAlphaVAE or one of its parts), once."""
    if runtime.layout not in ("default", "channels_last", "auto"):
        raise ValueError(f"VAE layout {runtime.layout!r}: choose default, channels_last or auto")
    on_gpu = next(module.parameters()).is_cuda
    if runtime.layout == "channels_last" or (runtime.layout == "auto" and on_gpu):
        set_channels_last(module)
    for part in module.modules():
        if hasattr(part, "gradient_checkpointing"):
            part.gradient_checkpointing = runtime.gradient_checkpointing
    return module
