"""The runtime gate: accept or reject each input at a promised false-rejection rate.

Per batch: decode and preprocess (io) -> one probe pass -> scores against the
class reference and the garbage head -> conformal p-values -> one decision each.
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import softmax

from calibration.combine import merge_bonferroni
from calibration.conformal import digest_uniforms
from verifier.bundle.directory import Bundle
from verifier.probe.base import Probe, ProbeResult
from verifier.probe.factory import open_probe
from verifier.runtime.decision import Decision
from verifier.scoring.attention import MethodPass
from verifier.scoring.comparator import FAMILIES, Comparator, score_family
from verifier.scoring.garbage import garbage_score
from verifier.spec import ModelSpec

__all__ = ["Gatekeeper", "BatchScores", "STAGES"]

#: stages timed by `Gatekeeper.timings` (seconds, cumulative)
STAGES = ("decode", "probe", "compare", "decide", "log")


@dataclass
class BatchScores:
    """Arrays for a batch of n preprocessed images, before they become `Decision`s.

    scores / p_values: {name: (n,)}; p_value: (n,) combined; predicted: (n,) int;
    confidence: (n,) softmax probability of the predicted class; accept: (n,) bool.
    errors: row -> why that image could not be scored (its arrays hold NaN, accept False).
    """

    result: ProbeResult
    scores: dict[str, np.ndarray]
    p_values: dict[str, np.ndarray]
    p_value: np.ndarray
    predicted: np.ndarray
    confidence: np.ndarray
    accept: np.ndarray
    family_p: dict[str, np.ndarray]
    errors: dict[int, str] = field(default_factory=dict)


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
        self.comparator = Comparator(bundle.store, bundle.measures)
        #: the maps of the bundle's further attribution methods (refused here if the probe's
        #: backend cannot compute one, e.g. saliency on an ONNX export)
        self.method_pass = MethodPass(bundle.spec, bundle.store.methods, self.probe.target_layer)
        self.timings: dict[str, float] = dict.fromkeys(STAGES, 0.0)

    @classmethod
    def load(cls, path: str | Path, model: Any = None, alpha: float | None = None,
             device: str | None = None, batch_size: int = 64,
             spec: ModelSpec | None = None, key: Any = None,
             threads: int | None = None) -> Gatekeeper:
        """Load a bundle (verifying checksums and the model fingerprint) and open its probe.
        `spec`: gate with another model file declared compatible (see `Bundle.load`).
        `key`: a key file; the bundle must be signed by it (see `Bundle.load`).
        `threads`: the probe's compute threads (`open_probe`); None: the backend's default."""
        bundle = Bundle.load(path, model=model, spec=spec, key=key)
        return cls(bundle, open_probe(bundle.spec, device=device, threads=threads), alpha=alpha,
                   batch_size=batch_size)

    # ------------------------------------------------------------------ public
    def gate(self, inputs: Sequence[str | Path] | np.ndarray, log: Any = None,
             progress: bool = False, workers: int = 2) -> list[Decision]:
        """One `Decision` per input: file paths, folders (expanded), in-memory files
        (`verifier.data.EncodedImage`), or a raw pixel array (N, H, W) / (N, H, W, C). Unreadable inputs become error records.
        `log` (a `DecisionLog` or a folder) appends the decisions to the Parquet log,
        one batch at a time as they are decided (a run killed midway keeps those).
        `workers`: decoding threads (1 decodes inline: cheaper for a few small files)."""
        return [d for batch in self.iter_gate(inputs, log=log, progress=progress, workers=workers)
                for d in batch]

    def iter_gate(self, inputs: Sequence[str | Path] | np.ndarray, log: Any = None,
                  progress: bool = False, workers: int = 2) -> Iterator[list[Decision]]:
        """`gate`, one list of decisions per batch, each logged before it is yielded."""
        from verifier.data import iter_batches

        target = self._log_target(log)
        bar = _progress(progress, inputs)
        t0 = time.perf_counter()
        try:
            for records, x in iter_batches(inputs, self.bundle.spec, batch_size=self.batch_size,
                                           workers=workers):
                self.timings["decode"] += time.perf_counter() - t0
                decisions = self._decide_records(records, x)
                if target is not None:
                    t1 = time.perf_counter()
                    target.append(decisions, bundle_id=self.bundle.bundle_id, alpha=self.alpha)
                    self.timings["log"] += time.perf_counter() - t1
                if bar is not None:
                    bar.update(len(records))
                yield decisions
                t0 = time.perf_counter()
        finally:
            if bar is not None:
                bar.close()

    def score_batch(self, x: np.ndarray) -> BatchScores:
        """Scores, p-values and accept/reject for preprocessed (n, C, H, W) float32.

        Ties between an input's statistic and calibration values are broken by a uniform
        drawn from a hash of the input's own preprocessed pixels (`digest_uniforms`), so
        the false-rejection rate sits at alpha and a decision is reproducible."""
        t0 = time.perf_counter()
        result = self.probe.run(x)
        maps = self.method_pass(x, result.cam_class)
        t1 = time.perf_counter()
        # a model can emit NaN/inf for one image (overflow, a bad layer); that image is an
        # error record and the others of the batch are scored as if it were not there
        errors = _nonfinite_rows(result, maps)
        good = np.setdiff1d(np.arange(len(x)), np.fromiter(errors, int, len(errors)))
        if len(good) == 0:
            return _all_errors(result, errors)
        sub = result if not errors else _take(result, good)
        scores = self.comparator.score(sub, maps={k: v[good] for k, v in maps.items()})
        real = sub.logits[:, : self.bundle.spec.num_classes]
        predicted = sub.cam_class
        confidence = _softmax_at(real, predicted)
        scores["garbage"] = garbage_score(sub.logits, sub.features, self.bundle.head,
                                          self.bundle.spec.garbage_class)
        t2 = time.perf_counter()
        b = self.bundle
        if len(scores) > len(b.score_names):  # a bundle built before newer scores: its own only
            keep = set(b.score_names)
            scores = {k: v for k, v in scores.items() if k in keep}
        u = digest_uniforms(x if not errors else x[good])
        p_values = b.calibrator.p_values(scores, predicted, u=u)
        p_value = self._combined(scores, p_values, predicted, u)
        for j in np.flatnonzero(~np.isfinite(p_value)):
            bad = [k for k, v in scores.items() if not np.isfinite(v[j])]
            errors[int(good[j])] = ("non-finite score(s) " + ", ".join(bad) if bad
                                    else "non-finite combined p-value")
        accept = p_value > self.alpha
        self.timings["probe"] += t1 - t0
        self.timings["compare"] += t2 - t1
        self.timings["decide"] += time.perf_counter() - t2
        if len(good) < len(x):  # back to n rows; the damaged ones hold NaN / reject
            scores, p_values = _spread(scores, good, len(x)), _spread(p_values, good, len(x))
            p_value = _spread({"": p_value}, good, len(x))[""]
            confidence = _spread({"": confidence}, good, len(x))[""]
            predicted = result.cam_class
            accept = np.zeros(len(x), bool)
            accept[good] = p_value[good] > self.alpha
        accept[list(errors)] = False
        family_p = _family_p_values(p_values)
        return BatchScores(result, scores, p_values, p_value, predicted, confidence, accept,
                           family_p, errors)

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
            if j in batch.errors:
                out.append(Decision.from_error(
                    rec.source, f"{rec.source}: model output unusable ({batch.errors[j]})",
                    rec.digest))
                j += 1
                continue
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

    @staticmethod
    def _log_target(log: Any) -> Any:
        if log is None:
            return None
        from verifier.runtime.log import DecisionLog

        return log if isinstance(log, DecisionLog) else DecisionLog(log)


_RESULT_FIELDS = ("logits", "features", "cam", "cam_class", "early_map", "early_stats")


def _nonfinite_rows(result: ProbeResult, maps: dict[str, np.ndarray] | None = None) -> dict[int, str]:
    """Row -> 'non-finite <fields>' for images whose probe output (or further method map)
    holds NaN or inf."""
    bad: dict[int, list[str]] = {}
    arrays = [(f, getattr(result, f)) for f in _RESULT_FIELDS if f != "cam_class"]
    arrays += [(f"block_stats[{i}]", a) for i, a in enumerate(result.block_stats)]
    arrays += [(f"block_stds[{i}]", a) for i, a in enumerate(result.block_stds)]
    arrays += [(f"{k} map", a) for k, a in (maps or {}).items()]
    for f, a in arrays:
        a = np.asarray(a)
        rows = np.flatnonzero(~np.isfinite(a.reshape(len(a), -1)).all(axis=1))
        for i in rows.tolist():
            bad.setdefault(i, []).append(f)
    return {i: "non-finite " + ", ".join(fs) + " from the model" for i, fs in bad.items()}


def _all_errors(result: ProbeResult, errors: dict[int, str]) -> BatchScores:
    n = len(result)
    nan = np.full(n, np.nan)
    return BatchScores(result, {}, {}, nan, np.asarray(result.cam_class), nan.copy(),
                       np.zeros(n, bool), {}, errors)


def _take(result: ProbeResult, rows: np.ndarray) -> ProbeResult:
    return ProbeResult(*(np.asarray(getattr(result, f))[rows] for f in _RESULT_FIELDS),
                       block_stats=tuple(np.asarray(a)[rows] for a in result.block_stats),
                       block_stds=tuple(np.asarray(a)[rows] for a in result.block_stds))


def _spread(cols: dict[str, np.ndarray], rows: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """(len(rows),) arrays back to (n,), NaN where no row was scored."""
    out = {}
    for k, v in cols.items():
        full = np.full(n, np.nan)
        full[rows] = v
        out[k] = full
    return out


def _family_p_values(p_values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Bonferroni p-value of each family of checks (`verifier.scoring.comparator.FAMILIES`)."""
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
    """A tqdm bar on a terminal (None otherwise) whose total counts the files in folders."""
    import os
    import sys

    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    from verifier.data import count_inputs

    # the listing is cheap next to decoding; a one-shot iterator is not consumed to count it
    countable = isinstance(inputs, (list, tuple, np.ndarray, str, os.PathLike))
    return tqdm(total=count_inputs(inputs) if countable else None, unit="img", desc="gate")
