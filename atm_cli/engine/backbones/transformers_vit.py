"""Hugging Face transformers' ViTs: ViT, DeiT, DINOv2, and the CLIP and SigLIP vision towers.

The engine goes in at each encoder layer's forward (the model's own embeddings, final norm, pooler and
heads run around it), so a model keeps its own outputs, only with fewer tokens in `last_hidden_state`.
Heads that average the patch tokens (DINOv2's classifier, SigLIP's attention pool) weigh them by size.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..attention import log_size_bias
from ..pooling import sized_mean
from .parts import (AttentionParts, Backbone, BlockParts, Hook, MergingRun, Stem, linear_macs,
                    separate_projections)

# Encoder layers the engine knows, by class: the names of their pre-attention norm, attention, pre-MLP
# norm, and what follows the attention and the MLP before each residual add.
_LAYERS = {
    "ViTLayer": ("layernorm_before", "attention", "layernorm_after", ("dropout",), ("dropout",)),
    "DeiTLayer": ("layernorm_before", "attention", "layernorm_after", ("dropout",), ("dropout",)),
    "Dinov2Layer": ("norm1", "attention", "norm2", ("layer_scale1", "drop_path"), ("layer_scale2", "drop_path")),
    "CLIPEncoderLayer": ("layer_norm1", "self_attn", "layer_norm2", (), ()),
    "SiglipEncoderLayer": ("layer_norm1", "self_attn", "layer_norm2", (), ()),
}
# Models whose output reads the prefix tokens alone (a classifier on the class/distillation tokens).
_PREFIX_ONLY_HEADS = ("ViTForImageClassification", "DeiTForImageClassification",
                      "DeiTForImageClassificationWithTeacher")
_REFUSED = {"CLIPForImageClassification": "its classifier averages the patch tokens after the final norm"}


def backbone(model: nn.Module) -> Backbone:
    name = type(model).__name__
    if name in _REFUSED:
        raise ValueError(f"{name} is not supported: {_REFUSED[name]}")
    trunk = _vision_trunk(model)
    layers = _encoder_layers(trunk)
    for i, layer in enumerate(layers):
        if type(layer).__name__ not in _LAYERS:
            raise ValueError(f"{name}: layer {i} is a {type(layer).__name__}; the engine merges tokens in "
                             f"{', '.join(_LAYERS)} (not relative position bias, RoPE or windowed attention)")
    embeddings, config = trunk.embeddings, trunk.config
    prefix = sum(getattr(embeddings, token, None) is not None
                 for token in ("cls_token", "class_embedding", "distillation_token"))
    patch_embedding = getattr(embeddings, "patch_embeddings", None) or embeddings.patch_embedding
    size = _pair(config.image_size)
    patch = _pair(config.patch_size)
    head_macs, token_head_macs = _head_macs(model, trunk)
    return Backbone(
        name=name,
        blocks=[_block_parts(layer) for layer in layers],
        num_prefix_tokens=prefix,
        has_class_token=prefix > 0,
        width=config.hidden_size,
        stem=Stem(patch_embedding, config.num_channels, size, (size[0] // patch[0]) * (size[1] // patch[1])),
        head_macs=head_macs,
        token_head_macs=token_head_macs,
        head_reads_prefix_only=name in _PREFIX_ONLY_HEADS,
        hooks=lambda run: _hooks(model, trunk, layers, run),
    )


def _vision_trunk(model: nn.Module) -> nn.Module:
    """The module holding the image embeddings and the encoder (a CLIP model's vision tower, a classifier's
    backbone): the first whose `embeddings` make patches."""
    for module in model.modules():
        embeddings = getattr(module, "embeddings", None)
        if hasattr(embeddings, "patch_embeddings") or hasattr(embeddings, "patch_embedding"):
            return module
    raise ValueError(f"{type(model).__name__} has no image patch embeddings: not a vision transformer")


def _encoder_layers(trunk: nn.Module) -> nn.ModuleList:
    """ViT and DeiT hold their layers themselves, DINOv2 in `encoder.layer`, CLIP and SigLIP in `encoder.layers`."""
    if hasattr(trunk, "layers"):
        return trunk.layers
    return getattr(trunk.encoder, "layers", None) or trunk.encoder.layer


def _block_parts(layer: nn.Module) -> BlockParts:
    norm1, attention, norm2, after_attention, after_mlp = _LAYERS[type(layer).__name__]
    attn = getattr(layer, attention)
    heads = getattr(attn, "num_attention_heads", None) or attn.num_heads
    scale = getattr(attn, "scaling", None) or attn.scale
    proj = getattr(attn, "o_proj", None) or attn.out_proj
    eager = getattr(getattr(attn, "config", None), "_attn_implementation", None) == "eager"
    parts = AttentionParts(num_heads=heads, head_dim=attn.head_dim, scale=scale, sdpa_scale=scale,
                           project=separate_projections((attn.q_proj, attn.k_proj, attn.v_proj), heads, attn.head_dim),
                           proj=proj, linear_macs=linear_macs(attn), fused=not eager)
    return BlockParts(norm1=getattr(layer, norm1), attn=parts, norm2=getattr(layer, norm2), mlp=layer.mlp,
                      mlp_macs=linear_macs(layer.mlp),
                      after_attention=tuple(getattr(layer, n) for n in after_attention),
                      after_mlp=tuple(getattr(layer, n) for n in after_mlp))


def _head_macs(model: nn.Module, trunk: nn.Module) -> tuple[int, int]:
    """Multiply-adds of what reads the tokens left: once per image (classifiers, projection, pooler, and a
    SigLIP attention pool's probe query, output projection and MLP), and per token (that pool's keys and
    values, and the probe's two attention products)."""
    names = ("classifier", "cls_classifier", "distillation_classifier", "visual_projection")
    modules = [getattr(model, n) for n in names if isinstance(getattr(model, n, None), nn.Module)]
    pooler = getattr(trunk, "pooler", None)
    if pooler is not None:
        modules.append(pooler)
    pool, width = getattr(trunk, "head", None), trunk.config.hidden_size
    if pool is None:
        return sum(linear_macs(m) for m in modules), 0
    once = sum(linear_macs(m) for m in [*modules, pool.attention.out_proj, pool.mlp]) + width * width
    return once, 2 * width * width + 2 * width


def _hooks(model: nn.Module, trunk: nn.Module, layers: nn.ModuleList, run: MergingRun) -> list[Hook]:
    hooks: list[Hook] = [(layer, "forward", _layer_forward(run, index)) for index, layer in enumerate(layers)]
    if type(model).__name__ == "Dinov2ForImageClassification":
        hooks.append((model, "forward", _dinov2_classify(model, run)))
    head = getattr(trunk, "head", None)
    if head is not None:
        hooks.append((head, "forward", _sized_attention_pool(head, run)))
    return hooks


def _layer_forward(run: MergingRun, index: int):
    def forward(hidden_states: Tensor, attention_mask: Tensor | None = None, *args, **kwargs) -> Tensor:
        if attention_mask is not None:
            raise ValueError("token merging does not support attention masks: the tokens they address are merged away")
        return run.block(index, hidden_states)

    return forward


def _dinov2_classify(model: nn.Module, run: MergingRun):
    """DINOv2's classifier reads the class token and the mean of the patch tokens: a size-weighted mean here."""
    from transformers.modeling_outputs import ImageClassifierOutput

    def forward(pixel_values: Tensor, labels: Tensor | None = None, **kwargs) -> ImageClassifierOutput:
        if labels is not None:
            raise ValueError("a merging DINOv2 classifier gives logits only: compute the loss from them")
        tokens = model.dinov2(pixel_values, **kwargs).last_hidden_state
        sizes = run.sizes()
        patches = tokens[:, 1:].mean(dim=1) if sizes is None else sized_mean(tokens[:, 1:], sizes[:, 1:])
        return ImageClassifierOutput(logits=model.classifier(torch.cat([tokens[:, 0], patches], dim=1)))

    return forward


def _sized_attention_pool(head: nn.Module, run: MergingRun):
    """SigLIP's attention pool, with + log(size) on each token's logit: as if each merged token were repeated."""

    def forward(hidden_state: Tensor) -> Tensor:
        sizes = run.sizes()
        probe = head.probe.repeat(hidden_state.shape[0], 1, 1)
        # nn.MultiheadAttention takes the additive mask per (image, head): (B * H, 1 query, N keys)
        mask = None if sizes is None else log_size_bias(sizes, hidden_state.dtype).squeeze(1).repeat_interleave(
            head.attention.num_heads, dim=0)
        hidden_state = head.attention(probe, hidden_state, hidden_state, attn_mask=mask)[0]
        return (hidden_state + head.mlp(head.layernorm(hidden_state)))[:, 0]

    return forward


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (list, tuple)) else (value, value)
