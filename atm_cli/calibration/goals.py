"""What a calibration search aims at: the goals, each with its own steps before, during and after the trials.

A goal scores a setting's `Outcomes` against the unmerged model's on the same images. Its *hits*
are per-image successes: top-1 correct for the label goals, top-1 class equal to the unmerged
model's for the label-free agreement goal (whose reference then hits every image).

A goal is named by its `key` (its kind and the value asked, e.g. `gflops-0.7`, `no-drop`,
`speedup-1.3`): a study's setup, the default study name and `--json` identify it so, whatever the
wording of `describe()`, which is for people.

Before the trials a goal refuses what the search space cannot reach (`check_reachable`) and seeds
the study with the constant threshold that meets it (`seed`, see `seeding`).

During the search (`verdict`), a trial is stopped as soon as it cannot win or is unlikely to
(the statistics are in `stats`):
- its GFLOPs (or, for a time budget, its predicted time per batch) exceed the budget, estimated from the
  first batches with a slack (budget);
- even all remaining images right could not reach the best trial's hits (budget) or the floor (no-drop);
- (no-drop) it already uses more GFLOPs than the best trial;
- from the images where the two differ so far, its predicted final gap to the reference (the best
  trial, or the unmerged model less the tolerance) is Z standard deviations below zero (`trails`).

After the search (`choose`), the setting is picked among the complete trials by a written rule
that treats trials the paired test cannot tell apart as tied (`beats`, one-sided at CHOICE_Z):
- budget: among the trials within the budget that the best-scoring one does not beat, the one
  with the most GFLOPs (it spends the budget; a cheaper one wins only by scoring higher by more
  than chance);
- no-drop / agreement: the cheapest trial that the paired test does not show losing to the
  unmerged model by more than the tolerance.
`rule="argmax"` is the plain choice on these images (best top-1 within the budget; cheapest
trial meeting the floor exactly), which the stress test and the comparison use: they report
figures on the images they chose on. A budget's report says why its choice left much of the
budget unspent (`note`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from atm_cli.engine import ATMConfig
from atm_cli.errors import UsageError, param
from atm_cli.evaluation import Outcomes

from .search import BatchSource, Search, SearchResult, TrialEvent
from .seeding import check_budget, constant_for_floor, constant_within_budget, first_batches, reachable_gflops
from .space import SearchSpace
from .stats import Z, Candidate, Standing, Verdict, beats, required_hits, trails, within_reach

if TYPE_CHECKING:
    import optuna

    from atm_cli.evaluation import Workload
    from atm_cli.evaluation.latency import LatencyModel
    from atm_cli.presets import Measured

RULES = ("paired", "argmax")
SPEND = 0.9  # a budget search's choice should use at least this share of the budget (else its note says why)


class Goal:
    """Base of the goals: hits against the reference, the choice among finished trials, and the steps around
    the search that a goal does not change (no range check, seeding by the floor's bisection, no note)."""

    direction: str
    label_free = False

    @property
    def key(self) -> str:
        """The goal's stable name: its kind and the value asked for it, as given."""
        raise NotImplementedError

    def describe(self) -> str:
        """The goal in words, for people (`key` names it)."""
        raise NotImplementedError

    def is_named_by(self, recorded: str | None) -> bool:
        """Whether a recorded goal is this one: its key, or its description, which presets and studies made before
        goals had keys recorded."""
        return recorded in (self.key, self.describe())

    def hits(self, outcomes: Outcomes, reference: Outcomes) -> np.ndarray:
        return outcomes.correct

    def reference_hits(self, reference: Outcomes) -> np.ndarray:
        return reference.correct

    def value(self, outcomes: Outcomes, reference: Outcomes) -> float:
        raise NotImplementedError

    def constraint(self, outcomes: Outcomes, reference: Outcomes) -> float:
        """<= 0 when the goal is met on the images run."""
        raise NotImplementedError

    def verdict(self, standing: Standing) -> Verdict | None:
        raise NotImplementedError

    def choose(self, trials: Sequence[Candidate], reference_hits: np.ndarray, rule: str = "paired") -> Candidate | None:
        raise NotImplementedError

    def on_workload(self, source: Workload, space: SearchSpace,
                    stage: Callable[[str], None]) -> tuple[Goal, LatencyModel | None]:
        """The goal the search runs on `source` in `space` (a goal asked as a `Reduction` or a `speed.SpeedTarget`
        becomes one here), and the device's latency model a time goal is built on (None: not a time goal)."""
        return self, None

    def check_reachable(self, source: Workload, space: SearchSpace) -> tuple[float, float] | None:
        """Refuse a goal no setting in `space` is predicted to meet (UsageError), before the search; the GFLOPs
        range the space reaches on the first batch, where that was measured."""
        return None  # a floor: the least-merging setting meets it

    def seed(self, search: Search, study: optuna.Study, n_trials: int,
             on_trial: Callable[[TrialEvent], None] | None = None) -> ATMConfig | None:
        """The constant threshold that meets the goal, run as the study's first trials (None: none did)."""
        return constant_for_floor(search, study, n_trials, on_trial)

    def nearness(self, measured: Measured, reference_gflops: float) -> tuple | None:
        """How far a preset's figures (as measured when it was made) are from meeting this goal, smaller first,
        to rank presets as first trials (None: its figures do not say)."""
        return None

    def note(self, result: SearchResult) -> str | None:
        """What the report should add about the choice (None: nothing)."""
        return None


class CappedGoal(Goal):
    """Maximise top-1 subject to a cost <= a budget; the cost is GFLOPs (`BudgetGoal`) or predicted seconds per
    batch (`LatencyGoal`), and everything else (pruning, the choice, the seeding) is shared."""

    direction = "maximize"

    @property
    def budget(self) -> float:
        raise NotImplementedError

    def amount(self, cost: float) -> str:
        """A cost as the report writes it."""
        raise NotImplementedError

    def cost(self, outcomes: Outcomes) -> float:
        raise NotImplementedError

    def candidate_cost(self, trial: Candidate) -> float:
        return self.cost(trial.outcomes)

    def standing_cost(self, standing: Standing) -> tuple[float, float | None]:
        """A running trial's cost so far, and over the whole set once estimated (else None)."""
        raise NotImplementedError

    def least_cost(self, source: BatchSource, space: SearchSpace) -> float:
        """The cost of the most-merging setting in `space` on the first batch: about the least the search reaches."""
        return self.cost(first_batches(source, space.extremes()[0], 1))

    def value(self, outcomes: Outcomes, reference: Outcomes) -> float:
        return outcomes.top1

    def constraint(self, outcomes: Outcomes, reference: Outcomes) -> float:
        return self.cost(outcomes) - self.budget

    def verdict(self, standing: Standing) -> Verdict | None:
        (running, estimate), best = self.standing_cost(standing), standing.incumbent
        if estimate is not None and estimate > self.budget * (1 + standing.slack):
            return Verdict(f"an estimated {self.amount(estimate)} after {standing.seen} images, over the budget",
                           estimate - self.budget)
        if best is None:
            return None
        over = (estimate or running) - self.budget
        if not within_reach(int(standing.hits.sum()), standing.remaining, int(best.hits.sum())):
            return Verdict(f"cannot reach trial {best.number}'s top-1 even with every remaining image right", over)
        lost, differ, behind = trails(standing.hits, best.hits[:standing.seen], standing.remaining, Z)
        if behind:
            return Verdict(f"trails trial {best.number} by {lost} of the {differ} images where they differ "
                           f"(after {standing.seen} images)", over)
        return None

    def choose(self, trials: Sequence[Candidate], reference_hits: np.ndarray, rule: str = "paired") -> Candidate | None:
        feasible = [t for t in trials if t.feasible]
        if not feasible:
            return None
        best = min(feasible, key=lambda t: (-int(t.hits.sum()), self.candidate_cost(t), t.number))
        if rule == "argmax":
            return best
        tied = [t for t in feasible if not beats(best.hits, t.hits)]
        return min(tied, key=lambda t: (-self.candidate_cost(t), -int(t.hits.sum()), t.number))

    def seed(self, search: Search, study: optuna.Study, n_trials: int,
             on_trial: Callable[[TrialEvent], None] | None = None) -> ATMConfig | None:
        return constant_within_budget(self, search, study, n_trials, on_trial)


@dataclass(frozen=True)
class BudgetGoal(CappedGoal):
    """Maximise top-1 subject to GFLOPs <= target."""

    target_gflops: float
    reduction: float | None = None  # the budget as asked, if it was: percent fewer GFLOPs than the unmerged model
    direction: str = "maximize"

    @staticmethod
    def key_of(target_gflops: float | None, reduction: float | None = None) -> str:
        return f"reduction-{reduction}" if reduction is not None else f"gflops-{target_gflops}"

    @property
    def key(self) -> str:
        return self.key_of(self.target_gflops, self.reduction)

    @property
    def budget(self) -> float:
        return self.target_gflops

    def describe(self) -> str:
        return f"max top-1 subject to GFLOPs <= {self.target_gflops:.4g}"

    def amount(self, cost: float) -> str:
        return f"{cost:.4g} GFLOPs"

    def cost(self, outcomes: Outcomes) -> float:
        return outcomes.gflops

    def candidate_cost(self, trial: Candidate) -> float:
        return trial.gflops

    def standing_cost(self, standing: Standing) -> tuple[float, float | None]:
        return standing.gflops, standing.estimate

    def check_reachable(self, source: Workload, space: SearchSpace) -> tuple[float, float]:
        low, high, _ = reachable_gflops(source, space)
        check_budget(self.target_gflops, source.loaded.unmerged_gflops, (low, high))
        return low, high

    def nearness(self, measured: Measured, reference_gflops: float) -> tuple | None:
        """Presets within the budget, the nearest below it first."""
        share = self.target_gflops / reference_gflops - measured.gflops / measured.baseline_gflops
        return (share,) if share >= 0 else None

    def note(self, result: SearchResult) -> str | None:
        """Why the choice is more than 10% below the budget (None: it spent the budget)."""
        best, spent = result.best, SPEND * self.target_gflops
        if best.gflops >= spent:
            return None
        closer = [t for t in result.trials if t.state == "complete" and t.feasible and t.gflops >= spent]
        if not closer:
            return (f"no complete trial used {100 * SPEND:g}-100% of the budget, so trial {best.number} at "
                    f"{best.gflops:.4g} GFLOPs was the closest; run more trials to fill the gap")
        near = max(closer, key=lambda t: (t.top1, t.gflops))
        return (f"trial {best.number} ({best.top1:.2f}% top-1, {best.gflops:.4g} GFLOPs) scores higher by more "
                f"than chance than every trial within {100 * (1 - SPEND):g}% of the budget (best of them: trial "
                f"{near.number}, {near.top1:.2f}% at {near.gflops:.4g} GFLOPs)")


@dataclass(frozen=True)
class Reduction:
    """A GFLOPs budget asked as `percent` fewer GFLOPs than the unmerged model's: a `BudgetGoal` on the workload."""

    percent: float
    label_free = False

    @property
    def key(self) -> str:
        return BudgetGoal.key_of(None, self.percent)

    def on_workload(self, source: Workload, space: SearchSpace,
                    stage: Callable[[str], None]) -> tuple[BudgetGoal, None]:
        return BudgetGoal(source.loaded.unmerged_gflops * (1 - self.percent / 100), reduction=self.percent), None


@dataclass(frozen=True)
class LatencyGoal(CappedGoal):
    """Maximise top-1 subject to the predicted time per batch <= target (`predict`: a run's predicted seconds
    per batch, from its token counts; `unmerged_seconds`: the unmerged model's; `speedup` or `latency_ms`: the
    target as asked, over the unmerged model or in ms per batch)."""

    target_seconds: float
    predict: Callable[[Outcomes], float] = field(compare=False, repr=False)
    unmerged_seconds: float = field(compare=False, repr=False)
    speedup: float | None = None
    latency_ms: float | None = None
    direction: str = "maximize"

    @staticmethod
    def key_of(speedup: float | None, latency_ms: float | None = None) -> str:
        return f"speedup-{speedup}" if speedup is not None else f"latency-{latency_ms}ms"

    @property
    def key(self) -> str:
        return self.key_of(self.speedup, self.latency_ms)

    @property
    def budget(self) -> float:
        return self.target_seconds

    def describe(self) -> str:
        if self.speedup is not None:
            return f"max top-1 subject to predicted speedup >= {self.speedup:g}"
        return f"max top-1 subject to predicted time <= {1e3 * self.target_seconds:.4g} ms per batch"

    def amount(self, cost: float) -> str:
        return f"{1e3 * cost:.4g} ms per batch (predicted)"

    def cost(self, outcomes: Outcomes) -> float:
        return self.predict(outcomes)

    def standing_cost(self, standing: Standing) -> tuple[float, float | None]:
        """The whole set's time estimated as its GFLOPs are: the batches seen scaled alike."""
        running = self.predict(standing.outcomes)
        return running, None if standing.estimate is None else running * standing.estimate / standing.gflops

    def check_reachable(self, source: Workload, space: SearchSpace) -> None:
        most = self.least_cost(source, space)
        if self.target_seconds < most:
            raise UsageError(f"the goal ({self.describe()}) asks for {1e3 * self.target_seconds:.4g} ms per batch; "
                             f"the most merging setting in range is predicted at {1e3 * most:.4g} ms "
                             f"({self.unmerged_seconds / most:.2f}x) on the first batch (widen the ranges, e.g. "
                             f"{param('theta_min_range')})")


@dataclass(frozen=True)
class NoDropGoal(Goal):
    """Minimise GFLOPs subject to top-1 >= the unmerged model's - tolerance (percentage points)."""

    tolerance: float = 0.0
    direction: str = "minimize"
    misses = "wrong images"

    @staticmethod
    def key_of(tolerance: float) -> str:
        return f"no-drop-{tolerance}" if tolerance else "no-drop"

    @property
    def key(self) -> str:
        return self.key_of(self.tolerance)

    def describe(self) -> str:
        return f"min GFLOPs subject to top-1 >= unmerged - {self.tolerance:g}"

    def value(self, outcomes: Outcomes, reference: Outcomes) -> float:
        return outcomes.gflops

    def constraint(self, outcomes: Outcomes, reference: Outcomes) -> float:
        # In images, so that tolerance 0 and an equal count give exactly 0 (feasible).
        hits = self.hits(outcomes, reference)
        seen = len(hits)
        allowed = self.tolerance * seen / 100
        return (int(self.reference_hits(reference)[:seen].sum()) - allowed - int(hits.sum())) * 100 / seen

    def verdict(self, standing: Standing) -> Verdict | None:
        best, seen, total = standing.incumbent, standing.seen, standing.total
        # Not an improvement unless cheaper than the best so far: no slack, a near-tie is not worth a full run.
        if best is not None and standing.estimate is not None and standing.estimate > best.gflops:
            return Verdict(f"an estimated {standing.estimate:.4g} GFLOPs after {seen} images, more than trial "
                           f"{best.number}'s {best.gflops:.4g}", None)
        reference, hits = standing.reference_hits, int(standing.hits.sum())
        if not within_reach(hits, standing.remaining, required_hits(int(reference.sum()), total, self.tolerance)):
            short = int(reference.sum()) - self.tolerance * total / 100 - hits - standing.remaining
            return Verdict(f"{seen - hits} {self.misses} already exceed the tolerance", short * 100 / total)
        allowed = self.tolerance * seen / 100
        lost, differ, behind = trails(standing.hits, reference[:seen], standing.remaining, Z, allowed)
        if behind:
            return Verdict(f"loses {lost} of the {differ} images where it differs from the unmerged model "
                           f"(after {seen} images)", (int(reference[:seen].sum()) - allowed - hits) * 100 / seen)
        return None

    def choose(self, trials: Sequence[Candidate], reference_hits: np.ndarray, rule: str = "paired") -> Candidate | None:
        if rule == "argmax":
            accepted = [t for t in trials if t.feasible]
        else:
            allowed = self.tolerance * len(reference_hits) / 100
            accepted = [t for t in trials if not beats(reference_hits, t.hits, allowed=allowed)]
        return min(accepted, key=lambda t: (t.gflops, -int(t.hits.sum()), t.number)) if accepted else None

    def nearness(self, measured: Measured, reference_gflops: float) -> tuple | None:
        """Presets with top-1 figures, those that dropped least beyond the tolerance first, then the cheapest."""
        if measured.top1 is None or measured.baseline_top1 is None:
            return None
        return (max(0.0, measured.baseline_top1 - measured.top1 - self.tolerance),
                measured.gflops / measured.baseline_gflops)


@dataclass(frozen=True)
class AgreementGoal(NoDropGoal):
    """Minimise GFLOPs subject to >= `agreement`% of images keeping the unmerged model's top-1 class (no labels)."""

    agreement: float = 100.0
    tolerance: float = 0.0  # set from `agreement` on construction
    label_free = True
    misses = "changed classes"

    def __post_init__(self) -> None:
        object.__setattr__(self, "tolerance", 100.0 - self.agreement)

    @staticmethod
    def key_of(agreement: float) -> str:
        return f"agreement-{agreement}"

    @property
    def key(self) -> str:
        return self.key_of(self.agreement)

    def describe(self) -> str:
        return f"min GFLOPs subject to agreement with the unmerged top-1 >= {self.agreement:g}%"

    def hits(self, outcomes: Outcomes, reference: Outcomes) -> np.ndarray:
        return outcomes.predictions == reference.predictions[:outcomes.n_images]

    def reference_hits(self, reference: Outcomes) -> np.ndarray:
        return np.ones(reference.n_images, bool)
