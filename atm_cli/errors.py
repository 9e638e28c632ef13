"""Failures a user can act on (the CLI prints their message as one line and exits with `exit_code`),
and Ctrl-C for long runs that can report what they finished."""
from __future__ import annotations

import re
from collections.abc import Callable

_PARAM = re.compile("\x1f([a-z_]+)\x1f")


def param(name: str) -> str:
    """A parameter as an error message names it, e.g. f"{param('batch_size')} must be at least 1": the library
    says `batch_size`, the command line its flag (`--batch-size`, from the one table in `cli/flags.py`)."""
    return f"\x1f{name}\x1f"


class AtmError(Exception):
    exit_code = 1

    def __str__(self) -> str:
        return self.naming(str)

    def naming(self, name_of: Callable[[str], str]) -> str:
        """The message with each parameter called `name_of(its name)`."""
        return _PARAM.sub(lambda match: name_of(match.group(1)), super().__str__())

    @property
    def params(self) -> list[str]:
        """The parameters the message names."""
        return _PARAM.findall(super().__str__())


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
        self.interrupted = self.keep_partial and interrupt_behind(error)
        return self.interrupted  # True swallows the interrupt: the caller reports what it finished


def interrupt_behind(error: BaseException | None) -> bool:
    """Whether Ctrl-C (or SIGTERM, which atm raises as Ctrl-C) is what `error` came from: an interrupt that lands
    in a library's clean-up (Optuna's journal storage releasing a lock it had not yet taken) can surface as the
    error that clean-up raised (FileNotFoundError), with the interrupt as its context. An error raised `from None`
    in its place was meant to replace it, and ends the search."""
    while error is not None:
        if isinstance(error, KeyboardInterrupt):
            return True
        error = None if error.__suppress_context__ else error.__context__
    return False


def first_line(error: BaseException) -> str:
    """An exception as one line of a message: its type and the first line of its text."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__
