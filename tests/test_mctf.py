"""MCTF against its paper: hand-built scores and bidirectional steps, exact fusion of duplicates, no-op logits, GFLOPs."""
from __future__ import annotations

import pytest
import torch

from atm_cli.engine import MCTFConfig, last_trace, method_config, patch
from atm_cli.engine.methods.mctf import bidirectional_merge, fused_attention, multi_criteria_scores
from atm_cli.presets import load_preset, save_preset

from helpers import a_preset, assert_no_op, build, engine_and_counter_gflops, tokens_left_along


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


# --- hand-built cases -------------------------------------------------------------------------------------------

# One prefix token and six image tokens: the alternate split puts image positions 2, 4, 6 in a and 1, 3, 5 in b.
A_POS, B_POS = torch.tensor([[2, 4, 6]]), torch.tensor([[1, 3, 5]])
ONE_HOT = torch.eye(7)[None]  # merging one-hot rows shows which positions each token holds


def test_bidirectional_step_by_hand():
    scores = torch.tensor([[[0.90, 0.10, 0.20],    # a2: best b1
                            [0.85, 0.40, 0.30],    # a4: best b1
                            [0.50, 0.60, 0.70]]])  # a6: best b5
    # r = 3: r // 2 = 1 a-token (a2, the most attracted) fuses into b1. Then each b-token's best among the a
    # left (a4, a6): b1 -> a4 (0.85), b3 -> a6 (0.6), b5 -> a6 (0.7); the 2 most attracted, b1 (holding a2)
    # and b5, fuse. Left: prefix, a4 + b1 + a2, a6 + b5, then b3.
    merged = bidirectional_merge(scores, A_POS, B_POS, r=3, num_prefix=1, bidirectional=True)(ONE_HOT)
    expected = torch.tensor([[1, 0, 0, 0, 0, 0, 0], [0, 1, 1, 0, 1, 0, 0], [0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 0, 0, 0]])
    torch.testing.assert_close(merged[0], expected.float())
    # One way, r = 2: a2 and a4 fuse into b1; the a left, then every b in b order.
    one_way = bidirectional_merge(scores, A_POS, B_POS, r=2, num_prefix=1, bidirectional=False)(ONE_HOT)
    expected = torch.tensor([[1, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 1], [0, 1, 1, 0, 1, 0, 0], [0, 0, 0, 1, 0, 0, 0],
                             [0, 0, 0, 0, 0, 1, 0]])
    torch.testing.assert_close(one_way[0], expected.float())


def test_the_second_step_ranks_b_tokens_for_the_next_split():
    scores = torch.tensor([[[0.9, 0.2, 0.3], [0.1, 0.2, 0.3], [0.1, 0.2, 0.3]]])
    # r = 1: only the second step runs (r // 2 = 0). Each b-token's best a: b1 0.9, b3 0.2, b5 0.3, so b1 fuses
    # into a2, and the b left follow the a-tokens in that ranking: b5 before b3.
    merged = bidirectional_merge(scores, A_POS, B_POS, r=1, num_prefix=1, bidirectional=True)(ONE_HOT)
    assert merged[0].argmax(dim=-1).tolist() == [0, 1, 4, 6, 5, 3]  # [1, 2] is held by one token: argmax is 1


def test_multi_criteria_scores_by_hand():
    # Positions: 0 prefix, 1 the b-token, 2 the a-token; cos(a, b) = 0.6.
    tokens = torch.tensor([[[5.0, 5.0], [0.6, 0.8], [1.0, 0.0]]])
    received = torch.tensor([[0.5, 0.125, 0.25]])  # 1 / received = 2, 8, 4 -> / 8 -> b: 1, a: 0.5
    size = torch.tensor([[1.0, 4.0, 2.0]])  # 1 / size = 1, 0.25, 0.5 -> / 1
    config = MCTFConfig(tau_sim=1.0, tau_info=2.0, tau_size=3.0)
    scores = multi_criteria_scores(tokens, received, size, torch.tensor([[2]]), torch.tensor([[1]]), config)
    # ((0.6 + 1) / 2) ** 1 * (0.5 * 1) ** (1 / 2) * (0.5 * 0.25) ** (1 / 3) = 0.8 * 0.70710678 * 0.5
    assert scores.item() == pytest.approx(0.28284271, abs=1e-6)
    no_info_no_size = multi_criteria_scores(tokens, received, size, torch.tensor([[2]]), torch.tensor([[1]]),
                                            MCTFConfig(tau_info=0.0, tau_size=0.0))
    assert no_info_no_size.item() == pytest.approx(0.8, abs=1e-6)


def test_fused_attention_adds_keys_and_averages_queries_by_weight():
    # Three tokens, one head; token 2 fuses into token 1 (no prefix), weights 1, 1, 3.
    attention = torch.tensor([[[[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]]]])
    merge_sum = bidirectional_merge(torch.tensor([[[1.0]]]), torch.tensor([[2]]), torch.tensor([[1]]), r=1,
                                    num_prefix=1, bidirectional=False)
    weight = torch.tensor([[[1.0], [1.0], [3.0]]])
    fused = fused_attention(merge_sum, attention, weight, merge_sum(weight))
    # keys 1 and 2 add: rows [0.5, 0.5], [0.1, 0.9], [0.2, 0.8]; queries 1 and 2 average 1:3 -> [0.175, 0.825]
    torch.testing.assert_close(fused, torch.tensor([[[[0.5, 0.5], [0.175, 0.825]]]]))


