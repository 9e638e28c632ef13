"""The stress test (paper Table 1): each method's largest GFLOPs saving with no top-1 drop beyond a tolerance.

Every method runs on the same preloaded batches. ATM is the calibration search in no-drop mode,
in the space measured from the model (or given by the range flags), as `atm calibrate` searches.
Every other registered method and the schedules of the paper's Fig. 5 are ladders (`ladders`);
ATM's search, seeded with the constant threshold that passed, never saves less than it. Accuracy
is not monotone along a ladder, so no bisection can promise the overall largest passing step. What
the search does promise, cheaply: the step it returns passes and the next one fails. It gallops up
(steps 1, 3, 7, ...: a pass moves the floor up, the stride doubles) until a step fails, bisects
between the last pass and that failure, then looks `lookahead` steps past the failure; a pass there
resumes the climb from it. Every step tried is reported. A trial stops as soon as its misses make
the tolerance unreachable, so failures cost a fraction of a pass.

Every method's answer is then timed for real beside the unmerged model (`timing.timed`), and the
report ranks the methods by GFLOPs or by that measured speedup (`By`). The search itself does not
change with the ranking: along one ladder more merging leaves fewer tokens in every block, so the
step that saves the most GFLOPs is also its fastest (within a method, time follows the tokens); what
GFLOPs do not tell is how one method's overhead compares with another's, which only the measured
ranking shows.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..calibration import NoDropGoal, RangeFlags, SearchSpace, search_on
from ..calibration.stats import required_hits, within_reach
from ..engine import ATMConfig, Knob, MethodConfig
from ..errors import UsageError, param
from ..evaluation import Outcomes, Workload, describe_method
from ..evaluation.latency import MeasuredSpeed
from ..paper import METHODS
from .ladders import ATM, ChosenSetting, OnBaseline, Progress, answer_atm_last, check_methods, ladders
from .timing import By, Timing

LOOKAHEAD = 2


@dataclass
class Trial:
    """One setting a method tried: its figures over the images it ran (all of them when it passed)."""

    params: dict
    passed: bool
    top1: float  # over the images it ran (all of them when it passed)
    gflops: float
    n_images: int

    def to_dict(self) -> dict:
        return {"params": self.params, "passed": self.passed, "top1": self.top1, "gflops": self.gflops,
                "n_images": self.n_images}


@dataclass
class MethodResult(ChosenSetting):
    method: str
    description: str
    chosen: Outcomes | None  # the largest saving that passed (None: no setting that reduces anything passed)
    params: dict | None
    trials: list[Trial] = field(default_factory=list)
    forward_passes: int = 0  # images run through the model for this method, stopped trials included
    config: MethodConfig | None = None
    speed: MeasuredSpeed | None = None

    def to_dict(self, baseline: Outcomes) -> dict:
        return {"method": self.method, "description": self.description, **self.figures(baseline),
                "forward_passes": self.forward_passes, "trials": [trial.to_dict() for trial in self.trials]}


@dataclass
class StressReport(OnBaseline):
    baseline: Outcomes
    tolerance: float
    methods: list[MethodResult]
    space: SearchSpace  # ATM's search space and the constant threshold's grid
    timing: Timing
    by: By = By.GFLOPS
    interrupted: bool = False  # stopped early: `methods` holds those finished before the interrupt

    def rank_key(self, result: MethodResult) -> float:
        """Smaller ranks higher: fewer GFLOPs, or a higher measured speedup."""
        return result.gflops if self.by is By.GFLOPS else -result.speedup

    def ranked(self) -> list[MethodResult]:
        """The methods that passed, best first by `by`."""
        return sorted((result for result in self.methods if result.passed), key=self.rank_key)

    @property
    def atm(self) -> MethodResult | None:
        """ATM's result (None: it did not run)."""
        return next((result for result in self.methods if result.method == ATM), None)

    def ahead_of(self, result: MethodResult) -> list[MethodResult]:
        """The methods that passed and rank above `result` (every one that passed, when it did not)."""
        return [other for other in self.ranked()
                if other is not result and (not result.passed or self.rank_key(other) < self.rank_key(result))]

    def to_dict(self) -> dict:
        return {"baseline_top1": self.baseline_top1, "baseline_gflops": self.baseline_gflops,
                "tolerance": self.tolerance, "n_images": self.n_images, "batch_size": self.batch_size,
                "methods": [result.to_dict(self.baseline) for result in self.methods], "by": self.by.value,
                "ranking": [result.method for result in self.ranked()], "timing": self.timing.to_dict(),
                "search_space": self.space.to_dict(), "interrupted": self.interrupted}


def required_correct(baseline: Outcomes, tolerance: float) -> int:
    """The fewest correct images whose top-1 is >= the baseline's minus `tolerance` percentage points."""
    return required_hits(baseline.n_correct, baseline.n_images, tolerance)


