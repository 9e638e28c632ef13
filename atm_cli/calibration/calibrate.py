"""`atm calibrate` below the command line: find ATM thresholds for a model, its data and a goal, as a preset."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import optuna

from atm_cli.engine import ATMConfig
from atm_cli.errors import UsageError, param
from atm_cli.evaluation import (Comparison, ImageSet, LoadedModel, Outcomes, Workload, load_image_folder, load_model,
                                load_unlabelled_images, preload)
from atm_cli.evaluation.data import DEMO_CALIB_DATA, DEMO_EVAL_DATA
from atm_cli.model_names import DEMO_MODEL_ALIAS, DEMO_MODEL_NAME
from atm_cli.presets import Measured, ModelInfo, Preset, build_preset, list_presets

from .goals import Goal, Reduction
from .ranges import RangeFlags
from .search import Search, SearchResult, TrialEvent, interruptible
from .space import SearchSpace
from .speed import SpeedCheck, SpeedTarget, seek_near, time_choice
from .study import claim_seeding, finish_seeding, open_storage, open_study, redact

REFERENCE_ATTR = "atm_reference"  # the unmerged model's results, cached in the study for resuming processes
KNOWN_GOOD = 2  # bundled presets enqueued as the first trials
PROBE_BATCHES = 1  # batches a trial runs before its GFLOPs are checked against the goal


def seed_constant(search: Search, study: optuna.Study, n_trials: int,
                  on_trial: Callable[[TrialEvent], None] | None = None) -> ATMConfig | None:
    """The constant threshold that meets the goal (`Goal.seed`), run as the study's first trials; None when none
    did. Only a fresh study is seeded: a resumed one already ran its seeds."""
    if not claim_seeding(study):  # another process seeds it, or it is seeded
        return None
    return search.goal.seed(search, study, n_trials, on_trial)


def search_on(workload: Workload, goal: Goal, space: SearchSpace, n_trials: int = 30, seed: int | None = 0,
              seeds: Sequence[ATMConfig] = (), rule: str = "argmax",
              on_trial: Callable[[TrialEvent], None] | None = None) -> SearchResult:
    """A search kept in memory, on a workload and its unmerged run (stress, compare).

    `seeds` run first, each on every image (a pruned seed could not promise that the result is at
    least as good); without them the study is seeded with the constant threshold that meets the goal.
    `rule="argmax"` chooses on these images alone (they report on them).
    """
    search = Search(workload, workload.baseline, goal, space, PROBE_BATCHES, rule)
    study = open_study(None, None, goal, {}, seed, n_trials)
    for config in seeds:
        search.try_setting(study, config, n_trials, on_trial, unpruned=True)
    if not seeds:
        seed_constant(search, study, n_trials, on_trial)
    return search.run(study, n_trials, None, (), on_trial)


def _known_good(loaded: LoadedModel, goal: Goal, reference_gflops: float) -> list[ATMConfig]:
    """Bundled ATM presets for this model (and these weights) nearest the goal (`Goal.nearness`): made for the same
    goal first, then by what they measured when made. None for a time goal: a preset's GFLOPs do not say its
    time on this device."""
    presets = [p for p in list_presets(loaded.name, loaded.checkpoint_sha256)
               if p.method_name == ATMConfig.NAME and p.measured.baseline_gflops
               and goal.nearness(p.measured, reference_gflops) is not None]
    # A preset made before presets recorded the goal's key names its goal by its description.
    chosen = sorted(presets, key=lambda p: (not goal.is_named_by(p.provenance.goal or p.provenance.target),
                                            *goal.nearness(p.measured, reference_gflops)))
    return [p.method for p in chosen[:KNOWN_GOOD]]


@dataclass(frozen=True)
class ModelSettings:
    """The model to calibrate, as `evaluation.load_model` loads it."""

    name: str = DEMO_MODEL_ALIAS
    checkpoint: Path | None = None
    pretrained: bool = True
    device: str = "auto"
    precision: str = "fp32"
    unsafe_checkpoint: bool = False  # a checkpoint that needs full unpickling (runs code from the file)
    compile: str = "off"  # auto | on | off (`evaluation.models.resolve_compile`)

    def load(self) -> LoadedModel:
        return load_model(self.name, self.checkpoint, self.pretrained, self.device, self.precision,
                          unsafe_checkpoint=self.unsafe_checkpoint, compile=self.compile)


@dataclass(frozen=True)
class DataSettings:
    """The images to tune on (None: atm-demo's bundled ones) and to report on (None: the tuning ones; atm-demo's
    bundled test images when neither is given), a class-balanced subset of the tuning ones, and the batches."""

    data: Path | None = None
    eval_data: Path | None = None
    limit: int | None = None
    batch_size: int = 128
    workers: int = 0


@dataclass(frozen=True)
class SearchSettings:
    """How the search runs and where its trials are kept (`storage`: None, in memory)."""

    n_trials: int = 30
    timeout: float | None = None  # seconds after which no trial starts
    seed: int = 0  # the sampler's, and the tuning subset's
    rule: str = "paired"  # one of goals.RULES
    ranges: RangeFlags = field(default_factory=RangeFlags)
    storage: str | None = None
    study_name: str | None = None  # the study in `storage` (None: a new one, named by Optuna)


@dataclass
class CalibrationReport:
    result: SearchResult
    config: ATMConfig
    tuning: Measured
    reported: Measured  # on `DataSettings.eval_data` when given, else the tuning images
    shared_images: bool  # tuning and reporting used the same images
    reachable_gflops: tuple[float, float] | None
    constant: ATMConfig | None  # the constant threshold seeded into the study (None: a resumed study, or none met the goal)
    forward_passes: int  # images through the model for the search (baseline and range check included)
    report_forward_passes: int  # images through the model to measure the result on the report images
    preset: Preset
    batch_size: int
    storage: str | None  # where the trials are kept (None: in memory)
    speed: SpeedCheck | None = None  # a time goal's result timed for real
    compiled: bool = False  # the model ran through torch.compile (`ModelSettings.compile`)
    compile_seconds: float = 0.0  # compiling while the search and the report ran (left out of every speed)

    def to_dict(self) -> dict:
        r, t = self.reported, self.tuning
        best, argmax = self.result.best, self.result.argmax
        return {
            "model": self.preset.model.name,
            "goal": self.result.goal.describe(), "goal_key": self.result.goal.key,
            "params": self.config.to_params(),
            "top1": r.top1, "top5": r.top5, "gflops": r.gflops, "agreement": r.agreement,
            "baseline_top1": r.baseline_top1, "baseline_top5": r.baseline_top5, "baseline_gflops": r.baseline_gflops,
            "gflops_reduction": 100.0 * (1.0 - r.gflops / r.baseline_gflops),
            "n_images": r.n_images, "data": r.data, "batch_size": self.batch_size,
            "shared_images": self.shared_images,
            "tuning": {"top1": t.top1, "gflops": t.gflops, "agreement": t.agreement, "baseline_top1": t.baseline_top1,
                       "n_images": t.n_images, "data": t.data},
            "rule": self.result.rule,
            "best_trial": best.number,
            "argmax_trial": argmax.number if argmax is not None else None,
            "budget_note": self.result.goal.note(self.result),
            "constant_threshold": self.constant.alpha if self.constant is not None else None,
            "search_space": self.result.space.to_dict(),
            "n_trials": len(self.result.trials),
            "trials_run": self.result.trials_run,
            "trials_pruned": sum(t.state == "pruned" for t in self.result.trials),
            "trials_repeated": sum(t.repeats is not None for t in self.result.trials),
            "forward_passes": self.forward_passes,
            "study_forward_passes": self.result.study_forward_passes,
            "naive_forward_passes": self.result.naive_forward_passes,
            "report_forward_passes": self.report_forward_passes,
            "reachable_gflops": list(self.reachable_gflops) if self.reachable_gflops else None,
            "study_name": self.result.study_name,
            "storage": redact(self.storage),
            "preset": str(self.preset.path) if self.preset.path else None,
            "speed": self.speed.to_dict() if self.speed is not None else None,
            "compiled": self.compiled, "compile_seconds": self.compile_seconds,
        }


def calibrate(goal: Goal | Reduction | SpeedTarget, model: ModelSettings = ModelSettings(),
              data: DataSettings = DataSettings(), search: SearchSettings = SearchSettings(),
              on_trial: Callable[[TrialEvent], None] | None = None,
              on_stage: Callable[[str], None] | None = None) -> CalibrationReport:
    """Search for `goal`, measure the best setting (on `data.eval_data` when given) and build its preset."""
    stage = on_stage or (lambda message: None)
    stage(f"loading {model.name}")
    storage = open_storage(search.storage)  # a storage problem is found before the model and data load
    loaded = model.load()
    tuning_folder, eval_folder = _folders(data, loaded)
    stage(f"loading images from {tuning_folder}")
    images = _tuning_images(data, search.seed, loaded, tuning_folder, goal.label_free)
    # Trials see the images in a fixed random order (see ImageSet.in_fixed_random_order); the report below
    # measures in the folder's order, as `atm eval` does (ATM's r depends on which images share a batch).
    source = Workload(loaded, preload(images.in_fixed_random_order(), data.batch_size, data.workers,
                                      loaded.device), images.source)
    stage("measuring the search ranges")
    space = search.ranges.resolve(source)
    range_passes = len(source.batches[0][1]) if search.ranges.measures else 0
    goal, latency = goal.on_workload(source, space, stage)  # a time goal on the device's latency model
    stage("checking what the ranges reach")
    reachable = goal.check_reachable(source, space)
    study = open_study(storage, search.study_name, goal, _setup(data, loaded, images, space), search.seed,
                       search.n_trials)

    with interruptible(study):  # Ctrl-C anywhere from here on says how many trials are kept
        reference = _reference(study, source, stage)
        trials = Search(source, reference, goal, space, PROBE_BATCHES, search.rule)
        stage("seeding with a constant threshold")
        constant = seed_constant(trials, study, search.n_trials, on_trial)
        finish_seeding(study)
        stage("searching")
        result = trials.run(study, search.n_trials, search.timeout, _known_good(loaded, goal, reference.gflops),
                            on_trial)
        config = result.best_config  # RunError when no trial met the goal
        speed = None
        if latency is not None:
            stage("timing the chosen setting against the unmerged model")
            # RunError (no merging) when it measured slower; a faster trial when it measured short of the goal
            result, speed = time_choice(source, result, latency, seek_near(trials, study, on_trial))
            config = result.best_config
        forward_passes = range_passes + source.images_run
        tuning = Measured.of(Comparison(result.best.outcomes, reference, images.labelled), images.source,
                             images.fingerprint, data.limit)
        shared = eval_folder is None or Path(eval_folder).resolve() == Path(tuning_folder).resolve()
        report_images = images if shared else load_image_folder(eval_folder, loaded)
        stage(f"measuring the best setting on {report_images.root}")
        reported, report_source = _measure(config, report_images, data, loaded, data.limit if shared else None)

    preset = _preset(data, search.seed, loaded, config, goal, space, reported, tuning, shared, len(result.trials),
                     speed)
    return CalibrationReport(result=result, config=config, tuning=tuning, reported=reported, shared_images=shared,
                             reachable_gflops=reachable, constant=constant, forward_passes=forward_passes,
                             report_forward_passes=report_source.images_run, preset=preset,
                             batch_size=data.batch_size, storage=search.storage, speed=speed,
                             compiled=loaded.compiled,
                             compile_seconds=source.compile_seconds + report_source.compile_seconds)


def _folders(data: DataSettings, loaded: LoadedModel) -> tuple[Path, Path | None]:
    """The images to tune on and those to report on (None: the same); atm-demo's bundled ones by default."""
    demo_defaults = loaded.name == DEMO_MODEL_NAME and data.data is None
    if data.data is None and not demo_defaults:
        raise UsageError(f"give {param('data')} DIR (images to tune on) for {loaded.name}; only atm-demo has bundled ones")
    tuning = DEMO_CALIB_DATA if demo_defaults else data.data
    return tuning, DEMO_EVAL_DATA if demo_defaults and data.eval_data is None else data.eval_data


