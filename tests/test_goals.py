"""The calibration goals' statistics and choice rule, as pure functions on hand-built per-image outcomes."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from atm_cli.calibration.goals import AgreementGoal, BudgetGoal, NoDropGoal, beats
from atm_cli.calibration.space import measured_space, nice_step
from atm_cli.cli.ranges import origin
from atm_cli.evaluation import BatchOutcome, Outcomes, agreement


@dataclass
class Trial:
    number: int
    gflops: float
    hits: np.ndarray
    feasible: bool = True


def paired(n: int, ahead_only: int, behind_only: int) -> tuple[np.ndarray, np.ndarray]:
    """Two hit vectors on n images: the first right alone on `ahead_only` images, the second on `behind_only`."""
    a, b = np.zeros(n, bool), np.zeros(n, bool)
    a[:ahead_only] = True
    b[ahead_only:ahead_only + behind_only] = True
    a[-n // 2:] = b[-n // 2:] = True  # images both get right
    return a, b


def test_beats_is_a_one_sided_paired_test_checked_by_simulation():
    # Under "no difference", each differing image falls either way with chance 1/2: the test should
    # call a difference in about 5% of draws (one-sided, z = 1.645), whatever the number of differing images.
    rng = np.random.default_rng(0)
    for differ in (20, 80, 300):
        ahead = rng.binomial(differ, 0.5, 20000)
        calls = [beats(*paired(1000, k, differ - k)) for k in ahead[:4000]]
        assert np.mean(calls) == pytest.approx(0.05, abs=0.025)
    # 20 ahead of 40 differing: 20 > 1.645 * sqrt(40) = 10.4; 8 ahead of 28: 8 < 1.645 * sqrt(28) = 8.7.
    assert beats(*paired(1000, 30, 10)) and not beats(*paired(1000, 18, 10))
    assert not beats(*paired(1000, 10, 30)) and not beats(*paired(1000, 5, 5))


def test_beats_with_an_allowance_compares_against_the_tolerance_in_images():
    a, b = paired(1000, 12, 0)  # a ahead by 12 of 12 differing images
    assert beats(a, b) and not beats(a, b, allowed=10)  # 2 images beyond the allowance: within chance (1.645 * sqrt 12)


def test_budget_rule_spends_the_budget_among_trials_the_best_does_not_beat():
    n = 1000

    def right_on(*ranges: range) -> np.ndarray:
        hits = np.zeros(n, bool)
        hits[500:] = True  # images every trial gets right
        for images in ranges:
            hits[list(images)] = True
        return hits

    best = Trial(0, 0.50, right_on(range(0, 20)))  # the most hits
    tied_dearer = Trial(1, 0.58, right_on(range(20, 35)))  # 5 fewer of 35 differing: 5 < 1.645 * sqrt(35)
    beaten = Trial(2, 0.60, right_on())  # 20 fewer of 20 differing: beaten by more than chance
    over = Trial(3, 0.70, right_on(range(0, 40)), feasible=False)  # over the budget
    goal = BudgetGoal(0.6)
    reference = np.ones(n, bool)
    assert goal.choose([best, tied_dearer, beaten, over], reference).number == 1
    assert goal.choose([best, tied_dearer, beaten, over], reference, "argmax").number == 0
    assert goal.choose([over], reference) is None


def test_no_drop_rule_takes_the_cheapest_the_paired_test_does_not_show_losing():
    n = 1000
    reference = paired(n, 0, 0)[0]
    reference[:40] = True  # the unmerged model: right on 40 + n/2 images
    exact = Trial(0, 0.7, reference.copy())  # the same images: feasible exactly
    one_less = reference.copy()
    one_less[0] = False
    close = Trial(1, 0.6, one_less, feasible=False)  # one image short: not shown losing
    far = reference.copy()
    far[:20] = False
    losing = Trial(2, 0.4, far, feasible=False)  # 20 images short of 20 differing: losing
    goal = NoDropGoal(0.0)
    assert goal.choose([exact, close, losing], reference).number == 1
    assert goal.choose([exact, close, losing], reference, "argmax").number == 0
    # A tolerance of 2 points (20 images) accepts the trial 20 images short as well.
    assert NoDropGoal(2.0).choose([exact, close, losing], reference).number == 2


def outcome(predictions: list[int], labels: list[int], gflops: float = 1.0) -> BatchOutcome:
    predictions, labels = np.array(predictions), np.array(labels)
    return BatchOutcome(predictions == labels, predictions, int((predictions == labels).sum()), gflops, (5,))


def test_agreement_goal_counts_changed_classes_not_labels():
    unmerged = Outcomes([outcome([1, 2, 3, 4], [0, 0, 0, 0])])  # every image wrong
    merged = Outcomes([outcome([1, 2, 0, 4], [0, 0, 0, 0])])  # one class changed (to the right one)
    assert agreement(merged, unmerged) == 75.0
    goal = AgreementGoal(agreement=75.0)
    assert goal.tolerance == 25.0
    assert list(goal.hits(merged, unmerged)) == [True, True, False, True]
    assert goal.constraint(merged, unmerged) <= 0 < AgreementGoal(agreement=80.0).constraint(merged, unmerged)
    assert NoDropGoal(0.0).constraint(merged, unmerged) < 0  # by labels it gained an image


def test_totals_weigh_batches_by_size_and_survive_the_study_record():
    run = Outcomes([outcome([0, 1, 1], [0, 1, 2], gflops=2.0), outcome([3], [3], gflops=1.0)])
    assert run.n_images == 4 and run.top1 == 75.0 and run.gflops == pytest.approx((3 * 2.0 + 1.0) / 4)
    back = Outcomes.from_record(run.to_record())
    assert back.top1 == run.top1 and back.gflops == run.gflops and back.tokens_per_layer == run.tokens_per_layer
    assert np.array_equal(back.predictions, run.predictions) and np.array_equal(back.correct, run.correct)


def test_measured_ranges_bracket_no_merging_and_heavy_merging_in_every_block():
    rng = np.random.default_rng(1)
    mergeable, images, depth = 32, 64, 6
    # Blocks with different similarity distributions, as real models have.
    sims = [np.clip(rng.beta(a, 2, images * mergeable), -1, 1) for a in (20, 8, 5, 12, 30, 3)]
    space = measured_space(sims, images, mergeable, depth)
    high, low = space.theta_min[1], space.theta_min[0]
    for block in sims:
        # The top lets at most half a token per image through on average (ATM's batch r is then 0) ...
        assert (block > high).sum() / images <= 0.5
        # ... and the bottom merges at least three quarters of the tokens that can merge.
        assert (block > low).mean() >= 0.75
    assert space.alpha == space.theta_min and space.beta[0] == 0.0
    # The steepest fall takes alpha's top to the bottom by the last block (Eq. 1).
    assert space.alpha[1] - (np.exp(space.beta[1] * (depth - 1)) - 1) <= low + space.beta_step * depth
    assert (high - low) / space.step >= 200 and space.constants(depth)[0] == high


@pytest.mark.parametrize("width, points, step", [(0.37, 200, 0.001), (0.18, 200, 0.0005), (1.0, 100, 0.01),
                                                 (0.03, 50, 0.0005)])
def test_nice_steps(width, points, step):
    assert nice_step(width, points) == step


def test_range_flags_override_a_measured_space_and_say_so():
    sims = [np.linspace(0.5, 1.0, 64 * 32)] * 4
    measured = measured_space(sims, 64, 32, 4)
    given = measured.overridden(theta_min=(0.6, 0.9))
    assert given.theta_min == (0.6, 0.9) and given.alpha == measured.alpha and given.step == measured.step
    assert origin(given).startswith("measured") and "--theta-min-range from the command line" in origin(given)
    everything = measured.overridden((0.5, 1.0), (0.0, 0.1), (0.3, 1.0), 0.01)
    assert origin(everything) == "--alpha-range, --beta-range, --theta-min-range, --step from the command line"
    assert measured.overridden() is measured
