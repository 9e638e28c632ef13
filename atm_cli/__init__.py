"""atm: training-free Adaptive Token Merging for timm Vision Transformers."""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn


class _RegisterModelsWithTimm(importlib.abc.MetaPathFinder):
    """Registers atm's models with timm (`atm_cli.models`) right after timm itself is imported.

    `import atm_cli` promises `timm.create_model("atm_demo_vit_tiny_patch4_32")`, but importing timm
    here would cost every `atm --help` seconds of torch start-up: so the registration waits for timm.
    """

    def find_spec(self, fullname, path, target=None):
        if fullname != "timm":
            return None
        sys.meta_path.remove(self)  # once; find_spec below then asks the other finders
        spec = importlib.util.find_spec("timm")
        if spec is not None and spec.loader is not None:
            run_timm = spec.loader.exec_module

            def exec_module(module) -> None:
                run_timm(module)
                importlib.import_module("atm_cli.models")

            spec.loader.exec_module = exec_module
        return spec


if "timm" in sys.modules:
    importlib.import_module("atm_cli.models")
else:
    sys.meta_path.insert(0, _RegisterModelsWithTimm())


def patch_from_preset(model: nn.Module, path_or_name: str | Path, force: bool = False) -> nn.Module:
    """Make a timm ViT merge tokens as a preset says: `atm_cli.patch_from_preset(model, "deit-s-paper-3.23")`.

    `path_or_name` is a preset file or a bundled preset's name; a preset made for another
    architecture is refused unless `force`.
    """
    # Imported here so that `import atm_cli` (e.g. for its errors) does not load torch.
    from .engine import patch
    from .presets import find_preset

    architecture = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    return patch(model, find_preset(path_or_name, model_name=architecture, force=force).method)
