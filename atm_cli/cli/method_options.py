"""The method flags every command that merges shares: --method, --preset, ATM's and ToMe's parameters."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

import typer

from atm_cli.errors import UsageError
from atm_cli.paper import PAPER_DEIT_S
from atm_cli.presets import default_preset_for, find_preset

if TYPE_CHECKING:
    from atm_cli.engine import MergeConfig

# Where the fallback for a model without a default preset (atm_cli.paper.PAPER_DEIT_S) comes from.
PAPER_DEFAULT_SOURCE = "the paper's DeiT-S setting (Table A2)"


class MethodName(str, Enum):
    atm = "atm"
    tome = "tome"
    none = "none"


# The flags as Typer options, for every command that takes them (pass them on to MethodFlags).
METHOD = typer.Option(None, "--method", case_sensitive=False,
                      help="Merging method. Default: atm with the model's default preset, or the paper's DeiT-S setting.")
PRESET = typer.Option(None, "--preset", metavar="FILE|NAME", help="A preset file, or the name of a bundled preset.")
FORCE = typer.Option(False, "--force", help="Apply a preset made for another model or checkpoint.")
ALPHA = typer.Option(None, "--alpha", help="ATM: threshold of the first block.")
BETA = typer.Option(None, "--beta", help="ATM: how fast thresholds fall with depth.")
THETA_MIN = typer.Option(None, "--theta-min", help="ATM: the lowest threshold.")
SPLIT_LAYER = typer.Option(None, "--split-layer", help="ATM: last block with alternate matching (default 0.75 L).")
R = typer.Option(None, "--r", metavar="R", help="ToMe: tokens merged per block (an int, or a comma list per block).")


@dataclass
class MethodChoice:
    config: MergeConfig | None  # None: the unmerged model
    source: str  # where the setting came from, for the output
    batch_size: int | None = None  # the preset's batch size (GFLOPs depend on it), when a preset chose


@dataclass(frozen=True)
class MethodFlags:
    """The flags as given; contradictions fail on construction, before any model is loaded."""

    method: MethodName | None = None
    preset: str | None = None
    alpha: float | None = None
    beta: float | None = None
    theta_min: float | None = None
    split_layer: int | None = None
    r: str | None = None

    def __post_init__(self) -> None:
        atm = self._atm_flags()
        if self.preset is not None and (self.method is not None or atm or self.r is not None):
            raise UsageError("--preset sets the method and its parameters: drop --method, "
                             "--alpha/--beta/--theta-min/--split-layer and --r")
        if atm and self.method in (MethodName.tome, MethodName.none):
            raise UsageError(f"{_flags(atm)} set ATM's thresholds; they contradict --method {self.method.value}")
        if self.r is not None:
            _parse_r(self.r)
            if self.method not in (None, MethodName.tome):
                raise UsageError(f"--r is ToMe's parameter; it contradicts --method {self.method.value}")
            if atm:
                raise UsageError(f"--r (ToMe) contradicts ATM's {_flags(atm)}")
        if self.method is MethodName.tome and self.r is None:
            raise UsageError("--method tome needs --r R (tokens merged per block)")

    def _atm_flags(self) -> dict:
        values = {"alpha": self.alpha, "beta": self.beta, "theta_min": self.theta_min, "split_layer": self.split_layer}
        return {name: value for name, value in values.items() if value is not None}

    def resolve(self, model_name: str, checkpoint_sha256: str | None = None, force: bool = False) -> MethodChoice:
        """The engine config for a model: a preset, the flags, or the model's default ATM setting."""
        from atm_cli.engine import ATMConfig, ToMeConfig  # here: help and flag checks start without torch

        if self.preset is not None:
            preset = find_preset(self.preset, model_name, force, checkpoint_sha256)
            return MethodChoice(preset.method, f"preset {preset.path}", preset.batch_size)
        if self.r is not None:
            return MethodChoice(ToMeConfig(r=_parse_r(self.r)), "--r")
        if self.method is MethodName.none:
            return MethodChoice(None, "--method none")
        default = default_preset_for(model_name, checkpoint_sha256)
        atm = self._atm_flags()
        wants_atm = self.method is MethodName.atm or bool(atm)
        if default is not None and (isinstance(default.method, ATMConfig) or not wants_atm):
            choice = MethodChoice(default.method, f"default preset {default.name}", default.batch_size)
        else:
            choice = MethodChoice(ATMConfig(**PAPER_DEIT_S), PAPER_DEFAULT_SOURCE)
        if atm:
            choice = MethodChoice(dataclasses.replace(choice.config, **atm), f"{choice.source} with {_flags(atm)}")
        return choice


def _flags(values: dict) -> str:
    return ", ".join(f"--{name.replace('_', '-')}" for name in values)


def _parse_r(text: str) -> int | list[int]:
    """ToMe's r: one int for every block, or a comma-separated list, one per block."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise UsageError(f"--r must be an integer or a comma-separated list of integers, got {text!r}") from None
    if any(v < 0 for v in values):
        raise UsageError(f"--r must not be negative, got {text!r}")
    return values[0] if len(values) == 1 else values
