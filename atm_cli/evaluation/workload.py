"""The one workload every command runs settings on: a loaded model, its preloaded batches, the unmerged run
(cached) and a count of the images run through the model.

A setting is patched once and kept until another one is asked for: the patched model is a view of the
loaded one (a shallow copy: the same blocks and weights, its own forward), so the unmerged model stays
as it is beside it and switching between the two costs nothing. When the model is loaded compiled, each
setting's view (and the unmerged model) is compiled once (`engine.compiled`); a batch during which
something compiled is run again for its time, so that speeds leave compilation out (`compile_seconds`).
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

from torch import Tensor, nn

from atm_cli.engine import MethodConfig, patch
from atm_cli.engine.compiled import CompiledModel, compile_patched
from atm_cli.errors import UsageError

from .models import LoadedModel
from .outcomes import BatchOutcome, Outcomes

Batches = Sequence[tuple[Tensor, Tensor]]
Progress = Callable[[int, int], None]


def patched_view(loaded: LoadedModel, method: MethodConfig) -> nn.Module:
    """A view of `loaded.model` patched for `method` (the same weights; the model itself stays unmerged);
    UsageError when the engine rejects the setting for this model."""
    try:
        return patch(copy.copy(loaded.model), method)
    except ValueError as error:
        raise UsageError(f"{type(method).__name__} on {loaded.name}: {error}") from None


class Workload:
    """`loaded` on `batches` (the same list for every setting). `images_run` counts every image through the model."""

    def __init__(self, loaded: LoadedModel, batches: Batches = (), source: str | None = None):
        self.loaded, self.batches, self.source = loaded, batches, source
        self.images_run = 0
        self._method: MethodConfig | None = None
        self._view: nn.Module | None = None
        self._runners: dict[MethodConfig | None, CompiledModel] = {}
        self._dropped_compile_seconds = 0.0  # of the runners of settings no longer current
        self._baseline: Outcomes | None = None

    @property
    def depth(self) -> int:
        return self.loaded.depth

    @property
    def n_batches(self) -> int:
        return len(self.batches)

    @property
    def n_images(self) -> int:
        return sum(len(labels) for _, labels in self.batches)

    @property
    def compile_seconds(self) -> float:
        """Time spent compiling, over every setting run so far (0 when the model is not compiled)."""
        return self._dropped_compile_seconds + sum(runner.compile_seconds for runner in self._runners.values())

    def model(self, method: MethodConfig | None) -> nn.Module:
        """The model that runs `method` (None: the unmerged one), patched only when the setting changes."""
        if method is None:
            return self.loaded.model
        if method != self._method:
            self._view, self._method = patched_view(self.loaded, method), method
            self._dropped_compile_seconds += sum(runner.compile_seconds for key, runner in self._runners.items()
                                                 if key is not None)
            self._runners = {key: runner for key, runner in self._runners.items() if key is None}
        return self._view

    def runner(self, method: MethodConfig | None) -> Callable[[Tensor], Tensor]:
        """What a batch goes through for `method`: its model, or that model compiled once when the model is
        loaded compiled (the unmerged model's compiled form is kept beside the current setting's); a setting
        whose shapes follow the data (ATM) only with `--compile on`."""
        model = self.model(method)
        data_dependent = method is not None and not type(method).FIXED_SHAPES
        if not self.loaded.compiled or data_dependent and not self.loaded.compile_data_dependent:
            return model
        if method not in self._runners:
            self._runners[method] = compile_patched(model)
        return self._runners[method]

    def measure(self, method: MethodConfig | None, images: Tensor, labels: Tensor) -> tuple[BatchOutcome, float]:
        """One batch (any batch, not only the preloaded ones) through `method`: its outcome and the model's seconds."""
        from .measure import measure_batch

        runner = self.runner(method)
        traced = None if method is None else self._view  # the patched view `runner` runs
        outcome, seconds = measure_batch(self.loaded, runner, traced, images, labels)
        if isinstance(runner, CompiledModel) and runner.last_compiled:  # time the batch once more, compiled
            outcome, seconds = measure_batch(self.loaded, runner, traced, images, labels)
        self.images_run += outcome.n
        return outcome, seconds

    def run_batch(self, method: MethodConfig | None, index: int) -> BatchOutcome:
        images, labels = self.batches[index]
        return self.measure(method, images, labels)[0]

    def run(self, method: MethodConfig | None, max_batches: int | None = None,
            keep_going: Callable[[Outcomes], bool] | None = None, progress: Progress | None = None) -> Outcomes:
        """`method` on the first `max_batches` batches (all when None), batch by batch; a `keep_going` that
        returns False for the outcomes so far stops the run there."""
        n_batches = self.n_batches if max_batches is None else min(max_batches, self.n_batches)
        run = Outcomes()
        for index in range(n_batches):
            run.add(self.run_batch(method, index))
            if progress is not None:
                progress(index + 1, n_batches)
            if keep_going is not None and index + 1 < n_batches and not keep_going(run):
                break
        return run

    @property
    def baseline(self) -> Outcomes:
        """The unmerged model on every batch, run once."""
        if self._baseline is None:
            self._baseline = self.run(None)
        return self._baseline
