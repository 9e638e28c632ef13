"""The one engine on other libraries' ViTs: Hugging Face transformers (ViT, DeiT, DINOv2, CLIP and SigLIP
vision towers) and open_clip, with random weights from small configs (no downloads)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from atm_cli.engine import (METHODS, ATMConfig, EViTConfig, ToMeConfig, last_trace, merging, patch, unpatch)

transformers = pytest.importorskip("transformers")
open_clip_transformer = pytest.importorskip("open_clip.transformer")

NO_MERGE_ATM = ATMConfig(alpha=1.0, beta=0.0, theta_min=1.0)  # no cosine similarity exceeds 1: nothing merges
EAGER_ATM = ATMConfig(alpha=0.6, beta=0.0, theta_min=0.6)  # low thresholds: random-weight models merge too
SMALL = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, image_size=64,
             patch_size=8)


def hf(class_name: str, config_name: str, **extra):
    def build(attn_implementation: str = "sdpa") -> torch.nn.Module:
        config = getattr(transformers, config_name)(**{**SMALL, **extra})
        config._attn_implementation = attn_implementation
        return getattr(transformers, class_name)(config).eval()
    return build


def open_clip_tower(pool_type: str):
    def build(attn_implementation: str = "sdpa") -> torch.nn.Module:
        return open_clip_transformer.VisionTransformer(image_size=64, patch_size=8, width=64, layers=4, heads=4,
                                                       mlp_ratio=2.0, output_dim=32, pool_type=pool_type,
                                                       ls_init_value=0.1).eval()
    return build


FAMILIES = {
    "vit-classifier": hf("ViTForImageClassification", "ViTConfig", num_labels=10),
    "vit-model": hf("ViTModel", "ViTConfig"),
    "deit-teacher": hf("DeiTForImageClassificationWithTeacher", "DeiTConfig", num_labels=10),
    "dinov2-classifier": hf("Dinov2ForImageClassification", "Dinov2Config", num_labels=10, mlp_ratio=2,
                            layerscale_value=0.5),
    "clip-tower": hf("CLIPVisionModelWithProjection", "CLIPVisionConfig", projection_dim=32),
    "siglip-tower": hf("SiglipVisionModel", "SiglipVisionConfig"),
    "open-clip-tok": open_clip_tower("tok"),
    "open-clip-avg": open_clip_tower("avg"),
}


def build(family: str, attn_implementation: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return FAMILIES[family](attn_implementation)


def output(result) -> torch.Tensor:
    """Logits, or the image embedding of a tower: what each model's users read."""
    if isinstance(result, torch.Tensor):
        return result
    for name in ("logits", "image_embeds", "pooler_output"):
        if getattr(result, name, None) is not None:
            return getattr(result, name)
    raise AssertionError(f"no output in {type(result).__name__}")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 3, 64, 64)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_a_method_that_reduces_nothing_gives_the_unpatched_output(family, images):
    model = build(family)
    reference = output(model(images))
    for config in (NO_MERGE_ATM, ToMeConfig(r=0)):
        with merging(model, config):
            torch.testing.assert_close(output(model(images)), reference, atol=1e-5, rtol=0)
    patch(model, ToMeConfig(r=8))
    model(images)
    assert last_trace(model).tokens == [65 - (family == "siglip-tower") + (family == "deit-teacher") - 8 * i
                                        for i in range(5)]
    unpatch(model)
    assert torch.equal(output(model(images)), reference)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_atm_padded_to_token_buckets_gives_the_unpadded_output_and_counts(family, images):
    """Padding (size 0) stays out of each family's attention and head, however the head pools."""
    model = build(family)
    exact, padded = patch(copy.copy(model), EAGER_ATM), patch(copy.copy(model), EAGER_ATM, token_bucket=8)
    torch.testing.assert_close(output(padded(images)), output(exact(images)), atol=1e-5, rtol=0)
    assert last_trace(padded).tokens == last_trace(exact).tokens
    assert any(n % 8 for n in last_trace(exact).tokens[1:-1])  # padding was there


def zero_position_embeddings(model: torch.nn.Module) -> None:
    for name, parameter in model.named_parameters():
        if "position" in name:
            parameter.data.zero_()


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_merging_identical_tokens_is_exact_through_each_head(family):
    """A flat image without position embeddings gives identical patch tokens: merging them loses nothing when
    attention and every head's pooling (class token, size-weighted mean, attention pool) count sizes."""
    model = build(family)
    zero_position_embeddings(model)
    flat = torch.full((2, 3, 64, 64), 0.3)
    reference = output(model(flat))
    with merging(model, ATMConfig(alpha=0.99, beta=0.0, theta_min=0.99, prefix_only_last_block=False)):
        merged = output(model(flat))
        assert last_trace(model).tokens[-1] < 16
    torch.testing.assert_close(merged, reference, atol=1e-4, rtol=0)


