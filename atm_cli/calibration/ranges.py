"""The search ranges asked for, resolved against the model and its batches (the one boundary where ranges are
measured)."""
from __future__ import annotations

from dataclasses import dataclass

from atm_cli.evaluation import Workload
from atm_cli.evaluation.similarity import best_match_similarities

from .space import SearchSpace, measured_space


@dataclass(frozen=True)
class RangeFlags:
    """The search ranges asked for (None: not given): measured ranges unless `paper`; those given override."""

    paper: bool = False
    alpha: tuple[float, float] | None = None
    beta: tuple[float, float] | None = None
    theta_min: tuple[float, float] | None = None
    step: float | None = None
    split_layer: int | None = None
    search_split_layer: bool = False

    @property
    def measures(self) -> bool:
        """Whether the ranges come from a pass of the unmerged model (not the paper's, nor all given by flags)."""
        return not self.paper and None in (self.alpha, self.beta, self.theta_min, self.step)

    def resolve(self, source: Workload) -> SearchSpace:
        """The space for this model: validated here, once (the boundary every search goes through)."""
        if not self.measures:
            base = SearchSpace(split_layer=self.split_layer, search_split_layer=self.search_split_layer)
        else:
            images = source.batches[0][0]
            mergeable = source.loaded.image_tokens // 2
            base = measured_space(best_match_similarities(source.loaded, images), len(images), mergeable,
                                  source.depth, self.split_layer, self.search_split_layer)
        space = base.overridden(self.alpha, self.beta, self.theta_min, self.step)
        space.validate(source.depth)
        return space
