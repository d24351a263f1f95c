"""Round 4 of choosing the gate's combination: group-wise statistics (issue 12).

The combined scores are split into groups, each group is combined on its own (Fisher,
Tippett or a redundancy-weighted Fisher), every group statistic is mapped to its fit-split
tail probability (the same ECDF + Gaussian-tail mapping as each single score), and the
groups are merged by their minimum (Tippett) or by Fisher. Groupings: "2" (semantic /
covariate) and "3" (output / penultimate / blocks), fixed before any figure was seen;
"2r" and "3r" (the two relative distances as one group), defined after the component
AUROCs of seeds 0-3 had been printed; "c<t>" clusters of correlated scores found on the
fit split (in-distribution only). Also two smoother per-score tail maps. For the two-digit
mix (declared before their figures, chosen on seeds 0-3, confirmed on 4-7): the peer's
multi-layer formula in the gate's column, sums of normal scores inside the groups, a
class-side / distribution-side grouping ("2s", "3s") and two early scores in the second
group (docs/gate.md, "The two-digit mix"). Candidates are fitted on random thirds of the
calibration images, as in `benchmarks/ood_choose.py` (same cached score matrices, same
sets, same metrics).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ood_groups.py --seed 0
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("ood_choose", HERE / "ood_choose.py")
oc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(oc)

#: groups chosen before any figure was seen, by the kind of shift a score answers to
SEMANTIC = ("penultimate_mahalanobis", "penultimate_relative_mahalanobis", "knn", "msp", "energy", "garbage")
OUTPUT = ("msp", "energy", "garbage")
PENULTIMATE = ("penultimate_mahalanobis", "penultimate_relative_mahalanobis", "knn")
#: a second partition, chosen after the component AUROCs (the relative scores carry new classes)
RELATIVE = ("penultimate_relative_mahalanobis", "feat_joint_relative_mahalanobis")
WEAK_OUTPUT = ("knn", "msp", "energy", "garbage")
#: the two-digit-mix round: what tells the classes apart (the head's output and the relative
#: distances) / what describes the whole feature distribution (absolute distances, knn, garbage)
CLASS_SIDE = (*RELATIVE, "msp", "energy")


def groups_of(names: list[str], kind: str) -> list[list[int]]:
    """Column indices per group: "2" = semantic / covariate, "3" = output / penultimate / blocks;
    "2r" = relative / the rest, "3r" = relative / output-side (knn, msp, energy, garbage) / absolute
    distances."""
    if kind == "2":
        parts = [SEMANTIC]
    elif kind == "3":
        parts = [OUTPUT, PENULTIMATE]
    elif kind == "2r":
        parts = [RELATIVE]
    elif kind == "3r":
        parts = [RELATIVE, WEAK_OUTPUT]
    elif kind == "2s":
        parts = [CLASS_SIDE]
    elif kind == "3s":
        parts = [RELATIVE, ("msp", "energy")]
    else:
        raise ValueError(kind)
    out = [[j for j, n in enumerate(names) if n in p] for p in parts]
    taken = {j for g in out for j in g}
    out.append([j for j in range(len(names)) if j not in taken])  # the block distances feat_*
    return [g for g in out if g]


def clusters(z_fit: np.ndarray, threshold: float) -> list[list[int]]:
    """Groups from in-distribution data only: average-linkage clusters of the scores by
    1 - |Spearman rho| of their fit-split normal scores, cut at 1 - `threshold` (scores
    correlated above ~threshold share a group)."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform
    from scipy.stats import spearmanr

    rho = np.abs(spearmanr(z_fit).statistic)
    dist = squareform(np.clip(1.0 - rho, 0.0, None), checks=False)
    lab = fcluster(linkage(dist, "average"), 1.0 - threshold, criterion="distance")
    return [list(np.flatnonzero(lab == c)) for c in np.unique(lab)]


def _nlq(z: np.ndarray) -> np.ndarray:
    return -oc._logsf(z)


def redundancy_weights(z_fit: np.ndarray) -> np.ndarray:
    """w_j = 1 / sum_k rho_jk^2 (Spearman, fit split): a score with r near-copies weighs ~1/r."""
    from scipy.stats import spearmanr

    rho = np.atleast_2d(spearmanr(z_fit).statistic) if z_fit.shape[1] > 1 else np.ones((1, 1))
    return 1.0 / (rho ** 2).sum(axis=1)


INNER = {"fisher": lambda z, w: _nlq(z).sum(1),
         "tippett": lambda z, w: z.max(1),
         "wfisher": lambda z, w: (_nlq(z) * w).sum(1),
         # the two-digit-mix round: sums of normal scores, the dense-signal statistics
         "stouffer": lambda z, w: z.sum(1),
         "stouffer_pos": lambda z, w: np.maximum(z, 0.0).sum(1)}


