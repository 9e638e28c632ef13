"""PiToMe (Tran et al., NeurIPS 2024): an energy score protects distinctive tokens, the rest merge in pairs.

The choices the paper leaves open, and what the engine does with them: docs/engine-contract.md, "PiToMe".
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .base import BlockInput, Knob, MethodConfig, Param, Plan, Reduction

if TYPE_CHECKING:
    from torch import Tensor, nn

    from ..merge import Matching

# The knob moves the kept ratio in steps of 1/40, from 1 (nothing merges) down to 0.5 (half of each block's tokens).
RATIO_STEPS = 20


@dataclass(frozen=True)
class PiToMeConfig(MethodConfig):
    """In every block, merge r = floor(T - T * ratio) of its T image tokens.

    The 2r tokens of highest energy (those in large clusters of similar tokens) split alternately, by
    energy rank, into r sources and r destinations; each source merges into its most similar
    destination. Block l (0-based, of L) uses the margin `margin * (1 - l / L)`.
    """

    NAME = "pitome"
    SUMMARY = "PiToMe: an energy score protects distinctive tokens, the rest merge in pairs (Tran et al., 2024)"
    PARAMS = (
        Param("ratio", float, "share of each block's image tokens that stays: 1 merges nothing", low=0.5, high=1.0),
        Param("margin", float, "energy margin of the first block, falling linearly with depth", low=-1.0, high=1.0),
        Param("alpha", float, "slope of the energy's exponential part, below the margin", low=0.0, low_open=True),
        Param("prop_attn", bool, "proportional attention (log-size term)"),
    )

    ratio: float = 0.95
    margin: float = 0.9
    alpha: float = 1.0
    prop_attn: bool = True

    @classmethod
    def knob(cls, depth: int, image_tokens: int) -> Knob:
        return Knob("ratio", RATIO_STEPS, lambda step: cls(ratio=1.0 - step / (2 * RATIO_STEPS)))

    def plan(self, model: "nn.Module") -> Plan:
        from ..merge import merge_closure, weighted_reduction

        num_prefix = model.num_prefix_tokens
        margins = margin_schedule(self.margin, len(model.blocks))

        def step(block: BlockInput) -> Reduction | None:
            _, n_tokens, head_dim = block.metric.shape
            n_image = n_tokens - num_prefix
            r = math.floor(n_image - n_image * self.ratio)  # the official expression, rounding included
            if r <= 0:
                return None
            matching = energy_matching(block.metric, num_prefix, r, margins[block.index], self.alpha)
            return weighted_reduction(merge_closure(matching, r, num_prefix), block.x, block.size,
                                      n_image * n_image * head_dim)

        return Plan(step)


def margin_schedule(margin: float, depth: int) -> list[float]:
    """The margin of each block: m_l = margin - margin * l / L (l 0-based), loose early and strict late."""
    return [margin - margin * index / depth for index in range(depth)]


def energy_score(similarity: "Tensor", margin: float, alpha: float) -> "Tensor":
    """Each token's energy (B, T) from its cosine similarities (B, T, T): the mean over all tokens (itself
    included) of ELU(cos - margin), i.e. cos - margin above the margin, alpha * (exp(cos - margin) - 1) below.
    High energy: many close neighbours (a large, redundant cluster); low: a distinctive token."""
    import torch.nn.functional as F

    return F.elu(similarity - margin, alpha=alpha).mean(dim=-1)


def energy_matching(metric: "Tensor", num_prefix: int, r: int, margin: float, alpha: float) -> "Matching":
    """PiToMe's pairs as a `Matching` for `merge_closure(matching, r, num_prefix)`.

    Image tokens are ranked by energy (descending, stable); of the top 2r, even ranks form set a and odd
    ranks set b, and each a-token's partner is its most similar b-token. The protected tokens (the rest)
    join set a with no partner (-inf), so the r merges take exactly the a-tokens and the protected tokens
    stay, in energy order, between the prefix and the b-tokens, the order of the official code.
    """
    import torch
    import torch.nn.functional as F

    from ..merge import NORM_EPS, Matching

    image = F.normalize(metric[:, num_prefix:].float(), dim=-1, eps=NORM_EPS)
    batch, n_image, _ = image.shape
    similarity = image @ image.transpose(1, 2)
    ranked = torch.sort(energy_score(similarity, margin, alpha), dim=1, descending=True, stable=True).indices
    a, b, protected = ranked[:, 0:2 * r:2], ranked[:, 1:2 * r:2], ranked[:, 2 * r:]
    a_to_b = similarity.gather(1, a[..., None].expand(-1, -1, n_image)).gather(2, b[:, None, :].expand(-1, r, -1))
    best, best_j = a_to_b.max(dim=-1)
    return Matching(
        a_pos=torch.cat([a, protected], dim=1) + num_prefix,
        b_pos=b + num_prefix,
        a_prefix=0,
        b_prefix=0,
        best=torch.cat([best, best.new_full(protected.shape, -torch.inf)], dim=1),
        best_j=torch.cat([best_j, torch.zeros_like(protected)], dim=1),
    )
