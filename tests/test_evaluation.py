"""The evaluation layer against direct computations: the model run by hand, hand-counted GFLOPs, known labels."""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from atm_cli.engine import ToMeConfig, last_trace, patch
from atm_cli.errors import RunError, UsageError
from atm_cli.evaluation import DEMO_CALIB_DATA, evaluate, load_image_folder, load_model, preload, Workload
from atm_cli.evaluation.models import resolve_model_name
from atm_cli.models import DEMO_MODEL_NAME

from timm.models import save_for_hf

from helpers import EAGER_ATM, TINY_VIT_ARGS, direct_tensors, make_tiny_vit, write_image_folder


def tiny_unmerged_gflops(tokens: int = 17, dim: int = 32, hidden: int = 128, patches: int = 16, patch: int = 8,
                         depth: int = 2, classes: int = 3) -> float:
    """The contract's count for the tiny ViT, by hand: patch embedding, blocks, final norm, head."""
    embed = patches * dim * 3 * patch * patch
    block = 5 * tokens * dim + 4 * tokens * dim ** 2 + 2 * tokens ** 2 * dim + 5 * tokens * dim + 2 * tokens * dim * hidden
    return (embed + depth * block + 5 * tokens * dim + dim * classes) / 1e9


@pytest.fixture
def tiny(tiny_vit_dir):
    return load_model(str(tiny_vit_dir), device="cpu")


def test_unmerged_run_matches_the_model_run_by_hand(tiny, tiny_vit_dir, image_folder):
    images = load_image_folder(image_folder, tiny)
    run = Workload(tiny, preload(images, batch_size=5)).run(None)
    model = timm.create_model(f"local-dir:{tiny_vit_dir}", pretrained=True).eval()
    x, y = direct_tensors(image_folder, model, {"a": 0, "b": 1, "c": 2})
    with torch.no_grad():
        predictions = model(x).argmax(dim=1)
    assert run.batch_sizes == [5, 5, 2]
    assert np.array_equal(run.predictions, predictions.numpy())
    assert run.top1 == pytest.approx(100.0 * (predictions == y).sum().item() / 12)
    assert run.top5 == 100.0  # three classes: the true one is always among the top five
    assert run.gflops == pytest.approx(tiny_unmerged_gflops(), rel=1e-12)
    assert run.tokens_per_layer == [17, 17]


def test_merged_run_matches_the_patched_model_and_leaves_it_unpatched(tiny, image_folder):
    images = load_image_folder(image_folder, tiny)
    batches = preload(images, batch_size=5)
    x = torch.cat([b for b, _ in batches])
    with torch.no_grad():
        reference = tiny.model(x)
    run = Workload(tiny, batches).run(EAGER_ATM)

    expected_correct, expected_gflops, expected_tokens = [], [], []
    model = make_tiny_vit(3)
    patch(model, EAGER_ATM)
    with torch.no_grad():
        for batch, labels in batches:
            expected_correct.append((model(batch).argmax(1) == labels).sum().item())
            trace = last_trace(model)
            expected_gflops.append(trace.gflops)
            expected_tokens.append(tuple(trace.tokens[:-1]))
    assert [int(o.correct.sum()) for o in run.batches] == expected_correct
    assert run.batch_gflops == expected_gflops
    assert [o.tokens for o in run.batches] == expected_tokens
    assert run.gflops == pytest.approx(sum(n * g for n, g in zip([5, 5, 2], expected_gflops)) / 12)
    assert run.gflops < tiny_unmerged_gflops()
    with torch.no_grad():
        assert torch.equal(tiny.model(x), reference)
    assert "forward_features" not in vars(tiny.model)


def test_max_batches_runs_only_the_first_batches(tiny, image_folder):
    batches = preload(load_image_folder(image_folder, tiny), batch_size=5)
    run = Workload(tiny, batches).run(ToMeConfig(r=2), max_batches=2)
    assert run.batch_sizes == [5, 5]
    assert run.tokens_per_layer == [17, 15]  # r=2 removes two tokens in each block


