"""Where a search keeps its trials: Optuna storages, resuming, and several processes on one study.

What survives what (README, "What survives what"): a journal whose last record a crash, a full disk
or a kill cut short is repaired by dropping that partial record (every complete one is kept); a
file that is not an Optuna journal is refused, never appended to; several processes creating one
RDB study retry the create race; the seeding (see `calibrate.seed_constant`) runs in one process
and a resumed study whose seeding was cut short runs it again; trials beyond --n-trials that
processes sharing a study start at the same moment are marked failed, not counted.
"""
from __future__ import annotations

import datetime
import json
import os
import random
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.storages import BaseStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock, JournalStorage
from optuna.storages.journal._file import get_lock_file
from optuna.trial import TrialState

from atm_cli.errors import UsageError, param

from .trials import FINISHED, SETUP_ATTR, WORKER, WORKER_ATTR

if TYPE_CHECKING:
    from .goals import Goal

# A process that dies mid-trial leaves it RUNNING; with a heartbeat, the next process marks it failed.
HEARTBEAT_SECONDS = 30
GRACE_SECONDS = 90
SEEDING_ATTR = "seeding"  # {"by": worker, "done": bool}: who seeds the study, and whether it finished
CREATE_TRIES = 5  # processes creating one RDB's tables at once: all but one fail, and retry
# How SQLite and PostgreSQL report a table, or a unique row, that another process created a moment earlier.
CREATE_RACE_SIGNS = ("already exists", "duplicate key", "UNIQUE constraint failed")
SETUP_WAIT_SECONDS = 10  # a process that lost the create race waits this long for the winner's setup
SQLITE_TIMEOUT_SECONDS = 60  # several processes on one SQLite file wait for its lock, not fail
GOAL_SETUP = "goal"  # the setup's entry that names the study's goal (`Goal.key`)
NAMELESS_SECONDS = 2  # a running trial with no worker named this long after its start was left by a killed process


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def redact(url_or_path: str | None) -> str | None:
    """The storage as it may be printed: an RDB URL's password replaced by ***."""
    if url_or_path is None or "://" not in url_or_path:
        return url_or_path
    from sqlalchemy.engine import make_url

    try:
        return make_url(url_or_path).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy can parse: print no part after the scheme's user
        scheme, _, rest = url_or_path.partition("://")
        return f"{scheme}://***@{rest.rpartition('@')[2]}" if "@" in rest else url_or_path


def _password(url: str) -> str | None:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).password
    except Exception:
        return None


def open_storage(url_or_path: str | None, note: Callable[[str], None] = _say, repair: bool = True) -> BaseStorage | None:
    """An RDB URL (sqlite:///file.db, postgresql://...) or a journal file path; None keeps trials in memory.

    A journal's torn last record is dropped (said through `note`) unless `repair` is off (reading only)."""
    if url_or_path is None:
        return None
    shown = redact(url_or_path)
    try:
        if "://" in url_or_path:
            return _open_rdb(url_or_path)
        return _open_journal(Path(url_or_path), note, repair)
    except UsageError:
        raise
    except Exception as error:  # SQLAlchemy, drivers and the file system raise many kinds; all mean "unusable"
        reason = (str(error).strip() or type(error).__name__).splitlines()[0]
        secret = _password(url_or_path) if "://" in url_or_path else None
        if secret:
            reason = reason.replace(secret, "***")
        raise UsageError(f"cannot open the study storage {shown!r}: {reason}") from None


def _open_rdb(url: str) -> RDBStorage:
    from sqlalchemy.exc import SQLAlchemyError

    engine = {"connect_args": {"timeout": SQLITE_TIMEOUT_SECONDS}} if url.startswith("sqlite") else None
    for attempt in range(CREATE_TRIES):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_SECONDS,
                                  grace_period=GRACE_SECONDS)
        except SQLAlchemyError as error:
            # Another process created the tables (or their version record) between this one's check and its write.
            racing = any(sign in str(error) for sign in CREATE_RACE_SIGNS)
            if not racing or attempt + 1 == CREATE_TRIES:
                raise
            time.sleep(random.uniform(0.1, 0.5))
    raise AssertionError("unreachable")


def _open_journal(path: Path, note: Callable[[str], None], repair: bool) -> JournalStorage:
    if path.is_dir() or not path.parent.is_dir():
        raise OSError(f"{path} is a folder" if path.is_dir() else f"folder {path.parent} does not exist")
    if path.exists() and not path.is_file():
        raise OSError(f"{path} is not a regular file")
    lock = JournalFileSymlinkLock(str(path))
    if path.exists() and repair:
        with get_lock_file(lock):  # no other process appends while the tail is checked
            dropped = check_journal(path, repair=True)
        if dropped:
            note(f"note: {path}: dropped a partial last record ({dropped} bytes, left by an interrupted write); "
                 "every complete trial is kept")
    elif path.exists():
        check_journal(path, repair=False)
    return JournalStorage(JournalFileBackend(str(path), lock_obj=lock))


