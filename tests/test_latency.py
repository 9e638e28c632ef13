"""The latency model: its pure pieces on hand-built tables, its cache, and a measured one's shape (never its times)."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from typer.testing import CliRunner

from atm_cli.calibration import speed as speed_module
from atm_cli.calibration.goals import LatencyGoal
from atm_cli.calibration.speed import fit_settings, speed_goal
from atm_cli.calibration.space import SearchSpace
from atm_cli.engine import ATMConfig, ToMeConfig
from atm_cli.errors import UsageError
from atm_cli.evaluation import BatchOutcome, LoadedModel, Outcomes, load_model
from atm_cli.evaluation import latency as latency_module
from atm_cli.evaluation.latency import (LatencyKey, LatencyModel, MeasuredSpeed, StepCost, TokenTable, cache_dir,
                                        device_latency, fit_nonnegative, measure_speedups, read_cached, token_grid,
                                        write_cached)
from atm_cli.cli.app import app
from atm_cli.presets import Measured, Provenance, load_preset, preset_from_dict

from helpers import calibrate_args, hand_built_latency, save_tiny_vit

runner = CliRunner()

KEY = LatencyKey("Test CPU (1 threads)", "2.0", "vit_test", 8, "fp32", False)


def linear_model(**steps: StepCost) -> LatencyModel:
    """Attention 1 ms and MLP 2 ms per token, stem 100 ms, head 50 ms: every sum is easy to check by hand."""
    grid = (2, 10, 18)
    return LatencyModel(KEY, stem=0.1, head=0.05, attention=TokenTable(grid, tuple(1e-3 * n for n in grid)),
                        mlp=TokenTable(grid, tuple(2e-3 * n for n in grid)), steps=dict(steps))


def test_tables_interpolate_linearly_and_stay_flat_beyond_their_ends():
    table = TokenTable((2, 10, 18), (1.0, 3.0, 4.0))
    assert table.at(10) == 3.0 and table.at(6) == pytest.approx(2.0) and table.at(14) == pytest.approx(3.5)
    assert table.at(1) == 1.0 and table.at(30) == 4.0


def test_the_grid_runs_every_8_tokens_down_from_the_full_count_to_the_fewest():
    assert token_grid(2, 65) == (2, 9, 17, 25, 33, 41, 49, 57, 65)
    assert token_grid(2, 197)[-3:] == (181, 189, 197) and token_grid(2, 197)[0] == 2
    assert token_grid(5, 5) == (5,)


def test_a_prediction_sums_the_blocks_attention_on_tokens_in_and_mlp_on_tokens_after_the_step():
    latency = linear_model(atm=StepCost(per_block=0.01, per_token=1e-4))
    tokens = [10, 8, 6]  # two blocks: 10 in, 8 after the first's step; 8 in, 6 after the second's
    tables = 0.1 + 0.05 + (10e-3 + 2 * 8e-3) + (8e-3 + 2 * 6e-3)
    assert latency.predict_seconds(tokens) == pytest.approx(tables)
    assert latency.predict_seconds(tokens, "atm") == pytest.approx(tables + 2 * 0.01 + 1e-4 * (10 + 8))
    latency.scale = 2.0  # scales the tables, not the fitted steps (they were fitted against scaled tables)
    assert latency.predict_seconds(tokens, "atm") == pytest.approx(2 * tables + 2 * 0.01 + 1e-4 * 18)
    with pytest.raises(KeyError, match="tome"):
        latency.predict_seconds(tokens, "tome")


def test_fewer_tokens_are_predicted_faster_and_the_unmerged_model_has_the_full_count_everywhere():
    latency = linear_model(tome=StepCost(0.0, 1e-5))
    unmerged = latency.unmerged_seconds(depth=4)
    assert unmerged == pytest.approx(latency.predict_seconds([18] * 5))
    merged = latency.predict_seconds([18, 16, 14, 12, 10], "tome")
    fewer = latency.predict_seconds([18, 14, 10, 6, 2], "tome")
    assert fewer < merged < unmerged


def test_a_run_is_predicted_batch_by_batch_weighted_by_its_images():
    latency = linear_model(atm=StepCost(0.0, 0.0))

    def batch(n: int, tokens: tuple[int, ...]) -> BatchOutcome:
        return BatchOutcome(np.ones(n, bool), np.zeros(n, np.int64), n, 1.0, tokens[:-1], tokens[-1])

    big, small = batch(6, (18, 10, 2)), batch(2, (18, 18, 18))
    expected = (6 * latency.predict_seconds([18, 10, 2], "atm") + 2 * latency.predict_seconds([18, 18, 18], "atm")) / 8
    assert latency.outcomes_seconds(Outcomes([big, small]), "atm") == pytest.approx(expected)


def test_the_nonnegative_fit_recovers_exact_costs_and_never_goes_below_zero():
    blocks = np.array([[12, 300.0], [12, 500.0], [12, 700.0]])
    assert fit_nonnegative(blocks, blocks @ [0.002, 1e-5]) == pytest.approx((0.002, 1e-5))
    # Time that falls with more tokens would need a negative per-token cost: the constant alone fits instead.
    per_block, per_token = fit_nonnegative(blocks, np.array([0.03, 0.02, 0.01]))
    assert per_token == 0.0 and per_block == pytest.approx(0.02 / 12)
    assert fit_nonnegative(np.array([[12, 300.0]]), np.array([-0.1])) == (0.0, 0.0)


def test_the_cache_key_names_one_file_per_device_torch_model_batch_precision_and_compile_mode():
    names = {KEY.file_name()}
    for change in ({"device": "Other"}, {"torch_version": "2.1"}, {"model": "vit_other"}, {"batch_size": 16},
                   {"precision": "bf16"}, {"compiled": True}):
        names.add(LatencyKey(**{**KEY.__dict__, **change}).file_name())
    assert len(names) == 7 and all(n.startswith("latency-vit_") and n.endswith(".json") for n in names)
    assert KEY.file_name() == LatencyKey(**KEY.__dict__).file_name()


def test_the_cache_round_trips_and_ignores_damaged_or_foreign_files(tmp_path):
    latency = linear_model(atm=StepCost(0.001, 2e-6, settings=4))
    latency.scale = 1.1
    path = write_cached(latency, tmp_path)
    assert path == tmp_path / KEY.file_name()
    assert read_cached(KEY, tmp_path) == latency
    other = LatencyKey(**{**KEY.__dict__, "batch_size": 16})
    assert read_cached(other, tmp_path) is None  # no file for it
    data = json.loads(path.read_text())
    path.with_name(other.file_name()).write_text(json.dumps(data))  # a file under another key's name
    assert read_cached(other, tmp_path) is None
    path.write_text("{not json")
    assert read_cached(KEY, tmp_path) is None


def test_the_cache_folder_is_the_one_given_else_atm_cache_else_the_home_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATM_CACHE", str(tmp_path / "env"))
    assert cache_dir(tmp_path / "given") == tmp_path / "given"
    assert cache_dir() == tmp_path / "env"
    monkeypatch.delenv("ATM_CACHE")
    assert cache_dir().parts[-2:] == (".cache", "atm")


def test_presets_record_the_speed_and_where_it_was_measured_and_old_ones_still_load():
    base = {"schema_version": 1, "method": "atm", "params": {"alpha": 0.9, "beta": 0.0, "theta_min": 0.9},
            "model": {"name": "vit_test"}, "batch_size": 8, "measured": {"gflops": 1.0},
            "provenance": {"source": "atm calibrate"}}
    old = preset_from_dict(base)
    assert old.measured.speedup is None and old.provenance.device is None
    assert "speedup" not in old.to_dict()["measured"] and "device" not in old.to_dict()["provenance"]
    timed = preset_from_dict({**base, "measured": {"gflops": 1.0, "speedup": 1.31, "speedup_spread": [1.2, 1.4]},
                              "provenance": {"source": "atm calibrate", "device": "Test CPU (1 threads)",
                                             "device_type": "cpu", "precision": "fp32", "compiled": False}})
    assert timed.measured == Measured(gflops=1.0, speedup=1.31, speedup_spread=[1.2, 1.4])
    assert timed.provenance == Provenance(source="atm calibrate", device="Test CPU (1 threads)", device_type="cpu",
                                          precision="fp32", compiled=False)
    assert preset_from_dict(timed.to_dict()) == timed


def test_a_time_goal_caps_the_predicted_time_and_chooses_among_trials_by_it():
    latency = linear_model(atm=StepCost(0.0, 0.0))
    goal = speed_goal(latency, depth=2, speedup=1.25)
    assert isinstance(goal, LatencyGoal) and goal.target_seconds == pytest.approx(latency.unmerged_seconds(2) / 1.25)
    assert goal.describe() == "max top-1 subject to predicted speedup >= 1.25"

    def run(tokens: tuple[int, ...], right: int) -> Outcomes:
        correct = np.arange(10) < right
        return Outcomes([BatchOutcome(correct, (~correct).astype(np.int64), right, 1.0, tokens[:-1], tokens[-1])])

    heavy, light = run((18, 6, 2), right=8), run((18, 14, 12), right=9)
    assert goal.constraint(heavy, heavy) < 0 < goal.constraint(light, light)  # only the heavy merging is fast enough
    by_ms = speed_goal(latency, depth=2, latency_ms=200)
    assert by_ms.target_seconds == 0.2 and "200 ms per batch" in by_ms.describe()
    with pytest.raises(UsageError, match="not below the unmerged"):
        speed_goal(latency, depth=2, latency_ms=1e4)


def test_the_step_cost_is_fitted_on_constants_spread_over_the_space():
    space = SearchSpace(alpha=(0.8, 1.0), beta=(0.0, 0.05), theta_min=(0.8, 1.0), step=0.01)
    configs = fit_settings(space, depth=12)
    thresholds = [c.alpha for c in configs]
    assert len(configs) == 4 and all(c.beta == 0 and c.alpha == c.theta_min for c in configs)
    assert thresholds == sorted(thresholds, reverse=True) and thresholds[0] == pytest.approx(1.0)
    assert thresholds[-1] == pytest.approx(0.8)


@pytest.fixture(scope="module")
def tiny_loaded(tmp_path_factory) -> LoadedModel:
    return load_model(str(save_tiny_vit(tmp_path_factory.mktemp("tiny"), num_classes=3)), device="cpu")


def test_a_measured_model_has_its_tables_steps_and_key_and_is_read_back_from_the_cache(tiny_loaded, tmp_path,
                                                                                     monkeypatch):
    images = torch.randn(4, *tiny_loaded.data_config["input_size"])
    fits = {"atm": [ATMConfig.constant(t) for t in (0.9, 0.5)], "tome": [ToMeConfig(r=1), ToMeConfig(r=3)]}
    latency = device_latency(tiny_loaded, images, fits, folder=tmp_path)
    full = tiny_loaded.unmerged_tokens[0]
    assert latency.key == LatencyKey.of(tiny_loaded, 4) and latency.key.batch_size == 4
    assert latency.attention.tokens == token_grid(2, full) and latency.attention.tokens[-1] == full
    assert all(s > 0 for s in (*latency.attention.seconds, *latency.mlp.seconds, latency.stem, latency.head))
    assert set(latency.steps) == {"atm", "tome"}
    assert all(c.per_block >= 0 and c.per_token >= 0 and c.settings == 2 for c in latency.steps.values())

    def no_timing(*args, **kwargs):
        raise AssertionError("measured again instead of read from the cache")

    monkeypatch.setattr(latency_module, "measure_latency", no_timing)
    monkeypatch.setattr(latency_module, "fit_step", no_timing)
    assert device_latency(tiny_loaded, images, fits, folder=tmp_path) == latency


def test_settings_are_timed_beside_the_unmerged_model_with_their_tokens(tiny_loaded):
    images = torch.randn(4, *tiny_loaded.data_config["input_size"])
    (speed,) = measure_speedups(tiny_loaded, images, [ToMeConfig(r=2)], repeats=3)
    assert speed.repeats == 3 and speed.speedup_low <= speed.speedup <= speed.speedup_high
    assert speed.tokens[0] == tiny_loaded.unmerged_tokens[0] and speed.tokens[-1] < speed.tokens[0]


def timed_at(speedup: float):
    def measure(loaded, images, configs, repeats=7, progress=None) -> list[MeasuredSpeed]:
        return [MeasuredSpeed(0.1, 0.1 * speedup, speedup, speedup - 0.1, speedup + 0.1, repeats, (65, 40, 30, 20, 10))
                for _ in configs]
    return measure


def test_calibrate_for_a_speedup_records_the_measured_speed_and_eval_says_where_it_holds(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(speed_module, "device_latency", hand_built_latency)
    monkeypatch.setattr(speed_module, "measure_speedups", timed_at(1.32))
    preset_path = tmp_path / "fast.yaml"
    outcome = runner.invoke(app, calibrate_args(tiny, "--target-speedup", "1.3", "--n-trials", "6", "--out",
                                                str(preset_path), "--json"))
    assert outcome.exit_code == 0, outcome.output
    result = json.loads(outcome.stdout)
    assert result["goal"] == "max top-1 subject to predicted speedup >= 1.3"
    speed = result["speed"]
    assert speed["measured_speedup"] == 1.32 and speed["speedup_spread"] == pytest.approx([1.22, 1.42])
    assert speed["predicted_speedup"] >= 1.3 and speed["predicted_timed_speedup"] > 1
    assert speed["batch_size"] == 8 and speed["compiled"] is False
    preset = load_preset(preset_path, force=True)
    assert preset.measured.speedup == 1.32 and preset.provenance.device == speed["device"]
    assert preset.provenance.precision == "fp32" and preset.provenance.compiled is False

    def evaluate(*extra: str):
        return runner.invoke(app, ["eval", "--model", str(tiny["model"]), "--data", str(tiny["eval"]), "--preset",
                                   str(preset_path), "--workers", "0", *extra])

    here, elsewhere = evaluate(), evaluate("--batch-size", "4")
    assert here.exit_code == elsewhere.exit_code == 0, here.output + elsewhere.output
    assert "does not carry over" not in here.output
    assert f"1.32x speedup was measured on {speed['device']}, batch 8, fp32; it does not carry over to " \
           f"{speed['device']}, batch 4, fp32" in " ".join(elsewhere.output.split())


def test_calibrate_returns_no_merging_when_the_chosen_setting_measured_slower(tiny, monkeypatch):
    monkeypatch.setattr(speed_module, "device_latency", hand_built_latency)
    monkeypatch.setattr(speed_module, "measure_speedups", timed_at(0.9))
    outcome = runner.invoke(app, calibrate_args(tiny, "--target-latency-ms", "600", "--n-trials", "4"))
    assert outcome.exit_code == 1, outcome.output
    lines = outcome.output.strip().splitlines()
    assert "no merging: the best setting found (trial " in lines[-1] and "measured 0.90x" in lines[-1]


@pytest.mark.parametrize("flags, message", [
    (["--target-speedup", "1.3", "--no-drop"], "give exactly one goal"),
    (["--target-speedup", "1.0"], "above 1"),
    (["--target-latency-ms", "0"], "must be positive"),
])
def test_speed_goals_are_checked_before_any_work(tiny, flags, message):
    outcome = runner.invoke(app, calibrate_args(tiny, *flags))
    assert outcome.exit_code == 2 and message in outcome.output and len(outcome.output.strip().splitlines()) == 1


def timed_choice(speedup: float, trials: dict[tuple[int, int], tuple[int, float]], monkeypatch, sought: int = 0):
    """`time_choice` over hand-built trials {(tokens after block 1, after block 2): (right of 10, the device's
    measured over predicted speedup)} on `linear_model`, the timing replaced by those ratios; the last `sought`
    trials are not finished yet: a correction's `seek` adds them."""
    from types import SimpleNamespace

    from atm_cli.calibration.search import SearchResult
    from atm_cli.calibration.trials import Finished

    latency = linear_model(atm=StepCost(0.0, 0.0))
    goal = speed_goal(latency, depth=2, speedup=speedup)
    space = SearchSpace(alpha=(0.8, 1.0), beta=(0.0, 0.05), theta_min=(0.8, 1.0), step=0.01)
    unmerged = latency.unmerged_seconds(2)

    def trial(number: int, tokens: tuple[int, ...], right: int) -> Finished:
        correct = np.arange(10) < right
        outcomes = Outcomes([BatchOutcome(correct, (~correct).astype(np.int64), right, 1.0, tokens[:-1], tokens[-1])])
        params = {"alpha": 1.0 - number / 100, "beta": 0.0, "theta_min": 0.8}
        return Finished(number, "complete", params, outcomes, goal.constraint(outcomes, outcomes) <= 0, hits=correct)

    finished = [trial(i, (18, *after), right) for i, (after, (right, _)) in enumerate(trials.items())]
    ratio = {space.config(t.params): bias for t, (_, bias) in zip(finished, trials.values())}
    tokens_of = {space.config(t.params): (18, *after) for t, after in zip(finished, trials)}

    def measured(loaded, images, configs, repeats, progress):
        speeds = []
        for config in configs:
            value = ratio[config] * unmerged / latency.predict_seconds(tokens_of[config], "atm")
            speeds.append(MeasuredSpeed(1.0, 1.0, value, value, value, repeats, tokens_of[config]))
        return speeds

    monkeypatch.setattr(speed_module, "measure_speedups", measured)
    reference = trial(len(finished), (18, 18, 18), right=10).outcomes
    found, later = finished[:len(finished) - sought], finished[len(finished) - sought:]
    best = goal.choose(found, reference.correct)
    result = SearchResult(best, best, found, reference, goal, space, "paired", 10, len(found), 0, 0, "t")

    def seek(corrected):
        return dataclasses.replace(result, trials=found + later)

    return speed_module.time_choice(SimpleNamespace(loaded=None, batches=[(None, None)], depth=2), result, latency,
                                    seek if sought else None)


