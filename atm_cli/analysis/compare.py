"""Accuracy against GFLOPs for several methods over a range of budgets (paper Fig. 4), on the same batches.

A budget is a share of the unmerged model's GFLOPs. ToMe and the Fig. 5 schedules take, at each
budget, the least merging on their ladder (`ladders`) that fits it: GFLOPs fall monotonically
along a top-r ladder, so bisection on GFLOPs (estimated on the first batch, where ToMe's count is
already exact) finds that step, and a run on every batch confirms it; a data-dependent ladder (the
constant threshold, on ATM's threshold grid) steps on while the full run still exceeds the budget.
ATM takes the calibration's best top-1 under the budget, in the space measured from the model,
seeded with the constant threshold's point at that budget: it never scores below it.

`by=By.TIME` budgets time instead: a budget is a share of the unmerged model's time per batch on this
device, predicted from a run's token counts by the device's latency model (`evaluation.latency`,
cached; each method's step cost fitted on a few of its settings), as `atm calibrate --target-speedup`
constrains its trials: cheap and deterministic, where timing every step tried would be neither. Fewer
tokens are predicted faster, so the same bisection holds along a ladder. Either way every point is then
timed for real beside the unmerged model (`timing.timed`), and that measured speedup is what the
report shows (a point may measure short of its budget by the model's error).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..calibration import BudgetGoal, RangeFlags, SearchSpace, search_on
from ..calibration.goals import CappedGoal, LatencyGoal
from ..calibration.speed import FIT_SETTINGS, fit_settings
from ..engine import ATMConfig, Knob, MethodConfig
from ..errors import UsageError
from ..evaluation import Outcomes, Workload, describe_method
from ..evaluation.latency import MeasuredSpeed, device_latency
from ..paper import BUDGETS, METHODS
from .ladders import (ATM, ChosenSetting, Cost, OnBaseline, Progress, answer_atm_last, check_methods,
                      config_class, gflops_of, ladders, least_merging_within)
from .plotting import pyplot, save_figure
from .timing import By, Timing


@dataclass(frozen=True)
class BudgetUnit:
    """What a budget caps: GFLOPs per image, or time per batch predicted by the device's latency model."""

    by: By
    unmerged: float  # the unmerged model's, in that unit
    cost: Cost
    goal: Callable[[float, float], CappedGoal]  # ATM's search goal for (limit, share)


def gflops_unit(workload: Workload) -> BudgetUnit:
    return BudgetUnit(By.GFLOPS, workload.baseline.gflops, gflops_of, lambda limit, share: BudgetGoal(limit))


def time_unit(workload: Workload, fits: dict[str, Sequence[MethodConfig]],
              folder: str | Path | None = None) -> BudgetUnit:
    """Predicted seconds per batch, from the latency model at the workload's batch size (cached), with the
    step cost of each method in `fits` (config name -> settings) fitted on the first batch."""
    latency = device_latency(workload.loaded, workload.batches[0][0], fits, folder)

    def predicted(config: MethodConfig, run: Outcomes) -> float:
        return latency.outcomes_seconds(run, config.NAME)

    unmerged = latency.unmerged_seconds(workload.depth)

    def goal(limit: float, share: float) -> CappedGoal:
        return LatencyGoal(limit, predict=lambda run: latency.outcomes_seconds(run, ATMConfig.NAME),
                           unmerged_seconds=unmerged, speedup=1 / share)

    return BudgetUnit(By.TIME, unmerged, predicted, goal)


def step_fits(methods: Sequence[str], known: dict[str, Knob], space: SearchSpace,
              depth: int) -> dict[str, list[MethodConfig]]:
    """The settings each method's step cost is fitted on, by config name: ToMe's schedules share ToMe's, and the
    constant threshold ATM's, fitted on the space's constants as `atm calibrate --target-speedup` fits it."""
    fits: dict[str, list[MethodConfig]] = {}
    for name in methods:
        cls = config_class(name, known)
        fits.setdefault(cls.NAME, fit_settings(space, depth) if cls is ATMConfig else spread(known[name]))
    return fits


def spread(ladder: Knob, n: int = FIT_SETTINGS) -> list[MethodConfig]:
    """Up to `n` settings of the ladder, from its least merging step to its most."""
    steps = sorted({1 + round(i * (ladder.top - 1) / (n - 1)) for i in range(n)})
    return [ladder.config(step) for step in steps]


@dataclass
class ComparePoint(ChosenSetting):
    method: str
    budget: float  # share of the unmerged GFLOPs, or of its time per batch (by time)
    limit: float  # the budget in its unit: GFLOPs per image, or predicted seconds per batch
    chosen: Outcomes | None  # None: no setting of this method fits the budget
    params: dict | None
    config: MethodConfig | None = None
    speed: MeasuredSpeed | None = None
    by: By = By.GFLOPS

    def to_dict(self, baseline: Outcomes) -> dict:
        unit = {"budget_gflops": self.limit} if self.by is By.GFLOPS else {"budget_seconds": self.limit}
        return {"method": self.method, "budget": self.budget, **unit, **self.figures(baseline)}