def _tuning_images(data: DataSettings, seed: int, loaded: LoadedModel, folder: Path, label_free: bool) -> ImageSet:
    if label_free:  # any folder of images: labels, where there are any, are not read
        return load_unlabelled_images(folder, loaded, limit=data.limit, seed=seed)
    return load_image_folder(folder, loaded, limit=data.limit, seed=seed)


def _setup(data: DataSettings, loaded: LoadedModel, images: ImageSet, space: SearchSpace) -> dict:
    """What a resumed study must have been started with (`open_study` adds the goal)."""
    return {"model": loaded.name, "checkpoint_sha256": loaded.checkpoint_sha256, "data": images.fingerprint,
            "order": "fixed-random", "batch_size": data.batch_size, "space": space.to_dict()}


def _reference(study: optuna.Study, source: Workload, stage: Callable[[str], None]) -> Outcomes:
    """The unmerged model on the tuning images, cached in the study for resuming processes."""
    cached = study.user_attrs.get(REFERENCE_ATTR)
    if cached is not None:
        return Outcomes.from_record(cached)
    stage("running the unmerged model")
    reference = source.run(None)
    study.set_user_attr(REFERENCE_ATTR, reference.to_record())
    return reference


def _measure(config: ATMConfig, images: ImageSet, data: DataSettings, loaded: LoadedModel,
             limit: int | None) -> tuple[Measured, Workload]:
    """`config` beside the unmerged model on `images` in the folder's order, and the workload that ran them."""
    workload = Workload(loaded, preload(images, data.batch_size, data.workers, loaded.device), images.source)
    run = Comparison(workload.run(config), workload.baseline, images.labelled)
    return Measured.of(run, images.source, images.fingerprint, limit), workload


