"""Presets: the YAML schema, its validation, atomic saving, the bundled paper settings and `atm presets`."""
from __future__ import annotations

import json
import os
import re
from importlib import metadata
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

import atm_cli
from atm_cli.cli.app import app
from atm_cli.engine import ATMConfig, ToMeConfig, last_trace, patch
from atm_cli.errors import UsageError
from atm_cli.evaluation import DEMO_EVAL_DATA, evaluate, load_image_folder
from atm_cli.models import DEMO_MODEL_NAME
from atm_cli.presets import bundled_presets_dir, default_preset_for, find_preset, list_presets, load_preset, save_preset

from helpers import a_preset, calibrate_args, make_tiny_vit

PAPER = Path(__file__).resolve().parents[2] / "shared" / "paper" / "atm-paper.txt"
runner = CliRunner()


def write_yaml(path: Path, document) -> Path:
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def test_round_trip_keeps_every_field(tmp_path):
    preset = a_preset()
    previous = os.umask(0o022)
    try:
        path = save_preset(preset, tmp_path / "p.yaml")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644  # shareable, as any file the user writes (not mkstemp's 0600)
    loaded = load_preset(path)
    assert loaded == preset
    assert loaded.measured.gflops == 3.2345678901234567  # full precision: `atm eval` must match it exactly
    assert loaded.method == ATMConfig(0.985, 0.045, 0.88)
    assert loaded.provenance.trials == 12 and loaded.provenance.source == "atm calibrate"
    assert loaded.provenance.torch_version == metadata.version("torch")
    assert loaded.name == "p"


def test_a_calibrated_preset_records_the_precision_and_device_it_was_measured_at(tiny, tmp_path):
    path = tmp_path / "bf16.yaml"
    made = runner.invoke(app, calibrate_args(tiny, "--device", "cpu", "--precision", "bf16", "--target-reduction", "20",
                                             "--n-trials", "2", "--out", str(path)))
    assert made.exit_code == 0, made.output
    provenance = yaml.safe_load(path.read_text())["provenance"]
    assert (provenance["precision"], provenance["device_type"]) == ("bf16", "cpu")
    evaluated = runner.invoke(app, ["eval", "--model", str(tiny["model"]), "--data", str(tiny["data"]), "--preset",
                                    str(path), "--device", "cpu", "--workers", "0"])
    assert evaluated.exit_code == 0, evaluated.output
    assert "the preset was measured at bf16, this run is fp32" in evaluated.output


def test_tome_preset_round_trip(tmp_path):
    for method in (ToMeConfig(r=13), ToMeConfig(r=[4, 3, 2]), ToMeConfig(r=8, inflection=-0.5)):
        loaded = load_preset(save_preset(a_preset(method=method), tmp_path / "tome.yaml"))
        assert loaded.method == method


def test_save_is_atomic(tmp_path, monkeypatch):
    path = save_preset(a_preset(), tmp_path / "p.yaml")
    before = path.read_text()

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr("atm_cli.files.os.fsync", broken_fsync)
    changed = a_preset()
    changed.measured.top1 = 1.0
    with pytest.raises(OSError):
        save_preset(changed, path)
    assert path.read_text() == before  # the old preset is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.yaml"]  # and no temporary file is left


def valid_document() -> dict:
    return a_preset().to_dict()


def set_key(document: dict, dotted: str, value) -> dict:
    *parents, last = dotted.split(".")
    node = document
    for key in parents:
        node = node[key]
    node[last] = value
    return document


@pytest.mark.parametrize("dotted, value, message", [
    ("colour", "red", "unknown key 'colour'"),
    ("measured.speed", 3.0, "measured: unknown key 'speed'"),
    ("params.gamma", 0.5, "unknown parameter 'gamma' for atm"),
    ("batch_size", "64", "batch_size must be an integer"),
    ("batch_size", True, "batch_size must be an integer"),
    ("params.alpha", "high", "params: alpha: cannot read 'high' as a number"),
    ("measured.gflops", None, "measured.gflops must be a number"),
    ("model", "deit", "model: expected a mapping"),
    ("default", "yes", "default must be true or false"),
    ("schema_version", 2, "unknown schema_version 2"),
    ("method", "nonsense", "method must be one of atm, tome"),  # then the other registered methods
    ("batch_size", 0, "batch_size must be at least 1"),
])
def test_validation_errors_name_the_problem(tmp_path, dotted, value, message):
    path = write_yaml(tmp_path / "bad.yaml", set_key(valid_document(), dotted, value))
    with pytest.raises(UsageError, match=re.escape(message)):
        load_preset(path)


