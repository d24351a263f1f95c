"""The service's /review page: today's decisions, the rejection rate against alpha, and the
rejected images with their attention overlays, rendered server-side from Jinja2 templates.
"""
from __future__ import annotations

import asyncio
from collections import Counter as _Tally
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from jinja2 import Environment, PackageLoader, select_autoescape
from scipy.stats import binomtest

from verifier.reports.audit import overlay_rgb
from verifier.reports.html import png_data_uri

if TYPE_CHECKING:
    from verifier.service.review import _Rejected
    from verifier.service.state import _State

__all__ = ["local_review", "own_review", "merge_review", "rejection_rate", "render_review", "latest_drift_report"]

_ENV = Environment(loader=PackageLoader("verifier.reports", "templates"), autoescape=select_autoescape(["html"]))
#: one-sided binomial p-value below which the day's rejection rate is flagged as above alpha
FLAG_P = 0.01
_COLOR = (213, 94, 0)  # the audit report's overlay orange


def local_review(st: _State, part: str = "review") -> dict[str, Any]:
    """This process's review data as plain JSON values: `part="counts"` today's tallies only,
    `"review"` also the recent decisions and the rejected images with their pictures. Runs on
    the probe thread: overlays not yet drawn need one probe pass. Rejected ids are global
    across the workers of one service (local id x workers + worker index)."""
    if part == "counts":
        day, counts = st.review.tally()
        return {"day": day.isoformat(), "counts": counts}
    day, counts, recent, rejected = st.review.snapshot()
    _draw([r for r in rejected if r.overlay is None and r.pixels is not None], st)
    n, k = (st.peers.count, st.peers.index) if st.peers is not None else (1, 0)
    return {"day": day.isoformat(), "counts": counts, "recent": [_row(t, d) for t, d in recent],
            "rejected": [_view(r, r.id * n + k) for r in rejected]}


async def own_review(st: _State, part: str = "review") -> dict[str, Any]:
    """`local_review` from the event loop: the full part runs on the probe thread."""
    if part == "counts":
        return local_review(st, part)
    return await asyncio.get_running_loop().run_in_executor(st.probe_pool, local_review, st, part)


def merge_review(parts: list[dict[str, Any] | None], recent_keep: int) -> dict[str, Any]:
    """One view of several workers' `local_review` data (None: a worker that did not answer):
    today's counts summed, the recent decisions and the rejected images newest first."""
    have = [p for p in parts if p is not None]
    day = max(p["day"] for p in have)
    counts: _Tally[str] = _Tally()
    for p in have:
        if p["day"] == day:  # a worker with nothing gated today still holds an older day's tally
            counts.update(p["counts"])
    newest = sorted((r for p in have for r in p.get("recent", ())), key=lambda r: r["at"], reverse=True)
    rejected = sorted((r for p in have for r in p.get("rejected", ())), key=lambda r: r["at"], reverse=True)
    return {"day": day, "counts": dict(counts), "recent": newest[:recent_keep], "rejected": rejected,
            "missing": len(parts) - len(have), "workers": len(parts)}


def rejection_rate(counts: dict[str, int]) -> float:
    """Rejected / readable inputs (errors are counted apart); NaN before any."""
    n = counts.get("accept", 0) + counts.get("reject", 0)
    return counts.get("reject", 0) / n if n else float("nan")


def render_review(st: _State, data: dict[str, Any], item: int | None = None) -> str | None:
    """The overview (item None) or one rejected image's page (None when no longer kept), from
    `merge_review` data."""
    drift = latest_drift_report(st.cfg.drift_report)
    common = dict(bundle_id=st.gate.bundle.bundle_id, alpha=st.gate.alpha,
                  drift=drift.name if drift else None, drift_configured=st.cfg.drift_report is not None,
                  missing=data["missing"], workers=data["workers"])
    if item is not None:
        found = [r for r in data["rejected"] if r["id"] == item]
        if not found:
            return None
        return _ENV.get_template("review_item.html").render(r=found[0], **common)
    counts = data["counts"]
    readable = counts.get("accept", 0) + counts.get("reject", 0)
    rate = counts.get("reject", 0) / readable if readable else None
    above = bool(readable and binomtest(counts.get("reject", 0), readable, st.gate.alpha,
                                        alternative="greater").pvalue < FLAG_P)
    return _ENV.get_template("review.html").render(
        day=data["day"], counts=counts, readable=readable, rate=rate, above=above,
        keep=st.cfg.review_keep, rejected=data["rejected"], recent=data["recent"], **common)


def _draw(items: list[_Rejected], st: _State) -> None:
    """Thumbnails and Grad-CAM overlays (the predicted class's map, as the gate saw it) for
    images shown for the first time: one probe pass over all of them."""
    if not items:
        return
    spec = st.gate.bundle.spec
    x = np.stack([r.pixels for r in items]).astype(np.float32)          # (n, C, H, W) normalised
    cams = st.gate.probe.run(x).cam                                       # (n, h, w)
    mean = np.asarray(spec.mean, dtype=np.float32)[None, :, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[None, :, None, None]
    gray = np.clip((x * std + mean).mean(axis=1), 0, 1)                   # (n, H, W) in [0, 1]
    up = max(1, 160 // max(gray.shape[1:]))
    for r, g, cam in zip(items, gray, cams):
        peak = float(np.nanmax(cam)) if np.isfinite(cam).any() else 0.0
        heat = cam / peak if peak > 0 else np.zeros_like(cam)
        r.thumb = png_data_uri((np.repeat(g[..., None], 3, axis=2) * 255).round().astype(np.uint8),
                               upscale=up)
        r.overlay = png_data_uri(overlay_rgb(g, heat, _COLOR), upscale=up)
        r.pixels = None  # drawn once; the pixels are no longer needed


def _view(r: _Rejected, gid: int) -> dict[str, Any]:
    d = r.decision
    return dict(id=gid, at=r.time.isoformat(), time=r.time.strftime("%H:%M:%S"), name=d.input,
                p_value=d.p_value, predicted=d.predicted_class, confidence=d.confidence, reasons=list(d.reasons),
                thumb=r.thumb, overlay=r.overlay,
                p_values=[list(kv) for kv in sorted(d.p_values.items(),
                                                    key=lambda kv: (kv[1] is None, kv[1]))],
                scores=dict(d.scores))


def _row(t: Any, d: Any) -> dict[str, Any]:
    return dict(at=t.isoformat(), time=t.strftime("%H:%M:%S"), name=d.input,
                decision="error" if d.error else d.decision,
                p_value=d.p_value, predicted=d.predicted_class, reasons=", ".join(d.reasons),
                error=d.error)


def latest_drift_report(where: Path | None) -> Path | None:
    """`where` itself when it is a file, the newest *.html in it when a folder, else None."""
    if where is None:
        return None
    if where.is_file():
        return where
    if where.is_dir():
        found = sorted(where.glob("*.html"), key=lambda p: p.stat().st_mtime)
        return found[-1] if found else None
    return None
