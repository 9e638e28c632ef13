"""The engine under mixed precision: scores, thresholds and merges in float32 whatever the model's dtype."""
from __future__ import annotations

import math

import torch

from atm_cli.engine import ATMConfig, last_trace, merging
from atm_cli.engine.merge import alternate_split, bipartite_match
from atm_cli.engine.methods import BlockInput
from atm_cli.engine.patching import reduce_in_float32

from helpers import make_tiny_vit

# Two keys whose cosine, 0.90287 in float32, lies between the bfloat16 neighbours 0.90234 and 0.90625: a
# threshold of 0.9025 separates the float32 value from the one bfloat16 rounds it to. Both keys are exact in
# bfloat16, as keys coming out of an autocast attention are.
COS_FLOAT32 = 0.90234375 / math.hypot(0.90234375, 0.4296875)
THRESHOLD = 0.9025


def hand_built_block() -> BlockInput:
    # Tokens: class token, then a (position 1) and b (position 2): alternate split a = {0, 2}, b = {1}.
    metric = torch.tensor([[[0.0, 1.0], [0.90234375, 0.4296875], [1.0, 0.0]]], dtype=torch.bfloat16)
    x = torch.randn(1, 3, 4).to(torch.bfloat16)
    return BlockInput(index=0, x=x, size=None, metric=metric, attention=None)


class ThreeTokenModel(torch.nn.Module):
    """What ATM's plan reads from a model's backbone: its blocks, prefix tokens and what its head reads."""

    num_prefix_tokens = 1
    blocks = [None, None]
    head_reads_prefix_only = True


def test_a_similarity_bfloat16_rounds_below_the_threshold_is_counted_as_in_float32():
    assert 0.90234375 < THRESHOLD < COS_FLOAT32 < 0.90625  # the premise: bf16 rounds it across the threshold
    block = hand_built_block()
    plan = ATMConfig.constant(THRESHOLD, split_layer=2).plan(ThreeTokenModel())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reduction = reduce_in_float32(plan, block)
        rounded = bipartite_match(block.metric, *alternate_split(1, 3, 1, torch.device("cpu")))
    assert reduction.x.shape[1] == 2  # one pair merged, as float32 counts it
    assert rounded.best.dtype == torch.bfloat16 and rounded.best.max().item() < THRESHOLD  # unguarded, it would not


def test_float16_merging_of_large_norm_tokens_stays_finite():
    model = make_tiny_vit(num_classes=3)
    with torch.no_grad():
        model.patch_embed.proj.weight.mul_(2000.0)  # token norms in the thousands: x * size overflows float16
    model = model.half()
    images = torch.full((2, 3, 32, 32), 0.5, dtype=torch.float16)  # a flat image: every patch token alike
    with torch.inference_mode(), merging(model, ATMConfig.constant(0.5, prefix_only_last_block=False)):
        logits = model(images)
        assert last_trace(model).tokens[-1] < 8  # most of the 16 patches merged
    assert logits.dtype == torch.float16 and torch.isfinite(logits).all()
