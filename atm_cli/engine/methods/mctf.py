"""MCTF (Lee et al., CVPR 2024), training-free: multi-criteria bidirectional fusion with one-step-ahead attention.

In each fusing block, the block's own attention on the tokens it receives (one step ahead of the previous
block's) scores them; the tokens are fused before that attention, whose probabilities are fused with them
instead of being computed again. The choices the paper leaves open are in docs/engine-contract.md ("MCTF").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .base import BlockInput, Knob, MethodConfig, Param, Plan, Reduction, block_indices

if TYPE_CHECKING:
    from torch import Tensor, nn

    from ..merge import SlotMerge

MIN_TOKENS = 10  # the official code never fuses below 10 tokens (prefix included)
TEMPERATURE = dict(low=0.0)  # 0 turns a criterion off, as in the official code


@dataclass(frozen=True)
class MCTFConfig(MethodConfig):
    """Fuse r tokens in each of `blocks`, matched by similarity, informativeness and size."""

    NAME = "mctf"
    SUMMARY = "MCTF: r tokens fused per block by similarity, informativeness and size, one step ahead (Lee et al., 2024)"
    PARAMS = (
        Param("r", int, "tokens fused per block", low=0),
        Param("tau_sim", float, "temperature of the similarity criterion (0: off)", **TEMPERATURE),
        Param("tau_info", float, "temperature of the informativeness criterion (0: off)", **TEMPERATURE),
        Param("tau_size", float, "temperature of the size criterion (0: off)", **TEMPERATURE),
        Param("bidirectional", bool, "match a to b, then b to the unfused a (off: a to b only)"),
        Param("attention_weighted", bool, "fuse by attention received times size (off: by size only)"),
        Param("prop_attn", bool, "proportional attention (log-size term)"),
        Param("blocks", "ints", "0-based blocks that fuse (none: every block but the first)", low=0, optional=True),
    )

    r: int = 16
    tau_sim: float = 1.0
    tau_info: float = 20.0
    tau_size: float = 40.0
    bidirectional: bool = True
    attention_weighted: bool = True
    prop_attn: bool = True
    blocks: int | tuple[int, ...] | None = None

    @classmethod
    def knob(cls, depth: int, image_tokens: int) -> Knob:
        return cls.own_knob("r", image_tokens // 2, lambda r: cls(r=r))

    def plan(self, model: "nn.Module") -> Plan:
        import torch

        from ..attention import head_probabilities
        from ..merge import alternate_split, merge_weighted

        depth, num_prefix = len(model.blocks), model.num_prefix_tokens
        blocks = block_indices("MCTF", range(1, depth) if self.blocks is None else self.blocks, depth)

        def step(block: BlockInput) -> Reduction | None:
            batch, n_tokens, width = block.x.shape
            r = min(self.r, n_tokens - MIN_TOKENS, (n_tokens - num_prefix) // 2)
            if block.index not in blocks or r <= 0:
                return None
            layer = model.blocks[block.index]
            attention = head_probabilities(layer.attn, layer.norm1(block.x),
                                           block.size if self.prop_attn else None).float()
            received = attention.mean(dim=(1, 2))  # (B, N): the attention each token receives
            size = torch.ones_like(received[..., None]) if block.size is None else block.size.float()
            a_pos, b_pos, a_prefix, b_prefix = alternate_split(batch, n_tokens, num_prefix, block.x.device)
            a_pos, b_pos = a_pos[:, a_prefix:], b_pos[:, b_prefix:]  # prefix tokens are neither fused nor fused into
            scores = multi_criteria_scores(block.x, received, size[..., 0], a_pos, b_pos, self)
            merge = bidirectional_merge(scores, a_pos, b_pos, r, num_prefix, self.bidirectional)
            weight = received[..., None] * size if self.attention_weighted else size
            x, merged_weight = merge_weighted(merge, block.x, weight)
            kept, qk_width = n_tokens - r, 2 * layer.attn.num_heads * layer.attn.head_dim
            # The one-step-ahead attention on all N tokens (norm1, q and k, q k^T) and the similarities, less
            # the q, k and q k^T of the N - r fused tokens, which the block's count holds but nothing computes.
            ahead = 5 * n_tokens * width + qk_width * width * n_tokens + qk_width // 2 * n_tokens ** 2
            saved = qk_width * width * kept + qk_width // 2 * kept ** 2
            similarity = a_pos.shape[1] * b_pos.shape[1] * width if self.tau_sim else 0
            macs = ahead - saved + similarity
            return Reduction(x, merge(size), merge, macs, fused_attention(merge, attention, weight, merged_weight))

        return Plan(step, before_attention=blocks)


def multi_criteria_scores(tokens: "Tensor", received: "Tensor", size: "Tensor", a_pos: "Tensor", b_pos: "Tensor",
                          config: MCTFConfig) -> "Tensor":
    """(B, |a|, |b|) attraction of each a-token to each b-token: the product of the three criteria, each a
    pair product raised to 1 / tau (1 when tau is 0).

    Similarity: (cos + 1) / 2 of the tokens. Informativeness: 1 / attention received, and size: 1 / size,
    so that rarely attended and small tokens attract, each divided by its largest value in the image (which
    scales all of the image's pairs alike, so it decides nothing). Nothing spans the batch: each image is
    matched as it would be alone, as in the official code.
    """
    import torch

    from ..merge import rows, unit_vectors

    def pairs(per_token: "Tensor", tau: float) -> "Tensor":
        # (p_a p_b)^(1/tau) as p_a^(1/tau) p_b^(1/tau): the power on N tokens rather than on |a| |b| pairs
        per_token = (per_token / per_token.amax(dim=1, keepdim=True)) ** (1.0 / tau)
        return per_token.gather(1, a_pos)[:, :, None] * per_token.gather(1, b_pos)[:, None, :]

    if config.tau_sim:
        unit = unit_vectors(tokens)
        scores = ((rows(unit, a_pos) @ rows(unit, b_pos).transpose(1, 2) + 1.0) / 2.0) ** (1.0 / config.tau_sim)
    else:
        scores = torch.ones(a_pos.shape[0], a_pos.shape[1], b_pos.shape[1], device=tokens.device)
    if config.tau_info:
        scores = scores * pairs(1.0 / received, config.tau_info)
    if config.tau_size:
        scores = scores * pairs(1.0 / size, config.tau_size)
    return scores


def bidirectional_merge(scores: "Tensor", a_pos: "Tensor", b_pos: "Tensor", r: int, num_prefix: int,
                        bidirectional: bool) -> "SlotMerge":
    """The sum-merge of MCTF's matching, for any additive per-token map (B, N, C) -> (B, N - r, C).

    a-tokens (positions `a_pos`) fuse into their most attracted b-token: the r // 2 most attracted do
    (all r one way). Then every b-token, with what it received, ranks by its best attraction to the
    a-tokens left, and the r - r // 2 most attracted fuse into theirs. The result holds the prefix
    tokens, the a-tokens left in sequence order, then the b-tokens left in that second ranking (b order
    one way), which is the official code's order and decides the next block's split.
    """
    import torch

    from ..merge import SlotMerge, first_positions

    batch, n_tokens = scores.shape[0], num_prefix + a_pos.shape[1] + b_pos.shape[1]
    to_b, to_a = (r // 2, r - r // 2) if bidirectional else (r, 0)
    best, best_b = scores.max(dim=-1)
    ranked = torch.sort(best, dim=1, descending=True, stable=True).indices
    src, a_left = ranked[:, :to_b], torch.sort(ranked[:, to_b:], dim=1).values
    moves = [(a_pos.gather(1, src), b_pos.gather(1, best_b.gather(1, src)))]  # (sources, destinations) by position
    b_left = b_pos
    if bidirectional:
        best, best_a = scores.gather(1, a_left[..., None].expand(-1, -1, scores.shape[-1])).max(dim=1)
        ranked = torch.sort(best, dim=1, descending=True, stable=True).indices
        src, b_left = ranked[:, :to_a], b_pos.gather(1, ranked[:, to_a:])
        moves.append((b_pos.gather(1, src), a_pos.gather(1, a_left.gather(1, best_a.gather(1, src)))))
    kept = torch.cat([first_positions(batch, num_prefix, scores.device), a_pos.gather(1, a_left), b_left], dim=1)
    slots = torch.empty(batch, n_tokens, dtype=torch.long, device=scores.device)
    slots.scatter_(1, kept, first_positions(batch, kept.shape[1], scores.device))
    for src, dst in reversed(moves):  # a b-token that moves on takes what it received along: its slot first
        slots.scatter_(1, src, slots.gather(1, dst))
    return SlotMerge(slots, kept.shape[1])


def fused_attention(merge: "SlotMerge", attention: "Tensor", weight: "Tensor", merged_weight: "Tensor") -> "Tensor":
    """The one-step-ahead attention (B, H, N, N) on the fused tokens (B, H, N', N'): fused keys add their
    probabilities (each row still sums to 1); a fused query's row is the `weight`-weighted mean of its members'
    (`merged_weight`: `merge(weight)`, which the tokens' own merge has computed)."""
    keys = merge(attention, dim=-1)
    return merge(keys * weight[:, None], dim=-2) / merged_weight[:, None]
