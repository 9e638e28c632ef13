"""The functional core: split tokens into two sets, match them, and return a merge closure.

Tokens are addressed by their position in the sequence, so one code path serves every split: a
`Matching` says where set a and set b sit (positions per image, or a slice of the sequence, which
selects the same rows of every image as a view, without an index: ToMe's alternate split), each
a-token's best b-partner, and how many prefix tokens lead each set. `merge_closure` turns a matching and a count r into a function that
merges any additive per-token quantity (x * size, size, source maps) the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .attention import attention_with_sizes
from .backbones.parts import AttentionParts
from .methods.base import Reduction

# Keys of zero norm (possible in half precision) normalise to zero instead of NaN, which would sort first.
NORM_EPS = 1e-6


@dataclass
class Matching:
    a_pos: Tensor | slice  # set a: (B, Na) sequence positions in a order, or a slice of the sequence
    b_pos: Tensor | slice  # set b, likewise
    a_prefix: int  # how many prefix tokens lead set a (never merged)
    b_prefix: int  # how many prefix tokens lead set b (never a destination)
    best: Tensor  # (B, Na) similarity of each a-token to its best b-token; -inf for prefix rows
    best_j: Tensor  # (B, Na) index into b of that best b-token

    @property
    def mergeable(self) -> int:
        return self.best.shape[1] - self.a_prefix

    def similarity_macs(self, n_tokens: int, head_dim: int) -> int:
        """Multiply-adds per image of the score product |a| * |b| * head_dim."""
        n_b = len(range(n_tokens)[self.b_pos]) if isinstance(self.b_pos, slice) else self.b_pos.shape[1]
        return self.best.shape[1] * n_b * head_dim


def rows(t: Tensor, pos: Tensor | slice) -> Tensor:
    """The tokens of `t` (B, N, C) at `pos`, in that order."""
    if isinstance(pos, slice):
        return t[:, pos]
    return t.gather(1, pos[..., None].expand(-1, -1, t.shape[-1]))


def add_rows(target: Tensor, dst: Tensor, source: Tensor, src: Tensor) -> Tensor:
    """`target` (B, N, C) with each token of `source` at positions `src` (B, k) added into `target`'s token at
    `dst` (B, k), per image: the sum-merge. Several sources may share a destination."""
    return target.scatter_add(1, dst[..., None].expand(-1, -1, target.shape[-1]), rows(source, src))


def first_positions(batch: int, count: int, device: torch.device) -> Tensor:
    """Positions 0 .. count - 1 for each of `batch` images (B, count): the prefix tokens, or an unchanged order."""
    return torch.arange(count, device=device).expand(batch, -1)


def unit_vectors(t: Tensor) -> Tensor:
    """`t` in float32, L2-normalised along its last dimension (the contract's metric normalisation), so that
    dot products are cosine similarities; a zero vector stays zero (NORM_EPS)."""
    t = t.float()
    return t / t.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)  # F.normalize, one op less


def alternate_split(batch: int, n_tokens: int, num_prefix: int, device: torch.device) -> tuple[Tensor, Tensor, int, int]:
    """ToMe's split over the whole sequence: a = even positions, b = odd positions (as position tensors)."""
    a_pos = torch.arange(0, n_tokens, 2, device=device).expand(batch, -1)
    b_pos = torch.arange(1, n_tokens, 2, device=device).expand(batch, -1)
    return a_pos, b_pos, (num_prefix + 1) // 2, num_prefix // 2


def alternate_slices(num_prefix: int) -> tuple[slice, slice, int, int]:
    """The same split as `alternate_split`, as slices: the merge then reads sets a and b as views."""
    return slice(0, None, 2), slice(1, None, 2), (num_prefix + 1) // 2, num_prefix // 2


def size_distinctive_split(size: Tensor | None, batch: int, n_tokens: int, num_prefix: int,
                           device: torch.device) -> tuple[Tensor, Tensor, int, int]:
    """Image tokens sorted by merging size (stable, ascending); a = the smaller half, b = the rest."""
    n_image = n_tokens - num_prefix
    if size is None:  # all sizes 1: the stable sort keeps the current order
        order = first_positions(batch, n_image, device)
    else:
        order = torch.sort(size[:, num_prefix:, 0], dim=1, stable=True).indices
    order = order + num_prefix
    half = n_image // 2
    return order[:, :half], order[:, half:], 0, 0


def bipartite_match(metric: Tensor, a_pos: Tensor | slice, b_pos: Tensor | slice, a_prefix: int,
                    b_prefix: int) -> Matching:
    """Cosine similarity of every a-token to every b-token; prefix tokens can be neither source nor destination.

    Scores are float32 whatever the model's precision: a threshold compared on the bfloat16 grid
    (spacing 0.004 near 0.9) would move token counts between precisions.
    """
    metric = unit_vectors(metric)
    scores = rows(metric, a_pos) @ rows(metric, b_pos).transpose(1, 2)
    if a_prefix:
        scores[:, :a_prefix, :] = -torch.inf
    if b_prefix:
        scores[:, :, :b_prefix] = -torch.inf
    best, best_j = scores.max(dim=-1)
    return Matching(a_pos, b_pos, a_prefix, b_prefix, best, best_j)


def best_match_scores(attn: AttentionParts, x: Tensor, num_prefix: int) -> Tensor:
    """The best-match similarity of each image token in set a (B, |a| less a's prefix tokens) in an unmerged
    block: the metric is the keys of attention `attn` (a block's `backbones.parts.AttentionParts`) on its
    input `x`, split alternately as in ATM's early blocks. What ATM's thresholds are compared with."""
    _, metric, _ = attention_with_sizes(attn, x, None)
    matching = bipartite_match(metric, *alternate_split(x.shape[0], x.shape[1], num_prefix, x.device))
    return matching.best[:, matching.a_prefix:]


def count_above(matching: Matching, theta: float) -> Tensor:
    """How many a-tokens match better than theta (strict), summed over the batch: a 0-d tensor."""
    return (matching.best > theta).sum()


def batch_r(total: int, batch: int, mergeable: int, multiple: int = 1) -> int:
    """Batch-adaptive r (Sec. 3.4): the floor of the batch mean of per-image counts (`total` over `batch`
    images), clamped to the tokens that may merge, then rounded down to a multiple of `multiple` (1: the
    paper's r)."""
    return min(total // batch, mergeable) // multiple * multiple


def adaptive_r(matching: Matching, theta: float, multiple: int = 1) -> int:
    """`batch_r` of the matching's counts above theta (one host synchronisation)."""
    total = int(count_above(matching, theta).item())
    return batch_r(total, matching.best.shape[0], matching.mergeable, multiple)


def merge_closure(matching: Matching, r: int, num_prefix: int) -> Callable[[Tensor], Tensor]:
    """Merge the r most similar a-tokens of each image into their best b-tokens, by summation.

    The result keeps the prefix tokens first (original order), then unmerged a-tokens in a order,
    then b-tokens in b order.
    """
    ranked = torch.sort(matching.best, dim=1, descending=True, stable=True).indices
    src = ranked[:, :r]
    unmerged = torch.sort(ranked[:, r:], dim=1).values[:, matching.a_prefix:]  # a's prefix rows rank last
    dst = matching.best_j.gather(1, src)
    b_prefix = matching.b_prefix

    def merge_sum(t: Tensor) -> Tensor:
        a, b = rows(t, matching.a_pos), rows(t, matching.b_pos)
        return torch.cat([t[:, :num_prefix], rows(a, unmerged), add_rows(b, dst, a, src)[:, b_prefix:]], dim=1)

    return merge_sum


def merge_weighted(merge_sum: Callable[[Tensor], Tensor], x: Tensor, size: Tensor | None) -> tuple[Tensor, Tensor]:
    """Size-weighted average of merged tokens, accumulated in float32 (x * size overflows float16); sizes add.

    x * size and size travel as one tensor, so the merge runs its gathers and scatter once for both.
    """
    if size is None:
        weighted = torch.cat([x.float(), x.new_ones(x.shape[:-1] + (1,), dtype=torch.float32)], dim=-1)
    else:
        weighted = torch.cat([x.float() * size, size], dim=-1)
    merged = merge_sum(weighted)
    merged_size = merged[..., -1:]
    return (merged[..., :-1] / merged_size).to(x.dtype), merged_size


def weighted_reduction(merge_sum: Callable[[Tensor], Tensor], x: Tensor, size: Tensor | None,
                       extra_macs: int = 0) -> Reduction:
    """The Reduction of a merge closure: size-weighted tokens, added sizes, and the closure for other maps."""
    merged_x, merged_size = merge_weighted(merge_sum, x, size)
    return Reduction(merged_x, merged_size, merge_sum, extra_macs)


def keep_tokens(keep: Tensor) -> Callable[[Tensor], Tensor]:
    """The closure that keeps the tokens at positions `keep` (B, N') of each image, in that order (pruning)."""
    def gather(t: Tensor) -> Tensor:
        return rows(t, keep)
    return gather
