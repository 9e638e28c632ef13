"""matplotlib, the optional `atm-cli[plot]` extra, behind one import that says how to install it."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import UsageError


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (no screen here or in CI)."""
    try:
        import matplotlib
    except ImportError as error:
        raise UsageError("plots need matplotlib: pip install 'atm-cli[plot]'") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure: Any, path: str | Path) -> Path:
    """Write `figure` as a PNG at `path` (folders created) and free it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=100)
    pyplot().close(figure)
    return path
