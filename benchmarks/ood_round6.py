"""Round 6 of the gate's near-OOD work (issue 12): which channel statistics the joint Gaussian
should hold, measured alone and inside round 5's combination.

The same model, sets and cached score matrices as `benchmarks/ood_round5.py` (same seed = same
run). The conv blocks' full activations are captured by plain forward hooks (this script's own
extraction, independent of the probe) and reduced to per-channel statistics: spatial means
(what the joint Gaussian held up to round 5), standard deviations, maxima and 2 x 2 spatial
means, optionally square-rooted. Each candidate vector gets a tied OAS-shrunk Gaussian fitted
on the reference digits, as the store does.

`--alone`: each statistic's tied and relative Mahalanobis distances as detectors by themselves.
Default: round 5's combination (`stouffer_groups`, `COMBINED_SCORES`) with the two `feat_joint_*`
columns recomputed from each candidate vector (the "means" candidate reproduces round 5's
columns), fitted on `--reps` random thirds of the calibration images and scored by the issue's
targets against its listed peers, as in round 5 (`ood_round5.misses`).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ood_round6.py --seed 0 1 2 3 --alone
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ood_round6.py --seed 0 1 2 3 4 5 6 7   # choose
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ood_round6.py --seed 8 9 10 11 --only "means (round 5)" "means+stds"

Prints a table and writes benchmarks/results/ood_round6_seed<seeds>.json.
"""
from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("ood_round5", HERE / "ood_round5.py")
r5 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(r5)
oc = r5.oc

BLOCKS = ("c1", "c2", "c3")
#: candidate joint vectors: name -> (statistics concatenated, transform)
CANDIDATES: dict[str, tuple[list[str], str]] = {
    "means (round 5)": (["c1_mean", "c2_mean", "c3_mean"], "none"),
    "means+stds": (["c1_mean", "c2_mean", "c3_mean", "c1_std", "c2_std", "c3_std"], "none"),
    "sqrt(means+stds)": (["c1_mean", "c2_mean", "c3_mean", "c1_std", "c2_std", "c3_std"], "sqrt"),
    "sqrt(2x2 means)": (["c1_p2", "c2_p2", "c3_p2"], "sqrt"),
}
#: statistics measured alone (`--alone`)
ALONE: list[tuple[list[str], str]] = [
    (["c3_mean"], "none"), (["c3_max"], "none"), (["c3_std"], "none"), (["c3_p2"], "none"),
    (["c2_p2"], "sqrt"), (["c1_mean", "c2_mean", "c3_mean"], "none"),
    (["c1_std", "c2_std", "c3_std"], "none"), (["c1_p2", "c2_p2", "c3_p2"], "sqrt"),
    (["c1_mean", "c2_mean", "c3_mean", "c1_std", "c2_std", "c3_std"], "none"),
]


def block_statistics(seed: int, cache: Path) -> dict[str, dict[str, np.ndarray]]:
    """set -> statistic -> (n, C) float64, from the model `benchmarks/ood.py --seed SEED` trains
    (cached as npz: plain arrays, no pickle)."""
    path = cache / f"ood_round6_stats_seed{seed}.npz"
    if not path.exists():
        t = time.perf_counter()
        out = _extract(seed)
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **{f"{s}/{k}": v for s, d in out.items() for k, v in d.items()})
        tmp.replace(path)
        print(f"seed {seed}: block statistics in {time.perf_counter() - t:.0f} s -> {path}", file=sys.stderr)
    with np.load(path, allow_pickle=False) as z:
        out: dict[str, dict[str, np.ndarray]] = {}
        for key in z.files:
            s, k = key.split("/")
            out.setdefault(s, {})[k] = z[key]
    return out


