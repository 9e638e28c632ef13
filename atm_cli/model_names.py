"""Model names as timm users type them (`deit_small` for `deit_small_patch16_224`), without importing timm.

The matching runs over any list of names: timm's registry when a model is loaded, the names the
bundled presets carry for `atm presets list --model`, which must not import timm to start fast.
"""
from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Collection

from .errors import UsageError

DEMO_MODEL_NAME = "atm_demo_vit_tiny_patch4_32"
DEMO_MODEL_ALIAS = "atm-demo"

# What separates a model family's plain member from the name typed: its patch size and input resolution
# (`deit_small` + `_patch16_224`), not a variant word (`_distilled`, `_clip`, `_dinov2`).
_SIZE_SUFFIX = re.compile(r"(_patch\d+)?(_\d+)*")
_WILDCARDS = "*?["
_SHOWN_CANDIDATES = 8


def model_name_candidates(architecture: str, known: Collection[str]) -> list[str]:
    """The names in `known` that `architecture` (no pretrained tag) may mean, the best first.

    An exact name, alone. Otherwise the names it is a prefix of: the one that differs only by patch size and
    resolution when there is exactly one, else all of them, those first; then the others timm's wildcard
    (`fnmatch`, as in `timm.list_models`) finds: the name as given when it has wildcards, else `*name*`.
    """
    if architecture in known:
        return [architecture]
    if any(char in architecture for char in _WILDCARDS):
        return sorted(fnmatch.filter(known, architecture))
    prefixed = sorted(name for name in known if name.startswith(architecture))
    plain = [name for name in prefixed if _SIZE_SUFFIX.fullmatch(name[len(architecture):])]
    if len(plain) == 1:
        return plain
    others = sorted(set(fnmatch.filter(known, f"*{architecture}*")) - set(prefixed))
    return plain + [name for name in prefixed if name not in plain] + others


def complete_model_name(name: str, known: Collection[str], note: Callable[[str], None] | None = None) -> str:
    """`name` with its architecture completed to the one name of `known` it means (the pretrained tag kept).

    A completion is told to `note` in one line (`deit_small -> deit_small_patch16_224`). `name` is returned
    unchanged when nothing matches (the caller says what is unknown); several candidates are a UsageError
    that lists them.
    """
    architecture, dot, tag = name.partition(".")
    candidates = model_name_candidates(architecture, known)
    if len(candidates) > 1:
        shown = ", ".join(candidates[:_SHOWN_CANDIDATES])
        more = f" and {len(candidates) - _SHOWN_CANDIDATES} more" if len(candidates) > _SHOWN_CANDIDATES else ""
        raise UsageError(f"model {architecture!r} could be {shown}{more}: give the full name")
    if not candidates:
        return name
    completed = f"{candidates[0]}{dot}{tag}"
    if completed != name and note is not None:
        note(f"{name} -> {completed}")
    return completed

