"""Flags live in the CLI: the library's errors name parameters, and one table turns them into flags."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

import atm_cli
from atm_cli.cli.app import app
from atm_cli.cli.flags import FLAGS
from atm_cli.errors import UsageError
from atm_cli.evaluation.models import resolve_device

PARAM_USE = re.compile(r"""param\(\s*f?["']([a-z_]+)["']""")


def command_line_options() -> set[str]:
    group = typer.main.get_command(app)
    options = set()
    for command in group.commands.values():
        for sub in getattr(command, "commands", {None: command}).values():
            options |= {opt for p in sub.params for opt in p.opts}
    return options


def test_every_parameter_the_library_names_has_a_flag_and_every_flag_exists():
    source = Path(atm_cli.__file__).parent
    named = {name for path in source.rglob("*.py") for name in PARAM_USE.findall(path.read_text())}
    assert named and named <= set(FLAGS), sorted(named - set(FLAGS))
    assert set(FLAGS.values()) <= command_line_options(), sorted(set(FLAGS.values()) - command_line_options())
    flag_in_message = re.compile(r"""(UsageError|RunError)\(\s*f?["'][^"']*--[a-z]""")
    assert not [path.name for path in source.rglob("*.py")
                if "cli" not in path.parts and flag_in_message.search(path.read_text())]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_the_library_says_the_parameter_and_the_command_line_the_flag():
    with pytest.raises(UsageError) as raised:
        resolve_device("cuda")
    assert str(raised.value).startswith("device cuda: no CUDA device is available here")
    result = CliRunner().invoke(app, ["eval", "--device", "cuda"])
    assert result.exit_code == 2
    assert result.stderr.startswith("atm: error: --device cuda: no CUDA device is available here")
