"""The statistics goals decide by: pure functions of per-image hits (1 where an image is a success).

During the search a trial is stopped as soon as it cannot win or is unlikely to: when even every
remaining image a hit could not reach what it needs (`within_reach`), or when, from the images where
it and its reference differ so far, its predicted final gap is Z standard deviations below zero
(`trails`). After the search, trials the paired test cannot tell apart are tied (`beats`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from atm_cli.evaluation import Outcomes

# A trial is stopped when its chance of finishing level with its reference is below Phi(-Z) = 16%.
Z = 1.0
# A trial beats another by more than chance when their paired difference is one-sided significant at 5%.
CHOICE_Z = 1.645


def required_hits(reference_hits: int, n_images: int, tolerance: float) -> int:
    """The fewest hits over `n_images` images within `tolerance` percentage points of the reference's
    `reference_hits` (a tolerance of whole images stays whole, whatever the float rounding)."""
    return math.ceil(reference_hits - tolerance * n_images / 100.0 - 1e-9)


def within_reach(hits: int, remaining: int, needed: float) -> bool:
    """Whether `needed` hits can still be reached: every remaining image a hit."""
    return hits + remaining >= needed


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
    """A complete trial as `Goal.choose` sees it."""

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
