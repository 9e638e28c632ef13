"""Speed goals of `atm calibrate`: the device's latency model, the time goal built on it, and the chosen
setting timed for real beside the unmerged model, which it must beat.

Trials are constrained by their predicted time (from their token counts: cheap and deterministic, so
the search stays reproducible); only the result is timed, interleaved with the unmerged model.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna

from atm_cli.engine import ATMConfig
from atm_cli.errors import RunError, UsageError, param
from atm_cli.evaluation import Workload
from atm_cli.evaluation.latency import LatencyModel, MeasuredSpeed, device_latency, measure_speedups

from .goals import LatencyGoal
from .search import Search, SearchResult, TrialEvent
from .seeding import constant_for_budget
from .trials import FINISHED
from .space import SearchSpace

FIT_SETTINGS = 4  # constant thresholds of the space that ATM's step cost is fitted on
TIMING_REPEATS = 7  # interleaved rounds when the result is timed
CORRECTIONS = 2  # re-choices when the chosen setting measures slower than the speedup asked for


def fit_settings(space: SearchSpace, depth: int) -> list[ATMConfig]:
    """Constant thresholds spread evenly over the space's, from the least merging to the most."""
    constants = space.constants(depth)
    if len(constants) <= FIT_SETTINGS:
        return [space.constant(t) for t in constants]
    last = len(constants) - 1
    return [space.constant(constants[round(i * last / (FIT_SETTINGS - 1))]) for i in range(FIT_SETTINGS)]


def latency_for(source: Workload, space: SearchSpace, folder: Path | None = None,
                progress: Callable[[int, int], None] | None = None) -> LatencyModel:
    """The latency model at the search's batch size (cached), with ATM's step cost fitted on the first batch."""
    return device_latency(source.loaded, source.batches[0][0], {ATMConfig.NAME: fit_settings(space, source.depth)},
                          folder, progress)


def speed_goal(latency: LatencyModel, depth: int, speedup: float | None = None,
               latency_ms: float | None = None) -> LatencyGoal:
    """Max top-1 within a predicted time per batch: the unmerged model's over `speedup`, or `latency_ms`."""
    unmerged = latency.unmerged_seconds(depth)
    target = unmerged / speedup if speedup is not None else latency_ms / 1e3
    if target >= unmerged:
        raise UsageError(f"{param('target_latency_ms')} {latency_ms:g} is not below the unmerged model's predicted "
                         f"{1e3 * unmerged:.4g} ms per batch here: nothing to search")
    return LatencyGoal(target, predict=lambda outcomes: latency.outcomes_seconds(outcomes, ATMConfig.NAME),
                       unmerged_seconds=unmerged, speedup=speedup, latency_ms=latency_ms)


@dataclass(frozen=True)
class SpeedTarget:
    """A time goal as asked: at least `speedup` over the unmerged model, or at most `latency_ms` per batch, as the
    device's latency model predicts (cached in `cache`; None: $ATM_CACHE or ~/.cache/atm): a `LatencyGoal` on the
    workload, once the model is timed there."""

    speedup: float | None = None
    latency_ms: float | None = None
    cache: Path | None = None
    label_free = False

    @property
    def key(self) -> str:
        return LatencyGoal.key_of(self.speedup, self.latency_ms)

    def on_workload(self, source: Workload, space: SearchSpace,
                    stage: Callable[[str], None]) -> tuple[LatencyGoal, LatencyModel]:
        stage(f"timing the model on {source.loaded.device}")
        latency = latency_for(source, space, self.cache)
        return speed_goal(latency, source.depth, self.speedup, self.latency_ms), latency


@dataclass(frozen=True)
class SpeedCheck:
    """The chosen setting (and the runner-up) timed for real on the target device."""

    device: str
    batch_size: int
    precision: str
    compiled: bool
    predicted_speedup: float  # of the chosen setting over the tuning images (what the goal constrained)
    predicted_timed_speedup: float  # on the batch it was timed on (ATM's tokens differ from batch to batch)
    chosen: MeasuredSpeed
    runner_up: int | None = None  # its trial number
    runner_up_speed: MeasuredSpeed | None = None
    # Each earlier choice that measured short of the speedup asked for: (trial, measured over predicted speedup),
    # the latency model's bias here, by which the predicted target was raised before choosing again.
    corrections: tuple[tuple[int, float], ...] = ()

    def to_dict(self) -> dict:
        return {"device": self.device, "batch_size": self.batch_size, "precision": self.precision,
                "compiled": self.compiled, "predicted_speedup": self.predicted_speedup,
                "corrections": [{"trial": trial, "measured_over_predicted": ratio} for trial, ratio in self.corrections],
                "predicted_timed_speedup": self.predicted_timed_speedup,
                "measured_speedup": self.chosen.speedup, "speedup_spread": [self.chosen.speedup_low,
                                                                            self.chosen.speedup_high],
                **self.chosen.to_dict(),
                "runner_up": None if self.runner_up is None else {"trial": self.runner_up,
                                                                   **self.runner_up_speed.to_dict()}}