def _extract(seed: int) -> dict[str, dict[str, np.ndarray]]:
    import torch

    from verifier.examples.zoo import SmallCNN, preprocess_uint8, train_classifier

    torch.set_num_threads(1)
    data = oc.ood._split()
    torch.manual_seed(seed)
    model = train_classifier(SmallCNN(num_classes=oc.ood.IN_CLASSES), *data["reference"], epochs=4,
                             seed=seed).eval()
    sets = {k: v[0] for k, v in oc.ood._sets(data).items()}
    sets.update(oc.synthetic_sets(data["reference"][0], np.random.default_rng(123)))
    sets["reference"] = data["reference"][0]
    acts: dict[str, torch.Tensor] = {}
    hooks = [model.features[i].register_forward_hook(lambda m, a, o, k=k: acts.__setitem__(k, o.detach()))
             for k, i in zip(BLOCKS, (2, 5, 8))]  # SmallCNN's three conv blocks (after their ReLU)
    out: dict[str, dict[str, np.ndarray]] = {}
    try:
        for name, imgs in sets.items():
            x = preprocess_uint8(imgs)
            parts: dict[str, list[np.ndarray]] = {}
            with torch.no_grad():
                for i in range(0, len(x), 512):
                    model(x[i:i + 512])
                    for b in BLOCKS:
                        a = acts[b].double()
                        for stat, v in (("mean", a.mean((2, 3))), ("std", a.std((2, 3), correction=0)),
                                        ("max", a.amax((2, 3))),
                                        ("p2", torch.nn.functional.adaptive_avg_pool2d(a, 2).flatten(1))):
                            parts.setdefault(f"{b}_{stat}", []).append(v.numpy())
            out[name] = {k: np.concatenate(v) for k, v in parts.items()}
    finally:
        for h in hooks:
            h.remove()
    out["reference"]["labels"] = data["reference"][1].astype(np.int64)[:, None]
    return out


