"""`atm presets list|show`: the bundled presets (the paper's settings and calibrated ones), by model.

What they print is their output, on stdout (`atm presets list | grep deit`); notes go to stderr.
"""
from __future__ import annotations

import json
from typing import Optional

import typer
import yaml
from rich import box
from rich.console import Console
from rich.table import Table

from atm_cli.engine import METHODS
from atm_cli.model_names import complete_model_name
from atm_cli.presets import Preset, canonical_model_name, find_preset, list_presets

app = typer.Typer(help="The bundled presets: the paper's settings and calibrated ones, by model.",
                  no_args_is_help=True, add_completion=False)


def _number(value: Optional[float], digits: str = ".2f") -> str:
    return "" if value is None else format(value, digits)


def _source(source: str) -> str:
    return {"atm calibrate": "calibrated"}.get(source, source.replace("paper Table ", "paper "))


def _params(preset: Preset) -> str:
    """The setting in brief: every parameter that differs from the method's default (all of ATM's thresholds)."""
    defaults = METHODS[preset.method_name].defaults()
    return " ".join(f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}"
                    for name, value in preset.params.items() if name not in defaults or value != defaults[name])


@app.command("list")
def list_command(
    model: Optional[str] = typer.Option(None, "--model", metavar="NAME",
                                        help="Only presets made for this model (deit_small for "
                                             "deit_small_patch16_224)."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """List the bundled presets by model: each setting's parameters (those not at their default), and what they measured."""
    notes = Console(stderr=True)
    if model is not None:
        # Completed over the names the presets carry, as `atm eval` completes over timm's (without importing it).
        known = {canonical_model_name(p.model.name) for p in list_presets()}
        model = complete_model_name(canonical_model_name(model), known,
                                    note=lambda text: notes.print(text, highlight=False))
    presets = list_presets(model)
    if json_output:
        typer.echo(json.dumps({"presets": [{"name": p.name, **p.to_dict()} for p in presets]}))
        return
    if not presets:
        wanted = f" for {model}" if model else ""
        notes.print(f"no bundled presets{wanted}", highlight=False)
        return
    console = Console()
    for model_name in dict.fromkeys(p.model.name for p in presets):
        table = Table(title=f"{model_name} (atm eval --model ... --preset NAME)", title_justify="left",
                      box=box.SIMPLE_HEAD, pad_edge=False)
        group = [p for p in presets if p.model.name == model_name]
        table.add_column("name", no_wrap=True, min_width=max(len(p.name) for p in group) + 2)
        table.add_column("params", no_wrap=True)
        for column in ("GFLOPs", "change", "top-1"):
            table.add_column(column, justify="right", no_wrap=True)
        table.add_column("from", no_wrap=True)
        for p in group:
            m = p.measured
            change = f"{100 * (m.gflops / m.baseline_gflops - 1):+.0f}%" if m.baseline_gflops else ""
            table.add_row(p.name + (" *" if p.default else ""), _params(p), _number(m.gflops, ".3g"), change,
                          _number(m.top1), _source(p.provenance.source))
        console.print(table)
    console.print("* the model's default (what atm eval runs with no method flags)", highlight=False)


@app.command("show")
def show_command(
    name: str = typer.Argument(..., metavar="NAME|FILE", help="A bundled preset's name, or a preset file."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Print one preset in full (YAML, or JSON with --json)."""
    preset = find_preset(name, force=True)
    if json_output:
        typer.echo(json.dumps({"name": preset.name, "path": str(preset.path), **preset.to_dict()}))
        return
    typer.echo(f"# {preset.path}")  # a YAML comment: the output stays a preset file
    typer.echo(yaml.safe_dump(preset.to_dict(), sort_keys=False, width=120), nl=False)
