"""The one table from the library's parameter names (as `errors.param` marks them in messages, and
`SearchSpace.given` lists the ranges given) to the command line's flags: an error the library raises names
`batch_size`, the command line `--batch-size`."""
from __future__ import annotations

FLAGS = {
    "alpha_range": "--alpha-range",
    "batch_size": "--batch-size",
    "beta_range": "--beta-range",
    "by": "--by",
    "checkpoint": "--checkpoint",
    "class_map": "--class-map",
    "compile": "--compile",
    "data": "--data",
    "device": "--device",
    "force": "--force",
    "limit": "--limit",
    "min_agreement": "--min-agreement",
    "model": "--model",
    "n_trials": "--n-trials",
    "no_drop": "--no-drop",
    "no_pretrained": "--no-pretrained",
    "precision": "--precision",
    "rule": "--rule",
    "search_split_layer": "--search-split-layer",
    "split_layer": "--split-layer",
    "step": "--step",
    "storage": "--storage",
    "study_name": "--study-name",
    "target_gflops": "--target-gflops",
    "target_latency_ms": "--target-latency-ms",
    "target_reduction": "--target-reduction",
    "target_speedup": "--target-speedup",
    "theta_min_range": "--theta-min-range",
    "timeout": "--timeout",
    "tolerance": "--tolerance",
    "unsafe_checkpoint": "--unsafe-checkpoint",
    "workers": "--workers",
}


def flag_of(name: str) -> str:
    return FLAGS[name]
