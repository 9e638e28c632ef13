"""ToMe (Bolya et al., ICLR 2023), as its official code runs it: a fixed r per block, alternate split."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .base import BlockInput, Knob, MethodConfig, Param, Plan, Reduction

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class ToMeConfig(MethodConfig):
    """Merge the r most similar pairs in every block (r: one int, or one int per block, or with an inflection)."""

    NAME = "tome"
    SUMMARY = "ToMe: a fixed number r of tokens merged per block (Bolya et al., 2023)"
    PARAMS = (
        Param("r", "ints", "tokens merged per block: one int, or a comma list per block", low=0),
        Param("inflection", float, "ToMe's schedule slope: negative merges more early, less late", low=-1.0, high=1.0),
        Param("prop_attn", bool, "proportional attention (log-size term)"),
    )

    r: int | tuple[int, ...]
    inflection: float = 0.0
    prop_attn: bool = True

    @classmethod
    def knob(cls, depth: int, image_tokens: int) -> Knob:
        # r above half the image tokens merges no more in any block: ToMe caps r there.
        return cls.own_knob("r", image_tokens // 2, lambda r: cls(r=r))

    def plan(self, model: "nn.Module") -> Plan:
        from ..merge import alternate_slices, bipartite_match, merge_closure, weighted_reduction

        num_prefix = model.num_prefix_tokens
        per_block = tome_schedule(self, len(model.blocks))

        def step(block: BlockInput) -> Reduction | None:
            _, n_tokens, head_dim = block.metric.shape
            r = min(per_block[block.index], (n_tokens - num_prefix) // 2)  # ToMe's cap: half the image tokens
            if r <= 0:
                return None
            matching = bipartite_match(block.metric, *alternate_slices(num_prefix))
            return weighted_reduction(merge_closure(matching, r, num_prefix), block.x, block.size,
                                      matching.similarity_macs(n_tokens, head_dim))

        return Plan(step)


def ramp_knob(depth: int, image_tokens: int, rising: bool) -> Knob:
    """The paper's Fig. 5 top-r schedules: r rising (or falling) by one per block, `step` in the block that
    merges most; ToMe's matching (alternate split)."""
    def schedule(peak: int) -> list[int]:
        ramp = [max(0, peak - (depth - 1) + block) for block in range(depth)]  # never below 0
        return ramp if rising else ramp[::-1]

    name, moves = ("tome-increasing", "rising") if rising else ("tome-decreasing", "falling")
    # Past half the image tokens in its last block, a higher peak merges no more in any block.
    return Knob(name, f"top-r {moves} by one per block (alternate matching)", "r", image_tokens // 2 + depth - 1,
                lambda peak: ToMeConfig(r=schedule(peak)), shown=lambda peak: {"r": peak, "schedule": schedule(peak)})


def tome_schedule(config: ToMeConfig, depth: int) -> list[int]:
    """ToMe's r per block: a constant, an explicit list (padded with zeros), or a constant with an inflection.

    With an inflection, r moves linearly from int(r * (1 - inflection)) in the first block to
    2r - that in the last (ToMe's definition: a negative inflection merges more early, less late).
    """
    if isinstance(config.r, tuple):
        if config.inflection:
            raise ValueError("an inflection applies to a constant r, not to a list of r per block")
        if len(config.r) > depth:
            raise ValueError(f"ToMe schedule has {len(config.r)} entries for a {depth}-block model")
        return list(config.r) + [0] * (depth - len(config.r))
    first = int(config.r * (1.0 - config.inflection))
    last = 2 * config.r - first
    step = (last - first) / (depth - 1) if depth > 1 else 0.0
    return [int(first + step * i) for i in range(depth)]
