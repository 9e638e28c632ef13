"""Image folders as a model sees them: timm's eval transform, labels in the model's class indices.

Unreadable images are found while loading (reading every file twice would slow large folders);
each pass drops them from its batches and records them on the ImageSet, so counts are complete
after one full pass. Entries that are no regular file (a dangling link, a FIFO) are found while
listing and counted the same way. Folders are read as they are: a symlinked folder is followed
once (a link back up the tree is no loop), each real file is taken once, an image larger than
PIL's limit (a decompression bomb) is skipped, and 16-bit and float pixels are scaled to 8 bits.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import stat
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from timm.data import ImageNetInfo, create_transform, infer_imagenet_subset
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from atm_cli.errors import RunError, UsageError, param

from .models import LoadedModel

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
DEMO_EVAL_DATA = SAMPLES / "cifar10-eval"  # CIFAR-10 test images, class balanced
DEMO_CALIB_DATA = SAMPLES / "cifar10-calib"  # training images held out of the demo model's training

# What PIL raises for a file it cannot decode (UnidentifiedImageError and truncation are OSErrors).
UNREADABLE_ERRORS = (OSError, SyntaxError, ValueError)
# An image over PIL's pixel limit, skipped whether PIL would warn (over the limit) or refuse (over twice it).
TOO_LARGE_ERRORS = (Image.DecompressionBombError, Image.DecompressionBombWarning)
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def load_rgb(path: str) -> Image.Image:
    """An image file as 8-bit RGB: 16-bit pixels scaled by 255/65535 and float ones in [0, 1] by 255 (PIL's own
    conversion clips them, so most would read as white or black); float pixels outside [0, 1] are refused."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with open(path, "rb") as handle:
            image = Image.open(handle)
            image.load()
    if image.mode not in (*SIXTEEN_BIT_MODES, "I", "F"):
        return image.convert("RGB")
    pixels = np.asarray(image).astype(np.float64)
    low, high = (pixels.min(), pixels.max()) if pixels.size else (0.0, 0.0)
    if image.mode == "F":
        if not (np.isfinite(pixels).all() and 0 <= low and high <= 1):
            raise ValueError(f"float pixels in {low:g}..{high:g}, outside [0, 1]: no known scale to 8 bits")
        scale = 255.0
    else:  # 16-bit, or 32-bit integers (PIL opens some 16-bit files so)
        if low < 0 or high > 65535:
            raise ValueError(f"32-bit pixels in {low:g}..{high:g}, outside 16 bits: no known scale to 8 bits")
        scale = 255.0 / 65535.0
    return Image.fromarray(np.rint(pixels * scale).astype(np.uint8), "L").convert("RGB")


def _list_images(top: Path, seen: set[str], not_files: dict[Path, str],
                 elsewhere: frozenset[str] = frozenset()) -> list[Path]:
    """Image files under `top` in sorted path order, each real folder once and each real file once (`seen`: real
    paths of the files taken so far); folders in `elsewhere` (real paths: the data folder and the other classes'
    folders, which a link up the tree reaches) are not entered. Entries that are no regular file go to
    `not_files` with the reason."""
    folders, pending, entered = [], [top], set(elsewhere)
    while pending:
        folder = pending.pop()
        real = os.path.realpath(folder)
        if real in entered:
            continue  # a link back up the tree, or a second link to a folder already read
        entered.add(real)
        folders.append(folder)
        with os.scandir(folder) as entries:
            pending.extend(Path(entry.path) for entry in entries if entry.is_dir())
    images = []
    for folder in sorted(folders, key=str):
        with os.scandir(folder) as entries:
            names = sorted(entry.name for entry in entries if not entry.is_dir())
        for name in names:
            path = folder / name
            if path.suffix.lower() not in IMG_EXTENSIONS:
                continue
            try:
                mode = os.stat(path).st_mode
            except OSError:
                not_files[path] = "a link to nothing" if os.path.islink(path) else "cannot be read"
                continue
            if not stat.S_ISREG(mode):
                not_files[path] = "not a regular file" + (" (a FIFO)" if stat.S_ISFIFO(mode) else "")
                continue
            real = os.path.realpath(path)
            if real not in seen:
                seen.add(real)
                images.append(path)
    return images


