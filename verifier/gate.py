"""The runtime gate: accept or reject each input at a promised false-rejection rate.

Per batch: decode and preprocess (io) -> one probe pass -> scores against the
class reference and the garbage head -> conformal p-values -> one decision each.
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import softmax

from calibration.combine import merge_bonferroni
from calibration.conformal import digest_uniforms

from .bundle import Bundle
from .compare import FAMILIES, Comparator, score_family
from .decision import Decision
from .garbage import garbage_score
from .probe import Probe, ProbeResult, open_probe
from .spec import ModelSpec

__all__ = ["Gatekeeper", "BatchScores", "STAGES"]

#: stages timed by `Gatekeeper.timings` (seconds, cumulative)
STAGES = ("decode", "probe", "compare", "decide", "log")


@dataclass
class BatchScores:
    """Arrays for a batch of n preprocessed images, before they become `Decision`s.

    scores / p_values: {name: (n,)}; p_value: (n,) combined; predicted: (n,) int;
    confidence: (n,) softmax probability of the predicted class; accept: (n,) bool.
    """

    result: ProbeResult
    scores: dict[str, np.ndarray]
    p_values: dict[str, np.ndarray]
    p_value: np.ndarray
    predicted: np.ndarray
    confidence: np.ndarray
    accept: np.ndarray
    family_p: dict[str, np.ndarray]


class Gatekeeper:
    """Gate inputs with a bundle. `Gatekeeper.load("bundle/").gate(paths_or_array)`."""

    def __init__(self, bundle: Bundle, probe: Probe | None = None, alpha: float | None = None,
                 batch_size: int = 64) -> None:
        self.bundle = bundle
        self.probe = probe if probe is not None else open_probe(bundle.spec)
        if self.probe.fingerprint != bundle.model_fingerprint and \
                self.probe.fingerprint not in bundle.compatible_fingerprints.values():
            raise ValueError("the probe's model is not the model this bundle was built for")
        self.alpha = float(bundle.alpha if alpha is None else alpha)
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        self.batch_size = int(batch_size)
        self.comparator = Comparator(bundle.store)
        self.timings: dict[str, float] = dict.fromkeys(STAGES, 0.0)

    @classmethod
    def load(cls, path: str | Path, model: Any = None, alpha: float | None = None,
             device: str | None = None, batch_size: int = 64,
             spec: ModelSpec | None = None, key: Any = None) -> Gatekeeper:
        """Load a bundle (verifying checksums and the model fingerprint) and open its probe.
        `spec`: gate with another model file declared compatible (see `Bundle.load`).
        `key`: a key file; the bundle must be signed by it (see `Bundle.load`)."""
        bundle = Bundle.load(path, model=model, spec=spec, key=key)
        return cls(bundle, open_probe(bundle.spec, device=device), alpha=alpha, batch_size=batch_size)

    # ------------------------------------------------------------------ public
    def gate(self, inputs: Sequence[str | Path] | np.ndarray, log: Any = None,
             progress: bool = False) -> list[Decision]:
        """One `Decision` per input: file paths, folders (expanded), or a raw pixel
        array (N, H, W) / (N, H, W, C). Unreadable inputs become error records.
        `log` (a `DecisionLog` or a folder) appends the decisions to the Parquet log."""
        from .io import iter_batches

        decisions: list[Decision] = []
        bar = _progress(progress, inputs)
        t0 = time.perf_counter()
        for records, x in iter_batches(inputs, self.bundle.spec, batch_size=self.batch_size):
            self.timings["decode"] += time.perf_counter() - t0
            decisions.extend(self._decide_records(records, x))
            if bar is not None:
                bar.update(len(records))
            t0 = time.perf_counter()
        if bar is not None:
            bar.close()
        if log is not None:
            t1 = time.perf_counter()
            self._log(log, decisions)
            self.timings["log"] += time.perf_counter() - t1
        return decisions

    def score_batch(self, x: np.ndarray) -> BatchScores:
        """Scores, p-values and accept/reject for preprocessed (n, C, H, W) float32.

        Ties between an input's statistic and calibration values are broken by a uniform
        drawn from a hash of the input's own preprocessed pixels (`digest_uniforms`), so
        the false-rejection rate sits at alpha and a decision is reproducible."""
        t0 = time.perf_counter()
        result = self.probe.run(x)
        t1 = time.perf_counter()
        scores = self.comparator.score(result)
        real = result.logits[:, : self.bundle.spec.num_classes]
        predicted = result.cam_class
        confidence = _softmax_at(real, predicted)
        scores["garbage"] = garbage_score(result.logits, result.features, self.bundle.head,
                                          self.bundle.spec.garbage_class)
        t2 = time.perf_counter()
        b = self.bundle
        u = digest_uniforms(x)
        p_values = b.calibrator.p_values(scores, predicted, u=u)
        p_value = self._combined(scores, p_values, predicted, u)
        accept = p_value > self.alpha
        family_p = _family_p_values(p_values)
        self.timings["probe"] += t1 - t0
        self.timings["compare"] += t2 - t1
        self.timings["decide"] += time.perf_counter() - t2
        return BatchScores(result, scores, p_values, p_value, predicted, confidence, accept, family_p)

    # ----------------------------------------------------------------- helpers
    def _combined(self, scores: dict[str, np.ndarray], p_values: dict[str, np.ndarray],
                  predicted: np.ndarray, u: np.ndarray) -> np.ndarray:
        b = self.bundle
        if b.combine == "indist" and b.combiner is not None:
            feats = np.column_stack([scores[n] for n in b.combiner.names_])
            return b.combiner.p_values(feats, predicted, u=u)
        if b.combine == "fusion":
            feats = np.column_stack([scores[n] for n in b.score_names])
            return b.fusion.p_values(feats, predicted)
        from calibration.combine import MERGERS

        stacked = np.column_stack([p_values[n] for n in b.score_names])
        return MERGERS[b.combine](stacked)

    def _decide_records(self, records: list, x: np.ndarray) -> list[Decision]:
        out: list[Decision] = []
        batch = self.score_batch(x) if len(x) else None
        names = self.bundle.classes
        if batch is not None:  # Python lists once per batch, not numpy scalars per record
            scores = {k: v.tolist() for k, v in batch.scores.items()}
            p_values = {k: v.tolist() for k, v in batch.p_values.items()}
            p_value, accepted = batch.p_value.tolist(), batch.accept.tolist()
            predicted, confidence = batch.predicted.tolist(), batch.confidence.tolist()
        j = 0
        for rec in records:
            if rec.error is not None:
                out.append(Decision.from_error(rec.source, rec.error, rec.digest))
                continue
            assert batch is not None
            accept = accepted[j]
            out.append(Decision(
                input=rec.source,
                decision="accept" if accept else "reject",
                p_value=p_value[j],
                predicted_class=names[predicted[j]],
                confidence=confidence[j],
                reasons=[] if accept else _reasons(batch.family_p, j, self.alpha),
                scores={k: v[j] for k, v in scores.items()},
                p_values={k: v[j] for k, v in p_values.items()},
                digest=rec.digest,
            ))
            j += 1
        return out

    def _log(self, log: Any, decisions: list[Decision]) -> None:
        from .decision_log import DecisionLog

        target = log if isinstance(log, DecisionLog) else DecisionLog(log)
        target.append(decisions, bundle_id=self.bundle.bundle_id, alpha=self.alpha)


def _family_p_values(p_values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Bonferroni p-value of each family of checks (`verifier.compare.FAMILIES`)."""
    fams: dict[str, list[np.ndarray]] = {}
    for name, p in p_values.items():
        fams.setdefault(score_family(name), []).append(p)
    return {f: merge_bonferroni(np.column_stack(ps)) for f, ps in fams.items()}


def _reasons(family_p: dict[str, np.ndarray], j: int, alpha: float) -> list[str]:
    """Families whose own p-value is at or below alpha; the weakest one if none is."""
    failed = [f for f in FAMILIES if f in family_p and family_p[f][j] <= alpha]
    if failed:
        return failed
    return [min(family_p, key=lambda f: family_p[f][j])]


def _softmax_at(logits: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """(n, K) logits -> (n,) softmax probability of class idx[i] (float64)."""
    return softmax(np.asarray(logits, dtype=np.float64), axis=1)[np.arange(len(idx)), idx]


def _progress(enabled: bool, inputs: Iterable) -> Any:
    if not enabled:
        return None
    import sys

    from tqdm import tqdm

    total = len(inputs) if hasattr(inputs, "__len__") else None
    return tqdm(total=total, unit="img", desc="gate", disable=not sys.stderr.isatty())
