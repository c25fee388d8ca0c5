"""What the benchmarks share: the timing loop and the FLOP model they report TFLOP/s and MFU with (matmuls and
attention; norms, RoPE, modulation and element-wise work are left out, so MFU slightly understates the work done)."""

from __future__ import annotations

import datetime as dt
import re
import time
from collections import defaultdict
from collections.abc import Callable

import torch
import torch.utils.checkpoint

PEAK_TFLOPS = 790.0  # dense bf16 matmul peak measured on an H100 / H200 (the GPU-speed issue)


def environment(device: torch.device | None = None) -> dict:
    """What every report records about where it ran: the date, the device's name (the current CUDA device's where
    none is given and there is one; "cpu" off CUDA), and the torch, CUDA and cuDNN versions (the convolutions' and
    attention's speed depends on cuDNN's)."""
    cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
    return {
        "date": dt.date.today().isoformat(),
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }


# Kernel kinds by name. Inductor's generated kernels (triton_*) are element-wise work even when named after the
# attention op they feed (triton_poi_fused__scaled_dot_product_cudnn_attention_…), except its matmul templates.
ATTENTION = re.compile(r"fmha|flash|attention|sdpa", re.I)
BACKWARD = re.compile(r"bwd|bprop|backward|dgrad|dq|dkdv", re.I)
CONVOLUTION = re.compile(r"conv|fprop|implicit_gemm|wgrad", re.I)  # cuDNN's convolution kernels
GEMM = re.compile(r"gemm|cutlass|xmma|nvjet|cublas|matmul|aten::(add)?b?mm$", re.I)


def random_decoders(device: torch.device, dtype: torch.dtype):
    """Both Wan-Alpha decoders (an RGBAlphaVAE without its encoder) with random weights drawn on `device` (a decode's
    work does not depend on their values), in generate's layout (runtime.GPU_LAYOUT: channels-last on CUDA)."""
    from wanalpha.models.rgba import RGBAlphaVAE
    from wanalpha.runtime import GPU_LAYOUT, apply_vae_runtime

    with torch.device("meta"):
        vae = RGBAlphaVAE(with_encoder=False)
    vae = vae.to_empty(device=device).to(dtype).eval()
    with torch.no_grad():
        for param in vae.parameters():
            param.normal_(0, 0.02)
    return apply_vae_runtime(vae, GPU_LAYOUT)


def smooth_picture(
    start: int, frames: int, height: int, width: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames start … start + frames - 1 of a smooth moving picture in [-1, 1], as decoders give them: RGB
    (1, 3, t, H, W) gradients drifting across the frame and alpha (1, 1, t, H, W) a soft disc that grows (1 inside, -1
    beyond 8 px), closer to a generated clip for the encoders than random decoders' texture (which costs them several
    times more)."""
    frame = torch.arange(start, start + frames, device=device, dtype=torch.float32).view(frames, 1, 1)
    y = torch.arange(height, device=device, dtype=torch.float32).view(1, height, 1)
    x = torch.arange(width, device=device, dtype=torch.float32).view(1, 1, width)
    channels = [(x + 3 * frame) / width, (y + 2 * frame) / height, (x + y + frame) / (width + height)]
    smooth = torch.stack(torch.broadcast_tensors(*channels)) % 1.0  # (3, t, h, w) in [0, 1)
    disc = ((x - width / 2) ** 2 + (y - height / 2) ** 2).sqrt() - (height / 4 + frame)  # (t, h, w): <0 inside
    return smooth[None] * 2 - 1, (1 - disc.clamp(0, 8) / 4)[None, None]


def files_done(files: list, stem: str, start: float) -> dict[str, float]:
    """When each written file got its last write (a folder: its newest PNG), in seconds from `start` (time.time()),
    keyed by the name after `stem`: which writer ends generate's write stage."""
    return {
        f.name.removeprefix(stem): round(
            max([f.stat().st_mtime] + [p.stat().st_mtime for p in f.glob("*.png")]) - start, 3
        )
        for f in files
    }


