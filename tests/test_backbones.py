"""The paper's backbones (LV-ViT, T2T-ViT_t, fine-tuned MAE) and today's timm ViTs (CLIP, DINOv2, SigLIP)
against their papers' figures, the authors' checkpoint layouts, the unpatched logits and hand-built cases."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from timm.layers import AttentionPoolLatent
from torch.utils.flop_counter import FlopCounterMode

from atm_cli.engine import ATMConfig, ToMeConfig, last_trace, patch
from atm_cli.engine.pooling import pool_with_sizes
from atm_cli.evaluation import load_model
from atm_cli.presets import list_presets
from atm_cli.models import lvvit, t2t_vit  # noqa: F401  (registers the models with timm)

from helpers import EAGER_ATM, NO_MERGE_ATM, assert_no_op

PAPER = Path(__file__).resolve().parents[2] / "shared" / "paper" / "atm-paper.txt"
TINY = dict(embed_dim=32, depth=2, num_heads=2, num_classes=10)

# (timm name, constructor overrides, input side): tiny versions of every family this file covers.
FAMILIES = {
    "lvvit": ("lvvit_s", {**TINY, "img_size": 64}, 64),
    "t2t_vit": ("t2t_vit_t_14", {**TINY, "img_size": 64}, 64),
    "mae_finetuned": ("vit_base_patch16_224_mae_ft", {**TINY, "img_size": 64}, 64),
    "clip": ("vit_base_patch16_clip_224", {**TINY, "img_size": 64}, 64),
    "clip_quickgelu": ("vit_base_patch16_clip_quickgelu_224", {**TINY, "img_size": 64}, 64),
    "dinov2": ("vit_small_patch14_dinov2", {**TINY, "img_size": 56}, 56),
    "dinov2_registers": ("vit_small_patch14_reg4_dinov2", {**TINY, "img_size": 56}, 56),
    "siglip_map_pool": ("vit_base_patch16_siglip_224", {**TINY, "img_size": 64}, 64),
    "hybrid_resnet_stem": ("vit_tiny_r_s16_p8_224", {**TINY, "img_size": 128}, 128),
}


def build(family: str) -> torch.nn.Module:
    name, overrides, _ = FAMILIES[family]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **overrides).eval()
    with torch.no_grad():
        for key, parameter in model.named_parameters():
            if parameter.ndim == 1:  # LayerScale's 1e-5 init would hide mistakes behind tiny residuals
                parameter.normal_(1.0, 0.5)
            elif key in ("cls_token", "reg_token"):  # near zero at init: as good as one more image token
                parameter.normal_()
    return model


def images(family: str) -> torch.Tensor:
    side = FAMILIES[family][2]
    return torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))


# --- the papers' figures ------------------------------------------------------------------------------------------

# Parameters (millions) from the papers and the authors' model tables; unmerged GFLOPs from the ATM paper's
# Tables A4 and A5 (T2T-ViT_t-24, not in the ATM paper: the T2T-ViT authors' 15.0 G MACs).
PAPER_FIGURES = [
    ("lvvit_t", 8.5, 2.87), ("lvvit_s", 26.2, 6.57), ("lvvit_m", 55.8, 12.74),
    ("t2t_vit_t_14", 21.5, 6.09), ("t2t_vit_t_19", 39.2, 9.79), ("t2t_vit_t_24", 64.1, 15.0),
    ("vit_base_patch16_224_mae_ft", 86.6, 17.57),
]


@pytest.mark.parametrize("name,params_m,gflops", PAPER_FIGURES)
def test_parameters_and_unmerged_gflops_match_the_papers(name, params_m, gflops):
    with torch.device("meta"):  # shapes only: the count and the engine's trace need no arithmetic
        model = timm.create_model(name, pretrained=False).eval()
        patch(model, ToMeConfig(r=0))
        model(torch.empty(1, 3, 224, 224))
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(params_m, abs=0.05)
    assert last_trace(model).gflops == pytest.approx(gflops, abs=0.05)


@pytest.mark.parametrize("name,side", [("lvvit_t", 64), ("vit_tiny_r_s16_p8_224", 128),
                                       ("vit_base_patch16_siglip_224", 64)])
@torch.no_grad()
def test_merged_gflops_count_stems_and_heads_like_torch_flop_counter(name, side):
    """LV-ViT's conv stem and per-token aux head, a hybrid's ResNet stem, SigLIP's attention pool: counted
    as torch's counter counts them."""
    model = timm.create_model(name, pretrained=False, embed_dim=96, depth=4, num_heads=2, img_size=side).eval()
    model.requires_grad_(False)  # the counter's module tracker trips on SigLIP's latent query parameter otherwise
    for attention in [block.attn for block in model.blocks] + [model.attn_pool]:
        if attention is not None:  # the counter sees the two attention products only when they are unfused
            attention.fused_attn = False
    patch(model, ToMeConfig(r=3))
    batch = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))
    with FlopCounterMode(display=False) as counter:
        model(batch)
    assert last_trace(model).tokens[-1] < last_trace(model).tokens[0]
    independent = counter.get_total_flops() / 2 / batch.shape[0] / 1e9
    assert last_trace(model).gflops == pytest.approx(independent, rel=0.01)


