"""The merging engine: patch a Vision Transformer (timm, transformers or open_clip; `backbones/`) to merge (or
prune) tokens by any registered method.

It knows nothing of files, the command line or the search; every front end drives it through
`patch`/`unpatch` (or `with merging(model, config):`) and `last_trace`. Method configs and the
registry import without torch; the names that need it load on first use.
"""
from importlib import import_module

from .methods import (CONSTANT_KNOB, METHODS, ATMConfig, EViTConfig, Knob, MCTFConfig, MethodConfig, PiToMeConfig,
                      ToMeConfig, ZeroTPruneConfig, constant_knob, method_class, method_config, ramp_knob,
                      resolve_split_layer, threshold_schedule, tome_schedule)

_LAZY = {"Trace": ".patching", "last_trace": ".patching", "patch": ".patching", "unpatch": ".patching", "merging": ".patching",
         "best_match_scores": ".merge", "backbone_of": ".backbones", "Wrapper": ".backbones"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["METHODS", "ATMConfig", "ToMeConfig", "EViTConfig", "MCTFConfig", "ZeroTPruneConfig", "PiToMeConfig",
           "MethodConfig", "Knob", "constant_knob", "ramp_knob", "CONSTANT_KNOB", "method_class",
           "method_config", "threshold_schedule", "tome_schedule", "resolve_split_layer", *_LAZY]
