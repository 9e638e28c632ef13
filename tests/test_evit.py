"""EViT against its paper: hand-built keep-and-fuse, the kept tokens of a real block, no-op logits and GFLOPs."""
from __future__ import annotations

import pytest
import timm
import torch

from atm_cli.engine import EViTConfig, last_trace, method_config, patch
from atm_cli.engine.methods.evit import keep_and_fuse
from atm_cli.presets import load_preset, save_preset

from helpers import a_preset, assert_no_op, build, engine_and_counter_gflops, make_tiny_vit, tokens_left_along


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


# --- hand-built cases -------------------------------------------------------------------------------------------

def test_keeps_the_most_attended_tokens_and_fuses_the_rest_by_attention_weighted_sum():
    # One prefix token, four image tokens with class attention 0.1, 0.4, 0.2, 0.3: keeping 2 keeps
    # image tokens 1 and 3 (sequence positions 2 and 4) and fuses 0.1 * token 0 + 0.2 * token 2.
    tokens = torch.tensor([[[9.0, 9.0], [1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [5.0, -1.0]]])
    reduce = keep_and_fuse(torch.tensor([[0.1, 0.4, 0.2, 0.3]]), keep=2, num_prefix=1, fuse=True)
    expected = torch.tensor([[[9.0, 9.0], [0.0, 1.0], [5.0, -1.0], [0.1 * 1.0 + 0.2 * 2.0, 0.2 * 2.0]]])
    torch.testing.assert_close(reduce(tokens), expected)
    pruned = keep_and_fuse(torch.tensor([[0.1, 0.4, 0.2, 0.3]]), keep=2, num_prefix=1, fuse=False)(tokens)
    torch.testing.assert_close(pruned, expected[:, :3])


def test_each_image_keeps_its_own_tokens():
    tokens = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)  # no prefix: positions 0..3 hold 0..3, 4..7
    attention = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7]])
    reduced = keep_and_fuse(attention, keep=1, num_prefix=0, fuse=True)(tokens)
    torch.testing.assert_close(reduced[..., 0], torch.tensor([[0.0, 0.1 * (1 + 2 + 3)], [7.0, 0.1 * (4 + 5 + 6)]]))


@torch.no_grad()
def test_the_kept_tokens_are_the_top_of_the_class_tokens_attention(images):
    """The class attention of block 3 computed here from timm's own modules picks the tokens that survive."""
    model = build("deit_tiny")
    x = model._pos_embed(model.patch_embed(images))
    for block in model.blocks[:3]:
        x = block(x)
    attn = model.blocks[3].attn
    q, k, _ = attn.qkv(model.blocks[3].norm1(x)).reshape(2, 197, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    class_attention = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(-1).mean(1)[:, 0, 1:]
    expected = class_attention.topk(98, dim=1).indices.sort(dim=1).values + 1  # ceil(0.5 * 196) = 98

    patch(model, EViTConfig(keep_rate=0.5, blocks=[3], fuse=False), trace_source=True)
    model(images)
    trace = last_trace(model)
    assert trace.tokens == [197] * 4 + [1 + 98] * 9
    held = trace.source[:, 1:].argmax(dim=-1)  # each kept token holds exactly one input patch
    torch.testing.assert_close(held, expected, rtol=0, atol=0)


@torch.no_grad()
def test_default_schedule_token_counts(images):
    model = build("deit_tiny")
    patch(model, EViTConfig())
    model(images)
    # block 3: 1 + ceil(0.7 * 196) + 1 = 140; block 6: 1 + ceil(0.7 * 139) + 1 = 100; block 9: 1 + ceil(0.7 * 99) + 1 = 72
    assert last_trace(model).tokens == [197] * 4 + [140] * 3 + [100] * 3 + [72] * 3


@torch.no_grad()
def test_default_blocks_follow_the_depth():
    model = make_tiny_vit(num_classes=3)  # 2 blocks, 16 patches: blocks 2 // 4 = 0 and 2 // 2 = 2 * 3 // 4 = 1
    patch(model, EViTConfig())
    model(torch.randn(1, 3, 32, 32))
    # block 0: 1 + ceil(0.7 * 16) + 1 = 14; block 1: 1 + ceil(0.7 * 13) + 1 = 12
    assert last_trace(model).tokens == [17, 14, 12]


@pytest.mark.parametrize("family", ["deit_distilled", "registers"])
@torch.no_grad()
def test_prefix_tokens_stay_first_and_whole(family, images):
    model = build(family)
    patch(model, EViTConfig(keep_rate=0.3, blocks=[1, 2, 3]), trace_source=True)
    model(images)
    source = last_trace(model).source
    prefix = model.num_prefix_tokens
    assert source.shape[1] < 50
    torch.testing.assert_close(source[:, :prefix], torch.eye(source.shape[-1])[:prefix].expand(2, -1, -1))
    assert source[:, prefix:, :prefix].abs().max() == 0  # no image token took a prefix token in


# --- whole models ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["deit_tiny", "deit_distilled", "registers", "deit3_layerscale"])
@torch.no_grad()
def test_keep_rate_one_matches_unpatched(family, images):
    model = build(family)
    assert_no_op(model, images, EViTConfig(keep_rate=1.0))


@torch.no_grad()
def test_knob_reduces_nothing_at_step_zero_and_more_at_each_step(images):
    knob = EViTConfig.knob(12, 196)
    finals = tokens_left_along(knob, (0, 1, 6, knob.top), images)
    assert finals[0] == 197 and finals == sorted(finals, reverse=True) and len(set(finals)) == 4


@pytest.mark.parametrize("config", [EViTConfig(), EViTConfig(keep_rate=0.5, blocks=[0, 4, 8], fuse=False)])
def test_gflops_match_torch_flop_counter(config, images):
    trace, independent = engine_and_counter_gflops(config, images)
    assert trace.tokens[-1] < 197
    assert trace.gflops == pytest.approx(independent, rel=0.01)


def test_models_without_a_class_token_are_refused():
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match="no class token"):
        patch(model, EViTConfig())


def test_blocks_beyond_the_model_are_refused():
    with pytest.raises(ValueError, match="block 12 does not exist"):
        patch(build("deit_tiny"), EViTConfig(blocks=[3, 12]))


# --- parameters -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("params", [{"keep_rate": 0.0}, {"keep_rate": 1.01}, {"keep_rate": -0.5}, {"blocks": [3, -1]},
                                    {"fuse": "maybe"}, {"keep_rate": float("nan")}])
def test_out_of_range_parameters_are_refused(params):
    with pytest.raises(ValueError):
        method_config("evit", params)


def test_set_strings_and_params_round_trip():
    config = method_config("evit", {"keep_rate": "0.6", "blocks": "2,5", "fuse": "off"})
    assert config == EViTConfig(keep_rate=0.6, blocks=(2, 5), fuse=False)
    assert EViTConfig.from_params(config.to_params()) == config



@torch.no_grad()
def test_one_block_given_as_an_int(images):
    model = build("deit_tiny")
    patch(model, method_config("evit", {"blocks": "4", "fuse": "false"}))
    model(images)
    assert last_trace(model).merged == [0] * 4 + [196 - 138] + [0] * 7  # ceil(0.7 * 196) = 138 kept


def test_preset_round_trip(tmp_path):
    for method in (EViTConfig(), EViTConfig(keep_rate=0.55, blocks=[1, 2], fuse=False)):
        loaded = load_preset(save_preset(a_preset(method=method), tmp_path / "evit.yaml"))
        assert loaded.method == method
