"""`atm probe`: layer-wise information loss of merging (the paper's Fig. 2), the evidence for alpha and beta."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from atm_cli.paper import PROBE_THRESHOLDS

from . import model_data as options

if TYPE_CHECKING:
    from atm_cli.analysis.probe import ProbeReport

PROBE_LIMIT = 256  # the mean distance settles on a few hundred images; --limit raises it
SHOWN_AS_ZERO = 0.5e-4  # distances below this print as 0.0000 (float32 rounding leaves ~1e-8 where nothing moved)


def command(
    model: str = options.MODEL,
    checkpoint: Optional[Path] = options.CHECKPOINT,
    unsafe_checkpoint: bool = options.UNSAFE_CHECKPOINT,
    no_pretrained: bool = options.NO_PRETRAINED,
    data: Optional[Path] = options.data_option("1,000 CIFAR-10 calibration images"),
    thresholds: str = typer.Option(",".join(f"{t:g}" for t in PROBE_THRESHOLDS), "--thresholds", metavar="LIST",
                                   help="Constant thresholds to probe, comma-separated."),
    plot: Optional[Path] = options.plot_option("the figure"),
    batch_size: int = options.BATCH_SIZE,
    limit: int = options.limit_option(PROBE_LIMIT, "A class-balanced subset of this many images."),
    seed: int = options.SEED,
    device: str = options.DEVICE,
    json_output: bool = options.JSON,
) -> None:
    """How far merging in one block alone moves the final class token: the evidence for choosing alpha and beta.

    For each block and threshold, the model merges in that block only (alternate matching).
    The table gives the cosine distance of the final class token (pre-logits) from the unmerged model's.
    A loss that grows towards the first blocks says: start the thresholds high (alpha), let them fall with depth (beta).
    """
    from atm_cli.analysis.probe import plot_probe, probe
    from atm_cli.evaluation import DEMO_CALIB_DATA
    from atm_cli.evaluation.models import require_timm

    values = options.floats_list(thresholds, "--thresholds")
    options.check_plot(plot)
    console = Console(stderr=True)
    workload = options.prepare(console, model, checkpoint, not no_pretrained, data, DEMO_CALIB_DATA, batch_size, limit,
                               seed, device, unsafe_checkpoint=unsafe_checkpoint)
    require_timm(workload.loaded, "probe (timm's pre-logits)")
    with options.progress_bar(console, "probing (block x threshold)") as progress:
        report = probe(workload.loaded.model, workload.batches, values, progress=progress)
    options.finish(console, probe_table(report, workload.loaded.name), report.to_dict(), json_output, plot,
                   lambda path: plot_probe(report, path))


def probe_table(report: ProbeReport, model: str) -> RenderableType:
    table = Table(title=f"{model}, {report.n_images} images: cosine distance of the final class token when "
                        "merging in one block only (tokens merged there per image)", title_justify="left")
    table.add_column("block", justify="right")
    for threshold in report.thresholds:
        table.add_column(f"θ {threshold:g}", justify="right")
    table.add_column("mean", justify="right")
    for row in report.rows:
        cells = [f"{row.distance[t]:.4f} ({row.merged[t]:.0f})" for t in report.thresholds]
        table.add_row(str(row.block), *cells, f"{row.mean_distance:.4f}")
    last = report.rows[-1]
    if max(last.distance.values()) < SHOWN_AS_ZERO:
        return Group(table, Text(f"block {last.block}: 0 whatever it merges: the head reads only the class token, and "
                                 "the last block merges after its attention, so no other token reaches it again"))
    return table
