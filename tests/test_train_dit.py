"""train-dit on tiny models: the seed guide's flags, loss falls, exact resume, adapters reload (ours and official)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import run_cli
from wanalpha import adapters, flow
from wanalpha.checkpoints.wan import load_dit
from wanalpha.data.latent_cache import CachedClipDataset, expectations

SIZE = ["--height", "32", "--width", "48", "--num_frames", "9"]


def _cache(tmp: Path, files: dict, dataset: Path) -> Path:
    run_cli(
        "cache",
        "--stage",
        "dit",
        "--dataset_base_path",
        dataset,
        "--base_vae_path",
        files["vae"],
        "--feature_merge_checkpoint",
        files["merge"],
        "--t5_path",
        files["t5"],
        *SIZE,
        "--output_dir",
        tmp / "dit_cache",
    )
    return tmp / "dit_cache"


def _video_run(tmp: Path, files: dict, dataset: Path, out: str, *extra, check: int = 0):
    # The seed guide's Step 4 flags (with local paths for the tiny model).
    return run_cli(
        "train-dit",
        "--rgba_mode",
        "--dataset_base_path",
        dataset,
        "--dataset_metadata_path",
        dataset / "metadata.csv",
        "--data_file_keys",
        "video",
        *SIZE,
        "--dataset_repeat",
        "2",
        "--dit_path",
        files["dit"],
        "--t5_path",
        files["t5"],
        "--base_vae_path",
        files["vae"],
        "--vae_lora_path",
        files["lora"],
        "--feature_merge_checkpoint",
        files["merge"],
        "--use_dora",
        "--dora_rank",
        "4",
        "--learning_rate",
        "1e-3",
        "--remove_prefix_in_ckpt",
        "pipe.dit.",
        "--output_path",
        tmp / out,
        "--trainable_models",
        "dit",
        "--num_workers",
        "0",
        *extra,
        check=check,
    )


def _eval_loss(dit, data: CachedClipDataset, draws: int = 24) -> float:
    """The flow loss over fixed (clip, colour, t, noise) draws."""
    generator = torch.Generator().manual_seed(123)
    schedule = flow.TrainingSchedule.create()
    total = 0.0
    with torch.no_grad():
        for i in range(draws):
            item = data[i % len(data)]
            x0 = item["latents"][i % len(item["latents"])][None]  # one latent per clip, or one per colour
            noise = torch.randn(x0.shape, generator=generator)
            t, sigma, weight = schedule.sample(1, generator, model_dtype=torch.float32)
            pred = dit(flow.add_noise(x0, noise, sigma), t, [item["context"][:16].float()])
            total += float(flow.flow_loss(pred, noise - x0, weight))
    return total / draws


def test_cached_training_loss_falls_and_adapters_reload(tmp_path: Path, tiny_stage2, tiny_dataset: Path) -> None:
    cache = _cache(tmp_path, tiny_stage2, tiny_dataset)
    run_cli(
        "train-dit",
        "--cache_dir",
        cache,
        "--dit_path",
        tiny_stage2["dit"],
        "--dora_rank",
        "4",
        "--learning_rate",
        "5e-3",
        "--dataset_repeat",
        "15",
        "--num_epochs",
        "1",
        "--save_steps",
        "10",
        "--output_path",
        tmp_path / "run",
        "--num_workers",
        "0",
        "--dit_dtype",
        "fp32",
    )
    out = tmp_path / "run"
    with (out / "loss_log.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == 30
    assert sorted(p.name for p in out.glob("epoch-*.safetensors")) == [
        "epoch-0-10.safetensors",
        "epoch-0-20.safetensors",
        "epoch-0-30.safetensors",
        "epoch-0.safetensors",
    ]
    saved = load_file(out / "epoch-0.safetensors")
    assert all(k.startswith("blocks.") and k.endswith(".default.weight") for k in saved) and len(saved) == 60
    with safe_open(str(out / "epoch-0.safetensors"), "pt") as fh:
        meta = fh.metadata()
    assert meta["format"] == "wanalpha.dora" and meta["rank"] == "4" and meta["base_model"] == "tiny"
    assert json.loads((out / "provenance.json").read_text())["self_attention_kernel"] == "sdpa"  # the CPU

    data = CachedClipDataset(cache, stage="dit")
    # config.yaml records what the run used, the cache's clip settings (not the 480 × 832 defaults): it serves as
    # --config for a rerun over the same cache.
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert recorded["height"] == data.index["height"] != 480 and recorded["colours"] == data.colours
    assert recorded["colour_draw"] == data.index.get("colour_draw", "step")
    CachedClipDataset(cache, expectations(recorded), stage="dit")
    base = load_dit(tiny_stage2["dit"], dtype=torch.float32)
    before = _eval_loss(base, data)
    merged = load_dit(tiny_stage2["dit"], dtype=torch.float32)
    adapters.merge_dora(merged, str(out / "epoch-0.safetensors"))  # the official merge formula
    after = _eval_loss(merged, data)
    assert after < 0.9 * before, (before, after)
    # Ours: inject adapters into a fresh model and load the file: the same function as the merged weights.
    ours = load_dit(tiny_stage2["dit"], dtype=torch.float32)
    adapters.inject_dora(ours, rank=4)
    missing = ours.load_state_dict(saved, strict=False)
    assert not missing.unexpected_keys
    assert abs(_eval_loss(ours, data) - after) < 1e-4 * max(1.0, after)


def test_video_training_resumes_exactly_and_matches_the_cache(tmp_path: Path, tiny_stage2, tiny_dataset) -> None:
    common = ["--num_epochs", "2", "--save_steps", "1", "--dit_dtype", "fp32"]
    _video_run(
        tmp_path,
        tiny_stage2,
        tiny_dataset,
        "full",
        *common,
        "--preview_steps",
        "4",
        "--preview_frames",
        "5",
        "--preview_sampling_steps",
        "3",
    )
    import av

    previews = sorted(p.name for p in (tmp_path / "full/previews").iterdir())
    assert previews == ["step-4.mp4", "step-8.mp4"]
    with av.open(str(tmp_path / "full/previews/step-8.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape == (16, 16, 3)  # half the latents (4×6 → 2×2 cells), even
    # Each preview scored with eval's metrics, in loss_log.csv (the update's row) and TensorBoard.
    import csv

    with (tmp_path / "full/loss_log.csv").open(newline="") as fh:
        rows = {int(r["step"]): r for r in csv.DictReader(fh)}
    for step in (4, 8):
        assert rows[step]["loss"] and 0 <= float(rows[step]["preview_background_haze"]) <= 1
        assert 0 <= float(rows[step]["preview_temporal_flickering"]) <= 1
    assert rows[3]["preview_background_haze"] == ""  # steps without a preview
    _video_run(tmp_path, tiny_stage2, tiny_dataset, "split", *common, "--max_steps", "5")
    _video_run(tmp_path, tiny_stage2, tiny_dataset, "split", *common, "--resume")
    full, split = load_file(tmp_path / "full/epoch-1.safetensors"), load_file(tmp_path / "split/epoch-1.safetensors")
    assert all(torch.equal(full[k], split[k]) for k in full)
    # Training from `cache --stage dit` sees the same latents and draws: the same adapters.
    cache = _cache(tmp_path, tiny_stage2, tiny_dataset)
    run_cli(
        "train-dit",
        "--cache_dir",
        cache,
        "--dit_path",
        tiny_stage2["dit"],
        "--dora_rank",
        "4",
        "--learning_rate",
        "1e-3",
        "--dataset_repeat",
        "2",
        "--output_path",
        tmp_path / "cached",
        "--num_workers",
        "0",
        *common,
    )
    cached = load_file(tmp_path / "cached/epoch-1.safetensors")
    assert all(torch.allclose(full[k], cached[k], atol=1e-5) for k in full)


def test_bad_inputs(tmp_path: Path, tiny_stage2, tiny_dataset: Path) -> None:
    proc = _video_run(tmp_path, tiny_stage2, tiny_dataset, "a", "--data_file_keys", "image", check=2)
    assert "--data-file-keys must be 'video'" in proc.stderr
    proc = run_cli("train-dit", "--cache_dir", tmp_path, "--dit_path", tmp_path / "no_shards", check=1)
    assert "DiT weights not found" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    cache = _cache(tmp_path, tiny_stage2, tiny_dataset)
    proc = run_cli(
        "train-dit",
        "--cache_dir",
        cache,
        "--dit_path",
        tiny_stage2["dit"],
        "--height",
        "64",
        "--output_path",
        tmp_path / "b",
        check=1,
    )
    assert "was made with height=32" in proc.stderr
    run_cli(
        "train-dit",
        "--cache_dir",
        cache,
        "--dit_path",
        tiny_stage2["dit"],
        "--dora_rank",
        "4",
        "--max_steps",
        "1",
        "--output_path",
        tmp_path / "c",
        "--num_workers",
        "0",
    )
    proc = run_cli(
        "train-dit",
        "--cache_dir",
        cache,
        "--dit_path",
        tiny_stage2["dit"],
        "--dora_rank",
        "8",
        "--resume",
        "--output_path",
        tmp_path / "c",
        check=1,
    )
    assert "adapters of another rank" in proc.stderr and "Traceback" not in proc.stderr


def test_speed_levers_train_the_same(tmp_path: Path, tiny_stage2, tiny_dataset: Path) -> None:
    """Selective checkpointing, peft's own adapter forward and compiled blocks (also with a partitioner memory
    budget) train the same adapters as the default (full checkpointing, fused adapters with per-step norms, eager),
    4 updates in float32."""
    cache = _cache(tmp_path, tiny_stage2, tiny_dataset)
    common = [
        "--cache_dir",
        cache,
        "--dit_path",
        tiny_stage2["dit"],
        "--dora_rank",
        "4",
        "--learning_rate",
        "1e-3",
        "--dataset_repeat",
        "2",
        "--num_workers",
        "0",
        "--dit_dtype",
        "fp32",
    ]
    run_cli("train-dit", *common, "--output_path", tmp_path / "full")
    full = load_file(tmp_path / "full/epoch-0.safetensors")
    assert all(full[k].abs().max() > 0 for k in full if ".lora_B." in k)  # trained away from B = 0
    levers = (
        "--checkpoint_attention_blocks=1",  # the tiny DiT's 2 blocks: one keeps its attention, one recomputes it
        "--no-fused-adapters",
        "--compile --compile_memory_budget=0.5",  # compiled blocks, with the partitioner's budget (test_dit: without)
    )
    for lever in levers:
        out = tmp_path / lever.replace(" ", "")
        run_cli("train-dit", *common, *lever.split(), "--output_path", out)
        other = load_file(out / "epoch-0.safetensors")
        assert full.keys() == other.keys() and all(torch.allclose(full[k], other[k], atol=1e-6) for k in full), lever
    # An FP8 base (the block linears quantised while loading): the same adapters' file, format and metadata.
    run_cli("train-dit", *common, "--dit_dtype", "fp8", "--output_path", tmp_path / "fp8")
    with (
        safe_open(tmp_path / "full/epoch-0.safetensors", "pt") as a,
        safe_open(tmp_path / "fp8/epoch-0.safetensors", "pt") as b,
    ):
        assert a.metadata() == b.metadata()
    over_fp8 = load_file(tmp_path / "fp8/epoch-0.safetensors")
    assert over_fp8.keys() == full.keys()
    assert all(over_fp8[k].dtype == full[k].dtype == torch.float32 and over_fp8[k].shape == full[k].shape for k in full)
    assert all(over_fp8[k].abs().max() > 0 for k in full if ".lora_B." in k)
    proc = run_cli("train-dit", *common, "--compile_memory_budget=0.5", "--output_path", tmp_path / "x", check=2)
    assert "add --compile" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("train-dit", *common, "--attention", "fa4", "--output_path", tmp_path / "x", check=2)
    assert "--attention fa4" in proc.stderr and "runs on NVIDIA CUDA GPUs" in proc.stderr
    assert "Traceback" not in proc.stderr
