"""The functional core: split tokens into two sets, match them, and return a merge closure.

Tokens are addressed by their position in the sequence, so one code path serves every split: a
`Matching` says where set a and set b sit (positions per image, or a slice of the sequence, which
selects the same rows of every image as a view, without an index: ToMe's alternate split), each
a-token's best b-partner, and how many prefix tokens lead each set. `merge_closure` turns a matching and a count r into a function that
merges any additive per-token quantity (x * size, size, source maps) the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, field
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
    # A padded sequence only (the compiled path's token buckets): which rows of a and columns of b are real
    # members of their set (padding, and in a padded size-distinctive split the other set's tokens, are not).
    a_real: Tensor | None = None  # (B, Na) bool
    b_real: Tensor | None = None  # (B, Nb) bool

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


def padded_alternate_split(real: Tensor, num_prefix: int) -> tuple[slice, slice, int, int, Tensor, Tensor]:
    """`alternate_slices` over a padded sequence (real tokens first, `real` (B, N) bool): padding sits at the
    end, so the real tokens fall in the sets they would without it; the masks say which rows are real."""
    a_pos, b_pos, a_prefix, b_prefix = alternate_slices(num_prefix)
    return a_pos, b_pos, a_prefix, b_prefix, real[:, a_pos], real[:, b_pos]


def padded_size_distinctive_split(size: Tensor | None, real: Tensor,
                                  num_prefix: int) -> tuple[Tensor, Tensor, int, int, Tensor, Tensor]:
    """`size_distinctive_split` over a padded sequence without reading its real length on the host: the image
    tokens in size order (padding last) are both the rows and the columns, the smaller half of the real ones
    marked as set a, the rest of the real ones as set b."""
    image_real = real[:, num_prefix:]
    key = torch.ones_like(image_real, dtype=torch.float32) if size is None else size[:, num_prefix:, 0].float()
    order = torch.sort(key.masked_fill(~image_real, torch.inf), dim=1, stable=True).indices + num_prefix
    n_image = image_real.sum(dim=1, keepdim=True)
    rank = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return order, order, 0, 0, rank < n_image // 2, (rank >= n_image // 2) & (rank < n_image)


def bipartite_match(metric: Tensor, a_pos: Tensor | slice, b_pos: Tensor | slice, a_prefix: int,
                    b_prefix: int, a_real: Tensor | None = None, b_real: Tensor | None = None) -> Matching:
    """Cosine similarity of every a-token to every b-token; prefix tokens can be neither source nor destination,
    nor can rows and columns that `a_real`/`b_real` (B, Na)/(B, Nb) mark False (a padded sequence).

    Scores are float32 whatever the model's precision: a threshold compared on the bfloat16 grid
    (spacing 0.004 near 0.9) would move token counts between precisions.
    """
    metric = unit_vectors(metric)
    scores = rows(metric, a_pos) @ rows(metric, b_pos).transpose(1, 2)
    if a_prefix:
        scores[:, :a_prefix, :] = -torch.inf
    if b_prefix:
        scores[:, :, :b_prefix] = -torch.inf
    if a_real is not None:
        scores = scores.masked_fill(~(a_real[:, :, None] & b_real[:, None, :]), -torch.inf)
    best, best_j = scores.max(dim=-1)
    return Matching(a_pos, b_pos, a_prefix, b_prefix, best, best_j, a_real, b_real)


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


def padded_merge(matching: Matching, r: Tensor, num_prefix: int, n_tokens: int) -> "SlotMerge":
    """`merge_closure` over a padded sequence of `n_tokens`, with r a tensor, so that one compiled graph serves
    every r: the result holds the same tokens in the same order, then padding (size 0) up to `n_tokens`."""
    batch, n_a = matching.best.shape
    n_b = matching.b_real.shape[1]
    device = matching.best.device
    ranked = torch.sort(matching.best, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(ranked).scatter_(1, ranked, first_positions(batch, n_a, device))
    merged = rank < r  # only real a-tokens rank above the rest (-inf), and r never exceeds them
    unmerged = matching.a_real & ~merged & (torch.arange(n_a, device=device) >= matching.a_prefix)
    b_kept = matching.b_real & (torch.arange(n_b, device=device) >= matching.b_prefix)
    a_slot = num_prefix + unmerged.cumsum(dim=1) - 1  # prefix first, then the a-tokens left in a order,
    b_slot = num_prefix + unmerged.sum(dim=1, keepdim=True) + b_kept.cumsum(dim=1) - 1  # then b in b order
    a_at = _positions(matching.a_pos, batch, n_tokens, device)
    b_at = _positions(matching.b_pos, batch, n_tokens, device)
    slots = torch.full((batch, n_tokens), n_tokens, dtype=torch.long, device=device)  # slot n_tokens: dropped
    slots[:, :num_prefix] = torch.arange(num_prefix, device=device)
    for at, chosen, slot in ((a_at, unmerged, a_slot), (b_at, b_kept, b_slot),
                             (a_at, merged, b_slot.gather(1, matching.best_j))):  # the merged go where their b went
        slots.scatter_(1, at, torch.where(chosen, slot, slots.gather(1, at)))
    return SlotMerge(slots, n_tokens, drops=True)


def _positions(pos: Tensor | slice, batch: int, n_tokens: int, device: torch.device) -> Tensor:
    """A set's sequence positions (B, n) as a tensor, whether given as one or as a slice of the sequence."""
    if isinstance(pos, slice):
        return torch.arange(n_tokens, device=device)[pos].expand(batch, -1)
    return pos


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
    # A padding token has size 0 (and x * size 0): it comes out 0, not 0 / 0; no real size is that small.
    return (merged[..., :-1] / merged_size.clamp_min(torch.finfo(torch.float32).tiny)).to(x.dtype), merged_size


