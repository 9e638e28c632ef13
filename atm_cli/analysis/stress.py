"""The stress test (paper Table 1): each method's largest GFLOPs saving with no top-1 drop beyond a tolerance.

Every method runs on the same preloaded batches. ATM is the calibration search in no-drop mode,
in the space measured from the model (or given by the range flags), as `atm calibrate` searches.
Every other registered method and the schedules of the paper's Fig. 5 (constant threshold,
increasing and decreasing top-r) are one-parameter ladders: step 0 merges nothing, each step up
merges more. The constant threshold is ATM with beta = 0 on the space's threshold grid, so ATM's
search, seeded with the constant that passed, never saves less than it. Accuracy is not monotone along a ladder, so no bisection can promise the overall
largest passing step. What the search does promise, cheaply: the step it returns passes and the
next one fails. It gallops up (steps 1, 3, 7, ...: a pass moves the floor up, the stride doubles)
until a step fails, bisects between the last pass and that failure, then looks `lookahead` steps
past the failure; a pass there resumes the climb from it. Every step tried is reported. A trial
stops as soon as its misses make the tolerance unreachable, so failures cost a fraction of a pass.

Every method's answer is then timed for real beside the unmerged model (`timed`: the first batch,
a few interleaved rounds, the median ratio), and the report ranks the methods by GFLOPs or by that
measured speedup (`By`). The search itself does not change with the ranking: along one ladder more
merging leaves fewer tokens in every block, so the step that saves the most GFLOPs is also its
fastest (within a method, time follows the tokens); what GFLOPs do not tell is how one method's
overhead compares with another's, which only the measured ranking shows.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum

from ..calibration import NoDropGoal, RangeFlags, SearchSpace, search_on
from ..engine import METHODS as REGISTRY
from ..engine import ATMConfig, MethodConfig, ToMeConfig
from ..errors import Interruptible, UsageError
from ..evaluation import Comparison, LoadedModel, Outcomes, Workload, describe_method
from ..evaluation.latency import MeasuredSpeed, device_name, measure_speedups
from ..paper import METHODS

Progress = Callable[[int, int], None]

LOOKAHEAD = 2
SPEED_REPEATS = 5  # interleaved rounds on one batch: a column beside GFLOPs, not a benchmark


class By(str, Enum):
    """What methods are ranked (stress) and budgeted (compare) by: GFLOPs per image, or time on this device."""

    GFLOPS = "gflops"
    TIME = "time"

    @classmethod
    def parse(cls, text: str) -> By:
        try:
            return cls(text)
        except ValueError:
            raise UsageError(f"--by {text}: choose from {', '.join(by.value for by in cls)}") from None


@dataclass(frozen=True)
class Ladder:
    """A one-parameter family of settings: step 0 merges nothing, step `top` merges the most it can."""

    method: str
    description: str
    config: Callable[[int], MethodConfig]
    params: Callable[[int], dict]
    top: int


def ramp(peak: int, depth: int) -> list[int]:
    """r growing by one per block up to `peak` in the last block (never below 0)."""
    return [max(0, peak - (depth - 1) + block) for block in range(depth)]


def knob_ladder(loaded: LoadedModel, cls: type[MethodConfig]) -> Ladder:
    """A registered method's knob for this model, as a ladder."""
    knob = cls.knob(loaded.depth, loaded.image_tokens)
    return Ladder(cls.NAME, cls.SUMMARY, knob.config, lambda step: {knob.param: getattr(knob.config(step), knob.param)},
                  knob.top)


def ladders(loaded: LoadedModel, space: SearchSpace) -> dict[str, Ladder]:
    """The ladders for this model's depth and token count, by method name: every registered method's
    knob (ATM's is its calibration search instead), then the paper's Fig. 5 schedules, the constant
    threshold on ATM's threshold grid (`space`)."""
    depth = loaded.depth
    image_tokens = loaded.image_tokens
    half = image_tokens // 2  # r above this merges no more in any block: ToMe caps r at half the image tokens
    grid = space.threshold_grid()

    return {
        **{name: knob_ladder(loaded, cls) for name, cls in REGISTRY.items() if name != "atm"},
        "tome-increasing": Ladder("tome-increasing", "top-r rising by one per block (alternate matching)",
                                  lambda r: ToMeConfig(r=ramp(r, depth)),
                                  lambda r: {"r": r, "schedule": ramp(r, depth)}, half + depth - 1),
        "tome-decreasing": Ladder("tome-decreasing", "top-r falling by one per block (alternate matching)",
                                  lambda r: ToMeConfig(r=ramp(r, depth)[::-1]),
                                  lambda r: {"r": r, "schedule": ramp(r, depth)[::-1]}, half + depth - 1),
        "threshold": Ladder("threshold", "constant threshold in every block (ATM with beta = 0)",
                            lambda s: space.constant(grid[s]), lambda s: {"threshold": grid[s]}, len(grid) - 1),
    }


def check_methods(methods: Sequence[str]) -> None:
    unknown = [name for name in methods if name not in METHODS]
    if unknown or not methods:
        raise UsageError(f"unknown method(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(METHODS)}")


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


class ChosenSetting:
    """A method's answer: the chosen setting's outcomes, or None when no setting passed; its config, and its
    speed measured beside the unmerged model (`timed`)."""

    chosen: Outcomes | None
    params: dict | None
    config: MethodConfig | None
    speed: MeasuredSpeed | None

    @property
    def passed(self) -> bool:
        return self.chosen is not None

    @property
    def speedup(self) -> float | None:
        return self.speed.speedup if self.speed else None

    @property
    def top1(self) -> float | None:
        return self.chosen.top1 if self.chosen else None

    @property
    def gflops(self) -> float | None:
        return self.chosen.gflops if self.chosen else None

    def figures(self, baseline: Outcomes) -> dict:
        """The answer's figures beside the unmerged run (None where no setting passed)."""
        run = Comparison(self.chosen, baseline) if self.chosen else None
        return {"passed": self.passed, "top1": self.top1, "gflops": self.gflops,
                "agreement": run.agreement if run else None, "params": self.params,
                "gflops_change": -run.gflops_reduction if run else None, "speedup": self.speedup,
                "speed": self.speed.to_dict() if self.speed else None}


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


