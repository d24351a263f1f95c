"""The drift report's verdict in a few sentences a person acts on.

What moved, by how much, in which classes, since when, and what to check; the test table
(p-values, Holm levels) stays in the report below it for whoever audits the verdict.
"""
from __future__ import annotations

from typing import Any

__all__ = ["summarize", "headline"]

#: how many scores or classes a sentence names before "+k more"
_TOP = 3
#: the kinds of shift the verdict box's title names (the sentences say the rest)
_HEADLINE = ("rejection rate up", "attention maps moved", "early features moved",
             "garbage score moved", "class mix changed")


def headline(report: Any) -> str:
    """One line for the verdict box title."""
    if not report.alert:
        return f"No alert on {report.day}"
    moved = [what for what, _ in _moved(report) if what in _HEADLINE or what.startswith("rejections in")]
    return f"ALERT: drift on {report.day}" + (": " + "; ".join(moved) if moved else "")


def summarize(report: Any) -> list[str]:
    """Plain sentences, most important first (a `DriftReport` in, strings out)."""
    out = [_rate_sentence(report)]
    for _, sentence in _moved(report):
        if sentence not in out:
            out.append(sentence)
    out.append(_since(report))
    if report.sample.errors:
        out.append(f"{report.sample.errors} inputs could not be read or probed "
                   "(counted as rejects; see the most-rejected list).")
    left_out = [n for n in report.notes if n.startswith("left out of this report")]
    if left_out:
        out.append(f"{len(left_out)} damaged or foreign log file(s) were left out; see Notes.")
    if report.alert:
        out.append("To check: what changed in the input stream" + _since_clause(report)
                   + " (site, scanner, protocol, preprocessing), starting with the classes named "
                   "and the most-rejected inputs below.")
    else:
        out.append(f"No score, tail or class-mix shift beyond its floor ({len(report.tests)} tests, "
                   f"false-alarm rate per night <= {report.config.family_alpha:g}).")
    return out


# -- sentences ----------------------------------------------------------------------------
def _rate_sentence(r: Any) -> str:
    rate = r.sample.rejected / r.n if r.n else 0.0
    base = f"Rejection rate {rate:.1%} ({r.sample.rejected}/{r.n}) against the promised {r.alpha:.1%}"
    t = _test(r, "rejection_rate")
    if t is not None and t.alert:
        hist = _test(r, "rejection_rate_vs_history")
        was = (f"; {hist.detail['history_rate']:.1%} over the previous "
               f"{int(hist.detail['history_decisions'])} decisions" if hist is not None and hist.alert
               else "")
        return base + f": {100 * (rate - r.alpha):+.1f} points{was}."
    return base + ": within what the promise allows."


def _moved(r: Any) -> list[tuple[str, str]]:
    """(short name, sentence) of each kind of shift that alerts, rejection rate first."""
    alerts = [t for t in r.tests if t.alert]
    out: list[tuple[str, str]] = []
    if any(t.family == "rejection_rate" and t.name == "rejection_rate" for t in alerts):
        out.append(("rejection rate up", _rate_sentence(r)))
    cls = sorted((t for t in alerts if t.name.startswith("rejection_rate[")),
                 key=lambda t: -t.effect_size)
    if cls:
        named = ", ".join(f"{_inner(t.name)} ({t.detail['rate']:.1%})" for t in cls[:_TOP])
        out.append(("rejections in " + ", ".join(_inner(t.name) for t in cls[:_TOP]),
                    f"Excess rejections in class {named}{_more(cls)}."))
    hist = next((t for t in alerts if t.name == "rejection_rate_vs_history"), None)
    if hist is not None and not out:  # otherwise the rate sentence already says it
        out.append(("rejection rate vs history",
                    f"Up from {hist.detail['history_rate']:.1%} over the previous "
                    f"{int(hist.detail['history_decisions'])} decisions."))
    for family, label in (("attention", "attention maps"), ("early_features", "early features"),
                          ("garbage", "garbage score")):
        sentence = _score_sentence(r, alerts, family, label)
        if sentence:
            out.append((f"{label} moved", sentence))
    uni = next((t for t in alerts if t.family == "p_value_uniformity"), None)
    if uni is not None:
        out.append(("p-values low", "Combined p-values lean small overall (KS distance "
                                    f"{uni.statistic:.3f} above uniform): inputs look less "
                                    "in-distribution than at calibration."))
    mix = next((t for t in alerts if t.family == "class_frequency"), None)
    if mix is not None:
        out.append(("class mix changed", _mix_sentence(mix)))
    return out


