"""Pictures and the probe: PNGs read back, regions against the engine's own source trace, one probe row per block."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from atm_cli.analysis.probe import merge_only_in, plot_probe, probe
from atm_cli.analysis.visualize import load_pictures, plot_tokens_per_block, visualize
from atm_cli.cli.charts import tokens_chart
from atm_cli.cli.app import app
from atm_cli.engine import ATMConfig, ToMeConfig, last_trace, merging, patch, threshold_schedule, unpatch
from atm_cli.evaluation import DEMO_CALIB_DATA, DEMO_EVAL_DATA, load_image_folder, preload

from helpers import non_blank

ATM = ATMConfig(alpha=0.985, beta=0.045, theta_min=0.88)
IMAGES = sorted(DEMO_EVAL_DATA.glob("*/*.jpg"))[::500][:3]  # three classes


@torch.inference_mode()
def engine_regions(model, picture, config) -> tuple[np.ndarray, int]:
    """Each patch's final token straight from the engine's source trace, and the tokens left."""
    with merging(model, config, trace_source=True):
        model(picture[None])
        source = last_trace(model).source[0]
    prefix = model.num_prefix_tokens
    assert torch.equal(source[prefix:, prefix:].sum(dim=0), torch.ones(source.shape[1] - prefix))  # a partition
    return source[prefix:, prefix:].argmax(dim=0).view(model.patch_embed.grid_size).numpy(), source.shape[0]


def cell_colours(png: Image.Image, box, grid) -> np.ndarray:
    """The colour at the centre of every patch cell of a panel, as a (rows, columns) grid of 24-bit RGB codes."""
    left, top, right, bottom = box
    rows, columns = grid
    cell_h, cell_w = (bottom - top) // rows, (right - left) // columns
    pixels = np.asarray(png.convert("RGB")).astype(np.int64)
    centres = pixels[top + cell_h // 2:bottom:cell_h, left + cell_w // 2:right:cell_w]
    assert centres.shape[:2] == (rows, columns)
    return centres[..., 0] << 16 | centres[..., 1] << 8 | centres[..., 2]


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = set(zip(a.ravel().tolist(), b.ravel().tolist()))
    return len(pairs) == len(set(a.ravel().tolist())) == len(set(b.ravel().tolist()))


def test_visualize_draws_one_region_per_final_token(demo, tmp_path):
    out = tmp_path / "merged.png"
    result = visualize(demo, IMAGES, ATM, out, beside_tome=True)
    png = Image.open(out)
    rows_of_panels = 3  # original, ToMe, ATM
    assert png.width > 3 * 100 and png.height > rows_of_panels * 100
    pictures = load_pictures(IMAGES, demo.data_config)
    prefix = demo.model.num_prefix_tokens
    merged_panels = [p for p in result.panels if p.tokens is not None]
    assert len(merged_panels) == 2 * len(IMAGES)
    names = [str(path) for path in IMAGES]
    for panel in merged_panels:
        picture = pictures[names.index(panel.image)]
        drawn = result.methods[panel.method]
        if panel.method == "ATM":
            assert drawn == ATM
            config = ATMConfig(alpha=ATM.alpha, beta=ATM.beta, theta_min=ATM.theta_min,
                               prefix_only_last_block=False)
        else:
            config = ToMeConfig(r=drawn.r)
        expected, tokens = engine_regions(demo.model, picture, config)
        colours = cell_colours(png, panel.box, panel.grid)
        assert panel.tokens == tokens
        assert len(np.unique(colours)) == panel.regions == tokens - prefix
        assert same_partition(colours, expected)


def test_visualize_cli_json(demo, tmp_path):
    out = tmp_path / "tome.png"
    result = CliRunner().invoke(app, ["visualize", *map(str, IMAGES[:2]), "--r", "3", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    depth = len(demo.model.blocks)
    tokens = demo.unmerged_tokens[0] - 3 * depth  # ToMe removes r tokens in every block while it can
    merged = [p for p in report["panels"] if p["tokens"] is not None]
    assert [p["tokens"] for p in merged] == [tokens, tokens]
    assert Image.open(out).size[0] > 0


def test_probe_has_one_row_per_block(demo):
    batches = preload(load_image_folder(DEMO_CALIB_DATA, demo, limit=8), 8)
    thresholds = (0.85, 0.95)
    report = probe(demo.model, batches, thresholds)
    depth = len(demo.model.blocks)
    assert [row.block for row in report.rows] == list(range(1, depth + 1))
    images = batches[0][0]
    for threshold in thresholds:
        # Merging after the last block's attention cannot move the class token: its MLP works per token.
        assert report.rows[-1].distance[threshold] < 1e-5
        with torch.inference_mode():
            patch(demo.model, ATMConfig(alpha=0, beta=0, theta_min=0, split_layer=depth,
                                        block_thresholds=(threshold,) + (2.0,) * (depth - 1)))
            demo.model(images)
            assert report.rows[0].merged[threshold] == last_trace(demo.model).merged[0] > 0
            unpatch(demo.model)
    assert report.rows[0].distance[0.85] > 0


def test_probe_cli_json(demo):
    result = CliRunner().invoke(app, ["probe", "--limit", "4", "--thresholds", "0.9", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert len(report["rows"]) == len(demo.model.blocks)
    assert report["thresholds"] == [0.9]


def test_merge_only_in_sets_one_block():
    config = merge_only_in(3, 0.9, depth=5)
    assert threshold_schedule(config, 5) == [2.0, 2.0, 0.9, 2.0, 2.0]
    assert config.split_layer == 5 and not config.prefix_only_last_block


def test_tokens_chart_by_hand():
    lines = tokens_chart([64, 32, 17], thresholds=[0.99, 0.95, 0.9], full=64, width=8).splitlines()
    assert lines[0].startswith("block  1 ████████ ")
    assert lines[1].startswith("block  2 ████     ")
    assert lines[2].startswith("block  3 ██▏      ")  # 17/64 of 8 cells = 2.125 = 2 cells and an eighth
    assert lines[2].endswith("17.0  θ 0.900")


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib", reason="plots are the optional atm-cli[plot] extra")
    from atm_cli.analysis.probe import ProbeReport, ProbeRow

    tokens = plot_tokens_per_block([65, 50, 40, 33, 30, 1], tmp_path / "tokens.png", [0.99, 0.97, 0.94, 0.9, 0.88])
    rows = [ProbeRow(block, {0.8: 0.1 / block, 0.9: 0.05 / block}, {0.8: 20.0, 0.9: 10.0}) for block in range(1, 5)]
    probed = plot_probe(ProbeReport((0.8, 0.9), rows, n_images=8), tmp_path / "probe.png")
    assert non_blank(tokens) and non_blank(probed)
