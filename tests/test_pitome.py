"""PiToMe against hand-built token graphs, the unpatched models' logits and torch's own FLOP counter."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from atm_cli.engine import PiToMeConfig, last_trace, method_config, patch
from atm_cli.engine.methods.base import BlockInput
from atm_cli.engine.methods.pitome import energy_score, margin_schedule
from atm_cli.presets import Measured, ModelInfo, build_preset, load_preset, save_preset

from helpers import FAMILIES, assert_no_op, build, engine_and_counter_gflops, tokens_left_along


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


def in_plane(degrees: float) -> list[float]:
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees)), 0.0, 0.0]


def at_angle(degrees: float, plane: int) -> list[float]:
    """A unit vector in 5-d, at `degrees` in the plane of axes (2 plane, 2 plane + 1); plane 2 is axis 4 alone."""
    vector = [0.0] * 5
    if plane == 2:
        vector[4] = 1.0
    else:
        vector[2 * plane], vector[2 * plane + 1] = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return vector


# --- the energy score and the merge, by hand ---------------------------------------------------------------

def test_energy_is_the_mean_of_the_papers_piecewise_kernel():
    similarity = torch.tensor([[[1.0, 0.8, -0.2], [0.8, 1.0, 0.0], [-0.2, 0.0, 1.0]]])
    margin, alpha = 0.5, 2.0

    def kernel(cos):  # cos - m at or above the margin, alpha (e^(cos - m) - 1) below it
        return cos - margin if cos >= margin else alpha * (math.exp(cos - margin) - 1.0)

    expected = [sum(kernel(c) for c in row) / 3 for row in similarity[0].tolist()]
    assert energy_score(similarity, margin, alpha)[0].tolist() == pytest.approx(expected, abs=1e-6)
    # Tokens 0 and 1 are close to each other, token 2 to neither: it has the lowest energy (it is protected).
    assert energy_score(similarity, margin, alpha)[0].argmin().item() == 2


@torch.no_grad()
def test_high_energy_cluster_merges_and_distinct_tokens_are_protected():
    """Two prefix tokens, a cluster of four keys at 0, 4, 10 and 18 degrees, and two keys orthogonal to it
    and to each other. T = 6 image tokens at ratio 0.65: r = floor(6 - 3.9) = 2.

    With margin 0.5 every in-cluster cosine lies above it, so the cluster's energies order as the row sums
    of its cosines: 10 deg (3.9696) > 4 deg (3.9624) > 0 deg (3.9335) > 18 deg (3.9117), and the two
    orthogonal keys have the lowest energy (tied: they keep their order). Set a = ranks 0, 2 = {10, 0 deg},
    set b = ranks 1, 3 = {4, 18 deg}; both a-tokens are closest to 4 deg, so 0, 4 and 10 deg become one token.
    """
    metric = torch.tensor([[in_plane(0), in_plane(10),  # prefix tokens: never scored, never merged
                            in_plane(0), in_plane(4), in_plane(10), in_plane(18),
                            [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]])
    x = torch.randn(1, 8, 5, generator=torch.Generator().manual_seed(0))
    # unprotected_blocks=0: the protected merge in every block (by default block 0 would not protect).
    config = PiToMeConfig(ratio=0.65, margin=0.5, unprotected_blocks=0)
    plan = config.plan(SimpleNamespace(num_prefix_tokens=2, blocks=[None] * 12))
    reduction = plan.step(BlockInput(index=0, x=x, size=None, metric=metric, attention=None))

    expected = torch.stack([x[0, 0], x[0, 1], x[0, 6], x[0, 7], x[0, 2:5].mean(dim=0), x[0, 5]])[None]
    torch.testing.assert_close(reduction.x, expected)
    assert reduction.size[0, :, 0].tolist() == [1, 1, 1, 1, 3, 1]
    assert reduction.extra_macs == 6 * 6 * 4  # the image tokens' similarity matrix


# One prefix token and six image tokens, in sequence: lone, p0, c50, c0, p2, c20. The c tokens are a loose
# cluster (0, 20 and 50 degrees in one plane), p0 and p2 a tight pair (0 and 2 degrees in another plane), lone
# is orthogonal to all. With the margin at 0.5 the energies (the mean of ELU(cos - 0.5) over the six, each
# orthogonal neighbour giving e^-0.5 - 1 = -0.3935) are c20 0.0209 > c0 -0.0163 > c50 -0.0286 > p0 = p2 -0.0958
# > lone -0.2446, so by energy rank: c20, c0, c50, p, p, lone (the pair's order is a tie, and decides nothing
# below). With the margin at 0.25 the order is the same: 0.2320, 0.1948, 0.1825, 0.1024, -0.0593.
PAIR_AND_CLUSTER = torch.tensor([[at_angle(0, 0),  # prefix: never scored, never merged
                                  at_angle(0, 2), at_angle(0, 1), at_angle(50, 0), at_angle(0, 0), at_angle(2, 1),
                                  at_angle(20, 0)]])
LONE, P0, C50, C0, P2, C20 = range(1, 7)


def members(config: PiToMeConfig, depth: int, index: int) -> list[set[int]]:
    """Which positions each token holds after block `index`'s step, in the new sequence order."""
    plan = config.plan(SimpleNamespace(num_prefix_tokens=1, blocks=[None] * depth))
    one_hot = torch.eye(7)[None]
    reduction = plan.step(BlockInput(index=index, x=one_hot, size=None, metric=PAIR_AND_CLUSTER, attention=None))
    groups = [set(row.nonzero().flatten().tolist()) for row in reduction.combine(one_hot)[0]]
    assert reduction.size[0, :, 0].tolist() == [len(group) for group in groups]
    return groups


