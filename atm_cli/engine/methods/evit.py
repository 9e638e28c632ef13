"""EViT (Liang et al., ICLR 2022), training-free: keep the image tokens the class token attends to most, fuse the rest.

The choices the paper leaves open are in docs/engine-contract.md ("EViT").
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .base import BlockInput, Knob, MethodConfig, Param, Plan, Reduction, block_indices

if TYPE_CHECKING:
    from torch import Tensor, nn

KEEP_RATE_STEP = 0.05  # the knob's step: keep rates 1.0, 0.95, ..., 0.05


@dataclass(frozen=True)
class EViTConfig(MethodConfig):
    """In each of `blocks`, keep ceil(keep_rate * M) of the M image tokens, ranked by class-token attention."""

    NAME = "evit"
    SUMMARY = "EViT: keep the tokens the class token attends to most, fuse the rest into one (Liang et al., 2022)"
    PARAMS = (
        Param("keep_rate", float, "share of image tokens kept in each reducing block", low=0.0, high=1.0, low_open=True),
        Param("blocks", "ints", "0-based blocks that reduce (none: at 1/4, 1/2 and 3/4 of the depth)", low=0,
              optional=True),
        Param("fuse", bool, "fuse the dropped tokens into one, weighted by class attention (off: drop them)"),
    )

    keep_rate: float = 0.7
    blocks: int | tuple[int, ...] | None = None
    fuse: bool = True

    @classmethod
    def knob(cls, depth: int, image_tokens: int) -> Knob:
        steps = round(1.0 / KEEP_RATE_STEP) - 1
        return cls.own_knob("keep_rate", steps, lambda step: cls(keep_rate=round(1.0 - KEEP_RATE_STEP * step, 4)))

    def plan(self, model: "nn.Module") -> Plan:
        if not model.has_class_token:
            raise ValueError(f"EViT ranks tokens by the class token's attention: {model.name} has no class token")
        depth, num_prefix = len(model.blocks), model.num_prefix_tokens
        paper_blocks = (depth // 4, depth // 2, 3 * depth // 4)  # 3, 6, 9 of 12
        blocks = block_indices("EViT", paper_blocks if self.blocks is None else self.blocks, depth)

        def step(block: BlockInput) -> Reduction | None:
            if block.index not in blocks:
                return None
            n_image = block.x.shape[1] - num_prefix
            keep = math.ceil(self.keep_rate * n_image)  # EViT's count
            if keep >= n_image:
                return None
            class_attention = block.attention[:, 0, num_prefix:].float()  # timm puts the class token first
            reduce = keep_and_fuse(class_attention, keep, num_prefix, self.fuse)
            fused_macs = (n_image - keep) * block.x.shape[-1] if self.fuse else 0
            return Reduction(reduce(block.x), None, reduce, fused_macs)

        return Plan(step, attention_blocks=blocks)


def keep_and_fuse(class_attention: "Tensor", keep: int, num_prefix: int, fuse: bool) -> Callable[["Tensor"], "Tensor"]:
    """The closure of one EViT reduction, for any additive per-token map (B, N, C) -> (B, num_prefix + keep + fuse, C).

    `class_attention` (B, M) is the class token's head-averaged attention on the M image tokens. The result
    holds the prefix tokens, the `keep` most attended image tokens in sequence order, then (with `fuse`) one
    token: the sum of the dropped tokens weighted by their class attention (EViT's Eq., not normalised).
    """
    import torch

    from ..merge import first_positions, keep_tokens

    ranked = torch.sort(class_attention, dim=1, descending=True, stable=True).indices + num_prefix
    prefix = first_positions(class_attention.shape[0], num_prefix, ranked.device)
    kept = keep_tokens(torch.cat([prefix, torch.sort(ranked[:, :keep], dim=1).values], dim=1))
    if not fuse:
        return kept
    dropped = keep_tokens(ranked[:, keep:])
    weights = class_attention.gather(1, ranked[:, keep:] - num_prefix)[:, None, :]  # (B, 1, M - keep)

    def keep_and_fuse_map(t: "Tensor") -> "Tensor":
        fused = (weights @ dropped(t).float()).to(t.dtype)  # a product, so torch's FLOP counter sees it too
        return torch.cat([kept(t), fused], dim=1)

    return keep_and_fuse_map
