"""Adaptive Token Merging (the paper, Sec. 3; the choices it leaves open: docs/engine-contract.md)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .base import BlockInput, Deferred, Knob, MethodConfig, Padded, Param, Plan, Reduction

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ..backbones.parts import Backbone

# A cosine similarity lies in [-1, 1]: a threshold outside it is a mistake, not "merge nothing/everything".
THRESHOLD = dict(low=-1.0, high=1.0)
CONSTANT_KNOB = "threshold"  # the constant threshold's knob, by name


@dataclass(frozen=True)
class ATMConfig(MethodConfig):
    """Merge every pair more similar than the block's threshold.

    theta_l = max(alpha - (exp(beta * (l - 1)) - 1), theta_min) for block l (1-based); blocks up to
    `split_layer` split tokens alternately, later ones by merging size (None: round(0.75 * L)).
    `r_multiple` > 1 rounds each block's r down to a multiple of it: not the paper's r, but fewer
    distinct token counts. (A compiled model bounds its shapes without changing r: it pads the tokens,
    `BlockInput.token_bucket`.)
    """

    NAME = "atm"
    FIXED_SHAPES = False  # r is decided by the batch's content in every block
    SUMMARY = "Adaptive Token Merging: a similarity threshold per block, falling with depth (the paper)"
    PARAMS = (
        Param("alpha", float, "threshold of the first block", **THRESHOLD),
        Param("beta", float, "how fast thresholds fall with depth", low=0.0),
        Param("theta_min", float, "the lowest threshold", **THRESHOLD),
        Param("split_layer", int, "last block with alternate matching (none: round(0.75 L))", low=0, optional=True),
        Param("prop_attn", bool, "proportional attention (log-size term)"),
        Param("r_multiple", int, "r rounded down to a multiple of this (1: the paper's r; larger: fewer token-count "
              "shapes, which a compiled model compiles once each)", low=1),
        Param("block_thresholds", "floats", "one threshold per block, replacing Eq. (1), for analyses such as "
              "merging in one block only (Fig. 2); above 1: that block merges nothing", optional=True, low=-1.0),
        Param("prefix_only_last_block", bool, "the last MLP on the prefix tokens alone when the head reads only "
              "them (exact; false merges there as usual)"),
    )

    alpha: float
    beta: float
    theta_min: float
    split_layer: int | None = None
    prop_attn: bool = True
    r_multiple: int = 1
    block_thresholds: tuple[float, ...] | None = None
    prefix_only_last_block: bool = True

    def setting_key(self, depth: int) -> str:
        """What the engine runs for this setting on a `depth`-block model: its per-block thresholds and split layer.

        Settings with the same key merge identically, e.g. any alpha <= theta_min gives the constant
        threshold theta_min whatever beta is, so a search runs such a setting only once.
        """
        thresholds = ",".join(f"{t:.9f}" for t in threshold_schedule(self, depth))
        return f"{thresholds}|{resolve_split_layer(self, depth)}"

    @classmethod
    def constant(cls, threshold: float, **kwargs) -> "ATMConfig":
        """One threshold in every block (beta = 0): the constant-threshold schedule of the paper's Fig. 5."""
        return cls(alpha=threshold, beta=0.0, theta_min=threshold, **kwargs)

    def plan(self, model: "Backbone") -> Plan:
        import torch

        from ..merge import alternate_slices, batch_r, bipartite_match, count_above, merge_closure, padded_merge
        from ..merge import padded_alternate_split, padded_size_distinctive_split, size_distinctive_split
        from ..merge import weighted_reduction

        depth, num_prefix = len(model.blocks), model.num_prefix_tokens
        thresholds = threshold_schedule(self, depth)
        split_layer = resolve_split_layer(self, depth)
        # The output reads the prefix tokens only (App. A): the last MLP need not run on the rest.
        head_reads_prefix_only = self.prefix_only_last_block and model.head_reads_prefix_only

        def step(block: BlockInput) -> Reduction | None:
            batch, n_tokens, head_dim = block.metric.shape
            if block.index == depth - 1 and head_reads_prefix_only:
                # The last MLP runs on the prefix tokens alone.
                def prefix(t):
                    return t[:, :num_prefix]
                return Reduction(prefix(block.x), None if block.size is None else prefix(block.size), prefix)
            if block.token_bucket > 1:
                return padded_step(block)
            if block.index < split_layer:  # block index + 1 <= split_layer
                split = alternate_slices(num_prefix)
            else:
                split = size_distinctive_split(block.size, batch, n_tokens, num_prefix, block.metric.device)
            matching = bipartite_match(block.metric, *split)
            macs = matching.similarity_macs(n_tokens, head_dim)

            def decide(total: int) -> int:
                return batch_r(total, batch, matching.mergeable, self.r_multiple)

            def finish(r: int) -> Reduction:
                if r == 0:
                    return Reduction(block.x, block.size, lambda t: t, macs)
                return weighted_reduction(merge_closure(matching, r, num_prefix), block.x, block.size, macs)

            return Deferred(count_above(matching, thresholds[block.index]), decide, finish)

        def padded_step(block: BlockInput) -> Padded:
            """The same step on a sequence that may end in padding (size 0), computed whole on the device at the
            input's length, r a tensor: no host read here (the engine's cut of the padding makes the one)."""
            batch, n_tokens, head_dim = block.metric.shape
            real = (torch.ones(batch, n_tokens, dtype=torch.bool, device=block.x.device) if block.size is None
                    else block.size[..., 0] > 0)
            if block.index < split_layer:
                split = padded_alternate_split(real, num_prefix)
            else:
                split = padded_size_distinctive_split(block.size, real, num_prefix)
            matching = bipartite_match(block.metric, *split)
            n_a, n_b, n_real = matching.a_real[0].sum(), matching.b_real[0].sum(), real[0].sum()
            r = torch.minimum(count_above(matching, thresholds[block.index]) // batch, n_a - matching.a_prefix)
            r = r // self.r_multiple * self.r_multiple  # `batch_r`, on the device
            macs = n_a * n_b * head_dim
            merged = weighted_reduction(padded_merge(matching, r, num_prefix, n_tokens), block.x, block.size, macs)
            merged.real_tokens = n_real - r
            # As the unpadded step when r is 0: the tokens as they are (no sizes where there were none).
            unchanged = Reduction(block.x, block.size, lambda t: t, macs,
                                  real_tokens=None if block.size is None else n_real)
            return Padded(merged, unchanged, torch.stack([r, n_real - r]), block.token_bucket)

        return Plan(step, thresholds=thresholds)


def constant_knob(thresholds: "Sequence[float]", split_layer: int | None = None) -> Knob:
    """The paper's Fig. 5 constant threshold: ATM with beta = 0, step s at `thresholds[s]` (from the least
    merging down)."""
    return Knob(CONSTANT_KNOB, "constant threshold in every block (ATM with beta = 0)", "threshold",
                len(thresholds) - 1, lambda step: ATMConfig.constant(thresholds[step], split_layer=split_layer),
                shown=lambda step: {"threshold": thresholds[step]})


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
