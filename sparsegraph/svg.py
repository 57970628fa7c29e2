"""Small self-contained SVG charts for reports: no plotting library, no network, plain strings.

`bars` draws grouped horizontal bars (one group per label, one bar per series); `histogram` draws
counts over equal bins with optional vertical markers (thresholds); `grid` a table of coloured cells
(per layer × per head patterns); `image` a grayscale image with boxes drawn over it (RoIs); `line` one
polyline per series over its index (a loss curve). Each returns an ``<svg>`` element to embed in HTML as
is.
"""

from __future__ import annotations

import html

PALETTE = ("#4878d0", "#ee854a", "#6acc64", "#d65f5f", "#956cb4")


def bars(title: str, labels: list[str], series: dict[str, list[float]], unit: str = "") -> str:
    """Grouped horizontal bars: ``series[name][i]`` is the bar of `name` for ``labels[i]``."""
    row, label_w, plot_w = 6 + 10 * len(series), 260, 420
    height = 40 + row * len(labels) + 20 * len(series)
    top = max((v for values in series.values() for v in values), default=0) or 1
    parts = [_open(label_w + plot_w + 90, height), _text(8, 18, title, bold=True)]
    for i, label in enumerate(labels):
        y = 30 + i * row
        parts.append(_text(label_w - 6, y + row / 2 + 3, label, anchor="end", size=10))
        for j, (name, values) in enumerate(series.items()):
            w = plot_w * values[i] / top
            parts.append(f'<rect x="{label_w}" y="{y + 3 + 10 * j}" width="{w:.1f}" height="9" '
                         f'fill="{PALETTE[j % len(PALETTE)]}"><title>{html.escape(name)}: '
                         f'{values[i]:.4g}{unit}</title></rect>')
            parts.append(_text(label_w + w + 4, y + 11 + 10 * j, f"{values[i]:.3g}{unit}", size=9))
    parts += _legend(list(series), 30 + row * len(labels) + 6)
    return "".join(parts) + "</svg>"


def histogram(title: str, counts: list[int], lo: float, hi: float, markers: dict[str, float] | None = None,
              xlabel: str = "") -> str:
    """Bars over ``len(counts)`` equal bins spanning [lo, hi]; `markers` are labelled vertical lines."""
    width, height, left, bottom = 360, 170, 36, 30
    plot_w, plot_h = width - left - 10, height - bottom - 28
    top = max(counts, default=0) or 1
    step = plot_w / max(len(counts), 1)
    parts = [_open(width, height), _text(6, 14, title, bold=True, size=11)]
    for i, c in enumerate(counts):
        h = plot_h * c / top
        parts.append(f'<rect x="{left + i * step:.1f}" y="{22 + plot_h - h:.1f}" '
                     f'width="{max(step - 0.5, 0.5):.1f}" height="{h:.1f}" fill="{PALETTE[0]}"/>')
    for j, (name, value) in enumerate((markers or {}).items()):
        x = left + plot_w * (value - lo) / (hi - lo) if hi > lo else left
        if left <= x <= left + plot_w:
            color = PALETTE[(j + 1) % len(PALETTE)]
            parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="22" y2="{22 + plot_h}" stroke="{color}" '
                         'stroke-width="1.5"/>')
            parts.append(_text(x + 2, 30 + 10 * j, name, size=9, color=color))
    parts.append(_text(left, height - 8, f"{lo:g}", size=9))
    parts.append(_text(left + plot_w, height - 8, f"{hi:g}", size=9, anchor="end"))
    parts.append(_text(left + plot_w / 2, height - 8, xlabel, size=9, anchor="middle"))
    return "".join(parts) + "</svg>"


def grid(title: str, rows: list[str], cols: list[str], cells: list[list[tuple[str, str, str]]],
         legend: dict[str, str] | None = None) -> str:
    """Coloured cells: ``cells[r][c] = (colour, short text, tooltip)``; `legend` maps names to colours."""
    cell, left, top = 34, 70, 40
    width = left + cell * max(len(cols), 1) + 10
    height = top + cell * len(rows) + 30
    parts = [_open(max(width, 420), height), _text(6, 16, title, bold=True, size=11)]
    for c, name in enumerate(cols):
        parts.append(_text(left + c * cell + cell / 2, top - 6, name, anchor="middle", size=9))
    for r, name in enumerate(rows):
        parts.append(_text(left - 6, top + r * cell + cell / 2 + 3, name, anchor="end", size=9))
        for c, (colour, text, tip) in enumerate(cells[r]):
            x, y = left + c * cell, top + r * cell
            parts.append(f'<rect x="{x}" y="{y}" width="{cell - 2}" height="{cell - 2}" fill="{colour}">'
                         f"<title>{html.escape(tip)}</title></rect>")
            parts.append(_text(x + cell / 2 - 1, y + cell / 2 + 3, text, anchor="middle", size=8))
    for j, (name, colour) in enumerate((legend or {}).items()):
        parts.append(f'<rect x="{6 + 100 * j}" y="{height - 18}" width="10" height="10" fill="{colour}"/>')
        parts.append(_text(20 + 100 * j, height - 9, name, size=9))
    return "".join(parts) + "</svg>"


