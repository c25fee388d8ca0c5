"""The latent caches (DESIGN §4): one safetensors shard per clip, plus `cache.json` with the settings.

Stage `merge` (train-merge): `rgb_latents` (one per cached background colour: (n, 16, T_lat, h, w)),
`alpha_latent` (16, T_lat, h, w), `colours` (n,), and the resized uint8 frames the losses compare against
(`rgb_frames` (T,H,W,3), `alpha_frames` (T,H,W)), so cached training needs no dataset and gives the same loss.
Stage `dit` (train-dit): `merged_latents` (n, 16, T_lat, h, w) through encoder + merge block, `colours`, and the
prompt's trimmed T5 states `context` (L, 4096).
Shard metadata records the settings, the source hashes and the models' hashes; mismatches are refused.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from wanalpha.data.files import atomic_path, atomic_write_text, data_path, read_json, read_safetensors
from wanalpha.errors import WanAlphaError

FORMATS = {"merge": "wanalpha.cache.merge", "dit": "wanalpha.cache.dit"}
FORMAT_VERSION = "1"
INDEX = "cache.json"
SETTINGS = ("height", "width", "num_frames", "frame_stride", "loop_short_clips", "colours", "vae_sha256", "dtype")
DIT_SETTINGS = (*SETTINGS, "merge_sha256", "t5_sha256", "variant")
CLIP_SETTINGS = ("height", "width", "num_frames", "frame_stride")  # how clips are cut: a run may ask for them


def shard_path(cache_dir: Path, name: str) -> Path:
    """A clip's shard: named after the clip, always inside the cache folder."""
    return data_path(Path(cache_dir), name, ".safetensors")


def write_shard(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, object], stage: str = "merge"
) -> None:
    meta = {"format": FORMATS[stage], "format_version": FORMAT_VERSION} | {
        k: json.dumps(v) for k, v in metadata.items()
    }
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)


def read_shard_metadata(path: Path, stage: str = "merge") -> dict[str, object] | None:
    """The shard's metadata, or None when the file is missing, unreadable or not one of ours."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except (OSError, ValueError, RuntimeError, SafetensorError):  # damaged: re-encoded by `cache`, named by readers
        return None
    if meta.get("format") != FORMATS[stage] or meta.get("format_version") != FORMAT_VERSION:
        return None
    return {k: json.loads(v) for k, v in meta.items() if k not in ("format", "format_version")}


def write_index(cache_dir: Path, settings: dict[str, object], clips: list[str], stage: str = "merge") -> None:
    record = {"format": FORMATS[stage], "format_version": FORMAT_VERSION, **settings, "clips": clips}
    atomic_write_text(Path(cache_dir) / INDEX, json.dumps(record, indent=2) + "\n")


def read_index(cache_dir: Path, stage: str = "merge") -> dict:
    path = Path(cache_dir) / INDEX
    if not path.is_file():
        raise WanAlphaError(f"{cache_dir} is not a wanalpha cache (no {INDEX}); make one with `wanalpha cache`")
    index = read_json(path, "rebuild the cache with `wanalpha cache` (a rerun re-encodes only what is missing)")
    if index.get("format") != FORMATS[stage] or index.get("format_version") != FORMAT_VERSION:
        found = f"{index.get('format')} v{index.get('format_version')}"
        raise WanAlphaError(
            f"{path}: cache format {found} is not {FORMATS[stage]} v{FORMAT_VERSION}; build it "
            f"with `wanalpha cache --stage {stage}`"
        )
    return index


def expectations(given: Mapping[str, object]) -> dict[str, object]:
    """The clip settings among `given`, the settings a training run's user gave (config file or flags; defaults are
    not given): a cache must agree with each of them."""
    return {k: given[k] for k in CLIP_SETTINGS if k in given}


def cached_settings(index: Mapping[str, object]) -> dict[str, object]:
    """The clip settings a cache was made with (its cache.json): what a run over it used, whatever its own defaults
    say, so the run's saved config.yaml records them and serves as --config for a rerun."""
    return {k: index[k] for k in CLIP_SETTINGS if index.get(k) is not None}


class CachedClipDataset(torch.utils.data.Dataset):
    """Shards of a cache folder; every shard must agree with `cache.json` (size, frames, colours, models)."""

    def __init__(self, cache_dir: Path, expect: dict[str, object] | None = None, stage: str = "merge") -> None:
        self.cache_dir = Path(cache_dir)
        self.stage = stage
        self.index = read_index(self.cache_dir, stage)
        for key, value in (expect or {}).items():
            if value is not None and self.index.get(key) != value:
                raise WanAlphaError(
                    f"cache {self.cache_dir} was made with {key}={self.index.get(key)!r}, but this run "
                    f"asks for {value!r}; drop the flag or rebuild the cache"
                )
        self.names: list[str] = list(self.index["clips"])
        if not self.names:
            raise WanAlphaError(f"cache {self.cache_dir} holds no clips")
        for name in self.names:
            meta = read_shard_metadata(shard_path(self.cache_dir, name), stage)
            if meta is None:
                raise WanAlphaError(
                    f"cache shard {shard_path(self.cache_dir, name)} is missing or not a "
                    f"{FORMATS[stage]} file; rerun `wanalpha cache`"
                )
            stale = [k for k in (DIT_SETTINGS if stage == "dit" else SETTINGS) if meta.get(k) != self.index.get(k)]
            if stale:
                raise WanAlphaError(
                    f"cache shard {name} does not match {INDEX} ({', '.join(stale)}); "
                    "rerun `wanalpha cache` to rebuild it"
                )
        self.colours: list[int] = list(self.index["colours"])

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict:
        tensors = read_safetensors(
            shard_path(self.cache_dir, self.names[index]),
            "remove it and rerun `wanalpha cache` (it re-encodes only that clip)",
        )
        if self.stage == "dit":
            item = {"latents": tensors["merged_latents"], "context": tensors["context"], "index": index}
            if "gauss_mask" in tensors:  # v2: the clip's Gaussian mask for the training noise shift
                item["gauss_mask"] = tensors["gauss_mask"]
            return item
        return {
            "rgb": tensors["rgb_frames"],
            "alpha": tensors["alpha_frames"],
            "rgb_latents": tensors["rgb_latents"],
            "alpha_latent": tensors["alpha_latent"],
            "index": index,
        }
