"""The Optuna search over ATM's thresholds, run batch by batch so that hopeless trials stop early.

Every trial runs the same batches in the same order and reports its running value to Optuna
after each batch. It is pruned as soon as it cannot win, or is unlikely to:

- its GFLOPs exceed the budget, estimated from the first `probe_batches` batches on, so no
  accuracy is computed on the rest. Batches differ in GFLOPs (r adapts to their images) but
  alike for every setting, so the estimate scales the running GFLOPs by how the same batches
  compared with the whole set in complete trials, and allows for the spread of that ratio;
- (budget) even all remaining images right could not reach the best trial's top-1; or, from the
  images where the two differ so far, its predicted final gap to the best trial is Z standard
  deviations below zero (`_trails`);
- (no-drop) it already uses more GFLOPs than the best trial; or its wrong images already exceed
  what the tolerance allows even if every remaining image were right; or its predicted final gap
  to the unmerged model is Z standard deviations below the tolerance.

Comparisons with the best trial start once a trial has met the goal on every image, so the
first feasible trials always run to the end.

Pruning only decides which trials run to the end; every reported figure comes from a trial run
on every batch. The budget and the accuracy floor are Optuna constraints (`set_constraint`),
which the TPE sampler uses to model feasibility, not penalties folded into the objective.
"""
from __future__ import annotations

import base64
import math
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from atm_cli.engine import ATMConfig, threshold_schedule
from atm_cli.engine import resolve_split_layer
from atm_cli.errors import RunError, UsageError
from atm_cli.evaluation import BatchRun

from .space import DIGITS, SearchSpace

# A trial is stopped when its chance of finishing level with its reference (the best trial, or the
# unmerged model less the tolerance) is below Phi(-Z) = 16%.
Z = 1.0
# GFLOPs estimated from part of the data may be off by this much, plus twice the spread of the
# ratios complete trials showed; before any trial completes, by UNPROFILED_SLACK (a batch of
# CIFAR-10 images has been seen 16% off its set's mean).
GFLOPS_SLACK = 0.01
UNPROFILED_SLACK = 0.2
CONSTRAINT = "goal"  # the name of the one constraint each trial records
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
SETUP_ATTR = "atm_setup"
SETTING_ATTR = "setting"  # a trial's setting_key
OUTCOMES_ATTR = "outcomes"  # a trial's Tally.to_record()
REPEATS_ATTR = "repeats_trial"
WORKER = f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class BatchOutcome:
    """One batch through one setting: which images it got right, and its GFLOPs per image."""

    correct: np.ndarray  # bool per image: top-1 correct
    correct5: int
    gflops: float

    @property
    def n(self) -> int:
        return len(self.correct)


class BatchSource(Protocol):
    """Runs a setting on batch `index` of a fixed list of batches (the model, or a test's stand-in)."""

    depth: int  # blocks of the model
    n_batches: int

    def run(self, config: ATMConfig, index: int) -> BatchOutcome: ...


@dataclass
class Tally:
    """Per-batch results accumulated in batch order; totals computed as `atm eval` computes them."""

    outcomes: list[BatchOutcome] = field(default_factory=list)

    def add(self, outcome: BatchOutcome) -> None:
        self.outcomes.append(outcome)

    @property
    def n_images(self) -> int:
        return sum(o.n for o in self.outcomes)

    @property
    def correct(self) -> np.ndarray:
        return np.concatenate([o.correct for o in self.outcomes]) if self.outcomes else np.zeros(0, bool)

    @property
    def n_correct(self) -> int:
        return int(sum(o.correct.sum() for o in self.outcomes))

    def as_batch_run(self) -> BatchRun:
        return BatchRun(batch_sizes=[o.n for o in self.outcomes],
                        correct1=[int(o.correct.sum()) for o in self.outcomes],
                        correct5=[o.correct5 for o in self.outcomes],
                        batch_gflops=[o.gflops for o in self.outcomes])

    @property
    def top1(self) -> float:
        return self.as_batch_run().top1

    @property
    def top5(self) -> float:
        return self.as_batch_run().top5

    @property
    def gflops(self) -> float:
        return self.as_batch_run().gflops

    def to_record(self) -> dict:
        """Its per-image and per-batch results as JSON values, to store with a trial or the study."""
        return {"sizes": [o.n for o in self.outcomes], "correct": pack_bits(self.correct),
                "correct5": [o.correct5 for o in self.outcomes], "gflops": [o.gflops for o in self.outcomes]}

    @classmethod
    def from_record(cls, record: dict) -> Tally:
        sizes = record["sizes"]
        correct = unpack_bits(record["correct"], sum(sizes))
        tally, start = cls(), 0
        for size, correct5, gflops in zip(sizes, record["correct5"], record["gflops"]):
            tally.add(BatchOutcome(correct=correct[start:start + size], correct5=correct5, gflops=gflops))
            start += size
        return tally


