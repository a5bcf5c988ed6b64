"""An interactive (plotly) HTML twin of each study plot, drawn from the same figure.

The PNG plots are drawn with matplotlib; ``write_html`` reads back what a figure holds
(lines, step lines, scatter points, horizontal bars, annotations, titles and axis labels:
the artists the study's plots use) and writes it as one self-contained HTML file, with
plotly.js inside: it opens offline, from the run directory or MLflow's artifact view, with
zoom and hover values.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np


def _name(label: str) -> tuple[str | None, bool]:
    """A trace's legend name; matplotlib marks unlabelled artists with a leading ``_``."""
    return (None, False) if not label or label.startswith("_") else (label, True)


def _hex(color: Any) -> str:
    from matplotlib.colors import to_hex

    return str(to_hex(color))


def _traces(axes: Any) -> list[Any]:
    import plotly.graph_objects as go
    from matplotlib.patches import Rectangle

    traces: list[Any] = []
    for collection in axes.collections:  # scatter points
        points = np.asarray(collection.get_offsets())
        if points.size == 0:
            continue
        name, legend = _name(collection.get_label())
        colours = collection.get_facecolors()
        traces.append(
            go.Scatter(
                x=points[:, 0].tolist(),
                y=points[:, 1].tolist(),
                mode="markers",
                name=name,
                showlegend=legend,
                marker_color=_hex(colours[0]) if len(colours) else None,
            )
        )
    for line in axes.get_lines():
        name, legend = _name(line.get_label())
        marker = line.get_marker()
        traces.append(
            go.Scatter(
                x=np.asarray(line.get_xdata(), dtype=float).tolist(),
                y=np.asarray(line.get_ydata(), dtype=float).tolist(),
                mode="lines+markers" if marker not in (None, "", "None", " ") else "lines",
                line_shape="hv" if line.get_drawstyle() == "steps-post" else "linear",
                name=name,
                showlegend=legend,
                line_color=_hex(line.get_color()),
            )
        )
    bars = [p for p in axes.patches if isinstance(p, Rectangle)]
    if bars:
        ticks = {round(t.get_position()[1]): t.get_text() for t in axes.get_yticklabels()}
        centres = [round(b.get_y() + b.get_height() / 2) for b in bars]
        traces.append(
            go.Bar(
                x=[float(b.get_width()) for b in bars],
                y=[ticks.get(c, str(c)) for c in centres],
                orientation="h",
                marker_color=_hex(bars[0].get_facecolor()),
                showlegend=False,
            )
        )
    return traces


def write_html(figure: Any, path: Path) -> Path:
    """``figure``'s data as an interactive plotly page at ``path`` (written whole). plotly.js
    is inside (about 3.5 MB): MLflow's artifact view shows the page, which a script beside
    it would not reach."""
    plot = _page(figure)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    plot.write_html(partial, include_plotlyjs=True, full_html=True)
    partial.replace(path)
    return path


def _page(figure: Any) -> Any:
    """The plotly figure of a matplotlib ``figure``: one panel per axes."""
    from matplotlib.text import Annotation
    from plotly.subplots import make_subplots

    panels = figure.get_axes()
    plot = make_subplots(
        rows=1, cols=len(panels), subplot_titles=[axes.get_title() for axes in panels]
    )
    for column, axes in enumerate(panels, start=1):
        for trace in _traces(axes):
            plot.add_trace(trace, row=1, col=column)
        for text in axes.texts:
            if isinstance(text, Annotation):
                x, y = text.xy
                plot.add_annotation(
                    x=x, y=y, text=text.get_text(), showarrow=False, yshift=10, row=1, col=column
                )
        plot.update_xaxes(title_text=axes.get_xlabel(), row=1, col=column)
        plot.update_yaxes(title_text=axes.get_ylabel(), row=1, col=column)
    title = figure.get_suptitle() if hasattr(figure, "get_suptitle") else ""
    plot.update_layout(title_text=title or None, template="plotly_white")
    return plot
