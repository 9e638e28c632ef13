"""`atm stress`: each method's largest GFLOPs saving with no top-1 drop (the paper's Table 1), its measured speedup,
ranked by either."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.console import Console
from rich.console import Group
from rich.table import Table
from rich.text import Text

from . import model_data as options
from . import ranges
from . import speed_options as speed

if TYPE_CHECKING:
    from atm_cli.analysis.stress import MethodResult, StressReport


def command(
    model: str = options.MODEL,
    checkpoint: Optional[Path] = options.CHECKPOINT,
    unsafe_checkpoint: bool = options.UNSAFE_CHECKPOINT,
    no_pretrained: bool = options.NO_PRETRAINED,
    data: Optional[Path] = options.EVAL_DATA,
    methods: str = options.METHODS,
    tolerance: float = typer.Option(0.0, "--tolerance", min=0.0,
                                    help="Allowed top-1 drop in percentage points (0: no drop at all)."),
    n_trials: int = options.n_trials_option("ATM: trials of the calibration search."),
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
    json_output: bool = options.JSON,
) -> None:
    """The largest GFLOPs saving each method reaches with top-1 >= the unmerged model's minus the tolerance,
    and its speedup measured beside the unmerged model; ranked by GFLOPs or (--by time) by that speedup.

    ATM: the calibration search in no-drop mode, in ranges measured from the model (or the flags'),
    seeded with the constant threshold that passed.
    The other methods and the paper's Fig. 5 schedules (constant threshold, increasing and decreasing
    top-r): the step of their ladder, found by a galloping search, that passes while the next fails.
    Every method sees the same batches. The settings are chosen on these images: re-check them on others.
    """
    import optuna

    from atm_cli.analysis.stress import stress
    from atm_cli.evaluation import DEMO_EVAL_DATA

    names = options.methods_list(methods)
    ranking = speed.by_value(by)
    space = ranges.range_flags(paper_ranges, alpha_range, beta_range, theta_min_range, step)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # ATM's search: the progress bar reports instead
    console = Console(stderr=True)
    workload = options.prepare(console, model, checkpoint, not no_pretrained, data, DEMO_EVAL_DATA, batch_size, limit,
                               seed, device, precision, unsafe_checkpoint, compile)
    with options.progress_bar(console, "stress test (methods)") as progress:
        report = stress(workload, names, tolerance, n_trials, seed, ranges=space, progress=progress,
                        keep_partial=True, by=ranking)
    done = ", ".join(result.method for result in report.methods) or "none"
    notes = [speed.timing_note(report.timing), ahead_of_atm_note(report)]
    options.finish(console, Group(stress_table(report, workload.loaded.name), *(Text(n) for n in notes if n)),
                   ranges.with_space(report.to_dict(), report.space), json_output,
                   interrupted=f"methods finished before it: {done}" if report.interrupted else None)


def stress_table(report: StressReport, model: str) -> Table:
    """The unmerged model, then the methods that passed best first (by GFLOPs or measured speedup), then the rest."""
    ranked_by = "GFLOPs" if report.by.value == "gflops" else "measured speedup"
    table = Table(title=f"Stress test: {model}, {report.n_images} images, top-1 drop <= {report.tolerance:g} "
                        f"points, ranked by {ranked_by} (settings chosen on these images)", title_justify="left")
    for column, justify in (("method", "left"), ("top-1 %", "right"), ("GFLOPs", "right"),
                            ("speedup (lowest-highest)", "right"), ("setting", "left")):
        table.add_column(column, justify=justify)
    table.add_row("unmerged", f"{report.baseline_top1:.2f}", f"{report.baseline_gflops:.4g}", "1x", "")
    for result in report.ranked():
        change = 100.0 * (result.gflops / report.baseline_gflops - 1.0)
        table.add_row(result.method, f"{result.top1:.2f}", f"{result.gflops:.4g} ({change:+.0f}%)",
                      speed.speedup_cell(result.speed, spread=True), setting_text(result))
    for result in report.methods:
        if not result.passed:
            table.add_row(result.method, "no setting passed", "", "", "")
    return table


def setting_text(result: MethodResult) -> str:
    """The knob's value or the calibrated thresholds: parameters left at their defaults go unsaid."""
    defaults = {field.name: field.default for field in dataclasses.fields(result.config)}
    return ", ".join(f"{k}={v}" for k, v in result.params.items()
                     if k != "schedule" and v != defaults.get(k, dataclasses.MISSING))


def ahead_of_atm_note(report: StressReport) -> str | None:
    """Where another method saves more than ATM (or, by time, runs faster), said plainly (None: ATM ranks first,
    or did not run)."""
    atm = report.atm
    if atm is None:
        return None
    ahead = report.ahead_of(atm)
    if not ahead:
        return None
    if report.by.value == "time":
        mine = f"{atm.speedup:.2f}x" if atm.passed else "no setting passed"
        return "faster than ATM here (measured): " + ", ".join(
            f"{r.method} ({r.speedup:.2f}x, {r.gflops:.4g} GFLOPs)" for r in ahead) + f"; ATM: {mine}"
    mine = f"{atm.gflops:.4g} GFLOPs" if atm.passed else "no setting passed"
    return "saves more than ATM here: " + ", ".join(
        f"{r.method} ({r.gflops:.4g} GFLOPs, {100.0 * (r.gflops / report.baseline_gflops - 1.0):+.0f}%)"
        for r in ahead) + f"; ATM: {mine}"
