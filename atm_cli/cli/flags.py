"""The one table from the library's parameter names (as `errors.param` marks them in messages) to the
command line's flags: an error the library raises names `batch_size`, the command line `--batch-size`."""
from __future__ import annotations

FLAGS = {
    "batch_size": "--batch-size",
    "checkpoint": "--checkpoint",
    "class_map": "--class-map",
    "compile": "--compile",
    "device": "--device",
    "force": "--force",
    "limit": "--limit",
    "model": "--model",
    "no_pretrained": "--no-pretrained",
    "precision": "--precision",
    "search_split_layer": "--search-split-layer",
    "split_layer": "--split-layer",
    "unsafe_checkpoint": "--unsafe-checkpoint",
    "workers": "--workers",
}


def flag_of(name: str) -> str:
    return FLAGS[name]
