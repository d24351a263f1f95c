"""The audit's self-contained HTML report: verdict first, then each check against its threshold.

Built on `verifier.reports.html`: per-class mean maps side by side, histograms of the measures
(candidate vs reference against reference vs itself) and overlays of the most-disagreeing images.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

import verifier.reports.html as h
from verifier.audit.result import AuditResult, Check
from verifier.scoring.measures import measure_direction

__all__ = ["render_html", "write_html", "overlay_rgb"]


def render_html(result: AuditResult) -> str:
    """The complete HTML document for an audit result."""
    level = "ok" if result.passed else "alert"
    headline = f"Audit verdict: {result.verdict}"
    details = result.reasons or [f"every deciding check passed on {result.n_images} labelled images"]
    details = list(details) + [f"reported, not deciding: {w}" for w in result.warnings]
    parts = [h.banner(level, headline, details), _checks_table(result.checks)]
    ev = result.evidence
    if ev is not None:
        if ev.patterns is not None:
            parts.append(_patterns(result))
        if ev.swaps is not None:
            parts.append(_swaps(result))
        parts += [_class_maps(result), _histograms(result), _worst(result)]
    parts.append(_models(result))
    return h.page("Model audit", *parts,
                  subtitle=f"candidate {result.candidate.get('model')} against reference "
                           f"{result.reference.get('model')}; {result.n_images} images, "
                           f"thresholds at the reference's own {100 * result.quantile:g}% level")


def overlay_rgb(pixels: np.ndarray, heat: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    """(H, W, 3) uint8: gray image `pixels` in [0, 1] with `heat` (any size, max 1) laid over
    it in `color`, opacity proportional to the heat (bilinear upsampling to H x W)."""
    from reference_maps.canonical import resize_maps

    hh, ww = pixels.shape
    up = np.clip(resize_maps(np.nan_to_num(heat)[None].astype(np.float32), (hh, ww))[0], 0, 1)
    gray = np.repeat(np.clip(pixels, 0, 1)[..., None], 3, axis=2)
    a = 0.65 * up[..., None]
    rgb = (1 - a) * gray + a * (np.asarray(color, dtype=np.float32) / 255.0)
    return (rgb * 255).round().astype(np.uint8)


def _checks_table(checks: list[Check]) -> h.Markup:
    rows, hits = [], []
    for c in checks:
        op = ">=" if c.higher_is_better else "<="
        result = {True: "pass", False: "FAIL", None: "skipped"}[c.passed]
        rows.append([c.name, result, "yes" if c.decisive else "reported", c.figure,
                     f"{op} {h.fmt(c.threshold)}", c.reason])
        hits.append(c.passed is False and c.decisive)
    table = h.table(["check", "result", "decides", "figure", "threshold", "reason"], rows,
                    highlight=hits)
    sub = [_measure_table(c) for c in checks if "measures" in c.details]
    return h.section("Checks", table, *sub,
                     note="The verdict rests on the checks marked 'yes'; the others are "
                          "reported for a person to weigh (see docs/audit.md for every threshold).")


def _measure_table(c: Check) -> h.Markup:
    rows = [[m, v["figure"], v["threshold"], v.get("median"), v["passed"]]
            for m, v in c.details["measures"].items()]
    return h.table(["measure", "share of images beyond the reference's own level",
                    "allowed share", "median value", "passed"], rows, caption=c.name,
                   highlight=[not r[-1] for r in rows])


def _swaps(result: AuditResult) -> h.Markup:
    sw = result.evidence.swaps if result.evidence is not None else None
    assert sw is not None
    cards = []
    for j in range(len(sw.labels)):
        px, swapped = sw.pixels[j], sw.swapped[j]
        up = max(1, 112 // max(px.shape))
        cells = sw.cells[j].astype(np.float32)
        cand = np.maximum(sw.cand_reliance[j], 0)
        ref = np.maximum(sw.ref_reliance[j], 0)
        scale = max(float(cand.max()), float(ref.max()), 1e-9)
        pics = [h.img(h.png_data_uri(overlay_rgb(px, np.zeros_like(cells), (0, 0, 0)), upscale=up),
                      "image"),
                h.img(h.png_data_uri(overlay_rgb(swapped, 0.5 * cells, (213, 94, 0)), upscale=up),
                      "regions swapped in from another class (orange)"),
                h.img(h.png_data_uri(overlay_rgb(px, cand / scale, (213, 94, 0)), upscale=up),
                      "where the candidate relies"),
                h.img(h.png_data_uri(overlay_rgb(px, ref / scale, (0, 114, 178)), upscale=up),
                      "where the reference relies")]
        label, toward = result.classes[int(sw.labels[j])], result.classes[int(sw.toward[j])]
        cards.append(_card(sw.sources[j], pics,
            f"class {label}; with regions of a class-{toward} image swapped in, the candidate's "
            f"P({toward}) moves by {100 * sw.shift_cand[j]:+.0f} points, the reference's by "
            f"{100 * sw.shift_ref[j]:+.0f}"))
    return h.section("Where the candidate's decisions come from", _grid(cards),
                     note="The images where the candidate moved most toward another class when "
                          "the regions the reference model does not use were taken from an image "
                          "of that class. Left to right: the image; the swapped regions (orange); "
                          "where the candidate relies (orange: drop of its probability of the "
                          "true class when that region is swapped); where the reference relies "
                          "(blue), on the same scale.")


def _card(title: str, pics: list, note: str) -> h.Markup:
    """One picture card: a title, the pictures side by side, a note under them."""
    return h.Markup('<div class="card">{}<br>{}<div class="note">{}</div></div>').format(
        title, h.Markup(" ").join(pics), note)


def _grid(cards: list) -> h.Markup:
    return h.Markup('<div class="grid">{}</div>').format(h.Markup("").join(cards))


def _patterns(result: AuditResult) -> h.Markup:
    pe = result.evidence.patterns if result.evidence is not None else None
    assert pe is not None
    up = max(1, 112 // max(pe.mask.shape))
    where = h.img(h.png_data_uri(overlay_rgb(np.zeros_like(pe.mask), pe.mask, (213, 94, 0)),
                                 upscale=up), "pixels whose value the label fixes (orange)")
    cards = [h.Markup('<div class="card">label-coded pattern<br>{}</div>').format(where)]
    for j in range(len(pe.labels)):
        label, toward = result.classes[int(pe.labels[j])], result.classes[int(pe.toward[j])]
        pics = [h.img(h.png_data_uri(overlay_rgb(pe.pixels[j], np.zeros_like(pe.mask), (0, 0, 0)),
                                     upscale=up), "image"),
                h.img(h.png_data_uri(overlay_rgb(pe.changed[j], 0.6 * pe.mask, (213, 94, 0)),
                                     upscale=up), f"with the class-{toward} pattern")]
        cards.append(_card(pe.sources[j], pics,
            f"class {label}; given other classes' patterns (shown: class {toward}'s), the "
            f"candidate's log-odds of the pattern's class over the other wrong classes rise by "
            f"{pe.pull_cand[j]:+.2f} on average, the reference's by {pe.pull_ref[j]:+.2f}"))
    return h.section("A pattern in the images that gives the label away", _grid(cards),
                     note="Pixels whose value is fixed by the label across the audit images (a "
                          "marker, a border, a burnt-in label): first card. Then the images "
                          "where the candidate moved most toward another class when only those "
                          "pixels were given that class's pattern; the object is unchanged.")


def _class_maps(result: AuditResult) -> h.Markup:
    ev = result.evidence
    assert ev is not None
    cards = []
    for k, name in enumerate(result.classes):
        imgs = [h.img(h.png_data_uri(m[k], cmap="inferno", vmin=0, vmax=1, upscale=6), f"{who} {name}")
                for m, who in ((ev.store_cam, "stored reference"), (ev.ref_class_cam, "reference"),
                               (ev.cand_class_cam, "candidate"))]
        cards.append(h.Markup('<div class="card"><b>{}</b><br>{}</div>').format(
            f"class {name}", h.Markup(" ").join(imgs)))
    return h.section("Per-class mean attention maps", h.Markup('<div class="grid">{}</div>').format(
        h.Markup("").join(cards)), note="Left to right: the bundle's stored class reference, the "
                                        "reference model's mean map on the audit images, the "
                                        "candidate's mean map (Grad-CAM of the true class).")


def _histograms(result: AuditResult) -> h.Markup:
    ev = result.evidence
    assert ev is not None
    charts = []
    for name in ev.agreement:  # every measure the bundle scores, in its order
        if name in ev.self_agreement:
            q = result.quantile if measure_direction(name) else 1 - result.quantile
            level = float(np.nanquantile(ev.self_agreement[name], q))
            charts.append(h.Markup('<div class="card">{}</div>').format(h.histogram_svg(
                {"candidate vs reference": ev.agreement[name],
                 "reference vs itself (same class)": ev.self_agreement[name]},
                x_label=name, marker=level)))
    return h.section("Distributions of the measures", h.Markup('<div class="grid">{}</div>').format(
        h.Markup("").join(charts)), note="Per image: the candidate's map against the reference "
                                         "model's map of the same image, and the reference's map "
                                         "against its map of another image of the same class. The "
                                         "dashed line is the reference's own tail level.")


def _worst(result: AuditResult) -> h.Markup:
    ev = result.evidence
    assert ev is not None
    cards = []
    for j, i in enumerate(ev.worst[:len(ev.worst_pixels)]):
        px = ev.worst_pixels[j]
        ref = overlay_rgb(px, ev.ref_cam[i], (0, 114, 178))
        cand = overlay_rgb(px, ev.cand_cam[i], (213, 94, 0))
        up = max(1, 112 // max(px.shape))
        label = result.classes[int(ev.labels[i])]
        cos = ev.agreement.get("cosine")
        note = f"class {label}, cosine {h.fmt(float(cos[i]), 3)}" if cos is not None else f"class {label}"
        cards.append(h.Markup('<div class="card">{}<br>{} {}</div>').format(
            ev.worst_sources[j] if j < len(ev.worst_sources) else f"image {i}",
            h.img(h.png_data_uri(ref, upscale=up), "reference attention"),
            h.img(h.png_data_uri(cand, upscale=up), "candidate attention")))
        cards[-1] += h.Markup('<div class="note">{}</div>').format(note)
    return h.section("Images where the candidate disagrees most", h.Markup('<div class="grid">{}</div>').format(
        h.Markup("").join(cards)), note="Blue: the reference model's Grad-CAM; orange: the "
                                        "candidate's, both for the true class.")


def _models(result: AuditResult) -> h.Markup:
    keys = sorted(set(result.reference) | set(result.candidate))
    rows = [[k, str(result.reference.get(k, "")), str(result.candidate.get(k, ""))] for k in keys]
    return h.section("Models", h.table(["", "reference", "candidate"], rows))


def write_html(result: AuditResult, path: str | Path) -> Path:
    """Write the self-contained HTML report of an audit; returns the path."""
    path = Path(path)
    path.write_text(render_html(result), encoding="utf-8")
    return path
