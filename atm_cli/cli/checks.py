"""Checks that run before any model or image loads, and writes that leave no half file.

Pure functions of flags and paths (tested alone in tests/test_faults.py): a bad value or an
output that cannot be written is found before minutes of work, in one line (`UsageError`).
"""
from __future__ import annotations

import csv
import errno
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from atm_cli.errors import RunError, UsageError

SEED_MAX = 2**32 - 1  # numpy's and torch's seeds: every command takes the same range
MAX_GRID_VALUES = 100_000  # values of one threshold's grid across [-1, 1] (a smaller --step would fill memory)
THRESHOLD_SPAN = 2.0  # cosine similarities lie in [-1, 1]


def check_seed(seed: int | None, flag: str = "--seed") -> None:
    if seed is not None and not 0 <= seed <= SEED_MAX:
        raise UsageError(f"{flag} must lie in 0..{SEED_MAX}, got {seed}")


def check_finite(value: float | None, flag: str) -> None:
    if value is not None and not math.isfinite(value):
        raise UsageError(f"{flag} must be a finite number, got {value}")


def check_step(step: float | None) -> None:
    """A grid step that is finite, positive and gives at most MAX_GRID_VALUES values across [-1, 1]."""
    if step is None:
        return
    check_finite(step, "--step")
    if step <= 0:
        raise UsageError(f"--step must be positive, got {step}")
    if THRESHOLD_SPAN / step > MAX_GRID_VALUES:
        raise UsageError(f"--step {step:g} gives {THRESHOLD_SPAN / step:.3g} grid values across [-1, 1]; the "
                         f"smallest step is {THRESHOLD_SPAN / MAX_GRID_VALUES:g} ({MAX_GRID_VALUES:,} values)")


def check_output(path: Path | None, flag: str) -> None:
    """Refuse an output that cannot be written (a folder, a missing or read-only folder, a read-only file)
    before the work: a file is created beside it and removed, so every cause the system has is asked."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder; give a file name")
    if path.exists() and not path.is_file():
        raise UsageError(f"{flag} {path} is not a regular file")
    folder = path.parent
    if not folder.is_dir():
        raise UsageError(f"{flag} {path}: folder {folder} does not exist")
    try:
        if path.exists():
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
        probe = folder / f".{path.name}.{os.getpid()}.check"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as error:
        raise UsageError(f"{flag} {path} cannot be written: {error.strerror or error}") from None


def check_csv_columns(path: Path | None, columns: Sequence[str], flag: str) -> None:
    """A CSV that already has rows must have these columns (a row is appended to it)."""
    if path is None or path.suffix != ".csv" or not path.is_file() or path.stat().st_size == 0:
        return
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            header = next(csv.reader(handle), [])
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise UsageError(f"{flag} {path} cannot be read as CSV: {error}") from None
    if header != list(columns):
        raise UsageError(f"{flag} {path} has other columns than atm eval writes; use a new file")


def written_or_said(path: Path, flag: str, write: Callable[[Path], object], kept: str) -> None:
    """Run `write(path)`; a failure (a disk that filled during the run) is one line that says where the result
    is still to be found (`kept`), exit code 1."""
    try:
        write(path)
    except OSError as error:
        reason = error.strerror or os.strerror(error.errno or errno.EIO)
        raise RunError(f"cannot write {flag} {path}: {reason}; {kept}") from None
