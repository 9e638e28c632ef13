"""The Optuna search over ATM's thresholds, run batch by batch so that hopeless trials stop early.

Every trial runs the same batches in the same order and reports its running value to Optuna
after each batch; its goal (`goals.py`) stops it as soon as it cannot win, or is unlikely to.
GFLOPs over the whole set are estimated from the first `probe_batches` batches on: batches
differ in GFLOPs (r adapts to their images) but alike for every setting, so the estimate scales
the running GFLOPs by how the same batches compared with the whole set in complete trials, and
allows for the spread of that ratio.

Pruning only decides which trials run to the end; every reported figure comes from a trial run
on every batch. The goal's constraint is an Optuna constraint (`set_constraint`), which the TPE
sampler uses to model feasibility, not a penalty folded into the objective. The setting reported
is chosen among the complete trials by the goal's rule (`Goal.choose`).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from atm_cli.engine import ATMConfig
from atm_cli.errors import RunError, interrupt_behind
from atm_cli.evaluation import BatchOutcome, Outcomes

from .space import SearchSpace
from .stats import Standing
from .study import InterruptsOutsideTrials, SurplusTrial, up_to
from .trials import (CONSTRAINT, FINISHED, REASON_ATTR, REPEATS_ATTR, SETTING_ATTR, WORKER, WORKER_ATTR, Finished,
                     has_outcomes, record)

if TYPE_CHECKING:
    from .goals import Goal  # the goals run their steps through the search

# GFLOPs estimated from part of the data may be off by this much, plus twice the spread of the
# ratios complete trials showed; before any trial completes, by UNPROFILED_SLACK (a batch of
# CIFAR-10 images has been seen 16% off its set's mean).
GFLOPS_SLACK = 0.01
UNPROFILED_SLACK = 0.2
FRESH_ATTR = "images_run"  # images a trial ran through the model (not read back from an earlier trial)
UNPRUNED_ATTR = "unpruned"  # a seed: runs on every batch


class BatchSource(Protocol):
    """Runs a setting on batch `index` of a fixed list of batches (the model, or a test's stand-in)."""

    depth: int  # blocks of the model
    n_batches: int

    def run_batch(self, config: ATMConfig | None, index: int) -> BatchOutcome: ...


@dataclass(frozen=True)
class TrialEvent:
    """Sent after each trial this process finishes."""

    trial: Finished
    best: Finished | None  # the best feasible complete trial so far
    done: int  # finished trials in the study (every process's)
    total: int  # the study's target number of trials


class SearchInterrupted(KeyboardInterrupt):
    """Ctrl-C during a search: the trial in flight is lost, `kept` finished trials stay in the study."""

    def __init__(self, kept: int):
        super().__init__(kept)
        self.kept = kept


@contextmanager
def interruptible(study: optuna.Study) -> Iterator[None]:
    """Ctrl-C inside: SearchInterrupted with the study's finished trials counted, wherever it lands (in a
    trial, or between trials: a seed's GFLOPs bisection, the report on new images)."""
    try:
        yield
    except SearchInterrupted:
        raise
    except KeyboardInterrupt:
        raise SearchInterrupted(len(study.get_trials(deepcopy=False, states=FINISHED))) from None
    except Exception as error:
        if not interrupt_behind(error):
            raise
        raise SearchInterrupted(len(study.get_trials(deepcopy=False, states=FINISHED))) from None



@dataclass
class SearchResult:
    best: Finished | None  # the trial the goal's rule chose (None: no trial met the goal)
    argmax: Finished | None  # the plain argmax on these images (the rule's counterpart)
    trials: list[Finished]  # every finished trial of the study, by number
    reference: Outcomes  # the unmerged model on the tuning batches
    goal: Goal
    space: SearchSpace
    rule: str
    n_images: int
    trials_run: int  # trials this process finished
    forward_passes: int  # images this process's trials ran through the model
    study_forward_passes: int  # images every trial of the study ran through the model, the unmerged run included
    study_name: str

    def _best(self) -> Finished:
        if self.best is None:
            raise RunError(f"no trial met the goal ({self.goal.describe()}) in {len(self.trials)} trials; "
                           "run more trials or relax the goal")
        return self.best

    @property
    def best_config(self) -> ATMConfig:
        return self.space.config(self._best().params)

    @property
    def top1(self) -> float:
        return self._best().top1

    @property
    def gflops(self) -> float:
        return self._best().gflops

    @property
    def naive_forward_passes(self) -> int:
        """A search without multi-fidelity: every trial of the study on every image, plus the unmerged model each time."""
        return 2 * len(self.trials) * self.n_images


class Search:
    """One Optuna study over `space`, run on `source`'s batches against the unmerged `reference`."""

    def __init__(self, source: BatchSource, reference: Outcomes, goal: Goal, space: SearchSpace,
                 probe_batches: int = 2, rule: str = "paired"):
        space.validate(source.depth)
        self.source, self.reference, self.goal, self.space, self.rule = source, reference, goal, space, rule
        self.reference_hits = goal.reference_hits(reference)
        self.probe_batches = max(1, min(probe_batches, source.n_batches))
        self.total = reference.n_images
        self.forward_passes = 0
        self.trials_run = 0
        self._decoded: dict[int, Finished] = {}

    def finished(self, trial: FrozenTrial) -> Finished:
        """A stored trial with its goal's hits (decoded once per trial)."""
        if trial.number not in self._decoded or self._decoded[trial.number].state != trial.state.name.lower():
            finished = Finished.of(trial)
            finished.hits = self.goal.hits(finished.outcomes, self.reference)
            self._decoded[trial.number] = finished
        return self._decoded[trial.number]

    def complete_trials(self, study: optuna.Study) -> list[Finished]:
        """Complete trials with their per-image results (from the storage: every process's)."""
        return [self.finished(t) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if has_outcomes(t)]

    def incumbent(self, study: optuna.Study) -> Finished | None:
        """The best feasible complete trial so far, on these images (what pruning compares with)."""
        return self.goal.choose(self.complete_trials(study), self.reference_hits, "argmax")

    def gflops_ratios(self, study: optuna.Study) -> np.ndarray:
        """Per complete trial (rows): its running GFLOPs after 1, 2, ... batches over its GFLOPs on all."""
        sizes = np.array(self.reference.batch_sizes)
        rows = [np.cumsum(sizes * np.array(t.outcomes.batch_gflops)) / np.cumsum(sizes) / t.gflops
                for t in self.complete_trials(study)]
        return np.array(rows).reshape(len(rows), len(sizes))

    def estimate_gflops(self, outcomes: Outcomes, ratios: np.ndarray) -> tuple[float | None, float]:
        """The trial's GFLOPs over all batches, estimated from those seen, and the relative slack it needs."""
        seen = len(outcomes)
        if seen < self.probe_batches:
            return None, 0.0
        if not len(ratios):
            return outcomes.gflops, UNPROFILED_SLACK
        at_seen = ratios[:, seen - 1]
        return outcomes.gflops / at_seen.mean(), GFLOPS_SLACK + 2 * at_seen.std()

    @staticmethod
    def known_outcomes(study: optuna.Study, setting: str) -> tuple[int | None, list[BatchOutcome]]:
        """The finished trial of this setting that ran the most batches, and its outcomes on them."""
        number, known = None, []
        for trial in study.get_trials(deepcopy=False, states=FINISHED):
            if trial.user_attrs.get(SETTING_ATTR) == setting and has_outcomes(trial):
                outcomes = Finished.of(trial).outcomes
                if len(outcomes) > len(known):
                    number, known = trial.number, outcomes.batches
        return number, known

    def objective(self, trial: optuna.Trial) -> float:
        config = self.space.suggest(trial, self.source.depth)
        setting = config.setting_key(self.source.depth)
        trial.set_user_attr(WORKER_ATTR, WORKER)  # which process ran it, when several share the study
        trial.set_user_attr(SETTING_ATTR, setting)
        incumbent, ratios = self.incumbent(trial.study), self.gflops_ratios(trial.study)
        # The engine is deterministic: batches an identical setting already ran are read back, not run.
        repeats, known = self.known_outcomes(trial.study, setting)
        if repeats is not None:
            trial.set_user_attr(REPEATS_ATTR, repeats)
        outcomes, fresh = Outcomes(), 0
        unpruned = trial.user_attrs.get(UNPRUNED_ATTR, False)  # a seed runs to the end whatever its standing
        for index in range(self.source.n_batches):
            if index < len(known):
                outcome = known[index]
            else:
                outcome = self.source.run_batch(config, index)
                fresh += outcome.n
                self.forward_passes += outcome.n
            outcomes.add(outcome)
            trial.set_user_attr(FRESH_ATTR, fresh)
            if index + 1 == self.source.n_batches:
                break
            if unpruned:
                continue
            estimate, slack = self.estimate_gflops(outcomes, ratios)
            standing = Standing(self.goal.hits(outcomes, self.reference), self.reference_hits, outcomes.gflops,
                                estimate, slack, incumbent, outcomes)
            verdict = self.goal.verdict(standing)
            trial.report(self.goal.value(outcomes, self.reference), index + 1)  # the sampler ranks pruned trials by it
            if verdict is not None:
                record(trial, outcomes)
                trial.set_user_attr(REASON_ATTR, verdict.reason)
                if verdict.constraint is not None:
                    trial.set_constraint(CONSTRAINT, verdict.constraint)
                raise optuna.TrialPruned(verdict.reason)
        record(trial, outcomes)
        trial.set_constraint(CONSTRAINT, self.goal.constraint(outcomes, self.reference))
        return self.goal.value(outcomes, self.reference)

    def optimize(self, study: optuna.Study, n_trials: int, timeout: float | None = None,
                 on_trial: Callable[[TrialEvent], None] | None = None, most: int | None = None) -> None:
        """Run trials until the study holds `n_trials` finished ones (at most `most` here; `timeout` seconds).

        Ctrl-C loses the trial in flight and raises SearchInterrupted with the count of finished trials kept.
        """
        def after_trial(study: optuna.Study, frozen: FrozenTrial) -> None:
            if frozen.state in FINISHED:
                self.trials_run += 1
                if on_trial is not None:
                    done = len(study.get_trials(deepcopy=False, states=FINISHED))
                    on_trial(TrialEvent(self.finished(frozen), self.incumbent(study), done, n_trials))

        remaining = n_trials - len(study.get_trials(deepcopy=False, states=FINISHED))
        if most is not None:
            remaining = min(remaining, most)
        if remaining <= 0:
            return
        # The callback stops this process when trials from every process sharing the study reach n_trials.
        stop = optuna.study.MaxTrialsCallback(n_trials, states=FINISHED)
        with interruptible(study), InterruptsOutsideTrials() as interrupts:
            study.optimize(interrupts.inside(up_to(n_trials, self.objective)), n_trials=remaining, timeout=timeout,
                           callbacks=[after_trial, stop], catch=(SurplusTrial,))

    def try_setting(self, study: optuna.Study, config: ATMConfig, n_trials: int,
                    on_trial: Callable[[TrialEvent], None] | None = None, unpruned: bool = False) -> Finished | None:
        """Run `config` as the study's next trial (None: outside the space, or the study is already full);
        `unpruned`: on every batch whatever its standing (a seed whose result the search must hold)."""
        params = self.space.trial_params(config, self.source.depth)
        if params is None:
            return None
        before = {t.number for t in study.get_trials(deepcopy=False)}
        study.enqueue_trial(params, user_attrs={UNPRUNED_ATTR: True} if unpruned else None)
        self.optimize(study, n_trials, on_trial=on_trial, most=1)
        ran = [t for t in study.get_trials(deepcopy=False, states=FINISHED) if t.number not in before]
        return self.finished(ran[0]) if ran else None

    def run(self, study: optuna.Study, n_trials: int, timeout: float | None = None,
            known_good: Sequence[ATMConfig] = (),
            on_trial: Callable[[TrialEvent], None] | None = None) -> SearchResult:
        """Run until the study holds `n_trials` finished trials (or `timeout` seconds pass); `known_good` first."""
        for config in known_good:
            params = self.space.trial_params(config, self.source.depth)
            if params is not None:
                study.enqueue_trial(params, skip_if_exists=True)
        self.optimize(study, n_trials, timeout, on_trial)
        return self.result(study)

    def result(self, study: optuna.Study) -> SearchResult:
        frozen = study.get_trials(deepcopy=False, states=FINISHED)
        trials = [self.finished(t) for t in frozen if has_outcomes(t)]
        complete = [t for t in trials if t.state == "complete"]
        fresh = sum(t.user_attrs.get(FRESH_ATTR, 0) for t in frozen)
        return SearchResult(best=self.goal.choose(complete, self.reference_hits, self.rule),
                            argmax=self.goal.choose(complete, self.reference_hits, "argmax"), trials=trials,
                            reference=self.reference, goal=self.goal, space=self.space, rule=self.rule,
                            n_images=self.total, trials_run=self.trials_run, forward_passes=self.forward_passes,
                            study_forward_passes=fresh + self.total, study_name=study.study_name)
