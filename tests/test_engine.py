"""The merging engine against the contract's math, hand-built cases and the unpatched model's own logits."""
from __future__ import annotations

import math

import pytest
import timm
import torch
from timm.layers import Attention

from atm_cli.engine import ATMConfig, ToMeConfig, last_trace, patch, threshold_schedule, tome_schedule, unpatch
from atm_cli.engine.attention import attention_with_sizes
from atm_cli.engine.backbones.timm_vit import attention_parts
from atm_cli.engine.merge import (Matching, adaptive_r, alternate_split, bipartite_match, merge_closure, merge_weighted,
                                  size_distinctive_split)

from helpers import EAGER_ATM, FAMILIES, NO_MERGE_ATM, assert_no_op, build, engine_and_counter_gflops


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


# --- whole models ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_no_merging_matches_unpatched_and_unpatch_restores(family, images):
    model = build(family)
    reference = assert_no_op(model, images, ToMeConfig(r=0), NO_MERGE_ATM)
    patch(model, EAGER_ATM)
    model(images)
    assert last_trace(model).tokens[-1] < last_trace(model).tokens[0]  # this family does merge when asked
    unpatch(model)
    assert torch.equal(model(images), reference)


@pytest.mark.parametrize("family", ["deit_tiny", "avg_pool_mae_style", "registers"])
@pytest.mark.parametrize("prop_attn", [True, False])
@torch.no_grad()
def test_merging_identical_tokens_is_exact_with_sizes(family, prop_attn):
    """A flat image without position embedding gives identical patch tokens: merging duplicates loses nothing
    when attention counts each merged token `size` times and pooling weighs it by size, and only then."""
    model = build(family)
    model.pos_embed.zero_()
    flat = torch.full((2, 3, 224, 224), 0.3)
    reference = model(flat)
    patch(model, ATMConfig(alpha=0.99, beta=0.0, theta_min=0.99, prop_attn=prop_attn, prefix_only_last_block=False))
    merged = model(flat)
    assert last_trace(model).tokens[-1] < 20
    error = (merged - reference).abs().max().item()
    assert (error < 1e-4) == prop_attn, error


@pytest.mark.parametrize("family", ["deit_tiny", "deit_distilled"])
@torch.no_grad()
def test_prefix_only_last_block_keeps_logits(family, images):
    model = build(family)
    patch(model, EAGER_ATM)
    shortcut = model(images)
    assert last_trace(model).tokens[-1] == model.num_prefix_tokens
    patch(model, ATMConfig(alpha=0.5, beta=0.0, theta_min=0.5, prefix_only_last_block=False))
    merged_normally = model(images)
    assert last_trace(model).tokens[-1] > model.num_prefix_tokens
    torch.testing.assert_close(shortcut, merged_normally, atol=1e-5, rtol=0)


@torch.no_grad()
def test_tome_merges_r_tokens_in_every_block_including_the_last(images):
    model = build("deit_tiny")
    patch(model, ToMeConfig(r=13))
    model(images)
    assert last_trace(model).tokens == [197 - 13 * k for k in range(13)]
    patch(model, ToMeConfig(r=100))  # clamped to half of the image tokens, as ToMe does
    model(images)
    assert last_trace(model).tokens[:3] == [197, 99, 50]


@torch.no_grad()
def test_patching_twice_replaces_the_config(images):
    model = build("deit_tiny")
    patch(model, ToMeConfig(r=8))
    patch(model, ToMeConfig(r=4))
    model(images)
    assert last_trace(model).merged == [4] * 12


@pytest.mark.parametrize("name,kwargs,missing", [
    ("eva02_tiny_patch14_224", {}, "VisionTransformer"),
    ("vit_tiny_patch16_224", {"global_pool": "avgmax"}, "global_pool"),
])
def test_unsupported_models_are_refused_before_any_forward(name, kwargs, missing):
    model = timm.create_model(name, pretrained=False, **kwargs)
    with pytest.raises(ValueError, match=missing) as err:
        patch(model, ToMeConfig(r=4))
    assert type(model).__name__ in str(err.value)


