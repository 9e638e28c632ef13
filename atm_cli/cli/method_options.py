"""The method flags every command that merges shares: --method, --set, --preset, and ATM's and ToMe's shorthands."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import typer

from atm_cli.engine import METHODS, ATMConfig, MethodConfig, method_class
from atm_cli.errors import UsageError
from atm_cli.paper import PAPER_DEIT_S
from atm_cli.presets import Preset, default_preset_for, find_preset

# Where the fallback for a model without a default preset (atm_cli.paper.PAPER_DEIT_S) comes from.
PAPER_DEFAULT_SOURCE = "the paper's DeiT-S setting (Table A2)"
NO_METHOD = "none"

# The flags as Typer options, for every command that takes them (pass them on to MethodFlags).
METHOD = typer.Option(None, "--method", metavar="NAME",
                      help=f"Merging method: {', '.join(METHODS)} or {NO_METHOD} (`atm methods` lists their "
                           "parameters). Default: atm with the model's default preset, or the paper's DeiT-S setting.")
SET = typer.Option(None, "--set", metavar="NAME=VALUE",
                   help="A parameter of the method, e.g. --set keep_rate=0.6 (repeat for several).")
PRESET = typer.Option(None, "--preset", metavar="FILE|NAME", help="A preset file, or the name of a bundled preset.")
FORCE = typer.Option(False, "--force", help="Apply a preset made for another model or checkpoint.")
ALPHA = typer.Option(None, "--alpha", help="ATM: threshold of the first block (--set alpha=A).")
BETA = typer.Option(None, "--beta", help="ATM: how fast thresholds fall with depth (--set beta=B).")
THETA_MIN = typer.Option(None, "--theta-min", help="ATM: the lowest threshold (--set theta_min=T).")
SPLIT_LAYER = typer.Option(None, "--split-layer", help="ATM: last block with alternate matching (default 0.75 L).")
R = typer.Option(None, "--r", metavar="R", help="ToMe: tokens merged per block, an int or a comma list "
                                                "(--method tome --set r=R).")


@dataclass
class MethodChoice:
    config: MethodConfig | None  # None: the unmerged model
    source: str  # where the setting came from, for the output
    batch_size: int | None = None  # the preset's batch size (GFLOPs depend on it), when a preset chose
    precision: str | None = None  # the precision the preset was measured at, when a preset chose
    preset: Preset | None = None  # the preset that chose, given with --preset


@dataclass(frozen=True)
class MethodFlags:
    """The flags as given; contradictions and invalid values fail on construction, before any model is loaded."""

    method: str | None = None
    preset: str | None = None
    alpha: float | None = None
    beta: float | None = None
    theta_min: float | None = None
    split_layer: int | None = None
    r: str | None = None
    set: Optional[list[str]] = None

    def __post_init__(self) -> None:
        if self.method is not None and self.method not in (*METHODS, NO_METHOD):
            raise UsageError(f"--method {self.method}: choose from {', '.join((*METHODS, NO_METHOD))}")
        shorthand = self._shorthand()
        if self.preset is not None and (self.method is not None or shorthand or self.set):
            raise UsageError("--preset sets the method and its parameters: drop --method, --set, "
                             "--alpha/--beta/--theta-min/--split-layer and --r")
        implied = {"atm" if name != "r" else "tome" for name in shorthand}
        if len(implied) > 1:
            raise UsageError(f"--r (ToMe) contradicts ATM's {_flags(shorthand, skip='r')}")
        if implied and self.method not in (None, *implied):
            raise UsageError(f"{_flags(shorthand)} set {next(iter(implied))}'s parameters; "
                             f"they contradict --method {self.method}")
        if self.method == NO_METHOD and self.set:
            raise UsageError("--set gives a method's parameters; it contradicts --method none")
        # Every value is checked now: a missing or out-of-range one fails before any loading.
        if self.method_name == "atm":
            self._given()  # ATM's missing parameters come from the default setting, at resolve time
        elif self.method_name not in (None, NO_METHOD):
            self._params()
        if self.preset is not None:
            find_preset(self.preset, force=True)  # read and checked now; whether it fits the model, once loaded

    @property
    def method_name(self) -> str | None:
        """The method asked for, named or implied by a shorthand flag (None: the default)."""
        if self.method is not None:
            return self.method
        shorthand = self._shorthand()
        if "r" in shorthand:
            return "tome"
        return "atm" if shorthand or self.set else None

    def _shorthand(self) -> dict[str, Any]:
        values = {"alpha": self.alpha, "beta": self.beta, "theta_min": self.theta_min, "split_layer": self.split_layer,
                  "r": self.r}
        return {name: value for name, value in values.items() if value is not None}

    def _given(self) -> dict[str, Any]:
        """Parameters given by --set and the shorthands, as typed values of the method's parameters."""
        cls = method_class(self.method_name)
        specs = {p.name: p for p in cls.PARAMS}
        given: dict[str, Any] = {}
        for item in self.set or []:
            name, sep, text = item.partition("=")
            name = name.strip().replace("-", "_")
            if not sep or not name:
                raise UsageError(f"--set {item}: expected NAME=VALUE")
            if name not in specs:
                raise UsageError(f"--set {item}: {cls.NAME} has no parameter {name!r} (known: {', '.join(specs)})")
            given[name] = text.strip()
        given.update({name: str(value) for name, value in self._shorthand().items()})
        try:
            return {name: specs[name].coerce(value) for name, value in given.items()}
        except ValueError as error:
            raise UsageError(f"{cls.NAME}: {error}") from None

    def _params(self) -> MethodConfig:
        cls = method_class(self.method_name)
        try:
            return cls.from_params({**cls.defaults(), **self._given()})
        except ValueError as error:
            raise UsageError(f"--method {cls.NAME}: {error} (give it with --set NAME=VALUE)") from None

    def resolve(self, model_name: str, checkpoint_sha256: str | None = None, force: bool = False) -> MethodChoice:
        """The engine config for a model: a preset, the flags, or the model's default ATM setting."""
        if self.preset is not None:
            preset = find_preset(self.preset, model_name, force, checkpoint_sha256)
            return MethodChoice(preset.method, f"preset {preset.path}", preset.batch_size,
                                preset.provenance.precision or "fp32", preset)
        if self.method_name == NO_METHOD:
            return MethodChoice(None, "--method none")
        if self.method_name not in (None, "atm"):
            return MethodChoice(self._params(), _described(self.method_name, self._given()))
        default = default_preset_for(model_name, checkpoint_sha256)
        if default is not None and (isinstance(default.method, ATMConfig) or self.method_name is None):
            choice = MethodChoice(default.method, f"default preset {default.name}", default.batch_size,
                                  default.provenance.precision or "fp32")
        else:
            choice = MethodChoice(ATMConfig(**PAPER_DEIT_S), PAPER_DEFAULT_SOURCE)
        given = self._given() if self.method_name == "atm" else {}
        if given:
            try:
                config = ATMConfig.from_params({**choice.config.to_params(), **given})
            except ValueError as error:
                raise UsageError(f"atm: {error}") from None
            choice = MethodChoice(config, f"{choice.source} with {', '.join(f'{k}={v}' for k, v in given.items())}",
                                  choice.batch_size)
        return choice


def _described(name: str, given: dict[str, Any]) -> str:
    return f"--method {name}" + (f" with {', '.join(f'{k}={v}' for k, v in given.items())}" if given else "")


def _flags(values: dict, skip: str | None = None) -> str:
    return ", ".join(f"--{name.replace('_', '-')}" for name in values if name != skip)