def setting_key(config: ATMConfig, depth: int) -> str:
    """What the engine runs for `config`: its per-block thresholds and split layer.

    Settings with the same key merge identically, e.g. any alpha <= theta_min gives the constant
    threshold theta_min whatever beta is, so the search runs such a setting only once.
    """
    thresholds = ",".join(f"{t:.9f}" for t in threshold_schedule(config, depth))
    return f"{thresholds}|{resolve_split_layer(config, depth)}"


@dataclass
class Finished:
    """A trial as the study holds it."""

    number: int
    state: str  # "complete" or "pruned"
    params: dict
    top1: float | None  # on every image when complete; on the images seen when pruned
    top5: float | None
    gflops: float | None
    images: int  # images this trial ran
    feasible: bool | None
    reason: str | None = None  # why it was pruned
    tally: Tally | None = None  # its results on the batches it ran
    repeats: int | None = None  # the earlier trial of the same setting whose results it reused

    @property
    def correct(self) -> np.ndarray:
        return self.tally.correct

    @property
    def batch_gflops(self) -> list[float]:
        return [o.gflops for o in self.tally.outcomes]

    @classmethod
    def of(cls, trial: FrozenTrial) -> Finished:
        attrs = trial.user_attrs
        constraint = trial.constraints.get(CONSTRAINT)
        params = {k: round(v, DIGITS) if isinstance(v, float) else v for k, v in trial.params.items()}
        return cls(number=trial.number, state=trial.state.name.lower(), params=params,
                   top1=attrs.get("top1"), top5=attrs.get("top5"), gflops=attrs.get("gflops"),
                   images=attrs.get("images", 0), feasible=None if constraint is None else constraint <= 0,
                   reason=attrs.get("pruned_because"),
                   tally=Tally.from_record(attrs[OUTCOMES_ATTR]) if OUTCOMES_ATTR in attrs else None,
                   repeats=attrs.get(REPEATS_ATTR))


@dataclass(frozen=True)
class TrialEvent:
    """Sent after each trial this process finishes."""

    trial: Finished
    best: Finished | None  # the best feasible complete trial so far
    done: int  # finished trials in the study (every process's)
    total: int  # the study's target number of trials


@dataclass(frozen=True)
class Verdict:
    reason: str
    constraint: float | None  # the constraint value the pruned trial records (None: unknown)


@dataclass(frozen=True)
class Standing:
    """Where a running trial stands after a batch."""

    tally: Tally
    total: int  # images in the whole set
    reference: Tally  # the unmerged model on the whole set
    incumbent: Finished | None
    gflops: float | None  # estimated over the whole set (None until probe_batches batches ran)
    slack: float  # relative error allowed for that estimate

    @property
    def remaining(self) -> int:
        return self.total - self.tally.n_images


class Goal(Protocol):
    direction: str

    def describe(self) -> str: ...
    def value(self, tally: Tally) -> float: ...
    def constraint(self, tally: Tally, reference: Tally) -> float: ...
    def rank(self, trial: Finished) -> tuple: ...
    def verdict(self, standing: Standing) -> Verdict | None: ...