# --- the authors' checkpoint layouts ------------------------------------------------------------------------------

def _block_layout(depth: int, dim: int, hidden: int) -> dict[str, tuple[int, ...]]:
    """The authors' blocks (LV-ViT and T2T-ViT alike): qkv without bias, MLP fc1/fc2."""
    layout = {}
    for i in range(depth):
        prefix = f"blocks.{i}."
        layout.update({prefix + "norm1.weight": (dim,), prefix + "norm1.bias": (dim,),
                       prefix + "attn.qkv.weight": (3 * dim, dim),
                       prefix + "attn.proj.weight": (dim, dim), prefix + "attn.proj.bias": (dim,),
                       prefix + "norm2.weight": (dim,), prefix + "norm2.bias": (dim,),
                       prefix + "mlp.fc1.weight": (hidden, dim), prefix + "mlp.fc1.bias": (hidden,),
                       prefix + "mlp.fc2.weight": (dim, hidden), prefix + "mlp.fc2.bias": (dim,)})
    return layout


def _common_layout(dim: int, tokens: int, classes: int) -> dict[str, tuple[int, ...]]:
    return {"cls_token": (1, 1, dim), "pos_embed": (1, tokens, dim), "norm.weight": (dim,), "norm.bias": (dim,),
            "head.weight": (classes, dim), "head.bias": (classes,)}


def lvvit_layout(dim: int, depth: int, patches: int, classes: int, stem: int = 64) -> dict[str, tuple[int, ...]]:
    """TokenLabeling's LV_ViT state dict: conv1-3 + bn1-3 stem, 8x8 proj, blocks, norm, head, aux_head."""
    layout = {**_common_layout(dim, patches + 1, classes), **_block_layout(depth, dim, 3 * dim),
              "aux_head.weight": (classes, dim), "aux_head.bias": (classes,),
              "patch_embed.conv1.weight": (stem, 3, 7, 7), "patch_embed.conv2.weight": (stem, stem, 3, 3),
              "patch_embed.conv3.weight": (stem, stem, 3, 3),
              "patch_embed.proj.weight": (dim, stem, 8, 8), "patch_embed.proj.bias": (dim,)}
    for i in (1, 2, 3):
        layout.update({f"patch_embed.bn{i}.{name}": (stem,) for name in ("weight", "bias", "running_mean", "running_var")})
        layout[f"patch_embed.bn{i}.num_batches_tracked"] = ()
    return layout


