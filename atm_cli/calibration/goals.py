"""What a calibration search aims at, and its statistics: pure functions of per-image outcomes.

A goal scores a setting's `Outcomes` against the unmerged model's on the same images. Its *hits*
are per-image successes: top-1 correct for the label goals, top-1 class equal to the unmerged
model's for the label-free agreement goal (whose reference then hits every image).

During the search (`verdict`), a trial is stopped as soon as it cannot win or is unlikely to:
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
figures on the images they chose on.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from atm_cli.evaluation import Outcomes

# A trial is stopped when its chance of finishing level with its reference is below Phi(-Z) = 16%.
Z = 1.0
# A trial beats another by more than chance when their paired difference is one-sided significant at 5%.
CHOICE_Z = 1.645
RULES = ("paired", "argmax")


def trails(hits: np.ndarray, reference: np.ndarray, remaining: int, z: float,
           allowed: float = 0.0) -> tuple[int, int, bool]:
    """Images lost against `reference` on the same images, images where they differ, and the verdict.

    The verdict is a futility test on the final gap G over all N = seen + remaining images. Per
    image the two differ by -1, 0 or +1, with variance about differ / seen; with a flat prior on
    the trial's per-image edge, G is predicted as normal with mean -lost * N / seen (the deficit
    extrapolated) and variance differ * remaining * N / seen^2 (the remaining images' noise plus
    the uncertain edge). The trial is stopped when G >= -allowed * N / seen is z standard
    deviations away: lost - allowed > z * sqrt(differ * remaining / N).
    """
    seen = len(hits)
    lost = int(reference.sum()) - int(hits.sum())
    differ = int((hits != reference).sum())
    spread = math.sqrt(differ * remaining / (seen + remaining))
    return lost, differ, lost - allowed > 0 and lost - allowed > z * spread


def beats(hits: np.ndarray, other: np.ndarray, z: float = CHOICE_Z, allowed: float = 0.0) -> bool:
    """Whether `hits` is ahead of `other` on the same images by more than `allowed` images and more than
    chance: the paired (McNemar) normal test, ahead - allowed > z * sqrt(images where they differ)."""
    ahead = int(hits.sum()) - int(other.sum())
    differ = int((hits != other).sum())
    return ahead - allowed > 0 and ahead - allowed > z * math.sqrt(differ)


class Candidate(Protocol):
    """A complete trial as `choose` sees it."""

    number: int
    gflops: float
    hits: np.ndarray
    feasible: bool
    outcomes: Outcomes


@dataclass(frozen=True)
class Verdict:
    reason: str
    constraint: float | None  # the constraint value the pruned trial records (None: unknown)


@dataclass(frozen=True)
class Standing:
    """Where a running trial stands after a batch."""

    hits: np.ndarray  # its hits so far
    reference_hits: np.ndarray  # the reference's hits on the whole set
    gflops: float  # its GFLOPs so far
    estimate: float | None  # its GFLOPs estimated over the whole set (None until the probe batches ran)
    slack: float  # relative error allowed for that estimate
    incumbent: Candidate | None  # the best feasible complete trial so far
    outcomes: Outcomes | None = None  # its outcomes so far (a cost other than GFLOPs is computed from them)

    @property
    def seen(self) -> int:
        return len(self.hits)

    @property
    def total(self) -> int:
        return len(self.reference_hits)

    @property
    def remaining(self) -> int:
        return self.total - self.seen


class Goal:
    """Base of the goals: hits against the reference, and the choice among finished trials."""

    direction: str
    label_free = False

    def describe(self) -> str:
        raise NotImplementedError

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


class CappedGoal(Goal):
    """Maximise top-1 subject to a cost <= a budget; the cost is GFLOPs (`BudgetGoal`) or predicted seconds per
    batch (`LatencyGoal`), and everything else (pruning, the choice) is shared."""

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
        if int(standing.hits.sum()) + standing.remaining < int(best.hits.sum()):
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


@dataclass(frozen=True)
class BudgetGoal(CappedGoal):
    """Maximise top-1 subject to GFLOPs <= target."""

    target_gflops: float
    direction: str = "maximize"

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


@dataclass(frozen=True)
class LatencyGoal(CappedGoal):
    """Maximise top-1 subject to the predicted time per batch <= target (`predict`: a run's predicted seconds
    per batch, from its token counts; `speedup`: the target as given, over the unmerged model, if it was)."""

    target_seconds: float
    predict: Callable[[Outcomes], float] = field(compare=False, repr=False)
    speedup: float | None = None
    direction: str = "maximize"

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


@dataclass(frozen=True)
class NoDropGoal(Goal):
    """Minimise GFLOPs subject to top-1 >= the unmerged model's - tolerance (percentage points)."""

    tolerance: float = 0.0
    direction: str = "minimize"

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
        reference = standing.reference_hits
        needed = int(reference.sum()) - self.tolerance * total / 100
        if int(standing.hits.sum()) + standing.remaining < needed:
            return Verdict(f"{seen - int(standing.hits.sum())} {self.misses} already exceed the tolerance",
                           (needed - int(standing.hits.sum()) - standing.remaining) * 100 / total)
        lost, differ, behind = trails(standing.hits, reference[:seen], standing.remaining, Z,
                                      self.tolerance * seen / 100)
        if behind:
            allowed = self.tolerance * seen / 100
            return Verdict(f"loses {lost} of the {differ} images where it differs from the unmerged model "
                           f"(after {seen} images)",
                           (int(reference[:seen].sum()) - allowed - int(standing.hits.sum())) * 100 / seen)
        return None

    misses = "wrong images"

    def choose(self, trials: Sequence[Candidate], reference_hits: np.ndarray, rule: str = "paired") -> Candidate | None:
        if rule == "argmax":
            accepted = [t for t in trials if t.feasible]
        else:
            allowed = self.tolerance * len(reference_hits) / 100
            accepted = [t for t in trials if not beats(reference_hits, t.hits, allowed=allowed)]
        return min(accepted, key=lambda t: (t.gflops, -int(t.hits.sum()), t.number)) if accepted else None


@dataclass(frozen=True)
class AgreementGoal(NoDropGoal):
    """Minimise GFLOPs subject to >= `agreement`% of images keeping the unmerged model's top-1 class (no labels)."""

    agreement: float = 100.0
    tolerance: float = 0.0  # set from `agreement` on construction
    label_free = True
    misses = "changed classes"

    def __post_init__(self) -> None:
        object.__setattr__(self, "tolerance", 100.0 - self.agreement)

    def describe(self) -> str:
        return f"min GFLOPs subject to agreement with the unmerged top-1 >= {self.agreement:g}%"

    def hits(self, outcomes: Outcomes, reference: Outcomes) -> np.ndarray:
        return outcomes.predictions == reference.predictions[:outcomes.n_images]

    def reference_hits(self, reference: Outcomes) -> np.ndarray:
        return np.ones(reference.n_images, bool)
