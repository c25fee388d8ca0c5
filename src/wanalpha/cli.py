"""The `wanalpha` executable: one function per command, each a config + one library call (DESIGN §7.9).

Flags are made from the command's pydantic config, so the two can never disagree: every field is a flag in
kebab-case, also accepted in the seed guide's snake_case spelling (`--output-dir` and `--output_dir`), its
help is the field's description, and flags override `--config run.yaml`. Library modules are imported inside the
commands: `wanalpha --help` must not import torch.
"""

from __future__ import annotations

import functools
import inspect
import os
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer

from wanalpha import __version__, threads
from wanalpha.config import (
    CacheConfig,
    DemoConfig,
    DownloadConfig,
    EvalConfig,
    GenerateConfig,
    MaskConfig,
    PrepareConfig,
    RunConfig,
    TrainDiTConfig,
    TrainMergeConfig,
    ValidateConfig,
)
from wanalpha.data.files import remove_live_temps
from wanalpha.failures import DEBUG_ENV, debugging, explain


def _rich_help() -> bool:
    """Rich's boxed help needs a wide terminal; piped or narrower than 120 columns, click's plain help (wrapped at
    the width, a flag per line) stays readable."""
    import shutil
    import sys

    return sys.stdout.isatty() and shutil.get_terminal_size().columns >= 120


RICH_HELP = _rich_help()
OPEN_BRACKET = "\\[" if RICH_HELP else "["  # rich reads [..] as markup

app = typer.Typer(
    name="wanalpha",
    rich_markup_mode="rich" if RICH_HELP else None,
    help="Transparent (RGBA) video with diffusion models: Wan-Alpha on Wan2.1.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={
        "help_option_names": ["-h", "--help"],
        # The seed guide spells flags in snake_case (--dataset_base_path): click normalises every option and
        # command name it reads, so both spellings reach the same (kebab-case) option.
        "token_normalize_func": lambda name: name.replace("_", "-"),
    },
)


def _is_bool(annotation: Any) -> bool:
    if annotation is bool:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return all(a is bool or a is type(None) for a in typing.get_args(annotation))
    return False


def _value_type(annotation: Any) -> tuple[Any, list]:
    """The type of a field's value (`int` for `FrameCount | None`) and the constraints an `Annotated` type carries
    (an optional field's are inside its union, not in the field's metadata)."""
    if typing.get_origin(annotation) is typing.Literal:  # its arguments are the choices, not types
        return annotation, []
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    value = args[0]
    if typing.get_origin(value) is typing.Annotated:
        value, *extra = typing.get_args(value)
        return value, [m for e in extra for m in getattr(e, "metadata", [e])]
    return value, []


def _metavar(annotation: Any) -> str:
    value, _ = _value_type(annotation)
    if typing.get_origin(value) is typing.Literal:
        return "[" + "|".join(map(str, typing.get_args(value))) + "]"
    return {Path: "PATH", int: "INT", float: "FLOAT", str: "TEXT"}.get(value, "VALUE")


def _bounds(field) -> str:
    """The field's numeric limits as help text: " (≥ 0, ≤ 255)"; floats are always finite."""
    marks = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
    metadata = [*field.metadata, *_value_type(field.annotation)[1]]
    parts = [f"{marks[name]} {getattr(m, name)}" for m in metadata for name in marks if hasattr(m, name)]
    return f" ({', '.join(parts)})" if parts else ""


def _options(model: type[RunConfig], positional: str | None = None) -> list[inspect.Parameter]:
    """One typer option per config field, default None (= not given, the file or default applies); the list field
    named `positional` is taken from the arguments instead (`wanalpha download NAME…`)."""
    params = [
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(None, "--config", "-c", help="YAML/JSON run config; flags override it."),
            annotation=Optional[Path],  # noqa: UP045 (typer reads this annotation at run time)
        )
    ]
    for name, field in model.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = "required" if field.is_required() else field.get_default(call_default_factory=True)
        if isinstance(default, list):  # the real default of a list field, as it is given on the command line
            default = ",".join(map(str, default)) if default else "none"
        help_text = field.description + _bounds(field)
        help_text += "" if default is None else f" {OPEN_BRACKET}default: {default}]"
        if name == positional:
            params.insert(
                0,
                inspect.Parameter(
                    name,
                    inspect.Parameter.POSITIONAL_OR_KEYWORD,
                    annotation=Optional[list[str]],  # noqa: UP045
                    default=typer.Argument(None, help=field.description, show_default=False, metavar=name.upper()),
                ),
            )
            continue
        if _is_bool(field.annotation):
            decls, annotation, metavar = [f"{flag}/--no-{flag[2:]}"], Optional[bool], None  # noqa: UP045
        elif typing.get_origin(field.annotation) is list:  # repeatable (and comma-separated where documented)
            decls, annotation, metavar = [flag], Optional[list[str]], "TEXT"  # noqa: UP045
        else:
            # Values arrive as text; pydantic converts and validates them, with one-line errors.
            decls, annotation, metavar = [flag], Optional[str], _metavar(field.annotation)  # noqa: UP045
        params.append(
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=typer.Option(None, *decls, help=help_text, show_default=False, metavar=metavar),
                annotation=annotation,
            )
        )
    return params


