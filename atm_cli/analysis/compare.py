"""Accuracy against GFLOPs for several methods over a range of budgets (paper Fig. 4), on the same batches.

A budget is a share of the unmerged model's GFLOPs. ToMe and the Fig. 5 schedules take, at each
budget, the least merging on their ladder (see `stress`) that fits it: GFLOPs fall monotonically
along a top-r ladder, so bisection on GFLOPs (estimated on the first batch, where ToMe's count is
already exact) finds that step, and a run on every batch confirms it; a data-dependent ladder (the
constant threshold, on ATM's threshold grid) steps on while the full run still exceeds the budget.
ATM takes the calibration's best top-1 under the budget, in the space measured from the model,
seeded with the constant threshold's point at that budget: it never scores below it.
"""
from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..calibration import BudgetGoal, RangeFlags, SearchSpace, reachable_gflops, search_on
from ..errors import Interruptible, UsageError
from ..evaluation import Outcomes, Workload, describe_method
from ..paper import BUDGETS
from .plotting import pyplot, save_figure
from .stress import METHODS, ChosenSetting, OnBaseline, Ladder, check_methods, ladders


@dataclass
class ComparePoint(ChosenSetting):
    method: str
    budget: float  # share of the unmerged GFLOPs
    budget_gflops: float
    chosen: Outcomes | None  # None: no setting of this method fits the budget
    params: dict | None

    def to_dict(self, baseline: Outcomes) -> dict:
        return {"method": self.method, "budget": self.budget, "budget_gflops": self.budget_gflops,
                **self.figures(baseline)}


@dataclass
class CompareReport(OnBaseline):
    baseline: Outcomes
    methods: list[str]
    budgets: list[float]
    points: list[ComparePoint]
    space: SearchSpace  # ATM's search space and the constant threshold's grid
    interrupted: bool = False  # stopped early: `points` holds those finished before the interrupt

    def point(self, method: str, budget: float) -> ComparePoint | None:
        """The method's point at the budget (None: not reached before an interrupt)."""
        return next((p for p in self.points if p.method == method and p.budget == budget), None)

    def to_dict(self) -> dict:
        return {"baseline_top1": self.baseline_top1, "baseline_gflops": self.baseline_gflops,
                "n_images": self.n_images, "batch_size": self.batch_size, "methods": self.methods,
                "budgets": self.budgets, "points": [p.to_dict(self.baseline) for p in self.points],
                "search_space": self.space.to_dict(), "interrupted": self.interrupted}


def least_merging_within(workload: Workload, ladder: Ladder, budget_gflops: float) -> tuple[int, Outcomes] | None:
    """The smallest ladder step whose GFLOPs on all batches are <= the budget, and its run (None: none fits)."""
    estimates: dict[int, float] = {}

    def estimate(step: int) -> float:
        if step not in estimates:
            estimates[step] = workload.run(ladder.config(step), max_batches=1).gflops
        return estimates[step]

    if estimate(ladder.top) > budget_gflops:
        return None
    # The least merging step that fits (the top one does; step 0 merges nothing): GFLOPs fall along a ladder.
    fits = 1 + bisect.bisect_left(range(1, ladder.top), True, key=lambda step: estimate(step) <= budget_gflops)
    for step in range(fits, ladder.top + 1):
        run = workload.run(ladder.config(step))
        if run.gflops <= budget_gflops:
            return step, run
    return None


def compare(workload: Workload, methods: Sequence[str] = METHODS, budgets: Sequence[float] = BUDGETS,
            n_trials: int = 30, seed: int = 0, ranges: RangeFlags = RangeFlags(),
            progress: Callable[[int, int], None] | None = None, keep_partial: bool = False) -> CompareReport:
    """Top-1 and GFLOPs of each method at each budget (a share of the unmerged model's GFLOPs).

    ATM's points are searched after the others', seeded with the constant threshold's when it ran.
    With `keep_partial`, an interrupt (Ctrl-C) after the unmerged run ends the comparison early and
    the report holds the points finished before it (`interrupted` is then True).
    """
    check_methods(methods)
    outside = [b for b in budgets if not 0 < b < 1]
    if outside or not budgets:
        raise UsageError(f"budgets are shares of the unmerged GFLOPs strictly between 0 and 1 (e.g. 0.7), got {budgets}")
    if not workload.n_batches:
        raise UsageError("the comparison needs at least one image")
    space = ranges.resolve(workload)
    known = ladders(workload.loaded, space)
    baseline = workload.baseline
    points: dict[tuple[str, float], ComparePoint] = {}
    total = len(methods) * len(budgets)
    with Interruptible(keep_partial) as stop:
        for method in sorted(methods, key=lambda name: name == "atm"):  # ATM last: the constant seeds it
            for budget in budgets:
                if method == "atm":
                    constant = points.get(("threshold", budget))
                    seeds = [space.constant(constant.params["threshold"])] if constant and constant.passed else []
                    point = atm_within(workload, budget, n_trials, seed, space, seeds)
                else:
                    point = ladder_within(workload, known[method], budget, baseline.gflops)
                points[method, budget] = point
                if progress is not None:
                    progress(len(points), total)
    ordered = [points[m, b] for m in methods for b in budgets if (m, b) in points]
    return CompareReport(baseline, list(methods), list(budgets), ordered, space, stop.interrupted)


def ladder_within(workload: Workload, ladder: Ladder, budget: float, baseline_gflops: float) -> ComparePoint:
    """A ladder method's point at one budget: its least merging within it."""
    budget_gflops = budget * baseline_gflops
    found = least_merging_within(workload, ladder, budget_gflops)
    if found is None:
        return ComparePoint(ladder.method, budget, budget_gflops, None, None)
    step, run = found
    return ComparePoint(ladder.method, budget, budget_gflops, run, ladder.params(step))


def atm_within(workload: Workload, budget: float, n_trials: int, seed: int, space: SearchSpace,
               seeds: Sequence = ()) -> ComparePoint:
    """ATM: the calibration search's best top-1 with GFLOPs <= the budget, chosen on these images."""
    budget_gflops = budget * workload.baseline.gflops
    lowest, _, _ = reachable_gflops(workload, space)
    found = None if budget_gflops < lowest else search_on(workload, BudgetGoal(budget_gflops), space, n_trials, seed,
                                                          seeds)
    if found is None or found.best is None:
        return ComparePoint("atm", budget, budget_gflops, None, None)
    _, params = describe_method(space.config(found.best.params))
    return ComparePoint("atm", budget, budget_gflops, found.best.outcomes, params)


def plot_compare(report: CompareReport, path: str | Path, title: str = "") -> Path:
    """Fig. 4: top-1 against GFLOPs, one line per method, the unmerged model as a star."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for method in report.methods:
        reached = [p for p in report.points if p.method == method and p.gflops is not None]
        axes.plot([p.gflops for p in reached], [p.top1 for p in reached], marker="o", label=method)
    axes.plot([report.baseline_gflops], [report.baseline_top1], marker="*", markersize=14, color="black",
              linestyle="none", label="unmerged")
    axes.set_xlabel("GFLOPs per image")
    axes.set_ylabel("top-1 accuracy (%)")
    axes.set_title(title or f"Accuracy against GFLOPs ({report.n_images} images, batch {report.batch_size})")
    axes.grid(alpha=0.3)
    axes.legend()
    return save_figure(figure, path)
