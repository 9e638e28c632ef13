"""Measured speed in `atm stress` and `atm compare` (issue 21), `--by time`, and `--compile` on stress, compare and
calibrate (issue 19): structure, consistency with the reported figures and with the model run directly; never a
wall-clock threshold (the machine is shared: a speedup is whatever it measured)."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from atm_cli.analysis import compare as compare_module
from atm_cli.analysis import timing as stress_module
from atm_cli.cli.app import app
from atm_cli.engine import last_trace, merging, method_config
from atm_cli.engine.compiled import CompiledModel
from atm_cli.evaluation import DEMO_EVAL_DATA, load_image_folder, preload
from atm_cli.evaluation import latency as latency_module
from atm_cli.evaluation import workload as workload_module
from atm_cli.evaluation.latency import MeasuredSpeed
from helpers import calibrate_args, hand_built_latency

runner = CliRunner()
BATCH = 16  # one batch of the bundled test images: the timed batch is every batch
SMALL = ["--limit", str(BATCH), "--batch-size", str(BATCH)]


@pytest.fixture(autouse=True)
def latency_cache(tmp_path, monkeypatch):
    """Each test measures its own latency model, in a folder of its own; two timing rounds are enough to check
    what the figures are, not how steady."""
    monkeypatch.setenv("ATM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(stress_module, "SPEED_REPEATS", 2)
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def first_batch(demo):
    return preload(load_image_folder(DEMO_EVAL_DATA, demo, limit=BATCH), BATCH)[0][0]


def invoke_json(*args: str) -> dict:
    outcome = runner.invoke(app, [*args, "--json"])
    assert outcome.exit_code == 0, outcome.output
    return json.loads(outcome.stdout)


@torch.inference_mode()
def direct_tokens(demo, name: str, params: dict, images: torch.Tensor) -> tuple[int, ...]:
    """The setting's token counts on `images`, straight from the engine."""
    config = method_config(name, {k: v for k, v in params.items() if k != "schedule"})
    with merging(demo.model, config):
        demo.model(images)
        return tuple(last_trace(demo.model).tokens)


def test_stress_times_every_answer_beside_the_unmerged_model_and_ranks_by_gflops_by_default(demo, first_batch):
    report = invoke_json("stress", "--methods", "tome,evit", "--tolerance", "5", *SMALL)
    assert report["by"] == "gflops"
    assert report["timing"] == {**report["timing"], "batch_size": BATCH, "repeats": stress_module.SPEED_REPEATS,
                                "compiled": False, "compile_seconds": 0.0}
    passed = [m for m in report["methods"] if m["passed"]]
    assert passed, "ToMe or EViT keeps top-1 within 5 points on 16 images"
    for method in passed:
        speed = method["speed"]
        assert method["speedup"] == speed["speedup"] > 0 and speed["repeats"] == stress_module.SPEED_REPEATS
        assert speed["speedup_low"] <= speed["speedup"] <= speed["speedup_high"]
        # The setting timed is the one chosen: its token counts, run on the timed batch by the engine itself.
        assert tuple(speed["tokens"]) == direct_tokens(demo, method["method"], method["params"], first_batch)
    assert report["ranking"] == [m["method"] for m in sorted(passed, key=lambda m: m["gflops"])]
    assert all(m["speed"] is None and m["speedup"] is None for m in report["methods"] if not m["passed"])


def test_by_time_ranks_by_the_reported_speedups_not_by_gflops(monkeypatch):
    """Timings replaced by a speedup per method, in an order GFLOPs do not give: `--by time` follows it."""
    speedups = {"evit": 3.0, "zero-tprune": 2.0, "tome": 1.1, "atm": 0.5}

    def timed_per_method(loaded, images, configs, repeats=7, progress=None):
        return [MeasuredSpeed(0.1, 0.1 * speedups[c.NAME], speedups[c.NAME], 0.9 * speedups[c.NAME],
                              1.1 * speedups[c.NAME], repeats, ()) for c in configs]

    monkeypatch.setattr(stress_module, "measure_speedups", timed_per_method)
    args = ["stress", "--methods", "tome,evit,zero-tprune", "--tolerance", "100", *SMALL]  # every method passes
    by_time, by_gflops = invoke_json(*args, "--by", "time"), invoke_json(*args)
    assert by_time["by"] == "time" and by_time["ranking"] == ["evit", "zero-tprune", "tome"]
    assert [m["speedup"] for m in by_time["methods"]] == [1.1, 3.0, 2.0]  # as the timing reported them
    gflops = {m["method"]: m["gflops"] for m in by_gflops["methods"]}
    assert by_gflops["ranking"] == sorted(gflops, key=gflops.get)

    outcome = runner.invoke(app, [*args, "--methods", "atm,tome", "--n-trials", "2", "--by", "time"])
    assert outcome.exit_code == 0, outcome.output
    text = " ".join(outcome.stderr.split())
    assert "ranked by measured speedup" in text and "faster than ATM here (measured): tome (1.10x," in text
    assert text.endswith("; ATM: 0.50x")


