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
    """In every block, merge r = floor(T - T * ratio) of its T image tokens, paired by energy rank.

    Image tokens are ranked by energy (high: many close neighbours, a redundant cluster). In the first
    `unprotected_blocks` blocks (None: the first half, ceil(L / 2), as the official DeiT evaluation runs
    it) all T split alternately by rank into sets a and b, and the r a-tokens closest to a b-token merge
    into it (bipartite soft matching, nothing protected). In the other blocks only the 2r of highest
    energy split so, and each of their r a-tokens merges into its closest b-token; the low-energy,
    distinctive rest is protected. Block l (0-based, of L) uses the margin `margin * (1 - l / L)`.
    """

    NAME = "pitome"
    SUMMARY = "PiToMe: an energy score protects distinctive tokens, the rest merge in pairs (Tran et al., 2024)"
    PARAMS = (
        Param("ratio", float, "share of each block's image tokens that stays: 1 merges nothing", low=0.5, high=1.0),
        Param("margin", float, "energy margin of the first block, falling linearly with depth", low=-1.0, high=1.0),
        Param("alpha", float, "slope of the energy's exponential part, below the margin", low=0.0, low_open=True),
        Param("prop_attn", bool, "proportional attention (log-size term)"),
        Param("unprotected_blocks", int, "leading blocks that merge with no protected tokens (none: ceil(L / 2), "
                                         "the official DeiT setting; 0: every block protects)", low=0, optional=True),
    )

    ratio: float = 0.95
    margin: float = 0.75
    alpha: float = 1.0
    prop_attn: bool = False
    unprotected_blocks: int | None = None

    @classmethod
    def knob(cls, depth: int, image_tokens: int) -> Knob:
        return cls.own_knob("ratio", RATIO_STEPS, lambda step: cls(ratio=1.0 - step / (2 * RATIO_STEPS)))

    def plan(self, model: "nn.Module") -> Plan:
        from ..merge import merge_closure, weighted_reduction

        num_prefix, depth = model.num_prefix_tokens, len(model.blocks)
        margins = margin_schedule(self.margin, depth)
        unprotected = math.ceil(depth / 2) if self.unprotected_blocks is None else self.unprotected_blocks
        if unprotected > depth:
            raise ValueError(f"PiToMe unprotected_blocks={unprotected} exceeds the model's {depth} blocks")

        def step(block: BlockInput) -> Reduction | None:
            _, n_tokens, head_dim = block.metric.shape
            n_image = n_tokens - num_prefix
            r = math.floor(n_image - n_image * self.ratio)  # the official expression, rounding included
            if r <= 0:
                return None
            matching = energy_matching(block.metric, num_prefix, r, margins[block.index], self.alpha,
                                       protect=block.index >= unprotected)
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


def energy_matching(metric: "Tensor", num_prefix: int, r: int, margin: float, alpha: float,
                    protect: bool) -> "Matching":
    """PiToMe's pairs as a `Matching` for `merge_closure(matching, r, num_prefix)`.

    Image tokens are ranked by energy (descending, stable); even ranks form set a, odd ranks set b, and
    each a-token's partner is its most similar b-token. With `protect`, only the top 2r ranks split so:
    the rest (the protected tokens) join set a with no partner (-inf), so the r merges take exactly the
    a-tokens and the protected tokens stay, in energy order, between the prefix and the b-tokens. Without,
    all ranks split and the r a-tokens with the most similar partners merge (bipartite soft matching).
    """
    import torch

    from ..merge import Matching, unit_vectors

    image = unit_vectors(metric[:, num_prefix:])
    n_image = image.shape[1]
    similarity = image @ image.transpose(1, 2)
    ranked = torch.sort(energy_score(similarity, margin, alpha), dim=1, descending=True, stable=True).indices
    eligible = 2 * r if protect else n_image
    a, b, protected = ranked[:, 0:eligible:2], ranked[:, 1:eligible:2], ranked[:, eligible:]
    a_rows = similarity.gather(1, a[..., None].expand(-1, -1, n_image))
    a_to_b = a_rows.gather(2, b[:, None, :].expand(-1, a.shape[1], -1))
    best, best_j = a_to_b.max(dim=-1)
    return Matching(
        a_pos=torch.cat([a, protected], dim=1) + num_prefix,
        b_pos=b + num_prefix,
        a_prefix=0,
        b_prefix=0,
        best=torch.cat([best, best.new_full(protected.shape, -torch.inf)], dim=1),
        best_j=torch.cat([best_j, torch.zeros_like(protected)], dim=1),
    )
