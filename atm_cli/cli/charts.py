"""Charts drawn in the terminal, beside a command's table."""
from __future__ import annotations

from collections.abc import Sequence

BAR_EIGHTHS = " ▏▎▍▌▋▊▉█"


def tokens_chart(tokens_per_layer: Sequence[float], thresholds: Sequence[float] | None = None,
                 full: float | None = None, width: int = 32) -> str:
    """Mean tokens entering each block as a terminal bar chart, one line a block, thresholds beside when given.

    A bar `width` characters long stands for `full` tokens (default: the most any block has).
    """
    most = full or max(tokens_per_layer) or 1.0
    lines = []
    for block, tokens in enumerate(tokens_per_layer):
        eighths = round(tokens / most * width * 8)
        bar = "█" * (eighths // 8) + (BAR_EIGHTHS[eighths % 8] if eighths % 8 else "")
        threshold = f"  θ {thresholds[block]:.3f}" if thresholds is not None else ""
        lines.append(f"block {block + 1:>2} {bar:<{width}} {tokens:6.1f}{threshold}")
    return "\n".join(lines)

