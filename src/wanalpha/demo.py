"""`wanalpha demo`: the whole pipeline on the tiny base shipped inside the package, on a laptop CPU.

The base (`wanalpha/demo_base`, made by scripts/train_demo_base.py) plays the part of Wan2.1 + Wan-Alpha's
decoder.bin, in the same file formats: a Wan-architecture VAE, decoder LoRAs, a UMT5-architecture text encoder and
a text-to-video Wan DiT pretrained on synthetic RGB clips. The demo runs the real commands, in process, on a fresh
synthetic RGBA dataset: prepare → cache → train-merge → validate → cache (dit) → train-dit (DoRA) → generate, and
ends with a summary table and the paths worth opening.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from wanalpha.config import (
    CacheConfig,
    DemoConfig,
    EvalConfig,
    GenerateConfig,
    PrepareConfig,
    TrainDiTConfig,
    TrainMergeConfig,
    ValidateConfig,
)
from wanalpha.data.files import atomic_path
from wanalpha.data.video import write_image
from wanalpha.demo_measures import measure, named
from wanalpha.errors import WanAlphaError

SIZE = {"num_frames": 17, "height": 64, "width": 64}
# The tiny base's own stage-1 recipe, not the official one (docs/differences.md): clipping at 1 and no weight decay
# keep 160 updates at lr 1e-5 stable; the VGG16 perceptual term means nothing at 32x32 and would need a download.
TINY_MERGE_RECIPE = {"max_grad_norm": 1.0, "weight_decay": 0.0, "perceptual_weight": 0.0}

# The merge block works per latent cell, so stage 1 trains on the clips at half size (a quarter of the decoder work)
# and is validated at full size.
MERGE_SIZE = {"num_frames": 17, "height": 32, "width": 32}
COLOURS = [1, 2, 4, 7]  # blue, green, red, white backgrounds for the encoder (train-merge, train-dit)


@dataclass(frozen=True)
class Plan:
    clips: int
    merge_epochs: int
    dit_repeat: int
    dit_epochs: int
    sampling_steps: int
    dit_lr: float


# The full demo's DoRA: 960 updates at 5e-4, chosen on the 12 fixed colour/shape prompts of scripts/demo_quality.py
# (docs/demo.md: against 320 at 2e-3, the interior opaque share rose from 13 % to 49 %, haze fell from 6.5 to 3.0 and
# colours followed the prompt in 7 of 12 instead of 5); the quick demo keeps a short, fast-learning run.
PLANS = {"full": Plan(16, 10, 30, 2, 25, 5e-4), "quick": Plan(6, 2, 3, 1, 8, 2e-3)}


def base_files() -> dict[str, Path]:
    """The shipped base, laid out as the seed guide lays out the real files."""
    root = Path(str(resources.files("wanalpha") / "demo_base"))
    wan = root / "Wan2.1-T2V-demo"
    files = {
        "dit": wan,
        "t5": wan / "models_t5_umt5-xxl-enc-bf16.pth",
        "vae": wan / "Wan2.1_VAE.pth",
        "decoder_lora": root / "Wan-Alpha/vae/decoder.bin",
        "training": root / "training.json",
    }
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        raise WanAlphaError(f"the demo base is incomplete ({missing[0]} is missing); reinstall wanalpha")
    # A merge block trained along with the decoder LoRAs (train_demo_base.py --decoder-merge joint), where the base
    # has one: the decoders read opacity from the latent in its way, so the demo's train-merge starts there.
    merge = root / "Wan-Alpha/vae/feature_merge.safetensors"
    return files | ({"feature_merge": merge} if merge.is_file() else {})


def contact_sheet(clips: list[tuple[str, np.ndarray, np.ndarray]], path: Path, frames: int = 6, zoom: int = 3) -> None:
    """One row per clip: `frames` evenly spaced frames over a checkerboard, then the same frames' alpha."""
    import cv2

    from wanalpha.data.render import checkerboard

    rows = []
    for _, rgb, alpha in clips:
        picks = np.linspace(0, len(rgb) - 1, frames).round().astype(int)
        h, w = rgb.shape[1] * zoom, rgb.shape[2] * zoom
        board = ((checkerboard(h, w).permute(1, 2, 0).numpy() + 1) * 127.5)[..., :3]
        tiles, mattes = [], []
        for i in picks:
            colour = cv2.resize(rgb[i], (w, h), interpolation=cv2.INTER_NEAREST).astype(np.float32)
            a = cv2.resize(alpha[i], (w, h), interpolation=cv2.INTER_NEAREST).astype(np.float32)[..., None] / 255
            tiles.append((colour * a + board * (1 - a)).round().astype(np.uint8))
            mattes.append(np.repeat((a * 255).round().astype(np.uint8), 3, axis=2))
        gap = np.full((h, 4, 3), 255, np.uint8)
        rows.append(
            np.concatenate([x for t in tiles for x in (t, gap)] + [gap] + [x for m in mattes for x in (m, gap)], axis=1)
        )
    sheet = np.concatenate([x for r in rows for x in (r, np.full((4, r.shape[1], 3), 255, np.uint8))], axis=0)
    write_image(path, sheet)


