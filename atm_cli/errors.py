"""Failures a user can act on. The CLI prints their message as one line and exits with `exit_code`."""


class AtmError(Exception):
    exit_code = 1


class UsageError(AtmError):
    """Bad input: flags, paths, names or files that cannot be used as given."""

    exit_code = 2


class RunError(AtmError):
    """A failure while running (a model that does not fit its checkpoint, a search that found nothing)."""

    exit_code = 1
