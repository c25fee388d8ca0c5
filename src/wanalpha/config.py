"""Run configs: one pydantic model per command (DESIGN §7.8).

Every field is documented (the text is the CLI's `--help`), defaults are the seed guide's / paper's values,
unknown keys are errors. A config comes from a YAML/JSON file (`--config run.yaml`) with command-line flags on
top; the resolved config is saved next to the command's outputs as `config.yaml`.

This module must stay light: `wanalpha --help` imports it, and must not import torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from wanalpha.errors import ConfigError

LinkMode = Literal["copy", "hardlink", "symlink"]


class RunConfig(BaseModel):
    """Shared behaviour of every command's config: strict keys, validated assignment, YAML round trip."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @classmethod
    def resolve(cls, config_file: Path | None = None, overrides: dict[str, Any] | None = None):
        """Defaults < the config file < flags (`overrides`, None values = not given). Raises ConfigError."""
        values: dict[str, Any] = {}
        source = "flags"
        if config_file is not None:
            values = read_config_file(config_file)
            source = str(config_file)
        for key, value in (overrides or {}).items():
            if value is not None:
                values[key] = value
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(cls, exc, source)) from None

    def to_yaml(self) -> str:
        """The resolved config as YAML (field order of the model), loadable again with `--config`."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def read_config_file(path: Path) -> dict[str, Any]:
    """A YAML or JSON mapping; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML/JSON file to --config")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML/JSON: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of field: value, not {type(data).__name__}")
    # Accept the seed guide's kebab-case spelling in files too.
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def describe_validation_error(model: type[BaseModel], exc: ValidationError, source: str) -> str:
    """One line: the field (as file key and flag), what is wrong, and what is allowed."""
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]]
    field = loc[0] if loc else ""
    flag = "--" + field.replace("_", "-") if field else ""
    kind = err["type"]
    if kind == "extra_forbidden":
        allowed = ", ".join(model.model_fields)
        return f"{source}: unknown key '{field}'; allowed keys: {allowed}"
    if kind == "missing":
        return f"{source}: '{field}' is required; set it in the config file or pass {flag}"
    msg = err["msg"]
    if not field:  # a model-level rule (several fields together)
        return f"{source}: {msg.removeprefix('Value error, ')}"
    got = err.get("input")
    return f"{source}: bad value for '{field}' ({flag}): {msg.removeprefix('Value error, ')} (got {got!r})"


class PrepareConfig(RunConfig):
    """`wanalpha prepare`: raw RGBA material → a checked dataset folder with `metadata.csv` (seed guide Step 1)."""

    source_dir: Path | None = Field(
        None,
        description="Folder of raw clips: NNN.mp4 (RGB), NNN_seg.mp4 (alpha), NNN.txt (caption).",
    )
    source_csv: Path | None = Field(
        None,
        description="Official Wan-Alpha layout instead of --source-dir: a CSV with columns video_fgr, video_pha, "
        "prompt (paths relative to the CSV).",
    )
    output_dir: Path = Field(
        ...,
        description="Dataset folder to write: NNN_rgb.mp4, NNN_alpha.mp4, metadata.csv (with --synthetic: the "
        "raw source layout).",
    )
    recursive: bool = Field(False, description="Also look for clips in sub-folders of --source-dir.")
    link: LinkMode = Field("copy", description="How clips reach --output-dir: copy, hardlink or symlink (absolute).")
    strict: bool = Field(False, description="Fail (exit 1) if any clip would be skipped, instead of skipping it.")
    default_caption: str | None = Field(
        None, description="Caption for clips whose NNN.txt is missing or empty (otherwise they are skipped)."
    )
    alpha_grey_tolerance: int = Field(
        12,
        ge=0,
        le=255,
        description="Largest channel spread (0-255) of an alpha frame still counted as greyscale; above it a "
        "warning is printed (codecs add a little chroma noise).",
    )
    synthetic: int | None = Field(
        None,
        ge=1,
        description="Instead of preparing: write N synthetic RGBA clips in the raw source layout into "
        "--output-dir (ready for `prepare --source-dir`).",
    )
    num_frames: int = Field(17, ge=1, description="Frames per synthetic clip (4n+1 suits the Wan VAE).")
    width: int = Field(128, ge=16, description="Width of synthetic clips in pixels (a multiple of 16).")
    height: int = Field(128, ge=16, description="Height of synthetic clips in pixels (a multiple of 16).")
    fps: float = Field(16.0, gt=0, description="Frame rate of synthetic clips (Wan2.1 samples at 16 fps).")
    seed: int = Field(0, description="Seed of the synthetic clips: the same seed gives the same clips.")

    @model_validator(mode="after")
    def _one_source(self) -> PrepareConfig:
        given = [
            name
            for name, value in (
                ("source_dir", self.source_dir),
                ("source_csv", self.source_csv),
                ("synthetic", self.synthetic),
            )
            if value is not None
        ]
        if len(given) != 1:
            what = "none" if not given else " and ".join(given)
            raise ValueError(f"give exactly one of --source-dir, --source-csv or --synthetic (got {what})")
        if self.synthetic is not None:
            for name in ("width", "height"):
                if getattr(self, name) % 16:
                    raise ValueError(f"--{name} must be a multiple of 16 for synthetic clips")
        return self
