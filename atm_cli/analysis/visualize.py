"""Pictures of what merging did: merged regions (paper Figs. 1, 7) and tokens per block (Fig. 6).

Region pictures: each image is run alone (batch-adaptive r is then the image's own count, as in the
paper's figures) with the engine's source tracking on; every token left after the last block is
drawn as one region, the patches it holds painted in their mean colour, borders between regions.
Each region gets its own colour (two regions whose means coincide are told apart by a shift of a
few levels), so the picture can be read back. ATM's last block merges at its threshold here, as in
the paper's figures: the engine's prefix-only shortcut would leave the class token alone and does
not change the logits either way.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from timm.data import create_transform
from torch import Tensor, nn

from ..engine import ATMConfig, MethodConfig, ToMeConfig, last_trace, merging
from ..errors import UsageError
from ..evaluation import LoadedModel, Workload
from ..evaluation.models import require_timm
from .ladders import least_merging_within
from .plotting import pyplot, save_figure

PANEL_PIXELS = 128  # about this many pixels a side for each picture
CAPTION_PIXELS = 20
MARGIN_PIXELS = 8
BORDER_COLOUR = (20, 20, 20)


@dataclass
class Panel:
    image: str
    method: str  # "original" or the method's label
    box: tuple[int, int, int, int]  # left, top, right, bottom of the picture (caption excluded)
    grid: tuple[int, int]  # patches per column and per row
    tokens: int | None = None  # tokens left after the last block, prefix tokens included (None: original)
    regions: int | None = None  # image tokens left: the regions drawn
    labels: list[list[int]] = field(default_factory=list)  # region of each patch, row-major

    def to_dict(self) -> dict:
        return {"image": self.image, "method": self.method, "box": list(self.box), "grid": list(self.grid),
                "tokens": self.tokens, "regions": self.regions}


@dataclass
class Visualization:
    path: Path
    panels: list[Panel]
    methods: dict[str, MethodConfig]  # each row's label -> the config drawn

    def to_dict(self) -> dict:
        return {"path": str(self.path), "panels": [panel.to_dict() for panel in self.panels]}


def load_pictures(paths: Sequence[str | Path], data_config: Mapping) -> list[Tensor]:
    """Each image as the model sees it: timm's evaluation transform for this model."""
    transform = create_transform(**data_config, is_training=False)
    tensors = []
    for path in paths:
        try:
            with Image.open(path) as image:
                tensors.append(transform(image.convert("RGB")))
        except (OSError, ValueError) as error:
            raise UsageError(f"cannot read image {path}: {error}") from error
    return tensors


def to_display(tensor: Tensor, data_config: Mapping) -> Image.Image:
    """Undo the transform's normalisation: the crop the model saw, as 8-bit RGB."""
    mean = torch.tensor(data_config["mean"]).view(3, 1, 1)
    std = torch.tensor(data_config["std"]).view(3, 1, 1)
    pixels = ((tensor.cpu() * std + mean).clamp(0, 1) * 255).round().byte()
    return Image.fromarray(pixels.permute(1, 2, 0).numpy(), "RGB")


def tracing(config: MethodConfig) -> MethodConfig:
    """The config with, for ATM, the last block merging as any other (so every patch has a region)."""
    if isinstance(config, ATMConfig):
        return replace(config, prefix_only_last_block=False)
    return config


@torch.inference_mode()
def region_labels(model: nn.Module, image: Tensor, config: MethodConfig) -> tuple[np.ndarray, int]:
    """Which final token holds each patch, as a (rows, columns) grid, and the tokens left (prefix included)."""
    device = next(model.parameters()).device
    with merging(model, tracing(config), trace_source=True):
        model(image[None].to(device))
        source = last_trace(model).source[0]  # (N_final, N_0): final tokens x input tokens
    prefix = model.num_prefix_tokens
    holders = source[prefix:, prefix:].argmax(dim=0)  # every input patch sits in exactly one final token
    rows, columns = model.patch_embed.grid_size
    return holders.view(rows, columns).cpu().numpy(), source.shape[0]


def distinct_colours(colours: np.ndarray) -> np.ndarray:
    """Round mean colours to 8 bits, shifting a repeat by a few levels until every region's colour is its own."""
    taken: set[tuple[int, int, int]] = set()
    result = np.empty_like(colours, dtype=np.uint8)
    shifts = [(d * sx, d * sy, d * sz) for d in range(1, 64) for sx, sy, sz in ((1, 0, 0), (0, 1, 0), (0, 0, 1),
                                                                             (-1, 0, 0), (0, -1, 0), (0, 0, -1))]
    for index, colour in enumerate(np.rint(colours).astype(int)):
        candidate = tuple(int(c) for c in colour)
        for shift in shifts:
            if candidate not in taken:
                break
            candidate = tuple(int(np.clip(c + s, 0, 255)) for c, s in zip(colour, shift))
        taken.add(candidate)
        result[index] = candidate
    return result