def test_missing_keys_and_bad_files(tmp_path):
    document = valid_document()
    del document["params"]["theta_min"]
    with pytest.raises(UsageError, match="atm needs theta_min"):
        load_preset(write_yaml(tmp_path / "a.yaml", document))
    document = valid_document()
    del document["schema_version"]
    with pytest.raises(UsageError, match="unknown schema_version None"):
        load_preset(write_yaml(tmp_path / "b.yaml", document))
    document = valid_document()
    del document["model"]
    with pytest.raises(UsageError, match="missing key 'model'"):
        load_preset(write_yaml(tmp_path / "c.yaml", document))
    (tmp_path / "d.yaml").write_text("params: [unclosed")
    with pytest.raises(UsageError, match="not valid YAML"):
        load_preset(tmp_path / "d.yaml")
    with pytest.raises(UsageError, match="a preset is a YAML mapping"):
        load_preset(write_yaml(tmp_path / "e.yaml", [1, 2]))
    with pytest.raises(UsageError, match="cannot read preset"):
        load_preset(tmp_path / "absent.yaml")


def test_preset_for_another_model_is_refused_unless_forced(tmp_path):
    path = save_preset(a_preset(), tmp_path / "p.yaml")
    assert load_preset(path, model_name="deit_small_patch16_224.fb_in1k").name == "p"  # the tag does not matter
    with pytest.raises(UsageError, match="made for deit_small_patch16_224, not deit_tiny_patch16_224"):
        load_preset(path, model_name="deit_tiny_patch16_224")
    assert load_preset(path, model_name="deit_tiny_patch16_224", force=True).method.alpha == 0.985
    with pytest.raises(UsageError, match="checkpoint sha256"):
        load_preset(path, model_name="deit_small_patch16_224", checkpoint_sha256="cd" * 32)
    assert load_preset(path, model_name="deit_small_patch16_224", checkpoint_sha256="ab" * 32).name == "p"
    demo = save_preset(a_preset(model="atm_demo_vit_tiny_patch4_32"), tmp_path / "demo.yaml")
    assert load_preset(demo, model_name="atm-demo").name == "demo"  # the alias names the same model


def test_every_bundled_preset_loads_and_each_model_has_at_most_one_default():
    presets = list_presets()
    assert presets, f"no bundled presets found (looked in {bundled_presets_dir()})"
    defaults: dict[str, int] = {}
    for preset in presets:
        defaults[preset.model.name] = defaults.get(preset.model.name, 0) + preset.default
    assert all(count <= 1 for count in defaults.values()), defaults
    assert default_preset_for("deit_small_patch16_224").method == ATMConfig(0.985, 0.045, 0.88)
    assert all(p.model.name == "deit_tiny_patch16_224" for p in list_presets("deit_tiny_patch16_224.fb_in1k"))


def paper_table_a2() -> dict[str, set[tuple[float, ...]]]:
    """Rows (alpha, beta, theta_min, GFLOPs, top-1) of the paper's Table A2, read from its text."""
    text = PAPER.read_text()
    table = text[text.index("Table A2: Full results on DeiT without training."):text.index("Table A3:")]
    names = {"DeiT-T": "deit_tiny_patch16_224", "DeiT-S": "deit_small_patch16_224", "DeiT-B": "deit_base_patch16_224"}
    rows: dict[str, set[tuple[float, ...]]] = {}
    model = None
    for line in table.splitlines():
        words = line.split()
        if words and words[0] in names:
            model = names[words[0]]
        elif model and len(words) == 5:
            rows.setdefault(model, set()).add(tuple(float(w) for w in words))
    return rows


