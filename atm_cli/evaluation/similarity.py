"""Best-match similarities of the unmerged model: what ATM's thresholds are compared with, block by block."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from atm_cli.engine.attention import attention_with_sizes
from atm_cli.engine.merge import alternate_split, bipartite_match

from .models import LoadedModel, autocast


def best_match_similarities(loaded: LoadedModel, images: Tensor) -> list[np.ndarray]:
    """Per block: each image token's cosine similarity to its best partner under alternate matching (the
    split of ATM's early blocks), in the unmerged model, computed with the engine's own metric and matching."""
    model, prefix = loaded.model, loaded.model.num_prefix_tokens
    found: list[np.ndarray] = []

    def keys(attn, inputs) -> None:
        x = inputs[0]
        _, metric, _ = attention_with_sizes(attn, x, None)
        matching = bipartite_match(metric, *alternate_split(x.shape[0], x.shape[1], prefix, x.device))
        found.append(matching.best[:, matching.a_prefix:].float().flatten().cpu().numpy())

    hooks = [block.attn.register_forward_pre_hook(keys) for block in model.blocks]
    try:
        with torch.inference_mode(), autocast(loaded):
            model(images.to(loaded.device))
    finally:
        for hook in hooks:
            hook.remove()
    return found