def test_evaluate_agrees_with_a_workload_on_the_same_batches(tiny, image_folder):
    images = load_image_folder(image_folder, tiny)
    report = evaluate(tiny, images, EAGER_ATM, batch_size=5, workers=0)
    batches = preload(images, batch_size=5)
    merged, baseline = Workload(tiny, batches).run(EAGER_ATM), Workload(tiny, batches).run(None)
    result = report.to_dict()
    assert result["n_images"] == 12 and result["skipped_images"] == 0
    assert result["top1"] == merged.top1 and result["gflops"] == merged.gflops
    assert result["baseline_top1"] == baseline.top1 and result["baseline_gflops"] == baseline.gflops
    same = int((merged.predictions == baseline.predictions).sum())
    assert result["agreement"] == pytest.approx(100.0 * same / 12)
    assert result["tokens_per_layer"] == merged.tokens_per_layer
    assert result["images_per_sec"] > 0 and result["end_to_end_images_per_sec"] > 0
    json.dumps(result)  # plain values only


def interrupt_at(batch: int):
    """A progress callback that presses Ctrl-C once `batch` batches are done."""
    calls = []

    def progress(done: int, total: int) -> None:
        calls.append(done)
        if len(calls) == batch:
            raise KeyboardInterrupt

    return progress


def test_an_interrupted_evaluation_reports_the_batches_it_finished(tiny, image_folder):
    images = load_image_folder(image_folder, tiny)
    report = evaluate(tiny, images, EAGER_ATM, batch_size=5, workers=0, progress=interrupt_at(2), keep_partial=True)
    first_two = preload(images, batch_size=5)[:2]
    merged, baseline = Workload(tiny, first_two).run(EAGER_ATM), Workload(tiny, first_two).run(None)
    result = report.to_dict()
    assert result["interrupted"] and result["n_images"] == 10 and result["n_files"] == 12
    assert result["top1"] == merged.top1 and result["gflops"] == merged.gflops
    assert result["baseline_top1"] == baseline.top1 and report.baseline.batch_sizes == [5, 5]


def test_without_keep_partial_an_interrupt_propagates(tiny, image_folder):
    images = load_image_folder(image_folder, tiny)
    with pytest.raises(KeyboardInterrupt):
        evaluate(tiny, images, EAGER_ATM, batch_size=5, workers=0, progress=interrupt_at(2))


def test_wnid_folders_map_to_imagenet_indices_with_classes_missing(tiny_imagenet_vit_dir, tmp_path):
    loaded = load_model(str(tiny_imagenet_vit_dir), device="cpu")
    # goldfish, tabby cat and banana: ImageNet-1k classes 1, 281 and 954; the other 997 are absent.
    root = write_image_folder(tmp_path / "in", {"n01443537": 2, "n02123045": 1, "n07753592": 2})
    images = load_image_folder(root, loaded)
    assert images.class_to_model_index == {"n01443537": 1, "n02123045": 281, "n07753592": 954}
    labels = torch.cat([y for _, y in preload(images, batch_size=4)])
    assert labels.tolist() == [1, 1, 281, 954, 954]

    write_image_folder(root, {"not-a-wnid": 1})
    with pytest.raises(UsageError, match="not-a-wnid"):
        load_image_folder(root, loaded)


def test_label_names_and_sorted_order_and_unmappable_folders(tiny, tmp_path):
    named = tmp_path / "named-vit"
    save_for_hf(make_tiny_vit(3), str(named), model_config={"label_names": ["ship", "cat", "dog"]},
                model_args={**TINY_VIT_ARGS, "num_classes": 3}, safe_serialization=True)
    # Folder names are the model's label names: "cat" is class 1 whatever else is present.
    root = write_image_folder(tmp_path / "pets", {"cat": 1, "ship": 1})
    assert load_image_folder(root, load_model(str(named))).class_to_model_index == {"cat": 1, "ship": 0}
    # Unknown names, as many as the model's classes: sorted order, as timm's own validation does.
    root = write_image_folder(tmp_path / "abc", {"z": 1, "x": 1, "y": 1})
    assert load_image_folder(root, tiny).class_to_model_index == {"x": 0, "y": 1, "z": 2}
    root = write_image_folder(tmp_path / "four", {"w": 1, "x": 1, "y": 1, "z": 1})
    with pytest.raises(UsageError, match="cannot map the 4 class folders"):
        load_image_folder(root, tiny)


