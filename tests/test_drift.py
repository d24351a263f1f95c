"""Tests of the nightly drift report: the statistical family, the CLI's exit codes, the report.

A synthetic gate (conformal p-values of four scores against a calibration set, Bonferroni
combination, reject below alpha) produces logged days; the real-gate tests are at the end.
"""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

import verifier.reports.html as h
from verifier.cli.main import main
from verifier.drift import DaySample, DriftConfig, DriftReference, drift_report, evaluate, holm
from verifier.reports.drift import render_html
from verifier.runtime.decision import Decision
from verifier.runtime.log import DecisionLog

CLASSES = ("normal", "pneumonia", "effusion")
FREQ = np.array([0.5, 0.3, 0.2])
HIGHER_IS_WORSE = {"garbage": True, "iou": False, "ssim": False, "early_mahalanobis": True}
DAY = date(2024, 5, 20)


class SyntheticGate:
    """In-distribution scores depend on the class; OOD inputs look like garbage on every score."""

    def __init__(self, seed: int, n_cal: int = 1000, alpha: float = 0.05) -> None:
        self.rng = np.random.default_rng(seed)
        self.alpha = alpha
        cls = self.rng.choice(len(CLASSES), n_cal, p=FREQ)
        self.cal_classes = cls
        self.cal = self._scores(cls, np.zeros(n_cal, bool))
        # class-conditional conformal calibration, as calibration.ConformalCalibrator does
        self._sorted = {(k, c): np.sort(v[cls == c]) for k, v in self.cal.items()
                        for c in range(len(CLASSES))}

    def reference(self) -> DriftReference:
        return DriftReference(bundle_id="synthetic", alpha=self.alpha, classes=CLASSES,
                              calibration_scores=self.cal, calibration_classes=self.cal_classes,
                              higher_is_worse=HIGHER_IS_WORSE)

    def _scores(self, cls: np.ndarray, ood: np.ndarray) -> dict[str, np.ndarray]:
        r, n = self.rng, len(cls)
        s = {"garbage": r.beta(1, 40, n), "iou": r.beta(8 + 2 * cls, 4),
             "ssim": r.beta(6, 3, n), "early_mahalanobis": r.chisquare(16, n) * (1 + 0.1 * cls)}
        k = int(ood.sum())
        s["garbage"][ood] = r.beta(4, 3, k)
        s["iou"][ood] = r.beta(2, 5, k)
        s["ssim"][ood] = r.beta(2, 4, k)
        s["early_mahalanobis"][ood] = r.chisquare(16, k) * 2.5
        return s

    def day(self, n: int = 2000, contamination: float = 0.0,
            freq: np.ndarray = FREQ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
        """(scores, combined p-values, rejected (n,) bool, predicted class index (n,))."""
        cls = self.rng.choice(len(CLASSES), n, p=freq)
        ood = self.rng.random(n) < contamination
        scores = self._scores(cls, ood)
        p = np.ones(n)
        for name, v in scores.items():
            for k in range(len(CLASSES)):
                c, at = self._sorted[name, k], cls == k
                worse = (len(c) - np.searchsorted(c, v[at], "left")) if HIGHER_IS_WORSE[name] \
                    else np.searchsorted(c, v[at], "right")
                p[at] = np.minimum(p[at], (1 + worse) / (len(c) + 1))
        p = np.minimum(1.0, len(scores) * p)  # Bonferroni over the scores
        return scores, p, p < self.alpha, cls

    def sample(self, **kw) -> DaySample:
        scores, p, rej, cls = self.day(**kw)
        per_class = {CLASSES[c]: (int((cls == c).sum()), int(rej[cls == c].sum()))
                     for c in range(len(CLASSES)) if (cls == c).any()}
        return DaySample(day=DAY, n=len(p), rejected=int(rej.sum()), errors=0,
                         per_class=per_class, scores=scores, p_values=p)

    def decisions(self, **kw) -> list[Decision]:
        scores, p, rej, cls = self.day(**kw)
        return [Decision(input=f"img{i:05d}.png", decision="reject" if rej[i] else "accept",
                         p_value=float(p[i]), predicted_class=CLASSES[cls[i]], confidence=0.9,
                         reasons=["attention"] if rej[i] else [],
                         scores={k: float(v[i]) for k, v in scores.items()},
                         digest=f"{i:064x}") for i in range(len(p))]


def _log_days(root: Path, gate: SyntheticGate, days: dict[date, dict]) -> DecisionLog:
    log = DecisionLog(root)
    for d, kw in days.items():
        ds = gate.decisions(**kw)
        start = datetime.combine(d, time(0), timezone.utc)
        times = [start + timedelta(seconds=40 * i) for i in range(len(ds))]
        log.append(ds, bundle_id="synthetic", alpha=gate.alpha, time=times)
    return log


def _alerting(tests) -> set[str]:
    return {t.name for t in tests if t.alert}


# -- the statistics -----------------------------------------------------------------------
def test_holm_step_down() -> None:
    thr, sig = holm([0.001, 0.04, 0.012, 0.5], 0.05)
    assert thr == pytest.approx([0.0125, 0.025, 0.05 / 3, 0.05])
    assert sig == [True, False, True, False]
    # step-down stops at the first non-rejection even if a later p is under its level
    assert holm([0.02, 0.02], 0.03)[1] == [False, False]


def test_false_alarm_rate_of_clean_nights_is_within_family_alpha() -> None:
    gate = SyntheticGate(seed=1)
    ref, cfg = gate.reference(), DriftConfig(family_alpha=0.01)
    alarms = sum(bool(_alerting(evaluate(gate.sample(), ref, cfg))) for _ in range(150))
    # expected <= 1.5 false alarms at 1%; 5 or more has probability < 2% under the promise
    assert alarms <= 4


def test_contaminated_day_names_rejection_rate_and_score_tests() -> None:
    gate = SyntheticGate(seed=2)
    names = _alerting(evaluate(gate.sample(contamination=0.05), gate.reference()))
    assert "rejection_rate" in names
    assert any(n.startswith("score_tail[") for n in names)
    assert "class_frequency" not in names
    heavy = _alerting(evaluate(gate.sample(contamination=0.20), gate.reference()))
    assert any(n.startswith("score_distribution[") for n in heavy)
    assert "p_value_uniformity" in heavy


def test_shifted_class_mix_raises_class_alert_only_on_class_and_scores() -> None:
    gate = SyntheticGate(seed=3)
    names = _alerting(evaluate(gate.sample(freq=np.array([0.2, 0.3, 0.5])), gate.reference()))
    assert "class_frequency" in names
    assert "rejection_rate" not in names


def test_huge_day_does_not_alarm_on_calibration_noise_and_floor_gates_alerts() -> None:
    # 400k decisions, 0.3 points over alpha: the plain binomial calls it certain, but a bundle
    # calibrated on 1,000 images realises its rate only to about +-0.7 points.
    gate = SyntheticGate(seed=4)
    ref = gate.reference()
    n = 400_000
    s = DaySample(day=DAY, n=n, rejected=int(n * 0.053), errors=0, per_class={},
                  scores={}, p_values=np.array([]))
    [t] = evaluate(s, ref)
    assert t.detail["binomial_p_value"] < 1e-6 and not t.significant and not t.alert
    # significant but under a (deliberately high) floor: reported, no alert
    day = gate.sample(contamination=0.05)
    [rate] = [t for t in evaluate(day, ref, DriftConfig(min_rate_excess=0.2))
              if t.name == "rejection_rate"]
    assert rate.significant and rate.effect_size < 0.2 and not rate.alert


# -- the log, the command and the report -------------------------------------------------
@pytest.fixture()
def logged(tmp_path: Path, monkeypatch):
    gate = SyntheticGate(seed=5)
    ref = gate.reference()
    monkeypatch.setattr("verifier.cli.commands.drift._load_reference", lambda path: ref)
    days = {DAY - timedelta(days=k): {"n": 1500} for k in range(1, 6)}
    days[DAY] = {"n": 1500}
    days[DAY + timedelta(days=1)] = {"n": 1500, "contamination": 0.06}
    days[DAY + timedelta(days=2)] = {"n": 1500, "freq": np.array([0.2, 0.3, 0.5])}
    return _log_days(tmp_path / "log", gate, days), ref, tmp_path


def _cli(tmp: Path, log: DecisionLog, day: date, *extra: str) -> tuple[int, dict]:
    out = tmp / f"{day}.json"
    rc = main(["drift", "--bundle", "B", "--log", str(log.root), "--day", day.isoformat(),
               "--json", str(out), *extra])
    return rc, (json.loads(out.read_text()) if out.exists() else {})


def test_cli_clean_contaminated_and_class_shift_days(logged, capsys) -> None:
    log, ref, tmp = logged
    rc, clean = _cli(tmp, log, DAY, "--report", str(tmp / "clean.html"))
    assert rc == 0 and clean["alert"] is False and clean["n"] == 1500
    assert len(clean["trend"]) == 6 and clean["reasons"] == []
    for t in clean["tests"]:
        assert {"name", "statistic", "p_value", "threshold", "alert", "effect_size"} <= set(t)
        assert 0 <= t["p_value"] <= 1 and 0 < t["threshold"] <= 0.01
    rc, ood = _cli(tmp, log, DAY + timedelta(days=1), "--report", str(tmp / "ood.html"))
    names = {t["name"] for t in ood["tests"] if t["alert"]}
    assert rc == 1 and ood["alert"] and "rejection_rate" in names
    assert any(n.startswith("score_") for n in names)
    assert any(r.startswith("rejection_rate:") for r in ood["reasons"])
    assert len(ood["most_rejected"]) == 20
    ps = [m["p_value"] for m in ood["most_rejected"]]
    assert ps == sorted(ps)
    rc, mix = _cli(tmp, log, DAY + timedelta(days=2))
    assert rc == 1 and "class_frequency" in {t["name"] for t in mix["tests"] if t["alert"]}
    assert "ALERT" in capsys.readouterr().out


def test_html_report_is_self_contained_and_leads_with_the_verdict(logged) -> None:
    log, ref, tmp = logged
    rep = drift_report(log, ref, DAY + timedelta(days=1), DriftConfig())
    html = render_html(rep)
    assert html.index("ALERT: drift") < html.index("Rejection rate trend") \
        < html.index("Score distributions") < html.index("Predicted-class frequencies") \
        < html.index("Most rejected inputs")
    assert "<script" not in html and "http://" not in html.replace(
        'xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in html
    assert html.count("<svg") >= 1 + len(ref.calibration_scores) + 1 + 1
    assert rep.most_rejected[0]["input"] in html


@pytest.mark.parametrize("case", ["missing", "empty_day", "corrupt", "other_bundle"])
def test_errors_exit_2_with_one_clear_line(logged, capsys, case) -> None:
    log, ref, tmp = logged
    root, day = log.root, DAY
    if case == "missing":
        root = tmp / "no-such-log"
    elif case == "empty_day":
        day = DAY + timedelta(days=30)
    elif case == "corrupt":
        (log.root / f"date={DAY}" / "part-9999-corrupt.parquet").write_bytes(b"PAR1garbagePAR1")
    else:
        DecisionLog(root).append([Decision("x.png", "accept", 0.5, "normal", 0.9)],
                                 bundle_id="another", alpha=0.05,
                                 time=datetime(2024, 7, 1, tzinfo=timezone.utc))
        day = date(2024, 7, 1)
    rc = main(["drift", "--bundle", "B", "--log", str(root), "--day", day.isoformat()])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    expect = {"missing": "not found", "empty_day": "no decisions logged on 2024-06-19",
              "corrupt": "part-9999-corrupt.parquet", "other_bundle": "1 rows of other bundles"}
    assert expect[case] in err


def test_reference_from_bundle_like_object() -> None:
    class B:
        bundle_id, alpha, classes = "b1", 0.1, ["a", "b"]
        calibration_scores = {"iou": [0.1, 0.2, 0.3]}
        calibration_classes = [0, 1, 1]
        higher_is_worse = {"iou": 0}

    r = DriftReference.from_bundle(B())
    assert r.classes == ("a", "b") and r.calibration_scores["iou"].dtype == np.float64
    assert r.class_counts().tolist() == [1, 2] and r.higher_is_worse == {"iou": False}


# -- the HTML toolkit ---------------------------------------------------------------------
def test_png_data_uri_maps_values_through_the_colormap() -> None:
    import base64
    import io

    from PIL import Image

    a = np.array([[0.0, 1.0], [np.nan, 0.5]])
    uri = h.png_data_uri(a, cmap="gray", upscale=3)
    im = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))
    assert im.shape == (6, 6, 4)
    assert im[0, 0, 0] == 0 and im[0, 5, 0] == 255 and 120 <= im[5, 5, 0] <= 135
    assert im[5, 0, 3] == 0 and im[0, 0, 3] == 255  # NaN is transparent


