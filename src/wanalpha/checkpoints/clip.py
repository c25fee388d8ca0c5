"""The CLIP model of `wanalpha eval`'s text–video score: resolved like every other weight file (a local folder, or a
hub id fetched into `<models>/<owner>/<name>/`), loaded into wanalpha.models.clip.CLIPModel, with its tokenizer
(tokenizer.json, the `tokenizers` library) and CLIP's image preprocessing.

    scorer = CLIPScorer.load(resolve_clip("openai/clip-vit-base-patch32", "models"), device)
    cosines = scorer.similarity("a cat", frames)        # frames (N,H,W,3) uint8 → (N,) cosine similarities

A folder holds config.json, tokenizer.json and model.safetensors (or pytorch_model.bin), as the Hugging Face CLIP
repositories do; preprocessor_config.json, when there, gives the image mean and std.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wanalpha.errors import WanAlphaError
from wanalpha.models.clip import CLIPConfig, CLIPModel, CLIPTowerConfig

DEFAULT_CLIP = "openai/clip-vit-base-patch32"  # the model of CLIPScore (Hessel et al. 2021)
WEIGHTS = ("model.safetensors", "pytorch_model.bin")
NEEDED = ("config.json", "tokenizer.json")
# CLIP's image normalisation (OpenAI's preprocessing; the hub's preprocessor_config.json says the same)
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def _weights(folder: Path) -> Path | None:
    return next((folder / name for name in WEIGHTS if (folder / name).is_file()), None)


def resolve_clip(model: str | Path, models_dir: str | Path = "models") -> Path:
    """The folder of a CLIP model: `model` itself when it is a folder, else the hub id `owner/name`, found in
    `<models_dir>/owner/name/` or fetched there (no network when the files are already there)."""
    from wanalpha.download import Hub, ensure_patterns, offline

    if Path(model).is_dir():
        folder = Path(model)
        missing = [name for name in NEEDED if not (folder / name).is_file()]
        if _weights(folder) is None:
            missing.append(" or ".join(WEIGHTS))
        if missing:
            raise WanAlphaError(
                f"--clip-model {folder} lacks {', '.join(missing)}; give a folder laid out as the "
                f"hub's CLIP repositories (e.g. {DEFAULT_CLIP}), or --no-clip"
            )
        return folder
    repo = str(model)
    if repo.count("/") != 1 or repo.startswith("/") or repo.endswith("/"):
        raise WanAlphaError(f"--clip-model {repo}: neither a folder nor a hub id owner/name (e.g. {DEFAULT_CLIP})")
    folder = Path(models_dir) / repo
    if all((folder / name).is_file() for name in NEEDED) and _weights(folder) is not None:
        return folder
    if offline():
        raise WanAlphaError(
            f"the CLIP model {repo} is not in {folder}/ and HF_HUB_OFFLINE is set; unset it to "
            f"download, put config.json, tokenizer.json and model.safetensors there (`hf download "
            f"{repo} config.json tokenizer.json model.safetensors --local-dir {folder}`), or pass "
            "--no-clip"
        )
    _, listing = Hub().listing(repo)
    weights = next((name for name in WEIGHTS if name in listing), None)
    if weights is None:
        raise WanAlphaError(f"{repo} has neither {' nor '.join(WEIGHTS)}; choose another --clip-model")
    ensure_patterns(repo, [*NEEDED, weights], folder)
    return folder


def _tower(values: dict, base: CLIPTowerConfig) -> CLIPTowerConfig:
    known = {f.name for f in fields(CLIPTowerConfig)}
    return CLIPTowerConfig(**{**base.__dict__, **{k: v for k, v in values.items() if k in known}})


def read_config(path: Path) -> CLIPConfig:
    """A hub CLIP config.json → CLIPConfig (values missing there keep the CLIP defaults, as transformers does)."""
    from wanalpha.data.files import read_json

    data = read_json(path, "give the config.json of a CLIP model")
    if not isinstance(data, dict):
        raise WanAlphaError(f"{path}: not a CLIP config (expected a JSON object); use the model's own config.json")
    text = data.get("text_config") or data.get("text_config_dict") or {}
    vision = data.get("vision_config") or data.get("vision_config_dict") or {}
    default = CLIPConfig()
    return CLIPConfig(
        text=_tower(text, default.text),
        vision=_tower(vision, default.vision),
        projection_dim=int(data.get("projection_dim", default.projection_dim)),
    )


def load_clip_model(folder: Path, device: torch.device | str = "cpu") -> CLIPModel:
    """The model of a CLIP folder, its weights checked key by key (the position_ids buffers of older files are
    ignored)."""
    from wanalpha.checkpoints.io import check_keys, read_state_dict

    config = read_config(folder / "config.json")
    with torch.device("meta"):
        model = CLIPModel(config)
    state = read_state_dict(_weights(folder) or folder / WEIGHTS[0], "CLIP weights")
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_keys(expected, state, f"CLIP weights in {folder}")
    model.load_state_dict(state, assign=True)
    return model.to(device=device, dtype=torch.float32).eval().requires_grad_(False)


class CLIPScorer:
    """Text and image embeddings of one CLIP model, and their cosine similarity."""

    def __init__(self, model: CLIPModel, tokenizer_file: Path, mean=IMAGE_MEAN, std=IMAGE_STD) -> None:
        from tokenizers import Tokenizer

        self.model = model
        self.device = next(model.parameters()).device
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.eos = self.tokenizer.token_to_id("<|endoftext|>")
        if self.eos is None:
            raise WanAlphaError(f"{tokenizer_file} has no <|endoftext|> token; it is not a CLIP tokenizer")
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)

    @classmethod
    def load(cls, folder: Path, device: torch.device | str = "cpu") -> CLIPScorer:
        mean, std = IMAGE_MEAN, IMAGE_STD
        preprocessor = folder / "preprocessor_config.json"
        if preprocessor.is_file():
            data = json.loads(preprocessor.read_text(encoding="utf-8"))
            mean, std = tuple(data.get("image_mean", mean)), tuple(data.get("image_std", std))
        return cls(load_clip_model(folder, device), folder / "tokenizer.json", mean, std)

    def tokens(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask) (B, L): the tokenizer's ids (with its start and end tokens), cut to the model's context
        (keeping the end token last) and padded with the end token, as the hub's CLIP tokenizer pads."""
        length = self.model.config.text.max_position_embeddings
        rows = []
        for encoding in self.tokenizer.encode_batch(texts):
            ids = encoding.ids
            rows.append(ids[: length - 1] + [self.eos] if len(ids) > length else ids)
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [self.eos] * (width - len(r)) for r in rows], dtype=torch.int64)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=torch.int64)
        return ids.to(self.device), mask.to(self.device)

    def pixels(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (N,H,W,3) → normalised (N,3,S,S): the shorter side resized to S (bicubic, antialiased), the centre
        S×S cropped, as CLIP's preprocessing."""
        size = self.model.config.vision.image_size
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2).float() / 255
        h, w = x.shape[2:]
        scale = size / min(h, w)
        x = F.interpolate(
            x,
            size=(max(size, round(h * scale)), max(size, round(w * scale))),
            mode="bicubic",
            align_corners=False,
            antialias=True,
        ).clamp(0, 1)
        top, left = (x.shape[2] - size) // 2, (x.shape[3] - size) // 2
        return (x[:, :, top : top + size, left : left + size] - self.mean) / self.std

    @torch.no_grad()
    def similarity(self, text: str, images: np.ndarray, batch: int = 16) -> np.ndarray:
        """cos(E_text(text), E_image(image)) for each image (N,H,W,3) uint8 → (N,) float."""
        ids, mask = self.tokens([text])
        t = F.normalize(self.model.text_features(ids, mask), dim=-1)
        out = []
        for start in range(0, len(images), batch):
            v = F.normalize(self.model.image_features(self.pixels(images[start : start + batch])), dim=-1)
            out.append((v @ t[0]).cpu())
        return torch.cat(out).numpy()