@dataclass
class CompareReport(OnBaseline):
    baseline: Outcomes
    methods: list[str]
    budgets: list[float]
    points: list[ComparePoint]
    space: SearchSpace  # ATM's search space and the constant threshold's grid
    timing: Timing
    by: By = By.GFLOPS
    interrupted: bool = False  # stopped early: `points` holds those finished before the interrupt

    def point(self, method: str, budget: float) -> ComparePoint | None:
        """The method's point at the budget (None: not reached before an interrupt)."""
        return next((p for p in self.points if p.method == method and p.budget == budget), None)

    def to_dict(self) -> dict:
        return {"baseline_top1": self.baseline_top1, "baseline_gflops": self.baseline_gflops,
                "n_images": self.n_images, "batch_size": self.batch_size, "methods": self.methods,
                "budgets": self.budgets, "points": [p.to_dict(self.baseline) for p in self.points],
                "by": self.by.value, "timing": self.timing.to_dict(), "search_space": self.space.to_dict(),
                "interrupted": self.interrupted}


def compare(workload: Workload, methods: Sequence[str] = METHODS, budgets: Sequence[float] = BUDGETS,
            n_trials: int = 30, seed: int = 0, ranges: RangeFlags = RangeFlags(),
            progress: Progress | None = None, keep_partial: bool = False, by: By = By.GFLOPS,
            latency_folder: str | Path | None = None) -> CompareReport:
    """Top-1, GFLOPs and measured speedup of each method at each budget (a share of the unmerged model's
    GFLOPs, or `by` time of its predicted time per batch; `latency_folder`: the latency model's cache).

    ATM's points are searched after the others', seeded with the constant threshold's when it ran.
    With `keep_partial`, an interrupt (Ctrl-C) after the unmerged run ends the comparison early and
    the report holds the points finished before it (`interrupted` is then True).
    """
    check_methods(methods)
    outside = [b for b in budgets if not 0 < b < 1]
    if outside or not budgets:
        raise UsageError(f"budgets are shares of the unmerged {'GFLOPs' if by is By.GFLOPS else 'time'} strictly "
                         f"between 0 and 1 (e.g. 0.7), got {budgets}")
    if not workload.n_batches:
        raise UsageError("the comparison needs at least one image")
    space = ranges.resolve(workload)
    known = ladders(workload.loaded, space)
    baseline = workload.baseline
    unit = gflops_unit(workload) if by is By.GFLOPS else time_unit(
        workload, step_fits(methods, known, space, workload.depth), latency_folder)
    points, interrupted = answer_atm_last(
        workload, methods, budgets, lambda name, budget: ladder_within(workload, known[name], budget, unit),
        lambda budget, seeds: atm_within(workload, budget, unit, n_trials, seed, space, seeds), progress, keep_partial)
    ordered = [points[m, b] for m in methods for b in budgets if (m, b) in points]
    return CompareReport(baseline, list(methods), list(budgets), ordered, space, Timing.of(workload), by, interrupted)


def ladder_within(workload: Workload, ladder: Knob, budget: float, unit: BudgetUnit) -> ComparePoint:
    """A ladder method's point at one budget: its least merging within it."""
    limit = budget * unit.unmerged
    found = least_merging_within(workload, ladder, limit, unit.cost)
    if found is None:
        return ComparePoint(ladder.name, budget, limit, None, None, by=unit.by)
    step, run = found
    return ComparePoint(ladder.name, budget, limit, run, ladder.params(step), ladder.config(step), by=unit.by)


def atm_within(workload: Workload, budget: float, unit: BudgetUnit, n_trials: int, seed: int, space: SearchSpace,
               seeds: Sequence[ATMConfig] = ()) -> ComparePoint:
    """ATM: the calibration search's best top-1 within the budget in `unit`, chosen on these images; none when
    even the most merging setting in range exceeds it on the first batch."""
    limit = budget * unit.unmerged
    goal = unit.goal(limit, budget)
    found = search_on(workload, goal, space, n_trials, seed, seeds) if goal.least_cost(workload, space) <= limit \
        else None
    if found is None or found.best is None:
        return ComparePoint(ATM, budget, limit, None, None, by=unit.by)
    config = space.config(found.best.params)
    return ComparePoint(ATM, budget, limit, found.best.outcomes, describe_method(config)[1], config, by=unit.by)


def plot_compare(report: CompareReport, path: str | Path, title: str = "") -> Path:
    """Fig. 4: top-1 against GFLOPs (or, by time, against the measured speedup), one line per method, the
    unmerged model as a star."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    by_time = report.by is By.TIME

    def x(point: ComparePoint) -> float:
        return point.speedup if by_time else point.gflops

    for method in report.methods:
        reached = [p for p in report.points if p.method == method and p.passed]
        axes.plot([x(p) for p in reached], [p.top1 for p in reached], marker="o", label=method)
    axes.plot([1.0 if by_time else report.baseline_gflops], [report.baseline_top1], marker="*", markersize=14,
              color="black", linestyle="none", label="unmerged")
    axes.set_xlabel("speedup over the unmerged model (measured)" if by_time else "GFLOPs per image")
    axes.set_ylabel("top-1 accuracy (%)")
    against = "measured speedup" if by_time else "GFLOPs"
    axes.set_title(title or f"Accuracy against {against} ({report.n_images} images, batch {report.batch_size})")
    axes.grid(alpha=0.3)
    axes.legend()
    return save_figure(figure, path)
