"""The same engine and measurements on a CUDA device (skipped where no GPU is present; gpu_check.sh runs them)."""
from __future__ import annotations

import pytest
import torch

from atm_cli.engine import ATMConfig, ToMeConfig, last_trace, merging
from atm_cli.evaluation import DEMO_EVAL_DATA, load_image_folder, load_model, preload, Workload
from atm_cli.presets import default_preset_for
from atm_cli.models import DEMO_MODEL_NAME

pytestmark = pytest.mark.cuda

CONFIGS = [ToMeConfig(r=4), ATMConfig(alpha=0.995, beta=0.04, theta_min=0.95)]


@pytest.fixture(scope="module")
def on_both():
    """The demo model on the CPU and on the GPU, and 256 of its test images."""
    cpu, gpu = load_model(device="cpu"), load_model(device="cuda")
    return cpu, gpu, preload(load_image_folder(DEMO_EVAL_DATA, cpu, limit=256), 64)


@pytest.mark.parametrize("config", CONFIGS, ids=["tome", "atm"])
def test_cuda_logits_and_token_counts_match_the_cpu(on_both, config):
    cpu, gpu, batches = on_both
    images = batches[0][0]
    with torch.inference_mode(), merging(cpu.model, config):
        expected = cpu.model(images)
        expected_tokens = last_trace(cpu.model).tokens
    with torch.inference_mode(), merging(gpu.model, config):
        logits = gpu.model(images.cuda())
        tokens = last_trace(gpu.model).tokens
    assert tokens == expected_tokens
    torch.testing.assert_close(logits.cpu(), expected, atol=1e-3, rtol=1e-3)


def test_a_workload_on_cuda_counts_as_on_the_cpu(on_both):
    """Labels on the CPU meet logits on the GPU: the figures equal the CPU run's."""
    cpu, gpu, batches = on_both
    config = default_preset_for(DEMO_MODEL_NAME).method
    on_cpu, on_gpu = Workload(cpu, batches).run(config), Workload(gpu, batches).run(config)
    assert on_gpu.n_correct == on_cpu.n_correct and on_gpu.batch_gflops == pytest.approx(on_cpu.batch_gflops)


def test_batches_preloaded_onto_the_gpu_when_they_fit(on_both):
    _, gpu, _ = on_both
    batches = preload(load_image_folder(DEMO_EVAL_DATA, gpu, limit=64), 32, device=gpu.device)
    assert all(x.is_cuda and y.is_cuda for x, y in batches)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cuda_gives_finite_logits_and_close_accuracy(on_both, precision):
    cpu, _, batches = on_both
    mixed = load_model(device="cuda", precision=precision)
    config = default_preset_for(DEMO_MODEL_NAME).method
    full, half = Workload(cpu, batches).run(config), Workload(mixed, batches).run(config)
    assert abs(full.top1 - half.top1) <= 2.0  # points, on 256 images
    assert half.gflops == pytest.approx(full.gflops, rel=0.05)


@pytest.mark.parametrize("config", CONFIGS, ids=["tome", "atm"])
def test_compiled_under_cuda_graphs_equals_eager(on_both, config):
    """`--compile on` on CUDA: ToMe replays one CUDA graph, ATM its per-block segments; logits and token counts
    as eager, a short last batch included."""
    import copy

    from atm_cli.engine import patch
    from atm_cli.engine.compiled import compile_patched

    _, gpu, batches = on_both
    torch._dynamo.reset()
    view = patch(copy.copy(gpu.model), config)
    compiled = compile_patched(view, mode="reduce-overhead")
    with torch.inference_mode():
        for images in [batches[0][0], batches[1][0], batches[2][0][:40]]:
            images = images.cuda()
            expected = view(images)
            expected_tokens = last_trace(view).tokens
            logits = compiled(images)
            assert last_trace(view).tokens == expected_tokens
            torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