def test_class_map_file_overrides(tiny, image_folder, tmp_path):
    as_json = tmp_path / "map.json"
    as_json.write_text(json.dumps({"a": 2, "b": 0, "c": 1}))
    as_text = tmp_path / "map.txt"
    as_text.write_text("a 2\nb,0\n\nc 1\n")
    for class_map in (as_json, as_text):
        images = load_image_folder(image_folder, tiny, class_map=class_map)
        labels = torch.cat([y for _, y in preload(images, batch_size=12)])
        assert labels.tolist() == [2] * 5 + [0] * 4 + [1] * 3
    as_json.write_text(json.dumps({"a": 2, "b": 0}))
    with pytest.raises(UsageError, match="no index for folder"):
        load_image_folder(image_folder, tiny, class_map=as_json)
    as_json.write_text(json.dumps({"a": 2, "b": 0, "c": 3}))
    with pytest.raises(UsageError, match="outside"):
        load_image_folder(image_folder, tiny, class_map=as_json)


def test_unreadable_images_are_skipped_and_counted(tiny, image_folder):
    (image_folder / "b" / "garbage.jpg").write_bytes(b"this is not an image")
    whole = (image_folder / "c" / "000.jpg").read_bytes()
    (image_folder / "c" / "truncated.jpg").write_bytes(whole[: len(whole) // 3])
    images = load_image_folder(image_folder, tiny)
    batches = preload(images, batch_size=4)
    assert sum(len(y) for _, y in batches) == 12
    assert images.skipped == 2 and images.n_images == 12
    assert set(images.skipped_files) == {"b/garbage.jpg", "c/truncated.jpg"}

    strict = load_image_folder(image_folder, tiny, strict=True)
    with pytest.raises(RunError, match="garbage.jpg"):
        preload(strict, batch_size=4)


def test_limit_takes_a_class_balanced_seeded_subset(tiny, image_folder):
    def classes(images):
        return Counter(torch.cat([y for _, y in preload(images, batch_size=16)]).tolist())

    first = load_image_folder(image_folder, tiny, limit=7, seed=0)
    assert classes(first) == {0: 3, 1: 2, 2: 2}
    again = load_image_folder(image_folder, tiny, limit=7, seed=0)
    other = load_image_folder(image_folder, tiny, limit=7, seed=3)
    assert again.fingerprint == first.fingerprint
    assert [again.relative_path(i) for i in range(7)] == [first.relative_path(i) for i in range(7)]
    assert other.fingerprint != first.fingerprint
    assert load_image_folder(image_folder, tiny, limit=100).n_files == 12


def test_fingerprint_follows_paths_sizes_and_classes(tiny, tmp_path):
    one = write_image_folder(tmp_path / "one", {"a": 2, "b": 2})
    two = write_image_folder(tmp_path / "two", {"a": 2, "b": 2})
    three_class = write_image_folder(tmp_path / "three", {"a": 1, "b": 1, "c": 1})
    reference = load_image_folder(three_class, tiny).fingerprint
    write_image_folder(one, {"c": 1})
    write_image_folder(two, {"c": 1})
    assert load_image_folder(one, tiny).fingerprint == load_image_folder(two, tiny).fingerprint
    assert load_image_folder(one, tiny).fingerprint != reference
    (two / "a" / "000.jpg").write_bytes((two / "a" / "000.jpg").read_bytes() + b"\0")
    assert load_image_folder(one, tiny).fingerprint != load_image_folder(two, tiny).fingerprint
    class_map = tmp_path / "map.json"
    class_map.write_text(json.dumps({"a": 1, "b": 0, "c": 2}))
    assert load_image_folder(one, tiny, class_map=class_map).fingerprint != load_image_folder(one, tiny).fingerprint


def test_presets_record_bundled_samples_by_a_portable_name(tiny, image_folder, monkeypatch, demo):
    assert load_image_folder(image_folder, tiny).source == str(image_folder)
    monkeypatch.chdir(DEMO_CALIB_DATA.parent)  # a relative path to the bundled samples names them too
    assert load_image_folder(DEMO_CALIB_DATA.name, demo, limit=10).source == "bundled:cifar10-calib"


def test_missing_or_empty_folders_are_usage_errors(tiny, tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_image_folder(tmp_path / "nowhere", tiny)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no class folders"):
        load_image_folder(tmp_path / "empty", tiny)
    (tmp_path / "empty" / "a").mkdir()
    with pytest.raises(UsageError, match="no images"):
        load_image_folder(tmp_path / "empty", tiny)


def test_model_names_aliases_tags_and_folders(tiny_vit_dir, tmp_path):
    assert resolve_model_name("atm-demo") == DEMO_MODEL_NAME
    assert resolve_model_name("deit_small_patch16_224.fb_in1k") == "deit_small_patch16_224.fb_in1k"
    assert resolve_model_name(str(tiny_vit_dir)) == f"local-dir:{tiny_vit_dir.resolve()}"
    with pytest.raises(UsageError, match="no pretrained tag 'nope'.*fb_in1k"):
        resolve_model_name("deit_small_patch16_224.nope")
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"")
    with pytest.raises(UsageError, match="use model NAME checkpoint FILE"):  # the CLI says --model, --checkpoint
        resolve_model_name(str(weights))
    with pytest.raises(UsageError, match="no config.json"):
        resolve_model_name(str(tmp_path))


def test_load_model_by_name_folder_and_checkpoint(tmp_path):
    with pytest.raises(UsageError, match="did you mean deit_small_patch16_224"):
        load_model("deit_smal_patch16_224")
    with pytest.raises(UsageError, match="does not exist"):
        load_model("atm-demo", checkpoint=tmp_path / "missing.pth")

    torch.manual_seed(5)
    weights = timm.create_model(DEMO_MODEL_NAME).state_dict()
    checkpoint = tmp_path / "demo.pth"
    torch.save(weights, checkpoint)
    loaded = load_model("atm-demo", checkpoint=checkpoint, device="cpu")
    assert loaded.name == DEMO_MODEL_NAME and loaded.num_classes == 10 and loaded.tag is None
    assert loaded.checkpoint_sha256 == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in weights.items())
    assert loaded.data_config["input_size"] == (3, 32, 32)
    assert not loaded.model.training


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_usage_error():
    with pytest.raises(UsageError, match="no CUDA device"):
        load_model("atm-demo", pretrained=False, device="cuda")


def test_shared_imagenet_sample_maps_all_725_classes(imagenet_sample, tiny_imagenet_vit_dir):
    loaded = load_model(str(tiny_imagenet_vit_dir), device="cpu")
    images = load_image_folder(imagenet_sample, loaded)
    mapping = images.class_to_model_index
    assert len(mapping) == 725 and images.n_files == 1300
    assert len(set(mapping.values())) == 725
    # Known ImageNet-1k indices: tench 0, brambling 10, robin 15, bald eagle 22, tabby 281,
    # African elephant 386, mountain bike 671, banana 954.
    known = {"n01440764": 0, "n01530575": 10, "n01558993": 15, "n01614925": 22, "n02123045": 281,
             "n02504458": 386, "n03792782": 671, "n07753592": 954}
    assert {w: mapping[w] for w in known} == known
    subset = load_image_folder(imagenet_sample, loaded, limit=24)
    report = evaluate(loaded, subset, EAGER_ATM, batch_size=8, workers=0).to_dict()
    assert report["n_images"] == 24 and report["skipped_images"] == 0


def test_files_that_are_not_checkpoints_say_so(tmp_path):
    for name, content in (("random.pth", bytes(range(256)) * 8), ("empty.pth", b""), ("text.pth", b"epoch 3\n"),
                          ("random.safetensors", b"\x10" * 64)):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(UsageError, match=f"{name} is not a checkpoint") as error:
            load_model("atm-demo", checkpoint=tmp_path / name, device="cpu")
        assert "weights_only" not in str(error.value)  # torch's advice would not help: atm offers no such switch


def test_a_checkpoint_of_another_architecture_names_its_first_differences(tmp_path):
    weights = timm.create_model(DEMO_MODEL_NAME).state_dict()
    del weights["head.bias"]
    weights["head.weight"] = torch.zeros(7, 128)
    weights["extra.scale"] = torch.ones(1)
    torch.save({"model": weights, "epoch": 3}, tmp_path / "other.pth")  # timm unwraps "model"
    with pytest.raises(RunError) as error:
        load_model("atm-demo", checkpoint=tmp_path / "other.pth", device="cpu")
    assert str(error.value).endswith("does not fit atm_demo_vit_tiny_patch4_32: missing head.bias; unexpected "
                                     "extra.scale; shapes differ: head.weight (7, 128) in the file, (10, 128) in "
                                     "the model")


def test_a_checkpoint_that_needs_unpickling_needs_the_opt_in(tmp_path):
    torch.manual_seed(3)
    weights = timm.create_model(DEMO_MODEL_NAME).state_dict()
    # Older training scripts save their arguments beside the weights: objects that only full unpickling restores.
    torch.save({"model": weights, "output_dir": Path("runs/deit")}, tmp_path / "trained.pth")
    with pytest.raises(UsageError, match=r"pickles more than weights \(pathlib\.\w*Path\).*unsafe_checkpoint loads it"):
        load_model("atm-demo", checkpoint=tmp_path / "trained.pth", device="cpu")
    loaded = load_model("atm-demo", checkpoint=tmp_path / "trained.pth", device="cpu", unsafe_checkpoint=True)
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in weights.items())