class _ImageFolder(ImageFolder):
    """torchvision's ImageFolder, listed by `_list_images` (its own walk follows links in circles)."""

    def __init__(self, root: Path, transform):
        self.not_files: dict[Path, str] = {}
        super().__init__(root, transform=transform, loader=load_rgb, allow_empty=True)

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        seen: set[str] = set()
        real = {name: os.path.realpath(Path(directory) / name) for name in class_to_idx}
        tops = frozenset({os.path.realpath(directory), *real.values()})
        # A link up the tree into another class's folder would give its images this class's label.
        return [(str(path), class_to_idx[name]) for name in sorted(class_to_idx)
                for path in _list_images(Path(directory) / name, seen, self.not_files, tops - {real[name]})]


@dataclass
class ImageSet:
    dataset: Dataset  # items: (image tensor, model class index)
    root: Path
    fingerprint: str  # sha256 of relative paths, file sizes and class indices of the selected images
    class_to_model_index: dict[str, int]  # class folder name -> model output index
    strict: bool = False
    n_files: int = 0
    skipped_files: dict[str, str] = field(default_factory=dict)  # relative path -> why it was unreadable
    labelled: bool = True  # False: images at any depth, every label UNLABELLED (label-free goals only)

    @property
    def skipped(self) -> int:
        return len(self.skipped_files)

    @property
    def n_images(self) -> int:
        """Images that can be evaluated (all files until a pass has found the unreadable ones)."""
        return self.n_files - self.skipped

    @property
    def source(self) -> str:
        """Where the images came from, as presets record it: bundled samples by a name that holds on any machine."""
        root = self.root.resolve()
        if root.is_relative_to(SAMPLES):
            return f"bundled:{root.relative_to(SAMPLES)}"
        return str(self.root)

    def in_fixed_random_order(self) -> ImageSet:
        """The same images in one fixed pseudo-random order. A folder's own order gives batches of one or two
        classes; a search that prunes trials and estimates GFLOPs on its first batches needs batches that
        stand for the whole set."""
        order = list(range(len(self.dataset)))
        random.Random(0).shuffle(order)
        return replace(self, dataset=Subset(self.dataset, order))

    def relative_path(self, index: int) -> str:
        folder, index = _folder_and_index(self.dataset, index)
        return os.path.relpath(folder.samples[index][0], self.root)


def _folder_and_index(dataset: Dataset, index: int) -> tuple[ImageFolder, int]:
    if isinstance(dataset, Subset):
        return _folder_and_index(dataset.dataset, dataset.indices[index])
    return dataset, index


UNLABELLED = -1  # the label of an image from an unlabelled folder: no class index matches it


class _Unlabelled(Dataset):
    """Every image file under a folder, at any depth, in path order, each labelled UNLABELLED."""

    def __init__(self, root: Path, transform):
        self.not_files: dict[Path, str] = {}
        self.samples = [(str(path), UNLABELLED) for path in _list_images(root, set(), self.not_files)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        return self.transform(load_rgb(self.samples[index][0])), UNLABELLED


def load_unlabelled_images(root: str | Path, loaded: LoadedModel, limit: int | None = None, seed: int = 0) -> ImageSet:
    """Every image under `root`, at any depth, with no labels (for goals that compare with the unmerged model)."""
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"data folder {root} does not exist")
    images = _Unlabelled(root, create_transform(**loaded.data_config, is_training=False))
    if not images.samples:
        raise UsageError(f"data folder {root} has no images ({', '.join(IMG_EXTENSIONS)})")
    selected = list(range(len(images.samples)))
    if limit is not None:
        selected = _balanced_subset([UNLABELLED] * len(selected), limit, seed)
    skipped = _not_files(root, images.not_files, limit)
    return ImageSet(dataset=Subset(images, selected) if limit is not None else images, root=root,
                    fingerprint=_fingerprint(root, [images.samples[i] for i in selected], {UNLABELLED: UNLABELLED}),
                    class_to_model_index={}, n_files=len(selected) + len(skipped), skipped_files=skipped,
                    labelled=False)


def _not_files(root: Path, not_files: dict[Path, str], limit: int | None) -> dict[str, str]:
    """Entries that are no regular file, counted as skipped images (a --limit subset holds images only)."""
    return {} if limit is not None else {os.path.relpath(path, root): why for path, why in not_files.items()}


