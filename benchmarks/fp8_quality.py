"""FP8's quality gate on real generations (issue #29): the same prompts, seeds and settings generated with the DiT in a
reference dtype and with `--dit-dtype fp8` (FP8 weights), `--attention fa3-fp8` (FP8 attention) or both (`--fp8`),
then compared clip by clip (PSNR of the RGBA frames and of the alpha), scored side by side by `wanalpha eval`, and
measured by the demo's colour/shape/opacity measures (wanalpha.demo_measures).

    python benchmarks/fp8_quality.py --generate-config wanalpha-demo/generate/config.yaml --out fp8q
    python benchmarks/fp8_quality.py --generate-config CFG --prompts prompts.txt --reference-dtype bf16 --out fp8q
    python benchmarks/fp8_quality.py --generate-config CFG --fp8 attention --out fp8a

FP8 attention is FlashAttention-3's FP8 forward where it runs (a Hopper GPU with the package built for the model's
head size); elsewhere (the CPU) generate runs with wanalpha.models.fa3.attention_fp8_reference in its place, the
kernel's arithmetic in PyTorch (the report says which).

`--generate-config` is a generate run's config.yaml (e.g. the demo's: its base, DoRA, merge-free decoders, size,
steps and guidance); its prompt and output folder are replaced. `--prompts` (one per line) defaults to the 12 fixed
colour/shape prompts of scripts/demo_quality.py in the "transparent background" form. The reference dtype is fp32 on
the CPU (where bf16 matmuls are slow and FP8 runs weight-only) and bf16 on a GPU. Writes `<out>/report.json`
(and eval's report.html under `<out>/ev`), prints the table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))


def default_prompts() -> list[str]:
    """demo_quality's 12 colour/shape prompts, "transparent background" form."""
    from demo_quality import PROMPT_SET, prompt

    return [prompt(colour, shape, edge, i) for i, (colour, shape, edge) in enumerate(PROMPT_SET)]


# `python -c` program for a generate run with FP8 attention emulated (no FlashAttention-3 here): the kernel's
# arithmetic (fa3.attention_fp8_reference) in its place, and the choice allowed off Hopper; then the CLI as usual.
EMULATED = (
    "import sys; from wanalpha.models import fa3; "
    "fa3.unsupported = lambda *args, **kwargs: None; fa3.attention_fp8 = fa3.attention_fp8_reference; "
    "from wanalpha.cli import main; sys.argv[0] = 'wanalpha'; main()"
)


def generate(config: Path, prompts: Path, out: Path, dtype: str, attention: str | None, emulate: bool) -> None:
    program = ["-c", EMULATED] if emulate and attention == "fa3-fp8" else ["-m", "wanalpha"]
    subprocess.run(
        [
            sys.executable,
            *program,
            "generate",
            "--config",
            str(config),
            "--prompt_file",
            str(prompts),
            "--output_dir",
            str(out),
            "--dit_dtype",
            dtype,
            "--formats",
            "",
            "--overwrite",
            *(["--attention", attention] if attention else []),
        ],
        check=True,
    )