def test_the_cli_refuses_an_unpicklable_checkpoint_in_one_line_and_loads_it_when_asked(tmp_path, image_folder):
    from typer.testing import CliRunner

    from atm_cli.cli.app import app

    torch.save({"model": timm.create_model(DEMO_MODEL_NAME).state_dict(), "log": Path("log.txt")}, tmp_path / "t.pth")
    args = ["probe", "--checkpoint", str(tmp_path / "t.pth"), "--thresholds", "0.9", "--limit", "4"]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2 and refused.stderr.count("\n") == 1 and "--unsafe-checkpoint" in refused.stderr
    assert CliRunner().invoke(app, [*args, "--unsafe-checkpoint"]).exit_code == 0
    help_text = CliRunner().invoke(app, ["probe", "--help"], env={"COLUMNS": "200"}).stdout
    described = " ".join(help_text.replace("│", " ").split())  # wrapped lines read as one text at any width
    assert "Unpickling runs code from the file" in described


def test_offline_the_hub_fails_at_once_with_the_hint(monkeypatch, tmp_path):
    import time

    from huggingface_hub import constants

    # Nothing listens on port 9 of this machine: the hub is out of reach, as on a machine without a network.
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    started = time.monotonic()
    with pytest.raises(RunError, match=r"deit_tiny_patch16_224.*\(offline\? use checkpoint FILE or no_pretrained\)"):
        load_model("deit_tiny_patch16_224", device="cpu")
    assert time.monotonic() - started < 10
    assert constants.HF_HUB_OFFLINE  # the hub's cache-only mode, as HF_HUB_OFFLINE=1 sets it


def test_a_fixed_random_order_keeps_the_images_and_mixes_the_classes_of_each_batch(demo):
    """The calibration search's order: the same images (same fingerprint and labels), the same order every
    time, and a first batch that holds most classes where the folder's own first batch holds two."""
    images = load_image_folder(DEMO_CALIB_DATA, demo)
    mixed, again = images.in_fixed_random_order(), images.in_fixed_random_order()
    labels = images.dataset.targets  # an ImageFolder: the folder's order, class by class
    mixed_labels = [labels[i] for i in mixed.dataset.indices]
    assert mixed.fingerprint == images.fingerprint and Counter(mixed_labels) == Counter(labels)
    assert mixed.dataset.indices == again.dataset.indices != list(range(len(labels)))
    assert len(set(labels[:128])) <= 2 and len(set(mixed_labels[:128])) >= 8
    assert {mixed.relative_path(i) for i in range(len(labels))} == {images.relative_path(i) for i in range(len(labels))}