def _trails(correct: np.ndarray, reference: np.ndarray, remaining: int, z: float,
            allowed: float = 0.0) -> tuple[int, int, bool]:
    """Images lost against `reference` on the same images, images where they differ, and the verdict.

    The verdict is a futility test on the final gap G over all N = seen + remaining images. Per
    image the two differ by -1, 0 or +1, with variance about differ / seen; with a flat prior on
    the trial's per-image edge, G is predicted as normal with mean -lost * N / seen (the deficit
    extrapolated) and variance differ * remaining * N / seen^2 (the remaining images' noise plus
    the uncertain edge). The trial is stopped when G >= -allowed * N / seen is z standard
    deviations away: lost - allowed > z * sqrt(differ * remaining / N).
    """
    seen = len(correct)
    lost = int(reference.sum()) - int(correct.sum())
    differ = int((correct != reference).sum())
    spread = math.sqrt(differ * remaining / (seen + remaining))
    return lost, differ, lost - allowed > 0 and lost - allowed > z * spread


@dataclass(frozen=True)
class BudgetGoal:
    """Maximise top-1 subject to GFLOPs <= target."""

    target_gflops: float
    direction: str = "maximize"

    def describe(self) -> str:
        return f"max top-1 subject to GFLOPs <= {self.target_gflops:.4g}"

    def value(self, tally: Tally) -> float:
        return tally.top1

    def constraint(self, tally: Tally, reference: Tally) -> float:
        return tally.gflops - self.target_gflops

    def rank(self, trial: Finished) -> tuple:
        return -trial.top1, trial.gflops, trial.number

    def verdict(self, standing: Standing) -> Verdict | None:
        estimate, tally, best = standing.gflops, standing.tally, standing.incumbent
        if estimate is not None and estimate > self.target_gflops * (1 + standing.slack):
            return Verdict(f"an estimated {estimate:.4g} GFLOPs after {tally.n_images} images, over the budget",
                           estimate - self.target_gflops)
        if best is None:
            return None
        over = (estimate or tally.gflops) - self.target_gflops
        if tally.n_correct + standing.remaining < best.correct.sum():
            return Verdict(f"cannot reach trial {best.number}'s top-1 even with every remaining image right", over)
        lost, differ, trails = _trails(tally.correct, best.correct[:tally.n_images], standing.remaining, Z)
        if trails:
            return Verdict(f"trails trial {best.number} by {lost} of the {differ} images where they differ "
                           f"(after {tally.n_images} images)", over)
        return None


@dataclass(frozen=True)
class NoDropGoal:
    """Minimise GFLOPs subject to top-1 >= the unmerged model's - tolerance (percentage points)."""

    tolerance: float = 0.0
    direction: str = "minimize"

    def describe(self) -> str:
        return f"min GFLOPs subject to top-1 >= unmerged - {self.tolerance:g}"

    def value(self, tally: Tally) -> float:
        return tally.gflops

    def constraint(self, tally: Tally, reference: Tally) -> float:
        # In images, so that tolerance 0 and an equal count give exactly 0 (feasible).
        allowed = self.tolerance * tally.n_images / 100
        return (reference.correct[:tally.n_images].sum() - allowed - tally.n_correct) * 100 / tally.n_images

    def rank(self, trial: Finished) -> tuple:
        return trial.gflops, -trial.top1, trial.number

    def verdict(self, standing: Standing) -> Verdict | None:
        tally, best, reference, total = standing.tally, standing.incumbent, standing.reference, standing.total
        seen = tally.n_images
        # Not an improvement unless cheaper than the best so far: no slack, a near-tie is not worth a full run.
        if best is not None and standing.gflops is not None and standing.gflops > best.gflops:
            return Verdict(f"an estimated {standing.gflops:.4g} GFLOPs after {seen} images, more than trial "
                           f"{best.number}'s {best.gflops:.4g}", None)
        needed = reference.n_correct - self.tolerance * total / 100
        if tally.n_correct + standing.remaining < needed:
            return Verdict(f"{seen - tally.n_correct} wrong images already exceed the tolerance",
                           (needed - tally.n_correct - standing.remaining) * 100 / total)
        lost, differ, trails = _trails(tally.correct, reference.correct[:seen], standing.remaining, Z,
                                       self.tolerance * seen / 100)
        if trails:
            return Verdict(f"loses {lost} of the {differ} images where it differs from the unmerged model "
                           f"(after {seen} images)", self.constraint(tally, reference))
        return None


def pack_bits(correct: np.ndarray) -> str:
    return base64.b64encode(np.packbits(correct.astype(bool)).tobytes()).decode("ascii")


def unpack_bits(text: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8))[:n].astype(bool)


