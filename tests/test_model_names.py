"""Model names as timm users type them: completed against timm's registry, and against the presets' names."""
from __future__ import annotations

import json

import pytest
import timm
from typer.testing import CliRunner

from atm_cli.cli.app import app
from atm_cli.errors import UsageError
from atm_cli.evaluation.models import resolve_model_name
from atm_cli.model_names import complete_model_name
from atm_cli.presets import list_presets

runner = CliRunner()
FAMILY = ["deit_base_distilled_patch16_224", "deit_base_patch16_224", "deit_base_patch16_384",
          "deit_small_distilled_patch16_224", "deit_small_patch16_224", "vit_small_patch14_dinov2"]


def test_a_name_completes_to_the_one_model_it_can_mean():
    notes = []
    assert complete_model_name("deit_small", FAMILY, notes.append) == "deit_small_patch16_224"
    assert complete_model_name("deit_small.fb_in1k", FAMILY, notes.append) == "deit_small_patch16_224.fb_in1k"
    assert complete_model_name("deit_small_distilled", FAMILY, notes.append) == "deit_small_distilled_patch16_224"
    assert complete_model_name("*dinov2", FAMILY, notes.append) == "vit_small_patch14_dinov2"  # timm's wildcard
    assert complete_model_name("dinov2", FAMILY, notes.append) == "vit_small_patch14_dinov2"  # found once inside
    assert notes == ["deit_small -> deit_small_patch16_224", "deit_small.fb_in1k -> deit_small_patch16_224.fb_in1k",
                     "deit_small_distilled -> deit_small_distilled_patch16_224",
                     "*dinov2 -> vit_small_patch14_dinov2", "dinov2 -> vit_small_patch14_dinov2"]
    assert complete_model_name("deit_small_patch16_224", FAMILY, notes.append) == "deit_small_patch16_224"
    assert complete_model_name("resnet50", FAMILY) == "resnet50"  # unknown: the caller says so
    assert len(notes) == 5  # a full name is no completion


def test_several_candidates_are_an_error_listing_the_prefix_matches_first():
    with pytest.raises(UsageError) as error:
        complete_model_name("deit_base", FAMILY)
    listed = str(error.value).split("could be ")[1].split(":")[0].split(", ")
    assert listed[:2] == ["deit_base_patch16_224", "deit_base_patch16_384"]  # differ only in size: first
    assert set(listed) == {name for name in FAMILY if name.startswith("deit_base")}
    with pytest.raises(UsageError, match="could be .*deit_small_patch16_224"):
        complete_model_name("patch16", FAMILY)


def test_timm_names_resolve_as_users_type_them(tiny_vit_dir):
    notes = []
    assert resolve_model_name("deit_small", notes.append) == "deit_small_patch16_224"
    assert resolve_model_name("deit_tiny.fb_in1k", notes.append) == "deit_tiny_patch16_224.fb_in1k"
    assert notes == ["deit_small -> deit_small_patch16_224", "deit_tiny.fb_in1k -> deit_tiny_patch16_224.fb_in1k"]
    assert timm.is_model("deit_small_patch16_224") and not timm.is_model("deit_small")
    with pytest.raises(UsageError, match="deit_base_patch16_224, deit_base_patch16_384, deit_base_distilled"):
        resolve_model_name("deit_base")
    # Names that are not timm's are left alone: the demo alias, folders.
    assert resolve_model_name(str(tiny_vit_dir), notes.append) == f"local-dir:{tiny_vit_dir.resolve()}"
    assert len(notes) == 2


def test_the_commands_complete_names_and_say_so(image_folder, tmp_path):
    class_map = tmp_path / "map.json"
    class_map.write_text(json.dumps({"a": 0, "b": 1, "c": 2}))
    outcome = runner.invoke(app, ["eval", "--model", "deit_tiny", "--no-pretrained", "--data", str(image_folder),
                                  "--class-map", str(class_map), "--limit", "3", "--workers", "0", "--json"])
    assert outcome.exit_code == 0, outcome.stderr
    assert json.loads(outcome.stdout)["model"] == "deit_tiny_patch16_224"
    assert "deit_tiny -> deit_tiny_patch16_224" in outcome.stderr

    stress = runner.invoke(app, ["stress", "--model", "deit_base", "--no-pretrained", "--methods", "tome"])
    assert stress.exit_code == 2 and "could be deit_base_patch16_224" in stress.stderr


def test_presets_list_completes_over_the_presets_names():
    made_for = {p.model.name for p in list_presets("deit_small_patch16_224")}
    assert made_for == {"deit_small_patch16_224"}  # the bundled paper settings for DeiT-S
    listed = runner.invoke(app, ["presets", "list", "--model", "deit_small", "--json"])
    assert listed.exit_code == 0, listed.stderr
    assert {p["model"]["name"] for p in json.loads(listed.stdout)["presets"]} == made_for
    assert "deit_small -> deit_small_patch16_224" in listed.stderr
    none = runner.invoke(app, ["presets", "list", "--model", "resnet50"])
    assert none.exit_code == 0 and none.stdout == "" and "no bundled presets for resnet50" in none.stderr

