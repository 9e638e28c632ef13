"""Presets: a merging setting in a YAML file, with the model, batch size and data it was measured on.

A preset records enough to re-check it: `atm eval --preset P` on the same images and batch size
gives the same GFLOPs and top-1 (r is batch-adaptive, so GFLOPs depend on the batch size).
Bundled presets live in the repository's `presets/` folder (`atm_cli/bundled_presets` once installed).
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .engine import METHODS, MethodConfig, method_config
from .errors import UsageError, param
from .files import write_atomically
from .model_names import DEMO_MODEL_ALIAS, DEMO_MODEL_NAME

if TYPE_CHECKING:
    from .evaluation.outcomes import Comparison

SCHEMA_VERSION = 1


@dataclass
class ModelInfo:
    name: str  # timm architecture name, without the pretrained tag
    tag: str | None = None
    num_classes: int | None = None
    checkpoint_sha256: str | None = None  # of a local checkpoint file, when one was used


@dataclass
class Measured:
    """What the preset gave when it was made (accuracies in percent, GFLOPs per image)."""

    gflops: float
    top1: float | None = None
    top5: float | None = None
    baseline_top1: float | None = None
    baseline_gflops: float | None = None
    n_images: int | None = None
    data: str | None = None  # where the images came from
    data_limit: int | None = None  # the class-balanced --limit subset, if one was used
    data_fingerprint: str | None = None  # paths, sizes and class mapping of those images
    agreement: float | None = None  # percent of images keeping the unmerged model's top-1 class
    baseline_top5: float | None = None
    # Over the unmerged model, timed interleaved (median of rounds; the lowest and highest round) on the device,
    # precision and compile mode the provenance records, at `batch_size`: it holds there only.
    speedup: float | None = None
    speedup_spread: list[float] | None = None

    @classmethod
    def of(cls, run: Comparison, data: str, data_fingerprint: str, data_limit: int | None = None) -> Measured:
        """The section from a setting's run beside the unmerged model's on the same images."""
        return cls(gflops=run.gflops, top1=run.top1, top5=run.top5, baseline_top1=run.baseline_top1,
                   baseline_gflops=run.baseline_gflops, n_images=run.n_images, data=data, data_limit=data_limit,
                   data_fingerprint=data_fingerprint, agreement=run.agreement, baseline_top5=run.baseline_top5)


@dataclass
class Provenance:
    source: str  # e.g. "paper Table A2" or "atm calibrate"
    date: str | None = None
    atm_version: str | None = None
    torch_version: str | None = None
    timm_version: str | None = None
    optuna_version: str | None = None
    trials: int | None = None
    seed: int | None = None
    target: str | None = None  # the goal in words, e.g. "max top-1 subject to GFLOPs <= 0.85"
    goal: str | None = None  # the goal's key (`Goal.key`, e.g. "gflops-0.85", "no-drop"): what code identifies it by
    tuning_data: str | None = None  # when the preset was tuned on other images than `measured`
    tuning_data_fingerprint: str | None = None
    tuning_top1: float | None = None
    tuning_gflops: float | None = None
    device_type: str | None = None  # where it was measured: "cpu" or "cuda"
    device: str | None = None  # the device's name, where a speed was measured (GPU model; CPU model and threads)
    compiled: bool | None = None  # whether that speed was measured with torch.compile
    precision: str | None = None  # the autocast dtype it was measured at: fp32, bf16 or fp16 (None: fp32)
    search_space: dict[str, Any] | None = None  # the ranges searched and where they came from


@dataclass
class Preset:
    method_name: str = field(metadata={"yaml": "method"})  # a name in the engine's method registry
    params: dict[str, Any]
    model: ModelInfo
    batch_size: int
    measured: Measured
    provenance: Provenance
    description: str | None = None
    default: bool = False  # the bundled preset `atm eval` uses for this model when given no method
    schema_version: int = SCHEMA_VERSION
    # Where it was loaded from or saved to; not part of the file.
    path: Path | None = field(default=None, compare=False, metadata={"yaml": None})

    @property
    def name(self) -> str | None:
        return self.path.stem if self.path is not None else None

    @property
    def method(self) -> MethodConfig:
        """The engine configuration this preset applies (the params were validated when it was read)."""
        return method_config(self.method_name, self.params)

    def to_dict(self) -> dict[str, Any]:
        """The YAML document: what it is first, then what it was measured on and how it was made."""
        return {
            "schema_version": self.schema_version,
            "description": self.description,
            "default": self.default,
            "method": self.method_name,
            "params": dict(self.params),
            "model": dataclasses.asdict(self.model),
            "batch_size": self.batch_size,
            "measured": _written(self.measured),
            "provenance": _written(self.provenance),
        }


# Keys added to schema version 1 later: written only when they have a value, so older files read back unchanged.
LATER_KEYS = frozenset({"agreement", "baseline_top5", "search_space", "speedup", "speedup_spread", "device",
                        "compiled", "goal"})


def _written(section: Any) -> dict[str, Any]:
    return {key: value for key, value in dataclasses.asdict(section).items() if value is not None or key not in LATER_KEYS}


def canonical_model_name(name: str) -> str:
    """The timm architecture a model name refers to: the alias resolved, the pretrained tag dropped."""
    name = DEMO_MODEL_NAME if name == DEMO_MODEL_ALIAS else name
    return name.split(".", 1)[0] if not name.startswith("hf-hub:") else name


def library_versions() -> dict[str, str | None]:
    """The versions a preset's provenance records (None for a library that is not installed)."""
    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None
    return {f"{key}_version": version(dist) for key, dist in
            (("atm", "atm-cli"), ("torch", "torch"), ("timm", "timm"), ("optuna", "optuna"))}


