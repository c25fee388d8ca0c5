"""Official Wan2.1 files → our modules: the DiT (`diffusion_pytorch_model*.safetensors`, sharded, original Wan
layout), the UMT5 encoder (`models_t5_umt5-xxl-enc-bf16.pth`), and `--model_id_with_origin_paths` resolution.

Both load strictly onto the meta device and are assigned tensor by tensor in the target dtype, so a 14B fp32
release becomes a bf16 model without a full fp32 copy in memory.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from wanalpha.background import checkpoint
from wanalpha.checkpoints.io import StateDictSource, check_keys, read_state_dict
from wanalpha.errors import WanAlphaError
from wanalpha.models.dit import DIT_VARIANTS, DiTConfig, WanDiT
from wanalpha.models.t5 import T5Config, T5Tokenizer, TextEncoder, UMT5Encoder

if TYPE_CHECKING:
    from wanalpha.adapters import WeightUpdate

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


FP8_DTYPES = ("F8_E4M3", "F8_E5M2")  # safetensors' names of the float8 dtypes
FP8_SCALE_LEAVES = ("scale_weight", "weight_scale", "scale_input", "input_scale", "comfy_quant")  # ComfyUI's, ours


def _fp8_extra(name: str) -> bool:
    """Whether a tensor of an FP8 file is a scale or marker beside the model's tensors, not one of them."""
    return name == "scaled_fp8" or name.rpartition(".")[2] in FP8_SCALE_LEAVES


def _strip(key: str) -> str:
    """A DiT key without the `model.diffusion_model.` / `diffusion_model.` prefix of ComfyUI's files."""
    from wanalpha.fp8 import COMFY_PREFIXES

    for prefix in COMFY_PREFIXES:
        key = key.removeprefix(prefix)
    return key


