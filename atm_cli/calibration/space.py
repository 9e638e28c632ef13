"""The settings `atm calibrate` searches: alpha, beta, theta_min on a grid (and optionally the split layer),
with ranges measured from the model's own similarities, or the paper's sweep.

Similarities differ per model (token count, patch size, training), so fixed ranges fit only the
models they were found on. `measured_space` derives them from the unmerged model's best-match
similarities on the first batch: the least-merging setting (every threshold at the top of the
range) lets at most half a token per image and block through on average, so ATM's batch r is 0
(it merges nothing); the most-merging one (every threshold at the bottom) merges three quarters
of the tokens that can merge in every block, far below any budget. beta reaches from 0 (the
constant thresholds, ATM's own family) to the fall that takes alpha's top to the bottom by the
last block.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import optuna

from atm_cli.engine import ATMConfig
from atm_cli.engine import resolve_split_layer
from atm_cli.errors import UsageError, param
from atm_cli.paper import PAPER_ALPHA, PAPER_BETA, PAPER_STEP, PAPER_THETA_MIN

PAPER_ORIGIN = "the paper's sweep (Appendix D)"
DIGITS = 6  # grid values are rounded to this many decimals, so 0.9450000000000001 reads 0.945
LOW_QUANTILE = 0.25  # the bottom of the measured range: 75% of the mergeable tokens merge in every block
GRID_POINTS = 200  # about this many grid values across a measured threshold range (the step rounds down to 1, 2, 5)
BETA_POINTS = 50


@dataclass(frozen=True)
class SearchSpace:
    alpha: tuple[float, float] = PAPER_ALPHA
    beta: tuple[float, float] = PAPER_BETA
    theta_min: tuple[float, float] = PAPER_THETA_MIN
    step: float = PAPER_STEP  # grid step of alpha and theta_min
    beta_step: float = PAPER_STEP
    split_layer: int | None = None  # a fixed split layer (None: the engine's default, round(0.75 * depth))
    search_split_layer: bool = False  # search the split layer over 0..depth instead
    # Where the ranges came from, for the output and the preset's provenance (None: every range was given) ...
    origin: str | None = PAPER_ORIGIN
    given: tuple[str, ...] = ()  # ... and the parameters given in place of its ranges (alpha_range, ..., step)

    def validate(self, depth: int) -> None:
        """Refuse ranges that are empty, off the grid's scale, or that contradict each other."""
        if self.step <= 0 or self.beta_step <= 0:
            raise UsageError(f"the search step must be positive, got {min(self.step, self.beta_step)}")
        for name, (low, high) in (("alpha", self.alpha), ("beta", self.beta), ("theta_min", self.theta_min)):
            if low > high:
                raise UsageError(f"the {name} range {low}-{high} is empty (low above high)")
        for name, (low, high) in (("alpha", self.alpha), ("theta_min", self.theta_min)):
            if low < -1 or high > 1:
                raise UsageError(f"the {name} range {low}-{high} leaves [-1, 1], where cosine similarities lie")
        if self.beta[0] < 0:
            raise UsageError(f"beta must not be negative (thresholds would rise with depth), got {self.beta[0]}")
        if self.theta_min[0] > self.alpha[1]:
            raise UsageError(f"the theta_min range {self.theta_min[0]}-{self.theta_min[1]} lies above the alpha range "
                             f"{self.alpha[0]}-{self.alpha[1]}: every threshold would be theta_min, so alpha and beta "
                             "would do nothing")
        if self.split_layer is not None and not 0 <= self.split_layer <= depth:
            raise UsageError(f"{param('split_layer')} must lie in 0..{depth} for this {depth}-block model, got {self.split_layer}")
        if self.split_layer is not None and self.search_split_layer:
            raise UsageError(f"give {param('split_layer')} or {param('search_split_layer')}, not both")

    def suggest(self, trial: optuna.Trial, depth: int) -> ATMConfig:
        def grid(name: str, bounds: tuple[float, float], step: float) -> float:
            return round(trial.suggest_float(name, bounds[0], bounds[1], step=step), DIGITS)

        params: dict = {"alpha": grid("alpha", self.alpha, self.step), "beta": grid("beta", self.beta, self.beta_step),
                        "theta_min": grid("theta_min", self.theta_min, self.step)}
        if self.search_split_layer:
            params["split_layer"] = trial.suggest_int("split_layer", 0, depth)
        return self.config(params)

    def config(self, params: dict) -> ATMConfig:
        """The engine config of a trial's parameters (the split layer from the space when not searched)."""
        return ATMConfig.from_params({"split_layer": self.split_layer, **params})

    def extremes(self) -> tuple[ATMConfig, ATMConfig]:
        """The settings that merge the most (lowest thresholds) and the least (highest thresholds)."""
        most = ATMConfig(alpha=self.alpha[0], beta=self.beta[1], theta_min=self.theta_min[0],
                         split_layer=self.split_layer)
        least = ATMConfig(alpha=self.alpha[1], beta=self.beta[0], theta_min=self.theta_min[1],
                          split_layer=self.split_layer)
        return most, least

    def threshold_grid(self) -> list[float]:
        """theta_min's grid values from the top of its range down (the constant-threshold ladder)."""
        n = math.floor((self.theta_min[1] - self.theta_min[0]) / self.step + 1e-9)
        return [round(self.theta_min[0] + i * self.step, DIGITS) for i in range(n, -1, -1)]

    def constant(self, threshold: float) -> ATMConfig:
        return ATMConfig.constant(threshold, split_layer=self.split_layer)

    def constants(self, depth: int) -> list[float]:
        """The constant thresholds in the space (alpha = theta_min = t, beta = 0), from the least merging down."""
        return [t for t in self.threshold_grid() if self.trial_params(self.constant(t), depth)]

    def trial_params(self, config: ATMConfig, depth: int) -> dict[str, float | int] | None:
        """The study parameters that reproduce `config`, or None when it lies outside this space."""
        values = config.to_params()
        params: dict[str, float | int] = {}
        for name, (low, high), step in (("alpha", self.alpha, self.step), ("beta", self.beta, self.beta_step),
                                        ("theta_min", self.theta_min, self.step)):
            value = values[name]
            steps = (value - low) / step
            if not low - 1e-9 <= value <= high + 1e-9 or abs(steps - round(steps)) > 1e-6:
                return None
            params[name] = value
        if self.search_split_layer:
            params["split_layer"] = resolve_split_layer(config, depth)
        elif values["split_layer"] != self.split_layer:
            return None
        return params

    def overridden(self, alpha: tuple[float, float] | None = None, beta: tuple[float, float] | None = None,
                   theta_min: tuple[float, float] | None = None, step: float | None = None) -> SearchSpace:
        """This space with the ranges given in place of its own, and which were given (`given`)."""
        given = {name: value for name, value in (("alpha", alpha), ("beta", beta), ("theta_min", theta_min))
                 if value is not None}
        if not given and step is None:
            return self
        everything = len(given) == 3 and step is not None
        return replace(self, **given, **({"step": step, "beta_step": step} if step else {}),
                       given=tuple(f"{name}_range" for name in given) + (("step",) if step else ()),
                       origin=None if everything else self.origin)

    def to_dict(self) -> dict:
        record = asdict(self)
        if not self.given:  # as spaces were recorded before `given` was (their studies resume)
            del record["given"]
        return record


