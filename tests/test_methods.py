"""The method registry: one codec per method, validation at the boundary, and the CLI that reads it."""
from __future__ import annotations

import dataclasses
import json
import re

import pytest
from typer.testing import CliRunner

from atm_cli.cli.app import app
from atm_cli.engine import METHODS, ATMConfig, ToMeConfig, constant_knob, method_config, ramp_knob
from atm_cli.presets import ModelInfo, Measured, build_preset, load_preset, save_preset


def example(name: str):
    """A valid, non-trivial setting of each registered method: a few steps up its knob (ATM: the paper's DeiT-S)."""
    knob = METHODS[name].knob(depth=12, image_tokens=196)
    return knob.config(3) if knob is not None else ATMConfig(alpha=0.985, beta=0.045, theta_min=0.88, split_layer=6)


@pytest.mark.parametrize("name", METHODS)
def test_every_method_round_trips_through_a_preset_file(name, tmp_path):
    config = example(name)
    assert method_config(name, json.loads(json.dumps(config.to_params()))) == config  # plain values, JSON-safe
    preset = build_preset(config, ModelInfo(name="deit_small_patch16_224"), 64, Measured(gflops=3.0))
    loaded = load_preset(save_preset(preset, tmp_path / f"{name}.yaml"))
    assert loaded.method_name == name and loaded.method == config


def test_the_papers_fig5_schedules_are_knobs_from_nothing_merged_up():
    """Top-r rising (falling) by one per block to the step's r in the last (first) block, never below 0 (step 0:
    nothing merged); the constant threshold's steps walk its grid with beta 0; a method's knob bears its name."""
    rising, falling = ramp_knob(depth=4, image_tokens=16, rising=True), ramp_knob(4, 16, rising=False)
    assert rising.config(5).r == (2, 3, 4, 5) and falling.config(5).r == (5, 4, 3, 2)
    assert rising.config(2).r == (0, 0, 1, 2) and rising.params(2) == {"r": 2, "schedule": [0, 0, 1, 2]}
    assert rising.config(0).r == (0, 0, 0, 0) and rising.top == 16 // 2 + 4 - 1
    constant = constant_knob([1.0, 0.95, 0.9], split_layer=3)
    assert constant.config(2) == ATMConfig(alpha=0.9, beta=0.0, theta_min=0.9, split_layer=3)
    assert constant.params(1) == {"threshold": 0.95} and constant.top == 2 and constant.name == "threshold"
    assert METHODS["tome"].knob(4, 16).params(3) == {"r": 3} and METHODS["tome"].knob(4, 16).name == "tome"


def test_the_codec_carries_every_field_of_a_setting(tmp_path):
    """No field outside the codec: a probe's one-block thresholds and the last-block shortcut survive a preset."""
    config = ATMConfig(alpha=1.0, beta=0.0, theta_min=1.0, block_thresholds=[1.0, 0.9] + [1.0] * 10,
                       prefix_only_last_block=False)
    assert method_config("atm", json.loads(json.dumps(config.to_params()))) == config
    preset = build_preset(config, ModelInfo(name="deit_small_patch16_224"), 64, Measured(gflops=3.0))
    assert load_preset(save_preset(preset, tmp_path / "probe.yaml")).method == config
    for cls in METHODS.values():
        assert {f.name for f in dataclasses.fields(cls)} == {p.name for p in cls.PARAMS}, cls.NAME


@pytest.mark.parametrize("name, params, message", [
    ("atm", {"alpha": 2.0, "beta": 0.0, "theta_min": 0.9}, "alpha must lie in [-1, 1]"),  # cosines never exceed 1
    ("atm", {"alpha": 0.9, "beta": -0.1, "theta_min": 0.9}, "beta must lie in [0, inf)"),
    ("atm", {"alpha": 0.9, "beta": 0.1}, "atm needs theta_min"),
    ("tome", {"r": -1}, "r must lie in [0, inf)"),
    ("tome", {"r": [4, "x"]}, "r must be an integer or a list of integers"),
    ("tome", {"r": 4, "gamma": 1}, "unknown parameter 'gamma' for tome"),
])
def test_invalid_parameters_are_refused_with_the_reason(name, params, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        method_config(name, params)


def test_list_parameters_become_tuples_so_configs_stay_hashable_and_equal():
    assert ToMeConfig(r=[4, 3]) == ToMeConfig(r=(4, 3)) and hash(ToMeConfig(r=[4, 3])) == hash(ToMeConfig(r=(4, 3)))


def test_methods_command_lists_every_registered_method_and_its_parameters():
    result = CliRunner().invoke(app, ["methods", "--json"])
    assert result.exit_code == 0, result.output
    listed = {row["method"]: [p["name"] for p in row["params"]] for row in json.loads(result.stdout)["methods"]}
    assert listed == {name: [p.name for p in cls.PARAMS] for name, cls in METHODS.items()}


@pytest.mark.parametrize("args, message", [
    (["--alpha", "2"], "alpha must lie in [-1, 1], got 2.0"),
    (["--set", "beta=-0.5"], "beta must lie in [0, inf)"),
    (["--method", "tome", "--set", "r=-1"], "r must lie in [0, inf)"),
    (["--method", "tome", "--set", "gamma=1"], "tome has no parameter 'gamma'"),
    (["--method", "tome", "--set", "r"], "expected NAME=VALUE"),
    (["--method", "nonsense"], "--method nonsense: choose from atm, tome"),  # then the other methods
])
def test_bad_method_flags_fail_in_one_line_before_loading_anything(args, message):
    result = CliRunner().invoke(app, ["eval", "--model", "no-such-model-is-loaded", *args])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_set_and_the_shorthands_give_the_same_setting(tiny_vit_dir, image_folder):
    outputs = []
    for args in (["--method", "tome", "--set", "r=2"], ["--r", "2"]):
        result = CliRunner().invoke(app, ["eval", "--model", str(tiny_vit_dir), "--data", str(image_folder), "--json",
                                          "--workers", "0", *args])
        assert result.exit_code == 0, result.stderr
        outputs.append(json.loads(result.stdout))
    assert outputs[0]["params"] == outputs[1]["params"] == {"r": 2, "inflection": 0.0, "prop_attn": True}
    assert outputs[0]["tokens_per_layer"] == outputs[1]["tokens_per_layer"]