class _DiTFile:
    """What the headers of a DiT's shards say, before any tensor is read: each tensor's file, shape and dtype under
    its plain name (ComfyUI's prefixes dropped), and whether the files hold FP8 weights (ComfyUI's or ours)."""

    def __init__(self, files: list[Path]) -> None:
        from safetensors import safe_open

        self.files, self.name = files, str(files[0] if len(files) == 1 else files[0].parent)
        self.entries: dict[str, tuple[object, str, tuple[int, ...], str]] = {}  # name → (handle, key, shape, dtype)
        for path in files:
            handle = safe_open(str(path), framework="pt", device="cpu")
            for key in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                view = handle.get_slice(key)
                self.entries[_strip(key)] = (handle, key, tuple(view.get_shape()), view.get_dtype())
        self.fp8 = any(dtype in FP8_DTYPES or _fp8_extra(name) for name, (_, _, _, dtype) in self.entries.items())

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The model's tensors' shapes (an FP8 file's scales and markers left out)."""
        return {name: shape for name, (_, _, shape, _) in self.entries.items() if not _fp8_extra(name)}

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor, one at a time, in file order."""
        for name, (handle, key, _, _) in self.entries.items():
            yield name, handle.get_tensor(key)


def read_dit_config(source: str | Path | Iterable[str | Path]) -> DiTConfig:
    """The DiTConfig of sharded Wan DiT weights from their headers alone (config.json beside them, else the shapes),
    without reading a tensor: what load_dit builds. ComfyUI's FP8 files are read too."""
    files = dit_files(source)
    return infer_dit_config(_DiTFile(files).shapes(), files[0].parent / "config.json")


def load_dit(
    source: str | Path | Iterable[str | Path],
    config: DiTConfig | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    fp8: bool = False,
    updates: Sequence[WeightUpdate] = (),
) -> WanDiT:
    """Sharded Wan DiT weights → WanDiT (frozen, eval), strict, each tensor cast to `dtype` as it is read.

    `updates` (adapters.dora_updates / lora_updates, planned on a meta DiT of this config) change each tensor as it
    is read, in `dtype`, in their order. `fp8`: the block linears (`wanalpha.fp8.BLOCK_TARGETS`) become FP8Linears
    and each of their weights is quantised as it is read, after its updates: the unquantised weights are never all
    in memory at once (the tensor being read, one at a time), everything else is `dtype`. FP8 files (ComfyUI's
    `*_fp8_scaled` / `*_fp8_e4m3fn` layouts, ours) are read as they are: their FP8 weights load without a
    round trip (a weight with updates is dequantised to `dtype`, updated and quantised again); without `fp8` they
    are dequantised to `dtype`. The work happens on `device`, one tensor at a time."""
    from wanalpha.fp8 import FP8Linear, quantize_dit_, read_fp8_state_dict_streaming

    files = dit_files(source)
    found = _DiTFile(files)
    shapes = found.shapes()
    config = config or infer_dit_config(shapes, files[0].parent / "config.json")
    with torch.device("meta"):
        dit = WanDiT(config).to(dtype)
    expected = {k: v.shape for k, v in dit.state_dict().items()}
    check_keys(expected, {k: torch.empty(s, device="meta") for k, s in shapes.items()}, f"DiT {found.name}")
    if found.fp8:  # a bad FP8 layout fails before any tensor is read
        for name, (handle, key, _, _) in found.entries.items():
            if name.endswith(".comfy_quant"):
                list(read_fp8_state_dict_streaming([(name, handle.get_tensor(key))], name=found.name))
    if fp8:
        quantize_dit_(dit)
    quantised = {f"{name}.weight" for name, module in dit.named_modules() if isinstance(module, FP8Linear)}
    pending: dict[str, list] = {}
    for update in updates:
        pending.setdefault(update.key, []).append(update.apply)
    state = dict(_stream_dit(found, device, dtype, quantised, pending))
    if pending:  # planned against another DiT than the files
        raise WanAlphaError(f"DiT {found.name}: adapter updates for tensors it does not have: {sorted(pending)[:3]}")
    dit.load_state_dict(state, strict=True, assign=True)
    return dit.eval().requires_grad_(False)  # frozen: training adds (and unfreezes) its adapters


def _stream_dit(
    found: _DiTFile, device, dtype: torch.dtype, quantised: set[str], pending: dict[str, list]
) -> Iterator[tuple[str, torch.Tensor]]:
    """load_dit's tensors, one at a time: read, cast to dtype, updated (`pending`: key → updates, consumed), and the
    weights named in `quantised` quantised (each weight followed by its `…weight_scale`). An FP8 file's FP8 weights
    of `quantised` arrive with their scales and stay as they are unless they have updates."""
    from wanalpha.fp8 import BLOCK_TARGETS, FP8_DTYPE, dequantize, quantize_weight, read_fp8_state_dict_streaming

    tensors = found.tensors()
    if found.fp8:  # float8 weights outside `quantised` come dequantised (float32); nothing else is quantised here
        targets = BLOCK_TARGETS if quantised else ()
        tensors = read_fp8_state_dict_streaming(tensors, targets, name=found.name, quantise=False)
    waiting: dict[str, torch.Tensor] = {}  # an FP8 weight until its scale arrives (next)
    for key, tensor in tensors:
        checkpoint()  # read on a helper thread (generate): its caller may ask it to stop between tensors
        if tensor.dtype == FP8_DTYPE:
            waiting[key] = tensor
            continue
        if key.endswith(".weight_scale") and key[: -len("_scale")] in waiting:
            weight_key, q = key[: -len("_scale")], waiting.pop(key[: -len("_scale")])
            if weight_key not in pending:  # loaded as it is
                yield weight_key, q.to(device)
                yield key, tensor.to(device)
                continue
            key, tensor = weight_key, dequantize(q.to(device), tensor.to(device), dtype)
        tensor = tensor.to(device=device, dtype=dtype)
        for apply in pending.pop(key, ()):
            apply(tensor)
        if key in quantised:
            q, scale = quantize_weight(tensor)
            del tensor  # the unquantised weight is gone before the next one is read
            yield key, q
            yield key + "_scale", scale
        else:
            yield key, tensor


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
