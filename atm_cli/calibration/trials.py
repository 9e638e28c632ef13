"""How a search's trials are stored in the Optuna study, and read back as `Finished` records."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import numpy as np
from optuna.trial import FrozenTrial, TrialState

from atm_cli.evaluation import Outcomes

from .space import DIGITS

CONSTRAINT = "goal"  # the name of the one constraint each trial records
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
SETUP_ATTR = "atm_setup"
SETTING_ATTR = "setting"  # a trial's ATMConfig.setting_key
OUTCOMES_ATTR = "outcomes"  # a trial's Outcomes.to_record()
REPEATS_ATTR = "repeats_trial"
REASON_ATTR = "pruned_because"
WORKER_ATTR = "worker"
WORKER = f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class Finished:
    """A finished trial as the study holds it, with its per-batch outcomes."""

    number: int
    state: str  # "complete" or "pruned"
    params: dict  # the study's parameters (alpha, beta, theta_min; split_layer when searched)
    outcomes: Outcomes  # on the batches it ran (every batch when complete)
    feasible: bool | None  # met the goal on the images it ran (None: unknown)
    reason: str | None = None  # why it was pruned
    repeats: int | None = None  # the earlier trial of the same setting whose results it reused
    hits: np.ndarray | None = None  # the goal's per-image hits, set by the search

    @property
    def images(self) -> int:
        return self.outcomes.n_images

    @property
    def top1(self) -> float:
        return self.outcomes.top1

    @property
    def top5(self) -> float:
        return self.outcomes.top5

    @property
    def gflops(self) -> float:
        return self.outcomes.gflops

    @classmethod
    def of(cls, trial: FrozenTrial) -> Finished:
        attrs = trial.user_attrs
        constraint = trial.constraints.get(CONSTRAINT)
        params = {k: round(v, DIGITS) if isinstance(v, float) else v for k, v in trial.params.items()}
        return cls(number=trial.number, state=trial.state.name.lower(), params=params,
                   outcomes=Outcomes.from_record(attrs[OUTCOMES_ATTR]),
                   feasible=None if constraint is None else constraint <= 0, reason=attrs.get(REASON_ATTR),
                   repeats=attrs.get(REPEATS_ATTR))


def has_outcomes(trial: FrozenTrial) -> bool:
    return OUTCOMES_ATTR in trial.user_attrs


def record(trial, outcomes: Outcomes) -> None:
    """Store a running trial's outcomes (and its headline figures, for Optuna's dashboards)."""
    trial.set_user_attr("top1", outcomes.top1)
    trial.set_user_attr("gflops", outcomes.gflops)
    trial.set_user_attr("images", outcomes.n_images)
    trial.set_user_attr(OUTCOMES_ATTR, outcomes.to_record())