@pytest.mark.skipif(not PAPER.is_file(), reason=f"the paper's text is absent: {PAPER}")
def test_paper_presets_are_rows_of_table_a2():
    rows = paper_table_a2()
    paper_presets = [p for p in list_presets() if p.provenance.source == "paper Table A2"]
    assert len(paper_presets) == sum(len(r) for r in rows.values())  # every row, once
    for preset in paper_presets:
        p, m = preset.params, preset.measured
        assert (p["alpha"], p["beta"], p["theta_min"], m.gflops, m.top1) in rows[preset.model.name], preset.name


def test_find_preset_by_name_or_path(tmp_path):
    assert find_preset("deit-s-paper-3.23").method == ATMConfig(0.985, 0.045, 0.88)
    path = save_preset(a_preset(), tmp_path / "mine.yaml")
    assert find_preset(str(path)).path == path
    with pytest.raises(UsageError, match=r"close: .*deit-s-paper-3\.23"):
        find_preset("deit-s-paper-3.2")


def test_patch_from_preset_applies_the_preset_in_one_line(tmp_path):
    path = save_preset(a_preset(model="vit_tiny_patch16_224", method=ATMConfig(0.6, 0.05, 0.3)), tmp_path / "t.yaml")
    images = torch.rand(4, 3, 32, 32)
    model, reference = make_tiny_vit(3), make_tiny_vit(3)
    atm_cli.patch_from_preset(model, path)
    patch(reference, ATMConfig(0.6, 0.05, 0.3))
    with torch.no_grad():
        assert torch.equal(model(images), reference(images))
    assert last_trace(model).tokens == last_trace(reference).tokens
    with pytest.raises(UsageError, match="made for deit_small_patch16_224"):
        atm_cli.patch_from_preset(make_tiny_vit(3), "deit-s-paper-3.23")


def test_presets_cli_list_and_show():
    listed = runner.invoke(app, ["presets", "list", "--model", "deit_small_patch16_224", "--json"])
    assert listed.exit_code == 0, listed.output
    names = [p["name"] for p in json.loads(listed.stdout)["presets"]]
    assert names == [p.name for p in list_presets("deit_small_patch16_224")] and "deit-s-paper-3.23" in names
    shown = runner.invoke(app, ["presets", "show", "deit-s-paper-3.23", "--json"])
    assert shown.exit_code == 0, shown.output
    document = json.loads(shown.stdout)
    assert document["params"]["alpha"] == 0.985
    assert yaml.safe_load(Path(document["path"]).read_text())["measured"] == document["measured"]
    table = runner.invoke(app, ["presets", "list"])
    assert table.exit_code == 0 and "deit-s-paper-3.23 *" in table.output
    missing = runner.invoke(app, ["presets", "show", "no-such-preset"])
    assert missing.exit_code == 2 and missing.output.count("\n") == 1 and "no-such-preset" in missing.output


def test_bundled_demo_presets_fit_the_bundled_weights_and_the_default_reproduces_its_figures(demo):
    presets = list_presets(DEMO_MODEL_NAME)
    assert {p.name for p in presets} >= {"atm-demo-no-drop", "atm-demo-gflops-70"}
    assert all(p.model.checkpoint_sha256 == demo.checkpoint_sha256 for p in presets), "recalibrate after retraining"
    preset = default_preset_for(DEMO_MODEL_NAME)
    assert default_preset_for(DEMO_MODEL_NAME, demo.checkpoint_sha256) == preset
    assert default_preset_for(DEMO_MODEL_NAME, "0" * 64) is None  # other weights: no default setting
    assert list_presets(DEMO_MODEL_NAME, demo.checkpoint_sha256) == presets
    assert list_presets(DEMO_MODEL_NAME, "0" * 64) == []  # nor settings the calibration would start from
    assert preset.measured.data == "bundled:cifar10-eval" and preset.measured.data_limit is None
    report = evaluate(demo, load_image_folder(DEMO_EVAL_DATA, demo), preset.method, preset.batch_size, workers=0)
    assert report.data_fingerprint == preset.measured.data_fingerprint
    assert report.merged.gflops == pytest.approx(preset.measured.gflops, rel=1e-12)
    assert (report.merged.top1, report.baseline.top1) == (preset.measured.top1, preset.measured.baseline_top1)