def test_svg_charts_are_well_formed_and_escape_labels() -> None:
    charts = [
        h.line_chart_svg(["d1", "d2", "<d3>"], {"rate": [0.04, 0.05, 0.2]},
                         band=([0.0, 0.0, 0.0], [0.1, 0.1, 0.1]), center=0.05,
                         flags=[False, False, True], percent=True),
        h.histogram_svg({"a": np.random.default_rng(0).normal(size=500), "b": np.array([])},
                        marker=0.0, x_label="x & y"),
        h.bar_chart_svg(["n", "p"], {"cal": [0.5, 0.5], "day": [0.2, float("nan")]}),
    ]
    for svg in charts:
        ET.fromstring(str(svg))
    assert "&lt;d3&gt;" in str(charts[0]) and 'r="5"' in str(charts[0])
    page = h.page("T <1>", h.banner("alert", "bad", ["x<y"]), h.table(["a"], [[1.5], ["<b>"]]))
    assert "T &lt;1&gt;" in page and "x&lt;y" in page and "&lt;b&gt;" in page


# -- on logs of the real gate -----------------------------------------------------------
@pytest.fixture(scope="module")
def real_gate_log(tmp_path_factory, mnist, gap_model):
    """Real decisions: the ONNX-exported MNIST CNN's bundle gates 800 held-out digits and 120
    real OOD images (photos, textures, DICOM slices, noise) once; days are resampled from them."""
    from verifier.bundle.builder import build_bundle
    from verifier.examples.datasets import ood_images
    from verifier.examples.zoo import mnist_spec
    from verifier.probe.onnx_backend import export_onnx
    from verifier.runtime.gatekeeper import Gatekeeper
    from verifier.spec import load_spec

    x, y = mnist
    tmp = tmp_path_factory.mktemp("realgate")
    export_onnx(gap_model, mnist_spec(gap_model), tmp / "model.onnx")
    classes = ", ".join(f'"{i}"' for i in range(10))
    (tmp / "model.toml").write_text(
        f'[model]\npath = "model.onnx"\nclasses = [{classes}]\n'
        "[input]\nsize = [28, 28]\nchannels = 1\nmean = [0.1307]\nstd = [0.3081]\n")
    build_bundle(load_spec(tmp / "model.toml"), (x[:3000], y[:3000]), tmp / "bundle",
                 calibration=(x[3000:3600], y[3000:3600]), seed=0)
    gate = Gatekeeper.load(tmp / "bundle")
    clean = gate.gate(x[3600:4400])
    ood = gate.gate(np.concatenate([ood_images(s, 30, seed=1)
                                    for s in ("photos", "textures", "dicom", "noise")]))
    rng = np.random.default_rng(0)
    log = DecisionLog(tmp / "log")
    bid = gate.bundle.bundle_id

    def day(d: date, n: int = 1000, ood_share: float = 0.0, digits=None) -> None:
        pool = clean if digits is None else [c for c, lab in zip(clean, y[3600:4400])
                                             if lab in digits]
        k = int(round(n * ood_share))
        rows = [pool[i] for i in rng.integers(0, len(pool), n - k)]
        rows += [ood[i] for i in rng.integers(0, len(ood), k)]
        t0 = datetime.combine(d, time(1), timezone.utc)
        log.append(rows, bundle_id=bid, alpha=gate.alpha,
                   time=[t0 + timedelta(seconds=60 * i) for i in range(n)])

    for k in range(4):
        day(DAY - timedelta(days=k))
    day(DAY + timedelta(days=1), ood_share=0.05)
    day(DAY + timedelta(days=2), digits={0, 1, 7})
    (tmp / "log" / "date=2024-05-10").mkdir()  # a day folder with no part file: "empty day"
    return tmp, log, clean, ood


