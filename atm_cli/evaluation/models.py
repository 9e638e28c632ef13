"""Load a timm model by name, folder or checkpoint, ready for the engine and the data pipeline."""
from __future__ import annotations

import difflib
import functools
import hashlib
import pickle
import socket
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from huggingface_hub import constants as hub_constants
from timm.data import resolve_model_data_config
from timm.models import get_pretrained_cfg, load_state_dict, split_model_name_tag
from torch import nn

from atm_cli.engine import ToMeConfig, last_trace, patch, unpatch
from atm_cli.errors import RunError, UsageError, first_line, param
from atm_cli.model_names import DEMO_MODEL_ALIAS, DEMO_MODEL_NAME, complete_model_name

from .other_libraries import is_other_library, load_other_library

MODEL_SOURCES = ("hf-hub:", "local-dir:")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HUB_TIMEOUT_S = 3.0  # to reach the hub once before a download; without a network it would retry for a minute
SHOWN_KEYS = 3  # of each kind of mismatch between a checkpoint and its model
# torch.save's legacy (non-zip) format starts with this pickled number.
LEGACY_TORCH_HEAD = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)


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
    compiled: bool = False  # every setting (and the unmerged model) runs through torch.compile (engine/compiled.py)
    # ATM too (its r follows the data: per-block segments, which on the CPU proxy ran slower than eager);
    # `--compile on` only, where `auto` leaves data-dependent settings eager.
    compile_data_dependent: bool = False
    # The unmerged model's cost, counted once by the engine (ToMe with r=0 is the exact unmerged forward).
    unmerged_gflops: float = 0.0
    unmerged_tokens: tuple[int, ...] = ()  # tokens entering each block (all equal)
    num_prefix_tokens: int = 0  # class, distillation and register tokens, which no method merges
    label_names: tuple[str, ...] = ()  # the model's own names of its classes, where it has them

    @property
    def depth(self) -> int:
        return len(self.unmerged_tokens)

    @property
    def image_tokens(self) -> int:
        return self.unmerged_tokens[0] - self.num_prefix_tokens


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"{param('device')} {device}: no CUDA device is available here (use cpu or auto)")
    try:
        return torch.device(device)
    except RuntimeError as error:
        raise UsageError(f"{param('device')} {device}: {error}") from None


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in PRECISIONS:
        raise UsageError(f"{param('precision')} {precision}: choose from {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type == "cpu":
        raise UsageError(f"{param('precision')} fp16 needs a CUDA device: the CPU runs float16 autocast slowly or not at all "
                         "(use bf16 on the CPU)")
    return precision


COMPILE_MODES = ("auto", "on", "off")


def resolve_compile(compile: str, device: torch.device) -> bool:
    """Whether forward passes run compiled: "auto" compiles on CUDA, where a merged forward is bound by
    launching its many small operations (CUDA graphs replay them at once), and not on the CPU, where
    compiling costs a minute per setting and the forward is bound by arithmetic. ("auto" leaves ATM, whose
    shapes follow the data, eager: `LoadedModel.compile_data_dependent`.)"""
    if compile not in COMPILE_MODES:
        raise UsageError(f"{param('compile')} {compile}: choose from {', '.join(COMPILE_MODES)}")
    return device.type == "cuda" if compile == "auto" else compile == "on"


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so that a timer around a forward times it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(loaded: LoadedModel):
    """The autocast context every forward pass of `loaded` runs in (disabled at fp32)."""
    return torch.autocast(device_type=loaded.device.type, dtype=PRECISIONS[loaded.precision],
                          enabled=loaded.precision != "fp32")


def resolve_model_name(name: str, note: Callable[[str], None] | None = None) -> str:
    """The timm name for `name`: the demo alias, a folder saved in timm's format, or a timm/hub name (a name
    for another library, `hf:...` or `open_clip:...`, as it is).

    A name as timm users type it is completed (`deit_small` -> `deit_small_patch16_224`, see
    `atm_cli.model_names`), and the completion told to `note`.
    """
    if name == DEMO_MODEL_ALIAS:
        return DEMO_MODEL_NAME
    if name.startswith(MODEL_SOURCES) or is_other_library(name):
        return name
    path = Path(name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"model folder {name} has no config.json (timm's format, as written by timm's save_for_hf)")
        return f"local-dir:{path.resolve()}"
    if path.exists() or any(separator in name for separator in ("/", "\\")):
        raise UsageError(f"{param('model')} {name}: give a timm model name or a timm model folder; "
                         f"for a weights file use {param('model')} NAME {param('checkpoint')} FILE")
    name = complete_model_name(name, timm.list_models(), note)
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
        raise RunError(f"the weights of {timm_name} are missing: {cfg.file} (a broken install? {param('no_pretrained')} "
                       "runs with random weights)")


def _downloads_from_hub(timm_name: str, pretrained: bool) -> bool:
    """Whether timm.create_model(timm_name, pretrained) downloads from the Hugging Face hub."""
    if timm_name.startswith(MODEL_SOURCES):
        return timm_name.startswith("hf-hub:")  # its config comes from the hub, weights or not
    cfg = get_pretrained_cfg(timm_name)
    return pretrained and cfg is not None and bool(cfg.hf_hub_id)


@functools.cache
def _reachable(url: str) -> bool:
    """One TCP connection to the host of `url` within HUB_TIMEOUT_S (asked once per process)."""
    address = urlparse(url)
    try:
        socket.create_connection((address.hostname, address.port or (443 if address.scheme == "https" else 80)),
                                 timeout=HUB_TIMEOUT_S).close()
    except OSError:
        return False
    return True


def _hub_offline_unless_reachable() -> None:
    """Offline, the hub retries a download for most of a minute before it gives up; in its offline mode
    (as HF_HUB_OFFLINE=1 sets it) it uses its cache or fails at once. So: that mode when the hub is out of reach."""
    if not hub_constants.HF_HUB_OFFLINE and not _reachable(hub_constants.ENDPOINT):
        hub_constants.HF_HUB_OFFLINE = True


def _read_checkpoint(path: Path, unsafe: bool) -> dict:
    """The state dict in a checkpoint file, unwrapped by timm (the first of `state_dict_ema`, `model_ema`,
    `state_dict`, `model`).

    Only tensors and plain containers are unpickled unless `unsafe`: a file that pickles other objects
    (older training scripts save their arguments) is refused, since unpickling them runs code from the file.
    """
    try:
        state = load_state_dict(str(path), weights_only=not unsafe)
    except Exception as error:  # torch, pickle, zipfile and safetensors raise many kinds; all mean "cannot read"
        torch_file = _is_torch_file(path)
        kept = _pickled_objects(path) if torch_file and not unsafe else None
        if kept is not None:
            raise UsageError(f"checkpoint {path} pickles more than weights{kept}; unpickling it runs code from "
                             f"the file: {param('unsafe_checkpoint')} loads it, if you trust the file") from None
        # torch's own message about any other file would suggest weights_only=False, which cannot help.
        why = f": {first_line(error)}" if torch_file or path.suffix == ".safetensors" else ""
        raise UsageError(f"{path} is not a checkpoint (a .safetensors file or a state dict saved by torch.save)"
                         f"{why}") from None
    if not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise UsageError(f"{path} is not a checkpoint: its keys {', '.join(map(str, list(state)[:SHOWN_KEYS]))} "
                         "hold more than tensors")
    return state


def _is_torch_file(path: Path) -> bool:
    """Written by torch.save: a zip archive, or the legacy format's pickled magic number first."""
    with path.open("rb") as f:
        head = f.read(len(LEGACY_TORCH_HEAD))
    return head == LEGACY_TORCH_HEAD or zipfile.is_zipfile(path)


def _pickled_objects(path: Path) -> str | None:
    """What a torch file pickles besides weights, as ' (a, b)' ('' where the legacy format cannot tell);
    None when it pickles nothing more (it failed to load for another reason)."""
    if not zipfile.is_zipfile(path):
        return ""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # a damaged archive: not a question of trust
        return None
    return f" ({', '.join(names)})" if names else None


def _load_fitting(model: nn.Module, state: dict, path: Path, timm_name: str) -> None:
    """Load `state` into `model`; a checkpoint of another architecture fails naming its first differences."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    reshaped = [f"{key} {tuple(state[key].shape)} in the file, {tuple(value.shape)} in the model"
                for key, value in expected.items() if key in state and state[key].shape != value.shape]
    differences = [f"{kind} {', '.join(keys[:SHOWN_KEYS])}" + (f" (of {len(keys)})" if len(keys) > SHOWN_KEYS else "")
                   for kind, keys in (("missing", missing), ("unexpected", unexpected), ("shapes differ:", reshaped))
                   if keys]
    if differences:
        raise RunError(f"checkpoint {path} does not fit {timm_name}: {'; '.join(differences)}")
    model.load_state_dict(state)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_model(name: str = DEMO_MODEL_ALIAS, checkpoint: str | Path | None = None, pretrained: bool = True,
               device: str = "auto", precision: str = "fp32", unsafe_checkpoint: bool = False,
               compile: str = "off") -> LoadedModel:
    """Create `name` with timm, load its weights (hub, bundled file or `checkpoint`), move it to `device`;
    `hf:FOLDER`/`hf:HUB_ID` and `open_clip:ARCH[:TAG]` load from those libraries (`other_libraries`).

    `precision` is the autocast dtype its forward passes will run in (the engine's own scores and
    merges stay float32 whatever it is). `unsafe_checkpoint` allows a checkpoint that pickles more
    than weights: unpickling it runs code from the file. `compile` (auto, on, off): whether its forward
    passes run through torch.compile (`resolve_compile`).
    """
    target = resolve_device(device)
    precision = resolve_precision(precision, target)
    compiled = resolve_compile(compile, target)
    if checkpoint is not None:
        if not pretrained:
            raise UsageError(f"{param('checkpoint')} loads weights; it contradicts {param('no_pretrained')} (random weights)")
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise UsageError(f"checkpoint {checkpoint} does not exist")
    if is_other_library(name):
        other = load_other_library(name, checkpoint, pretrained)
        weights = checkpoint or other.weights
        loaded = LoadedModel(model=other.model.to(target), name=other.name, tag=None, num_classes=other.num_classes,
                             data_config=other.data_config,
                             checkpoint_sha256=_sha256(weights) if weights is not None else None, device=target,
                             precision=precision, compiled=compiled, compile_data_dependent=compile == "on",
                             label_names=other.label_names)
        _count_unmerged_cost(loaded)
        return loaded
    timm_name = resolve_model_name(name)
    state = None if checkpoint is None else _read_checkpoint(checkpoint, unsafe_checkpoint)
    fetch = pretrained and checkpoint is None  # a local checkpoint replaces pretrained weights
    if fetch:
        _check_bundled_weights(timm_name)
    if _downloads_from_hub(timm_name, fetch):
        _hub_offline_unless_reachable()
    try:
        model = timm.create_model(timm_name, pretrained=fetch)
    except Exception as error:  # timm, safetensors, torch and the hub raise many kinds; all mean "cannot load"
        if fetch:
            raise RunError(f"could not load pretrained weights for {timm_name}: {first_line(error)} "
                           f"(offline? use {param('checkpoint')} FILE or {param('no_pretrained')})") from None
        raise RunError(f"could not create {timm_name}: {first_line(error)}") from None
    if state is not None:
        _load_fitting(model, state, checkpoint, timm_name)
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
        label_names=tuple(cfg.get("label_names") or ()),
        data_config=resolve_model_data_config(model),
        checkpoint_sha256=checkpoint_sha256,
        device=target,
        precision=precision,
        compiled=compiled,
        compile_data_dependent=compile == "on",
    )
    _count_unmerged_cost(loaded)
    return loaded


def require_timm(loaded: LoadedModel, needs: str) -> None:
    """UsageError unless `loaded` is a timm model: `needs` says what reads timm's own methods."""
    if is_other_library(loaded.name):
        raise UsageError(f"{needs} needs a timm model; {loaded.name} is from another library")


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
    loaded.num_prefix_tokens = trace.geometry.num_prefix
