"""`atm eval` end to end: through Typer's runner and as a process, checked against direct computations."""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from typer.testing import CliRunner

from atm_cli.cli.app import app
from atm_cli.engine import ATMConfig, last_trace, patch
from atm_cli.evaluation import DEMO_EVAL_DATA
from atm_cli.models import DEMO_MODEL_NAME, DEMO_WEIGHTS
from atm_cli.paper import PAPER_DEIT_S
from atm_cli.presets import default_preset_for

from helpers import direct_tensors, make_tiny_vit, non_blank, write_image_folder

REQUIRED_KEYS = {"model", "method", "params", "n_images", "batch_size", "top1", "top5", "gflops", "baseline_top1",
                 "baseline_gflops", "images_per_sec", "baseline_images_per_sec", "agreement", "tokens_per_layer",
                 "skipped_images"}
ATM_FLAGS = ["--alpha", "0.985", "--beta", "0.045", "--theta-min", "0.88"]
runner = CliRunner()


def run_eval(*args) -> tuple[dict | None, object]:
    result = runner.invoke(app, ["eval", "--workers", "0", *map(str, args)])
    data = json.loads(result.stdout) if result.exit_code == 0 and "--json" in args else None
    return data, result


def test_embedded_default_json_matches_a_direct_computation(tmp_path):
    # Two bundled test images of each class, evaluated in two batches of 12 and 8.
    data = tmp_path / "cifar"
    for class_dir in sorted(DEMO_EVAL_DATA.iterdir()):
        (data / class_dir.name).mkdir(parents=True)
        for image in sorted(class_dir.iterdir())[:2]:
            shutil.copy(image, data / class_dir.name / image.name)
    result, outcome = run_eval("--data", data, "--batch-size", 12, *ATM_FLAGS, "--json")
    assert outcome.exit_code == 0, outcome.stderr
    assert REQUIRED_KEYS <= set(result)

    model = timm.create_model(DEMO_MODEL_NAME, pretrained=True).eval()
    classes = {name: i for i, name in enumerate(model.pretrained_cfg["label_names"])}
    x, y = direct_tensors(data, model, classes)
    method = ATMConfig(alpha=0.985, beta=0.045, theta_min=0.88)
    with torch.no_grad():
        plain = model(x)
        patch(model, method)
        merged, gflops, tokens = [], [], []
        for batch in (x[:12], x[12:]):
            merged.append(model(batch))
            gflops.append(last_trace(model).gflops)
            tokens.append(last_trace(model).tokens[:-1])
    merged = torch.cat(merged)

    def percent_in_top(logits, k):
        return 100.0 * (logits.topk(k, dim=1).indices == y[:, None]).any(dim=1).sum().item() / 20

    assert (result["model"], result["model_tag"], result["method"]) == (DEMO_MODEL_NAME, "cifar10", "atm")
    assert result["checkpoint_sha256"] == hashlib.sha256(DEMO_WEIGHTS.read_bytes()).hexdigest()
    assert result["n_images"] == 20 and result["batch_size"] == 12 and result["skipped_images"] == 0
    assert result["params"]["alpha"] == 0.985 and result["params"]["split_layer"] is None  # the default: round(0.75 L)
    assert result["baseline_top1"] == pytest.approx(percent_in_top(plain, 1))
    assert result["baseline_top5"] == pytest.approx(percent_in_top(plain, 5))
    assert result["top1"] == pytest.approx(percent_in_top(merged, 1))
    assert result["top5"] == pytest.approx(percent_in_top(merged, 5))
    assert result["gflops"] == pytest.approx((12 * gflops[0] + 8 * gflops[1]) / 20)
    assert result["tokens_per_layer"] == pytest.approx([(12 * a + 8 * b) / 20 for a, b in zip(*tokens)])
    same = (merged.argmax(1) == plain.argmax(1)).sum().item()
    assert result["agreement"] == pytest.approx(100.0 * same / 20)
    assert result["baseline_tokens_per_layer"] == [65] * 12  # 8x8 patches and the class token