def load_image_folder(root: str | Path, loaded: LoadedModel, class_map: str | Path | None = None,
                      strict: bool = False, limit: int | None = None, seed: int = 0) -> ImageSet:
    """An ImageFolder under `root` (ROOT/<class>/<image>) with labels mapped to `loaded`'s classes."""
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"data folder {root} does not exist")
    try:
        folder = _ImageFolder(root, transform=create_transform(**loaded.data_config, is_training=False))
    except FileNotFoundError:
        raise UsageError(f"data folder {root} has no class folders (expected {root}/<class>/<image>)") from None
    if not folder.samples:
        raise UsageError(f"data folder {root} has no images in its class folders (expected {root}/<class>/<image>)")

    if hasattr(loaded.model, "set_classes"):  # a zero-shot classifier: its classes are the folder's
        if class_map is not None:
            raise UsageError(f"{loaded.name} classifies zero-shot into the class folders' names: {param('class_map')} "
                             "does not apply")
        loaded.model.set_classes(folder.classes)
        loaded.num_classes = len(folder.classes)
        mapping = {name: i for i, name in enumerate(folder.classes)}
    else:
        mapping = (_read_class_map(Path(class_map), folder.classes, loaded.num_classes) if class_map is not None
                   else _infer_class_mapping(root, folder.classes, loaded))
    model_index = [mapping[name] for name in folder.classes]
    folder.target_transform = model_index.__getitem__
    folder.targets = [model_index[t] for t in folder.targets]

    dataset: Dataset = folder
    selected = list(range(len(folder.samples)))
    if limit is not None:
        if limit < 1:
            raise UsageError(f"{param('limit')} must be at least 1, got {limit}")
        selected = _balanced_subset([t for _, t in folder.samples], limit, seed)
        dataset = Subset(folder, selected)
    skipped = _not_files(root, folder.not_files, limit)
    if strict and skipped:
        path, why = next(iter(skipped.items()))
        raise RunError(f"unreadable image {root / path}: {why}")
    return ImageSet(
        dataset=dataset,
        root=root,
        fingerprint=_fingerprint(root, [folder.samples[i] for i in selected], model_index),
        class_to_model_index=mapping,
        strict=strict,
        n_files=len(selected) + len(skipped),
        skipped_files=skipped,
    )


JSON_TYPES = {type(None): "null", bool: "boolean", int: "number", float: "number", str: "string", list: "array"}


def _read_class_map(path: Path, folders: list[str], num_classes: int) -> dict[str, int]:
    """A JSON object {folder: index}, or lines "folder index" (whitespace or comma separated); integers only."""
    if not path.is_file():
        raise UsageError(f"class map {path} does not exist")
    expected = "(expected {folder: class index} or lines 'folder index')"
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            raw = json.loads(text)
            if not isinstance(raw, dict):
                raise ValueError(f"a JSON {JSON_TYPES.get(type(raw), type(raw).__name__)}, not an object")
            pairs = list(raw.items())
        else:
            pairs = [tuple(line.replace(",", " ").split()) for line in text.splitlines() if line.strip()]
            short = next((n for n, pair in enumerate(pairs, start=1) if len(pair) != 2), None)
            if short is not None:
                raise ValueError(f"entry {short} is not 'folder index'")
        mapping = {str(name): _class_index(name, index) for name, index in pairs}
    except UnicodeDecodeError:
        raise UsageError(f"class map {path} is not UTF-8 text {expected}") from None
    except OSError as error:
        raise UsageError(f"cannot read class map {path}: {error.strerror or error}") from None
    except (ValueError, RecursionError) as error:  # RecursionError: JSON nested deeper than Python's stack
        raise UsageError(f"class map {path}: {str(error).splitlines()[0]} {expected}") from None
    missing = [name for name in folders if name not in mapping]
    if missing:
        raise UsageError(f"class map {path} has no index for folder(s) {_some(missing)}")
    outside = [name for name in folders if not 0 <= mapping[name] < num_classes]
    if outside:
        raise UsageError(f"class map {path}: index of {_some(outside)} outside the model's 0..{num_classes - 1}")
    return {name: mapping[name] for name in folders}


