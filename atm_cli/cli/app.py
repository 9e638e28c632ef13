"""The `atm` Typer app. Each command lives in its own module of this package, listed in COMMANDS.

A command module exposes either `command` (a function, registered under the module's name) or
`app` (a Typer group of sub-commands). Add one line to COMMANDS to register a new module.
"""
from __future__ import annotations

import importlib
import logging

import typer
from typer.core import TyperGroup

from atm_cli.errors import AtmError

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


class _ReportingGroup(TyperGroup):
    """Turns the library's user-facing errors into one line on stderr and their exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except AtmError as error:
            message = " ".join(str(error).split())
            typer.echo(f"atm: error: {message}", err=True)
            raise typer.Exit(error.exit_code) from None


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
        app.add_typer(_module.app, name=_module_name)
    else:
        app.command(_module_name)(_module.command)


def main() -> None:
    app(prog_name="atm")