def build_preset(method: MethodConfig, model: ModelInfo, batch_size: int, measured: Measured,
                 source: str = "atm calibrate", description: str | None = None, default: bool = False,
                 **provenance: Any) -> Preset:
    """A preset for an engine config, with this machine's library versions and today's date."""
    stamp = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), **library_versions()}
    return Preset(method_name=method.NAME, params=method.to_params(), model=model, batch_size=batch_size, measured=measured,
                  provenance=Provenance(source=source, **{**stamp, **provenance}),
                  description=description, default=default)


def save_preset(preset: Preset, path: str | Path) -> Path:
    """Write the preset as YAML atomically: a temporary file in the same folder, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(preset.to_dict(), sort_keys=False, allow_unicode=True, width=120)
    write_atomically(path, text)
    preset.path = path
    return path


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last, silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                continue  # the safe loader refuses it below
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (line {key_node.start_mark.line + 1})", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_preset(path: str | Path, model_name: str | None = None, force: bool = False,
                checkpoint_sha256: str | None = None) -> Preset:
    """Read and validate a preset file; refuse one made for another model (or checkpoint) unless `force`."""
    path = Path(path)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except OSError as exc:
        raise UsageError(f"cannot read preset {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"preset {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    preset = preset_from_dict(data, where=str(path))
    preset.path = path
    if not force:
        check_preset_fits(preset, model_name, checkpoint_sha256)
    return preset


def check_preset_fits(preset: Preset, model_name: str | None, checkpoint_sha256: str | None = None) -> None:
    label = preset.path or "the preset"
    if model_name is not None and canonical_model_name(model_name) != canonical_model_name(preset.model.name):
        raise UsageError(f"{label} was made for {preset.model.name}, not {canonical_model_name(model_name)} "
                         f"({param('force')} applies it anyway)")
    if not _fits_checkpoint(preset, checkpoint_sha256):
        theirs = preset.model.checkpoint_sha256
        raise UsageError(f"{label} was made for checkpoint sha256 {theirs[:12]}..., this one is "
                         f"{checkpoint_sha256[:12]}... ({param('force')} applies it anyway)")


def _fits_checkpoint(preset: Preset, checkpoint_sha256: str | None) -> bool:
    """Made for these weights, or one of the two hashes is unknown (hub weights, paper settings)."""
    return checkpoint_sha256 is None or preset.model.checkpoint_sha256 in (None, checkpoint_sha256)


def preset_from_dict(data: Any, where: str = "preset") -> Preset:
    """Validate a parsed YAML document against the schema and build the Preset."""
    if not isinstance(data, dict):
        raise UsageError(f"{where}: a preset is a YAML mapping, got {type(data).__name__}")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise UsageError(f"{where}: unknown schema_version {version!r} (this atm reads version {SCHEMA_VERSION})")
    preset = _build(Preset, data, where)
    if preset.method_name not in METHODS:
        raise UsageError(f"{where}: method must be one of {', '.join(METHODS)}, got {preset.method_name!r}")
    try:
        method_config(preset.method_name, preset.params)
    except ValueError as error:
        raise UsageError(f"{where}: params: {error}") from None
    if preset.batch_size < 1:
        raise UsageError(f"{where}: batch_size must be at least 1, got {preset.batch_size}")
    return preset


def _yaml_fields(cls: type) -> dict[str, dataclasses.Field]:
    """The dataclass's fields by their YAML key (a field's metadata may rename it, or leave it out: None)."""
    fields = {f.metadata.get("yaml", f.name): f for f in dataclasses.fields(cls)}
    fields.pop(None, None)
    return fields


def _build(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping: no unknown keys, every required key, every value its type."""
    if not isinstance(data, dict):
        raise UsageError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = _yaml_fields(cls)
    unknown = [key for key in data if key not in fields]
    if unknown:
        raise UsageError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(fields)})")
    values = {}
    for key, spec in fields.items():
        if key not in data:
            if spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
                raise UsageError(f"{where}: missing key {key!r}")
            continue
        hint = hints[spec.name]
        if dataclasses.is_dataclass(hint):
            values[spec.name] = _build(hint, data[key], f"{where}.{key}")
        else:
            values[spec.name] = _check_type(data[key], hint, f"{where}.{key}")
    return cls(**values)


