"""What to merge: the two methods' settings and the per-block schedules they imply."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Union

ToMeSchedule = Union[int, Sequence[int], tuple[int, float]]


@dataclass(frozen=True)
class ATMConfig:
    """Adaptive Token Merging (paper Sec. 3): merge every pair more similar than the block's threshold.

    theta_l = max(alpha - (exp(beta * (l - 1)) - 1), theta_min) for block l (1-based); blocks up to
    `split_layer` split tokens alternately, later ones by merging size (None: round(0.75 * L)).
    """

    alpha: float
    beta: float
    theta_min: float
    split_layer: int | None = None
    prop_attn: bool = True
    # Per-block thresholds replacing Eq. (1), for analyses such as merging in one block only (Fig. 2).
    block_thresholds: tuple[float, ...] | None = None
    # The contract's last-block shortcut for heads that read prefix tokens only; off merges there as usual.
    prefix_only_last_block: bool = True
    trace_source: bool = False


@dataclass(frozen=True)
class ToMeConfig:
    """ToMe's static top-r merging (Bolya et al., 2023): `r` per block, as an int, a list or (r, inflection)."""

    r: ToMeSchedule
    prop_attn: bool = True
    trace_source: bool = False


MergeConfig = Union[ATMConfig, ToMeConfig]


def threshold_schedule(config: ATMConfig, depth: int) -> list[float]:
    """The similarity threshold of each block, Eq. (1) of the paper (or the config's explicit list)."""
    if config.block_thresholds is not None:
        if len(config.block_thresholds) != depth:
            raise ValueError(f"block_thresholds has {len(config.block_thresholds)} entries for a {depth}-block model")
        return list(config.block_thresholds)
    return [max(config.alpha - (math.exp(config.beta * (l - 1)) - 1.0), config.theta_min) for l in range(1, depth + 1)]


def resolve_split_layer(config: ATMConfig, depth: int) -> int:
    split = round(0.75 * depth) if config.split_layer is None else config.split_layer
    if not 0 <= split <= depth:
        raise ValueError(f"split_layer must lie in [0, {depth}] for a {depth}-block model, got {split}")
    return split


def tome_schedule(r: ToMeSchedule, depth: int) -> list[int]:
    """ToMe's r per block: a constant, an explicit list (padded with zeros), or (r, inflection).

    With an inflection, r moves linearly from int(r * (1 - inflection)) in the first block to
    2r - that in the last (ToMe's definition: a negative inflection merges more early, less late).
    """
    if isinstance(r, tuple):
        base, inflection = r
    elif isinstance(r, int):
        base, inflection = r, 0.0
    else:
        per_block = [int(v) for v in r]
        if len(per_block) > depth:
            raise ValueError(f"ToMe schedule has {len(per_block)} entries for a {depth}-block model")
        return per_block + [0] * (depth - len(per_block))
    first = int(base * (1.0 - inflection))
    last = 2 * base - first
    step = (last - first) / (depth - 1) if depth > 1 else 0.0
    return [int(first + step * i) for i in range(depth)]