def nice_step(width: float, points: int) -> float:
    """The largest step of the form 1, 2 or 5 times a power of ten giving at least `points` values over `width`."""
    raw = width / points
    power = 10.0 ** math.floor(math.log10(raw))
    return round(max(m * power for m in (1, 2, 5) if m * power <= raw * (1 + 1e-9)), 12)


def measured_space(similarities: Sequence[np.ndarray], n_images: int, mergeable: int, depth: int,
                   split_layer: int | None = None, search_split_layer: bool = False) -> SearchSpace:
    """Ranges from each block's best-match similarities on `n_images` images (`mergeable` tokens per image
    can merge in a block): see the module notes."""
    top_quantile = 1.0 - 0.5 / mergeable  # above it, half a token per image on average: r = 0
    high = max(float(np.quantile(s, top_quantile)) for s in similarities)
    low = min(float(np.quantile(s, LOW_QUANTILE)) for s in similarities)
    step = nice_step(max(high - low, 1e-3), GRID_POINTS)
    high = min(1.0, round(step * math.ceil(high / step - 1e-9), DIGITS))
    low = max(-1.0, round(step * math.floor(low / step + 1e-9), DIGITS))
    beta_high = math.log(1.0 + high - low) / max(depth - 1, 1)
    beta_step = nice_step(beta_high, BETA_POINTS)
    beta_high = round(beta_step * math.ceil(beta_high / beta_step - 1e-9), DIGITS)
    origin = (f"measured: best-match similarities of the unmerged model on {n_images} images (top: the "
              f"{100 * top_quantile:.1f}th percentile, the highest of the blocks'; bottom: the "
              f"{100 * LOW_QUANTILE:g}th, the lowest)")
    return SearchSpace(alpha=(low, high), beta=(0.0, beta_high), theta_min=(low, high), step=step,
                       beta_step=beta_step, split_layer=split_layer, search_split_layer=search_split_layer,
                       origin=origin)