def _check_type(value: Any, hint: Any, where: str) -> Any:
    if not _matches(value, hint):
        raise UsageError(f"{where} must be {_describe(hint)}, got {value!r}")
    return float(value) if hint is float else value


def _matches(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, option) for option in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(option) for option in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    return {float: "a number", int: "an integer", str: "a string", bool: "true or false",
            type(None): "null", dict: "a mapping"}.get(hint, getattr(hint, "__name__", str(hint)))


def bundled_presets_dir() -> Path | None:
    """The presets that ship with atm: inside the installed package, or `presets/` of a source checkout."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "bundled_presets", package.parent / "presets"):
        if candidate.is_dir():
            return candidate
    return None


def list_presets(model_name: str | None = None, checkpoint_sha256: str | None = None) -> list[Preset]:
    """Every bundled preset, sorted by model, then GFLOPs: for one model when `model_name` is given,
    and only those that fit its weights when `checkpoint_sha256` is given too."""
    folder = bundled_presets_dir()
    if folder is None:
        return []
    presets = [load_preset(path, force=True) for path in sorted(folder.glob("*.yaml"))]
    if model_name is not None:
        wanted = canonical_model_name(model_name)
        presets = [p for p in presets if canonical_model_name(p.model.name) == wanted and
                   _fits_checkpoint(p, checkpoint_sha256)]
    return sorted(presets, key=lambda p: (p.model.name, -p.measured.gflops, p.name))


def find_preset(name_or_path: str | Path, model_name: str | None = None, force: bool = False,
                checkpoint_sha256: str | None = None) -> Preset:
    """A preset by file path, or by the name of a bundled one (its file name without .yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return load_preset(path, model_name, force, checkpoint_sha256)
    folder = bundled_presets_dir()
    bundled = {p.stem: p for p in folder.glob("*.yaml")} if folder is not None else {}
    stem = path.name[:-5] if path.name.endswith(".yaml") else path.name
    if stem in bundled and path.parent == Path("."):
        return load_preset(bundled[stem], model_name, force, checkpoint_sha256)
    close = difflib.get_close_matches(stem, list(bundled), n=3)
    hint = f" (close: {', '.join(close)})" if close else " (`atm presets list` shows the bundled ones)"
    raise UsageError(f"no preset file or bundled preset named {str(name_or_path)!r}{hint}")


def default_preset_for(model_name: str, checkpoint_sha256: str | None = None) -> Preset | None:
    """The bundled preset marked default for this model, if there is one that fits these weights.

    Other weights of the same architecture (a retrained checkpoint) fall back to no default: a
    setting calibrated on one set of weights says little about another's.
    """
    defaults = [p for p in list_presets(model_name, checkpoint_sha256) if p.default]
    return defaults[0] if defaults else None
