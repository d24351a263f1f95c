"""A small toolkit for self-contained HTML reports: page, banner, section and table from the
Jinja2 templates in templates/ (report.html, parts.html), inline charts and images here.

Everything returns `markupsafe.Markup` (already-escaped HTML) so pieces nest safely; plain
strings passed in are escaped. Images are base64 PNG data URIs and charts inline SVG: the
page has no external resource and opens offline (a hospital intranet, an e-mail attachment).
"""
from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup, escape

__all__ = ["Markup", "page", "banner", "section", "table", "fmt", "png_data_uri", "colormap", "COLORMAPS", "img",
           "line_chart_svg", "histogram_svg", "bar_chart_svg", "PALETTE"]

#: series colours, in order (colour-blind safe, Okabe-Ito)
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")

Level = Literal["ok", "alert", "warn"]

#: the report templates (templates/report.html, parts.html); autoescaped, so plain strings
#: passed in are escaped and Markup parts nest as they are
_ENV = Environment(loader=PackageLoader("verifier.reports", "templates"),
                  autoescape=select_autoescape(["html", "css"], default=True))
_PARTS = _ENV.get_template("parts.html").module



def page(title: str, *body: str, subtitle: str | None = None) -> str:
    """A complete HTML document with inline CSS (templates/report.html); `body` parts in order."""
    return _ENV.get_template("report.html").render(
        title=title, subtitle=subtitle, body=[_m(b) for b in body]) + "\n"


def banner(level: Level, headline: str, details: Sequence[str] = ()) -> Markup:
    """The verdict box that opens a report: green `ok`, red `alert`, amber `warn`."""
    return Markup(_PARTS.banner(level, headline, list(details)))


def section(title: str, *parts: str, note: str | None = None) -> Markup:
    """A titled block; `note` is a small explanatory paragraph under the title."""
    return Markup(_PARTS.section(title, [_m(p) for p in parts], note))


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], *,
          caption: str | None = None, highlight: Sequence[bool] | None = None) -> Markup:
    """An HTML table. Numbers are right-aligned and formatted by `fmt`; `highlight` marks rows."""
    view = [{"hit": bool(highlight is not None and highlight[i]),
             "cells": [{"num": True, "text": fmt(c)} if _is_num(c)
                       else {"num": False, "text": c if c is not None else ""} for c in row]}
            for i, row in enumerate(rows)]
    return Markup(_PARTS.table(list(headers), view, caption))


def fmt(v: object, digits: int = 4) -> str:
    """A number for humans: ints as is, floats to `digits` significant digits, NaN as '-'."""
    if v is None:
        return "-"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return "-" if not math.isfinite(float(v)) else f"{float(v):.{digits}g}"
    return str(v)


def png_data_uri(array: np.ndarray, *, cmap: str = "viridis", vmin: float | None = None,
                 vmax: float | None = None, upscale: int = 1) -> str:
    """`data:image/png;base64,...` of a (H, W) map through a colormap (`COLORMAPS`), or of a
    (H, W, 3|4) uint8 image as is. NaN pixels are transparent; `upscale` repeats pixels."""
    from PIL import Image

    a = np.asarray(array)
    if a.ndim == 2:
        f = a.astype(np.float64)
        lo = np.nanmin(f) if vmin is None else vmin
        hi = np.nanmax(f) if vmax is None else vmax
        norm = np.clip((f - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(f)
        rgba = colormap(np.nan_to_num(norm), cmap)
        rgba[..., 3] = np.where(np.isnan(f), 0, 255)
    elif a.ndim == 3 and a.shape[2] in (3, 4):
        rgba = np.asarray(a, dtype=np.uint8)
    else:
        raise ValueError(f"expected (H, W) or (H, W, 3|4), got shape {a.shape}")
    if upscale > 1:
        rgba = rgba.repeat(upscale, axis=0).repeat(upscale, axis=1)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgba)).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