def paint_regions(picture: Image.Image, labels: np.ndarray) -> Image.Image:
    """Each region in the mean colour of its pixels, a line where neighbouring patches belong to different ones."""
    rows, columns = labels.shape
    cell_h, cell_w = picture.height // rows, picture.width // columns
    pixel_labels = np.kron(labels, np.ones((cell_h, cell_w), dtype=labels.dtype))
    pixels = np.asarray(picture, dtype=np.float64)
    regions, inverse = np.unique(pixel_labels, return_inverse=True)
    inverse = inverse.reshape(pixel_labels.shape)
    sums = np.zeros((len(regions), 3))
    np.add.at(sums, inverse, pixels)
    means = sums / np.bincount(inverse.ravel())[:, None]
    painted = Image.fromarray(distinct_colours(means)[inverse], "RGB")
    draw = ImageDraw.Draw(painted)
    for r in range(rows):
        for c in range(columns):
            if c + 1 < columns and labels[r, c] != labels[r, c + 1]:
                x = (c + 1) * cell_w
                draw.line([(x, r * cell_h), (x, (r + 1) * cell_h - 1)], fill=BORDER_COLOUR)
            if r + 1 < rows and labels[r, c] != labels[r + 1, c]:
                y = (r + 1) * cell_h
                draw.line([(c * cell_w, y), ((c + 1) * cell_w - 1, y)], fill=BORDER_COLOUR)
    return painted


def matching_tome(loaded: LoadedModel, pictures: Sequence[Tensor], config: MethodConfig) -> ToMeConfig:
    """ToMe with the least r whose GFLOPs do not exceed `config`'s mean over the pictures, each run alone."""
    labels = torch.zeros(1, dtype=torch.long)
    one_by_one = Workload(loaded, [(picture[None], labels) for picture in pictures])
    target = one_by_one.run(config).gflops
    ladder = ToMeConfig.knob(loaded.depth, loaded.image_tokens)
    # ToMe's GFLOPs do not depend on the image: the first picture alone finds its r.
    found = least_merging_within(Workload(loaded, one_by_one.batches[:1]), ladder, target)
    return ladder.config(found[0] if found is not None else ladder.top)


def method_label(config: MethodConfig) -> str:
    """ATM by name (its thresholds adapt per image); another method by name and its knob's value."""
    if isinstance(config, ATMConfig):
        return "ATM"
    knob = type(config).knob(depth=1, image_tokens=2)
    value = "" if knob is None else f" {knob.param}={getattr(config, knob.param)}"
    return f"{config.NAME}{value}"


def visualize(loaded: LoadedModel, paths: Sequence[str | Path], method: MethodConfig, out: str | Path,
              beside_tome: bool = False, panel_pixels: int = PANEL_PIXELS) -> Visualization:
    """One column per image: the image, then its merged regions under `method`.

    `beside_tome` adds a row of ToMe above, at the same mean GFLOPs on these images (the paper's Fig. 7).
    """
    if not paths:
        raise UsageError("visualize needs at least one image")
    require_timm(loaded, "visualize (the patch grid of timm's patch_embed)")
    model, data_config = loaded.model, loaded.data_config
    pictures = load_pictures(paths, data_config)
    methods = [matching_tome(loaded, pictures, method), method] if beside_tome else [method]
    rows, columns = model.patch_embed.grid_size
    cell = max(1, round(panel_pixels / max(rows, columns)))
    width, height = cell * columns, cell * rows
    pitch_x, pitch_y = width + MARGIN_PIXELS, height + CAPTION_PIXELS + MARGIN_PIXELS
    canvas = Image.new("RGB", (MARGIN_PIXELS + pitch_x * len(paths), MARGIN_PIXELS + pitch_y * (1 + len(methods))),
                       "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=13)
    panels = []
    for column, (path, tensor) in enumerate(zip(paths, pictures)):
        picture = to_display(tensor, data_config).resize((width, height), Image.Resampling.BICUBIC)
        left = MARGIN_PIXELS + column * pitch_x
        captions = [("original", picture, None, Path(path).name)]
        for config in methods:
            label = method_label(config)
            labels, tokens = region_labels(model, tensor, config)
            captions.append((label, paint_regions(picture, labels), (labels, tokens), f"{label}: {tokens} tokens"))
        for row, (method, shown, merged, caption) in enumerate(captions):
            top = MARGIN_PIXELS + row * pitch_y
            canvas.paste(shown, (left, top))
            draw.text((left, top + height + 3), caption, fill="black", font=font)
            panel = Panel(str(path), method, (left, top, left + width, top + height), (rows, columns))
            if merged is not None:
                labels, tokens = merged
                panel.tokens, panel.regions = tokens, len(np.unique(labels))
                panel.labels = labels.tolist()
            panels.append(panel)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, format="PNG", optimize=True)
    return Visualization(out, panels, {method_label(config): config for config in methods})


def plot_tokens_per_block(tokens: Sequence[float], path: str | Path, thresholds: Sequence[float] | None = None,
                          title: str = "") -> Path:
    """Fig. 6: tokens merged in each block (bars) under the block's similarity threshold (line).

    `tokens` holds the mean tokens entering each block, then those leaving the last one (L + 1 values), so
    every block has its bar; ATM's last bar is its shortcut there: only the class token, all the head reads, goes on.
    """
    plt = pyplot()
    depth = len(tokens) - 1
    merged = [a - b for a, b in zip(tokens, tokens[1:])]
    figure, axes = plt.subplots(figsize=(7, 4))
    handles = [axes.bar(range(1, depth + 1), merged, color="#5aa469", label="tokens merged")]
    axes.set_xlabel("block")
    axes.set_ylabel("tokens merged per image")
    axes.set_ylim(bottom=0)
    axes.set_xticks(range(1, depth + 1))
    if thresholds is not None:
        twin = axes.twinx()
        handles += twin.plot(range(1, depth + 1), thresholds, color="#f08a24", marker="o", label="threshold")
        twin.set_ylabel("similarity threshold")
    axes.legend(handles=handles, loc="upper right")
    axes.set_title(title or "Tokens merged per block")
    return save_figure(figure, path)