# --- whole models ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["deit_tiny", "deit_distilled", "registers", "deit3_layerscale"])
@torch.no_grad()
def test_r_zero_matches_unpatched(family, images):
    model = build(family)
    assert_no_op(model, images, MCTFConfig(r=0))


@pytest.mark.parametrize("prop_attn", [True, False])
@torch.no_grad()
def test_fusing_identical_tokens_is_exact_with_sizes(prop_attn):
    """Identical patch tokens: fused tokens, fused one-step-ahead attention and proportional attention in the
    next blocks together reproduce the unfused model exactly, and without proportional attention they do not."""
    model = build("deit_tiny")
    model.pos_embed.zero_()
    flat = torch.full((2, 3, 224, 224), 0.3)
    reference = model(flat)
    patch(model, MCTFConfig(r=40, prop_attn=prop_attn))
    fused = model(flat)
    assert last_trace(model).tokens[-1] < 20
    error = (fused - reference).abs().max().item()
    assert (error < 1e-4) == prop_attn, error


@torch.no_grad()
def test_published_setting_and_the_ten_token_floor(images):
    model = build("deit_tiny")
    patch(model, MCTFConfig())
    model(images)
    assert last_trace(model).tokens == [197, 197] + [197 - 16 * k for k in range(1, 12)]
    patch(model, MCTFConfig(r=60))
    model(images)
    # r per block: 60, 60, then half the image tokens: (77 - 1) // 2 = 38, 19, 9, then the 10-token floor: 1, 0, ...
    assert last_trace(model).tokens == [197, 197, 137, 77, 39, 20, 11, 10, 10, 10, 10, 10, 10]


@torch.no_grad()
def test_each_image_fuses_as_it_would_alone():
    """Attention received, criteria and fusion weights are each image's own, as in the official code, so an
    image's logits do not depend on its batch. A flat image (near-uniform attention) beside noise moves the
    others if anything is shared: attention received averaged over the batch moves logits by 0.05 here."""
    model = build("deit_tiny")
    patch(model, MCTFConfig())
    noise = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    images = torch.cat([noise[:1], torch.full((1, 3, 224, 224), 0.3), noise[1:]])
    batch = model(images)
    alone = torch.cat([model(image[None]) for image in images])
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["deit_distilled", "registers"])
@torch.no_grad()
def test_prefix_tokens_stay_first_and_whole(family, images):
    model = build(family)
    patch(model, MCTFConfig(r=30), trace_source=True)
    model(images)
    source = last_trace(model).source
    prefix = model.num_prefix_tokens
    torch.testing.assert_close(source[:, :prefix], torch.eye(source.shape[-1])[:prefix].expand(2, -1, -1))
    assert source[:, prefix:, :prefix].abs().max() == 0
    assert torch.equal(source[:, prefix:, prefix:].sum(dim=1), torch.ones(2, source.shape[-1] - prefix))  # each patch once


@pytest.mark.parametrize("config", [MCTFConfig(), MCTFConfig(r=30, bidirectional=False, blocks=[2, 5])])
def test_gflops_match_torch_flop_counter(config, images):
    trace, independent = engine_and_counter_gflops(config, images)
    assert trace.tokens[-1] < 197
    assert trace.gflops == pytest.approx(independent, rel=0.01)


@torch.no_grad()
def test_knob_fuses_nothing_at_step_zero_and_more_at_each_step(images):
    knob = MCTFConfig.knob(12, 196)
    finals = tokens_left_along(knob, (0, 1, 8, knob.top), images)
    assert finals[0] == 197 and finals[1] > finals[2] > finals[3]


def test_blocks_beyond_the_model_are_refused():
    with pytest.raises(ValueError, match="block 12 does not exist"):
        patch(build("deit_tiny"), MCTFConfig(blocks=[3, 12]))


# --- parameters -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("params", [{"r": -1}, {"r": 1.5}, {"tau_sim": -1.0}, {"tau_info": -0.1}, {"tau_size": -2.0},
                                    {"blocks": [-1]}, {"bidirectional": "sometimes"}])
def test_out_of_range_parameters_are_refused(params):
    with pytest.raises(ValueError):
        method_config("mctf", params)


def test_set_strings_and_params_round_trip():
    config = method_config("mctf", {"r": "8", "tau_info": "10", "bidirectional": "off", "blocks": "1,2,3"})
    assert config == MCTFConfig(r=8, tau_info=10.0, bidirectional=False, blocks=(1, 2, 3))
    assert MCTFConfig.from_params(config.to_params()) == config
    assert MCTFConfig.from_params(MCTFConfig().to_params()) == MCTFConfig()  # blocks None survives


def test_preset_round_trip(tmp_path):
    for method in (MCTFConfig(), MCTFConfig(r=9, tau_sim=0.0, attention_weighted=False, prop_attn=False, blocks=[4])):
        loaded = load_preset(save_preset(a_preset(method=method), tmp_path / "mctf.yaml"))
        assert loaded.method == method