class TiedGaussian:
    """Class means, one tied OAS-shrunk covariance and one OAS-shrunk Gaussian of all rows (as
    `reference_maps.features.FeatureReference` keeps them); distances by whitening."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        from sklearn.covariance import OAS

        ks = np.unique(y)
        self.means = np.stack([x[y == k].mean(0) for k in ks])
        self.white = _whitening(OAS(assume_centered=True).fit(x - self.means[np.searchsorted(ks, y)]).covariance_)
        self.mu0 = x.mean(0)
        self.white0 = _whitening(OAS(assume_centered=True).fit(x - self.mu0).covariance_)

    def maha(self, x: np.ndarray) -> np.ndarray:
        z, m = x @ self.white, self.means @ self.white
        return ((z[:, None] - m[None]) ** 2).sum(-1).min(1)

    def relative(self, x: np.ndarray) -> np.ndarray:
        return self.maha(x) - (((x - self.mu0) @ self.white0) ** 2).sum(1)


def _whitening(cov: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(cov)
    return v / np.sqrt(np.maximum(w, w.max() * 1e-12))[None]


def vectors(stats: dict, parts: list[str], transform: str) -> dict[str, np.ndarray]:
    f = np.sqrt if transform == "sqrt" else (lambda a: a)
    return {s: np.hstack([f(np.maximum(d[p], 0.0)) if transform == "sqrt" else d[p] for p in parts])
            for s, d in stats.items()}


def alone(seeds: list[int], cache: Path) -> dict:
    sets = (*oc.ood.NEAR, *oc.SYN, *oc.FAR)
    res: dict = {}
    for seed in seeds:
        stats = block_statistics(seed, cache)
        labels = stats["reference"]["labels"][:, 0]
        for parts, tr in ALONE:
            v = vectors(stats, parts, tr)
            g = TiedGaussian(v["reference"], labels)
            for kind in ("maha", "relative"):
                sc = {s: getattr(g, kind)(v[s]) for s in ("id_test", *sets)}
                name = f"{tr + '(' if tr != 'none' else ''}{'+'.join(parts)}{')' if tr != 'none' else ''} {kind}"
                res.setdefault(name, {})[seed] = {s: (oc.auroc(sc["id_test"], sc[s]), oc.fpr95(sc["id_test"], sc[s]))
                                                   for s in sets}
    return res


def combined(seeds: list[int], reps: int, only: list[str] | None, cache: Path) -> tuple[dict, dict]:
    groups, inner = r5.CANDIDATES["round 5: + early pair - msp - energy, Stouffer within (adopted)"]
    near = oc.ood.NEAR
    chosen = {k: v for k, v in CANDIDATES.items() if not only or any(o in k for o in only)}
    res: dict = {}
    peers_out: dict = {}
    for seed in seeds:
        d = oc.load(seed, cache)
        stats = block_statistics(seed, cache)
        labels = stats["reference"]["labels"][:, 0]
        sp = d["peers"]
        peers = {p: {n: (oc.auroc(sp["id_test"][p], sp[n][p]), oc.fpr95(sp["id_test"][p], sp[n][p]))
                     for n in near} for p in (*r5.LISTED, "relative_maha")}
        peers_out[seed] = peers
        names = list(d["names"])
        ja, jr = names.index("feat_joint_mahalanobis"), names.index("feat_joint_relative_mahalanobis")
        base = {k: r["matrix"] for k, r in d["runs"].items()}
        for name, (parts, tr) in chosen.items():
            v = vectors(stats, parts, tr)
            g = TiedGaussian(v["reference"], labels)
            for k, r in d["runs"].items():
                m = base[k].copy()
                m[:, ja], m[:, jr] = g.maha(v[k]), g.relative(v[k])
                r["matrix"] = m
            r_ = r5.evaluate(d, groups, inner, reps)
            res.setdefault(name, {})[seed] = {
                "sets": r_, "misses": r5.misses(r_, {p: peers[p] for p in r5.LISTED}),
                "misses_ext": r5.misses(r_, peers)}
    return res, peers_out


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, nargs="+", default=[0])
    ap.add_argument("--reps", type=int, default=10, help="random fit splits per candidate")
    ap.add_argument("--only", nargs="*", default=None, help="candidates whose name contains one of these")
    ap.add_argument("--alone", action="store_true", help="each statistic alone, not in the combination")
    ap.add_argument("--cache", type=Path, default=HERE / "results" / "cache")
    args = ap.parse_args(argv)
    near, syn = oc.ood.NEAR, oc.SYN
    tag = "_".join(map(str, args.seed))
    if args.alone:
        res = alone(args.seed, args.cache)
        print(f"seeds {args.seed}: each statistic alone (fit on the reference digits), means over seeds, "
              f"AUROC / FPR95")
        print(f"{'statistic':<64} {'held-out':>12} {'rotated':>12} {'mix':>12} {'sklearn':>12} {'synthetic':>12}")
        for name, per in res.items():
            m = lambda n, i: np.mean([per[s][n][i] for s in per])  # noqa: E731
            cells = [f"{m(n, 0):.3f}/{m(n, 1):.3f}" for n in ("held_out_6_9", "rotated_90", "two_digit_mix",
                                                               "sklearn_digits")]
            cells.append(f"{np.mean([m(n, 0) for n in syn]):.3f}/{np.mean([m(n, 1) for n in syn]):.3f}")
            print(f"{name[:64]:<64} " + " ".join(f"{c:>12}" for c in cells))
        out = HERE / "results" / f"ood_round6_alone_seed{tag}.json"
        result: dict = {"seeds": args.seed, "alone": res}
    else:
        res, peers = combined(args.seed, args.reps, args.only, args.cache)
        print(f"seeds {args.seed}, {args.reps} fit splits each: round 5's combination with the joint Gaussian "
              f"on each candidate vector; misses of the issue's targets vs its listed peers (ext: + relative "
              f"Mahalanobis); means over seeds, AUROC (FPR95)")
        print(f"{'joint vector':<20} {'miss':>4} {'ext':>4} {'held-out':>14} {'rotated':>14} {'mix':>14} "
              f"{'near mean':>14} {'syn FPR95':>9}")
        for name, per in res.items():
            m = lambda n, i: np.mean([per[s]["sets"][n][i] for s in per])  # noqa: E731
            nm = [np.mean([m(n, i) for n in near]) for i in (0, 1)]
            print(f"{name:<20} {sum(len(v['misses']) for v in per.values()):>4} "
                  f"{sum(len(v['misses_ext']) for v in per.values()):>4} "
                  f"{m('held_out_6_9', 0):.3f} ({m('held_out_6_9', 1):.3f}) {m('rotated_90', 0):.3f} "
                  f"({m('rotated_90', 1):.3f}) {m('two_digit_mix', 0):.3f} ({m('two_digit_mix', 1):.3f}) "
                  f"{nm[0]:.3f} ({nm[1]:.3f}) {np.mean([m(n, 1) for n in syn]):>9.3f}")
            for s, v in per.items():
                if v["misses_ext"]:
                    print(f"    seed {s}: {v['misses'] or '-'}; with relative Mahalanobis: {v['misses_ext']}")
        out = HERE / "results" / f"ood_round6_seed{tag}.json"
        result = {"seeds": args.seed, "reps": args.reps, "peers": peers, "candidates": res}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
