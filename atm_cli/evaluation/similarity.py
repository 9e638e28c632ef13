"""Best-match similarities of the unmerged model: what ATM's thresholds are compared with, block by block."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from atm_cli.engine import backbone_of, best_match_scores

from .models import LoadedModel, autocast


def best_match_similarities(loaded: LoadedModel, images: Tensor) -> list[np.ndarray]:
    """Per block: each image token's cosine similarity to its best partner under alternate matching (the
    split of ATM's early blocks), in the unmerged model, computed with the engine's own metric and matching."""
    backbone = backbone_of(loaded.model)
    found: list[np.ndarray] = []

    def scores_of(attn):  # norm1's output is what the block's attention reads, in any model family
        def scores(norm, inputs, x) -> None:
            found.append(best_match_scores(attn, x, backbone.num_prefix_tokens).float().flatten().cpu().numpy())
        return scores

    hooks = [block.norm1.register_forward_hook(scores_of(block.attn)) for block in backbone.blocks]
    try:
        with torch.inference_mode(), autocast(loaded):
            loaded.model(images.to(loaded.device))
    finally:
        for hook in hooks:
            hook.remove()
    return found
