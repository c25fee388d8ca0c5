"""The CLI shell: help without torch, config files + flags, one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import read_metadata, run_cli, write_clip
from wanalpha import __version__
from wanalpha.config import PrepareConfig
from wanalpha.data.files import atomic_path
from wanalpha.errors import ConfigError

NO_TORCH = """
import sys
from wanalpha.cli import app
for argv in (["--help"], ["prepare", "--help"], ["cache", "--help"], ["train-merge", "--help"],
             ["validate", "--help"]):
    try:
        app(argv)
    except SystemExit as exc:
        assert exc.code == 0, exc.code
assert "torch" not in sys.modules, "help imported torch"
"""


def test_help_does_not_import_torch() -> None:
    proc = subprocess.run([sys.executable, "-c", NO_TORCH], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "prepare" in proc.stdout and "--source-dir" in proc.stdout


def test_version_and_module_form(tmp_path: Path) -> None:
    assert run_cli("--version").stdout.strip() == f"wanalpha {__version__}"
    proc = subprocess.run([sys.executable, "-m", "wanalpha", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and __version__ in proc.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["--version"],
        ["prepare", "--help"],
        ["prepare", "--source-dir", "missing", "--output-dir", "out"],  # a one-line error, exit 2
        ["generate", "--no-such-flag"],  # Click's usage error
        ["cache", "--stage", "dit"],  # required inputs missing
    ],
)
def test_forked_runs_answer_as_the_console_script(tmp_path: Path, args: list[str]) -> None:
    """The suite's runner (tests/cli_runner.py: a child forked from a process with torch & co. imported) gives what
    the console script run as a plain subprocess gives: exit code, stdout and stderr, in the run's own folder and
    environment."""
    import os

    import conftest

    if conftest._ZYGOTE is None:
        pytest.skip("the suite runs the console script itself here")
    env = dict(os.environ, COLUMNS="200", NO_COLOR="1", WANALPHA_THREADS="1")
    command = conftest.WANALPHA or sys.executable
    forked = conftest._ZYGOTE.run(command, args, str(tmp_path), env, timeout=600)
    plain = subprocess.run(
        [conftest.WANALPHA, *args] if conftest.WANALPHA else [sys.executable, "-m", "wanalpha", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert (forked.returncode, forked.stdout, forked.stderr) == (plain.returncode, plain.stdout, plain.stderr)
    assert "Traceback" not in forked.stderr


def test_config_file_and_flag_override(source: Path, tmp_path: Path) -> None:
    write_clip(source, "001", caption=None)
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(
        yaml.safe_dump(
            {
                "source-dir": str(source),
                "output_dir": str(tmp_path / "from_file"),
                "default_caption": "from file",
            }
        )
    )
    run_cli("prepare", "--config", run_yaml, "--default-caption", "from flag")
    rows = read_metadata(tmp_path / "from_file/metadata.csv")
    assert rows[0]["prompt"] == "from flag"
    saved = yaml.safe_load((tmp_path / "from_file/config.yaml").read_text())
    assert saved["default_caption"] == "from flag" and saved["link"] == "copy"
    # The saved config is itself a valid --config.
    run_cli("prepare", "--config", tmp_path / "from_file/config.yaml")


@pytest.mark.parametrize(
    ("content", "args", "expected"),
    [
        ({"source_dir": "x", "output_dir": "y", "bogus_key": 1}, [], "unknown key 'bogus_key'"),
        (
            {"source_dir": "x", "output_dir": "y"},
            ["--link", "rsync"],
            "'link' (--link): Input should be 'copy'",
        ),
        ({"source_dir": "x"}, [], "'output_dir' is required"),
        ({"output_dir": "y"}, [], "give exactly one of --source-dir, --source-csv or --synthetic"),
        ({"synthetic": "many", "output_dir": "y"}, [], "bad value for 'synthetic' (--synthetic)"),
        ({"synthetic": 0, "output_dir": "y"}, [], "greater than or equal to 1"),
        ({"synthetic": 1, "output_dir": "y", "width": 100}, [], "--width must be a multiple of 16"),
    ],
)
def test_bad_config_is_one_line_exit_2(tmp_path: Path, content: dict, args: list, expected: str) -> None:
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump(content))
    proc = run_cli("prepare", "--config", run_yaml, *args, check=2)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert expected in lines[0]
    assert "Traceback" not in proc.stderr


def test_bad_config_file(tmp_path: Path) -> None:
    proc = run_cli("prepare", "--config", tmp_path / "missing.yaml", check=2)
    assert "does not exist" in proc.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    proc = run_cli("prepare", "--config", bad, check=2)
    assert "not valid YAML" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    bad.write_text("- 1\n- 2\n")
    assert "must hold a mapping" in run_cli("prepare", "--config", bad, check=2).stderr


def test_resolve_precedence() -> None:
    cfg = PrepareConfig.resolve(None, {"source_dir": "a", "output_dir": "b", "link": "symlink", "strict": None})
    assert cfg.link == "symlink" and cfg.strict is False and cfg.num_frames == 17
    with pytest.raises(ConfigError):
        PrepareConfig.resolve(None, {"output_dir": "b"})


def test_every_field_is_documented() -> None:
    for name, field in PrepareConfig.model_fields.items():
        assert field.description and len(field.description) > 15, name


def test_atomic_path_leaves_nothing_on_error(tmp_path: Path) -> None:
    dest = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(dest) as tmp:
        tmp.write_bytes(b"whole")
    assert dest.read_bytes() == b"whole" and list(tmp_path.iterdir()) == [dest]


def test_atomic_outputs_get_the_usual_permissions(tmp_path: Path) -> None:
    """Writers that replace the temporary file (safetensors does) must not leave outputs private (0600)."""
    import os

    import torch
    from safetensors.torch import save_file

    umask = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "a.safetensors") as tmp:
            save_file({"x": torch.zeros(2)}, str(tmp))
        with atomic_path(tmp_path / "b.txt") as tmp:
            tmp.write_text("b")
    finally:
        os.umask(umask)
    for name in ("a.safetensors", "b.txt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


def test_progress_when_nobody_watches(tmp_path: Path, tiny_dataset: Path, tiny_stage2, monkeypatch) -> None:
    """Issue #26: with output piped (not a terminal) a run says what it is doing in plain lines: each stage as it
    starts, and for long loops the step, loss, rate and ETA every WANALPHA_LOG_SECONDS (here 0: every step)."""
    monkeypatch.setenv("WANALPHA_LOG_SECONDS", "0")
    proc = run_cli(
        "train-merge",
        "--dataset_base_path",
        tiny_dataset,
        "--base_vae_path",
        tiny_stage2["vae"],
        "--vae_lora_path",
        tiny_stage2["lora"],
        "--height",
        "32",
        "--width",
        "48",
        "--num_frames",
        "5",
        "--num_epochs",
        "1",
        "--num_workers",
        "0",
        "--perceptual_weight",
        "0",
        "--output_path",
        tmp_path / "merge",
    )
    assert "train-merge: 2 updates from update 0; starting" in proc.stderr
    for update in (1, 2):
        assert f"train-merge: update {update}/2 ({50 * update} %), epoch 0 loss" in proc.stderr
    assert "updates/s, ETA" in proc.stderr
    proc = run_cli(
        "generate",
        "--prompt",
        "a red circle",
        "--dit_path",
        tiny_stage2["dit"],
        "--t5_path",
        tiny_stage2["t5"],
        "--base_vae_path",
        tiny_stage2["vae"],
        "--vae_lora_path",
        tiny_stage2["lora"],
        "--height",
        "32",
        "--width",
        "32",
        "--num_frames",
        "5",
        "--steps",
        "2",
        "--formats",
        "apng",
        "--output_dir",
        tmp_path / "gen",
    )
    for line in ("encoding prompts with UMT5 …", "generate: sampling 1/1: step 2/2 (100 %)", "decoding RGB and alpha"):
        assert line in proc.stderr, proc.stderr


def test_shipped_run_configs_are_valid() -> None:
    """Every configs/*.yaml is a valid run config of its command (the seed guide's scripts as configs: Step 4's
    train_dit_dora_rgba.sh, the cached path of run_cached_training.sh), and the accelerate config loads."""
    from accelerate.commands.config.config_args import load_config_from_file

    from wanalpha.config import CacheConfig, TrainDiTConfig, TrainMergeConfig

    root = Path(__file__).resolve().parents[1] / "configs"
    table = {
        "prepare.yaml": (PrepareConfig, {}),
        "synthetic.yaml": (PrepareConfig, {}),
        "official-v2-vae.yaml": (TrainMergeConfig, {"dataset_base_path": "data"}),
        "train_dit_dora_rgba.yaml": (TrainDiTConfig, {}),
        "cache_latents.yaml": (CacheConfig, {}),
        "train_merge_cached.yaml": (TrainMergeConfig, {}),
    }
    assert {p.name for p in root.glob("*.yaml")} == set(table)
    for name, (model, required) in table.items():
        cfg = model.resolve(root / name, required)
        text = (root / name).read_text()
        assert text.startswith("#") and ("wanalpha" in text.splitlines()[0] or "wanalpha" in text), name
        if name == "train_dit_dora_rgba.yaml":  # the guide's Step 4 settings
            assert (cfg.num_frames, cfg.dora_rank, cfg.num_epochs, cfg.dataset_repeat) == (81, 32, 15, 100)
    single = load_config_from_file(str(root / "accelerate/single.yaml"))
    assert single.num_processes == 1 and single.num_machines == 1


SHARED_RULES = [  # (config, the other fields it needs, field, bad value, the line's text)
    ("ClipOptions", {}, "num_frames", 8, "--num-frames must be 4n+1 for the Wan VAE (got 8; use 5 or 9)"),
    ("ClipOptions", {}, "height", 100, "--height must be a multiple of 16 (got 100)"),
    ("GenerateConfig", {"prompt": "x"}, "num_frames", 80, "--num-frames must be 4n+1 for the Wan VAE (got 80; use 77"),
    ("GenerateConfig", {"prompt": "x"}, "width", 840, "--width must be a multiple of 16 (got 840)"),
    ("MaskConfig", {"output": "m", "mask_ellipse": "0.5,0.5,0.2,0.2"}, "num_frames", 10, "--num-frames must be 4n+1"),
    ("MaskConfig", {"output": "m", "mask_ellipse": "0.5,0.5,0.2,0.2"}, "height", 20, "--height must be a multiple"),
    (
        "ValidateConfig",
        {"feature_merge_checkpoint": "m", "dataset_base_path": "d"},
        "num_frames",
        6,
        "--num-frames must be 4n+1",
    ),
    ("ValidateConfig", {"feature_merge_checkpoint": "m", "dataset_base_path": "d"}, "width", 33, "--width must be"),
    ("PrepareConfig", {"synthetic": 1, "output_dir": "y"}, "height", 100, "--height must be a multiple of 16"),
]


@pytest.mark.parametrize(("name", "others", "field", "value", "expected"), SHARED_RULES)
def test_shared_field_rules(name: str, others: dict, field: str, value: int, expected: str) -> None:
    """Frame counts (4n+1) and sizes (x16) are one rule each, wherever they appear: one line naming the flag and
    the fix; a good value passes."""
    from wanalpha import config

    model = getattr(config, name)
    with pytest.raises(ConfigError) as err:
        model.resolve(None, others | {field: value})
    assert str(err.value).startswith(f"flags: {expected}"), str(err.value)
    good = {"num_frames": 9, "height": 32, "width": 48}[field]
    assert getattr(model.resolve(None, others | {field: good}), field) == good


def test_config_sections_declare_each_field_once() -> None:
    """No command's config overrides a field it inherits; every command that reads an RGBA VAE has the one --variant,
    and help shows the shared bounds of optional fields too."""
    from wanalpha import config
    from wanalpha.cli import _bounds

    commands = [getattr(config, n) for n in dir(config) if n.endswith("Config") and n != "RunConfig"]
    for model in commands:
        for field in model.model_fields:
            owners = [k.__name__ for k in model.__mro__ if field in k.__dict__.get("__annotations__", {})]
            assert len(owners) == 1, (model.__name__, field, owners)
    variants = {m.__name__: m.model_fields["variant"] for m in commands if "variant" in m.model_fields}
    assert set(variants) == {"CacheConfig", "TrainMergeConfig", "TrainDiTConfig", "ValidateConfig"}
    assert len({(f.description, f.default, f.annotation) for f in variants.values()}) == 1
    assert _bounds(config.ValidateConfig.model_fields["num_frames"]) == " (≥ 1, ≤ 4097)"
    assert _bounds(config.ValidateConfig.model_fields["height"]) == " (≥ 16, ≤ 8192)"