def t2t_layout(dim: int, depth: int, patches: int, classes: int, token_dim: int = 64) -> dict[str, tuple[int, ...]]:
    """T2T-ViT's state dict: tokens_to_token (attention1 on 3*7*7, attention2 on 64*3*3, project), blocks, head."""
    layout = {**_common_layout(dim, patches + 1, classes), **_block_layout(depth, dim, 3 * dim),
              "tokens_to_token.project.weight": (dim, token_dim * 9), "tokens_to_token.project.bias": (dim,)}
    for name, width in (("attention1", 3 * 7 * 7), ("attention2", token_dim * 9)):
        prefix = f"tokens_to_token.{name}."
        layout.update({prefix + "norm1.weight": (width,), prefix + "norm1.bias": (width,),
                       prefix + "attn.qkv.weight": (3 * token_dim, width),
                       prefix + "attn.proj.weight": (token_dim, token_dim), prefix + "attn.proj.bias": (token_dim,),
                       prefix + "norm2.weight": (token_dim,), prefix + "norm2.bias": (token_dim,),
                       prefix + "mlp.fc1.weight": (token_dim, token_dim), prefix + "mlp.fc1.bias": (token_dim,),
                       prefix + "mlp.fc2.weight": (token_dim, token_dim), prefix + "mlp.fc2.bias": (token_dim,)})
    return layout


@pytest.mark.parametrize("name,layout", [
    ("lvvit_t", lvvit_layout(dim=240, depth=12, patches=196, classes=1000)),
    ("lvvit_m", lvvit_layout(dim=512, depth=20, patches=196, classes=1000)),
    ("t2t_vit_t_14", t2t_layout(dim=384, depth=14, patches=196, classes=1000)),
    ("t2t_vit_t_24", t2t_layout(dim=512, depth=24, patches=196, classes=1000)),
])
def test_state_dicts_have_the_authors_names_and_shapes(name, layout):
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    assert {key: tuple(t.shape) for key, t in model.state_dict().items()} == layout


def test_load_model_reads_an_authors_checkpoint_file(tmp_path):
    """A file in the authors' layout (random values), wrapped as their training scripts save it, loads strictly
    (timm's loader takes the EMA weights, as the authors evaluate; `model` and `state_dict` wrappers alike)."""
    generator = torch.Generator().manual_seed(0)
    weights = {key: torch.randn(shape, generator=generator) if shape else torch.tensor(0)
               for key, shape in lvvit_layout(dim=240, depth=12, patches=196, classes=1000).items()}
    weights.update({f"patch_embed.bn{i}.running_var": torch.rand(64, generator=generator) + 0.5 for i in (1, 2, 3)})
    path = tmp_path / "lvvit_t.pth.tar"
    torch.save({"state_dict_ema": weights, "state_dict": {}, "epoch": 300}, path)
    loaded = load_model("lvvit_t", checkpoint=path, device="cpu")
    state = loaded.model.state_dict()
    assert all(torch.equal(state[key], value) for key, value in weights.items())
    assert loaded.unmerged_gflops == pytest.approx(2.87, abs=0.05)


# --- parity and hand-built cases ----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_no_merging_matches_unpatched_and_merging_happens_when_asked(family):
    model = build(family)
    batch = images(family)
    assert_no_op(model, batch, ToMeConfig(r=0), NO_MERGE_ATM)
    patch(model, EAGER_ATM)
    model(batch)
    trace = last_trace(model)
    assert trace.tokens[0] == model.patch_embed.num_patches + model.num_prefix_tokens  # the stem never merges
    assert trace.tokens[-2] < trace.tokens[0]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prop_attn", [True, False])
@torch.no_grad()
def test_merging_identical_tokens_is_exact_with_sizes(family, prop_attn):
    """Identical patch tokens (a stem projection with zero weights, no position code): merging them loses
    nothing when attention and pooling count a merged token `size` times, and only then."""
    model = build(family)
    stem = model.patch_embed
    (stem.proj if hasattr(stem, "proj") else stem.project).weight.zero_()  # T2T's projection is `project`
    model.pos_embed.zero_()
    batch = images(family)
    reference = model(batch)
    patch(model, ATMConfig(alpha=0.99, beta=0.0, theta_min=0.99, prop_attn=prop_attn, prefix_only_last_block=False))
    merged = model(batch)
    assert last_trace(model).tokens[-1] == model.num_prefix_tokens + 4  # 16 patches halved in each of 2 blocks
    error = (merged - reference).abs().max().item()
    # Without prefix tokens (SigLIP) every token is alike, and any weighting of alike tokens is exact.
    assert (error < 3e-6) == (prop_attn or model.num_prefix_tokens == 0), error


