"""`atm calibrate`: the search's constraints, pruning and accounting, resuming, several processes, the preset."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
import torch
from typer.testing import CliRunner

from atm_cli.calibration import (AgreementGoal, BudgetGoal, DataSettings, ModelSettings, NoDropGoal, RangeFlags,
                                 Reduction, Search, SearchSettings, SearchSpace, calibrate, reachable_gflops)
from atm_cli.calibration.goals import trails
from atm_cli.calibration.search import GFLOPS_SLACK, SearchInterrupted, interruptible
from atm_cli.calibration.calibrate import seed_constant
from atm_cli.calibration.seeding import check_budget, constant_for_budget
from atm_cli.calibration.study import open_storage, open_study
from atm_cli.engine import merging
from atm_cli.evaluation import BatchOutcome, Outcomes, load_model, load_unlabelled_images, preload
from atm_cli.cli.app import app
from atm_cli.engine import ATMConfig, threshold_schedule
from atm_cli.errors import UsageError
from atm_cli.presets import load_preset

from helpers import a_preset, calibrate_args

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
optuna.logging.set_verbosity(optuna.logging.WARNING)


class HandBuilt:
    """A stand-in for a model on fixed batches, with accuracy and GFLOPs given by formulas.

    Merging strength s grows as the thresholds fall. GFLOPs fall with s, and each batch has its
    own fixed factor (batches differ in GFLOPs alike for every setting, as real ones do). Image i
    is right when its robustness u_i clears a bar that rises with s, with a setting-dependent
    wobble so that settings disagree on images in both directions.
    """

    depth = 12

    def __init__(self, n_images: int = 600, batch_size: int = 50, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.u = rng.random(n_images)
        self.sizes = [min(batch_size, n_images - start) for start in range(0, n_images, batch_size)]
        self.n_batches = len(self.sizes)
        self.batch_factor = 1 + rng.uniform(-0.15, 0.15, self.n_batches)
        self.images_run = 0

    def strength(self, config: ATMConfig | None) -> float:
        return 0.0 if config is None else 1.0 - float(np.mean(threshold_schedule(config, self.depth)))

    def correct(self, config: ATMConfig | None, index: int) -> np.ndarray:
        start = sum(self.sizes[:index])
        u = self.u[start:start + self.sizes[index]]
        s = self.strength(config)
        return u + 0.02 * np.sin(1000 * s * u) > 0.25 + 1.5 * s ** 2

    def gflops(self, config: ATMConfig | None, index: int) -> float:
        return (1.0 - 3.0 * self.strength(config)) * self.batch_factor[index]

    def run_batch(self, config: ATMConfig | None, index: int) -> BatchOutcome:
        self.images_run += self.sizes[index]
        correct = self.correct(config, index)
        # Every image's label is class 0; a wrong image predicts class 1.
        return BatchOutcome(correct=correct, predictions=(~correct).astype(np.int64), correct5=int(correct.sum()),
                            gflops=self.gflops(config, index), tokens=(1,) * self.depth)

    def full(self, config: ATMConfig | None) -> tuple[float, float]:
        """Top-1 and GFLOPs of a setting on every image, computed directly (not through the search)."""
        right = sum(int(self.correct(config, i).sum()) for i in range(self.n_batches))
        gflops = sum(n * self.gflops(config, i) for i, n in enumerate(self.sizes)) / sum(self.sizes)
        return 100.0 * right / sum(self.sizes), gflops


def reference_of(source: HandBuilt) -> Outcomes:
    outcomes = Outcomes([source.run_batch(None, index) for index in range(source.n_batches)])
    source.images_run = 0
    return outcomes


def run_search(source, goal, n_trials=24, storage=None, study_name=None, seed=0, known_good=(), setup=None,
               rule="argmax", space=SearchSpace()):
    """The search, its study and its result, on the hand-built stand-in."""
    search = Search(source, reference_of(source), goal, space, probe_batches=1, rule=rule)
    study = open_study(storage, study_name, goal, setup or {}, seed, n_trials)
    return search, study, search.run(study, n_trials, known_good=known_good)


def config_of(params: dict) -> ATMConfig:
    return ATMConfig(alpha=params["alpha"], beta=params["beta"], theta_min=params["theta_min"])


def test_budget_is_a_constraint_every_feasible_trial_meets():
    source = HandBuilt()
    target = 0.7
    _, study, result = run_search(source, BudgetGoal(target))
    complete = [t for t in result.trials if t.state == "complete"]
    assert complete and any(t.state == "pruned" for t in result.trials)
    for trial in complete:
        top1, gflops = source.full(config_of(trial.params))
        assert trial.top1 == pytest.approx(top1) and trial.gflops == pytest.approx(gflops)
        assert trial.feasible == (gflops <= target)
    feasible = [t for t in complete if t.feasible]
    best = max(feasible, key=lambda t: (t.top1, -t.gflops))
    assert result.best.number == best.number and result.gflops <= target
    # The budget is an Optuna constraint on each trial; the value stays the plain top-1 (no penalty).
    for frozen in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        top1, gflops = source.full(config_of(frozen.params))
        assert frozen.constraints["goal"] == pytest.approx(gflops - target)
        assert frozen.value == pytest.approx(top1)


def test_no_drop_respects_the_floor_and_certain_failures_really_fail():
    source = HandBuilt()
    reference = reference_of(source)
    tolerance = 0.5
    floor = reference.top1 - tolerance
    _, _, result = run_search(source, NoDropGoal(tolerance), n_trials=30)
    complete = [t for t in result.trials if t.state == "complete"]
    for trial in complete:
        top1, _ = source.full(config_of(trial.params))
        assert trial.feasible == (top1 >= floor - 1e-9)
    assert result.top1 >= floor
    assert result.gflops == min(t.gflops for t in complete if t.feasible)
    for trial in result.trials:
        if trial.reason and "already exceed the tolerance" in trial.reason:
            assert source.full(config_of(trial.params))[0] < floor


def test_forward_passes_are_counted_and_well_under_a_naive_search():
    source = HandBuilt()
    _, _, result = run_search(source, BudgetGoal(0.7), n_trials=30)
    assert result.forward_passes == source.images_run  # the stand-in's own count
    fresh = sum(t.images for t in result.trials if t.repeats is None)
    assert fresh <= result.forward_passes <= sum(t.images for t in result.trials)
    assert result.naive_forward_passes == 2 * 30 * 600
    assert result.forward_passes + 600 <= 0.25 * result.naive_forward_passes  # baseline once, trials cut short


def test_known_good_settings_run_first():
    known = ATMConfig(alpha=0.99, beta=0.04, theta_min=0.86)
    _, _, result = run_search(HandBuilt(), BudgetGoal(0.7), n_trials=3, known_good=[known])
    assert config_of(result.trials[0].params) == known


def test_first_trials_are_presets_made_for_the_goal_by_its_key_or_an_older_preset_by_its_prose(monkeypatch):
    goal = BudgetGoal(3.3)
    by_key, by_prose, other = (a_preset(method=ATMConfig(alpha, 0.0, alpha)) for alpha in (0.9, 0.91, 0.92))
    by_key.provenance.goal, by_key.measured.gflops = goal.key, 2.0
    by_prose.provenance.target, by_prose.measured.gflops = goal.describe(), 1.9  # made before presets kept keys
    other.provenance.goal, other.measured.gflops = BudgetGoal(3.25).key, 3.2  # the nearest, for another goal
    workflow = sys.modules["atm_cli.calibration.calibrate"]
    monkeypatch.setattr(workflow, "list_presets", lambda name, sha256: [other, by_prose, by_key])
    loaded = SimpleNamespace(name=by_key.model.name, checkpoint_sha256=by_key.model.checkpoint_sha256)
    assert workflow._known_good(loaded, goal, 4.6) == [by_key.method, by_prose.method]


def chance_of_finishing_level(seen: int, remaining: int, won: int, lost: int, rng, draws: int = 40000) -> float:
    """By simulation: per-image loss/tie/win rates drawn from their posterior (flat Dirichlet) given
    the images seen, then the remaining images drawn from those rates; how often the final gap is
    above 0, counting a gap of exactly 0 half (the usual continuity correction for a normal model)."""
    rates = rng.dirichlet([lost + 1, seen - won - lost + 1, won + 1], draws)
    rest = rng.multinomial(remaining, rates)
    gap = won - lost + rest[:, 2] - rest[:, 0]
    return float((gap > 0).mean() + 0.5 * (gap == 0).mean())


@pytest.mark.parametrize("seen,remaining", [(128, 872), (200, 800), (500, 500), (700, 300), (896, 104)])
def test_a_trial_is_stopped_when_its_chance_of_finishing_level_is_below_phi_of_minus_z(seen, remaining):
    rng = np.random.default_rng(0)
    z, threshold = 1.0, 0.159  # Phi(-1)
    for differ in (10, 30, 60):
        for behind in range(0, differ + 1, 2):
            lost, won = (differ + behind) // 2, (differ - behind) // 2
            reference = np.zeros(seen, bool)
            correct = np.zeros(seen, bool)
            reference[:lost] = True
            correct[lost:lost + won] = True
            chance = chance_of_finishing_level(seen, remaining, won, lost, rng)
            stopped = trails(correct, reference, remaining, z)[2]
            if abs(chance - threshold) > 0.01:  # the normal model's error, and the simulation's
                assert stopped == (chance < threshold), (differ, behind, chance)


def test_a_setting_with_the_thresholds_of_an_earlier_trial_is_read_back_not_run():
    # alpha <= theta_min: every block's threshold is theta_min, whatever alpha and beta are.
    flat = ATMConfig(alpha=0.945, beta=0.02, theta_min=0.945)
    same = ATMConfig(alpha=0.945, beta=0.035, theta_min=0.945)
    other = ATMConfig(alpha=0.95, beta=0.035, theta_min=0.945)  # block 1's threshold is 0.95
    assert flat.setting_key(12) == same.setting_key(12) != other.setting_key(12)
    assert flat.setting_key(12) != ATMConfig(0.945, 0.02, 0.945, split_layer=3).setting_key(12)
    source = HandBuilt()
    _, _, result = run_search(source, NoDropGoal(100.0), n_trials=3, known_good=[flat, same, other])
    first, repeat, third = result.trials
    assert (first.repeats, repeat.repeats, third.repeats) == (None, 0, None)
    assert first.state == repeat.state == "complete"  # a tolerance of 100 points
    assert (repeat.top1, repeat.gflops) == (first.top1, first.gflops) == source.full(same)
    assert source.images_run == result.forward_passes == 600 + third.images  # the repeat ran no image


def test_a_repeat_of_a_pruned_setting_runs_only_the_batches_it_did_not_reach():
    source = HandBuilt()
    search = Search(source, reference_of(source), NoDropGoal(0.0), SearchSpace(), probe_batches=1)
    study = open_study(None, None, search.goal, {}, 0, 2)
    harsh = ATMConfig(alpha=0.945, beta=0.05, theta_min=0.8)  # merges hard: loses images from the first batch
    study.enqueue_trial({"alpha": harsh.alpha, "beta": harsh.beta, "theta_min": harsh.theta_min})
    study.optimize(search.objective, n_trials=1)
    pruned = study.trials[0]
    assert pruned.state == optuna.trial.TrialState.PRUNED and pruned.user_attrs["images"] < 600
    images_before = source.images_run
    study.enqueue_trial({"alpha": harsh.alpha, "beta": harsh.beta, "theta_min": harsh.theta_min})
    study.optimize(search.objective, n_trials=1)
    repeat = study.trials[1]
    assert repeat.user_attrs["repeats_trial"] == 0 and repeat.state == optuna.trial.TrialState.PRUNED
    assert repeat.user_attrs["images"] == pruned.user_attrs["images"]  # same batches, same verdict
    assert source.images_run == images_before  # all of them read back


def test_gflops_estimate_scales_by_complete_trials_batch_profiles():
    source = HandBuilt()
    search, study, _ = run_search(source, BudgetGoal(0.7), n_trials=12)
    config = ATMConfig(alpha=0.95, beta=0.05, theta_min=0.8)
    tally = Outcomes([source.run_batch(config, 0)])
    true = source.full(config)[1]
    mean_factor = np.dot(source.sizes, source.batch_factor) / sum(source.sizes)
    assert tally.gflops / true == pytest.approx(source.batch_factor[0] / mean_factor)  # one batch alone is off
    estimate, slack = search.estimate_gflops(tally, search.gflops_ratios(study))
    assert estimate == pytest.approx(true, rel=1e-9)  # every setting shares the batch factors here
    assert slack == pytest.approx(GFLOPS_SLACK, abs=1e-9)  # no spread in the ratios: only the base slack


def test_resume_in_process_keeps_finished_trials(tmp_path):
    storage = f"sqlite:///{tmp_path / 'calib.db'}"
    setup = {"data": "abc"}
    _, _, first = run_search(HandBuilt(), BudgetGoal(0.7), n_trials=6, storage=open_storage(storage),
                             study_name="s", setup=setup)
    _, _, second = run_search(HandBuilt(), BudgetGoal(0.7), n_trials=10, storage=open_storage(storage),
                           study_name="s", setup=setup)
    assert len(second.trials) == 10 and second.trials_run == 4
    assert [(t.number, t.params, t.top1) for t in second.trials[:6]] == [(t.number, t.params, t.top1) for t in first.trials]
    with pytest.raises(UsageError, match="started with another data"):
        run_search(HandBuilt(), BudgetGoal(0.7), n_trials=10, storage=open_storage(storage), study_name="s",
                   setup={"data": "other"})


def test_bad_ranges_budgets_and_storages_are_refused(tmp_path):
    with pytest.raises(UsageError, match="lies above the alpha range"):
        SearchSpace(alpha=(0.9, 0.95), theta_min=(0.96, 0.99)).validate(12)
    with pytest.raises(UsageError, match="is empty"):
        SearchSpace(beta=(0.05, 0.01)).validate(12)
    with pytest.raises(UsageError, match="split_layer must lie in 0..12"):
        SearchSpace(split_layer=13).validate(12)
    source = HandBuilt()
    low, high, images = reachable_gflops(source, SearchSpace())
    assert images == 2 * source.sizes[0]
    most, least = SearchSpace().extremes()
    assert low == pytest.approx(source.gflops(most, 0)) and high == pytest.approx(source.gflops(least, 0))
    with pytest.raises(UsageError, match=f"{low:.4g}-{high:.4g} GFLOPs"):
        check_budget(low * 0.5, 1.0, (low, high))
    with pytest.raises(UsageError, match="not below the unmerged model"):
        check_budget(1.5, 1.0)
    for bad in ("nosuchdialect://x", f"sqlite:///{tmp_path}/missing/dir/x.db", str(tmp_path / "missing" / "j.log")):
        with pytest.raises(UsageError, match="cannot open the study storage"):
            open_storage(bad)


def test_calibrate_cli_writes_a_preset_that_eval_reproduces(tiny, tmp_path):
    preset_path = tmp_path / "tiny.yaml"
    outcome = runner.invoke(app, calibrate_args(tiny, "--target-reduction", "20", "--n-trials", "8",
                                                "--eval-data", str(tiny["eval"]), "--out", str(preset_path), "--json"))
    assert outcome.exit_code == 0, outcome.output
    result = json.loads(outcome.stdout)
    assert {"params", "top1", "gflops", "baseline_top1", "baseline_gflops", "n_trials", "forward_passes",
            "naive_forward_passes", "preset"} <= set(result)
    assert result["preset"] == str(preset_path) and result["shared_images"] is False
    assert result["tuning"]["gflops"] <= result["baseline_gflops"] * 0.8  # the budget held on the tuning images
    preset = load_preset(preset_path, model_name="vit_tiny_patch16_224")
    assert preset.measured.data_fingerprint and preset.provenance.tuning_data_fingerprint
    assert preset.measured.data_fingerprint != preset.provenance.tuning_data_fingerprint
    assert preset.params["alpha"] == result["params"]["alpha"]

    evaluated = runner.invoke(app, ["eval", "--model", str(tiny["model"]), "--data", str(tiny["eval"]),
                                    "--preset", str(preset_path), "--workers", "0", "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    check = json.loads(evaluated.stdout)
    assert check["batch_size"] == preset.batch_size == 8  # eval takes the preset's batch size
    assert check["gflops"] == preset.measured.gflops == result["gflops"]  # exactly
    assert check["top1"] == preset.measured.top1 and check["n_images"] == preset.measured.n_images
    assert check["baseline_gflops"] == preset.measured.baseline_gflops
    assert check["data_fingerprint"] == preset.measured.data_fingerprint


def test_tuning_and_reporting_on_the_same_images_is_said(tiny):
    outcome = runner.invoke(app, calibrate_args(tiny, "--no-drop", "--n-trials", "4", "--json"))
    assert outcome.exit_code == 0, outcome.output
    result = json.loads(outcome.stdout)
    assert result["shared_images"] is True and result["top1"] >= result["baseline_top1"]
    assert "tuned and reported on the same images" in outcome.stderr


def test_rule_argmax_chooses_the_best_trial_on_the_tuning_images(tiny):
    outcome = runner.invoke(app, calibrate_args(tiny, "--no-drop", "--n-trials", "6", "--rule", "argmax", "--json"))
    assert outcome.exit_code == 0, outcome.output
    result = json.loads(outcome.stdout)
    assert result["rule"] == "argmax" and result["best_trial"] == result["argmax_trial"]


def test_forward_passes_match_a_count_of_the_model_own_calls(tiny, monkeypatch):
    workflow = sys.modules["atm_cli.calibration.calibrate"]  # the module (the package's `calibrate` is its function)
    counted = []
    load_model = workflow.load_model

    def load_and_count(*args, **kwargs):
        loaded = load_model(*args, **kwargs)
        loaded.model.register_forward_hook(lambda module, inputs, output: counted.append(len(inputs[0])))
        return loaded

    monkeypatch.setattr(workflow, "load_model", load_and_count)
    data = DataSettings(tiny["data"], tiny["eval"], batch_size=8)
    ranges = RangeFlags(alpha=(0.5, 1.0), beta=(0.0, 0.2), theta_min=(0.3, 1.0), step=0.01)
    report = calibrate(Reduction(20), ModelSettings(str(tiny["model"])), data,
                       SearchSettings(n_trials=8, ranges=ranges))
    assert report.forward_passes + report.report_forward_passes == sum(counted)
    assert report.report_forward_passes == 2 * 24  # the held-out images, merged and unmerged
    assert report.result.naive_forward_passes == 2 * 8 * 36


@pytest.mark.parametrize("flags, message", [
    (["--target-reduction", "99"], "below what any setting in range reaches"),
    (["--target-gflops", "1.0"], "not below the unmerged model"),
    (["--no-drop", "--theta-min-range", "0.9,0.95", "--alpha-range", "0.5,0.6"], "lies above the alpha range"),
    (["--no-drop", "--storage", "nosuchdialect://host/db"], "cannot open the study storage"),
    ([], "give exactly one goal"),
    (["--no-drop", "--target-reduction", "30"], "give exactly one goal"),
    (["--no-drop", "--rule", "best"], "--rule is one of paired, argmax"),
])
def test_bad_input_is_one_line_and_exit_2(tiny, flags, message):
    outcome = runner.invoke(app, calibrate_args(tiny, "--n-trials", "2", *flags))
    assert outcome.exit_code == 2, outcome.output
    assert outcome.stderr.startswith("atm: error:") and outcome.stderr.count("\n") == 1
    assert message in outcome.stderr


def cli_process(tiny, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "atm_cli", *calibrate_args(tiny, "--target-reduction", "20",
                                                                              "--json", *extra)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finished(storage: str, name: str) -> list[optuna.trial.FrozenTrial]:
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return []
    return study.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))


def test_ctrl_c_between_trials_counts_the_finished_trials_kept():
    """Ctrl-C outside a trial (a seed's GFLOPs bisection, the report on new images) still says how many
    finished trials the study keeps; one raised inside a trial passes through with its own count."""
    study = optuna.create_study()
    for value in (0.5, 0.7):
        study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=value))
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, state=optuna.trial.TrialState.FAIL))
    with pytest.raises(SearchInterrupted) as between:
        with interruptible(study):
            raise KeyboardInterrupt
    assert between.value.kept == 2
    with pytest.raises(SearchInterrupted) as inside:
        with interruptible(study):
            raise SearchInterrupted(7)
    assert inside.value.kept == 7


def test_an_interrupt_that_optunas_clean_up_hides_is_still_an_interrupt():
    """SIGTERM inside a journal storage's lock once surfaced as the FileNotFoundError its release raised (exit 1,
    a traceback); the interrupt behind it is what the user gets told about. Other errors pass through."""
    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=0.5))
    with pytest.raises(SearchInterrupted) as hidden:
        with interruptible(study):
            try:
                raise KeyboardInterrupt
            finally:
                raise FileNotFoundError("the lock file, released before it was taken")
    assert hidden.value.kept == 1
    with pytest.raises(FileNotFoundError):
        with interruptible(study):
            raise FileNotFoundError("a real failure")


@pytest.mark.slow
def test_ctrl_c_mid_trial_says_what_is_kept_in_one_line_and_the_same_command_resumes(tiny, tmp_path):
    storage = f"sqlite:///{tmp_path / 'calib.db'}"
    flags = ["--storage", storage, "--study-name", "ctrl-c"]
    first = cli_process(tiny, *flags, "--n-trials", "1000")
    deadline = time.time() + 300
    while len(finished(storage, "ctrl-c")) < 3 and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    first.send_signal(signal.SIGINT)  # as Ctrl-C in a terminal: most likely in a trial's forward passes
    out, err = first.communicate(timeout=120)
    assert first.returncode == 130 and out == "", err
    kept = finished(storage, "ctrl-c")
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"interrupted: {len(kept)} finished trials are kept in {storage}"), err
    study = optuna.load_study(study_name="ctrl-c", storage=storage)
    assert len(study.get_trials()) - len(kept) <= 1  # at most the trial in flight was lost

    before = {t.number: (t.params, t.value, t.state) for t in kept}
    second = cli_process(tiny, *flags, "--n-trials", str(len(kept) + 2))
    out, err = second.communicate(timeout=600)
    assert second.returncode == 0, err
    assert json.loads(out)["trials_run"] == 2
    assert {n: v for n, v in ((t.number, (t.params, t.value, t.state)) for t in finished(storage, "ctrl-c"))
            if n in before} == before


@pytest.mark.slow
def test_an_interrupted_search_resumes_with_its_trials(tiny, tmp_path):
    storage = f"sqlite:///{tmp_path / 'calib.db'}"
    first = cli_process(tiny, "--storage", storage, "--study-name", "resume", "--n-trials", "1000")
    deadline = time.time() + 300
    while len(finished(storage, "resume")) < 3 and time.time() < deadline and first.poll() is None:
        time.sleep(0.2)
    first.kill()  # no chance to clean up, as with a power cut
    first.wait()
    before = {t.number: (t.params, t.value, t.state) for t in finished(storage, "resume")}
    assert len(before) >= 3, first.stderr.read()

    second = cli_process(tiny, "--storage", storage, "--study-name", "resume", "--n-trials", str(len(before) + 3))
    out, err = second.communicate(timeout=600)
    assert second.returncode == 0, err
    result = json.loads(out)
    assert result["trials_run"] == 3 and result["n_trials"] == len(before) + 3
    after = {t.number: (t.params, t.value, t.state) for t in finished(storage, "resume")}
    assert {n: after[n] for n in before} == before  # every trial finished before the kill is kept as it was
    every = optuna.load_study(study_name="resume", storage=storage).get_trials()
    assert len(every) - len(after) <= 1  # at most the trial in flight was lost
    new = [t for t in finished(storage, "resume") if t.number not in before]
    # The range check's two first batches and the new trials' own images (a repeated setting's are read back);
    # the unmerged model's results came from the study, the flags gave every range (none measured), no seeding.
    assert result["forward_passes"] == 2 * 8 + sum(t.user_attrs["images_run"] for t in new)


@pytest.mark.slow
def test_two_processes_search_one_study_together(tiny, tmp_path):
    journal = str(tmp_path / "calib.journal")
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(journal))
    shared = ["--storage", journal, "--study-name", "shared", "--n-trials", "20"]
    other = cli_process(tiny, *shared, "--seed", "1")
    deadline = time.time() + 300
    while not finished(storage, "shared") and time.time() < deadline and other.poll() is None:
        time.sleep(0.05)
    # This process joins the running one (its imports are done, so it starts at once).
    here = runner.invoke(app, calibrate_args(tiny, "--target-reduction", "20", "--json", *shared, "--seed", "2"))
    out, err = other.communicate(timeout=600)
    assert other.returncode == 0 and here.exit_code == 0, (err, here.output)
    trials = finished(storage, "shared")
    assert 20 <= len(trials) <= 21  # each process stops once the study holds 20 (one may be in flight then)
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both processes ran trials
    results = [json.loads(out), json.loads(here.stdout)]
    assert sum(r["trials_run"] for r in results) == len(trials)


# A space whose constants (beta = 0, alpha = theta_min = t) the stand-in can tell apart.
WIDE_SPACE = SearchSpace(alpha=(0.8, 1.0), beta=(0.0, 0.05), theta_min=(0.8, 1.0), step=0.005, beta_step=0.005)


def test_the_budget_constant_is_the_least_merging_one_within_the_budget_on_the_first_batch():
    source = HandBuilt()
    constant, images = constant_for_budget(source, WIDE_SPACE, 0.7, n_batches=1)
    t = constant.alpha
    assert (constant.beta, constant.theta_min) == (0.0, t)
    assert source.gflops(constant, 0) <= 0.7 < source.gflops(ATMConfig.constant(round(t + 0.005, 6)), 0)
    assert images == source.images_run <= 10 * source.sizes[0]  # bisection over 41 constants: a few batches


@pytest.mark.parametrize("goal", [BudgetGoal(0.7), NoDropGoal(0.5)])
def test_atm_is_never_worse_than_the_constant_threshold_it_was_seeded_with(goal):
    source = HandBuilt()
    search = Search(source, reference_of(source), goal, WIDE_SPACE, probe_batches=1, rule="argmax")
    study = open_study(None, None, goal, {}, 0, 12)
    constant = seed_constant(search, study, 12)
    assert constant is not None and constant.beta == 0.0
    result = search.run(study, 12)
    top1, gflops = source.full(constant)  # the constant's figures, from the stand-in's formulas
    if isinstance(goal, BudgetGoal):
        assert result.top1 >= top1 and result.gflops <= 0.7
    else:
        assert top1 >= reference_of(source).top1 - 0.5  # the constant found meets the floor ...
        assert result.gflops <= gflops  # ... and ATM is at least as cheap
        more = ATMConfig.constant(round(constant.alpha - 0.005 * (len(WIDE_SPACE.constants(12)) // 32), 6))
        assert source.full(more)[0] < reference_of(source).top1 - 0.5  # the next constant of its ladder fails


def test_a_budget_search_spends_its_budget_unless_a_cheaper_setting_wins_by_more_than_chance():
    source = HandBuilt()
    target = 0.7
    _, _, result = run_search(source, BudgetGoal(target), n_trials=30, rule="paired", space=WIDE_SPACE)
    complete = [t for t in result.trials if t.state == "complete" and t.gflops <= target]
    chosen = result.best
    closer = [t for t in complete if t.gflops >= 0.9 * target]
    if chosen.gflops < 0.9 * target:  # then every closer trial is beaten by more than chance (a paired count)
        for trial in closer:
            ahead = int(chosen.outcomes.correct.sum()) - int(trial.outcomes.correct.sum())
            differ = int((chosen.outcomes.correct != trial.outcomes.correct).sum())
            assert ahead > 1.645 * differ ** 0.5
    # The choice is tied with the plain best (not beaten by more than chance), and spends more of the budget.
    best = result.argmax
    ahead = int(best.outcomes.correct.sum()) - int(chosen.outcomes.correct.sum())
    assert ahead <= 1.645 * int((best.outcomes.correct != chosen.outcomes.correct).sum()) ** 0.5
    assert chosen.gflops >= best.gflops


def test_a_resumed_study_with_every_trial_done_reports_true_counts(tmp_path):
    storage = f"sqlite:///{tmp_path / 'calib.db'}"
    _, _, first = run_search(HandBuilt(), BudgetGoal(0.7), n_trials=6, storage=open_storage(storage), study_name="s")
    again = HandBuilt()
    _, _, second = run_search(again, BudgetGoal(0.7), n_trials=6, storage=open_storage(storage), study_name="s")
    assert second.trials_run == 0 and second.forward_passes == again.images_run == 0
    assert second.naive_forward_passes == first.naive_forward_passes == 2 * 6 * 600
    assert second.study_forward_passes == first.study_forward_passes == first.forward_passes + 600


def test_min_agreement_calibrates_on_unlabelled_images_at_any_depth(tiny, tmp_path):
    unlabelled = tmp_path / "production"
    for i, path in enumerate(sorted(tiny["data"].rglob("*.png"))):
        target = unlabelled / ("deep/er" if i % 3 == 0 else "flat" if i % 3 == 1 else "") / f"{i:03d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    ranges = RangeFlags(alpha=(0.5, 1.0), beta=(0.0, 0.2), theta_min=(0.3, 1.0), step=0.01)
    report = calibrate(AgreementGoal(agreement=90), ModelSettings(str(tiny["model"])),
                       DataSettings(unlabelled, batch_size=8), SearchSettings(n_trials=6, rule="argmax", ranges=ranges))
    result = report.to_dict()
    assert result["n_images"] == 36 and result["top1"] is None  # no labels: no top-1
    # The agreement, checked on the model itself: the patched and the plain model's classes on the same images.
    loaded = load_model(str(tiny["model"]), device="cpu")
    images = torch.cat([x for x, _ in preload(load_unlabelled_images(unlabelled, loaded), 8)])
    with torch.inference_mode():
        plain = loaded.model(images).argmax(1)
        with merging(loaded.model, report.config):
            merged = loaded.model(images).argmax(1)
    assert result["agreement"] == pytest.approx(100.0 * (plain == merged).float().mean().item())
    assert result["agreement"] >= 90 and report.preset.measured.agreement == result["agreement"]
