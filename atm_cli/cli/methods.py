"""`atm methods`: every method the engine runs, with its parameters, defaults and valid ranges (no torch loaded)."""
from __future__ import annotations

import dataclasses
import json

import typer
from rich.console import Console
from rich.table import Table

from atm_cli.engine import METHODS

from . import model_data as options


def command(json_output: bool = options.JSON) -> None:
    """List the merging and pruning methods and their parameters (give them as --method NAME --set NAME=VALUE)."""
    rows = []
    for name, cls in METHODS.items():
        defaults = cls.defaults()
        params = [{"name": p.name, "default": defaults.get(p.name, dataclasses.MISSING), "range": p.describe_range()
                   if p.kind is not bool else "true/false", "help": p.help} for p in cls.PARAMS]
        rows.append({"method": name, "summary": cls.SUMMARY, "params": params})
    if json_output:
        for row in rows:
            for param in row["params"]:
                param["required"] = param["default"] is dataclasses.MISSING
                param["default"] = None if param["required"] else _plain(param["default"])
        typer.echo(json.dumps({"methods": rows}))
        return
    table = Table(title="Methods (--method NAME --set NAME=VALUE)", title_justify="left", show_lines=True)
    for column in ("method", "parameter", "default", "range", ""):
        table.add_column(column)
    for row in rows:
        for index, param in enumerate(row["params"]):
            default = "required" if param["default"] is dataclasses.MISSING else str(_plain(param["default"])).lower()
            table.add_row(row["method"] if index == 0 else "", param["name"], default, param["range"], param["help"])
    Console().print(table)


def _plain(value):
    return list(value) if isinstance(value, tuple) else value
