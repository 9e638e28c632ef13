"""The search-range flags calibrate, stress and compare share: ranges measured from the model unless given."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import typer

from atm_cli.errors import UsageError
from atm_cli.paper import PAPER_ALPHA, PAPER_BETA, PAPER_STEP, PAPER_THETA_MIN

from . import checks
from .flags import flag_of

if TYPE_CHECKING:
    from atm_cli.calibration.ranges import RangeFlags
    from atm_cli.calibration.space import SearchSpace


def _paper(bounds: tuple[float, float]) -> str:
    return f"{bounds[0]},{bounds[1]}"


PAPER_RANGES = typer.Option(False, "--paper-ranges",
                            help=f"Search the paper's sweep (alpha {_paper(PAPER_ALPHA)}, beta {_paper(PAPER_BETA)}, "
                                 f"theta_min {_paper(PAPER_THETA_MIN)}, step {PAPER_STEP}) instead of ranges measured "
                                 "from the model's similarities.")
ALPHA_RANGE = typer.Option(None, "--alpha-range", metavar="LOW,HIGH",
                           help="Default: measured from the model's best-match similarities on the first batch.")
BETA_RANGE = typer.Option(None, "--beta-range", metavar="LOW,HIGH",
                          help="Default: 0 (constant thresholds) up to the fall that spans the measured range.")
THETA_MIN_RANGE = typer.Option(None, "--theta-min-range", metavar="LOW,HIGH", help="Default: as alpha's.")
STEP = typer.Option(None, "--step", help="Grid step of alpha, beta and theta_min (default: about 200 values "
                                         "across the measured range).")
SPLIT_LAYER = typer.Option(None, "--split-layer", metavar="L",
                           help="Last block with alternate matching (default: 0.75 of the depth).")
SEARCH_SPLIT_LAYER = typer.Option(False, "--search-split-layer", help="Search the split layer too.")


def _range(text: Optional[str], flag: str) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"{flag} takes LOW,HIGH (two numbers), got {text!r}") from None
    checks.check_finite(low, flag), checks.check_finite(high, flag)
    return low, high


def range_flags(paper: bool, alpha: Optional[str], beta: Optional[str], theta_min: Optional[str],
                step: Optional[float], split_layer: Optional[int] = None, search_split_layer: bool = False) -> RangeFlags:
    from atm_cli.calibration.ranges import RangeFlags  # here: help starts without torch and Optuna

    checks.check_step(step)

    return RangeFlags(paper=paper, alpha=_range(alpha, "--alpha-range"), beta=_range(beta, "--beta-range"),
                      theta_min=_range(theta_min, "--theta-min-range"), step=step, split_layer=split_layer,
                      search_split_layer=search_split_layer)


def origin(space: SearchSpace) -> str:
    """Where the space's ranges came from, those given named by their flags."""
    if not space.given:
        return space.origin
    given = f"{', '.join(flag_of(name) for name in space.given)} from the command line"
    return given if space.origin is None else f"{space.origin}; {given}"


def space_record(space: SearchSpace) -> dict:
    """`space.to_dict()` as --json and the preset's provenance record it: its origin as `origin` words it."""
    record = {**space.to_dict(), "origin": origin(space)}
    record.pop("given", None)
    return record


def with_space(result: dict, space: SearchSpace) -> dict:
    """A report's --json with its search space as `space_record` gives it."""
    return {**result, "search_space": space_record(space)}