def kernel_kind(name: str) -> str:
    """attention forward / attention backward / convolution / gemm / other (norms, RoPE, activations, copies)."""
    if name.startswith("triton_"):
        return "gemm" if name.startswith("triton_tem_") else "other"
    if ATTENTION.search(name):
        return "attention backward" if BACKWARD.search(name) else "attention forward"
    if CONVOLUTION.search(name):
        return "convolution"
    if GEMM.search(name):
        return "gemm"
    return "other"


def kernel_profile(
    run: Callable[[], object], device: torch.device, top: int = 15, shapes: bool = False
) -> tuple[dict, object]:
    """Profile one call of run (CUDA-synchronised): CUDA kernel time by kind (off the GPU: CPU time of leaf
    operators) as {"kernel_ms", "busy_ms", "span_ms", "by_kind": {kind: {"ms", "share", "calls"}}, "top": [{"kernel",
    "ms"}]}, and the profiler (for its tables; shapes: record operators' input shapes). busy_ms: how long at least one
    kernel ran (the union of their intervals, every stream); span_ms: from the first kernel's start to the last's end;
    span − busy is the GPU's idle time between them (launches that came late; the profiler's own overhead adds to
    it)."""
    cuda = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize(device)
    with torch.profiler.profile(activities=activities, record_shapes=shapes) as prof:
        run()
        if cuda:
            torch.cuda.synchronize(device)
    per_kind: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)  # kernel launches per kind
    kernels: dict[str, float] = defaultdict(float)
    intervals: list[tuple[float, float]] = []  # µs
    for event in prof.events():
        if cuda and event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if not cuda and (event.device_type != torch.autograd.DeviceType.CPU or event.cpu_children):
            continue
        ms, what = (event.device_time if cuda else event.cpu_time) / 1e3, kernel_kind(event.name)
        per_kind[what] += ms
        calls[what] += 1
        kernels[event.name] += ms
        intervals.append((event.time_range.start, event.time_range.end))
    total = sum(per_kind.values())
    busy, span = interval_union(intervals)
    report = {
        "kernel_ms": total,
        "busy_ms": busy / 1e3,
        "span_ms": span / 1e3,
        "by_kind": {
            k: {"ms": v, "share": v / total, "calls": calls[k]}
            for k, v in sorted(per_kind.items(), key=lambda kv: -kv[1])
        },
        "top": [{"kernel": k[:120], "ms": v} for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])[:top]],
    }
    return report, prof


def interval_union(intervals: list[tuple[float, float]]) -> tuple[float, float]:
    """(the length of the union of [start, end) intervals, from the first start to the last end); (0, 0) for none."""
    covered, reach, first = 0.0, None, None
    for start, end in sorted(intervals):
        if reach is None:
            first = reach = start
        covered += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return covered, (reach - first) if reach is not None else 0.0


def forward_flops(config, tokens: int, text_tokens: int) -> float:
    """One DiT forward over `tokens` video tokens and `text_tokens` context rows: per block the q, k, v, o
    projections (8·L·d²), self-attention (4·L²·d), cross-attention (q and o: 4·L·d², k and v on the context:
    4·Lc·d², scores and values: 4·L·Lc·d) and the FFN (4·L·d·ffn)."""
    d, f, layers = config.dim, config.ffn_dim, config.num_layers
    per_block = (
        8 * tokens * d * d
        + 4 * tokens * tokens * d
        + 4 * tokens * d * d
        + 4 * text_tokens * d * d
        + 4 * tokens * text_tokens * d
        + 4 * tokens * d * f
    )
    return layers * per_block


def fresh_compile(sdpa: str = "default") -> None:
    """Before each compiled benchmark mode: forget the graphs earlier modes compiled (they would be reused, and
    count towards dynamo's limit of 8 recompilations, past which it silently runs eager). With a forced SDPA
    backend, also bypass inductor's on-disk caches, which do not key on the backend (a graph compiled under one
    backend would be reused under another)."""
    import torch._dynamo
    import torch._functorch.config
    import torch._inductor.config

    torch._dynamo.reset()
    if sdpa != "default":
        torch._inductor.config.fx_graph_cache = False
        torch._functorch.config.enable_autograd_cache = False