def _score_sentence(r: Any, alerts: list, family: str, label: str) -> str | None:
    dist = sorted((t for t in alerts if t.family == "score_distribution"
                   and _family(_inner(t.name)) == family), key=lambda t: -t.effect_size)
    tails = sorted((t for t in alerts if t.family == "score_tail"
                    and _family(_inner(t.name)) == family), key=lambda t: -t.effect_size)
    if not dist and not tails:
        return None
    parts = []
    if dist:
        parts.append(", ".join(f"{_inner(t.name)} by {t.effect_size:.2f} calibration SD"
                               for t in dist[:_TOP]) + _more(dist))
    if tails:
        t = tails[0]
        parts.append(f"{t.detail['rate']:.1%} of {_inner(t.name)} beyond the calibration's "
                     f"{t.detail['expected_rate']:.1%} tail")
    return f"{label[0].upper()}{label[1:]} moved: " + "; ".join(parts) + "."


def _mix_sentence(t: Any) -> str:
    d = t.detail
    deltas = []
    for key, day_share in d.items():
        if key.startswith("day_share[") and key != "day_share[(other)]":
            c = key[len("day_share["):-1]
            deltas.append((day_share - d.get(f"calibration_share[{c}]", 0.0), c, day_share,
                           d.get(f"calibration_share[{c}]", 0.0)))
    deltas.sort(key=lambda x: -abs(x[0]))
    said = ", ".join(f"{'more' if dx > 0 else 'fewer'} {c!r} ({a:.0%} vs {b:.0%})"
                     for dx, c, a, b in deltas[:_TOP])
    return f"Predicted-class mix changed (total variation {t.effect_size:.2f}): {said}."


def _since(r: Any) -> str:
    """When the rejection rate left its control band, from the trend (the p-chart)."""
    trend = list(r.trend)
    earlier = [p for p in trend if p.day < r.day]
    if not earlier:
        return "Since when: no earlier day of this bundle is logged in the trend window."
    run = _run_out_of_control(trend, r.day)
    if run:
        return (f"Since when: the rejection rate has been above its control limit since "
                f"{run[0].day} ({len(run)} day{'s' if len(run) > 1 else ''} in a row).")
    bad = [p for p in earlier if p.out_of_control]
    if bad:
        return (f"Since when: rejection rate in control tonight; last above its limit on "
                f"{bad[-1].day}.")
    return (f"Since when: the rejection rate was within its control limits on all "
            f"{len(earlier)} earlier day(s) since {earlier[0].day}.")


def _since_clause(r: Any) -> str:
    run = _run_out_of_control(list(r.trend), r.day)
    return f" since {run[0].day}" if run else f" on {r.day}"


def _run_out_of_control(trend: list, day: Any) -> list:
    run: list = []
    for p in sorted((p for p in trend if p.day <= day), key=lambda p: p.day, reverse=True):
        if not p.out_of_control:
            break
        run.insert(0, p)
    return run if run and run[-1].day == day else []


# -- helpers ------------------------------------------------------------------------------
def _test(r: Any, name: str) -> Any:
    return next((t for t in r.tests if t.name == name), None)


def _inner(name: str) -> str:
    """'score_tail[iou]' -> 'iou'."""
    return name[name.index("[") + 1:-1] if "[" in name else name


def _family(score: str) -> str:
    if score == "garbage":
        return "garbage"
    return "early_features" if score.startswith("early_") else "attention"


def _more(items: list) -> str:
    return f" (+{len(items) - _TOP} more)" if len(items) > _TOP else ""