def test_batch_adaptive_r_easy_image_merges_more_and_batch_shares_the_mean():
    model = build("deit_tiny")
    flat = torch.full((1, 3, 224, 224), 0.3)
    busy = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    patch(model, ATMConfig(alpha=0.99, beta=0.04, theta_min=0.88))
    with torch.no_grad():
        first_block = []
        for image in (flat, busy):
            model(image)
            first_block.append(last_trace(model).merged[0])
        model(torch.cat([flat, busy]))
    easy, hard = first_block
    assert easy > hard
    # Block 1 sees each image as it would alone; one r for the batch: the floor of the mean count.
    assert last_trace(model).merged[0] == (easy + hard) // 2


# --- GFLOPs -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,gflops", [
    ("deit_tiny_patch16_224", 1.258), ("deit_small_patch16_224", 4.608), ("deit_base_patch16_224", 17.583),
])
@torch.no_grad()
def test_unmerged_gflops_match_the_papers_baselines(name, gflops):
    model = timm.create_model(name, pretrained=False).eval()
    patch(model, ToMeConfig(r=0))
    model(torch.randn(1, 3, 224, 224))
    assert last_trace(model).gflops == pytest.approx(gflops, abs=0.002)


@pytest.mark.parametrize("config", [ToMeConfig(r=13), ATMConfig(alpha=0.9, beta=0.05, theta_min=0.6)])
def test_merged_gflops_match_torch_flop_counter(config, images):
    trace, independent = engine_and_counter_gflops(config, images)
    assert trace.tokens[-1] < 197
    assert trace.gflops == pytest.approx(independent, rel=0.01)


# --- hand-built cases -------------------------------------------------------------------------------------------

def test_threshold_schedule_by_hand():
    config = ATMConfig(alpha=0.99, beta=0.04, theta_min=0.88)
    expected = [0.99, 0.99 - (math.e ** 0.04 - 1), 0.99 - (math.e ** 0.08 - 1)] + [0.88] * 9  # e^0.12 - 1 > 0.11
    assert threshold_schedule(config, 12) == pytest.approx(expected)
    assert threshold_schedule(config, 12)[1] == pytest.approx(0.949189, abs=1e-6)


def test_tome_schedules():
    assert tome_schedule(ToMeConfig(r=13), 4) == [13, 13, 13, 13]
    assert tome_schedule(ToMeConfig(r=[5, 4]), 4) == [5, 4, 0, 0]
    assert tome_schedule(ToMeConfig(r=8, inflection=0.5), 5) == [4, 6, 8, 10, 12]  # from int(8 * 0.5) up to 2 * 8 - 4, evenly


def _matching_from_best(best: list[list[float]]) -> Matching:
    best_t = torch.tensor(best)
    batch, n_a = best_t.shape
    a_pos, b_pos, a_prefix, b_prefix = alternate_split(batch, 2 * n_a, 0, torch.device("cpu"))
    return Matching(a_pos, b_pos, a_prefix, b_prefix, best_t, torch.zeros_like(best_t, dtype=torch.long))


def test_r_is_the_floor_of_the_batch_mean_and_the_threshold_is_strict():
    # image 1: 0.75, 0.625 and 0.5625 exceed 0.5 (0.5 itself does not); image 2: two exceed it -> mean 2.5 -> r = 2
    matching = _matching_from_best([[0.75, 0.5, 0.625, 0.5625], [0.5, 0.875, 0.25, 0.9375]])
    assert adaptive_r(matching, 0.5) == 2
    assert adaptive_r(matching, 0.7) == 1  # counts 1 and 2 -> mean 1.5
    assert adaptive_r(matching, 0.9375) == 0


