"""Best-match similarities of the unmerged model: what ATM's thresholds are compared with, block by block."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from atm_cli.engine import best_match_scores

from .models import LoadedModel, autocast


def best_match_similarities(loaded: LoadedModel, images: Tensor) -> list[np.ndarray]:
    """Per block: each image token's cosine similarity to its best partner under alternate matching (the
    split of ATM's early blocks), in the unmerged model, computed with the engine's own metric and matching."""
    model, prefix = loaded.model, loaded.model.num_prefix_tokens
    found: list[np.ndarray] = []

    def scores(attn, inputs) -> None:
        found.append(best_match_scores(attn, inputs[0], prefix).float().flatten().cpu().numpy())

    hooks = [block.attn.register_forward_pre_hook(scores) for block in model.blocks]
    try:
        with torch.inference_mode(), autocast(loaded):
            model(images.to(loaded.device))
    finally:
        for hook in hooks:
            hook.remove()
    return found