@dataclass
class SearchResult:
    best: Finished | None  # the best feasible complete trial (None: no trial met the goal)
    trials: list[Finished]  # every finished trial of the study, by number
    reference: Tally  # the unmerged model on the tuning batches
    goal: Goal
    space: SearchSpace
    n_images: int
    trials_run: int  # trials this process finished
    forward_passes: int  # images this process's trials ran through the model
    study_name: str

    def _best(self) -> Finished:
        if self.best is None:
            raise RunError(f"no trial met the goal ({self.goal.describe()}) in {len(self.trials)} trials; "
                           "run more trials or relax the goal")
        return self.best

    @property
    def best_config(self) -> ATMConfig:
        params = self._best().params
        return ATMConfig(alpha=params["alpha"], beta=params["beta"], theta_min=params["theta_min"],
                         split_layer=params.get("split_layer", self.space.split_layer))

    @property
    def params(self) -> dict:
        """The best setting: alpha, beta, theta_min and split_layer (None: the engine's default)."""
        config = self.best_config
        return {"alpha": config.alpha, "beta": config.beta, "theta_min": config.theta_min,
                "split_layer": config.split_layer}

    @property
    def top1(self) -> float:
        return self._best().top1

    @property
    def gflops(self) -> float:
        return self._best().gflops

    @property
    def naive_forward_passes(self) -> int:
        """A search without multi-fidelity: every trial on every image, plus the unmerged model each time."""
        return 2 * self.trials_run * self.n_images