def grouped(z_fit: np.ndarray, z_all: dict[str, np.ndarray], groups: list[list[int]],
            inner: str, outer: str) -> dict[str, np.ndarray]:
    """Group statistics -> per-group fit-split normal scores -> merged statistic (higher = worse)."""
    from calibration.indist import InDistributionConformal

    def stats(z, ws):
        return np.column_stack([INNER[inner](z[:, g], w) for g, w in zip(groups, ws)])

    ws = [redundancy_weights(z_fit[:, g]) for g in groups]
    t_fit = stats(z_fit, ws)
    mapper = InDistributionConformal("fisher").fit(t_fit, [True] * len(groups))
    out = {}
    for k, z in z_all.items():
        zg = mapper._z(stats(z, ws))
        out[k] = zg.max(1) if outer == "min" else _nlq(zg).sum(1)
    return out


def evaluate(d: dict, use: list[str], cand: tuple, reps: int, sets) -> dict:
    """Mean AUROC / FPR95 per set over `reps` random thirds of the calibration images."""
    from calibration.indist import InDistributionConformal
    from verifier.scoring.comparator import higher_is_worse

    names = d["names"]
    if cand[0] == "plus":  # more of the bundle's scores in the combination (in the last group)
        use, cand = [*use, *cand[1]], cand[2:]
    mats = {k: r["matrix"][:, [names.index(c) for c in use]] for k, r in d["runs"].items()}
    if cand[0] == "peer_ml":  # the peer's multi-layer formula in place of the gate's column
        j = use.index("feat_multilayer_mahalanobis")
        for k, m in mats.items():
            m[:, j] = d["peers"][k]["multi_layer_maha"]  # fancy indexing made m a copy
        cand = cand[1:]
    ncal = len(mats["calibration"])
    res = []
    for rep in range(reps):
        fit = np.random.default_rng(rep).permutation(ncal)[: ncal // 3]
        c = InDistributionConformal("fisher").fit(mats["calibration"][fit], [higher_is_worse(n) for n in use])
        z = {k: c._z(v) for k, v in mats.items()}
        if cand[0] in ("smooth", "yeojohnson"):
            z = {k: zmap(c, mats["calibration"][fit], v, cand[0]) for k, v in mats.items()}
        if cand[0] in ("flat", "smooth", "yeojohnson"):
            s = {k: _nlq(v).sum(1) for k, v in z.items()}
        elif cand[0] == "oos_groups":  # the gate's "fisher_groups", group tails out of sample
            s = oos_groups(mats["calibration"][fit], mats, use, [higher_is_worse(n) for n in use])
        elif cand[0] == "features_only":  # Fisher over the `features` family (no msp, energy, garbage)
            cols = [j for j, n in enumerate(use) if n not in ("msp", "energy", "garbage")]
            s = {k: _nlq(v[:, cols]).sum(1) for k, v in z.items()}
        else:
            _, kind, inner, outer = cand
            z_fit = c._z(mats["calibration"][fit])
            groups = clusters(z_fit, float(kind[1:])) if kind.startswith("c") else groups_of(use, kind)
            s = grouped(z_fit, z, groups, inner, outer)
        res.append({n: (oc.auroc(s["id_test"], s[n]), oc.fpr95(s["id_test"], s[n])) for n in sets})
    return {n: (float(np.mean([r[n][0] for r in res])), float(np.mean([r[n][1] for r in res]))) for n in sets}


def oos_groups(fit_rows: np.ndarray, mats: dict[str, np.ndarray], use: list[str], dirs: list[bool]):
    """`calibration.indist`'s "fisher_groups" (G2r), but the fit rows' group sums that the group
    tails are fitted to come out of sample: each half of the fit split scored against the
    per-score ECDFs of the other half (the gate's are in sample)."""
    from calibration.indist import InDistributionConformal, _tails

    groups = [1 if n in RELATIVE else 0 for n in use]
    c = InDistributionConformal("fisher_groups").fit(fit_rows, dirs, use, groups)
    h = len(fit_rows) // 2
    a, b = (InDistributionConformal("fisher").fit(part, dirs, groups=groups) for part in (fit_rows[:h], fit_rows[h:]))
    t = np.vstack([b._group_sums(b._z(fit_rows[:h])), a._group_sums(a._z(fit_rows[h:]))])
    c.group_ref_, c.group_loc_, c.group_scale_ = _tails(t)
    return {k: c.score(v) for k, v in mats.items()}


def zmap(c, fit_rows: np.ndarray, x: np.ndarray, how: str) -> np.ndarray:
    """Smoother per-score normal scores than the fit-split ECDF: "smooth" = the Gaussian tail
    (fitted to the upper half) over the whole upper half, the ECDF below the median;
    "yeojohnson" = a Yeo-Johnson transform of the oriented score fitted on the fit split."""
    if how == "smooth":
        o = x * c.sign_
        z_tail = (o - c.tail_loc_) / c.tail_scale_
        return np.where(o > c.tail_loc_, np.maximum(z_tail, 0.0), c._z(x))
    from sklearn.preprocessing import PowerTransformer

    pt = PowerTransformer(method="yeo-johnson").fit(fit_rows * c.sign_)
    return pt.transform(x * c.sign_)


def candidates() -> dict[str, tuple]:
    out = {"round 3: Fisher over all 12": ("flat",),
           "Fisher, features family only": ("features_only",),
           "G2r Fisher/Fisher, out-of-sample group tails": ("oos_groups",),
           "Fisher, Gaussian upper half": ("smooth",),
           "Fisher, Yeo-Johnson z": ("yeojohnson",)}
    # the two-digit-mix round (declared before its figures): the peer's multi-layer column, and
    # sums of normal scores inside the groups (evidence spread over many correlated scores)
    out["peer multi-layer column, Fisher over all 12"] = ("peer_ml", "flat")
    out["peer multi-layer column, G2r fisher/fisher"] = ("peer_ml", "group", "2r", "fisher", "fisher")
    for inner in ("stouffer", "stouffer_pos"):
        out[f"G2r {inner} within, fisher across"] = ("group", "2r", inner, "fisher")
    for kind, inner in (("2s", "fisher"), ("2s", "stouffer"), ("3s", "fisher")):
        out[f"G{kind} {inner} within, fisher across"] = ("group", kind, inner, "fisher")
    early2 = ("early_wasserstein", "early_mahalanobis")
    out["G2r fisher/fisher + early_wasserstein, early_mahalanobis"] = ("plus", early2, "group", "2r", "fisher", "fisher")
    out["Fisher over all 12 + early_wasserstein, early_mahalanobis"] = ("plus", early2, "flat")
    early = ("early_iou", "early_dice", "early_ssim", "early_cosine", "early_pearson", "early_kl", *early2)
    out["G2r fisher/fisher + the early_features family"] = ("plus", early, "group", "2r", "fisher", "fisher")
    for kind in ("2", "3", "2r", "3r", "c0.5", "c0.7", "c0.85"):
        for inner in ("fisher", "tippett", "wfisher"):
            for outer in ("min", "fisher"):
                out[f"G{kind} {inner} within, {outer} across"] = ("group", kind, inner, outer)
    return out


def lambda_sweep(d: dict, lams=(0.0, 0.5, 0.8, 0.9, 1.0)) -> None:
    """Prototype, not a gate score: the joint block distance minus lambda times its background
    distance (lambda = 0: absolute, as `feat_joint_mahalanobis`; 1: relative), AUROC per near set."""
    labels = d["ref_labels"]
    means, prec, g, gprec = oc._tied(np.hstack(d["ref"]["blocks"]), labels, int(labels.max()) + 1)

    def score(r, lam):
        x = np.hstack(r["blocks"])
        diff = x[:, None] - means[None]
        return np.einsum("nkc,cd,nkd->nk", diff, prec, diff).min(1) - lam * np.einsum("nc,cd,nd->n", x - g, gprec, x - g)

    for lam in lams:
        ind = score(d["runs"]["id_test"], lam)
        print(f"joint distance - {lam:.1f} x background: " + " ".join(
            f"{n[:11]} {oc.auroc(ind, score(d['runs'][n], lam)):.3f}" for n in oc.ood.NEAR))


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, nargs="+", default=[0])
    ap.add_argument("--reps", type=int, default=5, help="random fit splits per candidate")
    ap.add_argument("--lambda-sweep", action="store_true", help="also the relative/absolute trade-off")
    ap.add_argument("--only", nargs="*", default=None, help="candidates whose name contains one of these")
    ap.add_argument("--cache", type=Path, default=HERE / "results" / "cache")
    args = ap.parse_args(argv)
    near, syn, far = oc.ood.NEAR, oc.SYN, oc.FAR
    sets = (*near, *far, *syn)
    peers = ("mahalanobis", "relative_maha", "multi_layer_maha")
    for seed in args.seed:
        d = oc.load(seed, args.cache)
        use = list(d["combined"])
        rows = {}
        for p in peers:
            s = d["peers"]
            rows[f"peer {p}"] = {n: (oc.auroc(s["id_test"][p], s[n][p]), oc.fpr95(s["id_test"][p], s[n][p]))
                                 for n in sets}
        for name, cand in candidates().items():
            if args.only and not any(o in name for o in args.only) and not name.startswith("round 3"):
                continue
            rows[name] = evaluate(d, use, cand, args.reps, sets)
        if args.lambda_sweep:
            lambda_sweep(d)
        print(f"\nseed {seed}  AUROC/FPR95 (mean over {args.reps} fit splits); near = mean of the "
              f"{len(near)} benchmark near sets, syn = mean of {len(syn)} synthetic, far = min AUROC")
        oc.print_rows(rows, near, syn, far, width=36)
    return 0


if __name__ == "__main__":
    sys.exit(main())
