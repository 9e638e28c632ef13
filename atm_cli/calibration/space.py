"""The settings `atm calibrate` searches: alpha, beta, theta_min on a grid, and optionally the split layer."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import optuna

from atm_cli.engine import ATMConfig
from atm_cli.engine import resolve_split_layer
from atm_cli.errors import UsageError
from atm_cli.paper import PAPER_ALPHA, PAPER_BETA, PAPER_STEP, PAPER_THETA_MIN
DIGITS = 6  # grid values are rounded to this many decimals, so 0.9450000000000001 reads 0.945


@dataclass(frozen=True)
class SearchSpace:
    alpha: tuple[float, float] = PAPER_ALPHA
    beta: tuple[float, float] = PAPER_BETA
    theta_min: tuple[float, float] = PAPER_THETA_MIN
    step: float = PAPER_STEP
    split_layer: int | None = None  # a fixed split layer (None: the engine's default, round(0.75 * depth))
    search_split_layer: bool = False  # search the split layer over 0..depth instead

    def validate(self, depth: int) -> None:
        """Refuse ranges that are empty, off the grid's scale, or that contradict each other."""
        if self.step <= 0:
            raise UsageError(f"the search step must be positive, got {self.step}")
        for name, (low, high) in (("alpha", self.alpha), ("beta", self.beta), ("theta_min", self.theta_min)):
            if low > high:
                raise UsageError(f"the {name} range {low}-{high} is empty (low above high)")
        if self.beta[0] < 0:
            raise UsageError(f"beta must not be negative (thresholds would rise with depth), got {self.beta[0]}")
        if self.theta_min[0] > self.alpha[1]:
            raise UsageError(f"the theta_min range {self.theta_min[0]}-{self.theta_min[1]} lies above the alpha range "
                             f"{self.alpha[0]}-{self.alpha[1]}: every threshold would be theta_min, so alpha and beta "
                             "would do nothing")
        if self.split_layer is not None and not 0 <= self.split_layer <= depth:
            raise UsageError(f"--split-layer must lie in 0..{depth} for this {depth}-block model, got {self.split_layer}")
        if self.split_layer is not None and self.search_split_layer:
            raise UsageError("give --split-layer or --search-split-layer, not both")

    def suggest(self, trial: optuna.Trial, depth: int) -> ATMConfig:
        def grid(name: str, bounds: tuple[float, float]) -> float:
            return round(trial.suggest_float(name, bounds[0], bounds[1], step=self.step), DIGITS)

        split = trial.suggest_int("split_layer", 0, depth) if self.search_split_layer else self.split_layer
        return ATMConfig(alpha=grid("alpha", self.alpha), beta=grid("beta", self.beta),
                         theta_min=grid("theta_min", self.theta_min), split_layer=split)

    def extremes(self) -> tuple[ATMConfig, ATMConfig]:
        """The settings that merge the most (lowest thresholds) and the least (highest thresholds)."""
        most = ATMConfig(alpha=self.alpha[0], beta=self.beta[1], theta_min=self.theta_min[0],
                         split_layer=self.split_layer)
        least = ATMConfig(alpha=self.alpha[1], beta=self.beta[0], theta_min=self.theta_min[1],
                          split_layer=self.split_layer)
        return most, least

    def trial_params(self, config: ATMConfig, depth: int) -> dict[str, float | int] | None:
        """The study parameters that reproduce `config`, or None when it lies outside this space."""
        params: dict[str, float | int] = {}
        for name, (low, high) in (("alpha", self.alpha), ("beta", self.beta), ("theta_min", self.theta_min)):
            value = getattr(config, name)
            steps = (value - low) / self.step
            if not low - 1e-9 <= value <= high + 1e-9 or abs(steps - round(steps)) > 1e-6:
                return None
            params[name] = value
        if self.search_split_layer:
            params["split_layer"] = resolve_split_layer(config, depth)
        elif config.split_layer != self.split_layer:
            return None
        return params

    def to_dict(self) -> dict:
        return asdict(self)
