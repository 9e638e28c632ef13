"""Failures a user can act on (the CLI prints their message as one line and exits with `exit_code`),
and Ctrl-C for long runs that can report what they finished."""
from __future__ import annotations


class AtmError(Exception):
    exit_code = 1


class UsageError(AtmError):
    """Bad input: flags, paths, names or files that cannot be used as given."""

    exit_code = 2


class RunError(AtmError):
    """A failure while running (a model that does not fit its checkpoint, a search that found nothing)."""

    exit_code = 1


class Interruptible:
    """A with-block that Ctrl-C ends early when `keep_partial` is set; `interrupted` then says so.

    Without `keep_partial` the interrupt propagates, as it would without the block.
    """

    def __init__(self, keep_partial: bool):
        self.keep_partial = keep_partial
        self.interrupted = False

    def __enter__(self) -> Interruptible:
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        self.interrupted = kind is KeyboardInterrupt and self.keep_partial
        return self.interrupted  # True swallows the interrupt: the caller reports what it finished


def first_line(error: BaseException) -> str:
    """An exception as one line of a message: its type and the first line of its text."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__
