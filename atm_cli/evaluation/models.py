"""Load a timm model by name, folder or checkpoint, ready for the engine and the data pipeline."""
from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.data import resolve_model_data_config
from timm.models import get_pretrained_cfg, split_model_name_tag
from torch import nn

from atm_cli.engine import ToMeConfig, last_trace, patch, unpatch
from atm_cli.errors import RunError, UsageError
from atm_cli.models import DEMO_MODEL_ALIAS, DEMO_MODEL_NAME

MODEL_SOURCES = ("hf-hub:", "local-dir:")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    model: nn.Module  # in eval mode, on `device`
    name: str  # timm architecture name
    tag: str | None  # timm pretrained tag of the weights loaded (e.g. "fb_in1k"); None for a checkpoint or random
    num_classes: int
    data_config: dict  # timm's resolved data config: input size, mean, std, crop, interpolation
    checkpoint_sha256: str | None  # of the local weights file loaded, None for hub or random weights
    device: torch.device
    precision: str = "fp32"  # autocast dtype of every forward pass: fp32 (none), bf16 or fp16
    # The unmerged model's cost, counted once by the engine (ToMe with r=0 is the exact unmerged forward).
    unmerged_gflops: float = 0.0
    unmerged_tokens: tuple[int, ...] = ()  # tokens entering each block (all equal)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device is available here (use cpu or auto)")
    try:
        return torch.device(device)
    except RuntimeError as error:
        raise UsageError(f"--device {device}: {error}") from None


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision}: choose from {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type == "cpu":
        raise UsageError("--precision fp16 needs a CUDA device: the CPU runs float16 autocast slowly or not at all "
                         "(use bf16 on the CPU)")
    return precision


def autocast(loaded: LoadedModel):
    """The autocast context every forward pass of `loaded` runs in (disabled at fp32)."""
    return torch.autocast(device_type=loaded.device.type, dtype=PRECISIONS[loaded.precision],
                          enabled=loaded.precision != "fp32")


def resolve_model_name(name: str) -> str:
    """The timm name for `name`: the demo alias, a folder saved in timm's format, or a timm/hub name."""
    if name == DEMO_MODEL_ALIAS:
        return DEMO_MODEL_NAME
    if name.startswith(MODEL_SOURCES):
        return name
    path = Path(name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"model folder {name} has no config.json (timm's format, as written by timm's save_for_hf)")
        return f"local-dir:{path.resolve()}"
    if path.exists() or any(separator in name for separator in ("/", "\\")):
        raise UsageError(f"--model {name}: give a timm model name or a timm model folder; "
                         "for a weights file use --model NAME --checkpoint FILE")
    architecture, tag = split_model_name_tag(name)
    if not timm.is_model(architecture):
        known = timm.list_models() + [DEMO_MODEL_ALIAS]
        close = difflib.get_close_matches(architecture, known, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else " (timm.list_models() lists them)"
        raise UsageError(f"unknown model {name!r}{hint}")
    if tag and name not in timm.list_pretrained(name):
        tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{architecture}.*")]
        raise UsageError(f"model {architecture} has no pretrained tag {tag!r} (known: {', '.join(tags) or 'none'})")
    return name


def _check_bundled_weights(timm_name: str) -> None:
    """A model registered with a local weights file (the embedded default) fails clearly when it is gone."""
    if timm_name.startswith(MODEL_SOURCES):
        return
    cfg = get_pretrained_cfg(timm_name)
    if cfg is not None and cfg.file and not cfg.url and not cfg.hf_hub_id and not Path(cfg.file).is_file():
        raise RunError(f"the weights of {timm_name} are missing: {cfg.file} (a broken install? --no-pretrained "
                       "runs with random weights)")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def load_model(name: str = DEMO_MODEL_ALIAS, checkpoint: str | Path | None = None, pretrained: bool = True,
               device: str = "auto", precision: str = "fp32") -> LoadedModel:
    """Create `name` with timm, load its weights (hub, bundled file or `checkpoint`), move it to `device`.

    `precision` is the autocast dtype its forward passes will run in (the engine's own scores and
    merges stay float32 whatever it is).
    """
    timm_name = resolve_model_name(name)
    target = resolve_device(device)
    precision = resolve_precision(precision, target)
    if checkpoint is not None:
        if not pretrained:
            raise UsageError("--checkpoint loads weights; it contradicts --no-pretrained (random weights)")
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise UsageError(f"checkpoint {checkpoint} does not exist")
    if pretrained and checkpoint is None:
        _check_bundled_weights(timm_name)
    try:
        # A local checkpoint replaces pretrained weights, so nothing is fetched for it.
        model = timm.create_model(timm_name, pretrained=pretrained and checkpoint is None,
                                  checkpoint_path=str(checkpoint) if checkpoint else None)
    except Exception as error:  # timm, safetensors, torch and the hub raise many kinds; all mean "cannot load"
        if checkpoint is not None:
            raise RunError(f"checkpoint {checkpoint} does not fit {timm_name}: {_first_line(error)}") from None
        if pretrained:
            raise RunError(f"could not load pretrained weights for {timm_name}: {_first_line(error)} "
                           "(offline? use --checkpoint FILE or --no-pretrained)") from None
        raise RunError(f"could not create {timm_name}: {_first_line(error)}") from None
    model.eval().to(target)

    cfg = model.pretrained_cfg
    weights_file = Path(cfg["file"]) if pretrained and cfg.get("file") else None
    if checkpoint is not None:
        checkpoint_sha256 = _sha256(checkpoint)
    elif weights_file is not None and weights_file.is_file():
        checkpoint_sha256 = _sha256(weights_file)
    else:
        checkpoint_sha256 = None
    loaded = LoadedModel(
        model=model,
        name=cfg.get("architecture") or timm_name,
        tag=(cfg.get("tag") or None) if pretrained and checkpoint is None else None,
        num_classes=model.num_classes,
        data_config=resolve_model_data_config(model),
        checkpoint_sha256=checkpoint_sha256,
        device=target,
        precision=precision,
    )
    _count_unmerged_cost(loaded)
    return loaded


def _count_unmerged_cost(loaded: LoadedModel) -> None:
    """Check that the engine can patch the model, and count its unmerged GFLOPs on one image."""
    model = loaded.model
    try:
        patch(model, ToMeConfig(r=0))  # the exact unmerged forward, traced
    except ValueError as error:
        raise UsageError(f"{loaded.name} cannot be merged: {error}") from None
    try:
        with torch.inference_mode():
            model(torch.zeros(1, *loaded.data_config["input_size"], device=loaded.device))
        trace = last_trace(model)
    finally:
        unpatch(model)
    loaded.unmerged_gflops = trace.gflops
    loaded.unmerged_tokens = tuple(trace.tokens[:-1])