@pytest.mark.slow
def test_embedded_default_as_a_process():
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    process = subprocess.run([sys.executable, "-m", "atm_cli", "eval", "--limit", "64", "--json"],
                             capture_output=True, text=True, env=env, timeout=600)
    assert process.returncode == 0, process.stderr
    result = json.loads(process.stdout)  # the whole of stdout is one JSON object
    assert REQUIRED_KEYS <= set(result)
    assert result["n_images"] == 64 and result["skipped_images"] == 0
    assert 0 <= result["top1"] <= result["top5"] <= 100
    assert result["gflops"] < result["baseline_gflops"]
    # No method flags: the model's default preset, or the paper's DeiT-S setting.
    default = default_preset_for(DEMO_MODEL_NAME)
    expected = default.method if default is not None else ATMConfig(**PAPER_DEIT_S)
    assert result["params"]["alpha"] == expected.alpha and result["params"]["theta_min"] == expected.theta_min
    assert "Traceback" not in process.stderr


def test_tome_and_unmerged_methods(tiny_vit_dir, image_folder):
    result, outcome = run_eval("--model", tiny_vit_dir, "--data", image_folder, "--r", "2", "--json")
    assert outcome.exit_code == 0, outcome.stderr
    assert result["method"] == "tome" and result["params"]["r"] == 2
    assert result["tokens_per_layer"] == [17, 15]  # 16 patches + class token, two merged in block 1
    assert result["gflops"] < result["baseline_gflops"]

    result, outcome = run_eval("--model", tiny_vit_dir, "--data", image_folder, "--method", "none", "--json")
    assert outcome.exit_code == 0, outcome.stderr
    assert result["method"] == "none" and result["agreement"] == 100.0
    assert (result["top1"], result["gflops"]) == (result["baseline_top1"], result["baseline_gflops"])


def test_ctrl_c_prints_the_figures_so_far_and_exits_130(tiny_vit_dir, image_folder, monkeypatch):
    from atm_cli.evaluation import measure

    forward, calls = measure.measure_batch, []

    def forward_until_the_third_batch(*args, **kwargs):
        calls.append(args)
        if len(calls) == 7:  # two warm-up passes, two batches of two passes each, then Ctrl-C
            raise KeyboardInterrupt
        return forward(*args, **kwargs)

    monkeypatch.setattr(measure, "measure_batch", forward_until_the_third_batch)
    _, outcome = run_eval("--model", tiny_vit_dir, "--data", image_folder, "--batch-size", "5", "--r", "2", "--json")
    assert outcome.exit_code == 130, outcome.stderr
    result = json.loads(outcome.stdout)
    assert result["interrupted"] and (result["n_images"], result["n_files"]) == (10, 12)
    assert "interrupted: the figures cover the first 10 of 12 images" in outcome.stderr
    assert "Traceback" not in outcome.stderr


def test_tokens_per_block_chart_and_plot(tiny_vit_dir, image_folder, tmp_path):
    pytest.importorskip("matplotlib", reason="plots are the optional atm-cli[plot] extra")
    plot = tmp_path / "tokens.png"
    # Thresholds of Eq. (1) for a 2-block model: alpha, then max(alpha - (e^beta - 1), theta_min).
    result, outcome = run_eval("--model", tiny_vit_dir, "--data", image_folder, "--alpha", "0.9", "--beta", "0.1",
                               "--theta-min", "0.5", "--plot", plot, "--json")
    assert outcome.exit_code == 0, outcome.stderr
    assert "θ 0.900" in outcome.stderr and f"θ {0.9 - (math.exp(0.1) - 1):.3f}" in outcome.stderr
    assert non_blank(plot)


