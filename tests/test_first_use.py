"""What a new user meets first: help without torch, whole help text at 80 columns, output on stdout, notes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from atm_cli.cli.app import app
from atm_cli.presets import find_preset

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "timm", "torchvision", "matplotlib")
QUICK_COMMANDS = [["--help"], ["presets", "--help"], ["presets", "list"], ["presets", "list", "--model", "deit_small"],
                  ["presets", "show", "deit-s-paper-3.23"], ["methods"], ["methods", "--json"]]


def command_paths() -> list[list[str]]:
    """Every command and sub-command of `atm`, as the words that name it."""
    root = typer.main.get_command(app)
    paths = []
    for name, command in root.commands.items():
        if hasattr(command, "commands"):  # a group
            paths += [[name, sub] for sub in command.commands]
        else:
            paths.append([name])
    return paths


def test_help_and_presets_never_import_torch_timm_or_matplotlib():
    commands = QUICK_COMMANDS + [[*path, "--help"] for path in command_paths()]
    script = f"""
import json, sys
from atm_cli.cli.app import app
loaded = {{}}
for args in {commands!r}:
    try:
        app(args, prog_name="atm")
    except SystemExit as end:
        assert end.code in (0, None), (args, end.code)
    loaded[" ".join(args)] = [name for name in {HEAVY!r} if name in sys.modules]
sys.stderr.write(json.dumps(loaded))
"""
    process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert process.returncode == 0, process.stderr
    loaded = json.loads(process.stderr.splitlines()[-1])
    assert len(loaded) == len(commands) and len(command_paths()) >= 8
    assert loaded == {" ".join(args): [] for args in commands}


def test_import_atm_cli_registers_the_demo_model_once_timm_is_imported():
    script = """
import sys
import atm_cli
assert "timm" not in sys.modules  # importing atm_cli alone stays light
import timm
model = timm.create_model("atm_demo_vit_tiny_patch4_32")
print(type(model).__name__, model.num_classes)
"""
    process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert process.returncode == 0, process.stderr
    assert process.stdout.split() == ["VisionTransformer", "10"]


@pytest.mark.parametrize("path", command_paths() + [[]], ids=lambda path: " ".join(path) or "atm")
def test_help_at_80_columns_shows_every_option_whole(path):
    outcome = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"})
    assert outcome.exit_code == 0, outcome.output
    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    names = [option for param in command.params for option in param.opts + param.secondary_opts]
    assert all(f" {option} " in outcome.stdout for option in names if option.startswith("--"))
    assert "…" not in outcome.stdout and "<bool>" not in outcome.stdout
    assert max(len(line) for line in outcome.stdout.splitlines()) <= 80
    if any(param.name == "plot" for param in command.params):
        assert "atm-cli[plot]" in outcome.stdout.replace("│", "").replace("\n", "").replace(" ", "")


def test_presets_print_their_tables_on_stdout():
    listed = runner.invoke(app, ["presets", "list"])
    assert listed.exit_code == 0 and listed.stderr == ""
    assert "deit-s-paper-3.23 *" in listed.stdout and "deit_small_patch16_224" in listed.stdout
    shown = runner.invoke(app, ["presets", "show", "deit-s-paper-3.23"])
    assert shown.exit_code == 0 and shown.stderr == ""
    preset = find_preset("deit-s-paper-3.23")
    assert shown.stdout.startswith(f"# {preset.path}\n")
    assert yaml.safe_load(shown.stdout) == preset.to_dict()  # the output is the preset file again
    as_json = runner.invoke(app, ["presets", "show", "deit-s-paper-3.23", "--json"])
    assert json.loads(as_json.stdout) == {"name": "deit-s-paper-3.23", "path": str(preset.path), **preset.to_dict()}


def test_random_weights_come_with_a_word_on_accuracy(image_folder, tiny_vit_dir):
    outcome = runner.invoke(app, ["eval", "--model", str(tiny_vit_dir), "--no-pretrained", "--data", str(image_folder),
                                  "--workers", "0", "--json"])
    assert outcome.exit_code == 0, outcome.stderr
    assert "random weights (--no-pretrained): top-1 and top-5 mean nothing" in outcome.stderr
    assert "random weights" not in runner.invoke(app, ["eval", "--model", str(tiny_vit_dir), "--data",
                                                       str(image_folder), "--workers", "0"]).stderr


def test_tome_plot_draws_a_bar_for_every_block(monkeypatch, tmp_path, tiny_vit_dir, image_folder):
    pytest.importorskip("matplotlib", reason="plots are the optional atm-cli[plot] extra")
    from atm_cli.analysis import visualize

    bars = []
    save_figure = visualize.save_figure

    def keep_bars(figure, path):
        bars.extend(patch.get_height() for patch in figure.axes[0].patches)
        return save_figure(figure, path)

    monkeypatch.setattr(visualize, "save_figure", keep_bars)
    outcome = runner.invoke(app, ["eval", "--model", str(tiny_vit_dir), "--data", str(image_folder), "--method", "tome",
                                  "--r", "2", "--workers", "0", "--plot", str(tmp_path / "tokens.png")])
    assert outcome.exit_code == 0, outcome.stderr
    assert bars == [2, 2]  # ToMe merges r=2 of the tiny ViT's 17 tokens in each of its 2 blocks


def test_probe_says_why_the_last_block_loses_nothing(tiny_vit_dir, image_folder):
    outcome = runner.invoke(app, ["probe", "--model", str(tiny_vit_dir), "--data", str(image_folder),
                                  "--thresholds", "-1", "--json"])  # -1: every pair merges
    assert outcome.exit_code == 0, outcome.stderr
    rows = json.loads(outcome.stdout)["rows"]
    assert rows[-1]["block"] == 2 and rows[-1]["mean_distance"] < 1e-6 and rows[-1]["merged"]["-1"] > 0
    assert rows[0]["mean_distance"] > 1e-3  # merging in the first block does move the class token
    assert "block 2: 0 whatever it merges: the head reads only the class token" in outcome.stderr