def image(title: str, pixels: list[list[float]], boxes: list[tuple[float, float, float, float, str]],
          scale: float = 1.0) -> str:
    """A grayscale image (values in [0, 1], rows of pixels) drawn `scale`× with labelled boxes on top;
    boxes are ``(x0, y0, x1, y1, label)`` in the image's pixel coordinates."""
    h, w = len(pixels), len(pixels[0]) if pixels else 0
    parts = [_open(w * scale + 10, h * scale + 26), _text(4, 13, title, size=10)]
    for y, row in enumerate(pixels):
        for x, v in enumerate(row):
            g = round(255 * min(max(v, 0.0), 1.0))
            parts.append(f'<rect x="{5 + x * scale:.1f}" y="{20 + y * scale:.1f}" width="{scale:.1f}" '
                         f'height="{scale:.1f}" fill="rgb({g},{g},{g})"/>')
    for j, (x0, y0, x1, y1, label) in enumerate(boxes):
        colour = PALETTE[(j + 1) % len(PALETTE)]
        parts.append(f'<rect x="{5 + x0 * scale:.1f}" y="{20 + y0 * scale:.1f}" '
                     f'width="{(x1 - x0) * scale:.1f}" height="{(y1 - y0) * scale:.1f}" fill="none" '
                     f'stroke="{colour}" stroke-width="2"/>')
        parts.append(_text(7 + x0 * scale, 30 + y0 * scale, label, size=9, color=colour))
    return "".join(parts) + "</svg>"


def scatter(title: str, points: list[tuple[float, float, str, str]], x_label: str, y_label: str,
            groups: tuple[str, ...]) -> str:
    """Points ``(x, y, label, group)`` on linear axes from 0, coloured by group (in `groups` order)."""
    plot_w, plot_h, left, top = 420, 240, 60, 34
    x_max = max((p[0] for p in points), default=0) or 1
    y_max = max((p[1] for p in points), default=0) or 1
    parts = [_open(left + plot_w + 30, top + plot_h + 60), _text(8, 18, title, bold=True),
             f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>',
             _text(left + plot_w / 2, top + plot_h + 30, x_label, anchor="middle", size=10),
             _text(left - 4, top + 8, f"{y_max:.3g}", anchor="end", size=9),
             _text(left + plot_w, top + plot_h + 14, f"{x_max:.3g}", anchor="end", size=9),
             _text(left - 4, top + plot_h, "0", anchor="end", size=9),
             _text(8, top + plot_h / 2, y_label, size=10)]
    for x, y, label, group in points:
        cx, cy = left + plot_w * x / x_max, top + plot_h * (1 - y / y_max)
        colour = PALETTE[groups.index(group) % len(PALETTE)] if group in groups else "#222"
        parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="4" fill="{colour}"><title>'
                     f'{html.escape(label)}: {group}, x {x:.4g}, y {y:.4g}</title></circle>')
    parts += _legend(list(groups), top + plot_h + 46)
    return "".join(parts) + "</svg>"


def line(title: str, series: dict[str, list[float]], x_label: str = "", y_label: str = "") -> str:
    """One polyline per series, ``series[name][i]`` at x = i, on a shared y range (from the smallest value
    to the largest); empty series are skipped."""
    plot_w, plot_h, left, top = 420, 200, 60, 34
    values = [v for ys in series.values() for v in ys]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0
    longest = max((len(ys) for ys in series.values()), default=1)
    parts = [_open(left + plot_w + 30, top + plot_h + 60), _text(8, 18, title, bold=True),
             f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>',
             _text(left + plot_w / 2, top + plot_h + 30, x_label, anchor="middle", size=10),
             _text(left - 4, top + 8, f"{hi:.3g}", anchor="end", size=9),
             _text(left - 4, top + plot_h, f"{lo:.3g}", anchor="end", size=9),
             _text(left + plot_w, top + plot_h + 14, str(longest - 1), anchor="end", size=9),
             _text(8, top + plot_h / 2, y_label, size=10)]
    for j, (name, ys) in enumerate(series.items()):
        if not ys:
            continue
        step = plot_w / max(len(ys) - 1, 1)
        points = " ".join(f"{left + i * step:.1f},{top + plot_h * (hi - y) / (hi - lo):.1f}"
                          for i, y in enumerate(ys))
        parts.append(f'<polyline points="{points}" fill="none" stroke="{PALETTE[j % len(PALETTE)]}" '
                     f'stroke-width="1.5"><title>{html.escape(name)}</title></polyline>')
    parts += _legend(list(series), top + plot_h + 46)
    return "".join(parts) + "</svg>"


def _open(width: float, height: float) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
            f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="sans-serif">')


def _text(x, y, text, *, anchor="start", size=12, bold=False, color="#222") -> str:
    weight = ' font-weight="bold"' if bold else ""
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" fill="{color}"{weight}>'
            f"{html.escape(str(text))}</text>")


def _legend(names: list[str], y: float) -> list[str]:
    out = []
    for j, name in enumerate(names):
        out.append(f'<rect x="{10 + 140 * j}" y="{y}" width="10" height="10" '
                   f'fill="{PALETTE[j % len(PALETTE)]}"/>')
        out.append(_text(24 + 140 * j, y + 9, name, size=10))
    return out
