"""Near- and far-OOD detection: the gate beside standard detectors on the same model, in the same run.

A SmallCNN is trained on MNIST digits 0-5 (held-out-class protocol: digits 6-9 are
OOD); a bundle is built; every detector is fitted on the same reference images,
thresholded on the same calibration split and tested on the same sets. Peers follow
their published formulas: MSP (Hendrycks & Gimpel 2017), energy (Liu et al. 2020),
Mahalanobis on penultimate features with a tied covariance (Lee et al. 2018), relative
Mahalanobis (Ren et al. 2021: minus the distance to one Gaussian of all features), ViM
(Wang et al. 2022), KNN k=50 on L2-normalised features (Sun et al. 2022), multi-layer
Mahalanobis over the channel means of every conv block (summed z-scores), and the
gate's previous fused score (logistic regression vs garbage). Prints a table and
writes benchmarks/results/ood.json.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ood.py
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.special import logsumexp, softmax

from calibration.conformal import conformal_p_values, digest_uniforms
from calibration.indist import COMBINE_METHODS, InDistributionConformal
from verifier.bundle.builder import build_bundle
from verifier.bundle.directory import Bundle
from verifier.examples.datasets import OOD_SOURCES, load_mnist, load_sklearn_digits, ood_images
from verifier.examples.zoo import SmallCNN, mnist_spec, preprocess_uint8, train_classifier
from verifier.runtime.gatekeeper import Gatekeeper
from verifier.scoring.comparator import (DEPTH_EXTRA, JOINT_SCORES, combine_group, higher_is_worse,
                                         is_combined, score_family)

ALPHA = 0.05
IN_CLASSES = 6
N_SET = 600
NEAR = ("held_out_6_9", "sklearn_digits", "rotated_90", "two_digit_mix")
LABELLED = ("sklearn_digits", "rotated_90")  # shifted but labelled (classes 0-5)
#: what rounds 1-4 combined (whole families); round 5's default is `COMBINED_SCORES`. The
#: `gate_round4` / `gate_round3` rows are those statistics on the current store, whose joint
#: Gaussian holds the blocks' channel standard deviations since round 6 (docs/gate.md)
ROUND4_SCORES = ("features", "output", "garbage")
#: detectors whose decision is the gate's own p-value (thresholded at alpha, not re-calibrated)
GATES = ("gate", "gate_round4", "gate_round3")


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0, help="model initialisation and training seed")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    data = _split()
    torch.manual_seed(args.seed)  # the initial weights too: the whole run is reproducible
    model = train_classifier(SmallCNN(num_classes=IN_CLASSES), *data["reference"], epochs=4,
                             seed=args.seed)
    spec = mnist_spec(model, classes=IN_CLASSES)
    with tempfile.TemporaryDirectory() as tmp:
        build_bundle(spec, data["reference"], Path(tmp) / "b", calibration=data["calibration"],
                     alpha=ALPHA, seed=0)
        gate = Gatekeeper(Bundle.load(Path(tmp) / "b", model=model))
        # round 4's gate: the same build (same splits, same seed) with its statistic and scores
        build_bundle(spec, data["reference"], Path(tmp) / "b4", calibration=data["calibration"],
                     alpha=ALPHA, seed=0, combine_method="fisher_groups", combine_scores=ROUND4_SCORES)
        round4 = Bundle.load(Path(tmp) / "b4", model=model).combiner
    t_build = time.perf_counter() - t0
    sets = _sets(data)
    runs = {name: _run(gate, imgs) for name, (imgs, _) in sets.items()}
    ref = _run(gate, data["reference"][0])
    peers = _Peers(model, ref, data["reference"][1])
    scores = {name: peers.scores(r) for name, r in runs.items()}
    names = gate.bundle.score_names
    round3 = _round3(gate, round4)
    used4 = [list(names).index(n) for n in round4.names_]
    for name, r in runs.items():
        scores[name]["gate"] = -r["p_value"]            # the decision's own p-value
        scores[name]["gate_round4"] = -round4.p_values(r["matrix"][:, used4], r["pred"], u=r["u"])
        scores[name]["gate_round3"] = -round3(r)
        used = [list(names).index(n) for n in gate.bundle.combiner.names_]
        scores[name]["gate_statistic"] = gate.bundle.combiner.score(r["matrix"][:, used])
        scores[name]["old_fused"] = gate.bundle.fusion.score(r["matrix"])
    combos = _combinations(runs, gate, names)
    for name in runs:
        scores[name].update(combos[name])
    rows = _table(scores, runs, sets)
    _print(rows)
    components = _components(runs, names)
    cost = _cost(gate, sets["id_test"][0])
    out = Path(__file__).parent / "results" / f"ood{'' if args.seed == 0 else f'_seed{args.seed}'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"alpha": ALPHA, "in_classes": IN_CLASSES,
                               "n": {k: len(v[0]) for k, v in sets.items()},
                               "guarantee": gate.bundle.guarantee,
                               "score_names": list(names), "rows": rows,
                               "component_auroc": components, "cost": cost,
                               "seed": args.seed,
                               "build_seconds": t_build,
                               "seconds": time.perf_counter() - t0}, indent=2))
    print(f"wrote {out} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------- data
def _split() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    x, y = load_mnist()
    inside = np.flatnonzero(y < IN_CLASSES)
    n = len(inside)
    a, b = int(0.6 * n), int(0.8 * n)
    part = {"reference": inside[:a], "calibration": inside[a:b], "test": inside[b:]}
    out = {k: (x[v], y[v]) for k, v in part.items()}
    out["held_out"] = (x[y >= IN_CLASSES], y[y >= IN_CLASSES])
    return out


def _sets(data) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """name -> (uint8 (n, 28, 28), labels or None). The test digits first (in-distribution)."""
    rng = np.random.default_rng(11)
    tx, ty = data["test"]
    sets = {"id_test": (tx, ty), "calibration": data["calibration"]}
    ho = data["held_out"][0]
    sets["held_out_6_9"] = (ho[rng.choice(len(ho), N_SET, replace=False)], None)
    sx, sy = load_sklearn_digits()
    keep = np.flatnonzero(sy < IN_CLASSES)[:N_SET]
    sets["sklearn_digits"] = (_upsample_8x8(sx[keep]), sy[keep])
    sets["rotated_90"] = (np.rot90(tx, 1, axes=(1, 2)).copy(), ty)
    i, j = rng.integers(0, len(tx), (2, N_SET))
    mix = np.maximum(tx[i].astype(np.int32), np.roll(tx[j], 4, axis=2).astype(np.int32))
    sets["two_digit_mix"] = (mix.clip(0, 255).astype(np.uint8), None)
    for s in OOD_SOURCES:
        sets[s] = (ood_images(s, 300, seed=11), None)
    return sets


def _upsample_8x8(img: np.ndarray) -> np.ndarray:
    """(n, 8, 8) uint8 -> (n, 28, 28): bilinear to 20 x 20 and centred, as MNIST's digit box."""
    from reference_maps.canonical import resize_maps

    big = resize_maps(img.astype(np.float32), (20, 20))
    out = np.zeros((len(img), 28, 28), dtype=np.float32)
    out[:, 4:24, 4:24] = big
    return np.clip(out, 0, 255).round().astype(np.uint8)


