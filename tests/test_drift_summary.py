"""Issue 10, drift verdict box: a few sentences a person acts on (what moved, how much, which
classes, since when) lead the report; the full test table follows; JSON gains `summary`."""
from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from test_drift import CLASSES, DAY, SyntheticGate, _log_days

from verifier.drift import DriftConfig, drift_report
from verifier.reports.drift import render_html


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    gate = SyntheticGate(seed=11)
    days = {DAY - timedelta(days=k): {"n": 1500} for k in range(2, 7)}
    days[DAY - timedelta(days=1)] = {"n": 1500, "contamination": 0.08}   # drift starts here
    days[DAY] = {"n": 1500, "contamination": 0.08}
    days[DAY + timedelta(days=1)] = {"n": 1500, "freq": np.array([0.2, 0.3, 0.5])}
    log = _log_days(tmp_path_factory.mktemp("drift") / "log", gate, days)
    ref = gate.reference()
    return {k: drift_report(log, ref, d, DriftConfig()) for k, d in
            (("clean", DAY - timedelta(days=2)), ("ood", DAY), ("mix", DAY + timedelta(days=1)))}


def test_alert_summary_says_what_moved_how_much_and_since_when(reports):
    rep = reports["ood"]
    s = rep.summary
    assert rep.alert and 4 <= len(s) <= 9  # short, unlike the 20+ test lines
    rate = rep.sample.rejected / rep.n
    assert s[0].startswith(f"Rejection rate {rate:.1%} ({rep.sample.rejected}/{rep.n})")
    assert f"{100 * (rate - rep.alpha):+.1f} points" in s[0]
    moved = [x for x in s if " moved: " in x]
    assert moved and any("calibration SD" in x for x in moved)
    top = max((t for t in rep.tests if t.alert and t.family == "score_distribution"),
              key=lambda t: t.effect_size)
    assert any(f"{top.name[len('score_distribution['):-1]} by {top.effect_size:.2f}" in x
               for x in moved)
    since = [x for x in s if x.startswith("Since when")]
    assert since == [f"Since when: the rejection rate has been above its control limit since "
                     f"{DAY - timedelta(days=1)} (2 days in a row)."]
    assert s[-1].startswith("To check:") and f"since {DAY - timedelta(days=1)}" in s[-1]
    assert rep.to_dict()["summary"] == s and rep.to_dict()["reasons"] == rep.reasons


def test_class_mix_summary_names_the_classes(reports):
    rep = reports["mix"]
    [mix] = [x for x in rep.summary if x.startswith("Predicted-class mix changed")]
    t = next(t for t in rep.tests if t.name == "class_frequency")
    shares = {c: t.detail[f"day_share[{c}]"] - t.detail[f"calibration_share[{c}]"] for c in CLASSES}
    biggest = max(shares, key=lambda c: abs(shares[c]))
    word = "more" if shares[biggest] > 0 else "fewer"
    assert f"{word} {biggest!r} ({t.detail[f'day_share[{biggest}]']:.0%}" in mix


def test_clean_summary_says_so_in_two_or_three_lines(reports):
    rep = reports["clean"]
    s = rep.summary
    assert not rep.alert and s[0].endswith("within what the promise allows.")
    assert s[-1].startswith("No score, tail or class-mix shift beyond its floor")
    assert any(x.startswith("Since when: the rejection rate was within its control limits") for x in s)


def test_html_leads_with_the_summary_then_the_full_table(reports, tmp_path: Path):
    rep = reports["ood"]
    html = render_html(rep)
    box = html[html.index('<div class="banner alert">'):html.index("</div>", html.index("banner alert"))]
    assert "ALERT: drift on" in box and "Holm" not in box and "p=" not in box
    from markupsafe import escape

    for sentence in rep.summary:
        assert str(escape(sentence)) in box
    assert html.index("banner alert") < html.index("Tests of the night") \
        < html.index("Rejection rate trend")
    table = html[html.index("Tests of the night"):html.index("Rejection rate trend")]
    assert table.count("<tr") == len(rep.tests) + 1  # every test, plus the header row
    assert table.index("ALERT") < table.index("<td></td></tr>")  # alerting rows first
    (tmp_path / "ood.html").write_text(html)
