"""Pictures of a run's metrics over rounds: a text sparkline and a self-contained SVG.

Pure functions from numbers to text, so ``canopy report`` can draw in a terminal
and the flow can publish the same curves to the Prefect UI without matplotlib,
a browser or a file server: the SVG has no script, font file or external
reference, only shapes and text. A missing value (an abandoned round has no
test accuracy) is a gap, never a zero.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable, Mapping, Sequence
from xml.sax.saxutils import escape, quoteattr

BLOCKS = "▁▂▃▄▅▆▇█"
GAP = " "

# Colour-blind-safe line colours (Okabe-Ito), cycled over the series.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9")

Value = float | None


def _finite(v: Value) -> float | None:
    return v if v is not None and math.isfinite(v) else None


def _resample(values: Sequence[Value], width: int) -> list[Value]:
    """Shrink to ``width`` points, each the mean of the known values of its bucket."""
    out: list[Value] = []
    n = len(values)
    for i in range(width):
        bucket = [
            f
            for v in values[i * n // width : (i + 1) * n // width]
            if (f := _finite(v)) is not None
        ]
        out.append(sum(bucket) / len(bucket) if bucket else None)
    return out


def sparkline(
    values: Sequence[Value],
    *,
    width: int | None = None,
    lo: float | None = None,
    hi: float | None = None,
) -> str:
    """One block character per value, scaled between ``lo`` and ``hi``.

    ``lo``/``hi`` default to the smallest and largest known value; a flat series
    sits at mid height. Missing or non-finite values are spaces. With ``width``,
    a longer series is averaged down to that many characters.
    """
    points = list(values)
    if width is not None and width >= 1 and len(points) > width:
        points = _resample(points, width)
    known = [f for v in points if (f := _finite(v)) is not None]
    if not known:
        return GAP * len(points)
    low = min(known) if lo is None else lo
    high = max(known) if hi is None else hi
    chars = []
    for v in points:
        f = _finite(v)
        if f is None:
            chars.append(GAP)
        elif high <= low:
            chars.append(BLOCKS[len(BLOCKS) // 2 - 1])
        else:
            frac = min(max((f - low) / (high - low), 0.0), 1.0)
            chars.append(BLOCKS[round(frac * (len(BLOCKS) - 1))])
    return "".join(chars)


def _segments(points: Sequence[tuple[float, Value]]) -> list[list[tuple[float, float]]]:
    """Runs of consecutive known points: a missing value breaks the line."""
    runs: list[list[tuple[float, float]]] = [[]]
    for x, v in points:
        f = _finite(v)
        if f is None:
            if runs[-1]:
                runs.append([])
        else:
            runs[-1].append((x, f))
    return [run for run in runs if run]


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def line_chart_svg(
    series: Mapping[str, Sequence[Value]],
    *,
    x: Sequence[int] | None = None,
    title: str = "",
    x_label: str = "round",
    width: int = 640,
    panel_height: int = 150,
    formats: Mapping[str, Callable[[float], str]] | None = None,
) -> str:
    """Each series as its own panel (own y scale), stacked over a shared x axis.

    Accuracy and loss have unrelated scales, so they are not squeezed onto one
    axis. ``x`` gives the x value of each position (default 0, 1, 2, ...: round
    numbers); every series is as long as ``x``. ``formats`` formats the y labels
    and point tooltips of a series (default 4 significant digits).
    """
    names = list(series)
    n = max((len(v) for v in series.values()), default=0)
    xs = list(range(n)) if x is None else list(x)
    for name in names:
        if len(series[name]) != len(xs):
            raise ValueError(f"series {name!r} has {len(series[name])} values for {len(xs)} x")
    # Margins: y labels on the left, each series' name above its panel, rounds below.
    left, right, top_pad, gap, bottom = 64, 16, (28 if title else 4) + 16, 36, 34
    inset = 10  # keeps the first and last points off the panel's border
    plot_w = width - left - right
    height = top_pad + len(names) * (panel_height + gap) - gap + bottom
    x_lo, x_hi = (min(xs), max(xs)) if xs else (0, 1)

    def sx(v: float) -> float:
        span = plot_w - 2 * inset
        return left + inset + (span / 2 if x_hi == x_lo else (v - x_lo) / (x_hi - x_lo) * span)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" font-family="sans-serif" font-size="11">',
        f"<title>{escape(title or ', '.join(names))}</title>",
        f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
    ]
    if title:
        parts.append(
            f'<text x="{width / 2:.1f}" y="18" text-anchor="middle" font-size="13" '
            f'font-weight="bold">{escape(title)}</text>'
        )
    for i, name in enumerate(names):
        fmt = (formats or {}).get(name, _fmt)
        colour = PALETTE[i % len(PALETTE)]
        top = top_pad + i * (panel_height + gap)
        known = [f for v in series[name] if (f := _finite(v)) is not None]
        y_lo, y_hi = (min(known), max(known)) if known else (0.0, 1.0)
        if y_hi == y_lo:  # a flat line in the middle of its panel
            y_lo, y_hi = y_lo - 1.0, y_hi + 1.0

        def sy(v: float, top: int = top, y_lo: float = y_lo, y_hi: float = y_hi) -> float:
            return top + inset + (1 - (v - y_lo) / (y_hi - y_lo)) * (panel_height - 2 * inset)

        parts.append(
            f'<g class="panel" data-series={quoteattr(name)}>'
            f'<rect x="{left}" y="{top}" width="{plot_w}" height="{panel_height}" '
            f'fill="none" stroke="#cccccc"/>'
            f'<text x="{left}" y="{top - 5}" fill="{colour}" font-weight="bold">'
            f"{escape(name)}</text>"
        )
        if known:
            for v in (max(known), min(known)):
                parts.append(
                    f'<text x="{left - 4}" y="{sy(v) + 4:.1f}" text-anchor="end">'
                    f"{escape(fmt(v))}</text>"
                )
        for run in _segments(list(zip(xs, series[name], strict=True))):
            coords = " ".join(f"{sx(px):.1f},{sy(py):.1f}" for px, py in run)
            parts.append(
                f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="2"/>'
            )
            for px, py in run:
                parts.append(
                    f'<circle cx="{sx(px):.1f}" cy="{sy(py):.1f}" r="3" fill="{colour}">'
                    f"<title>{escape(f'{x_label} {px}: {fmt(py)}')}</title></circle>"
                )
        parts.append("</g>")
    axis_y = height - bottom + 14
    for v in _ticks(xs):
        parts.append(f'<text x="{sx(v):.1f}" y="{axis_y}" text-anchor="middle">{v}</text>')
    parts.append(
        f'<text x="{left + plot_w / 2:.1f}" y="{axis_y + 16}" text-anchor="middle">'
        f"{escape(x_label)}</text>"
    )
    parts.append("</svg>")
    return "\n".join(parts)


def _ticks(xs: Sequence[int], most: int = 10) -> list[int]:
    """At most ``most`` evenly spaced x labels, always including the first and last."""
    if len(xs) <= 1:
        return list(xs)
    k = min(most, len(xs))
    return [xs[i] for i in sorted({round(j * (len(xs) - 1) / (k - 1)) for j in range(k)})]


def svg_data_uri(svg: str) -> str:
    """The SVG as a ``data:`` URI, for an ``<img>`` or a markdown image that needs no host."""
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode()).decode()