def run_until_hopeless(workload: Workload, method: MethodConfig, needed: int) -> tuple[Outcomes, bool]:
    """Run batch by batch; stop once even all remaining images right could not reach `needed` correct."""
    total = workload.n_images

    def hopeful(run: Outcomes) -> bool:
        return within_reach(run.n_correct, total - run.n_images, needed)

    run = workload.run(method, keep_going=hopeful)
    return run, run.n_images == total and hopeful(run)


def largest_passing_step(passes: Callable[[int], bool], top: int, lookahead: int = LOOKAHEAD) -> int:
    """A step in [0, top] that passes while the next fails (or `top` itself); step 0 is taken to pass.

    Galloping, bisection, then a look `lookahead` steps past the boundary (see the module notes).
    """
    seen = {0: True}

    def check(step: int) -> bool:
        if step not in seen:
            seen[step] = passes(step)
        return seen[step]

    floor = 0
    while True:
        stride, failed = 1, None
        while floor < top:
            step = min(floor + stride, top)
            if not check(step):
                failed = step
                break
            floor, stride = step, stride * 2
        if failed is None:
            return floor
        while failed - floor > 1:
            middle = (floor + failed) // 2
            if check(middle):
                floor = middle
            else:
                failed = middle
        beyond = [step for step in range(floor + 2, min(floor + 2 + lookahead, top + 1)) if check(step)]
        if not beyond:
            return floor
        floor = max(beyond)


def climb(workload: Workload, ladder: Knob, needed: int,
          lookahead: int = LOOKAHEAD) -> MethodResult:
    """The ladder's largest passing step by `largest_passing_step`, with every trial recorded.

    Step 0 is taken to pass without a run (it merges nothing): when it is the answer, no setting
    that reduces anything passed.
    """
    result = MethodResult(ladder.name, ladder.description, None, None)
    runs: dict[int, Outcomes] = {}

    def passes(step: int) -> bool:
        run, passed = run_until_hopeless(workload, ladder.config(step), needed)
        runs[step] = run
        result.forward_passes += run.n_images
        result.trials.append(Trial(ladder.params(step), passed, run.top1, run.gflops, run.n_images))
        return passed

    best = largest_passing_step(passes, ladder.top, lookahead)
    if best > 0:
        result.chosen, result.params, result.config = runs[best], ladder.params(best), ladder.config(best)
    return result


def stress(workload: Workload, methods: Sequence[str] = METHODS, tolerance: float = 0.0,
           n_trials: int = 30, seed: int = 0, lookahead: int = LOOKAHEAD, ranges: RangeFlags = RangeFlags(),
           progress: Progress | None = None, keep_partial: bool = False, by: By = By.GFLOPS) -> StressReport:
    """Each method's largest GFLOPs saving with top-1 >= the unmerged model's minus `tolerance` (points),
    timed beside the unmerged model, ranked `by` GFLOPs or measured speedup.

    ATM runs after the ladders, seeded with the constant threshold's passing step when it ran (`ladders`).
    With `keep_partial`, an interrupt (Ctrl-C) after the unmerged run ends the test early and the
    report holds the methods finished before it (`interrupted` is then True).
    """
    if tolerance < 0:
        raise UsageError(f"{param('tolerance')} must be >= 0 (percentage points of top-1), got {tolerance}")
    check_methods(methods)
    if not workload.n_batches:
        raise UsageError("the stress test needs at least one image")
    space = ranges.resolve(workload)
    known = ladders(workload.loaded, space)
    baseline = workload.baseline
    needed = required_correct(baseline, tolerance)
    results, interrupted = answer_atm_last(  # one budget: the tolerance
        workload, methods, [tolerance], lambda name, _: climb(workload, known[name], needed, lookahead),
        lambda _, seeds: atm_no_drop(workload, tolerance, n_trials, seed, space, seeds), progress, keep_partial)
    finished = [results[name, tolerance] for name in methods if (name, tolerance) in results]
    return StressReport(baseline, tolerance, finished, space, Timing.of(workload), by, interrupted)


def atm_no_drop(workload: Workload, tolerance: float, n_trials: int, seed: int, space: SearchSpace,
                seeds: Sequence[ATMConfig] = ()) -> MethodResult:
    """ATM: the calibration's no-drop search (Optuna over alpha, beta, theta_min), chosen on these images."""
    found = search_on(workload, NoDropGoal(tolerance), space, n_trials, seed, seeds)
    trials = [Trial(dict(t.params), bool(t.feasible) and t.state == "complete", t.top1, t.gflops, t.images)
              for t in found.trials]
    result = MethodResult(ATM, "ATM, layer-dependent thresholds (calibrated)", None, None, trials,
                          found.forward_passes)
    if found.best is not None:
        result.config = space.config(found.best.params)
        result.chosen, (_, result.params) = found.best.outcomes, describe_method(result.config)
    return result
