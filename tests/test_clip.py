"""wanalpha.models.clip / wanalpha.checkpoints.clip: the CLIP of eval's text–video score, on a tiny config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hub_server import HubServer
from tiny_clip import write_tiny_clip
from wanalpha.checkpoints.clip import CLIPScorer, load_clip_model, resolve_clip
from wanalpha.errors import WanAlphaError


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


def test_matches_transformers_clip(tiny_clip: Path) -> None:
    """Our CLIP gives the text and image embeddings of transformers' CLIPModel on the same weights (a padded batch,
    the legacy end-token rule of the OpenAI configs)."""
    transformers = pytest.importorskip("transformers")
    theirs = transformers.CLIPModel.from_pretrained(str(tiny_clip), local_files_only=True).eval()
    scorer = CLIPScorer.load(tiny_clip)
    ids, mask = scorer.tokens(["a red circle moving right", "the cat", "a yellow triangle with soft edges"])
    assert ids.shape == (3, 8) and mask.sum(1).tolist() == [7, 4, 8]
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        text = theirs.get_text_features(input_ids=ids, attention_mask=mask)
        image = theirs.get_image_features(pixel_values=pixels)
        text = text if isinstance(text, torch.Tensor) else text.pooler_output  # transformers 5 wraps them
        image = image if isinstance(image, torch.Tensor) else image.pooler_output
        torch.testing.assert_close(scorer.model.text_features(ids, mask), text, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(scorer.model.image_features(pixels), image, rtol=1e-4, atol=1e-5)


def test_scorer_preprocessing_and_similarity(tiny_clip: Path) -> None:
    scorer = CLIPScorer.load(tiny_clip)
    frames = np.random.default_rng(0).integers(0, 256, (3, 48, 80, 3)).astype(np.uint8)
    pixels = scorer.pixels(frames)
    assert pixels.shape == (3, 3, 32, 32)
    grey = scorer.pixels(np.full((1, 40, 40, 3), 128, np.uint8))  # no resampling artefact on a flat image
    expected = (128 / 255 - scorer.mean) / scorer.std
    torch.testing.assert_close(grey, expected.expand(1, 3, 32, 32), rtol=0, atol=1e-4)
    cos = scorer.similarity("a red circle", frames)
    assert cos.shape == (3,) and np.all(np.abs(cos) <= 1)
    assert not np.allclose(cos, scorer.similarity("the cat", frames))
    np.testing.assert_allclose(scorer.similarity("a red circle", frames[1:2]), cos[1:2], rtol=1e-5)
    long_ids, _ = scorer.tokens([" ".join(["red"] * 40)])  # cut to the context, the end token kept last
    assert long_ids.shape == (1, 16) and int(long_ids[0, -1]) == scorer.eos


def test_weights_are_checked_key_by_key(tiny_clip: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (broken / name).write_bytes((tiny_clip / name).read_bytes())
    state = load_file(str(tiny_clip / "model.safetensors"))
    state.pop("text_projection.weight")
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(WanAlphaError, match="missing: text_projection.weight"):
        load_clip_model(broken)


def test_resolution_local_hub_and_offline(tiny_clip: Path, tmp_path: Path, monkeypatch) -> None:
    assert resolve_clip(tiny_clip) == tiny_clip
    with pytest.raises(WanAlphaError, match="lacks tokenizer.json"):
        (tmp_path / "half").mkdir()
        (tmp_path / "half" / "config.json").write_text("{}")
        resolve_clip(tmp_path / "half")
    with pytest.raises(WanAlphaError, match="neither a folder nor a hub id"):
        resolve_clip("no-such-folder")
    files = {name: (tiny_clip / name).read_bytes() for name in ("config.json", "tokenizer.json", "model.safetensors")}
    with HubServer() as server:
        server.add("tiny/clip", files | {"README.md": b"not fetched"})
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
        folder = resolve_clip("tiny/clip", tmp_path / "models")
        assert folder == tmp_path / "models/tiny/clip"
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
        requests = len(server.requests)
        assert resolve_clip("tiny/clip", tmp_path / "models") == folder and len(server.requests) == requests
        server.add("tiny/no-weights", {"config.json": files["config.json"], "tokenizer.json": b"{}"})
        with pytest.raises(WanAlphaError, match="has neither model.safetensors nor pytorch_model.bin"):
            resolve_clip("tiny/no-weights", tmp_path / "models")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WanAlphaError, match="HF_HUB_OFFLINE is set"):
        resolve_clip("tiny/other", tmp_path / "models")
    assert json.loads((folder / "config.json").read_text())["projection_dim"] == 16
