"""Zero-TPrune against linear algebra, hand-built token sets, the unpatched models' logits and torch's FLOP counter."""
from __future__ import annotations

import math

import pytest
import torch
from timm.layers import Attention

from atm_cli.engine import ZeroTPruneConfig, last_trace, method_config, patch
from atm_cli.engine.attention import attention_with_sizes
from atm_cli.engine.backbones.timm_vit import attention_parts
from atm_cli.engine.methods.zero_tprune import (emphasized_importance, iteration_schedule, weighted_pagerank,
                                                zero_tprune_keep)
from atm_cli.presets import Measured, ModelInfo, build_preset, load_preset, save_preset

from helpers import FAMILIES, assert_no_op, build, engine_and_counter_gflops, tokens_left_along


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


# A 4-token attention graph per head (rows: queries, each summing to 1), irreducible and aperiodic.
GRAPH = torch.tensor([[[0.10, 0.60, 0.20, 0.10],
                       [0.30, 0.30, 0.30, 0.10],
                       [0.50, 0.20, 0.20, 0.10],
                       [0.25, 0.25, 0.25, 0.25]],
                      [[0.70, 0.10, 0.10, 0.10],
                       [0.40, 0.40, 0.10, 0.10],
                       [0.05, 0.05, 0.05, 0.85],
                       [0.30, 0.30, 0.20, 0.20]]])[None]  # (B=1, H=2, N=4, N=4)


# --- the I-stage ------------------------------------------------------------------------------------------------

def test_pagerank_converges_to_the_left_eigenvector_of_eigenvalue_one():
    for head in range(2):
        values, vectors = torch.linalg.eig(GRAPH[0, head].double().T)
        stationary = vectors[:, (values - 1).abs().argmin()].real
        stationary = stationary / stationary.sum()
        torch.testing.assert_close(weighted_pagerank(GRAPH, 100)[0, head].double(), stationary, atol=1e-6, rtol=0)


def test_one_pagerank_iteration_is_the_mean_attention_each_token_receives():
    torch.testing.assert_close(weighted_pagerank(GRAPH, 1), GRAPH.mean(dim=-2))
    assert weighted_pagerank(GRAPH, 7).sum(dim=-1)[0].tolist() == pytest.approx([1.0, 1.0])  # stays a distribution


def test_heads_aggregate_by_root_mean_square():
    scores = torch.tensor([[[0.5, 0.5], [0.9, 0.1]]])  # (B, H, N)
    assert emphasized_importance(scores)[0].tolist() == pytest.approx([math.sqrt(0.53), math.sqrt(0.13)])


def test_paper_iteration_counts_by_depth():
    assert iteration_schedule(None, 12) == [30] * 3 + [5] * 6 + [1] * 3
    assert iteration_schedule(4, 3) == [4, 4, 4]


# --- the S-stage and the I-stage, by hand --------------------------------------------------------------------

def unit(*coordinates: float) -> list[float]:
    return list(coordinates) + [0.0] * (4 - len(coordinates))


# One prefix token (importance 0: it must survive anyway) and six image tokens at positions 1-6.
# By importance: 1 (.30) > 5 (.25) > 3 (.20) > 4 (.10) > 2 (.05) > 6 (.02): targets {1, 5, 3}, sources {4, 2, 6}.
# Source 4 duplicates target 3 (cosine 1), source 2 leans to target 1 (cosine 0.3), source 6 is orthogonal to all.
IMPORTANCE = torch.tensor([[0.0, 0.30, 0.05, 0.20, 0.10, 0.25, 0.02]])
KEYS = torch.tensor([[unit(1), unit(1), unit(0.3, 0, 0, math.sqrt(0.91)), unit(0, 1), unit(0, 1), unit(0, 0, 1),
                      unit(0, 0, 0, 1)]])


@pytest.mark.parametrize("r_similar,r_unimportant,kept", [
    (1, 1, [0, 1, 2, 3, 5]),  # S: the duplicate 4; I: then the least important, 6
    (0, 2, [0, 1, 3, 4, 5]),  # I-stage alone: the two least important, 6 and 2
    (2, 0, [0, 1, 3, 5, 6]),  # S-stage alone: the two sources closest to a target, 4 and 2
    (0, 0, [0, 1, 2, 3, 4, 5, 6]),
])
def test_stages_prune_by_hand(r_similar, r_unimportant, kept):
    assert zero_tprune_keep(KEYS, IMPORTANCE, 1, r_similar, r_unimportant)[0].tolist() == kept


def test_per_head_probabilities_average_to_the_head_mean():
    torch.manual_seed(0)
    attn = Attention(dim=32, num_heads=4).eval()
    attn.fused_attn = False
    x = torch.randn(2, 9, 32)
    _, _, per_head = attention_with_sizes(attention_parts(attn), x, None, with_probabilities=True, per_head=True)
    _, _, mean = attention_with_sizes(attention_parts(attn), x, None, with_probabilities=True)
    assert per_head.shape == (2, 4, 9, 9)
    torch.testing.assert_close(per_head.mean(dim=1), mean)


# --- whole models ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_r_zero_matches_unpatched_and_the_default_prunes_image_tokens_only(family, images):
    model = build(family)
    assert_no_op(model, images, ZeroTPruneConfig(r=0))
    assert last_trace(model).merged == [0] * len(model.blocks)
    patch(model, ZeroTPruneConfig(), trace_source=True)
    model(images)
    trace = last_trace(model)
    assert trace.merged == [11] * len(model.blocks)
    assert trace.size is None  # pruning merges nothing
    prefix = model.num_prefix_tokens  # still first, in order, each standing for itself alone
    torch.testing.assert_close(trace.source[:, :prefix], torch.eye(prefix, trace.tokens[0]).expand(2, -1, -1))


def test_pruned_gflops_match_torch_flop_counter(images):
    trace, independent = engine_and_counter_gflops(ZeroTPruneConfig(r=11), images)
    assert trace.tokens[-1] == 197 - 12 * 11
    assert trace.gflops == pytest.approx(independent, rel=0.01)


@torch.no_grad()
def test_knob_step_zero_prunes_nothing_and_higher_steps_prune_more(images):
    knob = ZeroTPruneConfig.knob(depth=12, image_tokens=196)
    final_tokens = tokens_left_along(knob, (0, 4, knob.top), images[:1])
    assert final_tokens[0] == 197
    assert final_tokens[0] > final_tokens[1] > final_tokens[2] >= 1


# --- parameters -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("params", [{"r": -1}, {"r": [4, -2]}, {"similarity_share": 1.5}, {"similarity_share": -0.1},
                                    {"iterations": 0}, {"iterations": 2.5}, {"ratio": 0.9}])
def test_out_of_range_or_unknown_parameters_are_refused(params):
    with pytest.raises(ValueError):
        method_config("zero-tprune", params)


def test_params_round_trip_through_plain_values_and_a_preset_file(tmp_path):
    config = method_config("zero-tprune", {"r": "6,5,4", "similarity_share": "0.25", "iterations": "none"})
    assert config == ZeroTPruneConfig(r=(6, 5, 4), similarity_share=0.25)
    assert ZeroTPruneConfig.from_params(config.to_params()) == config
    preset = build_preset(config, ModelInfo(name="deit_small_patch16_224", tag="fb_in1k", num_classes=1000),
                          batch_size=32, measured=Measured(gflops=3.0, top1=79.0, baseline_gflops=4.61,
                                                           baseline_top1=79.9, n_images=100))
    loaded = load_preset(save_preset(preset, tmp_path / "zero-tprune.yaml"))
    assert loaded.method == config and loaded.method_name == "zero-tprune"