def _preset(data: DataSettings, seed: int, loaded: LoadedModel, config: ATMConfig, goal: Goal, space: SearchSpace,
            reported: Measured, tuning: Measured, shared: bool, trials: int, speed: SpeedCheck | None = None) -> Preset:
    reduction = 100.0 * (1.0 - reported.gflops / reported.baseline_gflops)
    tuned_elsewhere = {} if shared else {
        "tuning_data": tuning.data, "tuning_data_fingerprint": tuning.data_fingerprint,
        "tuning_top1": tuning.top1, "tuning_gflops": tuning.gflops}
    measured_on = {"device_type": loaded.device.type, "precision": loaded.precision}  # every figure depends on them
    timed = {} if speed is None else {"device": speed.device, "compiled": speed.compiled}
    if speed is not None:  # where it was timed goes with the figure: provenance above, batch_size beside
        reported = dataclasses.replace(reported, speedup=speed.chosen.speedup,
                                       speedup_spread=[speed.chosen.speedup_low, speed.chosen.speedup_high])
    return build_preset(
        config,
        ModelInfo(name=loaded.name, tag=loaded.tag, num_classes=loaded.num_classes,
                  checkpoint_sha256=loaded.checkpoint_sha256),
        data.batch_size,
        reported,
        source="atm calibrate",
        description=f"{loaded.name}, atm calibrate ({goal.describe()}): {reported.gflops:.4g} GFLOPs "
                    f"({-reduction:+.0f}%), " + (f"{reported.top1:.2f}% top-1" if reported.top1 is not None else
                                                 f"{reported.agreement:.2f}% agreement") +
                    f" on {reported.n_images} images" +
                    ("" if speed is None else f", {speed.chosen.speedup:.2f}x measured on {speed.device}"),
        trials=trials, seed=seed, target=goal.describe(), goal=goal.key, search_space=space.to_dict(),
        **tuned_elsewhere, **measured_on, **timed,
    )