def timm_copy_of(hf_vit: torch.nn.Module) -> torch.nn.Module:
    """The same weights in a timm VisionTransformer, key by key (transformers' q, k, v joined into timm's qkv)."""
    import timm

    config = hf_vit.config
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=config.image_size,
                              patch_size=config.patch_size, embed_dim=config.hidden_size,
                              depth=config.num_hidden_layers, num_heads=config.num_attention_heads,
                              mlp_ratio=config.intermediate_size / config.hidden_size,
                              num_classes=config.num_labels).eval()
    source = {k.removeprefix("vit."): v for k, v in hf_vit.state_dict().items()}
    state = {"cls_token": source["embeddings.cls_token"], "pos_embed": source["embeddings.position_embeddings"],
             "patch_embed.proj.weight": source["embeddings.patch_embeddings.projection.weight"],
             "patch_embed.proj.bias": source["embeddings.patch_embeddings.projection.bias"],
             "norm.weight": source["layernorm.weight"], "norm.bias": source["layernorm.bias"],
             "head.weight": source["classifier.weight"], "head.bias": source["classifier.bias"]}
    for i in range(config.num_hidden_layers):
        hf_layer, block = f"layers.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            state[block + "attn.qkv." + kind] = torch.cat([source[f"{hf_layer}attention.{p}_proj.{kind}"]
                                                           for p in "qkv"])
            for ours, theirs in [("norm1", "layernorm_before"), ("norm2", "layernorm_after"),
                                 ("attn.proj", "attention.o_proj"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")]:
                state[f"{block}{ours}.{kind}"] = source[f"{hf_layer}{theirs}.{kind}"]
    model.load_state_dict(state)
    return model


@torch.no_grad()
def test_tome_on_a_transformers_vit_equals_tome_on_the_same_weights_in_timm(images):
    torch.manual_seed(0)
    config = transformers.ViTConfig(**SMALL, num_labels=10, layer_norm_eps=1e-6)  # timm's LayerNorm epsilon
    hf_vit = transformers.ViTForImageClassification(config).eval()
    timm_vit = timm_copy_of(hf_vit)
    torch.testing.assert_close(output(hf_vit(images)), timm_vit(images), atol=1e-5, rtol=0)  # the copy is faithful
    for config in (ToMeConfig(r=8), EAGER_ATM):
        with merging(hf_vit, config), merging(timm_vit, config):
            ours, theirs = output(hf_vit(images)), timm_vit(images)
            assert last_trace(hf_vit).tokens == last_trace(timm_vit).tokens
            assert last_trace(hf_vit).tokens[-2] < 65
            assert last_trace(hf_vit).gflops == pytest.approx(last_trace(timm_vit).gflops, rel=1e-9)
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def explicit_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    """softmax(q k^T * scale + mask) v as matrix products, which torch's FLOP counter sees (the fused CPU kernel
    it does not)."""
    logits = (q * (q.shape[-1] ** -0.5 if scale is None else scale)) @ k.transpose(-2, -1)
    return (logits if attn_mask is None else logits + attn_mask).softmax(dim=-1) @ v


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("config", [ToMeConfig(r=6), EAGER_ATM])
@torch.no_grad()
def test_gflops_match_torch_flop_counter(family, config, images, monkeypatch):
    """torch's counter sees the products; the contract's 5 FLOPs per LayerNorm element it does not, so each
    norm's input is counted by a hook (but the norm before the blocks, which the contract leaves out)."""
    model = build(family, attn_implementation="eager")
    monkeypatch.setattr(F, "scaled_dot_product_attention", explicit_attention)
    norm_macs = []
    for norm in (m for name, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)
                 and name.rpartition(".")[2] not in ("ln_pre", "pre_layrnorm")):
        norm.register_forward_hook(lambda module, inputs, out: norm_macs.append(5 * inputs[0].numel()))
    with merging(model, config), FlopCounterMode(display=False) as counter:
        model(images)
        trace = last_trace(model)
    assert trace.tokens[-2] < trace.tokens[0]
    macs = counter.get_total_flops() / 2 + sum(norm_macs)
    assert trace.gflops == pytest.approx(macs / images.shape[0] / 1e9, rel=0.002)


@pytest.mark.parametrize("name", sorted(METHODS))
@torch.no_grad()
def test_every_method_reduces_a_transformers_vit(name, images):
    model = build("vit-model")
    config = {"atm": EAGER_ATM, "tome": ToMeConfig(r=8)}.get(name) or METHODS[name]()
    with merging(model, config):
        result = model(images).last_hidden_state
        trace = last_trace(model)
    assert torch.isfinite(result).all()
    assert result.shape[1] == trace.tokens[-1] < trace.tokens[0]


def test_models_the_engine_cannot_merge_are_refused_by_name():
    with pytest.raises(ValueError, match="BeitLayer"):
        patch(transformers.BeitModel(transformers.BeitConfig(**SMALL)), ToMeConfig(r=2))
    clip = transformers.CLIPForImageClassification(transformers.CLIPConfig(
        vision_config={k: v for k, v in SMALL.items()}, text_config=dict(hidden_size=32, num_hidden_layers=1,
                                                                         num_attention_heads=2, intermediate_size=64)))
    with pytest.raises(ValueError, match="averages the patch tokens"):
        patch(clip, ToMeConfig(r=2))
    with pytest.raises(ValueError, match="no class token"):
        patch(build("siglip-tower"), EViTConfig())


@torch.no_grad()
def test_views_patched_for_different_settings_share_the_weights_and_merge_apart(images):
    """Copies of one model (`copy.copy`: the same layers), each patched for its own setting, as the evaluation
    layer runs settings beside the unmerged model: each merges by its own setting, the model itself by none."""
    import copy

    model = build("vit-classifier")
    reference = output(model(images))
    fewer, more = patch(copy.copy(model), ToMeConfig(r=2)), patch(copy.copy(model), ToMeConfig(r=8))
    for _ in range(2):  # interleaved, as timing runs them
        fewer(images), more(images)
        assert torch.equal(output(model(images)), reference)
    assert last_trace(fewer).tokens[-2] == 65 - 3 * 2 and last_trace(more).tokens[-2] == 65 - 3 * 8
    unpatch(fewer)
    torch.testing.assert_close(output(fewer(images)), reference, atol=0, rtol=0)
    more(images)
    assert last_trace(more).tokens[-2] == 65 - 3 * 8
    unpatch(more)
    assert all("forward" not in vars(layer) for layer in model.vit.layers)
