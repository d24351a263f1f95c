"""The nightly drift report as one self-contained HTML page."""
from __future__ import annotations

from datetime import datetime, timezone

import verifier.reports.html as h
from verifier.drift.report import DriftReport
from verifier.drift.summary import headline

__all__ = ["render_html"]


def render_html(report: DriftReport) -> str:
    """One self-contained page: verdict, trend, score distributions, class mix, top rejects."""
    r = report
    # the verdict box is for the person on call: a few sentences, not the test table
    top = h.banner("alert" if r.alert else "ok", headline(r), r.summary)
    facts = h.table(["day", "bundle", "decisions", "rejected", "errors", "alpha"],
                    [[r.day.isoformat(), r.bundle_id, r.n, r.sample.rejected, r.sample.errors,
                      r.alpha]])
    ordered = sorted(r.tests, key=lambda t: not t.alert)  # alerting tests first, stable
    tests = h.table(
        ["test", "statistic", "value", "p-value", "Holm level", "effect", "effect size", "floor",
         "alert"],
        [[t.name, t.statistic_name, t.statistic, t.p_value, t.threshold, t.effect_size_name,
          t.effect_size, t.effect_floor, "ALERT" if t.alert else ""] for t in ordered],
        highlight=[t.alert for t in ordered])
    why = h.Markup("<ul>{}</ul>").format(h.Markup("").join(
        h.Markup("<li>{}</li>").format(x) for x in r.reasons)) if r.reasons else ""
    labels = [p.day.isoformat()[5:] for p in r.trend]
    trend = h.line_chart_svg(
        labels, {"daily rejection rate": [p.rate for p in r.trend]},
        band=([p.lower for p in r.trend], [p.upper for p in r.trend]), center=r.alpha,
        flags=[p.out_of_control for p in r.trend], y_label="rejected", percent=True)
    trend_rows = h.table(["day", "decisions", "rejected", "rate", "lower limit", "upper limit",
                          "out of control"],
                         [[p.day.isoformat(), p.n, p.rejected, p.rate, p.lower, p.upper,
                           p.out_of_control] for p in r.trend],
                         highlight=[p.out_of_control for p in r.trend])
    by_name = {t.name: t for t in r.tests}
    cards = []
    for name in sorted(r.sample.scores):
        t = by_name.get(f"score_distribution[{name}]")
        tail = by_name.get(f"score_tail[{name}]")
        cap = f"{name}: KS p={t.p_value:.2e}, shift {t.effect_size:.2f} SD" if t else name
        cards.append(h.Markup('<div class="card">{}<br><span class="note">{}</span></div>').format(
            h.histogram_svg({"calibration": r.reference.calibration_scores[name],
                             "day": r.sample.scores[name]}, x_label=name,
                            marker=tail.detail["threshold_score"] if tail else None), cap))
    if len(r.sample.p_values):
        cards.append(h.Markup('<div class="card">{}</div>').format(h.histogram_svg(
            {"day": r.sample.p_values}, value_range=(0.0, 1.0), bins=20,
            x_label="combined p-value (uniform if in-distribution)", marker=r.alpha)))
    cal = r.reference.class_counts()
    day_counts = [r.sample.per_class.get(c, (0, 0))[0] for c in r.reference.classes]
    n_day = max(sum(day_counts), 1)
    classes = h.bar_chart_svg(list(r.reference.classes),
                              {"calibration": list(cal / max(cal.sum(), 1)),
                               "day": [c / n_day for c in day_counts]},
                              y_label="share", percent=True)
    per_class = h.table(["predicted class", "decisions", "rejected", "rejection rate"],
                        [[c, n, x, x / n] for c, (n, x) in sorted(r.sample.per_class.items())])
    rejects = h.table(["time", "input", "predicted", "p-value", "reasons", "error", "digest"],
                      [[m["time"], m["input"], m["predicted_class"], m["p_value"],
                        ", ".join(m["reasons"] or []), m["error"], (m["digest"] or "")[:12]]
                       for m in r.most_rejected])
    notes = h.section("Notes", h.Markup("<ul>{}</ul>").format(h.Markup("").join(
        h.Markup("<li>{}</li>").format(n) for n in r.notes))) if r.notes else ""
    return h.page(
        f"Drift report {r.day}", top, facts,
        h.section("Tests of the night", why, tests,
                  note=f"{len(r.tests)} tests, alerting ones first. Each p-value is compared with "
                       f"its Holm level (family-wise false-alarm rate per night <= "
                       f"{r.config.family_alpha:g}); a test alerts only when significant and its "
                       "effect size reaches the floor."),
        h.section("Rejection rate trend", trend, trend_rows,
                  note=f"Daily rejection rate over the last {r.config.trend_days} days; the shaded "
                       f"band is alpha +/- 3 binomial SD (p-chart), a red ring marks a day above it."),
        h.section("Score distributions: day vs calibration", h.Markup('<div class="grid">{}</div>')
                  .format(h.Markup("").join(cards)),
                  note="Red dashed line: the calibration tail threshold of the tail test."),
        h.section("Predicted-class frequencies", classes, per_class),
        h.section(f"Most rejected inputs (top {r.config.top_rejected} by lowest p-value)", rejects),
        notes, subtitle=f"bundle {r.bundle_id} - generated "
                        f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}")
