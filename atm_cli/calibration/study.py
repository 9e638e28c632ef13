"""Where a search keeps its trials: Optuna storages, resuming, and several processes on one study."""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalStorage

from atm_cli.errors import UsageError

from .goals import Goal
from .trials import SETUP_ATTR

# A process that dies mid-trial leaves it RUNNING; with a heartbeat, the next process marks it failed.
HEARTBEAT_SECONDS = 30
GRACE_SECONDS = 90


def open_storage(url_or_path: str | None) -> BaseStorage | None:
    """An RDB URL (sqlite:///file.db, postgresql://...) or a journal file path; None keeps trials in memory."""
    if url_or_path is None:
        return None
    try:
        if "://" in url_or_path:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(url_or_path, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS)
        path = Path(url_or_path)
        if path.is_dir() or not path.parent.is_dir():
            raise OSError(f"{path} is a folder" if path.is_dir() else f"folder {path.parent} does not exist")
        return JournalStorage(JournalFileBackend(str(path)))
    except Exception as error:  # SQLAlchemy, drivers and the file system raise many kinds; all mean "unusable"
        reason = (str(error).strip() or type(error).__name__).splitlines()[0]
        raise UsageError(f"cannot open the study storage {url_or_path!r}: {reason}") from None


def open_study(storage: BaseStorage | None, study_name: str | None, goal: Goal, setup: dict[str, Any],
               seed: int | None, n_trials: int) -> optuna.Study:
    """Create the study, or load it when it exists and was started with the same setup."""
    setup = json.loads(json.dumps(setup))  # as the storage returns it (tuples become lists)
    existing = None
    if storage is not None and study_name is not None:
        try:
            existing = optuna.load_study(study_name=study_name, storage=storage)
        except KeyError:
            existing = None
    if existing is not None:
        _check_same_setup(existing, study_name, setup)
    # Resumed or extra processes draw other random start points than the first one did.
    started = 0 if existing is None else len(existing.get_trials(deepcopy=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(
            seed=None if seed is None else seed + started,
            multivariate=True,  # alpha, beta and theta_min act together on every threshold
            constant_liar=True,  # processes sharing the study avoid each other's running trials
            n_startup_trials=min(10, max(4, n_trials // 4)),
        )
    # Trials prune themselves (Search.objective); no Optuna pruner is consulted.
    study = optuna.create_study(storage=storage, study_name=study_name, sampler=sampler,
                                pruner=optuna.pruners.NopPruner(), direction=goal.direction, load_if_exists=True)
    if existing is None:
        _check_same_setup(study, study_name, setup)  # another process may have created it meanwhile
        study.set_user_attr(SETUP_ATTR, setup)
    return study


def _check_same_setup(study: optuna.Study, study_name: str | None, setup: dict[str, Any]) -> None:
    stored = study.user_attrs.get(SETUP_ATTR)
    if stored is None:
        return
    differs = [key for key in sorted(set(stored) | set(setup)) if stored.get(key) != setup.get(key)]
    if differs:
        key = differs[0]
        raise UsageError(f"study {study_name!r} was started with another {key} ({stored.get(key)!r}, now "
                         f"{setup.get(key)!r}); resume it with the same settings or use another --study-name")