def clips_of(folder: Path) -> list[np.ndarray]:
    """A generate run's clips, (T, H, W, 4) uint8 RGBA each, in prompt order (eval's readers)."""
    from wanalpha.eval import clip_stems, read_clip, read_generation

    clips = [read_clip(stem) for stem in clip_stems(folder, read_generation(folder))]
    return [np.concatenate([rgb, alpha[..., None]], axis=-1) for rgb, alpha in clips]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    from wanalpha.metrics import _psnr

    return _psnr(float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generate-config", type=Path, required=True, help="a generate run's config.yaml")
    parser.add_argument("--prompts", type=Path, default=None, help="one prompt per line (default: the 12 fixed ones)")
    parser.add_argument("--reference-dtype", choices=["fp32", "bf16"], default=None, help="default: fp32 on CPU")
    parser.add_argument(
        "--fp8", choices=["weights", "attention", "both"], default="weights", help="what the FP8 run quantises"
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    import torch

    from common import environment
    from wanalpha.demo_measures import measure, named, summarise

    reference = args.reference_dtype or ("bf16" if torch.cuda.is_available() else "fp32")
    args.out.mkdir(parents=True, exist_ok=True)
    prompts = args.prompts
    if prompts is None:
        prompts = args.out / "prompts.txt"
        prompts.write_text("\n".join(default_prompts()) + "\n")
    texts = [t.strip() for t in prompts.read_text().splitlines() if t.strip()]
    # The run's settings less its prompt and folder, which the prompts file and --out replace (a config naming a
    # prompt and a prompt file at once is refused by generate).
    import yaml

    settings = yaml.safe_load(args.generate_config.read_text())
    for key in ("prompt", "prompt_file", "output_dir"):
        settings.pop(key, None)
    config = args.out / "generate.yaml"
    config.write_text(yaml.safe_dump(settings, allow_unicode=True))
    runs = {dtype: args.out / dtype for dtype in (reference, "fp8")}
    emulate = not torch.cuda.is_available()  # FP8 attention: the kernel's arithmetic in PyTorch (see above)
    fp8_weights, fp8_attention = args.fp8 in ("weights", "both"), args.fp8 in ("attention", "both")
    generate(config, prompts, runs[reference], reference, None, emulate)
    fp8_run = ("fp8" if fp8_weights else reference, "fa3-fp8" if fp8_attention else None)
    generate(config, prompts, runs["fp8"], *fp8_run, emulate)
    clips = {dtype: clips_of(folder) for dtype, folder in runs.items()}
    rows = []
    for i, text in enumerate(texts):
        ref, q = clips[reference][i], clips["fp8"][i]
        rows.append({"prompt": text, "psnr_rgba_db": psnr(ref, q), "psnr_alpha_db": psnr(ref[..., 3], q[..., 3])})
    colour_shape = {}
    for dtype in runs:
        measured = [measure(c[..., :3], c[..., 3], *named(t)) for c, t in zip(clips[dtype], texts, strict=True)]
        colour_shape[dtype] = summarise(measured)
    scored = [str(folder) for folder in runs.values()]
    subprocess.run(
        [sys.executable, "-m", "wanalpha", "eval", *scored, "--no-clip", "--out", str(args.out / "ev")],
        check=True,
        capture_output=True,
    )
    metrics = json.loads((args.out / "ev" / "metrics.json").read_text())
    eval_means = {dtype: metrics["runs"][run]["mean"] for dtype, run in zip(runs, metrics["runs"], strict=True)}
    finite = [r["psnr_rgba_db"] for r in rows if np.isfinite(r["psnr_rgba_db"])]
    report = {
        **environment(),
        "reference_dtype": reference,
        "fp8": args.fp8,
        "fp8_attention": None if not fp8_attention else ("emulated" if emulate else "FlashAttention-3"),
        "generate_config": str(args.generate_config),
        "clips": rows,
        "psnr_rgba_db_mean": float(np.mean(finite)) if finite else float("inf"),
        "psnr_rgba_db_min": min(r["psnr_rgba_db"] for r in rows),
        "demo_measures": colour_shape,
        "eval_mean": eval_means,
    }
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    alpha = np.mean([r["psnr_alpha_db"] for r in rows])
    print(f"{len(rows)} clips, FP8 against {reference}: PSNR of the RGBA frames mean {report['psnr_rgba_db_mean']:.1f}")
    print(f"dB, min {report['psnr_rgba_db_min']:.1f} dB; alpha PSNR mean {alpha:.1f} dB")
    print(f"{'measure':28s}{reference:>12s}{'fp8':>12s}")
    for key in ("follows", "colour_ok", "shape_ok", "alpha_max", "interior_opaque", "haze"):
        print(f"{key:28s}{colour_shape[reference][key]:12.3f}{colour_shape['fp8'][key]:12.3f}")
    for key, value in eval_means[reference].items():
        print(f"{'eval ' + key:28s}{value:12.4g}{eval_means['fp8'][key]:12.4g}")


if __name__ == "__main__":
    main()
