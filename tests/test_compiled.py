"""The compiled engine path: one graph per batch size for fixed-shape methods, none new afterwards, eager's
logits and token counts; ATM's segments bounded by padding its tokens to buckets (or by its r multiple).

Dynamo's capture (graph breaks, guards, recompiles) is what these tests pin; they compile with the
`aot_eager` backend, which captures exactly as inductor does but skips code generation (seconds, not
minutes, on two CPU cores). Speed is measured by `benchmarks/host_overhead.py`, not here.
"""
from __future__ import annotations

import copy

import pytest
import timm
import torch

from atm_cli.engine import METHODS, ATMConfig, last_trace, patch
from atm_cli.engine.compiled import compile_patched
from atm_cli.engine.merge import batch_r

BACKEND = "aot_eager"
BATCH = 4
# 8 x 8 = 64 patches and 4 blocks: enough tokens for every method to reduce in every block.
SMALL_VIT_ARGS = dict(img_size=32, patch_size=4, depth=4, embed_dim=32, num_heads=2)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **SMALL_VIT_ARGS).eval()


@pytest.fixture(scope="module")
def batches() -> list[torch.Tensor]:
    """Three batches of different content, the same shape."""
    generator = torch.Generator().manual_seed(3)
    return [torch.randn(BATCH, 3, 32, 32, generator=generator) for _ in range(3)]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def mid_knob_setting(name: str, model: torch.nn.Module):
    """The method half-way up its knob: it reduces tokens in the blocks, far from both ends."""
    knob = METHODS[name].knob(len(model.blocks), model.patch_embed.num_patches)
    return knob.config(max(1, knob.top // 2))


def eager_run(view: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    logits = view(images)
    return logits, last_trace(view).tokens


FIXED = [name for name, config_class in METHODS.items() if config_class.FIXED_SHAPES]


def test_every_method_but_atm_has_fixed_shapes():
    """The paper's rivals all reduce by counts fixed in advance; only ATM's r follows the data."""
    assert set(FIXED) == set(METHODS) - {"atm"}


@pytest.mark.parametrize("name", FIXED)
@torch.inference_mode()
def test_fixed_shape_method_compiles_to_one_graph_without_recompiles(name, model, batches):
    view = patch(copy.copy(model), mid_knob_setting(name, model))
    expected = [eager_run(view, images) for images in batches]
    assert expected[0][1][-1] < expected[0][1][0], "the setting must reduce tokens for the test to mean anything"

    compiled = compile_patched(view, backend=BACKEND)  # fullgraph=True: a graph break raises
    first = compiled(batches[0])
    with torch._dynamo.config.patch(error_on_recompile=True):
        later = [compiled(images) for images in batches[1:]]
    for logits, (eager_logits, eager_tokens) in zip([first, *later], expected):
        torch.testing.assert_close(logits, eager_logits, atol=1e-4, rtol=0)
    assert last_trace(view).tokens == expected[-1][1]
    assert compiled.last_path == "compiled" and not compiled.last_compiled


@torch.inference_mode()
def test_a_short_last_batch_is_padded_not_recompiled(model, batches):
    view = patch(copy.copy(model), mid_knob_setting("tome", model))
    short = batches[1][:3]
    eager_logits, eager_tokens = eager_run(view, short)
    compiled = compile_patched(view, batch_size=BATCH, backend=BACKEND)
    compiled(batches[0])
    with torch._dynamo.config.patch(error_on_recompile=True):
        logits = compiled(short)
    assert compiled.last_path == "padded"
    torch.testing.assert_close(logits, eager_logits, atol=1e-4, rtol=0)
    assert logits.shape[0] == 3 and last_trace(view).tokens == eager_tokens
    assert last_trace(view).size.shape[0] == 3  # the padding's per-image trace is dropped too


@torch.inference_mode()
def test_the_unmerged_model_compiles_the_same_way(model, batches):
    compiled = compile_patched(copy.copy(model), backend=BACKEND)
    compiled(batches[0])
    with torch._dynamo.config.patch(error_on_recompile=True):
        torch.testing.assert_close(compiled(batches[1]), model(batches[1]), atol=1e-4, rtol=0)


@torch.inference_mode()
def test_compiled_models_beside_an_atm_model_keep_running_their_own_graph(model, batches):
    """Fixed-shape views compiled beside an ATM view (as a benchmark or a workload's baseline do): each
    call still runs its one graph, not the code ATM's graph breaks left in the shared timm forward."""
    graph_calls = []

    def counting_backend(graph_module, example_inputs):
        def run(*args):
            graph_calls.append(graph_module)
            return graph_module(*args)
        return run

    tome = compile_patched(patch(copy.copy(model), mid_knob_setting("tome", model)), backend=counting_backend)
    tome(batches[0])
    atm = compile_patched(patch(copy.copy(model), atm_setting(1)), backend=counting_backend)
    for images in batches:
        atm(images)
    evit = compile_patched(patch(copy.copy(model), mid_knob_setting("evit", model)), backend=counting_backend)
    for run in (evit, tome, evit):
        graph_calls.clear()
        run(batches[1])
        assert len(graph_calls) == 1


def atm_setting(r_multiple: int) -> ATMConfig:
    return ATMConfig(alpha=0.3, beta=0.0, theta_min=0.3, r_multiple=r_multiple)  # random weights merge at 0.3


@torch.inference_mode()
def test_atm_compiled_equals_eager_and_compiles_nothing_new_on_batches_it_has_seen(model, batches):
    view = patch(copy.copy(model), atm_setting(1))
    expected = [eager_run(view, images) for images in batches]
    compiled = compile_patched(view, backend=BACKEND)
    for images, (eager_logits, eager_tokens) in zip(batches, expected):
        torch.testing.assert_close(compiled(images), eager_logits, atol=1e-4, rtol=0)
        assert last_trace(view).tokens == eager_tokens
    variants = compiled.variants
    assert variants > 0
    with torch._dynamo.config.patch(error_on_recompile=True):
        for images in batches:
            compiled(images)
    assert compiled.variants == variants and not compiled.last_compiled


PADDED_SETTINGS = {  # split_layer 2 of 4 blocks: alternate and size-distinctive matching both meet padding
    "proportional attention": ATMConfig(alpha=0.3, beta=0.0, theta_min=0.3, split_layer=2),
    "no size term": ATMConfig(alpha=0.3, beta=0.0, theta_min=0.3, split_layer=2, prop_attn=False),
    "every block's MLP on every token": ATMConfig(alpha=0.3, beta=0.0, theta_min=0.3, split_layer=2,
                                                  prefix_only_last_block=False),
    "blocks 0 and 2 merge nothing": ATMConfig(alpha=0.3, beta=0.0, theta_min=0.3, split_layer=2,
                                              block_thresholds=(1.5, 0.3, 1.5, 0.3)),
}


@pytest.mark.parametrize("pool", ["token", "avg"])
@pytest.mark.parametrize("setting", PADDED_SETTINGS)
@torch.no_grad()
def test_padding_to_token_buckets_changes_nothing_but_the_shapes(model, batches, setting, pool):
    """Padding tokens of size 0 take no part in attention, matching, merging or pooling: the logits, token
    counts, GFLOPs, sizes and source maps of the unpadded forward."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, global_pool=pool,
                              **SMALL_VIT_ARGS).eval() if pool != "token" else model
    exact = patch(copy.copy(model), PADDED_SETTINGS[setting], trace_source=True)
    padded = patch(copy.copy(model), PADDED_SETTINGS[setting], trace_source=True, token_bucket=8)
    for images in batches:
        expected, logits = exact(images), padded(images)
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
        want, got = last_trace(exact), last_trace(padded)
        assert got.tokens == want.tokens and got.gflops == want.gflops
        assert any(n % 8 for n in want.tokens[1:-1])  # some block's count was not a multiple: padding was there
        torch.testing.assert_close(got.size, want.size, atol=0, rtol=0)
        torch.testing.assert_close(got.source, want.source, atol=0, rtol=0)


@torch.no_grad()
def test_a_padded_model_that_merges_nothing_runs_the_unmerged_forward(model, batches):
    """No merge, no sizes: not even a zero log-size mask moves attention off the unmerged kernel."""
    nothing = ATMConfig(alpha=0.3, beta=0.0, theta_min=0.3, block_thresholds=(1.5,) * 4, prefix_only_last_block=False)
    padded = patch(copy.copy(model), nothing, token_bucket=8)
    assert torch.equal(padded(batches[0]), model(batches[0]))
    assert last_trace(padded).size is None and last_trace(padded).merged == [0, 0, 0, 0]


@torch.inference_mode()
def test_token_buckets_bound_compiled_atm_without_changing_r(model):
    """Over batches of new content, the padded model stops compiling once its buckets are met; the unpadded one
    compiles per distinct (block, tokens, r). Token counts are the eager ones either way."""
    generator = torch.Generator().manual_seed(5)
    batches = [torch.randn(BATCH, 3, 32, 32, generator=generator) for _ in range(8)]
    view = patch(copy.copy(model), atm_setting(1))
    expected = [eager_run(view, images) for images in batches]
    graphs = {}
    for bucket in (1, 8):
        torch._dynamo.reset()
        compiled = compile_patched(view, backend=BACKEND, token_bucket=bucket)
        graphs[bucket] = []
        for images, (eager_logits, eager_tokens) in zip(batches, expected):
            torch.testing.assert_close(compiled(images), eager_logits, atol=1e-4, rtol=0)
            assert last_trace(view).tokens == eager_tokens
            graphs[bucket].append(compiled.variants)
    assert graphs[8][-1] == graphs[8][len(batches) // 2 - 1]  # none new in the second half
    assert graphs[8][-1] < graphs[1][-1]


@torch.inference_mode()
def test_a_larger_r_multiple_merges_multiples_and_meets_fewer_shapes(model, batches):
    token_counts = {}
    for multiple in (1, 8):
        view = patch(copy.copy(model), atm_setting(multiple))
        token_counts[multiple] = set()
        for images in batches:
            view(images)
            tokens = last_trace(view).tokens
            token_counts[multiple].add(tuple(tokens))
            if multiple > 1:
                assert all(merged % multiple == 0 for merged in last_trace(view).merged)
    assert len(token_counts[8]) <= len(token_counts[1])


def test_batch_r_floors_the_mean_then_the_multiple():
    # 4 images with 37 pairs above theta in all: mean 9.25 -> r 9; to a multiple of 4 -> 8; of 1 -> 9.
    assert batch_r(37, 4, mergeable=30) == 9
    assert batch_r(37, 4, mergeable=30, multiple=4) == 8
    assert batch_r(37, 4, mergeable=6, multiple=4) == 4  # clamped to the mergeable tokens first, then rounded
    assert batch_r(3, 4, mergeable=30, multiple=2) == 0


def test_a_compiled_workload_measures_what_the_eager_one_does(tiny_vit_dir, image_folder, monkeypatch):
    """`--compile on`: the same predictions, GFLOPs and token counts as eager, ATM and ToMe alike, over
    batches whose last one is shorter; compile time counted apart."""
    import dataclasses
    import functools

    from atm_cli.engine import ToMeConfig
    from atm_cli.evaluation import Workload, load_image_folder, load_model, preload
    from atm_cli.evaluation import workload as workload_module

    monkeypatch.setattr(workload_module, "compile_patched", functools.partial(compile_patched, backend=BACKEND))
    eager_model = load_model(str(tiny_vit_dir), device="cpu")
    compiled_model = dataclasses.replace(eager_model, compiled=True, compile_data_dependent=True)  # --compile on
    batches = preload(load_image_folder(image_folder, eager_model), batch_size=5)  # 12 images: 5, 5, 2
    eager, compiled = Workload(eager_model, batches), Workload(compiled_model, batches)
    for method in (None, ToMeConfig(r=2), atm_setting(1)):
        expected, measured = eager.run(method), compiled.run(method)
        assert (measured.predictions == expected.predictions).all()
        assert measured.tokens_per_layer == expected.tokens_per_layer and measured.gflops == expected.gflops
    assert compiled.compile_seconds > 0 and eager.compile_seconds == 0


def test_compile_auto_means_cuda_only_and_other_words_are_refused():
    from atm_cli.errors import UsageError
    from atm_cli.evaluation.models import resolve_compile

    assert resolve_compile("auto", torch.device("cuda")) and not resolve_compile("auto", torch.device("cpu"))
    assert resolve_compile("on", torch.device("cpu")) and not resolve_compile("off", torch.device("cuda"))
    with pytest.raises(UsageError, match="compile yes: choose from"):
        resolve_compile("yes", torch.device("cpu"))


def test_compile_auto_leaves_a_data_dependent_setting_eager(tiny_vit_dir):
    """`--compile auto` compiles the unmerged model and fixed-shape settings, not ATM (per-block segments ran
    slower than eager on the host-overhead proxy); `--compile on` compiles ATM too."""
    import dataclasses

    from atm_cli.engine import ToMeConfig
    from atm_cli.engine.compiled import CompiledModel
    from atm_cli.evaluation import Workload, load_model

    eager_model = load_model(str(tiny_vit_dir), device="cpu")
    auto = Workload(dataclasses.replace(eager_model, compiled=True))
    on = Workload(dataclasses.replace(eager_model, compiled=True, compile_data_dependent=True))
    assert isinstance(auto.runner(None), CompiledModel) and isinstance(auto.runner(ToMeConfig(r=2)), CompiledModel)
    assert not isinstance(auto.runner(atm_setting(1)), CompiledModel)
    assert isinstance(on.runner(atm_setting(1)), CompiledModel)
