"""Wan-Alpha v2 data (#23 items 11-12): the official VAE dataset's augmentation, the official-v2 recipe, and the
DiT data's background colour (one per clip, fixed at preparation, as the official T2V data prep).

Official files (github WeChatCV/Wan-Alpha): VAE = Wan-Alpha-VAE-train/transparent_video_dataset_image.py
(TextVideoDataset), train.sh; T2V = Wan-Alpha-train/diffsynth/pipelines/wan_video_new_trans_random_pre.py,
examples/wanvideo/model_training/prepare_trans_alpha_mask.py. Python's `random.randint(a, b)` includes b.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from conftest import run_cli
from wanalpha.config import TRAIN_MERGE_RECIPES, TrainMergeConfig
from wanalpha.data import dataset as ds
from wanalpha.data.dataset import ClipSpec, RGBAClipDataset, clip_colour, read_frames, read_metadata
from wanalpha.data.render import composite
from wanalpha.data.synthetic import make_clip
from wanalpha.data.video import write_video
from wanalpha.errors import ConfigError
from wanalpha.train_dit import dit_step
from wanalpha.training import Draws

ROOT = Path(__file__).resolve().parents[1]
SEEDS = range(300)


def _replica(seed: int):
    """randint(a, b) with b included, from the generator our augmentation draws from: the official draw order is
    then replayed by the test's own statement of each rule."""
    g = torch.Generator().manual_seed(seed)
    return lambda a, b: int(torch.randint(a, b + 1, (1,), generator=g))


# ------------------------------------------------------------------------------------------- augmentation rules


@pytest.mark.parametrize("n", [1, 3, 5, 16, 17, 30])
def test_start_frame_and_ping_pong_follow_the_official_rule(n: int) -> None:
    """transparent_video_dataset_image.py:214-228: with n < num_frames frames, id_list = [0..n-1] + [n-1..0]
    repeated num_frames times, start = random.randint(0, n) (n included), ids = id_list[start:start+num_frames];
    otherwise start = random.randint(0, n - num_frames) and the ids are consecutive."""
    starts = set()
    for seed in SEEDS:
        r = _replica(seed)
        ids = ds.official_frame_indices(n, 17, 1, torch.Generator().manual_seed(seed))
        if n < 17:
            start = r(0, n)
            id_list = (list(range(n)) + list(range(n))[::-1]) * 17
            assert ids == id_list[start : start + 17]
        else:
            start = r(0, n - 17)
            assert ids == list(range(start, start + 17))
        starts.add(start)
    assert starts == set(range(n + 1 if n < 17 else n - 16))  # both ends of the inclusive range are drawn


def test_stride_steps_through_the_same_sequences() -> None:
    """frame_stride (ours; upstream reads consecutive frames) takes every stride-th entry of the same sequences."""
    for seed in range(50):
        r = _replica(seed)
        start = r(0, 30 - 13)
        assert ds.official_frame_indices(30, 5, 3, torch.Generator().manual_seed(seed)) == list(
            range(start, start + 13, 3)
        )
        r = _replica(seed)
        start = r(0, 4)
        pong = (list(range(4)) + list(range(4))[::-1]) * 20
        assert ds.official_frame_indices(4, 9, 2, torch.Generator().manual_seed(seed)) == pong[start : start + 17 : 2]


@pytest.mark.parametrize("source", [(60, 100), (100, 60), (272, 272), (1080, 1920)])
def test_scale_and_crop_follow_the_official_rule(source: tuple[int, int]) -> None:
    """transparent_video_dataset_image.py:35-60: tmp_width = randint(W, 2W), tmp_height = randint(H, 2H),
    scale = max(tmp_width / w, tmp_height / h), resize to (round(h·scale), round(w·scale)), then
    top = randint(0, new_h − H), left = randint(0, new_w − W): a 1-2× cover scale and a crop inside."""
    h, w = source
    H, W = 32, 48
    edges = set()
    for seed in SEEDS:
        r = _replica(seed)
        scale = max(r(W, 2 * W) / w, r(H, 2 * H) / h)
        new_h, new_w = round(h * scale), round(w * scale)
        top, left = r(0, new_h - H), r(0, new_w - W)
        assert ds.official_crop(h, w, H, W, torch.Generator().manual_seed(seed)) == (new_h, new_w, top, left)
        assert min(new_h / H, new_w / W) >= 1 and min(new_h / H, new_w / W) <= 2 + 1 / min(H, W)  # binding side
        edges |= {("top", top == 0), ("bottom", top == new_h - H), ("left", left == 0), ("right", left == new_w - W)}
    assert {(edge, True) for edge in ("top", "bottom", "left", "right")} <= edges  # both ends of each range drawn