def _round3(gate: Gatekeeper, c: InDistributionConformal):
    """The gate of round 3 from round 4's combiner `c` (same build): plain Fisher over the same
    scores, fit on the same fit split (its per-score ECDFs are the combiner's sorted columns),
    conformalised on the same conformal split, the same tie-breaking uniforms."""
    b = gate.bundle
    old = InDistributionConformal("fisher", guarantee=c.guarantee, delta=c.delta).fit(
        c.ref_ * c.sign_, c.sign_ > 0, c.names_)
    old.calibrate(np.column_stack([b.calibration_scores[n] for n in c.names_]), b.calibration_classes,
                  len(b.classes))
    used = [list(b.score_names).index(n) for n in c.names_]
    return lambda r: old.p_values(r["matrix"][:, used], r["pred"], u=r["u"])


def _run(gate: Gatekeeper, imgs: np.ndarray) -> dict[str, np.ndarray]:
    x = preprocess_uint8(imgs).numpy()
    parts = [gate.score_batch(x[i:i + 256]) for i in range(0, len(x), 256)]
    names = gate.bundle.score_names
    return {"matrix": np.concatenate([np.column_stack([p.scores[n] for n in names]) for p in parts]),
            "p_value": np.concatenate([p.p_value for p in parts]),
            "accept": np.concatenate([p.accept for p in parts]),
            "pred": np.concatenate([p.predicted for p in parts]),
            "u": digest_uniforms(x),
            "logits": np.concatenate([p.result.logits for p in parts]).astype(np.float64),
            "features": np.concatenate([p.result.features for p in parts]).astype(np.float64),
            "blocks": [np.concatenate([p.result.block_stats[b] for p in parts]).astype(np.float64)
                       for b in range(len(parts[0].result.block_stats))]}