def config_command(name: str, model: type[RunConfig], positional: str | None = None) -> Callable:
    """Register `fn(cfg)` as command `name`, its flags made from `model` (`positional`: a list field given as
    arguments); known errors become one line."""

    def decorate(fn: Callable[[Any], Any]) -> Callable:
        @functools.wraps(fn)
        def command(**kwargs: Any) -> None:
            config_file = kwargs.pop("config")
            threads.configure()  # as many CPU threads as free cores (before torch loads)
            if kwargs.pop("debug"):
                os.environ[DEBUG_ENV] = "1"
            try:
                cfg = model.resolve(config_file, kwargs)
                with _locked(name, cfg):
                    fn(cfg)
                _end_process_group()
            except KeyboardInterrupt:
                remove_live_temps()
                if debugging():  # the traceback, and still the interrupt's exit code (click would exit 1)
                    import traceback

                    traceback.print_exc()
                _fail(INTERRUPTED.get(name, "interrupted; finished outputs are kept and a rerun skips them"), 130)
            except Exception as exc:  # every failure: one line (the traceback with --debug)
                if debugging():
                    raise
                _fail(*explain(exc))

        debug = inspect.Parameter(
            "debug",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=bool,
            default=typer.Option(
                False, "--debug", help=f"Show the full traceback of a failure instead of one line (or {DEBUG_ENV}=1)."
            ),
        )
        command.__signature__ = inspect.Signature([*_options(model, positional), debug])  # type: ignore[attr-defined]
        app.command(name, help=fn.__doc__)(command)
        return command

    return decorate


def torch_cuda_ready() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _end_process_group() -> None:
    """After a successful run under torchrun/accelerate: leave the process group, whose communication threads would
    otherwise still run at interpreter exit and abort the process ("terminate called without an active exception")."""
    import sys

    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # No barrier: every collective of the run has completed on this process (generate's other processes end
        # while process 0 still decodes and writes, which may take longer than a collective's timeout).
        if torch_cuda_ready():
            import torch

            torch.cuda.synchronize()
        dist.destroy_process_group()


def _output_folder(cfg: RunConfig) -> Path | None:
    """The folder a run writes into (None: the command writes no folder of its own)."""
    if isinstance(cfg, ValidateConfig):
        return Path(cfg.output_prefix).parent
    for field in ("output_dir", "output_path", "out"):
        if field in type(cfg).model_fields and getattr(cfg, field) is not None:
            return Path(getattr(cfg, field))
    return None  # none, or one the command makes itself (generate's fresh outputs/<date>-<n>/)


def _locked(name: str, cfg: RunConfig):
    """The run's lock on its output folder (wanalpha.data.files.output_lock), taken by the launch's first process
    only (under torchrun/accelerate the others write nothing of their own there)."""
    import contextlib

    folder = _output_folder(cfg)
    if name in UNLOCKED or folder is None or int(os.environ.get("RANK", "0")) != 0:
        return contextlib.nullcontext()
    from wanalpha.data.files import output_lock

    return output_lock(folder, name)


# Not locked: mask (one file), download (its own per-file locks), validate (a few files named by --output-prefix,
# by default in the working folder, where a lock would keep two validations with different prefixes apart).
UNLOCKED = {"mask", "download", "validate"}
INTERRUPTED = {  # what a rerun does after Ctrl-C, command by command
    "train-merge": "interrupted; the training state of the last update is saved (one process): rerun the same "
    "command with --resume to continue from it",
    "train-dit": "interrupted; the training state of the last update is saved (one process): rerun the same command "
    "with --resume to continue from it",
    "generate": "interrupted; videos already written are complete, the unfinished one was removed",
    "download": "interrupted; finished files are in place and a rerun resumes the unfinished one",
}


