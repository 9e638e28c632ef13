"""`atm compare`: top-1 against GFLOPs (or time) for several methods over a range of budgets (the paper's Fig. 4),
each point's speedup measured."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from atm_cli.paper import BUDGETS

from . import model_data as options
from . import ranges
from . import speed_options as speed

if TYPE_CHECKING:
    from atm_cli.analysis.compare import CompareReport


def command(
    model: str = options.MODEL,
    checkpoint: Optional[Path] = options.CHECKPOINT,
    unsafe_checkpoint: bool = options.UNSAFE_CHECKPOINT,
    no_pretrained: bool = options.NO_PRETRAINED,
    data: Optional[Path] = options.EVAL_DATA,
    methods: str = options.METHODS,
    budgets: str = typer.Option(",".join(f"{100 * b:g}" for b in BUDGETS), "--budgets", metavar="LIST",
                                help="Budgets in percent of the unmerged model's GFLOPs (--by time: of its time per "
                                     "batch), comma-separated."),
    n_trials: int = options.n_trials_option("ATM: calibration trials per budget."),
    plot: Optional[Path] = options.plot_option("top-1 against GFLOPs (--by time: measured speedup)"),
    paper_ranges: bool = ranges.PAPER_RANGES,
    alpha_range: Optional[str] = ranges.ALPHA_RANGE,
    beta_range: Optional[str] = ranges.BETA_RANGE,
    theta_min_range: Optional[str] = ranges.THETA_MIN_RANGE,
    step: Optional[float] = ranges.STEP,
    batch_size: int = options.BATCH_SIZE,
    limit: Optional[int] = options.LIMIT,
    seed: int = options.SEED,
    device: str = options.DEVICE,
    precision: str = options.PRECISION,
    compile: str = options.COMPILE,
    by: str = speed.BY,
    cache_dir: Optional[Path] = speed.CACHE_DIR,
    json_output: bool = options.JSON,
) -> None:
    """Top-1 of each method at each GFLOPs (or time) budget, all on the same batches; each point timed for real.

    ToMe and the Fig. 5 schedules take the least merging that fits the budget.
    ATM takes the calibration search's best top-1 within it (ranges measured from the model unless
    given), seeded with the constant threshold's point. --by time: budgets of time per batch, fitted
    by the device's latency model (as calibrate --target-speedup), then timed beside the unmerged model.
    """
    import optuna

    from atm_cli.analysis.compare import compare, plot_compare
    from atm_cli.evaluation import DEMO_EVAL_DATA

    names = options.methods_list(methods)
    budgeted = speed.by_value(by)
    space = ranges.range_flags(paper_ranges, alpha_range, beta_range, theta_min_range, step)
    shares = [value / 100.0 for value in options.floats_list(budgets, "--budgets")]
    options.check_plot(plot)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # ATM's search: the progress bar reports instead
    console = Console(stderr=True)
    workload = options.prepare(console, model, checkpoint, not no_pretrained, data, DEMO_EVAL_DATA, batch_size, limit,
                               seed, device, precision, unsafe_checkpoint, compile)
    with options.progress_bar(console, "comparing (method x budget)") as progress:
        report = compare(workload, names, shares, n_trials, seed, ranges=space, progress=progress,
                         keep_partial=True, by=budgeted, latency_folder=cache_dir)
    summary = Group(compare_table(report, workload.loaded.name), Text(speed.timing_note(report.timing)))
    options.finish(console, summary, ranges.with_space(report.to_dict(), report.space), json_output, plot,
                   lambda path: plot_compare(report, path),
                   interrupted=f"{len(report.points)} of {len(report.methods) * len(report.budgets)} points finished "
                   "before it" if report.interrupted else None)


def compare_table(report: CompareReport, model: str) -> Table:
    budgeted = "GFLOPs" if report.by.value == "gflops" else "time per batch (predicted)"
    table = Table(title=f"{model}, {report.n_images} images: top-1 % (GFLOPs, measured speedup) at each budget of "
                        f"the unmerged {budgeted}; unmerged {report.baseline_top1:.2f} % at "
                        f"{report.baseline_gflops:.4g} GFLOPs", title_justify="left")
    table.add_column("method")
    for budget in report.budgets:
        table.add_column(f"<= {100 * budget:g}%", justify="right")
    for method in report.methods:
        cells = []
        for budget in report.budgets:
            point = report.point(method, budget)
            if point is None:
                cells.append("not run (interrupted)")
            elif not point.passed:
                cells.append("no setting passed")
            else:
                cells.append(f"{point.top1:.2f} ({point.gflops:.3g}, {speed.speedup_cell(point.speed)})")
        table.add_row(method, *cells)
    return table