class OnBaseline:
    """A report over the unmerged model's run: the figures every report gives of it."""

    baseline: Outcomes

    @property
    def baseline_top1(self) -> float:
        return self.baseline.top1

    @property
    def baseline_gflops(self) -> float:
        return self.baseline.gflops

    @property
    def n_images(self) -> int:
        return self.baseline.n_images

    @property
    def batch_size(self) -> int:
        return self.baseline.batch_sizes[0]


@dataclass(frozen=True)
class Timing:
    """How the speedups were measured: each answer beside the unmerged model on the first batch, interleaved."""

    device: str
    batch_size: int
    repeats: int
    compiled: bool
    compile_seconds: float  # compiling while the settings ran on the images: left out of every figure

    @classmethod
    def of(cls, workload: Workload) -> Timing:
        loaded = workload.loaded
        return cls(device_name(loaded.device), len(workload.batches[0][1]), SPEED_REPEATS, loaded.compiled,
                   workload.compile_seconds)

    def to_dict(self) -> dict:
        return {"device": self.device, "batch_size": self.batch_size, "repeats": self.repeats,
                "compiled": self.compiled, "compile_seconds": self.compile_seconds}


def timed(workload: Workload, config: MethodConfig) -> MeasuredSpeed:
    """`config` timed for real beside the unmerged model on the first batch (interleaved rounds, medians)."""
    speed, = measure_speedups(workload.loaded, workload.batches[0][0], [config], SPEED_REPEATS)
    return speed


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

    def to_dict(self) -> dict:
        return {"baseline_top1": self.baseline_top1, "baseline_gflops": self.baseline_gflops,
                "tolerance": self.tolerance, "n_images": self.n_images, "batch_size": self.batch_size,
                "methods": [result.to_dict(self.baseline) for result in self.methods], "by": self.by.value,
                "ranking": [result.method for result in self.ranked()], "timing": self.timing.to_dict(),
                "search_space": self.space.to_dict(), "interrupted": self.interrupted}


def required_correct(baseline: Outcomes, tolerance: float) -> int:
    """The fewest correct images whose top-1 is >= the baseline's minus `tolerance` percentage points."""
    return math.ceil(baseline.n_correct - tolerance * baseline.n_images / 100.0 - 1e-9)


def run_until_hopeless(workload: Workload, method: MethodConfig, needed: int) -> tuple[Outcomes, bool]:
    """Run batch by batch; stop once even all remaining images right could not reach `needed` correct."""
    total = workload.n_images

    def hopeful(run: Outcomes) -> bool:
        return run.n_correct + total - run.n_images >= needed

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


def climb(workload: Workload, ladder: Ladder, needed: int,
          lookahead: int = LOOKAHEAD) -> MethodResult:
    """The ladder's largest passing step by `largest_passing_step`, with every trial recorded.

    Step 0 is taken to pass without a run (it merges nothing): when it is the answer, no setting
    that reduces anything passed.
    """
    result = MethodResult(ladder.method, ladder.description, None, None)
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

    ATM runs after the ladders, seeded with the constant threshold's passing step when it ran.
    With `keep_partial`, an interrupt (Ctrl-C) after the unmerged run ends the test early and the
    report holds the methods finished before it (`interrupted` is then True).
    """
    if tolerance < 0:
        raise UsageError(f"--tolerance must be >= 0 (percentage points of top-1), got {tolerance}")
    check_methods(methods)
    if not workload.n_batches:
        raise UsageError("the stress test needs at least one image")
    space = ranges.resolve(workload)
    known = ladders(workload.loaded, space)
    baseline = workload.baseline
    needed = required_correct(baseline, tolerance)
    results: dict[str, MethodResult] = {}
    with Interruptible(keep_partial) as stop:
        for name in sorted(methods, key=lambda name: name == "atm"):  # ATM last: the constant seeds it
            if name == "atm":
                constant = results.get("threshold")
                seeds = [space.constant(constant.params["threshold"])] if constant and constant.passed else []
                result = atm_no_drop(workload, tolerance, n_trials, seed, space, seeds)
            else:
                result = climb(workload, known[name], needed, lookahead)
            if result.passed:
                result.speed = timed(workload, result.config)
            results[name] = result
            if progress is not None:
                progress(len(results), len(methods))
    return StressReport(baseline, tolerance, [results[name] for name in methods if name in results], space,
                        Timing.of(workload), by, stop.interrupted)


def atm_no_drop(workload: Workload, tolerance: float, n_trials: int, seed: int, space: SearchSpace,
                seeds: Sequence[ATMConfig] = ()) -> MethodResult:
    """ATM: the calibration's no-drop search (Optuna over alpha, beta, theta_min), chosen on these images."""
    found = search_on(workload, NoDropGoal(tolerance), space, n_trials, seed, seeds)
    trials = [Trial(dict(t.params), bool(t.feasible) and t.state == "complete", t.top1, t.gflops, t.images)
              for t in found.trials]
    result = MethodResult("atm", "ATM, layer-dependent thresholds (calibrated)", None, None, trials,
                          found.forward_passes)
    if found.best is not None:
        result.config = space.config(found.best.params)
        result.chosen, (_, result.params) = found.best.outcomes, describe_method(result.config)
    return result
