"""Weights files as their authors publish them, for timm's pretrained loader."""
from __future__ import annotations

from torch import Tensor, nn
from timm.models import clean_state_dict

# Where training scripts built on timm keep the weights inside a checkpoint, the EMA copy first
# (the copy timm's own `load_checkpoint` prefers, and the one the T2T-ViT authors evaluate).
CHECKPOINT_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")


def unwrap_checkpoint(checkpoint: dict, model: nn.Module | None = None) -> dict[str, Tensor]:
    """The state dict inside a downloaded checkpoint (a `pretrained_filter_fn`; a plain state dict passes)."""
    key = next((k for k in CHECKPOINT_KEYS if isinstance(checkpoint.get(k), dict)), None)
    return clean_state_dict(checkpoint[key] if key else checkpoint)