def timed(run: Callable[[int], object], device: torch.device, repeat: int) -> tuple[list[float], float]:
    """Call run(0) as a warm-up, then run(1) … run(repeat), each CUDA-synchronised before and after: (the timed
    seconds, the peak allocated GiB over all calls, weights included; 0 off the GPU)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(repeat + 1):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run(i)
        if cuda:
            torch.cuda.synchronize(device)
        if i:
            times.append(time.perf_counter() - start)
    return times, torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0


def memory_at_peak(run: Callable[[], object], device: torch.device, top: int = 20) -> dict:
    """Record the CUDA caching allocator's history over one call of run and replay it: the peak allocated GiB, the
    GiB allocated before the call, and the allocations live at the peak, summed by where they were made (the
    innermost frame in wanalpha, the benchmarks or inductor's generated code) as {"gib", "count", "where"}.
    Checkpointed recomputation runs whole (no early stop) during the call."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.memory._record_memory_history(max_entries=5_000_000, stacks="python")
    try:
        # Checkpointing's early stop ends a recomputation by raising inside it, which the recorder's stack capture
        # turns into "SystemError: … returned NULL" in a compiled block (torch 2.11, pytorch/pytorch#179536).
        with torch.utils.checkpoint.set_checkpoint_early_stop(False):
            run()
        torch.cuda.synchronize(device)
        events = torch.cuda.memory._snapshot(device)["device_traces"][device.index or 0]
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    return peak_allocations(events, before, top)


def peak_allocations(events: list[dict], before: int, top: int = 20) -> dict:
    """Replay a CUDA allocator trace (`torch.cuda.memory._snapshot()["device_traces"][i]`: alloc / free events with
    addr, size and frames) on top of `before` bytes: its peak and the allocations live there, grouped (see
    memory_at_peak)."""

    def replay(stop: int | None) -> tuple[int, int, dict]:
        live: dict[int, dict] = {}
        now = peak = before
        at = -1
        for i, event in enumerate(events[:stop]):
            if event["action"] == "alloc":
                live[event["addr"]] = event
                now += event["size"]
                if now > peak:
                    peak, at = now, i
            elif event["action"] in ("free_requested", "free_completed") and event["addr"] in live:
                now -= live.pop(event["addr"])["size"]
        return peak, at, live

    peak, at, _ = replay(None)
    _, _, live = replay(at + 1)
    groups: dict[str, list] = defaultdict(lambda: [0, 0])
    for event in live.values():
        frame = next(
            (
                f
                for f in event.get("frames", [])
                if any(s in f["filename"] for s in ("/wanalpha/", "/benchmarks/", "torchinductor"))
            ),
            None,
        )
        label = _frame_label(frame)
        groups[label][0] += event["size"]
        groups[label][1] += 1
    ranked = sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "peak_gib": peak / 2**30,
        "before_gib": before / 2**30,
        "events": len(events),
        "at_peak": [{"where": k, "gib": v[0] / 2**30, "count": v[1]} for k, v in ranked],
    }


def _frame_label(frame: dict | None) -> str:
    """file:line function; for inductor's generated code (hashed file names), the line itself and the nearest
    "Source Nodes" comment above it: a hint at what the buffer holds (the kernel that fills it or the one before)."""
    import linecache

    if frame is None:
        return "(no Python frame)"
    filename, line = frame["filename"], frame["line"]
    if "torchinductor" not in filename:
        return f"{filename.rsplit('/', 2)[-1]}:{line} {frame['name']}"
    text = linecache.getline(filename, line).strip()
    source = next(
        (
            linecache.getline(filename, n).split("Source Nodes:", 1)[1].strip()
            for n in range(line - 1, max(line - 40, 0), -1)
            if "Source Nodes:" in linecache.getline(filename, n)
        ),
        "",
    )
    return f"inductor {frame['name']}:{line} {text[:70]} <- {source[:90]}"
