"""Run configs: one pydantic model per command (DESIGN §7.8).

Every field is documented (the text is the CLI's `--help`), defaults are the seed guide's / paper's values,
unknown keys are errors. A config comes from a YAML/JSON file (`--config run.yaml`) with command-line flags on
top; the resolved config is saved next to the command's outputs as `config.yaml`.

This module must stay light: `wanalpha --help` imports it, and must not import torch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator

from wanalpha.data.files import read_utf8
from wanalpha.errors import ConfigError

LinkMode = Literal["copy", "hardlink", "symlink"]
# Limits every command shares: seeds fit torch's and numpy's generators, sizes and rates stay physical.
SEED_MAX = 2**63 - 1
MAX_SIDE = 8192  # pixels
MAX_FRAMES = 4097
MAX_FPS = 1000.0


def _flag(info: ValidationInfo) -> str:
    return "--" + str(info.field_name).replace("_", "-")


def frames_problem(frames: int) -> str | None:
    """What is wrong with a clip of `frames` frames for the Wan VAE (it takes 4n+1: 1, 5, …, 81) and the fix; None
    when nothing is."""
    if (frames - 1) % 4 == 0:
        return None
    lo = 1 + 4 * ((frames - 1) // 4)
    return f"must be 4n+1 for the Wan VAE (got {frames}; use {lo} or {lo + 4})"


def side_problem(pixels: int) -> str | None:
    """What is wrong with a frame side of `pixels` (the VAE's 8x and the DiT's 2x2 patches need multiples of 16)."""
    return None if pixels % 16 == 0 else f"must be a multiple of 16 (got {pixels})"


def _four_n_plus_one(value: int, info: ValidationInfo) -> int:
    if problem := frames_problem(value):
        raise ValueError(f"{_flag(info)} {problem}")
    return value


def _multiple_of_16(value: int, info: ValidationInfo) -> int:
    if problem := side_problem(value):
        raise ValueError(f"{_flag(info)} {problem}")
    return value


# The shared constraints of fields (their bounds appear in `--help`; a broken rule names the flag and the fix).
FrameCount = Annotated[int, Field(ge=1, le=MAX_FRAMES), AfterValidator(_four_n_plus_one)]  # the Wan VAE's 4n+1
Side = Annotated[int, Field(ge=16, le=MAX_SIDE), AfterValidator(_multiple_of_16)]  # pixels: 8x VAE, 2x2 patches
Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]
Fps = Annotated[float, Field(gt=0, le=MAX_FPS)]
RGBAVariant = Annotated[
    Literal["v1", "v2"],
    Field(
        description="Which Wan-Alpha RGBA VAE: v1 = the seed recipe (FeatureMergeBlock over the two latents; decoder "
        "LoRAs from decoder.bin); v2 = Wan-Alpha v2.0 (the official EncoderFeatureMerge over encoder features; a v2 "
        "file holds the merge and the decoder LoRAs). With v2, train-merge trains both with the v2 losses (+ the "
        "0.1x diffusion loss through a frozen DiT), cache --stage dit also stores each clip's Gaussian mask, "
        "train-dit shifts the noise by --alpha-shift-mean outside it (in bf16, as upstream), and validate reads the "
        "decoder LoRAs from --feature-merge-checkpoint unless --vae-lora-path is given."
    ),
]

# Where the seed guide (and `wanalpha download`) puts the release files: commands look there when no path is given.
GUIDE_WAN_FOLDER = Path("models/Wan-AI/Wan2.1-T2V-14B")
GUIDE_FILES = {
    "base_vae_path": GUIDE_WAN_FOLDER / "Wan2.1_VAE.pth",
    "vae_lora_path": Path("Wan-Alpha/vae/decoder.bin"),
    "dit_path": GUIDE_WAN_FOLDER,
    "t5_path": GUIDE_WAN_FOLDER / "models_t5_umt5-xxl-enc-bf16.pth",
}
GUIDE_MERGE_FOLDER = Path("models/train/feature_merge")  # train-merge's default --output-path


def guide_paths(data, *fields: str):
    """`data` with each of `fields` that was not given set to the seed guide's location of that file (GUIDE_FILES);
    the Wan2.1 DiT and text encoder only when --model-id-with-origin-paths does not name them."""
    if not isinstance(data, dict):
        return data
    hub = data.get("model_id_with_origin_paths")
    filled = {f: GUIDE_FILES[f] for f in fields if data.get(f) is None and not (hub and f in ("dit_path", "t5_path"))}
    return data | filled


def newest_merge_checkpoint(folder: Path = GUIDE_MERGE_FOLDER) -> Path | None:
    """The newest feature_merge_epoch_N.safetensors of a train-merge output folder (the guide's by default)."""
    files = sorted(Path(folder).glob("feature_merge_epoch_*.safetensors"), key=lambda p: p.stat().st_mtime)
    return files[-1] if files else None


def _split_commas(data, key: str):
    """A list field given as "a,b,c" (or as repeated flags, each possibly comma-separated) → ["a", "b", "c"]."""
    if not isinstance(data, dict) or key not in data:
        return data
    value = data[key]
    parts = [value] if isinstance(value, str) else value
    if isinstance(parts, list) and all(isinstance(p, str) for p in parts):
        return dict(data, **{key: [v.strip() for p in parts for v in p.split(",") if v.strip()]})
    return data


class RunConfig(BaseModel):
    """Shared behaviour of every command's config: strict keys, validated assignment, YAML round trip."""

    # Non-finite floats (inf, nan) are refused everywhere: no learning rate, scale, shift or fps may be one.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

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

    def given(self) -> dict[str, Any]:
        """The fields set explicitly (in the config file or as flags) and their values; defaults are not given."""
        return {name: getattr(self, name) for name in self.model_fields_set}

    def to_yaml(self) -> str:
        """The resolved config as YAML (field order of the model), loadable again with `--config`."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def read_config_file(path: Path) -> dict[str, Any]:
    """A YAML or JSON mapping; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML/JSON file to --config")
    text = read_utf8(path, f"config file {path}", ConfigError)
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
    msg = err["msg"].removeprefix("Value error, ")
    if not field or msg.startswith(f"{flag} "):  # a model-level rule (several fields), or one naming its flag
        return f"{source}: {msg}"
    got = err.get("input")
    return f"{source}: bad value for '{field}' ({flag}): {msg} (got {got!r})"


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
    num_frames: int = Field(17, ge=1, le=MAX_FRAMES, description="Frames per synthetic clip (4n+1 suits the Wan VAE).")
    width: Side = Field(128, description="Width of synthetic clips in pixels (a multiple of 16).")
    height: Side = Field(128, description="Height of synthetic clips in pixels (a multiple of 16).")
    fps: Fps = Field(16.0, description="Frame rate of synthetic clips (Wan2.1 samples at 16 fps).")
    seed: Seed = Field(0, description="Seed of the synthetic clips: the same seed gives the same clips.")

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
        return self


# ----------------------------------------------------------------------------------------- shared sections

Precision = Literal["auto", "no", "bf16", "fp16"]


class BaseVAEFile(RunConfig):
    """The Wan2.1 VAE the RGB-alpha VAE is built on, where the seed guide puts it."""

    base_vae_path: Path = Field(
        GUIDE_FILES["base_vae_path"],
        description="Official Wan2.1 VAE weights (default: where the seed guide and `wanalpha download` put it).",
    )


class VAEFiles(BaseVAEFile):
    """The RGB-alpha VAE's files, as the seed guide names them (commands whose decoders read decoder.bin)."""

    vae_lora_path: Path = Field(
        GUIDE_FILES["vae_lora_path"],
        description="Wan-Alpha's decoder LoRAs (decoder.bin): vae_fgr → RGB decoder, vae_pha → alpha decoder "
        "(default: where the seed guide and `wanalpha download wan-alpha-v1` put it).",
    )


class ClipOptions(RunConfig):
    """How clips are cut for the VAE: size, frame count, stride."""

    height: Side = Field(480, description="Frame height after resize + centre-crop (a multiple of 16).")
    width: Side = Field(832, description="Frame width after resize + centre-crop (a multiple of 16).")
    num_frames: FrameCount = Field(81, description="Frames per clip; must be 4n+1 (1, 5, …, 81) for the Wan VAE.")
    frame_stride: int = Field(1, ge=1, description="Take every N-th source frame (2 halves the frame rate).")
    loop_short_clips: bool = Field(
        False, description="Loop clips shorter than num_frames × stride instead of skipping them."
    )


class DatasetOptions(RunConfig):
    dataset_base_path: Path | None = Field(
        None, description="Prepared dataset folder (NNN_rgb.mp4, NNN_alpha.mp4, metadata.csv from `prepare`)."
    )
    dataset_metadata_path: Path | None = Field(
        None, description="metadata.csv listing the clips (default: <dataset_base_path>/metadata.csv)."
    )


# ----------------------------------------------------------------------------------------------- commands


class ColourOptions(RunConfig):
    colours: list[int] = Field(
        default_factory=lambda: list(range(8)),
        description="Background colours (indices 0-7 of the RGB-cube corners, 4r+2g+b) the RGB is hard-rendered "
        "over for the encoder. Comma-separated on the command line.",
    )
    colour_draw: Literal["clip", "step"] = Field(
        "clip",
        description="DiT data (cache --stage dit, train-dit): clip = official (the T2V data prep renders each clip "
        "once over one colour drawn among --colours; here drawn from --seed and the clip's name, so a cache and "
        "training from videos agree); step = every colour's latent is kept and one drawn per step (8x the cache). "
        "cache --stage merge always keeps every colour: the VAE training draws one per step, as upstream.",
    )

    @model_validator(mode="before")
    @classmethod
    def _split_colours(cls, data):
        return _split_commas(data, "colours")

    @model_validator(mode="after")
    def _check_colours(self):
        bad = [c for c in self.colours if not 0 <= c < 8]
        if bad or not self.colours or len(set(self.colours)) != len(self.colours):
            raise ValueError(f"--colours must be distinct indices 0-7 (got {self.colours})")
        return self


class WanModelFiles(RunConfig):
    """Wan2.1 T2V files: local paths, or the seed guide's hub ids (resolved into --models-dir)."""

    model_id_with_origin_paths: str | None = Field(
        None,
        description="Comma-separated owner/model:file-pattern entries, e.g. Wan-AI/Wan2.1-T2V-14B:"
        "diffusion_pytorch_model*.safetensors,Wan-AI/Wan2.1-T2V-14B:models_t5_umt5-xxl-enc-bf16.pth; downloaded "
        "into --models-dir when missing.",
    )
    models_dir: Path = Field(Path("models"), description="Where hub ids resolve: <models_dir>/<owner>/<model>/.")
    dit_path: Path | None = Field(
        None, description="DiT weights: a folder of diffusion_pytorch_model*.safetensors, an index json or a file."
    )
    t5_path: Path | None = Field(None, description="UMT5 encoder weights (models_t5_umt5-xxl-enc-bf16.pth).")
    tokenizer_path: Path | None = Field(
        None, description="UMT5 tokenizer folder (default: google/umt5-xxl beside the T5 weights)."
    )

    def wan_files(self) -> dict[str, Any]:
        """This section as the keyword arguments of wanalpha.checkpoints.wan.wan_model_files."""
        return {name: getattr(self, name) for name in WanModelFiles.model_fields}


class DiTSpeedOptions(RunConfig):
    """Opt-in speed levers of the DiT (train-dit and generate)."""

    rope_precision: Literal["float64", "float32"] = Field(
        "float64",
        description="RoPE arithmetic of the DiT: float64 as upstream; float32 is 2-3 % faster on a GPU "
        "and within the reference tolerance (docs/benchmarks.md).",
    )
    attention: Literal["auto", "sdpa", "fa4", "fa3", "fa3-fp8"] = Field(
        "auto",
        description="Self-attention kernel of the DiT: auto = FlashAttention-4 where the flash-attn-4 package is "
        "installed and the GPU is a Hopper or Blackwell one running bf16/fp16 (12-17 % faster than cuDNN's on an "
        "H200, docs/benchmarks.md), else PyTorch SDPA; sdpa; fa4; fa3 = FlashAttention-3 (flash_attn_interface, "
        "as the official Wan2.1 code), inference only; fa3-fp8 = its FP8 forward on Hopper (queries, keys and "
        "values quantised per head: faster, approximate; docs/benchmarks.md gives its error), inference only. "
        "fa4, fa3 and fa3-fp8 are an error where they cannot run.",
    )


class CacheConfig(ColourOptions, WanModelFiles, DatasetOptions, ClipOptions, BaseVAEFile):
    """`wanalpha cache`: run the frozen encoders once per clip. --stage merge (default): RGB and alpha latents for
    train-merge --cache_dir; --stage dit: merged latents and text embeddings for train-dit --cache_dir."""

    stage: Literal["merge", "dit"] = Field("merge", description="What to cache: merge (stage 1) or dit (stage 2).")
    variant: RGBAVariant = "v1"
    vae_lora_path: Path | None = Field(
        None, description="Accepted for the seed guide's command line; caching runs only the (LoRA-free) encoder."
    )
    feature_merge_checkpoint: Path | None = Field(
        None, description="--stage dit: the trained merge block (feature_merge_epoch_N.safetensors)."
    )
    output_dir: Path = Field(..., description="Folder for the cache shards (one safetensors file per clip).")
    mixed_precision: Precision = Field(
        "no", description="Encoder precision: no (fp32, exact), bf16, fp16, or auto (bf16 on a GPU)."
    )
    seed: Seed = Field(
        42,
        description="--stage dit --colour-draw clip: seed of each clip's background colour (train-dit from videos "
        "with the same --seed draws the same colours).",
    )

    @model_validator(mode="before")
    @classmethod
    def _guide_files(cls, data):
        """--stage dit without path flags: the text encoder and newest merge block where the seed guide puts them."""
        if isinstance(data, dict) and data.get("stage") == "dit":
            data = guide_paths(data, "t5_path")
            if data.get("feature_merge_checkpoint") is None and (newest := newest_merge_checkpoint()) is not None:
                data = data | {"feature_merge_checkpoint": newest}
        return data

    @model_validator(mode="after")
    def _check(self):
        if self.vae_lora_path is not None and not Path(self.vae_lora_path).is_file():
            raise ValueError(
                f"--vae-lora-path {self.vae_lora_path} does not exist; cache does not use it (it is "
                "accepted for the seed guide's command line): fix the path or drop the flag"
            )
        if self.dataset_base_path is None:
            raise ValueError("--dataset-base-path is required (the prepared dataset folder)")
        if self.stage == "dit":
            if self.feature_merge_checkpoint is None:
                raise ValueError("--stage dit needs --feature-merge-checkpoint (the trained merge block)")
            if self.t5_path is None and self.model_id_with_origin_paths is None:
                raise ValueError("--stage dit needs the text encoder: --t5-path or --model-id-with-origin-paths")
        return self


class TrainingOptions(RunConfig):
    """The training loop's settings (train-merge and train-dit share the loop: wanalpha.training)."""

    batch_size: int = Field(1, ge=1, description="Clips per step on each GPU.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Steps whose gradients are summed per update.")
    max_grad_norm: float = Field(
        0.0, ge=0, description="Gradient clipping norm; 0 (the default, as the official trainings) never clips."
    )
    lr_warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warm-up, in optimizer updates.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer updates (for short runs).")
    checkpoints_total_limit: int = Field(2, ge=1, description="Training states to keep (oldest are deleted).")
    log_steps: int = Field(1, ge=1, description="Log the loss every N updates (terminal, CSV, TensorBoard).")
    resume: bool = Field(False, description="Continue from the latest training state in --output-path.")
    keep_epochs: int | None = Field(
        None,
        ge=1,
        description="Keep only the newest N epochs' files (feature_merge_epoch_*, epoch-*; the last epoch's are never "
        "removed); default: keep every epoch, as the official trainings do.",
    )
    num_workers: int = Field(2, ge=0, description="DataLoader worker processes.")
    mixed_precision: Precision = Field("auto", description="no, bf16, fp16, or auto (bf16 on a GPU, fp32 on CPU).")

    def loop_settings(self, name: str, num_epochs: int, seed: int, save_steps: int):
        """The LoopSettings of wanalpha.training: these options, and the three each command declares with its own
        default and meaning (imported here: config stays torch-free)."""
        from wanalpha.training import LoopSettings

        return LoopSettings(
            name,
            self.batch_size,
            self.gradient_accumulation_steps,
            num_epochs,
            self.max_steps,
            seed,
            save_steps,
            self.log_steps,
            self.num_workers,
            self.max_grad_norm,
            self.checkpoints_total_limit,
            self.resume,
            self.keep_epochs,
        )


# Wan-Alpha v2.0's VAE training (Wan-Alpha-VAE-train/train.sh and train_vae.py): the values the recipe sets; the same
# as configs/official-v2-vae.yaml (a test keeps the two equal).
TRAIN_MERGE_RECIPES: dict[str, dict[str, Any]] = {
    "official-v2": {
        "variant": "v2",
        "num_frames": 17,  # train.sh --num_frames 17
        "height": 272,  # --height 272
        "width": 272,  # --width 272
        "frame_stride": 1,  # the dataset reads consecutive frames
        "augment": "official",  # transparent_video_dataset_image.py
        "batch_size": 2,  # --batch_size 2 (per GPU; 8 GPUs in train.sh)
        "gradient_accumulation_steps": 1,  # Lightning's default
        "lora_rank": 128,  # --lora_rank 128 (lora_alpha 1)
        "learning_rate": 1e-4,  # --learning_rate 1e-4, constant (no scheduler)
        "lr_warmup_steps": 0,
        "weight_decay": 0.01,  # torch.optim.AdamW's default (train_vae.py passes only lr)
        "max_grad_norm": 0.0,  # the Lightning Trainer is given no gradient clipping
        "num_epochs": 100,  # --max_epochs 100
        "mixed_precision": "bf16",  # precision="bf16-mixed"
        "diffusion_weight": 0.1,  # training_step: 0.1 × the t2v loss
        "alpha_weight": 1.0,
        "rgb_soft_weight": 1.0,
        "rgb_hard_weight": 1.0,
        "sobel_weight": 1.0,
        "perceptual_weight": 1.0,  # VGGLoss on the same three pairs (torchvision's ImageNet VGG16)
    }
}


class TrainMergeConfig(TrainingOptions, WanModelFiles, DatasetOptions, ClipOptions, BaseVAEFile):
    """`wanalpha train-merge` (stage 1): v1 trains the FeatureMergeBlock (encoder and both LoRA'd decoders frozen);
    v2 trains the official EncoderFeatureMerge together with fresh decoder LoRAs, with the official v2 losses."""

    variant: RGBAVariant = "v1"
    vae_lora_path: Path | None = Field(
        None,
        description="v1: Wan-Alpha's decoder LoRAs (decoder.bin), required. v2: optional, a v2 file (or "
        "decoder.bin) to start the decoder LoRAs (and the merge block, from its middle.* keys) from.",
    )
    merge_init: Literal["identity", "random"] = Field(
        "identity",
        description="v1: start the merge block as the identity on the RGB latent (the decoders and the "
        "DiT see familiar latents from the first step), or from its plain random initialisation.",
    )
    merge_from: Path | None = Field(
        None,
        description="v1: start the merge block from this checkpoint (a feature_merge_*.safetensors, e.g. one "
        "trained along with the decoder LoRAs) instead of --merge_init; a training state to resume still wins.",
    )
    lora_rank: int = Field(128, ge=1, description="v2: rank of the fresh decoder LoRAs (official 128, lora_alpha 1).")
    diffusion_weight: float = Field(
        0.1,
        ge=0,
        description="v2: weight of the diffusion loss through the frozen DiT (official 0.1; 0 = off, "
        "then no DiT is needed).",
    )
    augment: Literal["auto", "official", "none"] = Field(
        "auto",
        description="How clips are cut. official: the v2 VAE dataset's augmentation, drawn anew each epoch from "
        "(seed, epoch, clip): a random start frame, short clips played forwards and backwards, a random 1-2x "
        "scale and crop, still images panned slowly. none: frames from the start, centre crop (fixed, as the "
        "cache holds them). auto: official with --variant v2, none with v1.",
    )
    recipe: Literal["official-v2"] | None = Field(
        None,
        description="Start from a named recipe (its values under the config file's and the flags'): official-v2 "
        "= Wan-Alpha v2.0's VAE training (Wan-Alpha-VAE-train/train.sh: 17 frames, 272x272, batch 2 per GPU, "
        "LoRA rank 128, lr 1e-4, 100 epochs, bf16, the official augmentation and losses); the same as "
        "configs/official-v2-vae.yaml.",
    )

    cache_dir: Path | None = Field(
        None, description="Train from `wanalpha cache` shards instead of videos (no encoder in memory)."
    )
    output_path: Path = Field(
        Path("./models/train/feature_merge"),
        description="Output folder: feature_merge_epoch_{N}.safetensors, checkpoints/, loss_log.csv, TensorBoard.",
    )
    learning_rate: float = Field(1e-4, gt=0, description="AdamW learning rate (seed guide: 1e-4).")
    num_epochs: int = Field(10, ge=1, description="Passes over the dataset (seed guide: 10; epochs count from 0).")
    weight_decay: float = Field(
        0.01,
        ge=0,
        description="AdamW weight decay (0.01: torch's AdamW default, which the official VAE training uses).",
    )
    seed: Seed = Field(42, description="Seed of the merge block's initialisation, data order and colour draws.")
    save_steps: int = Field(500, ge=1, description="Write a resumable training state every N updates.")
    gradient_checkpointing: bool = Field(
        True,
        description="Memory flat in the clip length (wanalpha.chunked): the decoders run without a graph, keep "
        "each latent frame's cache state (beyond a few GiB in host memory) and recompute one chunk at a time in "
        "the backward pass, with the same gradients; the merge block is checkpointed too. Off: plain autograd.",
    )
    alpha_weight: float = Field(1.0, ge=0, description="Weight of L_α, the alpha L1 term (paper eq. 10).")
    rgb_soft_weight: float = Field(1.0, ge=0, description="Weight of L_rgb^s, soft composites (paper eq. 11).")
    rgb_hard_weight: float = Field(1.0, ge=0, description="Weight of L_rgb^h, hard composites (paper eq. 12).")
    sobel_weight: float = Field(1.0, ge=0, description="Weight of the Sobel-edge term on the same pairs (0 = off).")
    perceptual_weight: float = Field(
        1.0,
        ge=0,
        description="Weight of the VGG16 perceptual term (relu2_2 MSE, as the official VAE training: 1; 0 = off, "
        "then no VGG16 weights are needed).",
    )
    vgg_path: Path | None = Field(
        None,
        description="VGG16 ImageNet weights for the perceptual term: torchvision's vgg16-397923af.pth or timm's "
        "vgg16.tv_in1k model.safetensors (default: <models_dir>/timm/vgg16.tv_in1k/model.safetensors or "
        "torchvision's cache, else fetched there from the hub: `wanalpha download vgg16`).",
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_recipe(cls, data):
        """A recipe's values go under everything given (the config file's and the flags')."""
        if isinstance(data, dict) and data.get("recipe") in TRAIN_MERGE_RECIPES:
            data = TRAIN_MERGE_RECIPES[data["recipe"]] | data
        if isinstance(data, dict) and data.get("variant", "v1") == "v1":
            data = guide_paths(data, "vae_lora_path")
        elif isinstance(data, dict) and float(data.get("diffusion_weight", 0.1) or 0) > 0:
            data = guide_paths(data, "dit_path", "t5_path")
        return data

    def clip_augment(self) -> Literal["official", "none"]:
        """The augmentation this run uses (`augment` with auto resolved by the variant)."""
        if self.augment == "auto":
            return "official" if self.variant == "v2" else "none"
        return self.augment

    @model_validator(mode="after")
    def _check(self):
        if (self.dataset_base_path is None) == (self.cache_dir is None):
            raise ValueError("give either --dataset-base-path (videos) or --cache-dir (from `wanalpha cache`)")
        if self.augment == "official" and self.cache_dir is not None:
            raise ValueError(
                "--augment official draws new crops and frames every epoch, which a cache cannot hold: "
                "train from --dataset-base-path, or use --augment none with --cache-dir"
            )
        if self.variant == "v1" and self.vae_lora_path is None:
            raise ValueError("--vae-lora-path is required: Wan-Alpha's decoder.bin (the frozen decoders' LoRAs)")
        if self.variant == "v2" and self.merge_from is not None:
            raise ValueError(
                "--merge_from is v1's (a FeatureMergeBlock checkpoint); --variant v2 starts its merge "
                "module from --vae-lora-path's middle.* entries"
            )
        if self.variant == "v2" and self.cache_dir is not None:
            raise ValueError(
                "--variant v2 encodes the videos itself (it merges encoder features, which the cache "
                "does not hold): pass --dataset-base-path instead of --cache-dir"
            )
        if (
            self.variant == "v2"
            and self.diffusion_weight > 0
            and ((self.dit_path is None or self.t5_path is None) and self.model_id_with_origin_paths is None)
        ):
            raise ValueError(
                "--variant v2's diffusion loss needs the Wan2.1 DiT and text encoder: pass --dit-path "
                "and --t5-path (or --model-id-with-origin-paths), or --diffusion-weight 0"
            )
        if self.perceptual_weight > 0 and self.vgg_path is not None and not self.vgg_path.is_file():
            raise ValueError(
                f"--vgg-path {self.vgg_path} does not exist: give torchvision's vgg16-397923af.pth or timm's "
                "vgg16.tv_in1k model.safetensors, leave it out to use (or fetch) the models folder's copy, or set "
                "--perceptual-weight 0"
            )
        return self


class ValidateConfig(DatasetOptions, VAEFiles):
    """`wanalpha validate`: reconstruct clips through the RGB-alpha VAE and measure the error."""

    feature_merge_checkpoint: Path = Field(
        ..., description="Trained merge block, e.g. models/train/feature_merge/feature_merge_epoch_9.safetensors."
    )
    test_rgb_video: Path | None = Field(None, description="One clip's RGB video (e.g. data/rgba_videos/001_rgb.mp4).")
    test_alpha_video: Path | None = Field(None, description="The same clip's alpha video (001_alpha.mp4).")
    output_prefix: str = Field(
        "validation",
        description="Output name prefix: {prefix}_gt_rgb.mp4, …, {prefix}_metrics.json (may hold a folder).",
    )
    height: Side | None = Field(None, description="Resize + crop height (default: the clip's, rounded to 16).")
    width: Side | None = Field(None, description="Resize + crop width (default: the clip's, rounded to 16).")
    num_frames: FrameCount | None = Field(None, description="Frames, 4n+1 (default: the clip's longest 4n+1 prefix).")
    background: int = Field(0, ge=0, le=7, description="Colour (0-7) the RGB is hard-rendered over for encoding.")
    max_mae: float | None = Field(
        None, gt=0, description="Exit 1 when the mean alpha, RGB or composite MAE (0-255) exceeds this."
    )
    max_clips: int | None = Field(None, ge=1, description="With a dataset: validate only the first N clips.")
    mixed_precision: Precision = Field("auto", description="no, bf16, fp16, or auto (bf16 on a GPU, fp32 on CPU).")
    variant: RGBAVariant = "v1"

    @model_validator(mode="before")
    @classmethod
    def _v2_decoders(cls, data):
        """v2: the decoder LoRAs come with the merge, from --feature-merge-checkpoint, unless --vae-lora-path."""
        if (
            isinstance(data, dict)
            and data.get("variant") == "v2"
            and data.get("vae_lora_path") is None
            and data.get("feature_merge_checkpoint") is not None
        ):
            data = data | {"vae_lora_path": data["feature_merge_checkpoint"]}
        return data

    @model_validator(mode="after")
    def _check(self):
        single = self.test_rgb_video is not None or self.test_alpha_video is not None
        if single == (self.dataset_base_path is not None):
            raise ValueError("give --test-rgb-video and --test-alpha-video, or --dataset-base-path (not both)")
        if single and (self.test_rgb_video is None or self.test_alpha_video is None):
            raise ValueError("--test-rgb-video and --test-alpha-video go together")
        return self


class TrainDiTConfig(TrainingOptions, DiTSpeedOptions, ColourOptions, WanModelFiles, DatasetOptions, ClipOptions):
    """`wanalpha train-dit` (stage 2): DoRA on the Wan DiT over merged RGBA latents, flow matching."""

    rgba_mode: bool = Field(True, description="Train on merged RGBA latents (the only mode wanalpha has).")
    data_file_keys: str = Field("video", description="Metadata columns holding media; only 'video' is valid.")
    dataset_repeat: int = Field(1, ge=1, description="Passes over the metadata per epoch (seed guide: 100).")
    vae_lora_path: Path | None = Field(
        None, description="Accepted for the seed guide's command line; training needs only the encoder and merge."
    )
    feature_merge_checkpoint: Path | None = Field(
        None, description="The trained merge block (needed unless --cache-dir holds merged latents)."
    )
    base_vae_path: Path | None = Field(
        None, description="Official Wan2.1 VAE weights (needed unless --cache-dir holds merged latents)."
    )
    cache_dir: Path | None = Field(
        None, description="Train from `wanalpha cache --stage dit` shards: only the DiT in memory (the 14B default)."
    )
    variant: RGBAVariant = "v1"
    alpha_shift_mean: float = Field(
        0.05, description="v2: the fixed noise shift α outside the mask (the official train.sh: 0.05)."
    )
    use_dora: bool = Field(True, description="DoRA adapters (the Wan-Alpha recipe); --no-use-dora trains plain LoRA.")
    dora_rank: int = Field(32, ge=1, description="Adapter rank (lora_alpha = rank, as the official training).")
    lora_target_modules: str = Field(
        "q,k,v,o,ffn.0,ffn.2", description="Comma-separated linears of every block that get adapters."
    )
    remove_prefix_in_ckpt: str | None = Field(
        None, description="Accepted for the seed guide's command line: wanalpha files never carry 'pipe.dit.'."
    )
    trainable_models: str = Field("dit", description="What trains; only 'dit' (its adapters) is valid.")
    output_path: Path = Field(
        Path("./models/train/Wan-Alpha-DiT-DoRA"),
        description="Output folder: epoch-{N}.safetensors, epoch-{E}-{step}.safetensors, checkpoints/, logs.",
    )
    learning_rate: float = Field(1e-4, gt=0, description="AdamW learning rate on the adapters (seed guide: 1e-4).")
    num_epochs: int = Field(1, ge=1, description="Epochs (seed guide: 15; files count from 0: epoch-14 is the last).")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (DiffSynth's default).")
    official_lr_start: bool = Field(
        True,
        description="Run the first updates at lr/3 as the official training (its torch ConstantLR with default "
        "settings: 5 scheduler steps, advanced once per process per update by accelerate, so ⌈5/N⌉ updates on N "
        "processes); --no-official-lr-start keeps the learning rate constant from the first update.",
    )
    seed: Seed = Field(42, description="Seed of the adapters' initialisation, data order, noise and timesteps.")
    shift: float = Field(5.0, gt=0, description="Flow-matching shift of the training schedule (Wan: 5).")
    save_steps: int = Field(500, ge=1, description="Every N updates: epoch-{E}-{N}.safetensors and a training state.")
    dit_dtype: Literal["bf16", "fp32", "fp8"] = Field(
        "bf16",
        description="Dtype of the frozen DiT weights (bf16 halves memory; adapters train in fp32). fp8: the blocks' "
        "linears hold float8_e4m3fn weights with one scale per output channel, quantised while loading (half of "
        "bf16's weight memory: 14B about 14 GB); the adapters train through the dequantised weights; norms, "
        "embeddings and the head stay bf16.",
    )
    fp8_gemm: bool = Field(
        False,
        description="With --dit-dtype fp8 on Hopper: the forward's base GEMMs in FP8 too (activations scaled per "
        "token, as generate's FP8 linears); off, the adapters train through the dequantised weights, as upstream's "
        "bf16 base. The backward stays bf16.",
    )
    preview_steps: int | None = Field(
        None,
        ge=1,
        description="Every N updates: a short low-resolution RGBA preview (checkerboard composite mp4) in "
        "previews/, sampled with the adapters as they are (needs --base-vae-path and --vae-lora-path).",
    )
    preview_frames: FrameCount = Field(17, description="Frames of each preview clip (4n+1).")
    preview_sampling_steps: int = Field(20, ge=1, description="UniPC steps of each preview (no guidance).")
    use_gradient_checkpointing: bool = Field(True, description="Recompute each DiT block in the backward pass.")
    use_gradient_checkpointing_offload: bool = Field(
        False, description="Also keep what checkpointing saves in CPU memory (for smaller GPUs)."
    )
    checkpoint_attention: bool = Field(
        False,
        description="Selective checkpointing: keep each block's self-attention output instead of recomputing "
        "it in the backward pass (about tokens x dim x 2 bytes more per block: 13 GiB for the 14B at 81x480x832).",
    )
    checkpoint_attention_blocks: int | None = Field(
        None,
        ge=1,
        description="Selective checkpointing in the first N blocks only (implies --checkpoint_attention): each "
        "block kept costs its share of that memory and saves its share of the time (docs/benchmarks.md).",
    )
    compile: bool = Field(
        False,
        description="torch.compile the DiT's blocks (fuses the element-wise work between matmuls and attention; "
        "same gradients, tested; the first step also compiles; not under FSDP). About 15 % faster per step on an "
        "H200: docs/benchmarks.md.",
    )
    compile_memory_budget: float | None = Field(
        None,
        gt=0,
        le=1,
        description="With --compile: the activation memory budget of each compiled block's backward (torch's "
        "partitioner recomputes cheap element-wise work instead of keeping it; 1 keeps what the default "
        "partitioner keeps). 0.9 takes the 14B step at 81x480x832 from 61.5 to 59.9 GiB for +1 % time: "
        "docs/benchmarks.md.",
    )
    fused_adapters: bool = Field(
        True,
        description="Run the DoRA/LoRA linears with wanalpha's fused forward (same math as peft's, fewer "
        "activation-sized temporaries, weight norms once per step: docs/benchmarks.md); --no-fused-adapters "
        "runs peft's own forward.",
    )

    @model_validator(mode="before")
    @classmethod
    def _guide_files(cls, data):
        """No path flags: the DiT (and, from videos, the text encoder, the VAE and the newest merge block) where the
        seed guide puts them."""
        if not isinstance(data, dict):
            return data
        data = guide_paths(data, "dit_path")
        if data.get("cache_dir") is None:
            data = guide_paths(data, "t5_path", "base_vae_path")
            if data.get("feature_merge_checkpoint") is None and (newest := newest_merge_checkpoint()) is not None:
                data = data | {"feature_merge_checkpoint": newest}
        return data

    @model_validator(mode="after")
    def _check(self):
        if self.vae_lora_path is not None and not Path(self.vae_lora_path).is_file():
            raise ValueError(
                f"--vae-lora-path {self.vae_lora_path} does not exist; train-dit uses it only for "
                "--preview-steps (it is accepted for the seed guide's command line): fix the path or "
                "drop the flag"
            )
        if self.fp8_gemm and self.dit_dtype != "fp8":
            raise ValueError(f"--fp8-gemm needs --dit-dtype fp8 (got --dit-dtype {self.dit_dtype})")
        if not self.rgba_mode:
            raise ValueError("--no-rgba-mode is not supported: wanalpha trains on merged RGBA latents")
        if self.data_file_keys.strip() != "video":
            raise ValueError(f"--data-file-keys must be 'video' (got {self.data_file_keys!r})")
        if self.trainable_models.strip() != "dit":
            raise ValueError(f"--trainable-models must be 'dit' (got {self.trainable_models!r})")
        if (self.dataset_base_path is None) == (self.cache_dir is None):
            raise ValueError(
                "give either --dataset-base-path (videos) or --cache-dir (from `wanalpha cache --stage dit`)"
            )
        if self.cache_dir is None:
            missing = [f for f in ("base_vae_path", "feature_merge_checkpoint") if getattr(self, f) is None]
            if missing:
                raise ValueError(f"training from videos needs --{missing[0].replace('_', '-')} (or use --cache-dir)")
            if self.t5_path is None and self.model_id_with_origin_paths is None:
                raise ValueError(
                    "training from videos needs the text encoder: --t5-path or --model-id-with-origin-paths"
                )
        if self.dit_path is None and self.model_id_with_origin_paths is None:
            raise ValueError("the DiT is needed: --dit-path or --model-id-with-origin-paths")
        if self.compile_memory_budget is not None and not self.compile:
            raise ValueError("--compile-memory-budget applies to compiled blocks: add --compile or drop it")
        if self.preview_steps is not None and (self.base_vae_path is None or self.vae_lora_path is None):
            raise ValueError("--preview-steps needs the decoders: --base-vae-path and --vae-lora-path")
        return self


# The official generate script's default negative prompt (reference constants.json
# negative_prompt.generate_script_default_n_prompt).
OFFICIAL_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，"
    "画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
# The Wan config's sample_neg_prompt (reference constants.json negative_prompt.config_sample_neg_prompt): what the
# official pipeline uses when the negative prompt is "".
CONFIG_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，"
    "多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
OUTPUT_FORMATS = ("webm", "mov", "webp", "apng")


def parse_ellipse_spec(spec: str) -> tuple[float, ...]:
    """ "cx,cy,w,h[,angle]" → (cx, cy, w, h, angle): centre and full axes as fractions of the frame (0-1, the axes
    above 0), angle in degrees. Raises ValueError."""
    try:
        values = tuple(float(v) for v in spec.split(","))
    except ValueError:
        values = ()
    if (
        len(values) not in (4, 5)
        or not all(0 <= v <= 1 for v in values[:4])
        or min(values[2:4]) <= 0
        or not all(math.isfinite(v) for v in values)
    ):
        raise ValueError(
            f"ellipse {spec!r} must be 'cx,cy,w,h[,angle]' with the first four as fractions (0-1) "
            "of the frame, w and h above 0, e.g. 0.5,0.55,0.4,0.7"
        )
    return values if len(values) == 5 else (*values, 0.0)


class MaskSource(RunConfig):
    """Where a Wan-Alpha v2 Gaussian mask comes from (reference NOTES §10.2)."""

    mask_alpha_video: Path | None = Field(
        None, description="Make the mask from an alpha video (the official gen_gaussian_mask.py procedure)."
    )
    mask_shift: int = Field(0, description="With --mask-alpha-video: move the object's rows by N pixels (+ right).")
    mask_ellipse: str | None = Field(
        None, description="Make the mask from an ellipse 'cx,cy,w,h[,angle]' (fractions of the frame; degrees)."
    )
    mask_ellipse_end: str | None = Field(
        None, description="With --mask-ellipse: the ellipse at the last frame (the mask moves linearly to it)."
    )

    @model_validator(mode="after")
    def _one_mask(self):
        if self.mask_alpha_video is not None and self.mask_ellipse is not None:
            raise ValueError("give --mask-alpha-video or --mask-ellipse, not both")
        if self.mask_ellipse_end is not None and self.mask_ellipse is None:
            raise ValueError("--mask-ellipse-end needs --mask-ellipse (the start)")
        for spec in (self.mask_ellipse, self.mask_ellipse_end):
            if spec is not None:
                parse_ellipse_spec(spec)
        return self


class MaskConfig(MaskSource):
    """`wanalpha mask`: a Wan-Alpha v2 Gaussian mask file (+ a PNG preview) for generate --gauss-mask."""

    output: Path = Field(..., description="Mask file to write (the official format: one saved float tensor).")
    num_frames: FrameCount = Field(81, description="Video frames the mask is for, 4n+1 (ellipse masks).")
    height: Side = Field(480, description="Video height (ellipse masks; a multiple of 16).")
    width: Side = Field(832, description="Video width (ellipse masks; a multiple of 16).")

    @model_validator(mode="after")
    def _check(self):
        if self.mask_alpha_video is None and self.mask_ellipse is None:
            raise ValueError("give --mask-alpha-video or --mask-ellipse")
        return self


class GenerateConfig(DiTSpeedOptions, MaskSource, WanModelFiles):
    """`wanalpha generate`: text → RGB video, alpha video, RGBA PNG frames, checkerboard composite, alpha containers."""

    prompt: str | None = Field(None, description="What to generate (one prompt).")
    prompt_file: Path | None = Field(None, description="A text file with one prompt per line (blank lines skipped).")
    negative_prompt: str = Field(
        OFFICIAL_NEGATIVE_PROMPT,
        description="Negative prompt for classifier-free guidance (default: the official generate script's); '' "
        "means the Wan config's default negative prompt, as upstream.",
    )
    empty_negative: bool = Field(
        False, description="Guide against the empty text (the unconditional embedding) instead of a negative prompt."
    )
    base_vae_path: Path | None = Field(
        None, description="Wan2.1_VAE.pth (default: <Wan2.1 folder>/Wan2.1_VAE.pth, or from the hub ids)."
    )
    vae_lora_path: Path | None = Field(
        None, description="Wan-Alpha's decoder.bin (default: Wan-Alpha/vae/decoder.bin)."
    )
    dora: Path | None = Field(
        None,
        description="DoRA adapters: ours (epoch-N.safetensors) or the official epoch-13-1500.safetensors "
        "(default: the newest models/train/Wan-Alpha-DiT-DoRA/epoch-*.safetensors).",
    )
    dora_scale: float = Field(1.0, description="Scale of the DoRA update (the official command uses 1.0).")
    lora: list[str] = Field(
        default_factory=list,
        description="Extra LoRA as PATH or PATH:SCALE (repeatable), e.g. the lightx2v 4-step distill LoRA "
        "(then --steps 4 --cfg-scale 1). Merged after the DoRA, as upstream.",
    )
    height: Side = Field(480, description="Video height (a multiple of 16).")
    width: Side = Field(832, description="Video width (a multiple of 16).")
    num_frames: FrameCount = Field(81, description="Frames, 4n+1 (81 = 5 s at 16 fps).")
    seed: int = Field(
        -1,
        ge=-1,
        le=SEED_MAX,
        description="Noise seed; -1 draws one (once per launch, shared by every process; written to generation.json).",
    )
    per_prompt_seed: bool = Field(
        False,
        description="Give prompt i of --prompt-file the seed seed + i (different noise per line) instead of the "
        "official one seed for every prompt.",
    )
    steps: int = Field(50, ge=1, description="Sampling steps (official: 50; 4 with the lightx2v LoRA).")
    shift: float = Field(5.0, gt=0, description="Flow shift of the sampling schedule (official: 5.0).")
    cfg_scale: float = Field(5.0, ge=0, description="Classifier-free guidance scale; 1 skips the negative pass.")
    sampler: Literal["unipc", "euler"] = Field("unipc", description="unipc (the official default) or euler.")
    output_dir: Path | None = Field(
        None, description="Folder for the outputs (default: a fresh folder outputs/<date>-<n>/ for every run)."
    )
    output_prefix: str = Field("output", description="Output names: {prefix}_rgb.mp4, {prefix}.webm, …")
    overwrite: bool = Field(
        False, description="Replace the outputs an earlier run left in --output-dir (otherwise that is an error)."
    )
    formats: list[str] = Field(
        default_factory=lambda: ["webm", "mov"],
        description="Alpha containers to write besides the mp4s and PNGs: webm (VP9), mov (ProRes 4444), webp, "
        "apng. Comma-separated.",
    )
    fps: Fps = Field(16.0, description="Frame rate of the written videos (Wan2.1: 16).")
    dit_dtype: Literal["bf16", "fp32", "fp8"] = Field(
        "bf16",
        description="Dtype of the DiT weights while sampling. fp8: the blocks' linears hold float8_e4m3fn weights "
        "with one scale per output channel (half of bf16's weight memory: 14B about 14 GB), quantised while loading "
        "after the DoRA and LoRAs are merged; norms, embeddings and the head stay bf16. Also reads ComfyUI's FP8 "
        "DiT files (*_fp8_scaled, *_fp8_e4m3fn).",
    )
    fp8_accumulation: Literal["fast", "full"] = Field(
        "fast",
        description="With --dit-dtype fp8 on Hopper, how the FP8 GEMMs sum: fast (Hopper's fast FP8 accumulation, "
        "0.2 s less a 14B forward) or full (partial sums promoted to float32 at intervals: a little closer to bf16; "
        "docs/benchmarks.md).",
    )
    vae_tile_size: int | None = Field(
        None, ge=4, description="Decode in tiles of N×N latent cells (less memory for large frames)."
    )
    vae_decode_chunk: int = Field(
        1,
        ge=1,
        le=64,
        description="Latent frames each decode chunk holds after the first (which is frame 0 alone): 1 decodes one "
        "at a time as upstream; more, the same video (to float rounding) in fewer, larger passes, for a chunk's "
        "activations that many times (docs/generate.md).",
    )
    vae_dtype: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="Dtype of the decoders: fp32 as the official inference; bf16 decodes about twice as fast "
        "(PSNR against fp32 in docs/benchmarks.md).",
    )
    alpha_shift_mean: float = Field(
        0.05,
        ge=0,
        description="Wan-Alpha v2 noise mean shift outside the Gaussian mask (official: 0.05; applied only with a "
        "mask: --gauss-mask, --mask-alpha-video or --mask-ellipse).",
    )
    gauss_mask: Path | None = Field(None, description="A mask file (the released gauss_mask, or `wanalpha mask`).")
    offload: bool = Field(
        False,
        description="For 24-48 GB GPUs: keep UMT5's and the DiT's blocks in CPU memory and stream them to the GPU "
        "one at a time (slower; same result).",
    )
    compile: bool = Field(
        False,
        description="torch.compile the DiT's blocks (fuses the element-wise work between matmuls and attention; "
        "the first step also compiles). Not with --offload or sequence-parallel launches.",
    )

    @model_validator(mode="before")
    @classmethod
    def _split_lists(cls, data):
        data = _split_commas(data, "formats")
        if isinstance(data, dict) and isinstance(data.get("lora"), str):
            data = dict(data, lora=[data["lora"]])
        return data

    @model_validator(mode="after")
    def _check(self):
        if (self.prompt is None) == (self.prompt_file is None):
            raise ValueError("give --prompt or --prompt-file")
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("--prompt must not be empty (say what to generate)")
        if self.gauss_mask is not None and (self.mask_alpha_video is not None or self.mask_ellipse is not None):
            raise ValueError("give one mask: --gauss-mask, --mask-alpha-video or --mask-ellipse")
        bad = [f for f in self.formats if f not in OUTPUT_FORMATS]
        if bad:
            raise ValueError(f"unknown format {bad[0]!r} in --formats; choose from {', '.join(OUTPUT_FORMATS)}")
        if self.compile and self.offload:
            raise ValueError("--compile cannot be combined with --offload (streamed blocks); drop one of them")
        return self


DEMO_PROMPTS = (
    "a red circle with sharp edges moving right and growing, transparent background",
    "a yellow triangle with soft edges moving up and shrinking, transparent background",
)


class DemoConfig(RunConfig):
    """`wanalpha demo`: the whole pipeline on the tiny base shipped in the package (no downloads, a CPU is enough)."""

    out: Path = Field(Path("wanalpha-demo"), description="Folder for everything the demo makes.")
    quick: bool = Field(False, description="Fewer clips and steps (about a minute; for CI and a first look).")
    prompt: list[str] = Field(
        list(DEMO_PROMPTS), description="What to generate at the end; repeat the flag for several prompts."
    )
    seed: Seed = Field(0, description="Seed of the synthetic dataset, the trainings and the sampling noise.")

    @model_validator(mode="before")
    @classmethod
    def _one_prompt(cls, data):
        if isinstance(data, dict) and isinstance(data.get("prompt"), str):
            data = dict(data, prompt=[data["prompt"]])
        return data

    @model_validator(mode="after")
    def _check(self):
        if not self.prompt or not all(p.strip() for p in self.prompt):
            raise ValueError("--prompt must not be empty")
        return self


class DownloadConfig(RunConfig):
    """`wanalpha download`: the official release files, by name, into the seed guide's layout (resumable, atomic)."""

    names: list[str] = Field(
        default_factory=list,
        description="Release items to fetch (wan2.1-t2v-14b, wan2.1-t2v-1.3b, wan-alpha-v1, wan-alpha-v2, "
        "wan-alpha-vae-v1, lightx2v, vgg16); none: list them with their sizes.",
    )
    root: Path = Field(
        Path("."),
        description="Where the layout starts: the folder generate and train-* run in (Wan-Alpha/vae/decoder.bin, "
        "models/Wan-AI/Wan2.1-T2V-14B/, …).",
    )
    models_dir: Path | None = Field(
        None, description="Where the models/… part of the layout goes (default: <root>/models), as --models-dir."
    )
    dry_run: bool = Field(False, description="List what would be fetched and its size; fetch nothing.")

    @model_validator(mode="before")
    @classmethod
    def _split_names(cls, data):
        return _split_commas(data, "names")


# --------------------------------------------------------------------------------------------------- eval

EVAL_CLIP_MODEL = "openai/clip-vit-base-patch32"  # the model of CLIPScore (Hessel et al. 2021)


class EvalConfig(RunConfig):
    """`wanalpha eval`: score the RGBA clips of generate runs with no-reference metrics → one HTML report."""

    runs: list[Path] = Field(
        default_factory=list,
        description="Folders written by `wanalpha generate` (each with its generation.json); several are compared "
        "side by side, the first being the baseline.",
    )
    out: Path = Field(Path("report"), description="Folder for report.html, metrics.json and config.yaml.")
    generate: list[Path] = Field(
        default_factory=list,
        description="Generate run configs (YAML/JSON as `wanalpha generate --config` reads them; their prompt and "
        "output folder are replaced): each generates the prompt set into <out>/runs/<config name>/ first, and is "
        "scored after the RUN folders. Repeatable.",
    )
    prompts: str = Field(
        "eval",
        description="The prompt set: 'eval' (shipped: 50 prompts in 8 categories) or a CSV file with columns "
        "category,prompt. It names the category of each scored prompt, and is what --generate generates.",
    )
    categories: list[str] = Field(
        default_factory=list,
        description="Only these categories of the prompt set for --generate (comma-separated; default: all).",
    )
    limit: int | None = Field(None, ge=1, description="Only the first N prompts of the set for --generate.")
    clip: bool = Field(True, description="Compute the CLIP text-video score (--no-clip: skip it, no model needed).")
    clip_model: str = Field(
        EVAL_CLIP_MODEL,
        description="CLIP model of the text-video score: a folder (config.json, tokenizer.json, model.safetensors) or "
        "a hub id, fetched into --models-dir/<id>/ when missing.",
    )
    models_dir: Path = Field(Path("models"), description="Where hub models are looked for and fetched to.")
    clip_frames: int = Field(8, ge=1, le=MAX_FRAMES, description="Frames per clip the CLIP score looks at.")
    strip_frames: int = Field(6, ge=1, le=32, description="Frames per clip shown in the report's strips.")
    margin: int | None = Field(
        None,
        ge=0,
        le=MAX_SIDE,
        description="The background starts this many pixels from the subject (default: 5% of the shorter side).",
    )
    edge_radius: int | None = Field(
        None,
        ge=1,
        le=MAX_SIDE,
        description="Half-width in pixels of the band around the subject's edge (default: 1% of the shorter side).",
    )

    @model_validator(mode="before")
    @classmethod
    def _split_lists(cls, data):
        data = _split_commas(data, "categories")
        for key in ("runs", "generate"):
            if isinstance(data, dict) and isinstance(data.get(key), str | Path):
                data = dict(data, **{key: [data[key]]})
        return data

    @model_validator(mode="after")
    def _check(self):
        if not self.runs and not self.generate:
            raise ValueError("nothing to score: give RUN folders (written by `wanalpha generate`) or --generate CONFIG")
        return self
