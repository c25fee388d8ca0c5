"""Official Wan2.1 files → our modules: the DiT (`diffusion_pytorch_model*.safetensors`, sharded, original Wan
layout), the UMT5 encoder (`models_t5_umt5-xxl-enc-bf16.pth`), and `--model_id_with_origin_paths` resolution.

Both load strictly onto the meta device and are assigned tensor by tensor in the target dtype, so a 14B fp32
release becomes a bf16 model without a full fp32 copy in memory.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Iterable
from pathlib import Path

import torch

from wanalpha.checkpoints.io import StateDictSource, check_keys, read_state_dict
from wanalpha.errors import WanAlphaError
from wanalpha.models.dit import DIT_VARIANTS, DiTConfig, WanDiT
from wanalpha.models.t5 import T5Config, T5Tokenizer, TextEncoder, UMT5Encoder

DIT_PATTERN = "diffusion_pytorch_model*.safetensors"


def dit_files(source: str | Path | Iterable[str | Path]) -> list[Path]:
    """The shard files of a DiT: a folder (its diffusion_pytorch_model*.safetensors), an index json, one file,
    or a list of files."""
    if not isinstance(source, (str, Path)):
        files = [Path(p) for p in source]
    else:
        path = Path(source)
        if path.is_dir():
            files = sorted(path.glob(DIT_PATTERN))
        elif path.suffix == ".json" and path.is_file():
            index = json.loads(path.read_text())
            files = [path.parent / name for name in sorted(set(index["weight_map"].values()))]
        else:
            files = [path]
    missing = [str(f) for f in files if not f.is_file()]
    if not files or missing:
        raise WanAlphaError(
            f"DiT weights not found: {', '.join(missing) or str(source)}; expected the Wan2.1 "
            f"folder's {DIT_PATTERN} files (`wanalpha download wan2.1-t2v-14b` fetches "
            "them)"
        )
    return files


CONFIG_FIELDS = ("dim", "ffn_dim", "num_heads", "num_layers", "text_len", "freq_dim", "in_dim", "out_dim", "eps")


def infer_dit_config(shapes: dict[str, tuple[int, ...]], config_json: Path | None = None) -> DiTConfig:
    """The DiT's settings: from the model folder's config.json when there is one (the Wan2.1 folders' fields; the
    text width from the weights), else from the shapes (1.3B: dim 1536, 14B: dim 5120; others: head_dim 128)."""
    if config_json is not None and config_json.is_file():
        try:
            fields = json.loads(config_json.read_text())
            return DiTConfig(
                text_dim=shapes["text_embedding.0.weight"][1], **{k: fields[k] for k in CONFIG_FIELDS if k in fields}
            )
        except (ValueError, TypeError) as err:
            raise WanAlphaError(f"{config_json}: not a Wan DiT config ({err}); fix or remove the file") from None
    dim = shapes["patch_embedding.weight"][0]
    for config in DIT_VARIANTS.values():
        if config.dim == dim and config.text_dim == shapes["text_embedding.0.weight"][1]:
            return config
    layers = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k)))
    return DiTConfig(
        dim=dim,
        ffn_dim=shapes["blocks.0.ffn.0.weight"][0],
        num_heads=max(1, dim // 128),
        num_layers=layers,
        text_dim=shapes["text_embedding.0.weight"][1],
        freq_dim=shapes["time_embedding.0.weight"][1],
    )


def _shapes(handles) -> dict[str, tuple[int, ...]]:
    return {k: tuple(h.get_slice(k).get_shape()) for h in handles for k in h.keys()}  # noqa: SIM118


def read_dit_config(source: str | Path | Iterable[str | Path]) -> DiTConfig:
    """The DiTConfig of sharded Wan DiT weights from their headers alone (config.json beside them, else the shapes),
    without reading a tensor: what load_dit builds."""
    from safetensors import safe_open

    files = dit_files(source)
    return infer_dit_config(
        _shapes([safe_open(str(f), framework="pt", device="cpu") for f in files]), files[0].parent / "config.json"
    )


def load_dit(
    source: str | Path | Iterable[str | Path],
    config: DiTConfig | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
) -> WanDiT:
    """Sharded Wan DiT weights → WanDiT (frozen, eval), strict, each tensor cast to `dtype` as it is read."""
    from safetensors import safe_open

    files = dit_files(source)
    handles = [safe_open(str(f), framework="pt", device="cpu") for f in files]
    shapes = _shapes(handles)
    config = config or infer_dit_config(shapes, files[0].parent / "config.json")
    with torch.device("meta"):
        dit = WanDiT(config)
    expected = {k: v.shape for k, v in dit.state_dict().items()}
    check_keys(expected, {k: torch.empty(s, device="meta") for k, s in shapes.items()}, f"DiT {files[0].parent}")
    state = {}
    for handle in handles:
        for key in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
            state[key] = handle.get_tensor(key).to(device=device, dtype=dtype)
    dit.load_state_dict(state, strict=True, assign=True)
    return dit.eval().requires_grad_(False)  # frozen: training adds (and unfreezes) its adapters


def infer_t5_config(sd: dict[str, torch.Tensor]) -> T5Config:
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    shared = "pos_embedding.embedding.weight" in sd
    bias = sd["pos_embedding.embedding.weight" if shared else "blocks.0.pos_embedding.embedding.weight"]
    vocab, dim = sd["token_embedding.weight"].shape
    return T5Config(
        vocab_size=vocab,
        dim=dim,
        dim_attn=sd["blocks.0.attn.q.weight"].shape[0],
        dim_ffn=sd["blocks.0.ffn.fc1.weight"].shape[0],
        num_heads=bias.shape[1],
        num_layers=layers,
        num_buckets=bias.shape[0],
        shared_pos=shared,
    )


def load_t5(
    source: StateDictSource,
    config: T5Config | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
) -> UMT5Encoder:
    """`models_t5_umt5-xxl-enc-bf16.pth` → UMT5Encoder (eval), strict, weights_only, meta build + assign."""
    sd = read_state_dict(source, "T5 encoder")
    if config is None and not {"token_embedding.weight", "blocks.0.attn.q.weight"} <= set(sd):
        name = source if isinstance(source, (str, Path)) else "(state dict)"
        raise WanAlphaError(
            f"T5 encoder file {name} is not a UMT5 encoder (no token_embedding.weight / blocks.0.attn"
            ".q.weight); pass models_t5_umt5-xxl-enc-bf16.pth to --t5-path"
        )
    config = config or infer_t5_config(sd)
    with torch.device("meta"):
        encoder = UMT5Encoder(config)
    check_keys({k: v.shape for k, v in encoder.state_dict().items()}, sd, "T5 encoder")
    encoder.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, strict=True, assign=True)
    return encoder.eval().requires_grad_(False)


def load_text_encoder(
    t5: StateDictSource, tokenizer: str | Path, text_len: int = 512, device: torch.device | str = "cpu"
) -> TextEncoder:
    """The UMT5 encoder (`load_t5`: bf16, as the official pipelines run it) and the umt5-xxl tokenizer (a folder's
    tokenizer.json, or the file) truncating and padding to text_len (the DiT's)."""
    return TextEncoder(load_t5(t5, device=device), T5Tokenizer(tokenizer, text_len=text_len))


# --------------------------------------------------------------------------------------- model resolution


def parse_model_paths(spec: str) -> list[tuple[str, str]]:
    """`"Wan-AI/Wan2.1-T2V-14B:diffusion_pytorch_model*.safetensors,Wan-AI/…:Wan2.1_VAE.pth"` → [(repo, pattern)]."""
    pairs = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        repo, sep, pattern = item.partition(":")
        if not sep or "/" not in repo or not pattern:
            raise WanAlphaError(
                f"--model_id_with_origin_paths entry {item!r} is not 'owner/model:file-pattern' "
                "(e.g. Wan-AI/Wan2.1-T2V-14B:Wan2.1_VAE.pth)"
            )
        pairs.append((repo, pattern))
    return pairs


def resolve_model_files(spec: str, models_dir: str | Path = "models") -> dict[str, list[Path]]:
    """Each `repo:pattern` → its local files under `models_dir/<repo>/`, fetching what is missing from the hub
    (resumable, atomic: wanalpha.download) unless offline. A repository that gives the UMT5 text encoder also gives
    its tokenizer folder (`google/umt5-xxl/`, as DiffSynth fetches it), under the key TOKENIZER_PATTERN.
    Returns {pattern: sorted files}; no network when every pattern is already complete on disk."""
    from wanalpha.download import TOKENIZER_PATTERN, ensure_patterns

    by_repo: dict[str, list[str]] = {}
    for repo, pattern in parse_model_paths(spec):
        by_repo.setdefault(repo, []).append(pattern)
    resolved: dict[str, list[Path]] = {}
    for repo, patterns in by_repo.items():
        if any(_is_text_encoder(p) for p in patterns) and TOKENIZER_PATTERN not in patterns:
            patterns = [*patterns, TOKENIZER_PATTERN]
        resolved |= ensure_patterns(repo, patterns, Path(models_dir) / repo)
    return resolved


T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"


def _is_text_encoder(pattern: str) -> bool:
    return fnmatch.fnmatch(T5_FILE, pattern) and not fnmatch.fnmatch("diffusion_pytorch_model.safetensors", pattern)


def wan_model_files(
    need: tuple[str, ...] = ("dit", "t5"),
    *,
    dit_path: Path | None = None,
    t5_path: Path | None = None,
    tokenizer_path: Path | None = None,
    model_id_with_origin_paths: str | None = None,
    models_dir: Path = Path("models"),
) -> dict[str, object]:
    """The Wan2.1 files a command needs, from explicit paths (win) or hub ids (`--model_id_with_origin_paths`,
    resolved into `models_dir`): {"dit": [shards], "t5": path, "tokenizer": folder, "vae": path}; a kind in `need`
    that is missing is an error."""
    from wanalpha.download import TOKENIZER_PATTERN

    found: dict[str, object] = {}
    if model_id_with_origin_paths:
        for pattern, files in resolve_model_files(model_id_with_origin_paths, models_dir).items():
            if pattern == TOKENIZER_PATTERN:
                continue  # the folder beside the T5 weights (below)
            name = files[0].name
            if name.startswith("diffusion_pytorch_model"):
                found["dit"] = files
            elif "t5" in name.lower():
                found["t5"] = files[0]
            elif name.endswith("VAE.pth"):
                found["vae"] = files[0]
    if dit_path is not None:
        found["dit"] = dit_files(dit_path)
    if t5_path is not None:
        found["t5"] = Path(t5_path)
    if "t5" in found:
        found["tokenizer"] = Path(tokenizer_path or Path(found["t5"]).parent / "google" / "umt5-xxl")
    flags = {"dit": "--dit-path", "t5": "--t5-path", "vae": "--base-vae-path"}
    for kind in need:
        if kind not in found:
            raise WanAlphaError(
                f"no {kind} weights given: pass {flags[kind]} or list them in --model-id-with-origin-paths"
            )
    return found
