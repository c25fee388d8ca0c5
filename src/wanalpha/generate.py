"""`wanalpha generate` (seed guide Step 5): text → transparent video.

UMT5 encodes the prompt (and the negative prompt when guidance is on), then leaves the GPU; the Wan DiT with the
DoRA (and any extra LoRA) merged into its weights samples the merged RGBA latent from seeded noise (flow UniPC or
Euler, official schedules; classifier-free guidance as one batched forward); the DiT leaves, the RGB and alpha
decoders (decoder.bin) decode the latent. Outputs: {prefix}_rgb.mp4, {prefix}_alpha.mp4 (H.264),
{prefix}_rgba_frames/00000.png… (straight-alpha RGBA), {prefix}_composite.mp4 (over a checkerboard), the alpha
containers chosen with --formats ({prefix}.webm VP9, .mov ProRes 4444, .webp, .apng), and generation.json.

Several GPUs: `torchrun --nproc_per_node N -m wanalpha generate …` (or accelerate launch) samples with sequence
parallelism (wanalpha.parallel, Ulysses): every process holds the DiT and computes 1/N of the tokens; process 0
decodes and writes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from wanalpha.config import GenerateConfig
from wanalpha.data.files import atomic_write_text, read_utf8
from wanalpha.errors import WanAlphaError
from wanalpha.models import fa4
from wanalpha.offload import BlockStreamer
from wanalpha.progress import PlainProgress, status
from wanalpha.runtime import dit_weights_dtype

WAN_FOLDER = Path("models/Wan-AI/Wan2.1-T2V-14B")  # where the seed guide puts things (`wanalpha download` too)
DECODER_LORA = Path("Wan-Alpha/vae/decoder.bin")
DORA_FOLDER = Path("models/train/Wan-Alpha-DiT-DoRA")
OFFICIAL_DORA = Path("Wan-Alpha/epoch-13-1500.safetensors")  # `wanalpha download wan-alpha-v1`; a trained one wins


def _newest_dora(folder: Path) -> Path | None:
    files = list(folder.glob("epoch-*.safetensors"))
    return max(files, key=lambda p: p.stat().st_mtime) if files else None


def resolve_inputs(config: GenerateConfig) -> dict:
    """Every file generate needs: flags first, then hub ids, then the seed guide's locations (where `wanalpha
    download wan2.1-t2v-14b wan-alpha-v1` puts the release); one error listing what is missing and where it was
    looked for."""
    from wanalpha.checkpoints.wan import wan_model_files

    paths = config.wan_files()
    if config.model_id_with_origin_paths is None and config.dit_path is None and config.t5_path is None:
        t5_path = WAN_FOLDER / "models_t5_umt5-xxl-enc-bf16.pth"
        paths |= {
            "dit_path": WAN_FOLDER if WAN_FOLDER.is_dir() else None,
            "t5_path": t5_path if t5_path.is_file() else None,
        }
    missing = []
    files = wan_model_files(need=(), **paths)
    if "dit" not in files:
        missing.append(f"the DiT (--dit-path; looked in {WAN_FOLDER}/diffusion_pytorch_model*.safetensors)")
    if "t5" not in files:
        missing.append(f"the T5 encoder (--t5-path; looked for {WAN_FOLDER}/models_t5_umt5-xxl-enc-bf16.pth)")
    else:  # what T5Tokenizer reads: the folder's tokenizer.json, or the file given
        tokenizer = Path(files["tokenizer"])
        tokenizer = tokenizer / "tokenizer.json" if tokenizer.is_dir() or not tokenizer.suffix else tokenizer
        if not tokenizer.is_file():
            missing.append(f"the UMT5 tokenizer (--tokenizer-path; looked for {tokenizer})")
    vae = config.base_vae_path or files.get("vae") or WAN_FOLDER / "Wan2.1_VAE.pth"
    if not Path(vae).is_file():
        missing.append(f"the VAE (--base-vae-path; looked for {vae})")
    lora = config.vae_lora_path or DECODER_LORA
    if not Path(lora).is_file():
        missing.append(f"the decoder LoRAs (--vae-lora-path; looked for {lora})")
    dora = config.dora if config.dora is not None else _newest_dora(DORA_FOLDER)
    if dora is None and OFFICIAL_DORA.is_file():
        dora = OFFICIAL_DORA
    if config.dora is not None and not Path(config.dora).is_file():
        missing.append(f"the DoRA file {config.dora}")
    if missing:
        hint = "; `wanalpha download wan2.1-t2v-14b wan-alpha-v1` puts the release files where generate looks"
        raise WanAlphaError("missing " + "; ".join(missing) + ("" if config.model_id_with_origin_paths else hint))
    loras = []
    for item in config.lora:
        path, sep, scale = item.rpartition(":")
        if not sep or not _is_float(scale):  # no scale given (or a ':' inside the path)
            path, scale = item, "1"
        if not Path(path).is_file():
            raise WanAlphaError(f"--lora {item}: file {path} does not exist")
        loras.append((Path(path), float(scale)))
    return {
        "dit": files["dit"],
        "t5": files["t5"],
        "tokenizer": files["tokenizer"],
        "vae": Path(vae),
        "decoder_lora": Path(lora),
        "dora": dora,
        "loras": loras,
    }


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _prompts(config: GenerateConfig) -> list[str]:
    if config.prompt is not None:
        return [config.prompt]
    if not Path(config.prompt_file).is_file():
        raise WanAlphaError(f"--prompt-file {config.prompt_file} does not exist")
    text = read_utf8(Path(config.prompt_file), f"--prompt-file {config.prompt_file}")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise WanAlphaError(f"--prompt-file {config.prompt_file} holds no prompt")
    return prompts


def draw_seed(config: GenerateConfig, parallel=None) -> int:
    """--seed, or a random one drawn as upstream (0 … sys.maxsize) by process 0 and shared with every process of a
    multi-process launch (each process samples its share of the same noise; official generate script, base_seed
    broadcast from rank 0)."""
    if config.seed >= 0:
        return config.seed
    seed = random.randint(0, sys.maxsize)
    return parallel.shared(seed) if parallel is not None else seed


def prompt_seeds(config: GenerateConfig, seed: int, count: int) -> list[int]:
    """The seed of each prompt's noise: the same seed for every prompt, as the official script; seed + i with
    --per-prompt-seed."""
    return [seed + i if config.per_prompt_seed else seed for i in range(count)]


def negative_prompt(config: GenerateConfig) -> str:
    """The negative prompt the guidance uses: --negative-prompt, where '' means the Wan config's default as in the
    official pipeline (text2video: `if n_prompt == "": n_prompt = self.sample_neg_prompt`); --empty-negative guides
    against the empty text instead."""
    from wanalpha.config import CONFIG_NEGATIVE_PROMPT

    if config.empty_negative:
        return ""
    return config.negative_prompt or CONFIG_NEGATIVE_PROMPT


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def kernel_preparation(
    dit_config,
    kernel: str,
    config: GenerateConfig,
    device: torch.device,
    parallel=None,
    text_batch: int | None = None,
):
    """The work that prepares this run's GPU kernels and plans ahead of their first use, as a callable
    `work(stop, alone)` that generate runs on the thread that will sample and decode (PyTorch keeps cuDNN's plans and
    cuBLAS's handles per thread) while another thread reads the weights (`load`); None off CUDA. In order: where this
    process decodes whole frames (process 0, no --vae-tile-size) the decoders' convolution plans
    (runtime.prepare_decoders: cuDNN's timing runs take whatever memory is free, so they run first, while the other
    thread reads UMT5's file, and `alone` (an Event) is set when they are done: until then nothing else of the run
    may allocate on the GPU); then, with `text_batch` (the prompts the text encoder will take in one batch), UMT5's
    first call (runtime.prepare_text_encoder); the DiT's (runtime.prepare_dit_kernels: the fused kernels compiled, its
    linears (FP8 with --dit-dtype fp8), patch embedding and attention at their real shapes; those shapes not with
    --offload or sequence parallelism: memory, the split shapes); the
    decoders' fused norms. `stop` (an Event) set ends the work after its current step. A failure there is not fatal:
    a warning, and the work happens at the first use instead."""
    import warnings

    from wanalpha.models import kernels
    from wanalpha.models.rgba import RGBAlphaVAE
    from wanalpha.models.t5 import T5Config
    from wanalpha.runtime import (
        convolution_bias_channels,
        few_output_shapes,
        fused_norm_variants,
        prepare_decoders,
        prepare_dit_kernels,
        prepare_text_encoder,
        upsampling_channels,
    )

    if device.type != "cuda":
        return None
    batch = 2 if config.cfg_scale != 1.0 else 1
    vae_dtype = torch.bfloat16 if config.vae_dtype == "bf16" else torch.float32
    dit_dtype = dit_weights_dtype(config.dit_dtype)
    with torch.device("meta"):  # the decoders' norms, without their weights (here: the default device is global)
        decoders = RGBAlphaVAE(with_encoder=False)
        norms, biases = fused_norm_variants(decoders), convolution_bias_channels(decoders)
        phases, few = upsampling_channels(decoders), few_output_shapes(decoders)

    steps = []  # (what, prepare, whether it needs the GPU to itself)
    if config.vae_tile_size is None and (parallel is None or parallel.rank == 0):  # the decode's own shapes
        plan = functools.partial(prepare_decoders, device, vae_dtype, latent_shape(config), config.vae_decode_chunk)
        steps.append(("the decoders' convolution plans", plan, True))
    if text_batch is not None:
        encoder = functools.partial(prepare_text_encoder, T5Config(), text_batch, dit_config.text_len, device)
        steps.append(("the text encoder's GPU kernels", encoder, False))  # UMT5-XXL's sizes
    dit = functools.partial(
        prepare_dit_kernels,
        dit_config,
        kernel,
        device,
        latent_shape(config),
        batch,
        dit_dtype,
        torch.bfloat16,
        config.rope_precision,
        attention_shapes=not config.offload and parallel is None,
        fp8=config.dit_dtype == "fp8",
    )
    steps.append(("the DiT's GPU kernels", dit, False))
    fused = functools.partial(kernels.warm_up_rms_norms, device, vae_dtype, norms, biases, phases, few)
    steps.append(("the decoders' fused kernels", fused, False))

    def work(stop: threading.Event | None = None, alone: threading.Event | None = None) -> None:
        try:
            for what, prepare, exclusive in steps:
                if stop is not None and stop.is_set():  # the weights' read failed: nothing more
                    return
                if not exclusive and alone is not None:
                    alone.set()
                try:
                    prepare()
                except Exception as error:  # noqa: BLE001 - not fatal: the first use does it instead
                    warnings.warn(
                        f"preparing {what} ahead failed ({type(error).__name__}: {error}); "
                        "this happens at their first use instead",
                        stacklevel=1,
                    )
        finally:
            if alone is not None:
                alone.set()

    return work


def latent_shape(config: GenerateConfig) -> tuple[int, ...]:
    return (1, 16, (config.num_frames - 1) // 4 + 1, config.height // 8, config.width // 8)


def sample_latents(
    dit,
    contexts: list[torch.Tensor],
    negative: torch.Tensor | None,
    config: GenerateConfig,
    seeds: list[int],
    device,
    console,
    mask: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """One latent per prompt: float32 noise from the prompt's seed (`prompt_seeds`), shifted once outside the v2
    Gaussian mask when one is given, integrated by the chosen sampler, with classifier-free guidance as one batched
    forward of the conditional and the negative prompt (none at config 1)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from wanalpha import flow
    from wanalpha.masks import shift_noise

    dtype = next(dit.parameters()).dtype

    def model(x: torch.Tensor, t: torch.Tensor, contexts: list[torch.Tensor]) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return dit(x.to(dtype), t, contexts).float()

    latents = []
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.speed} it/s"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        for p, context in enumerate(contexts):
            task = progress.add_task(f"sampling {p + 1}/{len(contexts)}", total=config.steps)
            generator = torch.Generator(device=device).manual_seed(seeds[p])
            noise = torch.randn(latent_shape(config), generator=generator, device=device, dtype=torch.float32)
            if mask is not None and config.alpha_shift_mean > 0:  # Wan-Alpha v2: once, before sampling
                noise = shift_noise(noise, mask.to(device), config.alpha_shift_mean)

            velocity = flow.guided_velocity(model, context, negative, config.cfg_scale)
            plain = PlainProgress(console, f"generate: sampling {p + 1}/{len(contexts)}", config.steps)

            def advance(i: int, task=task, plain=plain) -> None:
                progress.advance(task)
                plain.update(i + 1)

            latents.append(flow.sample(velocity, noise, config.steps, config.shift, config.sampler, progress=advance))
    return latents


@torch.no_grad()
def decode_and_write(
    vae,
    latents: list[torch.Tensor],
    stems: list[Path],
    fps: float,
    formats: list[str],
    tile_size: int | None = None,
    in_process: bool | None = None,
    ahead=None,
) -> tuple[list[Path], dict[str, float]]:
    """Both decoders, chunk by chunk, → uint8 frames (truncated like the official renderer; on a GPU copied to host
    memory behind the chunk's kernels, and handed to the writers once the next chunk's kernels are queued: the GPU
    never waits for this thread's hand-over, `HostFrames`) → every output file of each latent, written while the
    following chunks decode: by a child process (wanalpha.outputs.ProcessClipWriter)
    where the decoders run on a GPU, so that the encoders do not hold up the thread launching their kernels, by
    threads of this process (ClipWriter) on the CPU or where no child process can be started (`in_process`
    overrides). `ahead`: the first clip's writer process, started earlier (`writer_ahead`); each later clip's starts
    while the clip before it decodes. Each clip's files are finished before the next clip decodes (an error later
    keeps them). Returns the files and the timings: decode_s while the chunks decode, write_s for the writers to
    finish after each clip's last chunk."""
    from wanalpha.outputs import ClipWriter, ProcessClipWriter, WriterProcessUnavailable

    tiles = (tile_size, tile_size) if tile_size else None
    files: list[Path] = []
    timings = {"decode_s": 0.0, "write_s": 0.0}
    if in_process is None:
        in_process = not _writes_from_a_process(next(vae.parameters()).device)
    if in_process and ahead is not None:  # written from this process's threads: not needed
        ahead.close()
        ahead = None
    try:
        for i, (z, stem) in enumerate(zip(latents, stems, strict=True)):
            start = time.perf_counter()
            try:
                if in_process:
                    writer = ClipWriter(stem, fps, formats)
                else:
                    if ahead is not None and not ahead.running():  # ended while it waited: a fresh one
                        ahead.close()
                        ahead = None
                    writer = ProcessClipWriter(stem, fps, formats, process=ahead)
                    ahead = None  # the writer's now
            except WriterProcessUnavailable as error:  # write from this process's threads instead
                import warnings

                warnings.warn(f"{error}; writing the files from this process", stacklevel=2)
                in_process = True
                writer = ClipWriter(stem, fps, formats)
            start_next = not in_process and i + 1 < len(latents)
            written, decoded, ahead = _decode_clip(vae, z, tiles, writer, start_next)
            files += written
            timings["decode_s"] += decoded - start
            timings["write_s"] += time.perf_counter() - decoded
    finally:
        if ahead is not None:  # started for a clip that never came (an error)
            ahead.close()
    return files, timings


def _writes_from_a_process(device: torch.device) -> bool:
    """Whether decode_and_write writes from a child process by default: decoders on a GPU, a POSIX system (the child
    takes a socket as its descriptor)."""
    return device.type == "cuda" and os.name == "posix"


def writer_ahead(device: torch.device | None):
    """A writer process (wanalpha.outputs.WriterProcess) started now for a clip to come, where decode_and_write would
    write it from a child process (`device`: the decoders'; None: known to); None elsewhere or where none can be
    started (decode_and_write then tries again, and falls back to its threads)."""
    from wanalpha.outputs import WriterProcess, WriterProcessUnavailable

    if device is not None and not _writes_from_a_process(device):
        return None
    try:
        return WriterProcess()
    except WriterProcessUnavailable:
        return None


def _decode_clip(vae, z: torch.Tensor, tiles, writer, start_next: bool) -> tuple[list[Path], float, object]:
    """One clip's chunks through `writer` (decode_and_write): its files, when its last chunk was decoded, and with
    `start_next` the next clip's writer process (`writer_ahead`), started first thing inside the writer's `with` (so
    that an error or Ctrl-C there still aborts this clip's writer) and ended here if this clip fails."""
    from wanalpha.data.render import to_uint8

    with writer:
        following = writer_ahead(None) if start_next else None
        try:
            pending = None  # the previous chunk's frames, handed to the writer once the next chunk is launched
            for rgb, alpha in vae.decode_frames(z, tile_size=tiles):  # float32 in [-1,1]
                chunk = HostFrames(to_uint8(rgb)[0].permute(1, 2, 3, 0), to_uint8(alpha)[0, 0])  # (t,H,W,3), (t,H,W)
                if pending is not None:
                    writer.add(*pending.arrays())
                pending = chunk
            if pending is not None:
                writer.add(*pending.arrays())
            decoded = time.perf_counter()
            return writer.close(), decoded, following
        except BaseException:
            if following is not None:
                following.close()
            raise


class HostFrames:
    """A decoded chunk's uint8 frames on their way to host memory. On a GPU the copies go into pinned memory without
    waiting (queued behind the chunk's kernels), so the thread can launch the next chunk before it waits for them
    (`arrays`); elsewhere the frames are host memory already. Fresh buffers per chunk: the writers may still hold the
    previous ones."""

    def __init__(self, *frames: torch.Tensor) -> None:
        self.done = None
        if frames[0].is_cuda:
            self.host = [torch.empty(f.shape, dtype=f.dtype, pin_memory=True) for f in frames]
            for host, frame in zip(self.host, frames, strict=True):
                host.copy_(frame, non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record(torch.cuda.current_stream(frames[0].device))
        else:
            self.host = [f.contiguous() for f in frames]

    def arrays(self) -> list:
        """The frames as numpy arrays, once their copies are done."""
        if self.done is not None:
            self.done.synchronize()
        return [host.numpy() for host in self.host]


OUTPUTS = Path("outputs")  # where runs without --output-dir go: outputs/<date>-<n>/


def fresh_folder(root: Path = OUTPUTS) -> Path:
    """A new folder root/<YYYY-MM-DD>-<NNN> (the next free number), created exclusively: two runs never share one."""
    day = time.strftime("%Y-%m-%d")
    root.mkdir(parents=True, exist_ok=True)
    taken = [int(p.name.rsplit("-", 1)[1]) for p in root.glob(f"{day}-[0-9][0-9][0-9]") if p.name[11:].isdigit()]
    n = max(taken, default=0) + 1
    while True:
        folder = root / f"{day}-{n:03d}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            n += 1


def earlier_outputs(out: Path, prefix: str) -> list[Path]:
    """What an earlier run wrote in `out` under this prefix — exactly the names ClipWriter writes ({prefix}_rgb.mp4,
    {prefix}_003_rgba_frames/, {prefix}.webm, …), nothing else of the folder — and the folder's generation.json."""
    import re

    from wanalpha.outputs import FORMAT_SUFFIX

    if not out.is_dir():
        return []
    kinds = ["_rgb.mp4", "_alpha.mp4", "_composite.mp4", "_rgba_frames", *FORMAT_SUFFIX.values()]
    ours = re.compile(rf"^{re.escape(prefix)}(_\d{{3}})?({'|'.join(map(re.escape, kinds))})$")
    found = [p for p in out.iterdir() if ours.match(p.name)]
    return sorted(found + ([out / "generation.json"] if (out / "generation.json").is_file() else []))


def output_folder(config: GenerateConfig, parallel=None) -> Path:
    """Where this run writes: --output-dir (refused when an earlier run's outputs are there, unless --overwrite, which
    removes them first so no old frame stays among the new), or a fresh outputs/<date>-<n>/ chosen once by process 0
    and shared with every process."""
    import shutil

    main = parallel is None or parallel.rank == 0
    if config.output_dir is None:
        folder = str(fresh_folder()) if main else None
        return Path(parallel.shared(folder) if parallel is not None else folder)
    out = Path(config.output_dir)
    earlier = earlier_outputs(out, config.output_prefix)
    if earlier and not config.overwrite:
        shown = ", ".join(p.name for p in earlier[:3]) + (", …" if len(earlier) > 3 else "")
        raise WanAlphaError(
            f"{out} already holds an earlier run's outputs ({shown}); pass --overwrite to replace "
            f"them, or leave --output-dir out for a fresh folder under {OUTPUTS}/"
        )
    if earlier and main:  # generation.json is replaced when this run ends
        for path in earlier:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.name != "generation.json":
                path.unlink()
    return out


@dataclass
class Plan:
    """What one generate run works on, decided before any weights load: the prompts, the weight files, the device
    and process group, the output folder (checked first: an unusable one fails before the long work), the seeds and
    the negative prompt (None without guidance)."""

    prompts: list[str]
    inputs: dict
    parallel: object | None
    device: torch.device
    out: Path
    seed: int
    seeds: list[int]
    negative_text: str | None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def main(self) -> bool:
        return self.parallel is None or self.parallel.rank == 0


def plan(config: GenerateConfig) -> Plan:
    from wanalpha.parallel import from_environment
    from wanalpha.runtime import default_device

    prompts = _prompts(config)
    inputs = resolve_inputs(config)
    parallel = from_environment()
    device = default_device()
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    fa4.kernel(config.attention, device, torch.bfloat16)  # --attention fa4 where it cannot run: fail before loading
    if config.dit_dtype == "fp8":  # likewise a device without float8
        from wanalpha.fp8 import check_device

        check_device(device)
    out = output_folder(config, parallel)
    if parallel is not None:  # a file chosen by looking at the disk (the newest DoRA): process 0's choice for all
        inputs["dora"] = parallel.shared(inputs["dora"])
    seed = draw_seed(config, parallel)
    negative = negative_prompt(config) if config.cfg_scale != 1.0 else None
    return Plan(prompts, inputs, parallel, device, out, seed, prompt_seeds(config, seed, len(prompts)), negative)


@dataclass
class Sampler:
    """The models loaded once for sampling: the DiT ready to run (adapters merged, on its device or streamed, its
    runtime applied), the encoded prompts and negative prompt, and what the run records about them."""

    dit: torch.nn.Module
    streamer: BlockStreamer | None
    contexts: list[torch.Tensor]
    negative: torch.Tensor | None
    attention_kernel: str
    loras: list[dict]


def load(config: GenerateConfig, run: Plan, console: Console) -> Sampler:
    """The weights are read on a helper thread (`read_models`) while this thread, the one that then samples and
    decodes, prepares the GPU kernels and plans they will use (kernel_preparation: PyTorch keeps cuDNN's plans and
    cuBLAS's handles per thread, so a helper thread's preparation would not serve this thread's first step and
    decode); the helper puts nothing on the GPU before the preparation's timing runs are done. A failed read ends the
    preparation after its current step and its error is raised here; a failure or Ctrl-C here stops the read at its
    next DiT tensor (or once UMT5's file, read whole, is in) and waits for it, so no GPU work outlives the error. Off
    CUDA there is nothing to prepare: the weights are read on this thread."""
    from wanalpha.background import Background
    from wanalpha.checkpoints.wan import read_dit_config

    device, inputs = run.device, run.inputs
    compute = torch.bfloat16 if device.type == "cuda" else dit_weights_dtype(config.dit_dtype)
    dit_config = read_dit_config(inputs["dit"])  # the tokenizer's text_len; the kernels' shapes
    kernel = fa4.kernel(config.attention, device, compute, dit_config.head_dim)
    texts = run.prompts + ([run.negative_text] if run.negative_text is not None else [])
    prepare = kernel_preparation(dit_config, kernel, config, device, run.parallel, text_batch=len(texts))
    if prepare is None:
        return read_models(config, run, console, dit_config, texts)
    alone = threading.Event()  # set: the preparation no longer needs the GPU to itself
    reading = Background(
        lambda: read_models(config, run, console, dit_config, texts, alone), device, "read weights", quiet=not run.main
    )
    try:
        try:
            prepare(reading.failed, alone)
        finally:
            alone.set()
        return reading.result()
    except BaseException:
        reading.stop()
        raise


def read_models(
    config: GenerateConfig,
    run: Plan,
    console: Console,
    dit_config,
    texts: list[str],
    gpu_free: threading.Event | None = None,
) -> Sampler:
    """UMT5's file is read (a mapped .pth read ahead into the page cache), then (once `gpu_free` is set, where given:
    kernel_preparation's timing runs are done) UMT5 encodes `texts` on the GPU (the prompts, then the negative prompt
    where there is guidance) and leaves it; the DiT loads, the DoRA and LoRAs merge into its weights, it moves to the
    GPU (or is streamed with --offload) and its runtime is applied once. Stops at a `background.checkpoint()` between
    these steps and between the DiT's tensors when its caller asks (load)."""
    from wanalpha.background import checkpoint, moved
    from wanalpha.checkpoints.io import read_ahead
    from wanalpha.checkpoints.wan import load_dit, load_t5
    from wanalpha.models.t5 import T5Tokenizer, TextEncoder
    from wanalpha.runtime import DiTRuntime, apply_dit_runtime

    device, inputs = run.device, run.inputs
    dtype = dit_weights_dtype(config.dit_dtype)
    compute = torch.bfloat16 if device.type == "cuda" else dtype  # sampling: bf16 autocast on CUDA
    start = time.perf_counter()
    with status(console, "encoding prompts with UMT5"):
        t5 = load_t5(inputs["t5"])  # on the host (a .pth mapped: read when its tensors are first touched)
        checkpoint()
        if gpu_free is not None:
            waited = time.perf_counter()
            read_ahead(inputs["t5"], stop=gpu_free)  # into the page cache while the GPU is being prepared
            gpu_free.wait()
            run.timings["preparation_wait_s"] = time.perf_counter() - waited  # not the encoder's time
            start += run.timings["preparation_wait_s"]
            checkpoint()
        if not config.offload:
            t5 = moved(t5, device)
        text = TextEncoder(t5, T5Tokenizer(inputs["tokenizer"], text_len=dit_config.text_len))
        with BlockStreamer(t5, device) if config.offload else contextlib.nullcontext():
            contexts = text(texts)
        negative = contexts.pop() if run.negative_text is not None else None
        del t5, text  # T5 leaves the GPU before the DiT arrives
        _free(device)
    run.timings["text_encoder_s"] = time.perf_counter() - start
    checkpoint()

    start = time.perf_counter()
    with status(console, "loading the DiT, merging adapters"):
        updates, loras = adapter_updates(config, inputs, dit_config, dtype, console)
        # FP8: each weight merged, then quantised, as it is read, where it will run (no bf16 copy of the whole DiT
        # anywhere); bf16/fp32: loaded and merged on the CPU, as always, then moved.
        fp8 = config.dit_dtype == "fp8"
        where = device if fp8 and not config.offload else "cpu"
        dit = load_dit(inputs["dit"], config=dit_config, device=where, dtype=dtype, fp8=fp8, updates=updates)
        checkpoint()
        streamer = BlockStreamer(dit, device) if config.offload else None
        if streamer is None:
            dit = moved(dit, device)
        if config.compile and run.parallel is not None:
            raise WanAlphaError("--compile is not supported in sequence-parallel launches; drop --compile")
        runtime = DiTRuntime(
            attention=config.attention,
            rope_precision=config.rope_precision,
            compile=config.compile,
            sequence_parallel=run.parallel,
        )
        try:
            kernel = apply_dit_runtime(dit, runtime, device, compute)
        except ValueError as err:  # sequence parallelism over a process count that does not divide the heads
            raise WanAlphaError(f"{err}; launch another number of processes") from None
    run.timings["dit_load_s"] = time.perf_counter() - start
    contexts = [c.to(device) for c in contexts]
    negative = negative.to(device) if negative is not None else None
    return Sampler(dit, streamer, contexts, negative, kernel, loras)


def adapter_updates(config: GenerateConfig, inputs: dict, dit_config, dtype: torch.dtype, console: Console):
    """The DoRA's and then each LoRA's changes to the DiT's weights (adapters.dora_updates / lora_updates), checked
    against a DiT of this config on the meta device before any weight is read; load_dit applies them to each tensor
    as it streams in (before FP8 quantisation). Returns (updates, the LoRAs' records for generation.json)."""
    from wanalpha import adapters
    from wanalpha.models.dit import WanDiT

    with torch.device("meta"):
        skeleton = WanDiT(dit_config).to(dtype)
    updates = []
    if inputs["dora"] is not None:
        updates += adapters.dora_updates(skeleton, str(inputs["dora"]), scale=config.dora_scale)
    loras = []
    for path, scale in inputs["loras"]:
        found, match = adapters.lora_updates(skeleton, str(path), scale=scale)
        updates += found
        loras.append({"path": str(path), "scale": scale, "applied": match.applied, "entries": match.entries})
        console.print(f"LoRA {path.name}: {match.applied} of its {match.entries} tensors applied", markup=False)
    return updates, loras


def noise_mask(config: GenerateConfig, console: Console) -> tuple[torch.Tensor | None, str | None]:
    """Wan-Alpha v2's Gaussian mask for the noise shift (a file, an alpha video or an ellipse), or none."""
    from wanalpha.masks import make_mask

    mask, source = make_mask(
        config.num_frames,
        config.height,
        config.width,
        mask_file=config.gauss_mask,
        alpha_video=config.mask_alpha_video,
        shift=config.mask_shift,
        ellipse=config.mask_ellipse,
        ellipse_end=config.mask_ellipse_end,
    )
    if mask is None and "alpha_shift_mean" in config.model_fields_set:
        console.print(
            "[yellow]note:[/] no mask given (--gauss-mask, --mask-alpha-video or --mask-ellipse): the "
            "noise mean shift is off"
        )
    return mask, source


def write(config: GenerateConfig, run: Plan, latents: list[torch.Tensor], console: Console, ahead=None) -> list[Path]:
    """The decoders (loaded now: the DiT has left the GPU) decode each latent chunk by chunk while its files are
    written (decode_and_write; `ahead`: the first clip's writer process, started while sampling)."""
    from wanalpha.checkpoints.vae import load_rgba_vae
    from wanalpha.runtime import GPU_LAYOUT, apply_vae_runtime

    start = time.perf_counter()
    with status(console, "decoding RGB and alpha, writing the files"):
        vae_dtype = torch.bfloat16 if config.vae_dtype == "bf16" else torch.float32
        vae = load_rgba_vae(
            run.inputs["vae"], run.inputs["decoder_lora"], device=run.device, dtype=vae_dtype, with_encoder=False
        )
        apply_vae_runtime(vae, GPU_LAYOUT)  # on CUDA: channels-last convolutions, fused norms; a third faster
        vae.rgb_decoder.decode_chunk = vae.alpha_decoder.decode_chunk = config.vae_decode_chunk
        run.timings["decoder_load_s"] = time.perf_counter() - start
        run.out.mkdir(parents=True, exist_ok=True)
        prefix = config.output_prefix
        stems = [run.out / (prefix if len(latents) == 1 else f"{prefix}_{p:03d}") for p in range(len(latents))]
        files, stage_timings = decode_and_write(
            vae, latents, stems, config.fps, list(config.formats), config.vae_tile_size, ahead=ahead
        )
        run.timings |= stage_timings
    return files


def write_records(
    config: GenerateConfig, run: Plan, sampler: Sampler, mask_source: str | None, mask_used: bool, files: list[Path]
) -> None:
    """generation.json (everything needed to reproduce and score the run: eval reads it), config.yaml and
    provenance.json."""
    from wanalpha.checkpoints.provenance import write_provenance

    inputs = run.inputs
    record = {
        "config": json.loads(config.model_dump_json()),
        "seed": run.seed,
        "prompts": run.prompts,
        "seeds": run.seeds,  # prompt i's noise seed
        "negative_prompt": run.negative_text,
        "inputs": {k: [str(p) for p in v] if isinstance(v, list) else str(v) for k, v in inputs.items()},
        "latent_shape": list(latent_shape(config)),
        "mask": {"source": mask_source, "alpha_shift_mean": config.alpha_shift_mean if mask_used else 0.0},
        "device": str(run.device),
        "output_dir": str(run.out),
        "sequence_parallel": run.parallel.world if run.parallel is not None else 1,
        "loras": sampler.loras,
        "self_attention_kernel": sampler.attention_kernel,
        "timings": run.timings,
        "files": [str(f) for f in files],
    }
    atomic_write_text(run.out / "generation.json", json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(run.out / "config.yaml", config.to_yaml())
    weights = {
        "dit_shard_0": Path(inputs["dit"][0]),
        "t5": inputs["t5"],
        "vae": inputs["vae"],
        "decoder_lora": inputs["decoder_lora"],
    }
    if inputs["dora"] is not None:
        weights["dora"] = Path(inputs["dora"])
    write_provenance(run.out, "generate", weights, extra={"seed": run.seed})


def run(config: GenerateConfig) -> list[Path]:
    """Load once, sample each prompt, write: plan → load → sample_latents → write (process 0) → records."""
    from wanalpha.fp8 import gemm_settings

    with gemm_settings(fast_accum=config.fp8_accumulation == "fast"):
        return _run(config)


def _run(config: GenerateConfig) -> list[Path]:
    planned = plan(config)
    console = Console(stderr=True, highlight=False, quiet=not planned.main)
    sampler = load(config, planned, console)
    mask, mask_source = noise_mask(config, console)
    # process 0's first clip's writer process starts now, its interpreter's start hidden behind the sampling
    ahead = writer_ahead(planned.device) if planned.main else None
    with ahead or contextlib.nullcontext():  # ended here if the run fails before its files
        start = time.perf_counter()
        with sampler.streamer or contextlib.nullcontext():
            latents = sample_latents(
                sampler.dit, sampler.contexts, sampler.negative, config, planned.seeds, planned.device, console, mask
            )
        planned.timings["sampling_s"] = time.perf_counter() - start
        sampler.dit = sampler.streamer = None  # the DiT leaves the GPU before the decoders arrive
        _free(planned.device)
        if not planned.main:  # every process holds the same latents; process 0 decodes and writes
            return []
        files = write(config, planned, latents, console, ahead)
    write_records(config, planned, sampler, mask_source, mask is not None, files)
    kinds = ", ".join(sorted({f.suffix.lstrip(".") for f in files if f.is_file()}))
    done = f"generate: {len(latents)} video(s), seed {planned.seed}, in {planned.out} ({kinds})"
    Console(highlight=False).print(done)
    return files
