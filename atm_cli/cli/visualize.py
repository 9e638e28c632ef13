"""`atm visualize`: each image beside its merged version, one region per token left (the paper's Figs. 1, 7)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import typer
from rich.console import Console
from rich.table import Table

from atm_cli.errors import UsageError

from . import checks, method_options
from . import model_data as options
from .method_options import MethodFlags

if TYPE_CHECKING:
    from atm_cli.analysis.visualize import Visualization


def command(
    images: List[Path] = typer.Argument(..., metavar="IMAGE...", help="Image files to draw.", show_default=False),
    out: Path = typer.Option(..., "--out", metavar="FILE.png", help="Where to write the picture."),
    model: str = options.MODEL,
    checkpoint: Optional[Path] = options.CHECKPOINT,
    unsafe_checkpoint: bool = options.UNSAFE_CHECKPOINT,
    no_pretrained: bool = options.NO_PRETRAINED,
    method: Optional[str] = method_options.METHOD,
    set_: Optional[List[str]] = method_options.SET,
    preset: Optional[str] = method_options.PRESET,
    force: bool = method_options.FORCE,
    alpha: Optional[float] = method_options.ALPHA,
    beta: Optional[float] = method_options.BETA,
    theta_min: Optional[float] = method_options.THETA_MIN,
    split_layer: Optional[int] = method_options.SPLIT_LAYER,
    r: Optional[str] = method_options.R,
    with_tome: bool = typer.Option(False, "--with-tome",
                                   help="Add a row of ToMe at the same mean GFLOPs on these images (Fig. 7)."),
    device: str = options.DEVICE,
    json_output: bool = options.JSON,
) -> None:
    """Draw each image and, under it, the tokens left after the last block: every token's patches as one region.

    Each image runs alone, so ATM's count is that image's own (in a batch, r is the batch mean).
    ATM's last block merges at its threshold here, as in the paper's figures (the logits are the same).
    The number under each picture is the tokens left, class token included.
    """
    from atm_cli.analysis.visualize import visualize

    flags = MethodFlags(method, preset, alpha, beta, theta_min, split_layer, r, set_)
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out must be a .png file, got {out}")
    checks.check_output(out, "--out")
    console = Console(stderr=True)
    loaded = options.load(console, model, checkpoint, not no_pretrained, device, unsafe_checkpoint=unsafe_checkpoint)
    choice = flags.resolve(loaded.name, loaded.checkpoint_sha256, force)
    if choice.config is None:
        raise UsageError("--method none merges nothing: there is nothing to draw")
    with console.status("merging and drawing"):
        result = visualize(loaded, [str(path) for path in images], choice.config, out, beside_tome=with_tome)
    options.finish(console, visualization_table(result, choice.source), result.to_dict(), json_output)


def visualization_table(result: Visualization, source: str) -> Table:
    table = Table(title=f"{result.path}: tokens left after the last block ({source})", title_justify="left")
    table.add_column("image")
    methods = list(dict.fromkeys(panel.method for panel in result.panels if panel.tokens is not None))
    for method in methods:
        table.add_column(method, justify="right")
    for image in dict.fromkeys(panel.image for panel in result.panels):
        counts = {p.method: p.tokens for p in result.panels if p.image == image and p.tokens is not None}
        table.add_row(image, *(str(counts[m]) for m in methods))
    return table
