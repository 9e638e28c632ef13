"""Zero-TPrune (Wang et al., CVPR 2024): rank tokens by a PageRank over each head's attention graph, then
prune the tokens most similar to a more important one (S-stage) and the least important ones (I-stage).

No official code exists: every choice the paper leaves open is in docs/engine-contract.md, "Zero-TPrune".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .base import BlockInput, Knob, MethodConfig, Param, Plan, Reduction

if TYPE_CHECKING:
    from torch import Tensor, nn

# The paper's WPR iterations (30-50, 5-10 and 1 in the first three, middle and last three blocks): the lower ends.
EARLY_ITERATIONS, MIDDLE_ITERATIONS, LATE_ITERATIONS = 30, 5, 1


@dataclass(frozen=True)
class ZeroTPruneConfig(MethodConfig):
    """Prune r image tokens per block: floor(similarity_share * r + 1/2) by the S-stage, the rest by the I-stage.

    I'-stage: importance = root mean square over heads of each head's weighted PageRank. S-stage: the
    less important half of the image tokens (by importance) loses the tokens closest (cosine of the keys)
    to a token of the more important half. I-stage: of the tokens left, the least important are pruned.
    """

    NAME = "zero-tprune"
    SUMMARY = "Zero-TPrune: PageRank importance over the attention graph, then similarity pruning (Wang et al., 2024)"
    PARAMS = (
        Param("r", "ints", "image tokens pruned per block: one int, or a comma list per block", low=0),
        Param("similarity_share", float, "share of r pruned as near-duplicates (S-stage); the rest least important",
              low=0.0, high=1.0),
        Param("iterations", int, "PageRank iterations in every block (none: 30, 5, 1 in early, middle, late blocks)",
              low=1, optional=True),
    )

    r: int | tuple[int, ...] = 11  # DeiT-S: 4.61 -> 3.02 GFLOPs, the 34.7% cut the paper reports
    similarity_share: float = 0.5
    iterations: int | None = None

    @classmethod
    def knob(cls, depth: int, image_tokens: int) -> Knob:
        # Each block prunes at most half of its image tokens (the S-stage's source half), as ToMe caps r.
        return cls.own_knob("r", image_tokens // 2, lambda r: cls(r=r))

    def plan(self, model: "nn.Module") -> Plan:
        from ..merge import keep_tokens
        from .tome import ToMeConfig, tome_schedule

        depth, num_prefix = len(model.blocks), model.num_prefix_tokens
        per_block = tome_schedule(ToMeConfig(r=self.r), depth)  # ToMe's reading of r: an int, or one per block
        iterations = iteration_schedule(self.iterations, depth)

        def step(block: BlockInput) -> Reduction | None:
            _, n_tokens, head_dim = block.metric.shape
            n_image = n_tokens - num_prefix
            r = min(per_block[block.index], n_image // 2)
            if r <= 0:
                return None
            heads = block.attention.shape[1]
            importance = emphasized_importance(weighted_pagerank(block.attention, iterations[block.index]))
            r_similar = int(self.similarity_share * r + 0.5)
            prune = keep_tokens(zero_tprune_keep(block.metric, importance, num_prefix, r_similar, r - r_similar))
            pagerank_macs = iterations[block.index] * heads * n_tokens * n_tokens
            macs = pagerank_macs + (n_image // 2) * (n_image - n_image // 2) * head_dim  # + the similarity product
            return Reduction(prune(block.x), None if block.size is None else prune(block.size), prune, macs)

        return Plan(step, attention_blocks=frozenset(i for i, r in enumerate(per_block) if r > 0), per_head_attention=True)


def iteration_schedule(iterations: int | None, depth: int) -> list[int]:
    """WPR iterations per block: the given number everywhere, or the paper's early / middle / late counts."""
    if iterations is not None:
        return [iterations] * depth
    return [EARLY_ITERATIONS if i < 3 else LATE_ITERATIONS if i >= depth - 3 else MIDDLE_ITERATIONS for i in range(depth)]


def weighted_pagerank(attention: "Tensor", iterations: int) -> "Tensor":
    """Each head's token importance (B, H, N): s_0 = 1/N, then s <- A^T s, `iterations` times.

    A[i, j] is how much query i reads key j; a token is important when important tokens read it. The rows of
    A sum to 1, so s stays a distribution and tends to A's stationary distribution (its left 1-eigenvector).
    """
    attention = attention.float()  # a ranking, so float32 whatever the model's precision
    # s as a row vector, s^T <- s^T A: A read in its own layout (A^T s as a column was 9x slower on the CPU)
    scores = attention.new_full((*attention.shape[:-2], 1, attention.shape[-1]), 1.0 / attention.shape[-1])
    for _ in range(iterations):
        scores = scores @ attention
    return scores[..., 0, :]


def emphasized_importance(head_scores: "Tensor") -> "Tensor":
    """The paper's EIR aggregation over heads (B, H, N) -> (B, N): the root mean square, so a head that
    concentrates its importance on few tokens lifts them more than an average would."""
    return head_scores.square().mean(dim=1).sqrt()


def zero_tprune_keep(metric: "Tensor", importance: "Tensor", num_prefix: int, r_similar: int,
                     r_unimportant: int) -> "Tensor":
    """Positions (B, N - r_similar - r_unimportant) of the tokens to keep, prefix first, in sequence order.

    S-stage: image tokens ranked by importance (descending, stable); the more important ceil(M / 2) are
    targets, the rest sources; the r_similar sources whose best cosine similarity to a target is highest
    go. I-stage: of the image tokens left, the r_unimportant least important go.
    """
    import torch

    from ..merge import bipartite_match

    batch, n_tokens, _ = metric.shape
    n_image = n_tokens - num_prefix
    ranked = torch.sort(importance[:, num_prefix:], dim=1, descending=True, stable=True).indices + num_prefix
    n_targets = n_image - n_image // 2
    sources, targets = ranked[:, n_targets:], ranked[:, :n_targets]
    matching = bipartite_match(metric, sources, targets, 0, 0)
    most_similar = torch.sort(matching.best, dim=1, descending=True, stable=True).indices[:, :r_similar]
    pruned = torch.zeros(batch, n_tokens, dtype=torch.bool, device=metric.device)
    pruned.scatter_(1, sources.gather(1, most_similar), True)
    left = importance.float().masked_fill(pruned, torch.inf)
    left[:, :num_prefix] = torch.inf  # the prefix is never pruned
    pruned.scatter_(1, torch.sort(left, dim=1, stable=True).indices[:, :r_unimportant], True)
    # A stable sort of the flags puts the kept positions first, in sequence order.
    return torch.sort(pruned.to(torch.uint8), dim=1, stable=True).indices[:, :n_tokens - r_similar - r_unimportant]