def check_journal(path: Path, repair: bool) -> int:
    """Refuse a file that is not an Optuna journal; cut a torn last record off (when `repair`).

    Returns the bytes cut off. A journal is lines of JSON objects with an "op_code"; a write cut
    short leaves a last line without its newline, or one that does not parse."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # what follows the last newline: empty in a whole journal
    good = 0
    for number, line in enumerate(lines, start=1):
        if not _is_record(line):
            if number == len(lines) and not tail and (number > 1 or _starts_record(line)):
                tail = line + b"\n"  # the last line, torn inside (a short write, then a newline)
                break
            what = "is not an Optuna journal" if number == 1 else f"has a damaged record at line {number}"
            raise UsageError(f"study storage {path} {what}: give a new file name, or the journal it was")
        good += len(line) + 1
    if not tail:
        return 0
    if good == 0 and not _starts_record(tail):
        raise UsageError(f"study storage {path} is not an Optuna journal: give a new file name, or the journal it was")
    if repair:
        with open(path, "r+b") as handle:
            handle.truncate(good)
            handle.flush()
            os.fsync(handle.fileno())
    return len(tail)


RECORD_START = b'{"op_code":'  # how Optuna writes every journal record


def _starts_record(text: bytes) -> bool:
    """Whether `text` is (or may be cut from) the start of a journal record."""
    return text.startswith(RECORD_START) or RECORD_START.startswith(text)


def _is_record(line: bytes) -> bool:
    try:
        record = json.loads(line)
    except ValueError:
        return False
    return isinstance(record, dict) and "op_code" in record


def open_study(storage: BaseStorage | None, study_name: str | None, goal: Goal, setup: dict[str, Any],
               seed: int | None, n_trials: int) -> optuna.Study:
    """Create the study, or load it when it exists and was started with the same setup and goal."""
    setup = json.loads(json.dumps({**setup, GOAL_SETUP: goal.key}))  # as the storage returns it (tuples: lists)
    existing = None
    if storage is not None and study_name is not None:
        try:
            existing = optuna.load_study(study_name=study_name, storage=storage)
        except KeyError:
            existing = None
    if existing is not None:
        _check_same_setup(_wait_for_setup(existing), study_name, setup, goal)
        fail_dead_trials(existing)
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
    kwargs = dict(storage=storage, study_name=study_name, sampler=sampler, pruner=optuna.pruners.NopPruner(),
                  direction=goal.direction)
    if existing is not None:
        return optuna.create_study(**kwargs, load_if_exists=True)
    try:
        study = optuna.create_study(**kwargs)
    except optuna.exceptions.DuplicatedStudyError:  # another process created it meanwhile
        study = optuna.create_study(**kwargs, load_if_exists=True)
        _check_same_setup(_wait_for_setup(study), study_name, setup, goal)
        return study
    study.set_user_attr(SEEDING_ATTR, {"by": WORKER, "done": False})  # before the setup: joiners wait for that
    study.set_user_attr(SETUP_ATTR, setup)
    return study


def _wait_for_setup(study: optuna.Study) -> optuna.Study:
    """A study another process has just created gets its setup a moment later."""
    deadline = time.monotonic() + SETUP_WAIT_SECONDS
    while SETUP_ATTR not in study.user_attrs and time.monotonic() < deadline:
        time.sleep(0.1)
    return study


def _check_same_setup(study: optuna.Study, study_name: str | None, setup: dict[str, Any], goal: Goal) -> None:
    stored = study.user_attrs.get(SETUP_ATTR)
    if stored is None:
        return
    if goal.is_named_by(stored.get(GOAL_SETUP)):  # a study made before goals had keys stored the goal's prose
        stored = {**stored, GOAL_SETUP: goal.key}
    differs = [key for key in sorted(set(stored) | set(setup)) if stored.get(key) != setup.get(key)]
    if differs:
        key = differs[0]
        raise UsageError(f"study {study_name!r} was started with another {key} ({stored.get(key)!r}, now "
                         f"{setup.get(key)!r}); resume it with the same settings or use another {param('study_name')}")


def _alive(worker: str | None) -> bool:
    """Whether the process `worker` (host:pid) may still run: on another host it cannot be told, so yes."""
    if not worker or ":" not in worker:
        return True
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_dead_trials(study: optuna.Study) -> None:
    """Mark failed the running trials of processes on this host that died (a journal has no heartbeat), and
    those that never said whose they are: a live process names itself as its trial's first act
    (`up_to`), so a trial still nameless after `NAMELESS_SECONDS` lost its process in between."""
    now = datetime.datetime.now()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        nameless = WORKER_ATTR not in trial.user_attrs
        if nameless and trial.datetime_start is not None and (now - trial.datetime_start).total_seconds() > NAMELESS_SECONDS \
                or not nameless and not _alive(trial.user_attrs[WORKER_ATTR]):
            try:
                study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            except RuntimeError:  # another process marked it meanwhile
                pass


def claim_seeding(study: optuna.Study) -> bool:
    """Whether this process runs the study's seeding: it created the study, or the seeding was cut short (its
    process is gone, or a study without the record has no trials yet)."""
    state = study.user_attrs.get(SEEDING_ATTR)
    if state is None:  # a study kept in memory, or made before the record existed
        return not study.get_trials(deepcopy=False)
    if state.get("done"):
        return False
    if state.get("by") != WORKER and _alive(state.get("by")):
        return False  # another process is seeding now
    study.set_user_attr(SEEDING_ATTR, {"by": WORKER, "done": False})
    return True


def finish_seeding(study: optuna.Study) -> None:
    """Mark the seeding done, when this process ran it: one that joined while another seeded must leave the
    record alone, or a kill of the seeder would go unnoticed and the seed never run."""
    state = study.user_attrs.get(SEEDING_ATTR)
    if state is not None and state.get("by") == WORKER:
        study.set_user_attr(SEEDING_ATTR, {"by": WORKER, "done": True})


class SurplusTrial(Exception):
    """A trial started when the study already held (or was running) its --n-trials: failed, not counted."""


def up_to(n_trials: int, objective: Callable[[optuna.Trial], float]) -> Callable[[optuna.Trial], float]:
    """`objective`, run only by trials among the study's first `n_trials` (finished or running); a later one,
    started by a process sharing the study at the same moment, stops this process and fails (`SurplusTrial`,
    which `study.optimize(catch=...)` passes over)."""
    def bounded(trial: optuna.Trial) -> float:
        trial.set_user_attr(WORKER_ATTR, WORKER)
        ahead = [t for t in trial.study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
                 if t.number < trial.number]
        if len(ahead) >= n_trials:
            trial.study.stop()
            raise SurplusTrial(f"the study already holds {n_trials} trials")
        return objective(trial)

    return bounded


class InterruptsOutsideTrials:
    """A with-block in which Ctrl-C and SIGTERM reach only the objectives made by `inside`; one that lands between
    trials is held, and raised when the next trial starts or when the block ends.

    Optuna's bookkeeping between trials (telling the storage a trial's result) cannot be interrupted: an interrupt
    there ends in an unrelated error (a traceback, exit 1) instead of the one line that says what is kept. Only
    the main thread can take signals; elsewhere the block changes nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.handlers: dict[int, Any] = {}  # the handlers the block stands in for
        self.held: int | None = None  # a signal that landed between trials
        self.active = threading.current_thread() is threading.main_thread()

    def _hold(self, signum: int, frame) -> None:
        self.held = signum

    def _close(self) -> None:
        if self.active:
            self.handlers = {number: signal.signal(number, self._hold) for number in self.SIGNALS}

    def _open(self) -> None:
        """The handlers back; a signal held meanwhile is handled now, as it would have been when it came."""
        if not self.active:
            return
        for number, handler in self.handlers.items():
            signal.signal(number, handler)
        held, self.held = self.held, None
        if held is None:
            return
        handler = self.handlers[held]
        if callable(handler):
            handler(held, None)  # Python's Ctrl-C handler, or atm's SIGTERM one: raises KeyboardInterrupt
        elif handler == signal.SIG_DFL:
            os.kill(os.getpid(), held)

    def __enter__(self) -> InterruptsOutsideTrials:
        self._close()
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is not None:  # an interrupt (or a failure) already on its way out: the held one adds nothing
            self.held = None
        self._open()

    def inside(self, objective: Callable[[optuna.Trial], float]) -> Callable[[optuna.Trial], float]:
        def interruptible(trial: optuna.Trial) -> float:
            self._open()
            try:
                return objective(trial)
            finally:
                self._close()

        return interruptible


def finished_trials(url_or_path: str | None, study_name: str | None) -> int:
    """Finished trials the study holds now (0 when there is no storage or no such study): what an
    interruption kept, wherever it landed."""
    if url_or_path is None or study_name is None:
        return 0
    try:
        storage = open_storage(url_or_path, repair=False)
        study = optuna.load_study(study_name=study_name, storage=storage)
    except (KeyError, UsageError):
        return 0
    return len(study.get_trials(deepcopy=False, states=FINISHED))
