"""`atm stress` and `atm compare`: the searches' promises checked against independent runs of the model."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from timm.utils import accuracy
from typer.testing import CliRunner

from atm_cli.analysis import timing as stress_module
from atm_cli.analysis.compare import compare
from atm_cli.analysis.stress import climb, ladders, largest_passing_step, required_correct, stress
from atm_cli.cli.app import app
from atm_cli.engine import ATMConfig, ToMeConfig, last_trace, patch, unpatch
from atm_cli.calibration import RangeFlags
from atm_cli.evaluation import DEMO_EVAL_DATA, BatchOutcome, Outcomes, load_image_folder, preload, Workload

LIMIT, BATCH = 32, 16


@pytest.fixture(scope="module")
def batches(demo):
    return preload(load_image_folder(DEMO_EVAL_DATA, demo, limit=LIMIT), BATCH)


@pytest.fixture(autouse=True)
def few_timing_rounds(monkeypatch):
    """Every answer is timed beside the unmerged model (tests/test_speed_columns.py checks how); two rounds do here."""
    monkeypatch.setattr(stress_module, "SPEED_REPEATS", 2)


@torch.inference_mode()
def direct_top1_and_gflops(model, batches, config=None) -> tuple[float, float]:
    """Top-1 by timm's accuracy and the trace's GFLOPs, straight from the model: no evaluation layer involved."""
    correct = gflops = n = 0.0
    for images, labels in batches:
        if config is not None:
            patch(model, config)
        try:
            top1, = accuracy(model(images), labels, topk=(1,))
            gflops += (last_trace(model).gflops if config is not None else 0.0) * len(labels)
        finally:
            unpatch(model)
        correct += top1.item() * len(labels) / 100
        n += len(labels)
    return 100 * correct / n, gflops / n


def test_largest_passing_step_on_a_non_monotone_ladder():
    """Passes 0-5, fails 6, passes 7-8, fails from 9: the look past the first failure finds 8."""
    tried = []

    def passes(step):
        tried.append(step)
        return step <= 5 or step in (7, 8)

    assert largest_passing_step(passes, top=40, lookahead=2) == 8
    assert len(tried) == len(set(tried))  # nothing run twice
    assert 9 in tried  # the promise: the next step was run and failed


def test_largest_passing_step_is_cheaper_than_a_scan():
    tried = []

    def passes(step):
        tried.append(step)
        return step <= 300

    assert largest_passing_step(passes, top=1000, lookahead=2) == 300
    assert len(tried) <= 2 * 10 + 2  # gallop + bisection: about 2 log2(1000), plus the look ahead
    assert largest_passing_step(lambda step: True, top=17) == 17


def test_required_correct_is_the_tolerance_in_images():
    def batch(right: int, n: int = 50) -> BatchOutcome:
        correct = np.arange(n) < right
        return BatchOutcome(correct, np.where(correct, 0, 1), right, 1.0, (17,))

    run = Outcomes([batch(40), batch(40)])  # 80 % of 100 images
    assert required_correct(run, 0.0) == 80
    assert required_correct(run, 1.0) == 79  # one point of 100 images is one image
    assert required_correct(run, 1.5) == 79  # 78.5 correct is not enough


def test_stress_ladders_meet_the_tolerance_and_tome_r_plus_one_fails(demo, batches):
    tolerance = 0.0
    report = stress(Workload(demo, batches), methods=["tome", "threshold", "tome-increasing", "tome-decreasing"],
                    tolerance=tolerance)
    baseline_top1, _ = direct_top1_and_gflops(demo.model, batches)
    assert report.baseline_top1 == pytest.approx(baseline_top1)
    assert report.baseline_gflops == pytest.approx(demo.unmerged_gflops)
    assert [m.method for m in report.methods] == ["tome", "threshold", "tome-increasing", "tome-decreasing"]
    for result in report.methods:
        if result.passed:
            assert result.gflops <= report.baseline_gflops
            assert result.top1 >= baseline_top1 - tolerance

    tome = report.methods[0]
    r = tome.params["r"]
    top1, gflops = direct_top1_and_gflops(demo.model, batches, ToMeConfig(r=r))
    assert (tome.top1, tome.gflops) == (pytest.approx(top1), pytest.approx(gflops))
    most = (demo.unmerged_tokens[0] - demo.model.num_prefix_tokens) // 2  # ToMe's r stops mattering here
    if r < most:
        next_top1, _ = direct_top1_and_gflops(demo.model, batches, ToMeConfig(r=r + 1))
        assert next_top1 < baseline_top1 - tolerance


def test_an_interrupted_stress_test_or_comparison_keeps_what_it_finished(demo, batches):
    def ctrl_c_after_the_first_method(done: int, total: int) -> None:
        raise KeyboardInterrupt

    partial = stress(Workload(demo, batches), methods=["tome", "threshold"], progress=ctrl_c_after_the_first_method,
                     keep_partial=True)
    assert partial.interrupted and [m.method for m in partial.methods] == ["tome"]
    r = partial.methods[0].params["r"]
    assert partial.methods[0].top1 == pytest.approx(direct_top1_and_gflops(demo.model, batches, ToMeConfig(r=r))[0])
    with pytest.raises(KeyboardInterrupt):
        stress(Workload(demo, batches), methods=["tome"], progress=ctrl_c_after_the_first_method)

    partial = compare(Workload(demo, batches), methods=["tome"], budgets=[0.8, 0.6], progress=ctrl_c_after_the_first_method,
                      keep_partial=True)
    assert partial.interrupted and [p.budget for p in partial.points] == [0.8]
    assert partial.point("tome", 0.6) is None
    whole = compare(Workload(demo, batches), methods=["tome"], budgets=[0.8])
    kept, again = partial.point("tome", 0.8).to_dict(partial.baseline), whole.points[0].to_dict(whole.baseline)
    timed = ("speed", "speedup")  # measured anew by each run
    assert {k: v for k, v in kept.items() if k not in timed} == {k: v for k, v in again.items() if k not in timed}
    assert kept["speed"]["tokens"] == again["speed"]["tokens"]


def test_stress_cli_json(demo):
    result = CliRunner().invoke(app, ["stress", "--methods", "atm,tome", "--limit", str(LIMIT), "--batch-size",
                                      str(BATCH), "--n-trials", "3", "--tolerance", "5", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report) >= {"baseline_top1", "baseline_gflops", "methods"}
    assert [m["method"] for m in report["methods"]] == ["atm", "tome"]
    for method in report["methods"]:
        assert set(method) >= {"method", "passed", "top1", "gflops", "agreement", "params"}
        assert method["gflops"] <= report["baseline_gflops"]
        assert method["top1"] >= report["baseline_top1"] - 5


def test_stress_cli_rejects_unknown_method_in_one_line():
    result = CliRunner().invoke(app, ["stress", "--methods", "tome,nosuch", "--no-pretrained", "--limit", "4"])
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0 and "nosuch" in result.stderr


def test_compare_takes_the_least_tome_r_within_each_budget(demo, batches):
    budgets = [0.8, 0.6]
    report = compare(Workload(demo, batches), methods=["tome", "tome-decreasing"], budgets=budgets)
    assert len(report.points) == 4
    for point in report.points:
        assert point.gflops <= point.limit == pytest.approx(point.budget * demo.unmerged_gflops)
    for budget in budgets:
        point = report.point("tome", budget)
        r = point.params["r"]
        top1, gflops = direct_top1_and_gflops(demo.model, batches, ToMeConfig(r=r))
        assert (point.top1, point.gflops) == (pytest.approx(top1), pytest.approx(gflops))
        _, more_gflops = direct_top1_and_gflops(demo.model, batches, ToMeConfig(r=r - 1))
        assert more_gflops > point.limit  # one token fewer per block would not fit


def test_atm_saves_at_least_the_constant_threshold_its_family_contains(demo, batches):
    report = stress(Workload(demo, batches), methods=["atm", "threshold"], n_trials=4)
    atm, constant = report.methods
    assert constant.passed and atm.passed
    assert atm.gflops <= constant.gflops
    setting = {name: atm.params[name] for name in ("alpha", "beta", "theta_min", "split_layer")}
    top1, gflops = direct_top1_and_gflops(demo.model, batches, ATMConfig(**setting))
    assert (atm.top1, atm.gflops) == (pytest.approx(top1), pytest.approx(gflops))
    assert top1 >= direct_top1_and_gflops(demo.model, batches)[0]  # no drop, checked on the model itself

    report = compare(Workload(demo, batches), methods=["threshold", "atm"], budgets=[0.8], n_trials=3)
    constant, atm = report.points
    assert constant.passed and atm.passed and atm.top1 >= constant.top1
    assert atm.gflops <= 0.8 * report.baseline_gflops


def test_a_method_with_no_passing_setting_says_so_and_shows_no_figures(demo, batches):
    space = RangeFlags().resolve(Workload(demo, batches))
    impossible = sum(len(labels) for _, labels in batches) + 1  # more correct images than there are
    result = climb(Workload(demo, batches), ladders(demo, space)["tome"], impossible, lookahead=0)
    assert not result.passed and result.trials and not any(t.passed for t in result.trials)
    shown = result.to_dict(Workload(demo, batches).run(None))
    assert shown["passed"] is False and shown["top1"] is None and shown["gflops"] is None and shown["agreement"] is None


def test_the_measured_range_spans_from_no_merging_to_far_below_any_budget(demo, batches):
    space = RangeFlags().resolve(Workload(demo, batches))
    least, most = space.extremes()[1], space.extremes()[0]
    # On the batch the ranges were measured on, the least-merging setting merges nothing: every block
    # receives every token (ATM's last block then keeps the class token alone, as the head reads it alone).
    patch(demo.model, least)
    try:
        with torch.inference_mode():
            demo.model(batches[0][0])
        assert last_trace(demo.model).tokens[:-1] == list(demo.unmerged_tokens)
    finally:
        unpatch(demo.model)
    assert direct_top1_and_gflops(demo.model, batches[:1], most)[1] < 0.5 * demo.unmerged_gflops


def test_compare_atm_point_is_what_its_setting_gives(demo, batches):
    report = compare(Workload(demo, batches), methods=["atm"], budgets=[0.7], n_trials=4)
    point, = report.points
    assert point.top1 is not None, "the measured ranges reach 70% of the demo model's GFLOPs"
    assert point.gflops <= 0.7 * demo.unmerged_gflops
    setting = {name: point.params[name] for name in ("alpha", "beta", "theta_min", "split_layer")}
    top1, gflops = direct_top1_and_gflops(demo.model, batches, ATMConfig(**setting))
    assert (point.top1, point.gflops) == (pytest.approx(top1), pytest.approx(gflops))


def test_compare_cli_json_and_plot(demo, tmp_path):
    pytest.importorskip("matplotlib", reason="plots are the optional atm-cli[plot] extra")
    plot = tmp_path / "compare.png"
    result = CliRunner().invoke(app, ["compare", "--methods", "tome", "--budgets", "70", "--limit", str(LIMIT),
                                      "--batch-size", str(BATCH), "--plot", str(plot), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    point, = report["points"]
    assert point["method"] == "tome" and point["gflops"] <= 0.7 * report["baseline_gflops"]
    assert plot.stat().st_size > 1000