#: matplotlib's viridis and inferno sampled at 33 evenly spaced points (RGB hex); linear
#: interpolation between them stays within 4/255 of matplotlib's 256-entry tables, so the
#: reports need no plotting library
COLORMAPS = {
    "viridis": """440154 460c5f 47186a 482273 472c7b 453681 424085 3e4989 3a528b 365a8c 32628d
        2f6a8d 2c728e 287a8e 26818e 23898d 20908c 1e988a 1e9f88 21a784 28ae7f 32b57a 3ebc73
        4dc26b 5ec961 70ce56 83d34b 97d83e addc30 c2df22 d7e219 ece41a fde724""",
    "inferno": """000003 030212 0a0723 140b36 200c4a 2e0a5a 3c0965 4a0b6a 570f6d 63146e 70196e
        7d1d6c 892269 962666 a32b61 af315b bb3754 c73e4c d14643 db4f3a e45a31 eb6527 f1721d
        f68012 f98e08 fb9d06 fbac10 fabb21 f8cb34 f4db4b f1e968 f3f689 fcfea4""",
    "gray": "000000 ffffff",
}


def colormap(values: np.ndarray, name: str = "viridis") -> np.ndarray:
    """Values in [0, 1] of any shape (...) -> uint8 RGBA (..., 4), alpha 255. Names outside
    `COLORMAPS` need matplotlib (not a dependency): its colormap registry is used then."""
    if name not in COLORMAPS:
        try:
            from matplotlib import colormaps
        except ImportError:
            raise ValueError(f"unknown colormap {name!r}; known without matplotlib: "
                             f"{sorted(COLORMAPS)}") from None
        if name not in colormaps:
            raise ValueError(f"unknown colormap {name!r}")
        return colormaps[name](np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0), bytes=True)
    anchors = np.array([[int(h[i:i + 2], 16) for i in (0, 2, 4)] for h in COLORMAPS[name].split()],
                       dtype=np.float64)
    t = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    xs = np.linspace(0.0, 1.0, len(anchors))
    rgb = np.stack([np.interp(t, xs, anchors[:, c]) for c in range(3)], axis=-1)
    return np.concatenate([np.round(rgb), np.full((*t.shape, 1), 255.0)], axis=-1).astype(np.uint8)


def img(uri: str, alt: str, width: int | None = None) -> Markup:
    """An <img> for a data URI (pixelated scaling keeps heat-map cells sharp)."""
    w = Markup(' width="{}"').format(width) if width else Markup("")
    return Markup('<img src="{}" alt="{}"{} style="image-rendering:pixelated">').format(uri, alt, w)