def _class_index(name, value) -> int:
    """A class index as written: a JSON integer or a string of digits (not 5.9, not true)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
        return int(value)
    raise ValueError(f"the index of {name!r} must be an integer, got {json.dumps(value)[:40]}")


def _infer_class_mapping(root: Path, folders: list[str], loaded: LoadedModel) -> dict[str, int]:
    """Map folder names through the model's label names, else ImageNet wnids, else sorted order.

    Sorted order (what timm's own validation does) is used only when the folders match the
    model's class count and no known label vocabulary partly matches them, so a typo in one
    folder name cannot shift every label after it.
    """
    vocabularies = []
    if loaded.label_names:
        vocabularies.append(("label names", list(loaded.label_names)))
    subset = infer_imagenet_subset(loaded.model) if hasattr(loaded.model, "pretrained_cfg") else None
    if subset:
        vocabularies.append((f"{subset} WordNet ids", ImageNetInfo(subset).label_names()))
    for description, names in vocabularies:
        index = {name: i for i, name in enumerate(names)}
        unknown = [name for name in folders if name not in index]
        if not unknown:
            return {name: index[name] for name in folders}
        if len(unknown) < len(folders):
            raise UsageError(f"cannot map class folder(s) {_some(unknown)} of {root} to {loaded.name}'s "
                             f"{description}; give {param('class_map')} FILE")
    if len(folders) == loaded.num_classes:
        return {name: i for i, name in enumerate(folders)}
    raise UsageError(f"cannot map the {len(folders)} class folders of {root} to {loaded.name}'s "
                     f"{loaded.num_classes} classes (names not recognised); give {param('class_map')} FILE")


def _some(names: list[str], shown: int = 5) -> str:
    listed = ", ".join(repr(n) for n in names[:shown])
    return listed + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _balanced_subset(labels: list[int], limit: int, seed: int) -> list[int]:
    """`limit` indices taken round-robin over classes, each class's order shuffled with `seed`."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    queues = []
    for label in sorted(by_class):
        members = by_class[label]
        rng.shuffle(members)
        queues.append(members)
    chosen: list[int] = []
    depth = 0
    while len(chosen) < min(limit, len(labels)):
        chosen.extend(q[depth] for q in queues if depth < len(q))
        depth += 1
    return sorted(chosen[:limit])


def _fingerprint(root: Path, samples: list[tuple[str, int]], model_index: list[int]) -> str:
    digest = hashlib.sha256()
    for path, folder_index in samples:
        line = f"{os.path.relpath(path, root)}\t{os.path.getsize(path)}\t{model_index[folder_index]}\n"
        digest.update(line.encode())
    return digest.hexdigest()


class _IndexedOrUnreadable(Dataset):
    """Items (index, image, label), or (index, None, reason) for a file that cannot be decoded."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            image, label = self.dataset[index]
        except UnidentifiedImageError:
            return index, None, "not an image format PIL can read"
        except TOO_LARGE_ERRORS:
            return index, None, f"more pixels than PIL's limit of {Image.MAX_IMAGE_PIXELS:,} (a decompression bomb?)"
        except UNREADABLE_ERRORS as error:
            return index, None, str(error).splitlines()[0] if str(error) else type(error).__name__
        return index, image, label


def _collate(items: list) -> tuple[Tensor | None, Tensor | None, list[tuple[int, str]]]:
    readable = [(image, label) for _, image, label in items if image is not None]
    unreadable = [(index, reason) for index, image, reason in items if image is None]
    if not readable:
        return None, None, unreadable
    return torch.stack([image for image, _ in readable]), torch.tensor([label for _, label in readable]), unreadable


def make_loader(images: ImageSet, batch_size: int, workers: int, device: torch.device) -> DataLoader:
    """The loader every pass uses: fixed order, so every pass and every method sees the same batches."""
    if batch_size < 1:
        raise UsageError(f"{param('batch_size')} must be at least 1, got {batch_size}")
    if workers < 0:
        raise UsageError(f"{param('workers')} must be 0 or more, got {workers}")
    return DataLoader(
        _IndexedOrUnreadable(images.dataset),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
        # Deep prefetch keeps decoding ahead of a model made faster by merging.
        prefetch_factor=4 if workers else None,
    )


def iterate_batches(images: ImageSet, loader: DataLoader) -> Iterator[tuple[Tensor, Tensor]]:
    """(images, labels) batches of readable images; unreadable ones are recorded (or fail when strict)."""
    for batch, labels, unreadable in loader:
        for index, reason in unreadable:
            path = images.relative_path(index)
            if images.strict:
                raise RunError(f"unreadable image {images.root / path}: {reason}")
            images.skipped_files[path] = reason
        if batch is not None:
            yield batch, labels


# Preloaded batches stay on a CUDA device while they take at most this share of its free memory.
DEVICE_SHARE = 0.25


def preload(images: ImageSet, batch_size: int, workers: int = 0,
            device: torch.device | None = None) -> list[tuple[Tensor, Tensor]]:
    """All batches in memory, for searches that run the same batches many times: on `device` when it is a
    CUDA device with room for them (each forward then skips the copy), else on the CPU."""
    loader = make_loader(images, batch_size, workers, torch.device("cpu"))
    batches = list(iterate_batches(images, loader))
    if device is not None and device.type == "cuda":
        needed = sum(x.nbytes + y.nbytes for x, y in batches)
        if needed <= DEVICE_SHARE * torch.cuda.mem_get_info(device)[0]:
            batches = [(x.to(device), y.to(device)) for x, y in batches]
    return batches
