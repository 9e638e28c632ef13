"""What the commands that time settings share: `--by` (stress, compare), `--cache-dir` (calibrate, compare) and
how a measured speedup is written."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import typer

if TYPE_CHECKING:
    from atm_cli.analysis.timing import By, Timing
    from atm_cli.evaluation.latency import MeasuredSpeed

BY = typer.Option("gflops", "--by", metavar="gflops|time",
                  help="Rank (stress) or budget (compare) by GFLOPs, or by time on this device: measured speedup "
                       "(stress), a share of the unmerged model's time per batch predicted by the device's latency "
                       "model (compare).")
CACHE_DIR = typer.Option(None, "--cache-dir", metavar="DIR",
                         help="Where latency models are cached (default: $ATM_CACHE, else ~/.cache/atm).")


def by_value(text: str) -> By:
    """--by as the analysis layer's typed value (`By`); UsageError for another word."""
    from atm_cli.analysis.timing import By

    return By.parse(text)


def speedup_cell(speed: Optional[MeasuredSpeed], spread: bool = False) -> str:
    """The median speedup, and with `spread` the lowest and highest round's (how far one figure can be trusted)."""
    if speed is None:
        return ""
    return f"{speed.speedup:.2f}x" + (f" ({speed.speedup_low:.2f}-{speed.speedup_high:.2f})" if spread else "")


def timing_note(timing: Timing) -> str:
    """How the speedups were measured, and the compile time they leave out."""
    compiled = f", compiled ({timing.compile_seconds:.0f} s compiling on the images, left out)" \
        if timing.compiled else ""
    return (f"speedup: measured beside the unmerged model on {timing.device}, first batch of {timing.batch_size}, "
            f"{timing.repeats} rounds interleaved, median{compiled}")

