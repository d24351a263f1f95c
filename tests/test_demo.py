"""The README's main job, end to end on real data: figures, reports and verdicts it promises."""
from __future__ import annotations

import json
from html.parser import HTMLParser

from calibration.decide import false_rejection_sd
from verifier.examples.demo import format_table, run_demo


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = run_demo(out, alpha=0.05, n_ood=60, progress=False)
    rows = result.rows
    n = rows["digits"]["n"]
    assert n == 1000
    # one calibration draw on one test sample: test and calibration noise both count
    sd = false_rejection_sd(0.05, n, result.calibration_per_class)
    assert result.false_rejection_rate <= 0.05 + 3 * sd
    assert result.false_rejection_rate > 0
    for source in ("photos", "textures", "dicom", "noise"):
        assert rows[source]["rejection_rate"] >= 0.9, source
        assert rows[source]["auroc"] >= 0.9, source
    assert rows["dicom"]["errors"] == 0  # the real .dcm files decode
    assert result.reports["drift_clean_day_alert"] is False
    assert result.reports["drift_mixed_day_alert"] is True
    assert result.reports["audit_retrained_verdict"] == "PASS"
    assert result.reports["audit_shortcut_verdict"] == "FAIL"
    assert result.reports["segmentation_accepted_canvases"] >= 0.8  # the segmentation case
    assert result.reports["segmentation_rejected_photos"] >= 0.8
    assert 0 < result.reports["segmentation_kwc_ip"] < result.reports["segmentation_gradcam_ip"]
    for key in ("drift_clean_day", "drift_mixed_day", "audit_retrained", "audit_shortcut"):
        HTMLParser().feed((out / f"{key}.html").read_text())
    saved = json.loads((out / "demo.json").read_text())
    assert saved["false_rejection_rate"] == result.false_rejection_rate
    lines = (out / "decisions.jsonl").read_text().splitlines()
    assert len(lines) == sum(r["n"] for r in rows.values())
    table = format_table(result)
    assert "false-rejection rate on held-out digits" in table and "audit shortcut: FAIL" in table
    # a second run reuses the cached weights and gives the same figures
    again = run_demo(out, alpha=0.05, n_ood=60, progress=False)
    assert again.rows == result.rows
