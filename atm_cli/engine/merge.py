"""The functional core: split tokens into two sets, match them, and return a merge closure.

Tokens are addressed by their position in the sequence, so one code path serves both splits: a
`Matching` says where set a and set b sit (per image), each a-token's best b-partner, and how many
prefix tokens lead each set. `merge_closure` turns a matching and a count r into a function that
merges any additive per-token quantity (x * size, size, source maps) the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .methods.base import Reduction

# Keys of zero norm (possible in half precision) normalise to zero instead of NaN, which would sort first.
NORM_EPS = 1e-6


@dataclass
class Matching:
    a_pos: Tensor  # (B, Na) sequence positions of set a, in a order
    b_pos: Tensor  # (B, Nb) sequence positions of set b, in b order
    a_prefix: int  # how many prefix tokens lead set a (never merged)
    b_prefix: int  # how many prefix tokens lead set b (never a destination)
    best: Tensor  # (B, Na) similarity of each a-token to its best b-token; -inf for prefix rows
    best_j: Tensor  # (B, Na) index into b of that best b-token

    @property
    def mergeable(self) -> int:
        return self.a_pos.shape[1] - self.a_prefix


def alternate_split(batch: int, n_tokens: int, num_prefix: int, device: torch.device) -> tuple[Tensor, Tensor, int, int]:
    """ToMe's split over the whole sequence: a = even positions, b = odd positions."""
    a_pos = torch.arange(0, n_tokens, 2, device=device).expand(batch, -1)
    b_pos = torch.arange(1, n_tokens, 2, device=device).expand(batch, -1)
    return a_pos, b_pos, (num_prefix + 1) // 2, num_prefix // 2


def size_distinctive_split(size: Tensor | None, batch: int, n_tokens: int, num_prefix: int,
                           device: torch.device) -> tuple[Tensor, Tensor, int, int]:
    """Image tokens sorted by merging size (stable, ascending); a = the smaller half, b = the rest."""
    n_image = n_tokens - num_prefix
    if size is None:  # all sizes 1: the stable sort keeps the current order
        order = torch.arange(n_image, device=device).expand(batch, -1)
    else:
        order = torch.sort(size[:, num_prefix:, 0], dim=1, stable=True).indices
    order = order + num_prefix
    half = n_image // 2
    return order[:, :half], order[:, half:], 0, 0


def bipartite_match(metric: Tensor, a_pos: Tensor, b_pos: Tensor, a_prefix: int, b_prefix: int) -> Matching:
    """Cosine similarity of every a-token to every b-token; prefix tokens can be neither source nor destination.

    Scores are float32 whatever the model's precision: a threshold compared on the bfloat16 grid
    (spacing 0.004 near 0.9) would move token counts between precisions.
    """
    metric = F.normalize(metric.float(), dim=-1, eps=NORM_EPS)
    dim = metric.shape[-1]
    a = metric.gather(1, a_pos[..., None].expand(-1, -1, dim))
    b = metric.gather(1, b_pos[..., None].expand(-1, -1, dim))
    scores = a @ b.transpose(1, 2)
    if a_prefix:
        scores[:, :a_prefix, :] = -torch.inf
    if b_prefix:
        scores[:, :, :b_prefix] = -torch.inf
    best, best_j = scores.max(dim=-1)
    return Matching(a_pos, b_pos, a_prefix, b_prefix, best, best_j)


def adaptive_r(matching: Matching, theta: float) -> int:
    """Batch-adaptive r (Sec. 3.4): the floor of the batch mean of per-image counts of best > theta."""
    counts = (matching.best > theta).sum(dim=1)
    r = int(counts.sum().item()) // counts.shape[0]  # the engine's one host synchronisation per block
    return min(r, matching.mergeable)


def merge_closure(matching: Matching, r: int, num_prefix: int) -> Callable[[Tensor], Tensor]:
    """Merge the r most similar a-tokens of each image into their best b-tokens, by summation.

    The result keeps the prefix tokens first (original order), then unmerged a-tokens in a order,
    then b-tokens in b order.
    """
    batch = matching.best.shape[0]
    ranked = torch.sort(matching.best, dim=1, descending=True, stable=True).indices
    src = ranked[:, :r]
    unmerged = torch.sort(ranked[:, r:], dim=1).values[:, matching.a_prefix:]  # a's prefix rows rank last
    src_pos = matching.a_pos.gather(1, src)
    dst_pos = matching.b_pos.gather(1, matching.best_j.gather(1, src))
    keep = torch.cat([
        torch.arange(num_prefix, device=src.device).expand(batch, -1),
        matching.a_pos.gather(1, unmerged),
        matching.b_pos[:, matching.b_prefix:],
    ], dim=1)

    def merge_sum(t: Tensor) -> Tensor:
        channels = t.shape[-1]
        moved = t.gather(1, src_pos[..., None].expand(-1, -1, channels))
        t = t.scatter_add(1, dst_pos[..., None].expand(-1, -1, channels), moved)
        return t.gather(1, keep[..., None].expand(-1, -1, channels))

    return merge_sum


def merge_weighted(merge_sum: Callable[[Tensor], Tensor], x: Tensor, size: Tensor | None) -> tuple[Tensor, Tensor]:
    """Size-weighted average of merged tokens, accumulated in float32 (x * size overflows float16); sizes add."""
    size = torch.ones_like(x[..., :1], dtype=torch.float32) if size is None else size
    merged_size = merge_sum(size)
    return (merge_sum(x.float() * size) / merged_size).to(x.dtype), merged_size


def weighted_reduction(merge_sum: Callable[[Tensor], Tensor], x: Tensor, size: Tensor | None,
                       extra_macs: int = 0) -> Reduction:
    """The Reduction of a merge closure: size-weighted tokens, added sizes, and the closure for other maps."""
    merged_x, merged_size = merge_weighted(merge_sum, x, size)
    return Reduction(merged_x, merged_size, merge_sum, extra_macs)


def keep_tokens(keep: Tensor) -> Callable[[Tensor], Tensor]:
    """The closure that keeps the tokens at positions `keep` (B, N') of each image, in that order (pruning)."""
    def gather(t: Tensor) -> Tensor:
        return t.gather(1, keep[..., None].expand(-1, -1, t.shape[-1]))
    return gather