def test_corrupt_image_is_skipped_and_counted_or_fails_when_strict(tiny_vit_dir, image_folder):
    (image_folder / "a" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    result, outcome = run_eval("--model", tiny_vit_dir, "--data", image_folder, "--json")
    assert outcome.exit_code == 0, outcome.stderr
    assert result["skipped_images"] == 1 and result["n_images"] == 12
    assert "a/broken.jpg" in outcome.stderr

    _, outcome = run_eval("--model", tiny_vit_dir, "--data", image_folder, "--strict")
    assert outcome.exit_code == 1
    last = outcome.stderr.strip().splitlines()[-1]
    assert last.startswith("atm: error: unreadable image") and "a/broken.jpg" in last


def test_results_file_appends_csv_rows_and_writes_json(tiny_vit_dir, image_folder, tmp_path):
    table = tmp_path / "results.csv"
    for limit in (6, 9):
        result, outcome = run_eval("--model", tiny_vit_dir, "--data", image_folder, "--limit", limit,
                                   "--results-file", table, "--json")
        assert outcome.exit_code == 0, outcome.stderr
    with table.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(row["n_images"]) for row in rows] == [6, 9]
    assert float(rows[1]["top1"]) == result["top1"]
    assert json.loads(rows[1]["tokens_per_layer"]) == result["tokens_per_layer"]

    as_json = tmp_path / "result.json"
    result, outcome = run_eval("--model", tiny_vit_dir, "--data", image_folder, "--results-file", as_json, "--json")
    assert json.loads(as_json.read_text()) == result


@pytest.fixture
def wrong_checkpoint(tmp_path) -> Path:
    path = tmp_path / "tiny.pth"
    torch.save(make_tiny_vit(3).state_dict(), path)
    return path


@pytest.mark.parametrize("case, code, message", [
    ("missing data", 2, "data folder {tmp}/nowhere does not exist"),
    ("empty data", 2, "has no class folders"),
    ("unmappable labels", 2, "cannot map the 4 class folders"),
    ("unknown model", 2, "unknown model 'deit_smal_patch16_224'; did you mean deit_small_patch16_224"),
    ("checkpoint does not fit", 1, "does not fit atm_demo_vit_tiny_patch4_32"),
    ("missing checkpoint", 2, "checkpoint {tmp}/missing.pth does not exist"),
    ("tome with atm flags", 2, "--alpha set atm's parameters; they contradict --method tome"),
    ("tome without r", 2, "--method tome: tome needs r"),
    ("r with none", 2, "--r set tome's parameters; they contradict --method none"),
    ("preset with flags", 2, "--preset sets the method"),
    ("checkpoint without pretrained", 2, "contradicts --no-pretrained"),
    ("results file type", 2, "--results-file must end in .csv or .json"),
])
def test_errors_are_one_line_with_their_exit_code(case, code, message, tmp_path, tiny_vit_dir, wrong_checkpoint):
    (tmp_path / "empty").mkdir()
    four = write_image_folder(tmp_path / "four", {"w": 1, "x": 1, "y": 1, "z": 1})
    args = {
        "missing data": ["--model", tiny_vit_dir, "--data", tmp_path / "nowhere"],
        "empty data": ["--model", tiny_vit_dir, "--data", tmp_path / "empty"],
        "unmappable labels": ["--model", tiny_vit_dir, "--data", four],
        "unknown model": ["--model", "deit_smal_patch16_224"],
        "checkpoint does not fit": ["--checkpoint", wrong_checkpoint],
        "missing checkpoint": ["--checkpoint", tmp_path / "missing.pth"],
        "tome with atm flags": ["--method", "tome", "--alpha", "0.9"],
        "tome without r": ["--method", "tome"],
        "r with none": ["--method", "none", "--r", "4"],
        "preset with flags": ["--preset", "any.yaml", "--r", "4"],
        "checkpoint without pretrained": ["--checkpoint", wrong_checkpoint, "--no-pretrained"],
        "results file type": ["--results-file", tmp_path / "out.txt"],
    }[case]
    _, outcome = run_eval(*args)
    assert outcome.exit_code == code
    lines = outcome.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("atm: error: ")
    assert message.format(tmp=tmp_path) in lines[0]
    assert outcome.stdout == ""


def test_a_preset_run_at_another_precision_says_so_and_records_it():
    result, outcome = run_eval("--limit", "10", "--precision", "bf16", "--json")
    assert outcome.exit_code == 0, outcome.stderr
    assert "the preset was measured at fp32, this run is bf16" in " ".join(outcome.stderr.split())
    assert result["precision"] == "bf16"
    _, same = run_eval("--limit", "10", "--json")
    assert "measured at" not in same.stderr


def test_fp16_on_the_cpu_is_refused_in_one_line():
    _, outcome = run_eval("--precision", "fp16", "--device", "cpu")
    assert outcome.exit_code == 2 and outcome.stderr.count("\n") == 1 and "fp16 needs a CUDA device" in outcome.stderr