def _real(tmp: Path, log: DecisionLog, day: date) -> tuple[int, dict]:
    out = tmp / f"real-{day}.json"
    rc = main(["drift", "--bundle", str(tmp / "bundle"), "--log", str(log.root),
               "--day", day.isoformat(), "--json", str(out), "--report", str(tmp / f"{day}.html")])
    return rc, (json.loads(out.read_text()) if out.exists() else {})


@pytest.mark.slow
def test_real_gate_clean_days_raise_no_alert(real_gate_log) -> None:
    tmp, log, clean, ood = real_gate_log
    assert np.mean([d.decision == "reject" for d in ood]) > 0.5  # the gate does see the OOD
    for k in range(4):
        rc, res = _real(tmp, log, DAY - timedelta(days=k))
        assert rc == 0 and res["alert"] is False, res["reasons"]
        assert {t["family"] for t in res["tests"]} >= {
            "rejection_rate", "score_distribution", "p_value_uniformity", "class_frequency"}


@pytest.mark.slow
def test_real_gate_ood_day_names_rejection_rate_and_scores(real_gate_log) -> None:
    tmp, log, _, _ = real_gate_log
    rc, res = _real(tmp, log, DAY + timedelta(days=1))
    fired = {t["family"] for t in res["tests"] if t["alert"]}
    assert rc == 1 and "rejection_rate" in fired, res["reasons"]
    assert fired & {"score_distribution", "score_tail"}, res["reasons"]


@pytest.mark.slow
def test_real_gate_class_mix_shift_raises_class_alert(real_gate_log) -> None:
    tmp, log, _, _ = real_gate_log
    rc, res = _real(tmp, log, DAY + timedelta(days=2))
    assert rc == 1 and "class_frequency" in {t["name"] for t in res["tests"] if t["alert"]}


@pytest.mark.slow
def test_real_gate_empty_day_and_corrupt_part_exit_2(real_gate_log, capsys) -> None:
    tmp, log, _, _ = real_gate_log
    rc, _ = _real(tmp, log, date(2024, 5, 10))
    assert rc == 2 and "no decisions logged on 2024-05-10" in capsys.readouterr().err
    bad = log.root / f"date={DAY - timedelta(days=3)}" / "part-0-truncated.parquet"
    good = next((log.root / f"date={DAY - timedelta(days=3)}").glob("part-*.parquet"))
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # a torn copy
    try:
        rc, _ = _real(tmp, log, DAY - timedelta(days=3))
        err = capsys.readouterr().err
        assert rc == 2 and "part-0-truncated.parquet" in err and "Traceback" not in err
    finally:
        bad.unlink()