def line_chart_svg(x_labels: Sequence[str], series: Mapping[str, Sequence[float]], *,
                   band: tuple[Sequence[float], Sequence[float]] | None = None,
                   center: float | Sequence[float] | None = None,
                   flags: Sequence[bool] | None = None, y_label: str = "",
                   percent: bool = False, width: int = 720, height: int = 260) -> Markup:
    """Lines over categorical x (e.g. days). `band` = (lower, upper) per point, drawn shaded
    (control limits); `center` a dashed reference line; `flags` ring points out of control."""
    n = len(x_labels)
    allv = [v for s in series.values() for v in s if _finite(v)]
    if band is not None:
        allv += [v for b in band for v in b if _finite(v)]
    if center is not None:
        allv += [v for v in np.broadcast_to(center, (n,)) if _finite(v)]
    lo, hi = (min(allv), max(allv)) if allv else (0.0, 1.0)
    lo, hi = (min(lo, 0.0), hi * 1.1 if hi > 0 else 1.0)
    box = _Box(width, height, lo, hi, 0, max(n - 1, 1))
    parts = [box.axes(y_label, percent)]
    if band is not None and n:
        up = [box.pt(i, band[1][i]) for i in range(n)]
        dn = [box.pt(i, band[0][i]) for i in reversed(range(n))]
        parts.append(Markup('<polygon points="{}" fill="#9e9e9e" fill-opacity="0.25"/>').format(
            " ".join(f"{x:.1f},{y:.1f}" for x, y in up + dn)))
    if center is not None and n:
        c = np.broadcast_to(np.asarray(center, float), (n,))
        parts.append(_polyline([box.pt(i, c[i]) for i in range(n)], "#616161", dash=True))
    for k, (name, ys) in enumerate(series.items()):
        color = PALETTE[k % len(PALETTE)]
        pts = [box.pt(i, y) for i, y in enumerate(ys) if _finite(y)]
        parts.append(_polyline(pts, color))
        for i, y in enumerate(ys):
            if _finite(y):
                x0, y0 = box.pt(i, y)
                hit = flags is not None and flags[i]
                parts.append(Markup('<circle cx="{:.1f}" cy="{:.1f}" r="{}" fill="{}" stroke="{}"'
                                    ' stroke-width="2"><title>{}: {}</title></circle>').format(
                    x0, y0, 5 if hit else 3, color, "#c62828" if hit else color,
                    x_labels[i], _pct(y) if percent else fmt(y)))
    step = max(1, n // 8)
    for i in range(0, n, step):
        x0, _ = box.pt(i, lo)
        parts.append(Markup('<text x="{:.1f}" y="{}" text-anchor="middle">{}</text>').format(
            x0, height - 6, x_labels[i]))
    parts.append(_legend(list(series), width))
    return _svg(width, height, parts)


def histogram_svg(samples: Mapping[str, np.ndarray], *, bins: int = 40,
                  value_range: tuple[float, float] | None = None, x_label: str = "",
                  marker: float | None = None, width: int = 340, height: int = 200) -> Markup:
    """Overlaid density histograms (step outlines, light fill) on shared bins; `marker` draws a
    vertical line (e.g. a threshold). Empty or non-finite samples are skipped."""
    clean = {k: np.asarray(v, float)[np.isfinite(v)] for k, v in samples.items()}
    clean = {k: v for k, v in clean.items() if len(v)}
    if value_range is None:
        allv = np.concatenate(list(clean.values())) if clean else np.array([0.0, 1.0])
        lo, hi = np.quantile(allv, [0.001, 0.999]) if len(allv) > 1 else (allv[0] - 1, allv[0] + 1)
        lo, hi = (float(lo), float(hi)) if hi > lo else (float(lo) - 0.5, float(lo) + 0.5)
    else:
        lo, hi = value_range
    edges = np.linspace(lo, hi, bins + 1)
    dens = {k: np.histogram(np.clip(v, lo, hi), bins=edges, density=True)[0] for k, v in clean.items()}
    top = max((float(d.max()) for d in dens.values()), default=1.0) or 1.0
    box = _Box(width, height, 0.0, top * 1.1, lo, hi)
    parts = [box.axes("density", False)]
    for k, (name, d) in enumerate(dens.items()):
        color = PALETTE[k % len(PALETTE)]
        pts = [box.pt(edges[0], 0.0)]
        for i, h in enumerate(d):
            pts += [box.pt(edges[i], h), box.pt(edges[i + 1], h)]
        pts.append(box.pt(edges[-1], 0.0))
        parts.append(Markup('<polygon points="{}" fill="{}" fill-opacity="0.18" stroke="{}" '
                            'stroke-width="1.5"/>').format(
            " ".join(f"{x:.1f},{y:.1f}" for x, y in pts), color, color))
    if marker is not None and lo <= marker <= hi:
        (x0, y0), (_, y1) = box.pt(marker, 0.0), box.pt(marker, top * 1.1)
        parts.append(Markup('<line x1="{:.1f}" y1="{:.1f}" x2="{:.1f}" y2="{:.1f}" stroke="#c62828"'
                            ' stroke-dasharray="4 3"/>').format(x0, y0, x0, y1))
    for v in (lo, (lo + hi) / 2, hi):
        x0, _ = box.pt(v, 0.0)
        parts.append(Markup('<text x="{:.1f}" y="{}" text-anchor="middle">{}</text>').format(
            x0, height - 18, fmt(v, 3)))
    parts.append(Markup('<text x="{}" y="{}" text-anchor="middle">{}</text>').format(
        width / 2, height - 4, x_label))
    parts.append(_legend([f"{k} (n={len(v)})" for k, v in clean.items()], width))
    return _svg(width, height, parts)


def bar_chart_svg(categories: Sequence[str], series: Mapping[str, Sequence[float]], *,
                  y_label: str = "", percent: bool = False, width: int = 520,
                  height: int = 220) -> Markup:
    """Grouped vertical bars: one group per category, one bar per series."""
    vals = [float(v) for s in series.values() for v in s if _finite(v)]
    top = max(vals, default=1.0) or 1.0
    n, k = len(categories), max(len(series), 1)
    box = _Box(width, height, 0.0, top * 1.15, 0.0, float(max(n, 1)))
    parts = [box.axes(y_label, percent)]
    bw = 0.8 / k
    for j, (name, ys) in enumerate(series.items()):
        color = PALETTE[j % len(PALETTE)]
        for i, y in enumerate(ys):
            if not _finite(y):
                continue
            x0, y0 = box.pt(i + 0.1 + j * bw, y)
            x1, y1 = box.pt(i + 0.1 + (j + 1) * bw, 0.0)
            parts.append(Markup('<rect x="{:.1f}" y="{:.1f}" width="{:.1f}" height="{:.1f}" '
                                'fill="{}"><title>{} {}: {}</title></rect>').format(
                x0, y0, max(x1 - x0 - 1, 1), max(y1 - y0, 0), color, name, categories[i],
                _pct(y) if percent else fmt(y)))
    for i, c in enumerate(categories):
        x0, _ = box.pt(i + 0.5, 0.0)
        parts.append(Markup('<text x="{:.1f}" y="{}" text-anchor="middle">{}</text>').format(
            x0, height - 6, c))
    parts.append(_legend(list(series), width))
    return _svg(width, height, parts)


# -- helpers ------------------------------------------------------------------------------
class _Box:
    """Data -> pixel mapping with margins for axis labels (SVG y grows downwards)."""

    def __init__(self, w: int, h: int, ylo: float, yhi: float, xlo: float, xhi: float) -> None:
        self.w, self.h, self.l, self.r, self.t, self.b = w, h, 52, 12, 22, 30
        self.ylo, self.yhi = ylo, (yhi if yhi > ylo else ylo + 1.0)
        self.xlo, self.xhi = xlo, (xhi if xhi > xlo else xlo + 1.0)

    def pt(self, x: float, y: float) -> tuple[float, float]:
        px = self.l + (x - self.xlo) / (self.xhi - self.xlo) * (self.w - self.l - self.r)
        py = self.h - self.b - (y - self.ylo) / (self.yhi - self.ylo) * (self.h - self.t - self.b)
        return px, py

    def axes(self, y_label: str, percent: bool) -> Markup:
        out = [Markup('<rect x="{}" y="{}" width="{}" height="{}" fill="#fff" stroke="#ccc"/>').format(
            self.l, self.t, self.w - self.l - self.r, self.h - self.t - self.b)]
        for frac in (0.0, 0.5, 1.0):
            v = self.ylo + frac * (self.yhi - self.ylo)
            _, y = self.pt(self.xlo, v)
            out.append(Markup('<text x="{}" y="{:.1f}" text-anchor="end">{}</text>').format(
                self.l - 4, y + 4, _pct(v) if percent else fmt(v, 3)))
        out.append(Markup('<text x="12" y="{:.1f}" transform="rotate(-90 12 {:.1f})" '
                          'text-anchor="middle">{}</text>').format(self.h / 2, self.h / 2, y_label))
        return Markup("").join(out)


def _svg(w: int, h: int, parts: list[Markup]) -> Markup:
    return Markup('<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" '
                  'viewBox="0 0 {} {}" role="img">{}</svg>').format(
        w, h, w, h, Markup("").join(parts))


def _polyline(pts: list[tuple[float, float]], color: str, dash: bool = False) -> Markup:
    d = Markup(' stroke-dasharray="5 4"') if dash else Markup("")
    return Markup('<polyline points="{}" fill="none" stroke="{}" stroke-width="2"{}/>').format(
        " ".join(f"{x:.1f},{y:.1f}" for x, y in pts), color, d)


def _legend(names: list[str], width: int) -> Markup:
    out, x = [], 56
    for k, name in enumerate(names):
        out.append(Markup('<rect x="{}" y="6" width="10" height="10" fill="{}"/>'
                          '<text x="{}" y="15">{}</text>').format(
            x, PALETTE[k % len(PALETTE)], x + 14, name))
        x += 24 + 7 * len(name)
    return Markup("").join(out)


def _m(part: str) -> Markup:
    return part if isinstance(part, Markup) else escape(part)


def _is_num(v: object) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _finite(v: object) -> bool:
    return v is not None and math.isfinite(float(v))  # type: ignore[arg-type]


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"