def test_compare_by_time_fits_each_point_to_a_predicted_time_budget_and_times_it(demo, first_batch, monkeypatch):
    """With a hand-built latency model (linear in the tokens, so the least merging within a time is one r): the
    budget is 70% of its unmerged time per batch, the chosen r is predicted within it and r - 1 is not, each run
    by the engine itself; the point is then timed for real."""
    monkeypatch.setattr(compare_module, "device_latency", hand_built_latency)
    report = invoke_json("compare", "--methods", "tome", "--budgets", "70", "--by", "time", *SMALL)
    point, = report["points"]
    assert report["by"] == "time" and point["passed"] and "budget_gflops" not in point
    assert point["speedup"] == point["speed"]["speedup"] > 0

    latency = hand_built_latency(demo, first_batch, {"tome": []})
    budget = point["budget_seconds"]
    assert budget == pytest.approx(0.7 * latency.unmerged_seconds(len(demo.model.blocks)))
    r = point["params"]["r"]
    chosen, one_less = (direct_tokens(demo, "tome", {"r": n}, first_batch) for n in (r, r - 1))
    assert latency.predict_seconds(chosen, "tome") <= budget < latency.predict_seconds(one_less, "tome")
    assert tuple(point["speed"]["tokens"]) == chosen


def test_compare_by_gflops_reports_the_measured_speedup_beside_gflops():
    report = invoke_json("compare", "--methods", "tome,tome-decreasing", "--budgets", "70", *SMALL)
    assert report["by"] == "gflops"
    for point in report["points"]:
        assert point["gflops"] <= point["budget_gflops"] and point["speedup"] == point["speed"]["speedup"] > 0


@pytest.mark.parametrize("command", ["stress", "compare"])
def test_by_takes_gflops_or_time_only(command):
    outcome = runner.invoke(app, [command, "--by", "speed", "--limit", "4"])
    assert outcome.exit_code == 2
    assert outcome.stderr.strip().count("\n") == 0 and "--by speed: choose from gflops, time" in outcome.stderr


@pytest.fixture
def compiled_models(monkeypatch):
    """Every model the workload or the timing compiles, compiled with `aot_eager` (dynamo's capture as inductor
    does it, no code generation: seconds on a CPU) and kept to look at."""
    made: list[CompiledModel] = []

    def compile_and_keep(model, *args, **kwargs):
        made.append(CompiledModel(model, *args, **{**kwargs, "backend": "aot_eager"}))
        return made[-1]

    for module in (workload_module, latency_module):
        monkeypatch.setattr(module, "compile_patched", compile_and_keep)
    torch._dynamo.reset()
    yield made
    torch._dynamo.reset()


@pytest.mark.parametrize("command, extra", [("stress", ["--methods", "tome", "--tolerance", "100"]),
                                            ("compare", ["--methods", "tome", "--budgets", "60", "--by", "time"])])
def test_compile_on_runs_the_settings_and_their_timing_compiled(tiny, compiled_models, latency_cache, command, extra):
    """On the small random ViT of the calibration tests (4 blocks): the capture is what is checked, not speed.
    Compare by time measures the latency model too, compiled, and caches it under the compile mode."""
    report = invoke_json(command, "--model", str(tiny["model"]), "--data", str(tiny["data"]), "--batch-size", "12",
                         *extra, "--compile", "on")
    assert report["timing"]["compiled"] is True and report["timing"]["compile_seconds"] > 0
    ran = [model for model in compiled_models if model.last_path]
    assert len(ran) >= 4  # the unmerged model and a setting on the images, and both again for the timing
    assert all(model.variants >= 1 and model.last_path == "compiled" for model in ran)  # a graph each, no eager
    if command == "compare":
        cached, = (json.loads(path.read_text()) for path in latency_cache.glob("latency-*.json"))
        assert cached["key"]["compiled"] is True and cached["key"]["batch_size"] == 12
        assert set(cached["steps"]) == {"tome"}  # the methods compared, no other


def test_compile_off_compiles_nothing(tiny, compiled_models):
    report = invoke_json("stress", "--model", str(tiny["model"]), "--data", str(tiny["data"]), "--methods", "tome",
                         "--compile", "off")
    assert report["timing"]["compiled"] is False and report["timing"]["compile_seconds"] == 0
    assert compiled_models == []


def test_calibrate_compile_on_searches_compiled_and_reports_the_compile_time_apart(tiny, compiled_models):
    outcome = runner.invoke(app, calibrate_args(tiny, "--target-reduction", "20", "--n-trials", "2", "--limit", "8",
                                                "--compile", "on", "--json"))
    assert outcome.exit_code == 0, outcome.output
    result = json.loads(outcome.stdout)
    assert result["compiled"] is True and result["compile_seconds"] > 0
    unmerged = [model for model in compiled_models if model.fixed_shapes and model.last_path]
    atm = [model for model in compiled_models if not model.fixed_shapes and model.last_path]
    assert unmerged and all(model.variants == 1 for model in unmerged)  # one graph each (a short batch padded)
    # ATM compiles per block segment; a setting met before reuses its segments' graphs (0 new variants).
    assert atm and sum(model.variants for model in atm) >= 1 and any(m.last_path == "compiled" for m in atm)
    assert "s compiling, left out of every speed figure" in outcome.stderr
