"""Tables and small charts for materialisation metadata, as markdown (PNG images inline), which the Dagster UI shows."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from mvdata_assets.datasets.store import Summary

Series = tuple[Sequence[float], Sequence[float]]  # x (steps), y (values)

STATUS_COLOURS = {"downloaded": "#2e7d32", "skipped": "#81c784", "failed": "#c62828"}


def _figure(width: float, height: float) -> Figure:
    # the object API, not pyplot: no global figure state in a long-lived Dagster process
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=90, layout="constrained")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]], width: int | None = None) -> str:
    def cell(value: object) -> str:
        text = str(value)
        return (text[:width] if width else text).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def markdown_image(fig: Figure, alt: str) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return f"![{alt}](data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()})"


def metric_curves(panels: dict[str, dict[str, Series]], columns: int = 2) -> Figure:
    """One panel per metric, one line per run."""
    rows = max(1, -(-len(panels) // columns))
    fig = _figure(5.0 * columns, 3.0 * rows)
    for i, (metric, runs) in enumerate(panels.items()):
        axes = fig.add_subplot(rows, columns, i + 1)
        for label, (steps, values) in runs.items():
            axes.plot(steps, values, label=label, linewidth=1.2)
        axes.set_title(metric, fontsize=10)
        axes.set_xlabel("step", fontsize=8)
        axes.tick_params(labelsize=8)
        axes.grid(alpha=0.3)
        if i == 0:
            axes.legend(fontsize=7)
    return fig


def dataset_status(summaries: Sequence[Summary]) -> Figure:
    """Files per dataset as stacked bars (downloaded / skipped / failed), the dataset's status beside each."""
    fig = _figure(8.0, 0.8 + 0.35 * len(summaries))
    axes = fig.add_subplot()
    names = [s.dataset for s in summaries]
    left = [0] * len(summaries)
    for part, colour in STATUS_COLOURS.items():
        counts = [getattr(s, part) for s in summaries]
        axes.barh(names, counts, left=left, color=colour, label=part)
        left = [a + b for a, b in zip(left, counts, strict=True)]
    for y, (s, width) in enumerate(zip(summaries, left, strict=True)):
        axes.text(width, y, f"  {s.status}", va="center", fontsize=8)
    axes.invert_yaxis()
    axes.set_xlabel("files", fontsize=8)
    axes.tick_params(labelsize=8)
    axes.margins(x=0.25)
    axes.legend(fontsize=7, loc="lower right")
    return fig
