"""`atm calibrate` below the command line: find ATM thresholds for a model, its data and a goal, as a preset."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from atm_cli.engine import ATMConfig
from atm_cli.errors import UsageError
from atm_cli.evaluation import BatchRun, ImageSet, LoadedModel, load_image_folder, load_model, preload, run_batches
from atm_cli.evaluation.data import DEMO_CALIB_DATA, DEMO_EVAL_DATA
from atm_cli.model_names import DEMO_MODEL_NAME
from atm_cli.presets import Measured, ModelInfo, Preset, build_preset, list_presets, save_preset

from .search import (BatchOutcome, BudgetGoal, Goal, NoDropGoal, Search, SearchResult, Tally, TrialEvent,
                     check_budget, reachable_gflops)
from .space import SearchSpace
from .study import open_storage, open_study

Batches = Sequence[tuple[Tensor, Tensor]]
REFERENCE_ATTR = "atm_reference"  # the unmerged model's results, cached in the study for resuming processes
KNOWN_GOOD = 2  # bundled presets enqueued as the first trials
PROBE_BATCHES = 1  # batches a trial runs before its GFLOPs are checked against the goal


@dataclass
class ModelBatches:
    """A loaded model on preloaded batches: the BatchSource the search runs."""

    loaded: LoadedModel
    batches: Batches

    @property
    def depth(self) -> int:
        return len(self.loaded.model.blocks)

    @property
    def n_batches(self) -> int:
        return len(self.batches)

    def run(self, config: ATMConfig | None, index: int) -> BatchOutcome:
        return outcome_of(run_batches(self.loaded, [self.batches[index]], config), 0, self.batches[index][1])

    def run_all(self, config: ATMConfig | None) -> Tally:
        tally = Tally()
        for index in range(self.n_batches):
            tally.add(self.run(config, index))
        return tally


def outcome_of(run: BatchRun, index: int, labels: Tensor) -> BatchOutcome:
    return BatchOutcome(correct=(run.batch_predictions[index] == labels).numpy(), correct5=run.correct5[index],
                        gflops=run.batch_gflops[index])


def tally_of(run: BatchRun, batches: Batches) -> Tally:
    """The per-image view of a BatchRun the caller already has (e.g. the unmerged model's)."""
    tally = Tally()
    for index, (_, labels) in enumerate(batches):
        tally.add(outcome_of(run, index, labels))
    return tally


def search_no_drop(loaded: LoadedModel, batches: Batches, baseline: BatchRun, tolerance: float = 0.0,
                   n_trials: int = 30, seed: int | None = 0, space: SearchSpace = SearchSpace(),
                   timeout: float | None = None, known_good: Sequence[ATMConfig] | None = None,
                   on_trial: Callable[[TrialEvent], None] | None = None) -> SearchResult:
    """The lowest-GFLOPs ATM setting whose top-1 on `batches` is >= `baseline`'s - tolerance (points).

    `baseline` is the unmerged model's run on the same batches. The result's `params`, `top1`,
    `gflops` are the best trial's (RunError when no trial met the floor); `forward_passes` counts
    the images the search ran (the baseline's not included). `known_good` defaults to the bundled
    presets for the model nearest the goal.
    """
    return _search_batches(loaded, batches, baseline, NoDropGoal(tolerance), n_trials, seed, space, timeout,
                           known_good, on_trial)


def search_budget(loaded: LoadedModel, batches: Batches, baseline: BatchRun, budget_gflops: float,
                  n_trials: int = 30, seed: int | None = 0, space: SearchSpace = SearchSpace(),
                  timeout: float | None = None, known_good: Sequence[ATMConfig] | None = None,
                  on_trial: Callable[[TrialEvent], None] | None = None) -> SearchResult:
    """The ATM setting with the best top-1 on `batches` among those with GFLOPs <= `budget_gflops`.

    As `search_no_drop`, with the budget as the goal (check it first with `reachable_gflops`).
    """
    return _search_batches(loaded, batches, baseline, BudgetGoal(budget_gflops), n_trials, seed, space, timeout,
                           known_good, on_trial)


def _search_batches(loaded: LoadedModel, batches: Batches, baseline: BatchRun, goal: Goal, n_trials: int,
                    seed: int | None, space: SearchSpace, timeout: float | None,
                    known_good: Sequence[ATMConfig] | None,
                    on_trial: Callable[[TrialEvent], None] | None) -> SearchResult:
    """A search kept in memory, on batches and an unmerged run the caller already has."""
    reference = tally_of(baseline, batches)
    search = Search(ModelBatches(loaded, batches), reference, goal, space, PROBE_BATCHES)
    study = open_study(None, None, goal, {}, seed, n_trials)
    known = _known_good(loaded, goal, reference.gflops) if known_good is None else known_good
    return search.run(study, n_trials, timeout, known, on_trial)


def _known_good(loaded: LoadedModel, goal: Goal, reference_gflops: float) -> list[ATMConfig]:
    """Bundled ATM presets for this model (and these weights) nearest the goal: made for the same goal
    first, then by what they measured when made (GFLOPs share just under the budget; or the smallest
    top-1 drop)."""
    presets = [p for p in list_presets(loaded.name, loaded.checkpoint_sha256)
               if p.method_name == "atm" and p.measured.baseline_gflops]

    def ratio(p: Preset) -> float:
        return p.measured.gflops / p.measured.baseline_gflops

    def nearness(p: Preset) -> tuple:
        if isinstance(goal, BudgetGoal):
            return (goal.target_gflops / reference_gflops - ratio(p),)
        return max(0.0, p.measured.baseline_top1 - p.measured.top1 - goal.tolerance), ratio(p)

    if isinstance(goal, BudgetGoal):
        candidates = [p for p in presets if ratio(p) <= goal.target_gflops / reference_gflops]
    else:
        candidates = [p for p in presets if p.measured.top1 is not None and p.measured.baseline_top1 is not None]
    chosen = sorted(candidates, key=lambda p: (p.provenance.target != goal.describe(), *nearness(p)))
    return [p.method for p in chosen[:KNOWN_GOOD]]


@dataclass
class CalibrationRequest:
    """What `atm calibrate` was asked for (flags as given; None where the flag was not)."""

    model: str = "atm-demo"
    checkpoint: Path | None = None
    unsafe_checkpoint: bool = False  # a checkpoint that needs full unpickling (runs code from the file)
    pretrained: bool = True
    data: Path | None = None
    eval_data: Path | None = None
    limit: int | None = None
    target_gflops: float | None = None
    target_reduction: float | None = None  # percent fewer GFLOPs than the unmerged model
    no_drop: bool = False
    tolerance: float = 0.0
    n_trials: int = 30
    timeout: float | None = None
    seed: int = 0
    space: SearchSpace = field(default_factory=SearchSpace)
    batch_size: int = 128
    workers: int = 0
    device: str = "auto"
    precision: str = "fp32"
    storage: str | None = None
    study_name: str | None = None
    out: Path | None = None

    def check(self) -> None:
        goals = [self.target_gflops is not None, self.target_reduction is not None, self.no_drop]
        if sum(goals) != 1:
            raise UsageError("give exactly one goal: --target-gflops G, --target-reduction P or --no-drop")
        if self.target_reduction is not None and not 0 < self.target_reduction < 100:
            raise UsageError(f"--target-reduction is a percentage in (0, 100), got {self.target_reduction}")
        if self.target_gflops is not None and self.target_gflops <= 0:
            raise UsageError(f"--target-gflops must be positive, got {self.target_gflops}")
        if self.tolerance < 0:
            raise UsageError(f"--tolerance must not be negative, got {self.tolerance}")
        if self.tolerance and not self.no_drop:
            raise UsageError("--tolerance goes with --no-drop")
        if self.n_trials < 1:
            raise UsageError(f"--n-trials must be at least 1, got {self.n_trials}")
        if self.study_name is not None and self.storage is None:
            raise UsageError("--study-name names a study in a --storage; give --storage too")


@dataclass
class Measurement:
    """A setting and the unmerged model on the same images."""

    top1: float
    top5: float
    gflops: float
    baseline_top1: float
    baseline_top5: float
    baseline_gflops: float
    n_images: int
    data: str
    data_fingerprint: str

    @classmethod
    def of(cls, merged: Tally, reference: Tally, images: ImageSet) -> Measurement:
        return cls(top1=merged.top1, top5=merged.top5, gflops=merged.gflops, baseline_top1=reference.top1,
                   baseline_top5=reference.top5, baseline_gflops=reference.gflops, n_images=merged.n_images,
                   data=images.source, data_fingerprint=images.fingerprint)


@dataclass
class CalibrationReport:
    request: CalibrationRequest
    result: SearchResult
    config: ATMConfig
    tuning: Measurement
    reported: Measurement  # on --eval-data when given, else the tuning images
    shared_images: bool  # tuning and reporting used the same images
    reachable_gflops: tuple[float, float] | None
    forward_passes: int  # images through the model for the search (baseline and range check included)
    report_forward_passes: int  # images through the model to measure the result on --eval-data
    preset: Preset

    def to_dict(self) -> dict:
        r = self.reported
        best = self.result.best
        return {
            "model": self.preset.model.name,
            "goal": self.result.goal.describe(),
            "params": self.result.params,
            "top1": r.top1, "top5": r.top5, "gflops": r.gflops,
            "baseline_top1": r.baseline_top1, "baseline_top5": r.baseline_top5, "baseline_gflops": r.baseline_gflops,
            "gflops_reduction": 100.0 * (1.0 - r.gflops / r.baseline_gflops),
            "n_images": r.n_images, "data": r.data, "batch_size": self.request.batch_size,
            "shared_images": self.shared_images,
            "tuning": {"top1": self.tuning.top1, "gflops": self.tuning.gflops, "baseline_top1": self.tuning.baseline_top1,
                       "n_images": self.tuning.n_images, "data": self.tuning.data},
            "best_trial": best.number,
            "n_trials": len(self.result.trials),
            "trials_run": self.result.trials_run,
            "trials_pruned": sum(t.state == "pruned" for t in self.result.trials),
            "trials_repeated": sum(t.repeats is not None for t in self.result.trials),
            "forward_passes": self.forward_passes,
            "naive_forward_passes": self.result.naive_forward_passes,
            "report_forward_passes": self.report_forward_passes,
            "reachable_gflops": list(self.reachable_gflops) if self.reachable_gflops else None,
            "study_name": self.result.study_name,
            "storage": self.request.storage,
            "preset": str(self.preset.path) if self.preset.path else None,
        }


def calibrate(request: CalibrationRequest, on_trial: Callable[[TrialEvent], None] | None = None,
              on_stage: Callable[[str], None] | None = None) -> CalibrationReport:
    """Search, measure the best setting (on --eval-data when given) and build (and save) its preset."""
    request.check()
    stage = on_stage or (lambda message: None)
    stage(f"loading {request.model}")
    loaded = load_model(request.model, request.checkpoint, request.pretrained, request.device, request.precision,
                        unsafe_checkpoint=request.unsafe_checkpoint)
    request.space.validate(len(loaded.model.blocks))
    demo_defaults = loaded.name == DEMO_MODEL_NAME and request.data is None
    if request.data is None and not demo_defaults:
        raise UsageError(f"give --data DIR (images to tune on) for {loaded.name}; only atm-demo has bundled ones")
    data = DEMO_CALIB_DATA if demo_defaults else request.data
    eval_data = DEMO_EVAL_DATA if demo_defaults and request.eval_data is None else request.eval_data

    goal: Goal
    if request.no_drop:
        goal = NoDropGoal(request.tolerance)
    else:
        target = request.target_gflops or loaded.unmerged_gflops * (1 - request.target_reduction / 100)
        goal = BudgetGoal(target)
        check_budget(target, loaded.unmerged_gflops)

    stage(f"loading images from {data}")
    images = load_image_folder(data, loaded, limit=request.limit, seed=request.seed)
    batches = preload(images, request.batch_size, request.workers, loaded.device)
    source = ModelBatches(loaded, batches)
    setup = {"model": loaded.name, "checkpoint_sha256": loaded.checkpoint_sha256, "data": images.fingerprint,
             "batch_size": request.batch_size, "goal": goal.describe(), "space": request.space.to_dict()}
    study = open_study(open_storage(request.storage), request.study_name, goal, setup, request.seed, request.n_trials)

    forward_passes = 0
    cached = study.user_attrs.get(REFERENCE_ATTR)
    if cached is not None:
        reference = Tally.from_record(cached)
    else:
        stage("running the unmerged model")
        reference = source.run_all(None)
        forward_passes += reference.n_images
        study.set_user_attr(REFERENCE_ATTR, reference.to_record())

    reachable = None
    if isinstance(goal, BudgetGoal):
        stage("checking which GFLOPs the ranges reach")
        low, high, spent = reachable_gflops(source, request.space)
        forward_passes += spent
        reachable = (low, high)
        check_budget(goal.target_gflops, reference.gflops, reachable)

    search = Search(source, reference, goal, request.space, PROBE_BATCHES)
    stage("searching")
    result = search.run(study, request.n_trials, request.timeout,
                        _known_good(loaded, goal, reference.gflops), on_trial)
    forward_passes += result.forward_passes
    config = result.best_config  # RunError when no trial met the goal

    tuning = Measurement.of(result.best.tally, reference, images)
    reported, report_passes, shared = tuning, 0, True
    if eval_data is not None and Path(eval_data).resolve() != Path(data).resolve():
        stage(f"measuring the best setting on {eval_data}")
        eval_images = load_image_folder(eval_data, loaded)
        eval_source = ModelBatches(loaded, preload(eval_images, request.batch_size, request.workers))
        merged, unmerged = eval_source.run_all(config), eval_source.run_all(None)
        report_passes = merged.n_images + unmerged.n_images
        reported = Measurement.of(merged, unmerged, eval_images)
        shared = False

    preset = _preset(request, loaded, config, goal, reported, tuning, shared, len(result.trials))
    if request.out is not None:
        save_preset(preset, request.out)
    return CalibrationReport(request=request, result=result, config=config, tuning=tuning, reported=reported,
                             shared_images=shared, reachable_gflops=reachable, forward_passes=forward_passes,
                             report_forward_passes=report_passes, preset=preset)


def _preset(request: CalibrationRequest, loaded: LoadedModel, config: ATMConfig, goal: Goal, reported: Measurement,
            tuning: Measurement, shared: bool, trials: int) -> Preset:
    reduction = 100.0 * (1.0 - reported.gflops / reported.baseline_gflops)
    tuned_elsewhere = {} if shared else {
        "tuning_data": tuning.data, "tuning_data_fingerprint": tuning.data_fingerprint,
        "tuning_top1": tuning.top1, "tuning_gflops": tuning.gflops}
    return build_preset(
        config,
        ModelInfo(name=loaded.name, tag=loaded.tag, num_classes=loaded.num_classes,
                  checkpoint_sha256=loaded.checkpoint_sha256),
        request.batch_size,
        Measured(gflops=reported.gflops, top1=reported.top1, top5=reported.top5, baseline_top1=reported.baseline_top1,
                 baseline_gflops=reported.baseline_gflops, n_images=reported.n_images, data=reported.data,
                 data_limit=request.limit if shared else None, data_fingerprint=reported.data_fingerprint),
        source="atm calibrate",
        description=f"{loaded.name}, atm calibrate ({goal.describe()}): {reported.gflops:.4g} GFLOPs "
                    f"({-reduction:+.0f}%), {reported.top1:.2f}% top-1 on {reported.n_images} images",
        trials=trials, seed=request.seed, target=goal.describe(), **tuned_elsewhere,
    )
