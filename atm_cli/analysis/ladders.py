"""What stress and compare share: each method's settings as a ladder, a method's answer, and the run over the
methods with ATM last, seeded by the constant threshold's answer.

Every registered method but ATM, and the schedules of the paper's Fig. 5 (constant threshold, increasing and
decreasing top-r), are one-parameter ladders: step 0 merges nothing, each step up merges more. ATM is the
calibration search instead. The constant threshold is ATM with beta = 0 on the space's threshold grid, so
ATM's family holds it: ATM runs after the ladders, seeded with the constant's answer at the same budget,
and never does worse than it.
"""
from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from typing import TypeVar

from ..calibration import SearchSpace
from ..engine import METHODS as REGISTRY
from ..engine import CONSTANT_KNOB, ATMConfig, Knob, MethodConfig, constant_knob, ramp_knob
from ..errors import Interruptible, UsageError
from ..evaluation import Comparison, LoadedModel, Outcomes, Workload
from ..evaluation.latency import MeasuredSpeed
from ..paper import METHODS
from .timing import timed

Progress = Callable[[int, int], None]
Cost = Callable[[MethodConfig, Outcomes], float]  # a setting's run, in a budget's unit

ATM = ATMConfig.NAME
CONSTANT = CONSTANT_KNOB  # the constant threshold's ladder, whose answer seeds ATM's search


def ladders(loaded: LoadedModel, space: SearchSpace) -> dict[str, Knob]:
    """The ladders for this model's depth and token count, by name: every registered method's knob (ATM's
    is its calibration search instead), then the paper's Fig. 5 schedules, the constant threshold on ATM's
    threshold grid (`space`)."""
    depth, image_tokens = loaded.depth, loaded.image_tokens
    knobs = [cls.knob(depth, image_tokens) for cls in REGISTRY.values() if cls is not ATMConfig]
    knobs += [ramp_knob(depth, image_tokens, rising=True), ramp_knob(depth, image_tokens, rising=False),
              constant_knob(space.threshold_grid(), space.split_layer)]
    return {knob.name: knob for knob in knobs}


def config_class(method: str, known: dict[str, Knob]) -> type[MethodConfig]:
    """The class of a method's settings: a registered method's own, or its ladder's (the constant's: ATM's)."""
    return REGISTRY[method] if method in REGISTRY else type(known[method].config(0))


def check_methods(methods: Sequence[str]) -> None:
    unknown = [name for name in methods if name not in METHODS]
    if unknown or not methods:
        raise UsageError(f"unknown method(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(METHODS)}")


def gflops_of(config: MethodConfig, run: Outcomes) -> float:
    return run.gflops


def least_merging_within(workload: Workload, ladder: Knob, limit: float,
                         cost: Cost = gflops_of) -> tuple[int, Outcomes] | None:
    """The smallest ladder step whose cost (GFLOPs, or predicted time) on all batches is <= `limit`, and its
    run (None: none fits)."""
    estimates: dict[int, float] = {}

    def estimate(step: int) -> float:
        if step not in estimates:
            config = ladder.config(step)
            estimates[step] = cost(config, workload.run(config, max_batches=1))
        return estimates[step]

    if estimate(ladder.top) > limit:
        return None
    # The least merging step that fits (the top one does; step 0 merges nothing): the cost falls along a ladder.
    fits = 1 + bisect.bisect_left(range(1, ladder.top), True, key=lambda step: estimate(step) <= limit)
    for step in range(fits, ladder.top + 1):
        config = ladder.config(step)
        run = workload.run(config)
        if cost(config, run) <= limit:
            return step, run
    return None


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


Budget = TypeVar("Budget")
Answer = TypeVar("Answer", bound=ChosenSetting)


def answer_atm_last(workload: Workload, methods: Sequence[str], budgets: Sequence[Budget],
                    ladder_answer: Callable[[str, Budget], Answer],
                    atm_answer: Callable[[Budget, list[ATMConfig]], Answer],
                    progress: Progress | None = None,
                    keep_partial: bool = False) -> tuple[dict[tuple[str, Budget], Answer], bool]:
    """Each method's answer at each budget (`ladder_answer`; ATM's: `atm_answer` with its seeds), by (method, budget),
    and whether an interrupt ended the run early (with `keep_partial`: the answers are then those finished before it).

    ATM runs last, seeded with the constant threshold's answer at the same budget when it passed. Each answer
    that passed is timed beside the unmerged model; a setting answered more than once is timed once.
    """
    answers: dict[tuple[str, Budget], Answer] = {}
    speeds: dict[MethodConfig, MeasuredSpeed] = {}
    with Interruptible(keep_partial) as stop:
        for method in sorted(methods, key=lambda name: name == ATM):  # ATM last: the constant's answers seed it
            for budget in budgets:
                if method == ATM:
                    constant = answers.get((CONSTANT, budget))
                    answer = atm_answer(budget, [constant.config] if constant and constant.passed else [])
                else:
                    answer = ladder_answer(method, budget)
                if answer.passed:
                    if answer.config not in speeds:
                        speeds[answer.config] = timed(workload, answer.config)
                    answer.speed = speeds[answer.config]
                answers[method, budget] = answer
                if progress is not None:
                    progress(len(answers), len(methods) * len(budgets))
    return answers, stop.interrupted