def run(config: DemoConfig) -> dict:
    from wanalpha import cache, generate, prepare, train_dit, train_merge, validate
    from wanalpha import eval as evaluate

    console = Console(highlight=False)
    plan = PLANS["quick" if config.quick else "full"]
    base = base_files()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    stages: list[tuple[str, float, str, str]] = []
    size = SIZE

    def stage(name: str) -> None:
        console.rule(f"[bold]{name}")

    start = time.perf_counter()
    stage("prepare: synthetic RGBA clips → dataset")
    prepare.run(
        PrepareConfig(synthetic=plan.clips, output_dir=out / "raw", seed=config.seed, fps=16, **size), hint=False
    )
    prepare.run(PrepareConfig(source_dir=out / "raw", output_dir=out / "rgba_videos"))
    dataset = out / "rgba_videos"
    stages.append(
        ("prepare", time.perf_counter() - start, f"{plan.clips} clips, {size['num_frames']}×64×64", str(dataset))
    )

    start = time.perf_counter()
    stage("cache: frozen VAE encoder → latents")
    cache.run(
        CacheConfig(
            dataset_base_path=dataset,
            base_vae_path=base["vae"],
            output_dir=out / "cache_merge",
            colours=COLOURS,
            **MERGE_SIZE,
        ),
        hint=False,
    )
    stages.append(
        ("cache", time.perf_counter() - start, f"{plan.clips} × {len(COLOURS) + 1} encodes", str(out / "cache_merge"))
    )

    start = time.perf_counter()
    stage("train-merge: the FeatureMergeBlock (frozen encoder and decoder.bin decoders)")
    merge_out = out / "feature_merge"
    train_merge.run(
        TrainMergeConfig(
            cache_dir=out / "cache_merge",
            base_vae_path=base["vae"],
            vae_lora_path=base["decoder_lora"],
            output_path=merge_out,
            learning_rate=1e-5,
            merge_from=base.get("feature_merge"),
            num_epochs=plan.merge_epochs,
            num_workers=0,
            lr_warmup_steps=5,
            seed=config.seed,
            gradient_checkpointing=False,
            **MERGE_SIZE,
            **TINY_MERGE_RECIPE,
        )
    )
    merge_file = merge_out / f"feature_merge_epoch_{plan.merge_epochs - 1}.safetensors"
    stages.append(
        ("train-merge", time.perf_counter() - start, f"{plan.merge_epochs * plan.clips} updates", str(merge_file))
    )

    start = time.perf_counter()
    stage("validate: reconstruct clips through the RGB-alpha VAE")
    report = validate.run(
        ValidateConfig(
            dataset_base_path=dataset,
            base_vae_path=base["vae"],
            vae_lora_path=base["decoder_lora"],
            feature_merge_checkpoint=merge_file,
            output_prefix=str(out / "validate" / "val"),
            max_clips=plan.clips,
        )
    )
    mean = report["mean"]
    stages.append(
        (
            "validate",
            time.perf_counter() - start,
            f"MAE rgb {mean['rgb_weighted_mae']:.1f}, alpha {mean['alpha_mae']:.1f}, composite "
            f"{mean['composite_mae']:.1f}: {validate.verdict(mean)} (each < 20: the seed guide)",
            str(out / "validate"),
        )
    )

    start = time.perf_counter()
    stage("cache --stage dit: merged RGBA latents + text embeddings")
    cache.run(
        CacheConfig(
            stage="dit",
            dataset_base_path=dataset,
            base_vae_path=base["vae"],
            feature_merge_checkpoint=merge_file,
            t5_path=base["t5"],
            output_dir=out / "cache_dit",
            colours=COLOURS,
            colour_draw="step",
            **size,
        ),
        hint=False,
    )
    stages.append(("cache (dit)", time.perf_counter() - start, f"{plan.clips} clips", str(out / "cache_dit")))

    start = time.perf_counter()
    stage("train-dit: DoRA on the DiT over merged RGBA latents")
    dit_out = out / "dit_dora"
    train_dit.run(
        TrainDiTConfig(
            cache_dir=out / "cache_dit",
            dit_path=base["dit"],
            output_path=dit_out,
            dora_rank=16,
            learning_rate=plan.dit_lr,
            dataset_repeat=plan.dit_repeat,
            num_epochs=plan.dit_epochs,
            num_workers=0,
            dit_dtype="fp32",
            use_gradient_checkpointing=False,
            seed=config.seed,
            lr_warmup_steps=10,
            max_grad_norm=1.0,
            official_lr_start=False,
        )
    )
    dora = dit_out / f"epoch-{plan.dit_epochs - 1}.safetensors"
    rows = (dit_out / "loss_log.csv").read_text().splitlines()[1:]
    losses = [float(r.split(",")[3]) for r in rows]
    k = max(1, len(losses) // 5)
    stages.append(
        (
            "train-dit",
            time.perf_counter() - start,
            f"{len(losses)} updates, loss {np.mean(losses[:k]):.3f} → {np.mean(losses[-k:]):.3f} (mean "
            "of the first, last fifth)",
            str(dora),
        )
    )

    start = time.perf_counter()
    stage("generate: text → transparent video")
    prompts_file = out / "prompts.txt"
    prompts_file.write_text("\n".join(config.prompt) + "\n", encoding="utf-8")
    gen_out = out / "generate"
    files = generate.run(
        GenerateConfig(
            prompt_file=prompts_file,
            dit_path=base["dit"],
            t5_path=base["t5"],
            base_vae_path=base["vae"],
            vae_lora_path=base["decoder_lora"],
            dora=dora,
            empty_negative=True,
            per_prompt_seed=True,
            steps=plan.sampling_steps,
            cfg_scale=4.0,
            seed=config.seed,  # the base was trained against the empty text
            output_dir=gen_out,
            overwrite=True,  # the demo's own folder: a rerun replaces it
            formats=["webm"],
            dit_dtype="fp32",
            **size,
        )
    )
    clips = []  # generate lists each prompt's files in prompt order, its PNG-frame folder among them
    folders = [f for f in files if f.name.endswith("_rgba_frames")]
    for prompt, folder in zip(config.prompt, folders, strict=True):
        clips.append((prompt, *evaluate.read_clip(folder.with_name(folder.name.removesuffix("_rgba_frames")))))
    sheet = out / "contact_sheet.png"
    contact_sheet(clips, sheet)
    quality = [measure(rgb, alpha, *named(prompt)) for prompt, rgb, alpha in clips]
    what = f"{len(config.prompt)} videos, {plan.sampling_steps} steps: " + quality_line(quality)
    stages.append(("generate", time.perf_counter() - start, what, str(gen_out)))

    start = time.perf_counter()
    stage("eval: how good is the transparency? (no CLIP score: the demo downloads nothing)")
    scores = evaluate.run(EvalConfig(runs=[gen_out], out=out / "eval", clip=False))
    means = next(iter(scores["runs"].values()))["mean"]
    shown = ", ".join(
        f"{label} {_number(means[key])}"
        for label, key in (("haze", "background_haze"), ("flicker", "alpha_flicker"), ("soft edges", "edge_soft"))
    )
    report_page = out / "eval" / "report.html"
    stages.append(("eval", time.perf_counter() - start, shown, str(report_page)))

    table = Table(title="wanalpha demo" + (" (quick)" if config.quick else ""))
    for column in ("stage", "time", "key metric", "output"):
        table.add_column(column)
    for name, seconds, metric, path in stages:
        table.add_row(name, f"{seconds:.0f} s", metric, path)
    console.print(table)
    total = sum(s[1] for s in stages)
    composite, webm = (next(str(f) for f in files if f.name.endswith(end)) for end in ("_composite.mp4", ".webm"))
    paths = {
        "composite": composite,
        "webm": webm,
        "contact_sheet": str(sheet),  # the first prompt's
        "report": str(report_page),
    }
    console.print(f"total {total:.0f} s\ncomposite over a checkerboard: {paths['composite']}")
    console.print(f"transparent WebM (VP9 with alpha): {paths['webm']}\ncontact sheet: {paths['contact_sheet']}")
    console.print(f"eval report (open it in a browser): {paths['report']}")
    summary = {
        "quick": config.quick,
        "total_s": round(total, 1),
        "prompts": config.prompt,
        "paths": paths,
        "validate_mean": mean,
        "generated": quality,
        "stages": [{"stage": n, "s": round(t, 1), "metric": m, "output": p} for n, t, m, p in stages],
    }
    with atomic_path(out / "demo.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.3g}"


def quality_line(quality: list[dict]) -> str:
    """The generated clips' measures (wanalpha.demo_measures) in one line: the largest alpha, the share of the
    objects' interiors that is opaque (alpha ≥ 250), and how many show the colour and shape their prompt names."""
    line = (
        f"alpha max {max(q['alpha_max'] for q in quality)}, interior opaque "
        f"{np.mean([q['interior_opaque'] for q in quality]):.0%}"
    )
    judged = [q for q in quality if "follows" in q]
    if judged:
        line += f", colour and shape as prompted {sum(q['follows'] for q in judged)}/{len(judged)}"
    return line
