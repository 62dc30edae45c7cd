"""Charts drawn on the server as inline SVG: no script, no chart library, no network access.

Only presentation attributes are used (fill, stroke), never `style`, so the portal's
Content-Security-Policy (no inline style) holds. Every text is escaped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

from markupsafe import Markup, escape

WIDTH = 760
HEIGHT = 220
# Room for the widest value label ("1023.5 MiB" at 11 px) and the legend above the plot.
_LEFT, _RIGHT, _TOP, _BOTTOM = 78, 12, 22, 28
_AXIS = "#5f6b7a"
_GRID = "#d9dee5"


def human_count(value: float) -> str:
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.1f}".rstrip("0").rstrip(".") + suffix
    return f"{value:g}"


def human_bytes(value: float) -> str:
    for limit, suffix in ((1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if abs(value) >= limit:
            return f"{value / limit:.1f} {suffix}"
    return f"{int(value)} B"


def nice_ceiling(value: float) -> float:
    """The smallest 1, 2, 2.5 or 5 times a power of ten that is >= value (axis tops)."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for factor in (1, 2, 2.5, 5, 10):
        if factor * power >= value:
            return factor * power
    return 10 * power


def time_label(epoch: int, span: float) -> str:
    moment = time.gmtime(epoch)
    if span <= 86400:
        return time.strftime("%H:%M", moment)
    if span <= 8 * 86400:
        return time.strftime("%a %H:%M", moment)
    return time.strftime("%m-%d", moment)


def stacked_bars(
    starts: Sequence[int],
    series: Sequence[tuple[str, str, Sequence[float]]],
    *,
    step: int,
    title: str,
    value_format: Callable[[float], str] = human_count,
    width: int = WIDTH,
    height: int = HEIGHT,
) -> Markup:
    """A stacked bar chart over time: `series` is (name, colour, one value per start)."""
    count = len(starts)
    plot_w, plot_h = width - _LEFT - _RIGHT, height - _TOP - _BOTTOM
    totals = [sum(values[i] for _n, _c, values in series) for i in range(count)]
    top = nice_ceiling(max(totals, default=0))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
    ]
    for i in range(5):  # grid lines and value labels
        value = top * i / 4
        y = _TOP + plot_h - plot_h * i / 4
        parts.append(f'<line x1="{_LEFT}" y1="{y:.1f}" x2="{width - _RIGHT}" y2="{y:.1f}" stroke="{_GRID}"/>')
        parts.append(f'<text x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11" '
                     f'fill="{_AXIS}">{escape(value_format(value))}</text>')
    slot = plot_w / count if count else plot_w
    bar = max(1.0, slot * 0.8)
    span = (starts[-1] - starts[0] + step) if count else 0
    for i, start in enumerate(starts):
        x = _LEFT + i * slot + (slot - bar) / 2
        base = _TOP + plot_h
        tip = [time_label(start, span)]
        for name, colour, values in series:
            value = values[i]
            tip.append(f"{name}: {value_format(value)}")
            if value <= 0:
                continue
            h = plot_h * value / top
            base -= h
            parts.append(f'<rect x="{x:.1f}" y="{base:.1f}" width="{bar:.1f}" height="{h:.1f}" fill="{colour}">'
                         f"<title>{escape(', '.join(tip))}</title></rect>")
    labels = min(count, 7)
    for j in range(labels):
        i = round(j * (count - 1) / max(labels - 1, 1))
        x = _LEFT + i * slot + slot / 2
        # The first and last labels are anchored at their ends so they stay inside the chart.
        anchor = "start" if labels > 1 and j == 0 else "end" if labels > 1 and j == labels - 1 else "middle"
        if anchor == "start":
            x = max(x - slot / 2, 0)
        elif anchor == "end":
            x = min(x + slot / 2, width)
        parts.append(f'<text x="{x:.1f}" y="{height - 8}" text-anchor="{anchor}" font-size="11" '
                     f'fill="{_AXIS}">{escape(time_label(starts[i], span))}</text>')
    parts.append(f'<line x1="{_LEFT}" y1="{_TOP + plot_h}" x2="{width - _RIGHT}" y2="{_TOP + plot_h}" '
                 f'stroke="{_AXIS}"/>')
    legend_x = _LEFT
    for name, colour, _values in series:
        # Below the top edge by the font's ascent: the legend's letters stay inside the chart.
        parts.append(f'<rect x="{legend_x}" y="3" width="10" height="10" fill="{colour}"/>')
        parts.append(f'<text x="{legend_x + 14}" y="12" font-size="11" fill="{_AXIS}">{escape(name)}</text>')
        legend_x += 14 + 8 * len(name) + 16
    parts.append("</svg>")
    return Markup("".join(parts))


def share_bar(parts: Sequence[tuple[str, str, float]], *, width: int = WIDTH, height: int = 24) -> Markup:
    """One horizontal bar split into shares (allowed against blocked)."""
    total = sum(value for _n, _c, value in parts)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {width} {height}" width="{width}" '
           f'height="{height}" role="img" aria-label="shares">']
    x = 0.0
    for name, colour, value in parts:
        if total <= 0 or value <= 0:
            continue
        w = width * value / total
        out.append(f'<rect x="{x:.1f}" y="0" width="{w:.1f}" height="{height}" fill="{colour}">'
                   f"<title>{escape(name)}: {escape(human_count(value))} ({100 * value / total:.1f} %)</title></rect>")
        x += w
    if total <= 0:
        out.append(f'<rect x="0" y="0" width="{width}" height="{height}" fill="{_GRID}"/>')
    out.append("</svg>")
    return Markup("".join(out))


__all__ = ["human_bytes", "human_count", "nice_ceiling", "share_bar", "stacked_bars", "time_label"]
