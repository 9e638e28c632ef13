"""Before the trials: what GFLOPs the space reaches, and the constant threshold that meets the goal.

A constant threshold is ATM with beta = 0 (alpha = theta_min = t), so the search's family holds
it; seeded as a trial, it makes ATM's result never worse than the constant found on the same
images. Along the space's constants (from the least merging down) GFLOPs fall, so for a budget
the constant is found by bisection on the GFLOPs of the first batches (they settle on a batch or
two); for a top-1 floor by bisection on whether the trial meets it, each step a trial of the study.
Each goal picks its way (`Goal.seed`).
"""
from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import TYPE_CHECKING

import optuna

from atm_cli.engine import ATMConfig
from atm_cli.errors import UsageError, param
from atm_cli.evaluation import Outcomes

from .search import GFLOPS_SLACK, BatchSource, Search, TrialEvent
from .space import SearchSpace

if TYPE_CHECKING:
    from .goals import CappedGoal

FLOOR_LADDER = 32  # the constants a floor's bisection chooses among (about five trials)
SEED_TRIES = 4  # constants tried for a budget before the search goes on without one


def first_batches(source: BatchSource, config: ATMConfig, n_batches: int) -> Outcomes:
    return Outcomes([source.run_batch(config, index) for index in range(min(n_batches, source.n_batches))])


def reachable_gflops(source: BatchSource, space: SearchSpace, n_batches: int = 1) -> tuple[float, float, int]:
    """GFLOPs of the most- and least-merging settings in `space` on the first batches, and images run."""
    space.validate(source.depth)
    runs = [first_batches(source, config, n_batches) for config in space.extremes()]
    return runs[0].gflops, runs[1].gflops, sum(run.n_images for run in runs)


def check_budget(target_gflops: float, baseline_gflops: float, reachable: tuple[float, float] | None = None) -> None:
    """Refuse a budget the search cannot meet, naming the range it can (once `reachable` is known)."""
    if target_gflops >= baseline_gflops:
        raise UsageError(f"the budget {target_gflops:.4g} GFLOPs is not below the unmerged model's "
                         f"{baseline_gflops:.4g} GFLOPs: nothing to search")
    if reachable is None:
        return
    low, high = reachable
    if target_gflops < low * (1 - GFLOPS_SLACK):
        raise UsageError(f"the budget {target_gflops:.4g} GFLOPs is below what any setting in range reaches: "
                         f"{low:.4g}-{high:.4g} GFLOPs on the first batch (widen the ranges, e.g. {param('theta_min_range')})")


def constant_for_budget(source: BatchSource, space: SearchSpace, budget: float, n_batches: int = 2,
                        known: dict[float, float] | None = None,
                        cost: Callable[[Outcomes], float] = lambda run: run.gflops) -> tuple[ATMConfig | None, int]:
    """The least-merging constant threshold of the space within the budget on the first batches (None: none
    is), and the images run to find it; `known` keeps each constant's cost on those batches between calls.
    `cost`: of a run, in the budget's unit (GFLOPs, or a time goal's predicted seconds)."""
    constants, images = space.constants(source.depth), 0
    estimates = {} if known is None else known

    def spent(index: int) -> float:
        nonlocal images
        if constants[index] not in estimates:
            run = first_batches(source, space.constant(constants[index]), n_batches)
            estimates[constants[index]], images = cost(run), images + run.n_images
        return estimates[constants[index]]

    if not constants or spent(len(constants) - 1) > budget:
        return None, images
    # The least merging constant that fits (the last one does): the cost falls along the list.
    fits = bisect.bisect_left(range(len(constants) - 1), True, key=lambda index: spent(index) <= budget)
    return space.constant(constants[fits]), images


def constant_for_floor(search: Search, study: optuna.Study, n_trials: int,
                       on_trial: Callable[[TrialEvent], None] | None = None) -> ATMConfig | None:
    """The most-merging constant threshold that met the goal's floor, by bisection over up to FLOOR_LADDER of
    the space's constants, each step a trial of the study (None: none did, or the study is full)."""
    constants = search.space.constants(search.source.depth)
    stride = max(1, len(constants) // FLOOR_LADDER)
    ladder = [search.space.constant(t) for t in constants[::stride]]
    passed, failed, best = -1, len(ladder), None  # the least-merging constant is taken to pass untried
    while failed - passed > 1:
        middle = (passed + failed) // 2
        trial = search.try_setting(study, ladder[middle], n_trials, on_trial)
        if trial is None:
            break
        if trial.state == "complete" and trial.feasible:
            passed, best = middle, ladder[middle]
        else:
            failed = middle
    return best


def constant_within_budget(goal: CappedGoal, search: Search, study: optuna.Study, n_trials: int,
                           on_trial: Callable[[TrialEvent], None] | None = None) -> ATMConfig | None:
    """The least-merging constant threshold within the goal's budget on every image, run as a trial of the study
    (None: none was, in SEED_TRIES tries).

    A constant chosen on the first batches may exceed the budget on the whole set (batches differ in
    cost); the next try aims at the budget scaled by the ratio of the first batches' cost to the whole
    set's that the last try showed.
    """
    aim, known = goal.budget, {}
    for _ in range(SEED_TRIES):
        constant, _ = constant_for_budget(search.source, search.space, aim, search.probe_batches, known, goal.cost)
        trial = None if constant is None else search.try_setting(study, constant, n_trials, on_trial, unpruned=True)
        if trial is None or trial.state != "complete":
            return None
        if trial.feasible:
            return constant
        aim = goal.budget * goal.cost(trial.outcomes.first(search.probe_batches)) / goal.cost(trial.outcomes)
    return None