def time_choice(source: Workload, result: SearchResult, latency: LatencyModel,
                seek: Callable[[LatencyGoal], SearchResult] | None = None, repeats: int = TIMING_REPEATS,
                progress: Callable[[int, int], None] | None = None) -> tuple[SearchResult, SpeedCheck]:
    """Time the chosen setting and the runner-up (the goal's next choice, of another setting) on the first
    tuning batch, interleaved with the unmerged model. When the chosen setting measures short of the speedup
    asked for, the prediction overshot here (the latency model's bias, the timed batch against all tuning
    batches): the goal's predicted target is raised by that setting's measured over predicted speedup, `seek`
    (when given) runs one more trial near that target (`seek_near`: the finished trials may all lie far
    from it), and the goal chooses again among the finished trials (at most `CORRECTIONS` times). Returns the
    result as finally chosen and its timing; RunError when the chosen setting measured slower than the
    unmerged model: calibration then returns no merging."""
    corrections: list[tuple[int, float]] = []
    asked_goal = result.goal  # each correction starts from the goal as asked: the biases do not compound
    while True:
        check = _timed(source, result, latency, repeats, progress, tuple(corrections))
        asked = result.goal.speedup
        bias = check.chosen.speedup / check.predicted_speedup  # measured over what the goal constrained
        if asked is None or check.chosen.speedup >= asked or len(corrections) == CORRECTIONS or bias >= 1:
            break
        corrected = dataclasses.replace(asked_goal, target_seconds=asked_goal.target_seconds * bias)
        rechosen = _rechoose(result if seek is None else seek(corrected), corrected)
        if rechosen is None:
            break
        corrections.append((result.best.number, bias))
        result = rechosen
    if check.chosen.speedup < 1:
        key, best = latency.key, result.best
        raise RunError(f"no merging: the best setting found (trial {best.number}) measured "
                       f"{check.chosen.speedup:.2f}x the unmerged model's speed ({check.chosen.speedup_low:.2f}-"
                       f"{check.chosen.speedup_high:.2f}x over {repeats} rounds) on {key.device}, batch "
                       f"{key.batch_size}, {key.precision}{', compiled' if key.compiled else ''}: merging does not pay "
                       "here, so no setting is returned")
    return result, check


def seek_near(search: Search, study: optuna.Study,
              on_trial: Callable[[TrialEvent], None] | None = None) -> Callable[[LatencyGoal], SearchResult]:
    """For `time_choice`: one more trial of the study, at the least-merging constant threshold within a goal
    on the first batches (as the seeding finds one), and the study's result with it."""

    def seek(goal: LatencyGoal) -> SearchResult:
        constant, _ = constant_for_budget(search.source, search.space, goal.budget, search.probe_batches,
                                          cost=goal.cost)
        if constant is not None:
            finished = len(study.get_trials(deepcopy=False, states=FINISHED))
            search.try_setting(study, constant, finished + 1, on_trial, unpruned=True)
        return search.result(study)

    return seek


def _rechoose(result: SearchResult, goal: LatencyGoal) -> SearchResult | None:
    """The result as `goal` chooses among the finished trials (None: no complete trial meets it)."""
    complete = [dataclasses.replace(t, feasible=goal.constraint(t.outcomes, result.reference) <= 0)
                for t in result.trials if t.state == "complete"]
    best = goal.choose(complete, goal.reference_hits(result.reference), result.rule)
    return None if best is None else dataclasses.replace(result, goal=goal, best=best)


def _timed(source: Workload, result: SearchResult, latency: LatencyModel, repeats: int,
           progress: Callable[[int, int], None] | None, corrections: tuple[tuple[int, float], ...]) -> SpeedCheck:
    goal, best = result.goal, result.best
    others = [t for t in result.trials if t.state == "complete" and t.params != best.params]
    runner_up = goal.choose(others, goal.reference_hits(result.reference), result.rule)
    configs = [result.space.config(t.params) for t in (best, runner_up) if t is not None]
    speeds = measure_speedups(source.loaded, source.batches[0][0], configs, repeats, progress)
    unmerged = latency.unmerged_seconds(source.depth)
    key = latency.key
    return SpeedCheck(key.device, key.batch_size, key.precision, key.compiled, unmerged / goal.cost(best.outcomes),
                      unmerged / latency.predict_seconds(speeds[0].tokens, ATMConfig.NAME), speeds[0],
                      None if runner_up is None else runner_up.number, speeds[1] if runner_up is not None else None,
                      corrections)
