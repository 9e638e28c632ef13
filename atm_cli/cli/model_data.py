"""What the commands share: the model, data, batch and search flags (declared once; a factory where a command's
default or help differs), and for the analysis commands (stress, compare, probe) loading, progress, --json.

Torch, timm and the layers that use them are imported inside the functions that run a command, so that
`atm --help` and every command's help start in a fraction of a second.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.console import Console, RenderableType
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from atm_cli.analysis.plotting import pyplot
from atm_cli.errors import UsageError
from atm_cli.model_names import DEMO_MODEL_ALIAS
from atm_cli.paper import METHODS as ANALYSIS_METHODS

from . import checks

if TYPE_CHECKING:
    from atm_cli.evaluation import LoadedModel, Workload

MODEL = typer.Option(DEMO_MODEL_ALIAS, "--model", metavar="NAME|PATH",
                     help="A timm model name (deit_small for deit_small_patch16_224; hf-hub: names too) or a "
                          "folder in timm's format (config.json + weights); hf:FOLDER|HUB_ID for a transformers "
                          "model, open_clip:ARCH[:TAG] for an open_clip one. Default: the embedded CIFAR-10 ViT.")
CHECKPOINT = typer.Option(None, "--checkpoint", metavar="FILE",
                          help="Local weights for the model (a timm or open_clip one), loaded by its library.")
UNSAFE_CHECKPOINT = typer.Option(False, "--unsafe-checkpoint",
                                 help="Load a --checkpoint that pickles more than weights (e.g. training arguments). "
                                      "Unpickling runs code from the file: only for files you trust.")
# One switch, not --pretrained/--no-pretrained: a second name widens every command's help past 80 columns.
NO_PRETRAINED = typer.Option(False, "--no-pretrained", help="Random weights (for GFLOPs and token counts).")
DEFAULT_BATCH_SIZE = 128


def batch_size_option(default: int | None = DEFAULT_BATCH_SIZE, aside: str = "",
                      then: str = "") -> typer.models.OptionInfo:
    """--batch-size; its help says `aside` inside its parenthesis and `then` after it."""
    return typer.Option(default, "--batch-size", min=1, help=f"Images per batch (ATM's r depends on it{aside}).{then}")


def workers_option(default: int, aside: str = "") -> typer.models.OptionInfo:
    return typer.Option(default, "--workers", min=0, help=f"Image loading processes{aside}.")


def limit_option(default: int | None = None,
                 help: str = "Use a class-balanced subset of this many images.") -> typer.models.OptionInfo:
    return typer.Option(default, "--limit", min=1, help=help)


def seed_option(of: str = "the --limit subset and of the search") -> typer.models.OptionInfo:
    return typer.Option(0, "--seed", help=f"Seed of {of}.")


def n_trials_option(help: str) -> typer.models.OptionInfo:
    return typer.Option(30, "--n-trials", min=1, help=help)


BATCH_SIZE = batch_size_option()
LIMIT = limit_option()
SEED = seed_option()
DEVICE = typer.Option("auto", "--device", metavar="auto|cpu|cuda|cuda:N")
PRECISION = typer.Option("fp32", "--precision", metavar="fp32|bf16|fp16",
                         help="Autocast dtype of the model (fp16 needs CUDA). The engine scores and merges in "
                              "float32 whatever it is.")
JSON = typer.Option(False, "--json", help="Print one JSON object on stdout.")
COMPILE = typer.Option("auto", "--compile", metavar="auto|on|off",
                       help="Run the settings and the unmerged model through torch.compile (on CUDA: CUDA graphs); "
                            "compile time is left out of images/s. auto: on for CUDA, ATM left eager; on: ATM too.")
RANDOM_WEIGHTS_NOTE = "note: random weights (--no-pretrained): top-1 and top-5 mean nothing; GFLOPs and token " \
                      "counts still hold"
INTERRUPTED_EXIT_CODE = 130  # as a shell reports a process ended by Ctrl-C


def data_option(default_name: str) -> typer.models.OptionInfo:
    return typer.Option(None, "--data", metavar="DIR",
                        help=f"An ImageFolder (DIR/<class>/<image>). Default: the bundled {default_name}.")


EVAL_DATA = data_option("2,000 CIFAR-10 test images")
METHODS = typer.Option(",".join(ANALYSIS_METHODS), "--methods", metavar="LIST", show_default=False,
                       help=f"Comma-separated, from: {', '.join(ANALYSIS_METHODS)}. Default: all.")


def plot_option(what: str) -> typer.models.OptionInfo:
    return typer.Option(None, "--plot", metavar="FILE.png", help=escape(f"Also draw {what} (needs atm-cli[plot])."))


def check_plot(plot: Optional[Path]) -> None:
    """Fail on a missing matplotlib, or a --plot that cannot be written, before the long run rather than after it."""
    if plot is not None:
        pyplot()
        checks.check_output(plot, "--plot")


def finish(console: Console, table: RenderableType, result: dict, json_output: bool, plot: Optional[Path] = None,
           draw: Optional[Callable[[Path], Path]] = None, interrupted: Optional[str] = None) -> None:
    """The table on stderr, the plot when asked, the JSON object on stdout when asked; then, for a run
    Ctrl-C cut short, what it kept (`interrupted`) and exit code 130."""
    console.print(table)
    if plot is not None:
        console.print(f"plot: {draw(plot)}", highlight=False)
    if json_output:
        typer.echo(json.dumps(result))
    if interrupted is not None:
        console.print(f"interrupted: {interrupted}", highlight=False)
        raise typer.Exit(INTERRUPTED_EXIT_CODE)


def methods_list(text: str) -> list[str]:
    """--methods as names, checked before any model is loaded."""
    from atm_cli.analysis.ladders import check_methods

    methods = [name.strip() for name in text.split(",") if name.strip()]
    check_methods(methods)
    return methods


def floats_list(text: str, flag: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"{flag} must be comma-separated numbers, got {text!r}") from None


def resolve_model(console: Console, model: str) -> str:
    """The full timm name of --model; a name completed from the one typed is said on stderr."""
    from atm_cli.evaluation.models import resolve_model_name

    return resolve_model_name(model, note=lambda text: console.print(text, highlight=False))


def load(console: Console, model: str, checkpoint: Optional[Path], pretrained: bool, device: str,
         precision: str = "fp32", unsafe_checkpoint: bool = False, compile: str = "off") -> LoadedModel:
    """The model the flags name, loaded behind a spinner."""
    from atm_cli.evaluation import load_model

    model = resolve_model(console, model)
    with console.status(f"loading {model}"):
        loaded = load_model(model, checkpoint=checkpoint, pretrained=pretrained, device=device, precision=precision,
                            unsafe_checkpoint=unsafe_checkpoint, compile=compile)
    if not pretrained:
        console.print(RANDOM_WEIGHTS_NOTE, highlight=False)
    if loaded.compiled:  # inductor's C++ toolchain probe warns of a missing CUDA runtime on every CPU-only machine
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    return loaded


def prepare(console: Console, model: str, checkpoint: Optional[Path], pretrained: bool, data: Optional[Path],
            default_data: Path, batch_size: int, limit: Optional[int], seed: int, device: str,
            precision: str = "fp32", unsafe_checkpoint: bool = False, compile: str = "off") -> Workload:
    """Load the model and every batch into memory once: each method then runs on the same batches."""
    from atm_cli.evaluation import Workload, load_image_folder, preload

    loaded = load(console, model, checkpoint, pretrained, device, precision, unsafe_checkpoint, compile)
    with console.status("loading images"):
        root = data if data is not None else default_data
        images = load_image_folder(root, loaded, limit=limit, seed=seed)
        batches = preload(images, batch_size, device=loaded.device)
    if images.skipped:
        console.print(f"skipped {images.skipped} unreadable image(s)", highlight=False)
    workload = Workload(loaded, batches, images.source)
    console.print(f"{loaded.name}: {workload.n_images} images from {root}, batch {batch_size}, {loaded.device}, "
                  f"{loaded.precision}{', compiled' if loaded.compiled else ''}", highlight=False)
    return workload


@contextmanager
def progress_bar(console: Console, label: str) -> Iterator[Callable[[int, int], None]]:
    """A Rich bar on stderr; yields the (done, total) callback the library layers take."""
    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)