def weighted_reduction(merge_sum: Callable[[Tensor], Tensor], x: Tensor, size: Tensor | None,
                       extra_macs: int = 0) -> Reduction:
    """The Reduction of a merge closure: size-weighted tokens, added sizes, and the closure for other maps."""
    merged_x, merged_size = merge_weighted(merge_sum, x, size)
    return Reduction(merged_x, merged_size, merge_sum, extra_macs)


@dataclass
class SlotMerge:
    """A merge given by the slot (B, N) each token sums into, among `kept` merged tokens: any additive map merges
    in one index_add, along whichever dimension holds its tokens (dim 1 for (B, N, C); an attention map's
    query or key dimension), however many merging moves made the slots. With `drops`, slot `kept` is where
    dropped tokens (padding) go: summed apart and left out."""

    slots: Tensor
    kept: int
    drops: bool = False
    # One index_add_ with a flat index over the batch's tokens (the batch folded in beside the token
    # dimension): on the CPU 3-6x faster than scatter_add_ with the slots expanded over the other dimensions.
    _flat: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        offsets = torch.arange(self.slots.shape[0], device=self.slots.device)[:, None] * (self.kept + self.drops)
        self._flat = (self.slots + offsets).reshape(-1)

    def __call__(self, t: Tensor, dim: int = 1) -> Tensor:
        dim = dim % t.dim()
        batch, n_tokens = self.slots.shape
        slots_out = self.kept + self.drops
        folded = t.movedim(0, dim - 1)  # (..., B, N, ...): the batch just before the tokens
        shape = folded.shape
        folded = folded.reshape(*shape[:dim - 1], batch * n_tokens, *shape[dim + 1:])
        merged = folded.new_zeros(*shape[:dim - 1], batch * slots_out, *shape[dim + 1:])
        merged = merged.index_add_(dim - 1, self._flat, folded)
        merged = merged.reshape(*shape[:dim - 1], batch, slots_out, *shape[dim + 1:]).movedim(dim - 1, 0)
        return merged.narrow(dim, 0, self.kept) if self.drops else merged


def keep_tokens(keep: Tensor) -> Callable[[Tensor], Tensor]:
    """The closure that keeps the tokens at positions `keep` (B, N') of each image, in that order (pruning)."""
    def gather(t: Tensor) -> Tensor:
        return rows(t, keep)
    return gather