@torch.no_grad()
def test_first_half_matches_every_token_and_merges_the_closest_pairs():
    """Three blocks: the default unprotected blocks are ceil(3 / 2) = 2, and block 1's margin is 0.75 * 2 / 3 = 0.5.

    All six tokens split by energy rank: a = ranks 0, 2, 4 = c20, c50, one of the pair; b = ranks 1, 3, 5 = c0,
    the other of the pair, lone. Best partners: the pair's a-token its twin (cos 2 deg = 0.9994), c20 c0
    (cos 20 deg = 0.9397), c50 c0 (cos 50 deg = 0.6428). r = floor(6 - 6 * 0.65) = 2: the pair and c20 -> c0
    merge, although the pair has low energy (a protected merge would keep it). Then: the prefix, the a-token
    left (c50), and the b-tokens in energy order: c0 + c20, the pair, lone.
    """
    assert members(PiToMeConfig(ratio=0.65, margin=0.75), depth=3, index=1) == [{0}, {C50}, {C0, C20}, {P0, P2}, {LONE}]


@torch.no_grad()
def test_after_the_first_half_the_low_energy_pair_is_protected():
    """Block 2 of 3 (margin 0.25) protects: only the top 2r = 4 ranks (c20, c0, c50, one of the pair) split,
    a = c20, c50 and b = c0, the pair's first; both a-tokens merge into c0, the pair and lone are left alone.
    unprotected_blocks=0 gives the same merge in block 1."""
    cluster = {C0, C20, C50}
    for config, index in ((PiToMeConfig(ratio=0.65, margin=0.75), 2),
                          (PiToMeConfig(ratio=0.65, margin=0.75, unprotected_blocks=0), 1)):
        tokens = members(config, depth=3, index=index)
        assert cluster in tokens and {LONE} in tokens and {P0} in tokens and {P2} in tokens and len(tokens) == 5
        assert tokens[0] == {0}


def test_unprotected_blocks_beyond_the_model_are_refused():
    with pytest.raises(ValueError, match="exceeds the model's 3 blocks"):
        PiToMeConfig(unprotected_blocks=4).plan(SimpleNamespace(num_prefix_tokens=1, blocks=[None] * 3))


def test_margin_falls_linearly_to_one_block_above_zero():
    assert margin_schedule(0.9, 12) == pytest.approx([0.9 - 0.075 * l for l in range(12)])
    assert margin_schedule(0.9, 12)[-1] == pytest.approx(0.075)


# --- whole models ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_ratio_one_matches_unpatched_and_the_default_merges(family, images):
    model = build(family)
    assert_no_op(model, images, PiToMeConfig(ratio=1.0))
    assert last_trace(model).merged == [0] * len(model.blocks)
    patch(model, PiToMeConfig())
    model(images)
    trace = last_trace(model)
    # The first block merges floor(T - 0.95 T) of its T image tokens; the prefix tokens are never merged.
    n_image = trace.tokens[0] - model.num_prefix_tokens
    assert trace.merged[0] == math.floor(n_image - n_image * 0.95) > 0
    assert trace.size[:, :model.num_prefix_tokens].eq(1).all()


def test_merged_gflops_match_torch_flop_counter(images):
    trace, independent = engine_and_counter_gflops(PiToMeConfig(ratio=0.9), images)
    assert trace.tokens[-1] < 197
    assert trace.gflops == pytest.approx(independent, rel=0.01)


@torch.no_grad()
def test_knob_step_zero_merges_nothing_and_higher_steps_merge_more(images):
    knob = PiToMeConfig.knob(depth=12, image_tokens=196)
    final_tokens = tokens_left_along(knob, (0, 4, knob.top), images[:1])
    assert final_tokens[0] == 197
    assert final_tokens[0] > final_tokens[1] > final_tokens[2]
    assert knob.config(knob.top).ratio == 0.5  # the lowest ratio the method admits


# --- parameters -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("params", [{"ratio": 0.49}, {"ratio": 1.01}, {"margin": 1.5}, {"margin": -1.1},
                                    {"alpha": 0.0}, {"ratio": "most"}, {"prop_attn": "perhaps"}, {"r": 4},
                                    {"unprotected_blocks": -1}, {"unprotected_blocks": 1.5}])
def test_out_of_range_or_unknown_parameters_are_refused(params):
    with pytest.raises(ValueError):
        method_config("pitome", params)


def test_params_round_trip_through_plain_values_and_a_preset_file(tmp_path):
    config = method_config("pitome", {"ratio": "0.9", "margin": "0.95", "prop_attn": "on",  # as `--set` gives them
                                      "unprotected_blocks": "0"})
    assert config == PiToMeConfig(ratio=0.9, margin=0.95, prop_attn=True, unprotected_blocks=0)
    assert PiToMeConfig.from_params(config.to_params()) == config
    assert PiToMeConfig.from_params(PiToMeConfig().to_params()) == PiToMeConfig()  # unprotected_blocks None survives
    preset = build_preset(config, ModelInfo(name="deit_tiny_patch16_224", tag="fb_in1k", num_classes=1000),
                          batch_size=32, measured=Measured(gflops=0.9, top1=70.0, baseline_gflops=1.26,
                                                           baseline_top1=72.2, n_images=100))
    loaded = load_preset(save_preset(preset, tmp_path / "pitome.yaml"))
    assert loaded.method == config and loaded.method_name == "pitome"
