"""The `atm` Typer app. Each command lives in its own module of this package, listed in COMMANDS.

A command module exposes either `command` (a function, registered under the module's name) or
`app` (a Typer group of sub-commands). Add one line to COMMANDS to register a new module.
Command modules import torch and the layers that use it inside their functions: help starts at once.
"""
from __future__ import annotations

import importlib
import logging
import signal

import click
import typer
from typer.core import TyperCommand, TyperGroup

from atm_cli.errors import AtmError, interrupt_behind

from . import checks
from .flags import flag_of
from .model_data import INTERRUPTED_EXIT_CODE

# The hub logs every retry of a download that cannot work offline; the one error line after it says enough.
logging.getLogger("huggingface_hub").setLevel(logging.ERROR)

COMMANDS = (
    "eval",
    "stress",
    "compare",
    "visualize",
    "probe",
    "calibrate",
    "presets",
    "methods",
)


class _SwitchesTakeNoValue:
    """Typer's help gives a switch (`--json`, `--help`) the type `<bool>`, as if it took a value: show none."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False):
                param.metavar = ""
        return params


class _Command(_SwitchesTakeNoValue, TyperCommand):
    """Every command refuses NaN and infinite numbers, and seeds outside one range, before it starts."""

    def invoke(self, ctx):
        for param in self.params:
            value, flag = ctx.params.get(param.name), (param.opts or [param.name])[0]
            if isinstance(value, float):
                checks.check_finite(value, flag)
            if param.name == "seed" and isinstance(value, int):
                checks.check_seed(value, flag)
        return super().invoke(ctx)


class _Group(_SwitchesTakeNoValue, TyperGroup):
    pass


class _ReportingGroup(_Group):
    """Turns the library's user-facing errors into one line on stderr and their exit code; an interrupt that
    no command caught (it came before anything was finished) into one line too."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except AtmError as error:
            message = " ".join(error.naming(flag_of).split())
            typer.echo(f"atm: error: {message}", err=True)
            raise typer.Exit(error.exit_code) from None
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise  # a command's own exit (after reporting an interrupt it caught, too)
        except (KeyboardInterrupt, Exception) as error:  # an interrupt, or an error that one caused
            if not interrupt_behind(error):
                raise
            typer.echo("interrupted before a result was ready: nothing was kept", err=True)
            raise typer.Exit(INTERRUPTED_EXIT_CODE) from None


app = typer.Typer(
    name="atm",
    cls=_ReportingGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _root() -> None:
    """Training-free Adaptive Token Merging (ATM) for timm Vision Transformers."""
    # A callback keeps `atm` a group even while it has a single command.

for _module_name in COMMANDS:
    _module = importlib.import_module(f"{__package__}.{_module_name}")
    if isinstance(getattr(_module, "app", None), typer.Typer):
        for _info in _module.app.registered_commands:
            _info.cls = _Command
        app.add_typer(_module.app, name=_module_name, cls=_Group)
    else:
        app.command(_module_name, cls=_Command)(_module.command)


TERMINATED_EXIT_CODE = 143  # 128 + SIGTERM, as a shell reports a process that `timeout`, Slurm or Kubernetes ended


def main() -> None:
    """SIGTERM is handled as Ctrl-C (each command keeps and reports what it finished), then exits with 143."""
    terminated = []

    def on_terminate(signum, frame):
        terminated.append(signum)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_terminate)
    try:
        app(prog_name="atm")
    except SystemExit as done:
        if terminated:
            raise SystemExit(TERMINATED_EXIT_CODE) from None
        raise done from None
