"""Where the demo loses opacity and colour: each stage of the demo's pipeline measured on its own (issue #26).

    python scripts/demo_quality.py vae                      # (a) the base VAE + decoder LoRAs, identity merge
    python scripts/demo_quality.py rgb                      # (c) the base DiT alone, RGB latents over plain colours
    python scripts/demo_quality.py rgba --dora D.safetensors --merge M.safetensors   # (d) after a DoRA
    python scripts/demo_quality.py outputs wanalpha-demo/generate --prompts wanalpha-demo/prompts.txt
    # (b) is validate's own report: wanalpha-demo/demo.json → validate_mean
    # every command: --base DIR (another demo base, e.g. a retrained one), --json FILE (write the numbers)

Measures (wanalpha.demo_measures): the share of prompts whose object shows the named colour and shape, the largest
alpha, the share of object-interior pixels at alpha ≥ 250, and the background haze (mean alpha away from the object).
The prompts are a fixed set in the caption grammar the base was trained on (wanalpha.data.synthetic): every colour
once and each shape four times, with sharp or soft edges (semi-transparent objects are never opaque), "transparent
background" for RGBA and "on a plain <colour> background" for the base DiT's RGB.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from wanalpha import threads  # noqa: E402

threads.configure()  # before torch loads: threads matched to the free cores (WANALPHA_THREADS wins)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from wanalpha.data.render import COLOUR_NAMES, composite, to_uint8  # noqa: E402
from wanalpha.data.synthetic import COLOURS, SHAPES, _caption, make_clip  # noqa: E402
from wanalpha.demo_measures import measure, named, summarise  # noqa: E402

DIRS = ("right", "up", "left", "down")
# (colour, shape, edge): every colour once, each shape four times, the demo's two prompts among them
PROMPT_SET = [(c, SHAPES[i % 3], ("hard", "soft")[i % 2]) for i, c in enumerate(COLOURS)] + [
    ("red", "circle", "hard"),
    ("yellow", "triangle", "soft"),
    ("blue", "square", "hard"),
]
# A plain background whose colour differs from the object's, for the RGB prompts (index into COLOUR_NAMES).
PLAIN = {"red": 1, "green": 4, "blue": 6, "yellow": 1, "orange": 1, "purple": 6, "cyan": 4, "magenta": 2, "white": 0}


def prompt(colour: str, shape: str, edge: str, i: int, background: str | None = None) -> str:
    layer = dict(colour=colour, shape=shape, edge=edge, direction=DIRS[i % 4], growing=i % 2 == 0)
    text = _caption([layer])
    return text if background is None else text.replace("transparent background", f"on a plain {background} background")


def base_files(root: Path | None) -> dict[str, Path]:
    from wanalpha.demo import base_files as shipped

    files = shipped()
    if root is None:
        return files
    wan = root / "Wan2.1-T2V-demo"
    return {
        "dit": wan,
        "t5": wan / "models_t5_umt5-xxl-enc-bf16.pth",
        "vae": wan / "Wan2.1_VAE.pth",
        "decoder_lora": root / "Wan-Alpha/vae/decoder.bin",
        "training": root / "training.json",
    }


def rgba_model(files: dict, merge: Path | None):
    from wanalpha.checkpoints.vae import load_rgba_vae

    model = load_rgba_vae(files["vae"], files["decoder_lora"], merge)
    if merge is None:
        model.merge.init_identity()
    return model


# ---------------------------------------------------------------------------------------------------- (a)
@torch.no_grad()
def stage_vae(args) -> dict:
    """Ground-truth clips (the demo's own seed 0, one opaque object each) over the demo's four encoder colours
    through encoder → merge (identity, or --merge) → both decoders."""
    from wanalpha.data.dataset import to_model_space

    files = base_files(args.base)
    model = rgba_model(files, args.merge)
    rows, kinds = [], {}
    for i in range(args.clips):
        clip = make_clip(np.random.default_rng([args.seed, i]), 17, 64, 64)
        words = clip.caption.split()
        kind = "semi" if "semi-transparent" in words[:3] else "sharp" if "sharp" in words else "soft"
        if "in front of" in clip.caption:
            kind += "+behind"
        rgb, alpha = to_model_space(torch.from_numpy(clip.rgb)[None], torch.from_numpy(clip.alpha)[None])
        for k in (1, 2, 4, 7):
            z = model.encode(composite(rgb, alpha, k, hard=True), alpha)
            pred_rgb, pred_alpha = model.decode(z)
            out_rgb = to_uint8(pred_rgb)[0].permute(1, 2, 3, 0).numpy()
            out_alpha = to_uint8(pred_alpha)[0, 0].numpy()
            gt_mask = clip.alpha == 255
            m = measure(out_rgb, out_alpha)
            m |= {
                "kind": kind,
                "background": COLOUR_NAMES[k],
                "alpha_mae": float(np.abs(out_alpha.astype(float) - clip.alpha).mean()),
                "alpha_in_gt_opaque": float(out_alpha[gt_mask].mean()) if gt_mask.any() else None,
                "gt_opaque_reached": float((out_alpha[gt_mask] >= 250).mean()) if gt_mask.any() else None,
                "alpha_on_gt_clear": float(out_alpha[clip.alpha == 0].mean()),
            }
            rows.append(m)
            kinds.setdefault(kind, []).append(m)
    by_kind = {}
    for kind, ms in sorted(kinds.items()):
        opaque = [m for m in ms if m["alpha_in_gt_opaque"] is not None]
        by_kind[kind] = {
            "n": len(ms),
            "alpha_mae": round(np.mean([m["alpha_mae"] for m in ms]), 2),
            "alpha_max": round(np.mean([m["alpha_max"] for m in ms]), 1),
            "alpha_in_gt_opaque": round(np.mean([m["alpha_in_gt_opaque"] for m in opaque]), 1) if opaque else None,
            "gt_opaque_reached": round(np.mean([m["gt_opaque_reached"] for m in opaque]), 3) if opaque else None,
            "alpha_on_gt_clear": round(np.mean([m["alpha_on_gt_clear"] for m in ms]), 2),
        }
    return {"stage": "vae", "merge": str(args.merge) if args.merge else "identity", "by_kind": by_kind}


# ---------------------------------------------------------------------------------------------------- (c), (d)
def load_dit_and_text(files: dict, dora: Path | None):
    from wanalpha import adapters
    from wanalpha.checkpoints.wan import load_dit, load_t5
    from wanalpha.models.t5 import T5Tokenizer

    dit = load_dit(files["dit"], dtype=torch.float32)
    if dora is not None:
        adapters.merge_dora(dit, str(dora))
    t5 = load_t5(files["t5"])
    tokenizer = T5Tokenizer(files["dit"] / "google" / "umt5-xxl", text_len=dit.config.text_len)
    return dit, t5, tokenizer


@torch.no_grad()
def sample(dit, t5, tokenizer, texts: list[str], args) -> list[torch.Tensor]:
    from rich.console import Console

    from wanalpha.config import GenerateConfig
    from wanalpha.generate import sample_latents
    from wanalpha.models.t5 import TextEncoder

    cfg = GenerateConfig(
        prompt="x", steps=args.steps, cfg_scale=args.cfg, shift=args.shift, num_frames=17, height=64, width=64
    )
    contexts = TextEncoder(t5, tokenizer)(texts + [""])
    negative = contexts.pop() if args.cfg != 1.0 else None
    seeds = [args.seed + i for i in range(len(texts))]
    return sample_latents(dit, contexts, negative, cfg, seeds, torch.device("cpu"), Console(quiet=True))


def _u8(rgb: torch.Tensor, alpha: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    return to_uint8(rgb)[0].permute(1, 2, 3, 0).numpy(), to_uint8(alpha)[0, 0].numpy()


@torch.no_grad()
def stage_rgb(args) -> dict:
    """The base DiT (no DoRA) on "… on a plain <colour> background" prompts; the latent through the base VAE's plain
    decoder (RGB; the object is where it differs from the background colour by more than 60 levels) and through
    the decoder LoRAs (identity merge: the alpha decoder reads the RGB latent, as the demo's merge block starts)."""
    from wanalpha.checkpoints.vae import load_wan_vae
    from wanalpha.data.render import BACKGROUND_COLOURS

    files = base_files(args.base)
    dit, t5, tokenizer = load_dit_and_text(files, None)
    vae = load_wan_vae(files["vae"])
    model = rgba_model(files, None)
    corners = ((BACKGROUND_COLOURS.numpy() + 1) * 127.5).astype(np.float32)
    texts = [prompt(c, s, e, i, COLOUR_NAMES[PLAIN[c]]) for i, (c, s, e) in enumerate(PROMPT_SET)]
    latents = sample(dit, t5, tokenizer, texts, args)
    rows, alpha_rows, sheet, sheet_lora = [], [], [], []
    for (c, s, _), text, z in zip(PROMPT_SET, texts, latents, strict=True):
        rgb = to_uint8(vae.decode(z).clamp(-1, 1))[0].permute(1, 2, 3, 0).numpy()
        border = np.concatenate([rgb[:, 0], rgb[:, -1], rgb[:, :, 0], rgb[:, :, -1]], axis=1).astype(np.float32)
        bg = np.median(border, axis=1)[:, None, None]  # each frame's background: its border's median colour
        seen_bg = COLOUR_NAMES[int(np.argmin(np.abs(corners - np.median(bg, axis=0).reshape(1, 3)).max(1)))]
        far = (np.abs(rgb.astype(np.float32) - bg).max(-1) > 60).astype(np.uint8) * 255
        rows.append({"prompt": text, "background_ok": seen_bg == COLOUR_NAMES[PLAIN[c]]} | measure(rgb, far, c, s))
        out_rgb, out_alpha = _u8(*model.decode(z))
        alpha_rows.append({"prompt": text} | measure(out_rgb, out_alpha, c, s))
        sheet.append((text, rgb, far))
        sheet_lora.append((text, out_rgb, out_alpha))
    if args.sheet:
        from wanalpha.demo import contact_sheet

        contact_sheet(sheet, args.sheet.with_name(args.sheet.stem + "_rgb.png"))
        contact_sheet(sheet_lora, args.sheet.with_name(args.sheet.stem + "_decoder_loras.png"))
    summary = summarise(rows) | {"background_ok": float(np.mean([r["background_ok"] for r in rows]))}
    return {
        "stage": "rgb",
        "steps": args.steps,
        "cfg": args.cfg,
        "rgb": summary,
        "through_decoder_loras": summarise(alpha_rows),
        "rows": rows,
        "rows_decoder_loras": alpha_rows,
    }


@torch.no_grad()
def stage_rgba(args) -> dict:
    """The DiT with --dora (or none) on the "transparent background" prompts, decoded by the decoder LoRAs."""
    files = base_files(args.base)
    dit, t5, tokenizer = load_dit_and_text(files, args.dora)
    model = rgba_model(files, None)
    texts = [prompt(c, s, e, i) for i, (c, s, e) in enumerate(PROMPT_SET)]
    latents = sample(dit, t5, tokenizer, texts, args)
    rows, sheet = [], []
    for (c, s, _), text, z in zip(PROMPT_SET, texts, latents, strict=True):
        rgb, alpha = _u8(*model.decode(z))
        rows.append({"prompt": text} | measure(rgb, alpha, c, s))
        sheet.append((text, rgb, alpha))
    if args.sheet:
        from wanalpha.demo import contact_sheet

        contact_sheet(sheet, args.sheet)
    return {
        "stage": "rgba",
        "dora": str(args.dora),
        "steps": args.steps,
        "cfg": args.cfg,
        "seed": args.seed,
        "summary": summarise(rows),
        "rows": rows,
    }


def stage_outputs(args) -> dict:
    """A generate folder's clips (prompt order, eval's readers) against the prompts of --prompts."""
    from wanalpha.eval import clip_stems, read_clip, read_generation

    texts = [t.strip() for t in args.prompts.read_text().splitlines() if t.strip()]
    stems = clip_stems(args.folder, read_generation(args.folder))
    rows = []
    for text, stem in zip(texts, stems, strict=True):
        colour, shape = named(text)
        rows.append({"prompt": text} | measure(*read_clip(stem), colour, shape))
    return {"stage": "outputs", "folder": str(args.folder), "summary": summarise(rows), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["vae", "rgb", "rgba", "outputs"])
    parser.add_argument("folder", type=Path, nargs="?", help="outputs: the generate folder")
    parser.add_argument("--prompts", type=Path, help="outputs: the prompt file, one per line")
    parser.add_argument("--base", type=Path, default=None, help="a demo base folder (default: the shipped one)")
    parser.add_argument("--merge", type=Path, default=None, help="vae: a merge block (default: identity)")
    parser.add_argument("--dora", type=Path, default=None, help="rgba: the DoRA file")
    parser.add_argument("--clips", type=int, default=12, help="vae: clips (each over 4 colours)")
    parser.add_argument("--steps", type=int, default=25, help="sampling steps")
    parser.add_argument("--cfg", type=float, default=4.0, help="guidance scale (against the empty text)")
    parser.add_argument("--shift", type=float, default=5.0, help="sampling shift")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here")
    parser.add_argument("--sheet", type=Path, default=None, help="rgb, rgba: write contact sheets (PNG) here")
    parser.add_argument("--rows", action="store_true", help="print every prompt's measures")
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()
    result = {"vae": stage_vae, "rgb": stage_rgb, "rgba": stage_rgba, "outputs": stage_outputs}[args.stage](args)
    result["seconds"] = round(time.perf_counter() - start, 1)
    shown = {k: v for k, v in result.items() if args.rows or not k.startswith("rows")}
    print(json.dumps(shown, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