class Search:
    """One Optuna study over `space`, run on `source`'s batches against the unmerged `reference`."""

    def __init__(self, source: BatchSource, reference: Tally, goal: Goal, space: SearchSpace,
                 probe_batches: int = 2):
        space.validate(source.depth)
        self.source, self.reference, self.goal, self.space = source, reference, goal, space
        self.probe_batches = max(1, min(probe_batches, source.n_batches))
        self.total = reference.n_images
        self.forward_passes = 0
        self.trials_run = 0
        self._decoded: dict[int, Finished] = {}

    def complete_trials(self, study: optuna.Study) -> list[Finished]:
        """Complete trials with their per-image results (from the storage: every process's count)."""
        complete = []
        for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if OUTCOMES_ATTR in trial.user_attrs:
                if trial.number not in self._decoded:
                    self._decoded[trial.number] = Finished.of(trial)
                complete.append(self._decoded[trial.number])
        return complete

    def incumbent(self, study: optuna.Study) -> Finished | None:
        """The best feasible complete trial so far."""
        feasible = [t for t in self.complete_trials(study) if t.feasible]
        return min(feasible, key=self.goal.rank) if feasible else None

    def gflops_ratios(self, study: optuna.Study) -> np.ndarray:
        """Per complete trial (rows): its running GFLOPs after 1, 2, ... batches over its GFLOPs on all."""
        sizes = np.array([o.n for o in self.reference.outcomes])
        rows = [np.cumsum(sizes * np.array(t.batch_gflops)) / np.cumsum(sizes) / t.gflops
                for t in self.complete_trials(study)]
        return np.array(rows).reshape(len(rows), len(sizes))

    def estimate_gflops(self, tally: Tally, ratios: np.ndarray) -> tuple[float | None, float]:
        """The trial's GFLOPs over all batches, estimated from those seen, and the relative slack it needs."""
        seen = len(tally.outcomes)
        if seen < self.probe_batches:
            return None, 0.0
        if not len(ratios):
            return tally.gflops, UNPROFILED_SLACK
        at_seen = ratios[:, seen - 1]
        return tally.gflops / at_seen.mean(), GFLOPS_SLACK + 2 * at_seen.std()

    @staticmethod
    def known_outcomes(study: optuna.Study, setting: str) -> tuple[int | None, list[BatchOutcome]]:
        """The finished trial of this setting that ran the most batches, and its results on them."""
        number, known = None, []
        for trial in study.get_trials(deepcopy=False, states=FINISHED):
            attrs = trial.user_attrs
            if attrs.get(SETTING_ATTR) == setting and len(attrs.get(OUTCOMES_ATTR, {}).get("sizes", ())) > len(known):
                number, known = trial.number, Tally.from_record(attrs[OUTCOMES_ATTR]).outcomes
        return number, known

    def objective(self, trial: optuna.Trial) -> float:
        config = self.space.suggest(trial, self.source.depth)
        setting = setting_key(config, self.source.depth)
        trial.set_user_attr("worker", WORKER)  # which process ran it, when several share the study
        trial.set_user_attr(SETTING_ATTR, setting)
        incumbent, ratios = self.incumbent(trial.study), self.gflops_ratios(trial.study)
        # The engine is deterministic: batches an identical setting already ran are read back, not run.
        repeats, known = self.known_outcomes(trial.study, setting)
        if repeats is not None:
            trial.set_user_attr(REPEATS_ATTR, repeats)
        tally = Tally()
        for index in range(self.source.n_batches):
            if index < len(known):
                outcome = known[index]
            else:
                outcome = self.source.run(config, index)
                self.forward_passes += outcome.n
            tally.add(outcome)
            if index + 1 == self.source.n_batches:
                break
            estimate, slack = self.estimate_gflops(tally, ratios)
            verdict = self.goal.verdict(Standing(tally, self.total, self.reference, incumbent, estimate, slack))
            trial.report(self.goal.value(tally), index + 1)  # the sampler ranks pruned trials by it
            if verdict is not None:
                self._record(trial, tally)
                trial.set_user_attr("pruned_because", verdict.reason)
                if verdict.constraint is not None:
                    trial.set_constraint(CONSTRAINT, verdict.constraint)
                raise optuna.TrialPruned(verdict.reason)
        self._record(trial, tally)
        trial.set_constraint(CONSTRAINT, self.goal.constraint(tally, self.reference))
        return self.goal.value(tally)

    @staticmethod
    def _record(trial: optuna.Trial, tally: Tally) -> None:
        trial.set_user_attr("top1", tally.top1)
        trial.set_user_attr("top5", tally.top5)
        trial.set_user_attr("gflops", tally.gflops)
        trial.set_user_attr("images", tally.n_images)
        trial.set_user_attr(OUTCOMES_ATTR, tally.to_record())

    def run(self, study: optuna.Study, n_trials: int, timeout: float | None = None,
            known_good: Sequence[ATMConfig] = (),
            on_trial: Callable[[TrialEvent], None] | None = None) -> SearchResult:
        """Run until the study holds `n_trials` finished trials (or `timeout` seconds pass)."""
        for config in known_good:
            params = self.space.trial_params(config, self.source.depth)
            if params is not None:
                study.enqueue_trial(params, skip_if_exists=True)

        def after_trial(study: optuna.Study, frozen: FrozenTrial) -> None:
            if frozen.state in FINISHED:
                self.trials_run += 1
                if on_trial is not None:
                    done = len(study.get_trials(deepcopy=False, states=FINISHED))
                    on_trial(TrialEvent(Finished.of(frozen), self.incumbent(study), done, n_trials))

        remaining = n_trials - len(study.get_trials(deepcopy=False, states=FINISHED))
        if remaining > 0:
            # The callback stops this process when trials from every process sharing the study reach n_trials.
            stop = optuna.study.MaxTrialsCallback(n_trials, states=FINISHED)
            study.optimize(self.objective, n_trials=remaining, timeout=timeout, callbacks=[after_trial, stop])
        trials = [Finished.of(t) for t in study.get_trials(deepcopy=False, states=FINISHED)]
        return SearchResult(best=self.incumbent(study), trials=trials, reference=self.reference, goal=self.goal,
                            space=self.space, n_images=self.total, trials_run=self.trials_run, forward_passes=self.forward_passes,
                            study_name=study.study_name)


def reachable_gflops(source: BatchSource, space: SearchSpace, n_batches: int = 1) -> tuple[float, float, int]:
    """GFLOPs of the most- and least-merging settings in `space` on the first batches, and images run."""
    space.validate(source.depth)
    tallies = []
    for config in space.extremes():
        tally = Tally()
        for index in range(min(n_batches, source.n_batches)):
            tally.add(source.run(config, index))
        tallies.append(tally)
    return tallies[0].gflops, tallies[1].gflops, sum(t.n_images for t in tallies)


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
                         f"{low:.4g}-{high:.4g} GFLOPs on the first batch (widen the ranges, e.g. --alpha-range)")
