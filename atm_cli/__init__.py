"""atm: training-free Adaptive Token Merging for timm Vision Transformers."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn


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