def test_a_choice_that_measures_short_of_the_speedup_is_replaced_by_a_faster_trial(monkeypatch):
    """The device runs every setting 10% slower than predicted: the first choice (more accurate, predicted 1.29x)
    misses 1.25x, so the target is raised by that bias and the faster trial (1.40x), measured above 1.25x, wins."""
    chosen, check = timed_choice(1.25, {(8, 4): (9, 0.9), (4, 2): (8, 0.9)}, monkeypatch)
    assert chosen.best.number == 1 and check.chosen.speedup >= 1.25
    assert [(trial, round(bias, 6)) for trial, bias in check.corrections] == [(0, 0.9)]


def test_corrections_start_from_the_goal_as_asked_and_do_not_compound(monkeypatch):
    """Biases 0.9 then 0.85: the second choice needs a predicted 1.2 / 0.85 = 1.41x, which trial 2 (1.43x) has;
    compounded (1.2 / 0.765 = 1.57x) no trial would qualify and the short second choice would stay."""
    chosen, check = timed_choice(1.2, {(10, 6): (9, 0.9), (5, 4): (8, 0.85), (3, 2): (7, 0.9)}, monkeypatch)
    assert [trial for trial, _ in check.corrections] == [0, 1]
    assert chosen.best.number == 2 and check.chosen.speedup >= 1.2


@pytest.mark.parametrize("seeking", [False, True])
def test_a_correction_seeks_a_trial_near_the_corrected_target(seeking, monkeypatch):
    """Only trial 1 (predicted 1.45x) meets the corrected 1.2 / 0.9 = 1.33x among the finished trials; the trial
    a correction seeks near that target (2: predicted 1.35x) is chosen instead, and measures closer to 1.2x."""
    trials = {(10, 6): (9, 0.9), (2, 2): (7, 0.9), (5, 4): (8, 0.9)}
    if not seeking:
        trials.pop((5, 4))
    chosen, check = timed_choice(1.2, trials, monkeypatch, sought=1 if seeking else 0)
    assert chosen.best.number == (2 if seeking else 1)
    assert 1.2 <= check.chosen.speedup < (1.25 if seeking else 1.35)
