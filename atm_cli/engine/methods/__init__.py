"""The method registry: every merging or pruning method the engine runs, by name.

Presets, CLI flags, the search, stress, compare and visualize read methods from here only, so
adding a method is one module in this package plus its line in `_ALL`.
"""
from __future__ import annotations

from typing import Any

from .atm import CONSTANT_KNOB, ATMConfig, constant_knob, resolve_split_layer, threshold_schedule
from .base import BlockInput, Deferred, Knob, MethodConfig, Padded, Param, Plan, Reduction
from .evit import EViTConfig
from .mctf import MCTFConfig
from .pitome import PiToMeConfig
from .tome import ToMeConfig, ramp_knob, tome_schedule
from .zero_tprune import ZeroTPruneConfig

_ALL: tuple[type[MethodConfig], ...] = (ATMConfig, ToMeConfig, EViTConfig, MCTFConfig, ZeroTPruneConfig, PiToMeConfig)
METHODS: dict[str, type[MethodConfig]] = {cls.NAME: cls for cls in _ALL}


def method_class(name: str) -> type[MethodConfig]:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r} (known: {', '.join(METHODS)})") from None


def method_config(name: str, params: dict[str, Any]) -> MethodConfig:
    """The config of method `name` from plain values (a preset's params, `--set` pairs); ValueError if invalid."""
    return method_class(name).from_params(params)


__all__ = ["METHODS", "method_class", "method_config", "MethodConfig", "Knob", "constant_knob", "ramp_knob", "CONSTANT_KNOB", "Param", "Plan", "BlockInput", "Reduction", "Deferred", "Padded",
           "ATMConfig", "ToMeConfig", "EViTConfig", "MCTFConfig", "ZeroTPruneConfig", "PiToMeConfig",
           "threshold_schedule", "tome_schedule", "resolve_split_layer"]