@pytest.mark.parametrize("source", [(80, 90), (300, 200), (32, 32)])
def test_still_images_pan_as_the_official_rule(source: tuple[int, int]) -> None:
    """transparent_video_dataset_image.py:62-200 (crop_and_resize_static_video): the scale as for videos; start
    x = randint(0, max(0, new_w − W)), then y likewise; the quarter of the start (x < new_w//2, y < new_h//2) gives
    the directions (toward the far sides: horizontal, vertical, diagonal), one by random.choice; the room that way
    (new_w − W − x forward, x backward), step = dir·room // frames (floor: a backward step rounds away from 0);
    frame i at clamp(start + i·step) — upstream clamps each corner before its crop and adds the step after."""
    h, w = source
    H = W = 32
    frames = 17
    moving = 0
    for seed in SEEDS:
        r = _replica(seed)
        scale = max(r(W, 2 * W) / w, r(H, 2 * H) / h)
        new_h, new_w = round(h * scale), round(w * scale)
        x0, y0 = r(0, new_w - W), r(0, new_h - H)
        sx, sy = (1 if x0 < new_w // 2 else -1), (1 if y0 < new_h // 2 else -1)
        dx, dy = [(sx, 0), (0, sy), (sx, sy)][r(0, 2)]
        room_x = (new_w - W - x0 if dx > 0 else x0) if dx else 0
        room_y = (new_h - H - y0 if dy > 0 else y0) if dy else 0
        step_x, step_y = (dx * room_x) // frames, (dy * room_y) // frames
        expected = [
            (min(max(y0 + i * step_y, 0), new_h - H), min(max(x0 + i * step_x, 0), new_w - W)) for i in range(frames)
        ]
        size, places = ds.still_motion(h, w, H, W, frames, torch.Generator().manual_seed(seed))
        assert size == (new_h, new_w) and places == expected
        moving += places[0] != places[-1]
    assert moving > 0  # still images become moving clips (a room under 17 px gives a step of 0 forward, as upstream)


def _write_pair(folder: Path, name: str, frames: int, size: tuple[int, int], seed: int) -> None:
    clip = make_clip(np.random.default_rng(seed), frames, size[1], size[0])
    write_video(folder / f"{name}_rgb.mp4", clip.rgb, 16.0)
    write_video(folder / f"{name}_alpha.mp4", clip.alpha, 16.0)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A short clip (6 frames), a long one (20), a still image pair (our layout), and an RGBA PNG (official CSV)."""
    folder = tmp_path_factory.mktemp("v2data")
    _write_pair(folder, "short", 6, (40, 56), 0)
    _write_pair(folder, "long", 20, (36, 64), 1)
    still = make_clip(np.random.default_rng(2), 1, 70, 50)
    cv2.imwrite(str(folder / "still_rgb.png"), cv2.cvtColor(still.rgb[0], cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(folder / "still_alpha.png"), still.alpha[0])
    rgba = np.concatenate([still.rgb[0], still.alpha[0][..., None]], axis=-1)
    (folder / "img").mkdir()
    cv2.imwrite(str(folder / "img/one.png"), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    with (folder / "metadata.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([["video", "prompt"], ["short", "a"], ["long", "b"], ["still", "c"]])
    with (folder / "data.csv").open("w", newline="") as fh:  # the official VAE data.csv layout
        rows = [
            ["video_fgr", "video_pha", "status"],
            ["long_rgb.mp4", "long_alpha.mp4", "dynamic"],
            ["still_rgb.png", "still_alpha.png", "static"],
            ["img/one.png", "", "static"],
        ]
        csv.writer(fh).writerows(rows)
    return folder


def _pil(frames: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
    """torchvision's resize of the official PIL frames: PIL BILINEAR."""
    return np.stack([np.asarray(Image.fromarray(f).resize((new_w, new_h), Image.BILINEAR)) for f in frames])


def test_augmented_pixels_are_the_official_resize_and_crop(data: Path) -> None:
    """The frames the official dataset would give for the same draws: PIL bilinear resize (antialiased when
    shrinking), then the crop (lines 41-58; stills 115-131/169-191), to ±1 of 255."""
    spec = ClipSpec(32, 32, 9)
    clips = {c.name: c for c in read_metadata(data)}
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        rgb, alpha = ds.load_clip(clips["long"], spec, 20, g)
        g = torch.Generator().manual_seed(seed)
        ids = ds.official_frame_indices(20, 9, 1, g)
        source = read_frames(clips["long"].rgb, ids)
        new_h, new_w, top, left = ds.official_crop(36, 64, 32, 32, g)
        expected = _pil(source, new_h, new_w)[:, top : top + 32, left : left + 32]
        assert rgb.shape == (9, 32, 32, 3) and alpha.shape == (9, 32, 32)
        assert np.abs(rgb.astype(int) - expected).max() <= 1
        # A still: scaled once, one crop per frame.
        rgb, alpha = ds.load_clip(clips["still"], spec, 1, torch.Generator().manual_seed(seed))
        (new_h, new_w), places = ds.still_motion(50, 70, 32, 32, 9, torch.Generator().manual_seed(seed))
        image = cv2.cvtColor(cv2.imread(str(clips["still"].rgb)), cv2.COLOR_BGR2RGB)
        scaled = _pil(image[None], new_h, new_w)[0]
        expected = np.stack([scaled[t : t + 32, x : x + 32] for t, x in places])
        assert np.abs(rgb.astype(int) - expected).max() <= 1
        grey = cv2.imread(str(clips["still"].alpha), cv2.IMREAD_GRAYSCALE)
        expected = np.stack([_pil(grey[None], new_h, new_w)[0][t : t + 32, x : x + 32] for t, x in places])
        assert np.abs(alpha.astype(int) - expected).max() <= 1


def test_draws_depend_on_seed_epoch_and_index_only(data: Path) -> None:
    """Each item is a function of (seed, epoch, index): the same in another dataset object, in any loading order,
    with DataLoader workers; a new epoch draws anew. The short clip is kept (played back and forth, as upstream)
    where the centre-crop cut skips it."""
    spec = ClipSpec(32, 32, 9)
    a = RGBAClipDataset(data, None, spec, "official", seed=5)
    assert [c.name for c in a.clips] == ["short", "long", "still"] and not a.skipped
    assert [c.name for c in RGBAClipDataset(data, None, spec).clips] == ["long", "still"]
    first = [a[i] for i in range(3)]
    b = RGBAClipDataset(data, None, spec, "official", seed=5)
    reversed_items = {i: b[i] for i in (2, 1, 0)}
    loader = torch.utils.data.DataLoader(b, batch_size=None, sampler=[1, 2, 0], num_workers=2)
    loaded = {int(item["index"]): item for item in loader}
    for i, item in enumerate(first):
        for other in (reversed_items[i], loaded[i]):
            assert torch.equal(item["rgb"], other["rgb"]) and torch.equal(item["alpha"], other["alpha"])
    b.set_epoch(1)
    assert any(not torch.equal(first[i]["rgb"], b[i]["rgb"]) for i in range(3))
    c = RGBAClipDataset(data, None, spec, "official", seed=6)
    assert any(not torch.equal(first[i]["rgb"], c[i]["rgb"]) for i in range(3))


def test_official_csv_layout_with_stills(data: Path) -> None:
    """The official data.csv (video_fgr, video_pha, status: dynamic = video, static = image; paths relative to the
    CSV). An empty video_pha takes a still's alpha from its RGBA PNG."""
    clips = read_metadata(data, data / "data.csv")
    assert [(c.name, c.still) for c in clips] == [
        ("long_rgb.mp4", False),
        ("still_rgb.png", True),
        ("img/one.png", True),
    ]
    spec = ClipSpec(32, 32, 9)
    dataset = RGBAClipDataset(data, data / "data.csv", spec, "official", seed=0)
    assert len(dataset) == 3 and dataset[2]["rgb"].shape == (9, 32, 32, 3)
    pair, rgba = ds.read_still(clips[1]), ds.read_still(clips[2])  # the same image as a pair and as one RGBA PNG
    assert np.array_equal(pair[0], rgba[0]) and np.array_equal(pair[1], rgba[1])
    for a, b in zip(*(ds.load_clip(c, spec, 1, torch.Generator().manual_seed(3)) for c in clips[1:]), strict=True):
        assert np.array_equal(a, b)
    plain = RGBAClipDataset(data, data / "data.csv", spec)[1]
    assert all(torch.equal(plain["rgb"][0], plain["rgb"][t]) for t in range(9))  # without augmentation: still


# ----------------------------------------------------------------------------------------------------- recipe


def test_official_v2_recipe_and_its_config_file(tmp_path: Path) -> None:
    """Wan-Alpha-VAE-train/train.sh:28-35: --num_frames 17 --height 272 --width 272 --max_epochs 100
    --learning_rate 1e-4 --lora_rank 128 --batch_size 2; train_vae.py:547 precision bf16-mixed; :382 AdamW(lr)
    (weight decay 0.01, torch's default); no gradient clipping. configs/official-v2-vae.yaml says the same."""
    required = {
        "dataset_base_path": tmp_path,
        "base_vae_path": tmp_path / "vae.pth",
        "dit_path": tmp_path,
        "t5_path": tmp_path / "t5.pth",
        "vgg_path": tmp_path / "vgg.pth",
    }
    (tmp_path / "vgg.pth").touch()  # never read: the configs only check that it exists
    cfg = TrainMergeConfig.resolve(None, required | {"recipe": "official-v2"})
    assert (
        cfg.variant,
        cfg.num_frames,
        cfg.height,
        cfg.width,
        cfg.batch_size,
        cfg.lora_rank,
        cfg.num_epochs,
        cfg.mixed_precision,
        cfg.learning_rate,
    ) == ("v2", 17, 272, 272, 2, 128, 100, "bf16", 1e-4)
    assert cfg.clip_augment() == "official" and cfg.diffusion_weight == 0.1 and cfg.max_grad_norm == 0
    assert yaml.safe_load((ROOT / "configs/official-v2-vae.yaml").read_text()) == TRAIN_MERGE_RECIPES["official-v2"]
    from_file = TrainMergeConfig.resolve(ROOT / "configs/official-v2-vae.yaml", required)
    assert from_file.model_dump(exclude={"recipe"}) == cfg.model_dump(exclude={"recipe"})
    assert TrainMergeConfig.resolve(None, required | {"recipe": "official-v2", "num_frames": 9}).num_frames == 9
    assert TrainMergeConfig.resolve(None, required | {"variant": "v2"}).clip_augment() == "official"  # auto
    v1 = required | {"vae_lora_path": tmp_path / "d.bin"}
    assert TrainMergeConfig.resolve(None, v1).clip_augment() == "none"  # v1: the cache-compatible cut
    with pytest.raises(ConfigError, match="a cache cannot hold"):
        TrainMergeConfig.resolve(None, v1 | {"dataset_base_path": None, "cache_dir": tmp_path, "augment": "official"})


# --------------------------------------------------------------------------------------- DiT background colours


def test_clip_colour_is_one_of_the_corners_fixed_per_clip() -> None:
    """wan_video_new_trans_random_pre.py:696-705 (the 8 cube corners) and 738-739: the T2V data prep renders the
    clip (hard alpha) over bg_color[torch.randint(0, 8)], drawn once per clip; prepare_trans_alpha_mask.py:331-345
    saves that one latent in the clip's cache, which training loads (wan_video_new_1010_ellipse.py:752-758) with no
    further colour draw. Ours: uniform among --colours, a function of (seed, clip name)."""
    names = [f"clip_{i:03d}" for i in range(400)]
    drawn = [clip_colour(42, n, list(range(8))) for n in names]
    assert drawn == [clip_colour(42, n, list(range(8))) for n in names]
    counts = np.bincount(drawn, minlength=8)
    assert counts.min() > 25, counts  # all eight, about 50 each
    assert {clip_colour(42, n, [0, 7]) for n in names} == {0, 7}
    assert sum(clip_colour(1, n, list(range(8))) != d for n, d in zip(names, drawn, strict=True)) > 250


SIZE = ["--height", "32", "--width", "48", "--num_frames", "9"]


def test_dit_cache_keeps_one_colour_per_clip_and_train_dit_takes_it(tmp_path: Path, tiny_stage2, tiny_dataset) -> None:
    """cache --stage dit: by default (official) one latent per clip over its recorded colour; --colour-draw step
    keeps one per colour. A cache's choice is checked against an explicit train-dit --colour-draw."""
    common = [
        "--stage",
        "dit",
        "--dataset_base_path",
        tiny_dataset,
        "--base_vae_path",
        tiny_stage2["vae"],
        "--feature_merge_checkpoint",
        tiny_stage2["merge"],
        "--t5_path",
        tiny_stage2["t5"],
        *SIZE,
    ]
    run_cli("cache", *common, "--seed", "7", "--output_dir", tmp_path / "clip")
    run_cli("cache", *common, "--colour_draw", "step", "--colours", "0,7", "--output_dir", tmp_path / "step")
    index = json.loads((tmp_path / "clip/cache.json").read_text())
    assert index["colour_draw"] == "clip" and index["seed"] == 7
    for name in index["clips"]:
        shard = tmp_path / "clip" / f"{name}.safetensors"
        tensors = load_file(shard)
        colour = clip_colour(7, name, list(range(8)))
        assert tensors["merged_latents"].shape == (1, 16, 3, 4, 6) and tensors["colours"].tolist() == [colour]
        with safe_open(str(shard), "pt") as fh:
            assert json.loads(fh.metadata()["colour"]) == colour
        step = load_file(tmp_path / "step" / f"{name}.safetensors")
        assert step["merged_latents"].shape == (2, 16, 3, 4, 6) and step["colours"].tolist() == [0, 7]
        if colour in (0, 7):  # the same latent either way
            torch.testing.assert_close(tensors["merged_latents"][0], step["merged_latents"][[0, 7].index(colour)])
    proc = run_cli(
        "train-dit",
        "--cache_dir",
        tmp_path / "clip",
        "--dit_path",
        tiny_stage2["dit"],
        "--colour_draw",
        "step",
        "--output_path",
        tmp_path / "run",
        check=1,
    )
    assert "made with --colour-draw clip" in proc.stderr and "Traceback" not in proc.stderr


class _FakeDiT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patch_embedding = nn.Conv3d(16, 1, 1)
        self.config = SimpleNamespace(text_len=4)
        self.inputs: list[torch.Tensor] = []

    def forward(self, x, t, context):
        self.inputs.append(x.detach().clone())
        return torch.zeros_like(x) + self.patch_embedding.bias.sum()


class _FakeVAE:
    """encode(render, alpha) → a latent that is a function of the render: the colour it was drawn over shows."""

    def __init__(self) -> None:
        self.renders: list[torch.Tensor] = []

    def encode(self, render, alpha):
        self.renders.append(render)
        return render.mean(dim=(1, 3, 4), keepdim=True).expand(-1, 16, -1, 2, 2)[:, :, :1]


def test_dit_step_takes_the_clips_colour_or_draws_one() -> None:
    """With a clip's fixed colour (batch["colour"], or a shard of one latent) the step renders over / reads that
    colour, and takes the same draws as from the cache; with every colour it draws one per step."""
    from wanalpha import flow

    schedule = flow.TrainingSchedule.create()
    gen = torch.Generator().manual_seed(0)
    rgb = torch.randint(0, 256, (2, 1, 8, 8, 3), dtype=torch.uint8, generator=gen)
    alpha = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8, generator=gen)
    batch = {
        "rgb": rgb,
        "alpha": alpha,
        "index": torch.tensor([0, 1]),
        "context": [torch.zeros(2, 8)] * 2,
        "colour": torch.tensor([3, 6]),
    }
    dit, vae = _FakeDiT(), _FakeVAE()
    loss_video, _ = dit_step(dit, batch, Draws(1, 0, [4, 5]), schedule, list(range(8)), vae)
    rgb_f, alpha_f = ds.to_model_space(rgb, alpha)
    torch.testing.assert_close(vae.renders[0], composite(rgb_f, alpha_f, torch.tensor([3, 6]), hard=True))
    # The cache of the official layout holds exactly that latent: the same noised input and loss.
    latents = vae.encode(vae.renders[0], None)[:, None]  # (B, 1, 16, 1, 2, 2)
    cached = {"latents": latents, "index": batch["index"], "context": batch["context"]}
    loss_cached, _ = dit_step(dit, cached, Draws(1, 0, [4, 5]), schedule, list(range(8)))
    torch.testing.assert_close(dit.inputs[1], dit.inputs[0])
    torch.testing.assert_close(loss_cached, loss_video)
    # Every colour cached (--colour-draw step): the slot of each sample's draw.
    slots = Draws(1, 0, [4, 5]).randint(8)
    every = torch.full((2, 8, 16, 1, 2, 2), float("nan"))
    every[torch.arange(2), slots] = latents[:, 0]
    loss_every, _ = dit_step(dit, dict(cached, latents=every), Draws(1, 0, [4, 5]), schedule, [])
    assert torch.isfinite(loss_every)  # every other slot is NaN