def _fail(message: str, code: int) -> None:
    from rich.console import Console
    from rich.text import Text

    # The message is plain text: brackets in it are not markup.
    Console(stderr=True, highlight=False).print(Text.assemble(("error:", "bold red"), " ", message), soft_wrap=True)
    raise typer.Exit(code)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"wanalpha {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    debug: bool = typer.Option(
        False, "--debug", help=f"Show the full traceback of a failure instead of one line (or set {DEBUG_ENV}=1)."
    ),
) -> None:
    """Transparent (RGBA) video with diffusion models: Wan-Alpha on Wan2.1."""
    if debug:
        os.environ[DEBUG_ENV] = "1"  # also seen by processes this one starts


@config_command("prepare", PrepareConfig)
def prepare(cfg: PrepareConfig) -> None:
    """Raw RGBA clips (NNN.mp4 + NNN_seg.mp4 + NNN.txt) → checked dataset + metadata.csv; or --synthetic N."""
    from wanalpha import prepare as workflow

    workflow.run(cfg)


@config_command("cache", CacheConfig)
def cache(cfg: CacheConfig) -> None:
    """Run the frozen encoders once per clip → latent shards for train-merge / train-dit --cache_dir."""
    from wanalpha import cache as workflow

    workflow.run(cfg)


@config_command("train-merge", TrainMergeConfig)
def train_merge(cfg: TrainMergeConfig) -> None:
    """Stage 1: train the FeatureMergeBlock (frozen encoder and decoder.bin decoders); plain or accelerate launch."""
    from wanalpha import train_merge as workflow

    workflow.run(cfg)


@config_command("validate", ValidateConfig)
def validate(cfg: ValidateConfig) -> None:
    """Reconstruct a clip (or a dataset) through the RGB-alpha VAE → gt/pred videos, contact sheet, metrics."""
    from wanalpha import validate as workflow

    workflow.run(cfg)


@config_command("train-dit", TrainDiTConfig)
def train_dit(cfg: TrainDiTConfig) -> None:
    """Stage 2: DoRA on the Wan DiT over merged RGBA latents (flow matching); plain or accelerate launch."""
    from wanalpha import train_dit as workflow

    workflow.run(cfg)


@config_command("generate", GenerateConfig)
def generate(cfg: GenerateConfig) -> None:
    """Text → RGB + alpha video, RGBA PNG frames, checkerboard composite and alpha containers (webm, mov, …)."""
    from wanalpha import generate as workflow

    workflow.run(cfg)


@config_command("eval", EvalConfig, positional="runs")
def evaluate(cfg: EvalConfig) -> None:
    """Score generated RGBA clips (RUN folders of `generate`, or --generate first): haze, flicker, edges, CLIP score
    → report.html (one page; several runs side by side) and metrics.json."""
    from wanalpha import eval as workflow

    workflow.run(cfg)


@config_command("mask", MaskConfig)
def mask(cfg: MaskConfig) -> None:
    """Wan-Alpha v2: a Gaussian mask (from an alpha video or an ellipse) + PNG preview, for generate --gauss_mask."""
    from wanalpha import mask as workflow

    workflow.run(cfg)


@config_command("download", DownloadConfig, positional="names")
def download(cfg: DownloadConfig) -> None:
    """Official release files by name (Wan2.1 base, Wan-Alpha v1/v2, lightx2v, VGG16) into the seed guide's layout;
    resumable, atomic; --dry-run lists them with sizes; no NAME lists the catalogue."""
    from wanalpha import download as workflow

    workflow.run(cfg)


@config_command("demo", DemoConfig)
def demo(cfg: DemoConfig) -> None:
    """The whole pipeline on the tiny base shipped in the package: prepare → … → generate, on a CPU in minutes."""
    from wanalpha import demo as workflow

    workflow.run(cfg)


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM (kill, a scheduler's preemption) ends a run as Ctrl-C does: cleanly


def main() -> None:
    import signal

    signal.signal(signal.SIGTERM, _terminate)
    app()
