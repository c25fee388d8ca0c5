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
import json
import random
import sys
import threading
import time
from pathlib import Path

import torch
from rich.console import Console

from wanalpha.config import GenerateConfig
from wanalpha.data.files import atomic_write_text
from wanalpha.errors import WanAlphaError
from wanalpha.models import fa4
from wanalpha.offload import BlockStreamer
from wanalpha.progress import PlainProgress, status

WAN_FOLDER = Path("models/Wan-AI/Wan2.1-T2V-14B")  # where the seed guide puts things (`wanalpha download` too)
DECODER_LORA = Path("Wan-Alpha/vae/decoder.bin")
DORA_FOLDER = Path("models/train/Wan-Alpha-DiT-DoRA")
OFFICIAL_DORA = Path("Wan-Alpha/epoch-13-1500.safetensors")  # `wanalpha download wan-alpha-v1`; a trained one wins


def _newest_dora(folder: Path) -> Path | None:
    files = list(folder.glob("epoch-*.safetensors"))
    return max(files, key=lambda p: p.stat().st_mtime) if files else None


def resolve_inputs(cfg: GenerateConfig) -> dict:
    """Every file generate needs: flags first, then hub ids, then the seed guide's locations (where `wanalpha
    download wan2.1-t2v-14b wan-alpha-v1` puts the release); one error listing what is missing and where it was
    looked for."""
    from wanalpha.checkpoints.wan import wan_model_files

    paths = cfg.wan_files()
    if cfg.model_id_with_origin_paths is None and cfg.dit_path is None and cfg.t5_path is None:
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
    vae = cfg.base_vae_path or files.get("vae") or WAN_FOLDER / "Wan2.1_VAE.pth"
    if not Path(vae).is_file():
        missing.append(f"the VAE (--base-vae-path; looked for {vae})")
    lora = cfg.vae_lora_path or DECODER_LORA
    if not Path(lora).is_file():
        missing.append(f"the decoder LoRAs (--vae-lora-path; looked for {lora})")
    dora = cfg.dora if cfg.dora is not None else _newest_dora(DORA_FOLDER)
    if dora is None and OFFICIAL_DORA.is_file():
        dora = OFFICIAL_DORA
    if cfg.dora is not None and not Path(cfg.dora).is_file():
        missing.append(f"the DoRA file {cfg.dora}")
    if missing:
        hint = "; `wanalpha download wan2.1-t2v-14b wan-alpha-v1` puts the release files where generate looks"
        raise WanAlphaError("missing " + "; ".join(missing) + ("" if cfg.model_id_with_origin_paths else hint))
    loras = []
    for item in cfg.lora:
        path, sep, scale = item.rpartition(":")
        if not sep or not _is_float(scale):  # no scale given (or a ':' inside the path)
            path, scale = item, "1"
        if not Path(path).is_file():
            raise WanAlphaError(f"--lora {item}: file {path} does not exist")
        loras.append((Path(path), float(scale)))
    return {"dit": files["dit"], "t5": files["t5"], "tokenizer": files["tokenizer"], "vae": Path(vae),
            "decoder_lora": Path(lora), "dora": dora, "loras": loras}  # fmt: skip


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _prompts(cfg: GenerateConfig) -> list[str]:
    if cfg.prompt is not None:
        return [cfg.prompt]
    if not Path(cfg.prompt_file).is_file():
        raise WanAlphaError(f"--prompt-file {cfg.prompt_file} does not exist")
    try:
        text = Path(cfg.prompt_file).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise WanAlphaError(f"--prompt-file {cfg.prompt_file} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                            "save it as UTF-8") from None  # fmt: skip
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise WanAlphaError(f"--prompt-file {cfg.prompt_file} holds no prompt")
    return prompts


def draw_seed(cfg: GenerateConfig, parallel=None) -> int:
    """--seed, or a random one drawn as upstream (0 … sys.maxsize) by process 0 and shared with every process of a
    multi-process launch (each process samples its share of the same noise; official generate script, base_seed
    broadcast from rank 0)."""
    if cfg.seed >= 0:
        return cfg.seed
    seed = random.randint(0, sys.maxsize)
    return parallel.shared(seed) if parallel is not None else seed


def prompt_seeds(cfg: GenerateConfig, seed: int, count: int) -> list[int]:
    """The seed of each prompt's noise: the same seed for every prompt, as the official script; seed + i with
    --per-prompt-seed."""
    return [seed + i if cfg.per_prompt_seed else seed for i in range(count)]


def negative_prompt(cfg: GenerateConfig) -> str:
    """The negative prompt the guidance uses: --negative-prompt, where '' means the Wan config's default as in the
    official pipeline (text2video: `if n_prompt == "": n_prompt = self.sample_neg_prompt`); --empty-negative guides
    against the empty text instead."""
    from wanalpha.config import CONFIG_NEGATIVE_PROMPT

    if cfg.empty_negative:
        return ""
    return cfg.negative_prompt or CONFIG_NEGATIVE_PROMPT


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def kernel_preparation(dit_config, kernel: str, cfg: GenerateConfig, device: torch.device, parallel=None):
    """The work that prepares this run's GPU kernels ahead of their first use (runtime.prepare_dit_kernels: the fused
    kernels compiled, attention at its real shapes; the decoders' fused norms), as a callable that may run on another
    thread; None off CUDA. With --offload or sequence parallelism the attention shapes are left out (memory; the split
    shapes). A failure there is not fatal: a warning, and the work happens at the kernels' first use instead."""
    import warnings

    from wanalpha.models import kernels
    from wanalpha.models.rgba import RGBAlphaVAE
    from wanalpha.runtime import fused_norm_variants, prepare_dit_kernels

    if device.type != "cuda":
        return None
    batch = 2 if cfg.cfg_scale != 1.0 else 1
    vae_dtype = torch.bfloat16 if cfg.vae_dtype == "bf16" else torch.float32
    dit_dtype = torch.bfloat16 if cfg.dit_dtype == "bf16" else torch.float32
    with torch.device("meta"):  # the decoders' norms, without their weights (here: the default device is global)
        norms = fused_norm_variants(RGBAlphaVAE(with_encoder=False))

    def work() -> None:
        for what, prepare in (
            ("the DiT's", lambda: prepare_dit_kernels(dit_config, kernel, device, latent_shape(cfg), batch, dit_dtype,
                                                      torch.bfloat16, cfg.rope_precision,
                                                      attention_shapes=not cfg.offload and parallel is None)),
            ("the decoders'", lambda: kernels.warm_up_rms_norms(device, vae_dtype, norms)),
        ):  # fmt: skip
            try:
                prepare()
            except Exception as error:  # noqa: BLE001 - not fatal: the first use does it instead
                warnings.warn(f"preparing {what} GPU kernels ahead failed ({type(error).__name__}: {error}); "
                              "they are prepared at their first use", stacklevel=1)  # fmt: skip

    return work


def latent_shape(cfg: GenerateConfig) -> tuple[int, ...]:
    return (1, 16, (cfg.num_frames - 1) // 4 + 1, cfg.height // 8, cfg.width // 8)


def sample_latents(
    dit,
    contexts: list[torch.Tensor],
    negative: torch.Tensor | None,
    cfg: GenerateConfig,
    seeds: list[int],
    device,
    console,
    mask: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """One latent per prompt: float32 noise from the prompt's seed (`prompt_seeds`), shifted once outside the v2
    Gaussian mask when one is given, integrated by the chosen sampler, with classifier-free guidance as one batched
    forward of the conditional and the negative prompt (none at cfg 1)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from wanalpha import flow
    from wanalpha.masks import shift_noise

    dtype = next(dit.parameters()).dtype

    def model(x: torch.Tensor, t: torch.Tensor, contexts: list[torch.Tensor]) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return dit(x.to(dtype), t, contexts).float()

    latents = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.speed} it/s"),
               TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, console=console, transient=True) as progress:
        for p, context in enumerate(contexts):
            task = progress.add_task(f"sampling {p + 1}/{len(contexts)}", total=cfg.steps)
            generator = torch.Generator(device=device).manual_seed(seeds[p])
            noise = torch.randn(latent_shape(cfg), generator=generator, device=device, dtype=torch.float32)
            if mask is not None and cfg.alpha_shift_mean > 0:  # Wan-Alpha v2: once, before sampling
                noise = shift_noise(noise, mask.to(device), cfg.alpha_shift_mean)

            velocity = flow.guided_velocity(model, context, negative, cfg.cfg_scale)
            plain = PlainProgress(console, f"generate: sampling {p + 1}/{len(contexts)}", cfg.steps)

            def advance(i: int, task=task, plain=plain) -> None:
                progress.advance(task)
                plain.update(i + 1)

            latents.append(flow.sample(velocity, noise, cfg.steps, cfg.shift, cfg.sampler, progress=advance))
    return latents


@torch.no_grad()
def decode_and_write(vae, latents: list[torch.Tensor], stems: list[Path], fps: float, formats: list[str],
                     tile_size: int | None = None) -> tuple[list[Path], dict[str, float]]:  # fmt: skip
    """Both decoders, chunk by chunk, → uint8 frames (truncated like the official renderer) → every output file of
    each latent (wanalpha.outputs.ClipWriter), written while the following chunks decode; each clip's files are
    finished before the next clip decodes (an error later keeps them). Returns the files and the timings: decode_s
    while the chunks decode, write_s for the writers to finish after each clip's last chunk."""
    from wanalpha.data.render import to_uint8
    from wanalpha.outputs import ClipWriter

    tiles = (tile_size, tile_size) if tile_size else None
    files: list[Path] = []
    timings = {"decode_s": 0.0, "write_s": 0.0}
    for z, stem in zip(latents, stems, strict=True):
        start = time.perf_counter()
        with ClipWriter(stem, fps, formats) as writer:
            for rgb, alpha in vae.decode_frames(z, tile_size=tiles):  # float32 in [-1,1]
                rgb = to_uint8(rgb)[0].permute(1, 2, 3, 0).contiguous().cpu().numpy()  # (t,H,W,3)
                writer.add(rgb, to_uint8(alpha)[0, 0].cpu().numpy())
            decoded = time.perf_counter()
            files += writer.close()
        timings["decode_s"] += decoded - start
        timings["write_s"] += time.perf_counter() - decoded
    return files, timings


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


def output_folder(cfg: GenerateConfig, parallel=None) -> Path:
    """Where this run writes: --output-dir (refused when an earlier run's outputs are there, unless --overwrite, which
    removes them first so no old frame stays among the new), or a fresh outputs/<date>-<n>/ chosen once by process 0
    and shared with every process."""
    import shutil

    main = parallel is None or parallel.rank == 0
    if cfg.output_dir is None:
        folder = str(fresh_folder()) if main else None
        return Path(parallel.shared(folder) if parallel is not None else folder)
    out = Path(cfg.output_dir)
    earlier = earlier_outputs(out, cfg.output_prefix)
    if earlier and not cfg.overwrite:
        shown = ", ".join(p.name for p in earlier[:3]) + (", …" if len(earlier) > 3 else "")
        raise WanAlphaError(f"{out} already holds an earlier run's outputs ({shown}); pass --overwrite to replace "
                            f"them, or leave --output-dir out for a fresh folder under {OUTPUTS}/")  # fmt: skip
    if earlier and main:  # generation.json is replaced when this run ends
        for path in earlier:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.name != "generation.json":
                path.unlink()
    return out


def run(cfg: GenerateConfig) -> list[Path]:
    from wanalpha import adapters
    from wanalpha.checkpoints.vae import load_rgba_vae
    from wanalpha.checkpoints.wan import load_dit, load_t5
    from wanalpha.models.t5 import T5Tokenizer, TextEncoder
    from wanalpha.parallel import from_environment
    from wanalpha.runtime import GPU_LAYOUT, DiTRuntime, apply_dit_runtime, apply_vae_runtime, default_device

    prompts = _prompts(cfg)
    inputs = resolve_inputs(cfg)
    parallel = from_environment()
    main = parallel is None or parallel.rank == 0
    console = Console(stderr=True, highlight=False, quiet=not main)
    device = default_device()
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    fa4.kernel(cfg.attention, device, torch.bfloat16)  # --attention fa4 where it cannot run: fail before loading
    out = output_folder(cfg, parallel)  # before the long work: a folder that cannot be used fails now
    if parallel is not None:  # a file chosen by looking at the disk (the newest DoRA): process 0's choice for all
        inputs["dora"] = parallel.shared(inputs["dora"])
    seed = draw_seed(cfg, parallel)
    seeds = prompt_seeds(cfg, seed, len(prompts))
    negative_text = negative_prompt(cfg)
    timings: dict[str, float] = {}
    guided = cfg.cfg_scale != 1.0

    start = time.perf_counter()
    with status(console, "encoding prompts with UMT5"):
        t5 = load_t5(inputs["t5"], device="cpu" if cfg.offload else device)
        t5_streamer = BlockStreamer(t5, device) if cfg.offload else contextlib.nullcontext()
        dtype = torch.bfloat16 if cfg.dit_dtype == "bf16" else torch.float32
        dit = load_dit(inputs["dit"], device="cpu", dtype=dtype)  # the config tells the tokenizer its text_len
        # Sampling computes in bf16 under autocast on CUDA, in the weights' dtype elsewhere.
        compute = torch.bfloat16 if device.type == "cuda" else dtype
        attention_kernel = fa4.kernel(cfg.attention, device, compute, dit.config.head_dim)
        prepare = kernel_preparation(dit.config, attention_kernel, cfg, device, parallel)  # a thread beside T5
        warm_up = threading.Thread(target=prepare, name="prepare kernels", daemon=True) if prepare else None
        if warm_up is not None:
            warm_up.start()
        text = TextEncoder(t5, T5Tokenizer(inputs["tokenizer"], text_len=dit.config.text_len))
        with t5_streamer:
            contexts = text(prompts + ([negative_text] if guided else []))
        negative = contexts.pop() if guided else None
        del t5, text  # T5 leaves the GPU before the DiT arrives
        _free(device)
    timings["text_encoder_s"] = time.perf_counter() - start

    start = time.perf_counter()
    with status(console, "preparing the DiT (merging adapters)"):
        if inputs["dora"] is not None:
            adapters.merge_dora(dit, str(inputs["dora"]), scale=cfg.dora_scale)
        loras = []
        for path, scale in inputs["loras"]:
            match = adapters.merge_lora(dit, str(path), scale=scale)
            loras.append({"path": str(path), "scale": scale, "applied": match.applied, "entries": match.entries})
            console.print(f"LoRA {path.name}: {match.applied} of its {match.entries} tensors applied", markup=False)
        streamer = BlockStreamer(dit, device) if cfg.offload else None
        if streamer is None:
            dit = dit.to(device)
        if cfg.compile and parallel is not None:
            raise WanAlphaError("--compile is not supported in sequence-parallel launches; drop --compile")
        runtime = DiTRuntime(attention=cfg.attention, rope_precision=cfg.rope_precision, compile=cfg.compile,
                             sequence_parallel=parallel)  # fmt: skip
        try:
            attention_kernel = apply_dit_runtime(dit, runtime, device, compute)
        except ValueError as err:  # sequence parallelism over a process count that does not divide the heads
            raise WanAlphaError(f"{err}; launch another number of processes") from None
    timings["dit_load_s"] = time.perf_counter() - start

    from wanalpha.masks import make_mask

    mask, mask_source = make_mask(cfg.num_frames, cfg.height, cfg.width, mask_file=cfg.gauss_mask,
                                  alpha_video=cfg.mask_alpha_video, shift=cfg.mask_shift, ellipse=cfg.mask_ellipse,
                                  ellipse_end=cfg.mask_ellipse_end)  # fmt: skip
    if mask is None and "alpha_shift_mean" in cfg.model_fields_set:
        console.print("[yellow]note:[/] no mask given (--gauss-mask, --mask-alpha-video or --mask-ellipse): the "
                      "noise mean shift is off")  # fmt: skip
    if warm_up is not None:
        warm_up.join()
    start = time.perf_counter()
    contexts = [c.to(device) for c in contexts]
    negative = negative.to(device) if negative is not None else None
    with streamer or contextlib.nullcontext():
        latents = sample_latents(dit, contexts, negative, cfg, seeds, device, console, mask)
    timings["sampling_s"] = time.perf_counter() - start
    dit = None  # the DiT leaves the GPU before the decoders arrive
    _free(device)
    if not main:  # every process holds the same latents; process 0 decodes and writes
        return []

    start = time.perf_counter()
    with status(console, "decoding RGB and alpha, writing the files"):
        vae_dtype = torch.bfloat16 if cfg.vae_dtype == "bf16" else torch.float32
        vae = load_rgba_vae(inputs["vae"], inputs["decoder_lora"], device=device, dtype=vae_dtype, with_encoder=False)
        apply_vae_runtime(vae, GPU_LAYOUT)  # on CUDA: channels-last convolutions, fused norms; a third faster
        timings["decoder_load_s"] = time.perf_counter() - start
        out.mkdir(parents=True, exist_ok=True)
        single = len(latents) == 1
        stems = [out / (cfg.output_prefix if single else f"{cfg.output_prefix}_{p:03d}") for p in range(len(latents))]
        files, stage_timings = decode_and_write(vae, latents, stems, cfg.fps, list(cfg.formats), cfg.vae_tile_size)
        timings |= stage_timings
        del vae

    record = {
        "config": json.loads(cfg.model_dump_json()),
        "seed": seed,
        "prompts": prompts,
        "seeds": seeds,  # prompt i's noise seed
        "negative_prompt": negative_text if guided else None,
        "inputs": {k: [str(p) for p in v] if isinstance(v, list) else str(v) for k, v in inputs.items()},
        "latent_shape": list(latent_shape(cfg)),
        "mask": {"source": mask_source, "alpha_shift_mean": cfg.alpha_shift_mean if mask is not None else 0.0},
        "device": str(device),
        "output_dir": str(out),
        "sequence_parallel": parallel.world if parallel is not None else 1,
        "loras": loras,
        "self_attention_kernel": attention_kernel,
        "timings": timings,
        "files": [str(f) for f in files],
    }
    atomic_write_text(out / "generation.json", json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(out / "config.yaml", cfg.to_yaml())
    from wanalpha.checkpoints.provenance import write_provenance

    weights = {"dit_shard_0": Path(inputs["dit"][0]), "t5": inputs["t5"], "vae": inputs["vae"],
               "decoder_lora": inputs["decoder_lora"]}  # fmt: skip
    if inputs["dora"] is not None:
        weights["dora"] = Path(inputs["dora"])
    write_provenance(out, "generate", weights, extra={"seed": seed})
    kinds = ", ".join(sorted({f.suffix.lstrip(".") for f in files if f.is_file()}))
    Console(highlight=False).print(f"generate: {len(latents)} video(s), seed {seed}, in {out} ({kinds})")
    return files