# ---------------------------------------------------------------------- peers
class _Peers:
    """Standard detectors from their published formulas, fitted on the reference features.
    Every score: higher = more OOD."""

    def __init__(self, model: torch.nn.Module, ref: dict[str, np.ndarray], labels: np.ndarray) -> None:
        from sklearn.neighbors import NearestNeighbors

        self.maha = _TiedGaussian(ref["features"], labels)
        self.background = _TiedGaussian(ref["features"], np.zeros(len(labels), dtype=np.int64))
        self.layers = [_TiedGaussian(b, labels) for b in ref["blocks"]]
        d = np.stack([g.distance(b) for g, b in zip(self.layers, ref["blocks"])], axis=1)
        self.layer_mu, self.layer_sd = d.mean(0), d.std(0)
        bank = _l2(ref["features"])
        self.knn = NearestNeighbors(n_neighbors=50).fit(bank)
        lin = model.head[-1]
        w = lin.weight.detach().double().numpy()
        b = lin.bias.detach().double().numpy()
        self.u = -np.linalg.pinv(w) @ b                       # ViM origin
        f = ref["features"] - self.u
        dim = f.shape[1] // 2                                 # principal dimension D' (D/2)
        evals, evecs = np.linalg.eigh(np.cov(f, rowvar=False, bias=True))
        self.ns = evecs[:, np.argsort(evals)[::-1][dim:]]     # residual space
        vlogit = np.linalg.norm(f @ self.ns, axis=1)
        self.vim_alpha = ref["logits"].max(1).sum() / vlogit.sum()

    def scores(self, r: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        logits = r["logits"]
        vlogit = np.linalg.norm((r["features"] - self.u) @ self.ns, axis=1) * self.vim_alpha
        layer = np.stack([g.distance(b) for g, b in zip(self.layers, r["blocks"])], axis=1)
        return {"msp": -softmax(logits, axis=1).max(1),
                "energy": -logsumexp(logits, axis=1),
                "mahalanobis": self.maha.distance(r["features"]),
                "relative_maha": self.maha.distance(r["features"]) - self.background.distance(r["features"]),
                "vim": vlogit - logsumexp(logits, axis=1),
                "knn": self.knn.kneighbors(_l2(r["features"]))[0][:, -1],
                "multi_layer_maha": ((layer - self.layer_mu) / self.layer_sd).sum(1)}


class _TiedGaussian:
    """Class means + one tied covariance (Lee et al. 2018); distance = min over classes."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.means = np.stack([x[y == k].mean(0) for k in np.unique(y)])
        centred = x - self.means[np.searchsorted(np.unique(y), y)]
        self.prec = np.linalg.pinv(centred.T @ centred / len(x))

    def distance(self, x: np.ndarray) -> np.ndarray:
        d = x[:, None, :] - self.means[None]
        return np.einsum("nkc,cd,nkd->nk", d, self.prec, d).min(1)


def _l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# ---------------------------------------------------------------------- combinations
def _combinations(runs, gate: Gatekeeper, names) -> dict[str, dict[str, np.ndarray]]:
    """Statistics of the in-distribution-only combiners, fitted on a third of the
    calibration split (as the builder does), for the table that chooses among them."""
    cal = runs["calibration"]["matrix"]
    rng = np.random.default_rng(0)
    fit = rng.permutation(len(cal))[: len(cal) // 3]
    dirs = [higher_is_worse(n) for n in names]
    out: dict[str, dict[str, np.ndarray]] = {k: {} for k in runs}
    fams = [score_family(n) for n in names]
    subsets = {"all": list(range(len(names))),
               "feat": [j for j, f in enumerate(fams) if f in ROUND4_SCORES],
               "feat_early": [j for j, f in enumerate(fams) if f in (*ROUND4_SCORES, "early_features")],
               "round5": [j for j, n in enumerate(names) if is_combined(n)]}
    # the gate before the relative and multi-layer scores (issue 12, first round)
    subsets["feat_prev"] = [j for j in subsets["feat"] if names[j] not in (*DEPTH_EXTRA, *JOINT_SCORES)]
    # the gate before the joint block Gaussian (issue 12, second round)
    subsets["feat_nojoint"] = [j for j in subsets["feat"] if names[j] not in JOINT_SCORES]
    for sub, cols in subsets.items():
        for method in COMBINE_METHODS:
            c = InDistributionConformal(method).fit(cal[fit][:, cols], [dirs[j] for j in cols],
                                                    groups=[combine_group(names[j]) for j in cols])
            for k, r in runs.items():
                out[k][f"{method}_{sub}"] = c.score(r["matrix"][:, cols])
    # a larger fit split (half of the calibration images; the conformal split shrinks)
    half = rng.permutation(len(cal))[: len(cal) // 2]
    cols = subsets["feat"]
    c = InDistributionConformal("fisher").fit(cal[half][:, cols], [dirs[j] for j in cols])
    for k, r in runs.items():
        out[k]["fisher_feat_fit_half"] = c.score(r["matrix"][:, cols])
    return out


def _components(runs, names) -> dict[str, dict[str, float]]:
    """AUROC of each of the gate's own scores (oriented), per near-OOD set: a diagnostic."""
    out = {}
    for j, n in enumerate(names):
        sign = 1.0 if higher_is_worse(n) else -1.0
        ind = sign * runs["id_test"]["matrix"][:, j]
        out[n] = {s: _auroc(ind, sign * runs[s]["matrix"][:, j]) for s in NEAR}
    print("\ncomponent AUROC " + " ".join(f"{s[:12]:>12}" for s in NEAR))
    for n, row in out.items():
        print(f"{n:<26}" + " ".join(f"{row[s]:>12.3f}" for s in NEAR))
    return out


def _cost(gate: Gatekeeper, imgs: np.ndarray) -> dict[str, float]:
    """Seconds per image of the whole gate scoring vs the new depth scores alone (best of 3)."""
    from verifier.scoring.comparator import depth_scores

    x = preprocess_uint8(imgs).numpy()[:256]
    whole, depth = [], []
    for _ in range(3):
        t = time.perf_counter()
        batch = gate.score_batch(x)
        whole.append(time.perf_counter() - t)
        t = time.perf_counter()
        depth_scores(gate.bundle.store, batch.result)
        depth.append(time.perf_counter() - t)
    out = {"score_batch_s_per_image": min(whole) / len(x), "depth_scores_s_per_image": min(depth) / len(x)}
    out["depth_share"] = out["depth_scores_s_per_image"] / out["score_batch_s_per_image"]
    print(f"\ncost: score_batch {1e3 * out['score_batch_s_per_image']:.3f} ms/image, of which the "
          f"new depth scores {1e3 * out['depth_scores_s_per_image']:.3f} ms ({out['depth_share']:.1%})")
    return out


# ---------------------------------------------------------------------- metrics
def _table(scores, runs, sets) -> dict[str, dict[str, dict[str, float]]]:
    """detector -> set -> {auroc, fpr95, rejection at the calibrated threshold, ...}."""
    rows: dict[str, dict[str, dict[str, float]]] = {}
    for det in scores["id_test"]:
        ind, cal = scores["id_test"][det], scores["calibration"][det]
        ref = np.sort(cal)
        thr_reject = lambda s: conformal_p_values(ref, s, True) <= ALPHA  # noqa: E731
        if det in GATES:  # the gate's own decisions (and rounds 3 and 4's)
            thr_reject = lambda s: -s <= ALPHA  # noqa: E731  (s = -p_value)
        row = {"id_test": {"frr": float(thr_reject(ind).mean())}}
        for name in sets:
            if name in ("id_test", "calibration"):
                continue
            out = scores[name][det]
            rej = thr_reject(out)
            cell = {"auroc": _auroc(ind, out), "fpr95": _fpr95(ind, out), "rejection": float(rej.mean())}
            labels = sets[name][1]
            if name in LABELLED and labels is not None:
                correct = runs[name]["pred"] == labels
                cell["acc_accepted"] = float(correct[~rej].mean()) if (~rej).any() else float("nan")
                cell["acc_rejected"] = float(correct[rej].mean()) if rej.any() else float("nan")
            row[name] = cell
        near = [row[n]["auroc"] for n in NEAR]
        row["near_mean"] = {"auroc": float(np.mean(near)),
                            "fpr95": float(np.mean([row[n]["fpr95"] for n in NEAR]))}
        rows[det] = row
    return rows


def _auroc(ind: np.ndarray, out: np.ndarray) -> float:
    """P(OOD score > ID score) + half the ties (higher score = more OOD)."""
    from scipy.stats import mannwhitneyu

    return float(mannwhitneyu(out, ind).statistic / (len(ind) * len(out)))


def _fpr95(ind: np.ndarray, out: np.ndarray) -> float:
    """Share of OOD accepted when the threshold accepts 95% of in-distribution inputs."""
    thr = np.quantile(ind, 0.95)
    return float(np.mean(out <= thr))


def _print(rows) -> None:
    sets = [k for k in next(iter(rows.values())) if k not in ("id_test",)]
    print(f"{'detector':<20} {'FRR':>5} " + " ".join(f"{s[:14]:>14}" for s in sets))
    print(f"{'':<20} {'':>5} " + " ".join(f"{'AUROC/FPR95':>14}" for _ in sets))
    for det, row in rows.items():
        cells = " ".join(f"{row[s]['auroc']:.3f}/{row[s]['fpr95']:.3f}".rjust(14) for s in sets)
        print(f"{det:<20} {row['id_test']['frr']:>5.3f} {cells}")
    print("\nrejection at the calibrated threshold (alpha 0.05); accuracy of accepted/rejected")
    for det, row in rows.items():
        cells = " ".join(f"{row[s]['rejection']:.3f}".rjust(7) for s in sets if s != "near_mean")
        acc = " ".join(f"{s[:8]} {row[s]['acc_accepted']:.2f}/{row[s]['acc_rejected']:.2f}"
                       for s in LABELLED)
        print(f"{det:<20} {cells}  {acc}")


if __name__ == "__main__":
    sys.exit(main())