@torch.no_grad()
def test_lvvit_adds_half_the_aux_heads_max_over_the_tokens_left():
    model = build("lvvit")
    patch(model, EAGER_ATM)
    batch = images("lvvit")
    logits = model(batch)
    left = model.forward_features(batch)  # the same merged forward, up to the norm
    assert model.num_prefix_tokens < left.shape[1] < model.patch_embed.num_patches + 1  # merged, image tokens kept
    by_hand = model.head(left[:, 0]) + 0.5 * model.aux_head(left[:, 1:]).max(dim=1).values
    torch.testing.assert_close(logits, by_hand, atol=1e-6, rtol=0)


@pytest.mark.parametrize("include_prefix", [False, True])
@torch.no_grad()
def test_pooling_merged_tokens_equals_pooling_their_duplicates(include_prefix):
    """Attention pooling (SigLIP's MAP head) with + log(size) and avg pooling weighted by size both equal
    pooling over the unmerged duplicates that the merged tokens stand for."""
    for global_pool in ("map", "avg"):
        torch.manual_seed(0)
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, global_pool=global_pool,
                                  pool_include_prefix=include_prefix, **TINY).eval()
        assert isinstance(model.attn_pool, AttentionPoolLatent) == (global_pool == "map")
        x = torch.randn(2, 5, 32)
        sizes = torch.tensor([[1, 1, 3, 2, 1], [1, 4, 1, 1, 2]], dtype=torch.float)[..., None]
        duplicated = [torch.cat([x[b, i:i + 1].expand(int(s), -1) for i, s in enumerate(sizes[b, :, 0])])
                      for b in range(2)]
        reference = torch.stack([model.pool(d[None])[0] for d in duplicated])
        torch.testing.assert_close(pool_with_sizes(model, x, sizes), reference, atol=1e-5, rtol=0)


# --- presets --------------------------------------------------------------------------------------------------------

def paper_rows(table: str, end: str | None) -> set[tuple[float, ...]]:
    """Every (alpha, beta, theta_min, GFLOPs, top-1) row of one of the paper's tables, read from its text."""
    text = PAPER.read_text()
    body = text[text.index(f"Table {table}: Full results"):text.index(end) if end else None]
    rows = set()
    for words in (line.split() for line in body.splitlines()):
        if len(words) == 5 and all(w.replace(".", "", 1).isdigit() for w in words):
            rows.add(tuple(float(w) for w in words))
    return rows


@pytest.mark.skipif(not PAPER.is_file(), reason=f"the paper's text is absent: {PAPER}")
@pytest.mark.parametrize("table,end,models", [
    ("A4", "Table A5:", {"lvvit_t": 13, "lvvit_s": 13, "lvvit_m": 15}),
    ("A5", None, {"t2t_vit_t_14": 14, "t2t_vit_t_19": 17, "vit_base_patch16_224_mae_ft": 18}),
])
def test_every_row_of_tables_a4_and_a5_is_a_preset(table, end, models):
    rows = paper_rows(table, end)
    presets = [p for p in list_presets() if p.provenance.source == f"paper Table {table}"]
    assert {(p.params["alpha"], p.params["beta"], p.params["theta_min"], p.measured.gflops, p.measured.top1)
            for p in presets} == rows and len(presets) == len(rows)
    for name, count in models.items():
        found = list_presets(name)
        assert len(found) == count
        # The paper turns proportional attention off for MAE only (App. A); T2T-ViT ran at batch size 100.
        assert all(p.params["prop_attn"] == (name != "vit_base_patch16_224_mae_ft") for p in found)
        assert all(p.batch_size == (100 if name.startswith("t2t") else 1024) for p in found)