def test_size_distinctive_split_is_stable_per_image_and_skips_prefix():
    # one prefix token, then image tokens with sizes 2, 1, 1, 3, 1 at positions 1..5
    size = torch.tensor([[1.0, 2, 1, 1, 3, 1], [1.0, 1, 1, 1, 1, 1]])[..., None]
    a_pos, b_pos, a_prefix, b_prefix = size_distinctive_split(size, 2, 6, 1, torch.device("cpu"))
    # image 1: ascending sizes with ties in position order -> 2, 3, 5 (size 1), 1 (size 2), 4 (size 3)
    assert a_pos[0].tolist() == [2, 3] and b_pos[0].tolist() == [5, 1, 4]
    assert a_pos[1].tolist() == [1, 2] and b_pos[1].tolist() == [3, 4, 5]
    assert (a_prefix, b_prefix) == (0, 0)


def test_weighted_merge_sums_sizes_and_keeps_prefix_in_front():
    # positions: 0 = class token, 1..4 image tokens; metric makes 2 ~ 1 and 4 ~ 3 (alternate: a = 0, 2, 4; b = 1, 3)
    metric = torch.tensor([[[1.0, 1.0], [1, 0], [1, 0], [0, 1], [0, 1]]])
    x = torch.tensor([[[10.0], [1], [3], [5], [7]]])
    size = torch.tensor([[[1.0], [1], [3], [1], [1]]])
    matching = bipartite_match(metric, *alternate_split(1, 5, 1, torch.device("cpu")))
    assert matching.best[0, 0] == -math.inf  # the class token's row can never merge
    assert adaptive_r(matching, 0.99) == 2
    merged_x, merged_size = merge_weighted(merge_closure(matching, 1, 1), x, size)
    # the first-ranked tie (a order) merges: token 2 (size 3) into token 1 -> (1*1 + 3*3) / 4 = 2.5, size 4
    assert merged_x.flatten().tolist() == [10.0, 7.0, 2.5, 5.0]
    assert merged_size.flatten().tolist() == [1.0, 1.0, 4.0, 1.0]


def test_two_prefix_tokens_stay_in_front_in_order():
    # class (0) lands in a, distillation (1) in b; image tokens 2..5 with 3 ~ 2 and 5 ~ 4
    metric = torch.tensor([[[1.0, 1.0], [1, 1], [1, 0], [1, 0], [0, 1], [0, 1]]])
    x = torch.arange(6.0).reshape(1, 6, 1)
    matching = bipartite_match(metric, *alternate_split(1, 6, 2, torch.device("cpu")))
    assert matching.best_j[0, 1:].tolist() == [1, 2]  # never the distillation token (b index 0)
    merged_x, merged_size = merge_weighted(merge_closure(matching, 2, 2), x, None)
    # a = 0, 2, 4 and b = 1, 3, 5: 2 merges into 3, 4 into 5
    assert merged_x.flatten().tolist() == [0.0, 1.0, 2.5, 4.5]
    assert merged_size.flatten().tolist() == [1.0, 1.0, 2.0, 2.0]


@pytest.mark.parametrize("fused", [True, False])
def test_proportional_attention_equals_attention_over_duplicates(fused):
    torch.manual_seed(0)
    attn = Attention(dim=8, num_heads=2).eval()
    attn.fused_attn = fused
    x = torch.randn(1, 4, 8)
    sizes = [1, 3, 2, 1]
    duplicated = torch.cat([x[:, i:i + 1].expand(1, s, 8) for i, s in enumerate(sizes)], dim=1)
    with torch.no_grad():
        sized = torch.tensor(sizes, dtype=torch.float).reshape(1, 4, 1)
        out, keys, _ = attention_with_sizes(attention_parts(attn), x, sized)
        reference = attn(duplicated)
    first_copy = torch.tensor([0, 1, 4, 6])
    torch.testing.assert_close(out, reference[:, first_copy], atol=1e-6, rtol=0)
    assert keys.shape == (1, 4, 4)
