"""Choosing the gate's in-distribution combination: candidates compared on the benchmark's
sets and on synthetic near-OOD made from the reference images, over repeated fit splits.

The same model, bundle and sets as `benchmarks/ood.py` (same seed = same run), plus seven
synthetic near-OOD sets built from the *reference* digits only (never the test digits):
blends of two digits, rotations of 30-60 degrees, a zoomed crop, a 6-9 pixel shift,
halves of two digits, dilated strokes and mirrored digits. Every candidate statistic is
fitted on a random third of the calibration images (as the builder does), `--reps` times,
and its AUROC / FPR95 (test digits vs each set) averaged over the fits. The score matrices
are cached (`--cache`), so a candidate costs seconds.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ood_choose.py --seed 0
"""
from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("ood_bench", HERE / "ood.py")
ood = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ood)

SYN = ("syn_blend", "syn_rot45", "syn_crop", "syn_shift", "syn_halves", "syn_dilate", "syn_flip")
FAR = ("photos", "textures", "dicom", "noise")


def synthetic_sets(imgs: np.ndarray, rng: np.random.Generator, n: int = 600) -> dict[str, np.ndarray]:
    """Seven near-OOD sets (n, 28, 28) uint8 made from reference digits `imgs`."""
    from scipy.ndimage import grey_dilation, rotate, zoom
    from scipy.ndimage import shift as nd_shift

    x = imgs[rng.choice(len(imgs), n, replace=False)].astype(np.float32)
    y = imgs[rng.choice(len(imgs), n, replace=False)].astype(np.float32)
    ang = rng.uniform(30, 60, n) * rng.choice([-1, 1], n)
    out = {"syn_blend": 0.5 * x + 0.5 * y,
           "syn_rot45": np.stack([rotate(a, t, reshape=False, order=1) for a, t in zip(x, ang)]),
           "syn_crop": np.stack([zoom(a[4:18, 7:21], 2, order=1)[:28, :28] for a in x]),
           "syn_shift": np.stack([nd_shift(a, (rng.integers(-8, 9), rng.choice([-1, 1]) * rng.integers(6, 10)),
                                           order=0) for a in x]),
           "syn_halves": np.concatenate([x[:, :, 14:], y[:, :, :14]], axis=2),
           "syn_dilate": np.stack([grey_dilation(a, size=(3, 3)) for a in x]),
           "syn_flip": x[:, :, ::-1]}
    return {k: np.clip(v, 0, 255).round().astype(np.uint8) for k, v in out.items()}


def collect(seed: int) -> dict:
    """Train, build and score exactly as `benchmarks/ood.py --seed SEED`, plus the synthetic sets."""
    import torch

    from verifier.bundle.builder import build_bundle
    from verifier.bundle.directory import Bundle
    from verifier.examples.zoo import SmallCNN, mnist_spec, train_classifier
    from verifier.runtime.gatekeeper import Gatekeeper

    torch.set_num_threads(1)
    data = ood._split()
    torch.manual_seed(seed)
    model = train_classifier(SmallCNN(num_classes=ood.IN_CLASSES), *data["reference"], epochs=4, seed=seed)
    spec = mnist_spec(model, classes=ood.IN_CLASSES)
    with tempfile.TemporaryDirectory() as tmp:
        build_bundle(spec, data["reference"], Path(tmp) / "b", calibration=data["calibration"],
                     alpha=ood.ALPHA, seed=0)
        gate = Gatekeeper(Bundle.load(Path(tmp) / "b", model=model))
    sets = {k: v[0] for k, v in ood._sets(data).items()}
    sets.update(synthetic_sets(data["reference"][0], np.random.default_rng(123)))
    runs = {k: ood._run(gate, v) for k, v in sets.items()}
    ref = ood._run(gate, data["reference"][0])
    peers = ood._Peers(model, ref, data["reference"][1])
    keep = ("matrix", "p_value", "pred", "features", "logits", "blocks")
    return {"names": list(gate.bundle.score_names), "combined": list(gate.bundle.combiner.names_),
            "runs": {k: {f: r[f] for f in keep} for k, r in runs.items()},
            "ref": {f: ref[f] for f in keep}, "ref_labels": data["reference"][1],
            "peers": {k: peers.scores(r) for k, r in runs.items()}}


def load(seed: int, cache: Path) -> dict:
    """`collect(seed)`, cached as arrays (npz, no pickle) plus a JSON manifest of their layout."""
    arrays, manifest = cache / f"ood_choose_seed{seed}.npz", cache / f"ood_choose_seed{seed}.json"
    if arrays.exists() and manifest.exists():
        with np.load(arrays, allow_pickle=False) as z:
            return _unflatten(json.loads(manifest.read_text()), dict(z))
    t = time.perf_counter()
    out = collect(seed)
    cache.mkdir(parents=True, exist_ok=True)
    store: dict[str, np.ndarray] = {}
    layout = _flatten(out, "", store)
    tmp = arrays.with_suffix(".tmp.npz")
    np.savez(tmp, **store)
    tmp.replace(arrays)
    manifest.write_text(json.dumps(layout))
    print(f"seed {seed}: scored in {time.perf_counter() - t:.0f} s -> {arrays}", file=sys.stderr)
    return out


def _flatten(value: object, key: str, store: dict[str, np.ndarray]) -> object:
    """JSON layout of nested dicts / lists whose leaves are arrays (moved to `store` by key)
    or JSON values (kept in the layout)."""
    if isinstance(value, dict):
        return {"dict": {k: _flatten(v, f"{key}/{k}", store) for k, v in value.items()}}
    if isinstance(value, (list, tuple)) and any(isinstance(v, np.ndarray) for v in value):
        return {"list": [_flatten(v, f"{key}/{i}", store) for i, v in enumerate(value)]}
    if isinstance(value, np.ndarray):
        store[key] = value
        return {"array": key}
    return {"json": value}


def _unflatten(layout: dict, store: dict[str, np.ndarray]) -> object:
    if "dict" in layout:
        return {k: _unflatten(v, store) for k, v in layout["dict"].items()}
    if "list" in layout:
        return [_unflatten(v, store) for v in layout["list"]]
    return store[layout["array"]] if "array" in layout else layout["json"]


def auroc(ind: np.ndarray, out: np.ndarray) -> float:
    return ood._auroc(ind, out)


def fpr95(ind: np.ndarray, out: np.ndarray) -> float:
    return ood._fpr95(ind, out)


# ---------------------------------------------------------------------- candidates
def _tied(x: np.ndarray, y: np.ndarray, k: int):
    """Class means, tied OAS-shrunk precision, and one background Gaussian (mean, precision)."""
    from sklearn.covariance import OAS

    means = np.stack([x[y == c].mean(0) for c in range(k)])
    prec = np.linalg.inv(OAS().fit(x - means[y]).covariance_)
    g = x.mean(0)
    return means, prec, g, np.linalg.inv(OAS().fit(x - g).covariance_)


def joint_scores(d: dict) -> dict[str, dict[str, np.ndarray]]:
    """Prototype scores not in the gate: the channel means of every conv block concatenated
    into one vector, tied-covariance Mahalanobis to the nearest class (`joint`) and its relative
    version (`joint_rel`, Ren et al. 2021), fitted on the reference images like the store (so
    on the reference rows themselves they are in-sample, as the store's scores are)."""
    rows = {**d["runs"], "__ref": d["ref"]}
    labels = d["ref_labels"]
    means, prec, g, gprec = _tied(np.hstack(d["ref"]["blocks"]), labels, int(labels.max()) + 1)
    out: dict[str, dict[str, np.ndarray]] = {"joint": {}, "joint_rel": {}}
    for k, r in rows.items():
        x = np.hstack(r["blocks"])
        diff = x[:, None] - means[None]
        dk = np.einsum("nkc,cd,nkd->nk", diff, prec, diff).min(1)
        out["joint"][k] = dk
        out["joint_rel"][k] = dk - np.einsum("nc,cd,nd->n", x - g, gprec, x - g)
    return out


STATISTICS = {"fisher": lambda z: -_logsf(z).sum(1), "stouffer": lambda z: z.sum(1),
              "stouffer_pos": lambda z: np.maximum(z, 0.0).sum(1)}


def _logsf(z):
    from scipy.stats import norm

    return norm.logsf(z)


def evaluate(d: dict, extra: dict, use: list[str], stat: str, source: str, reps: int, sets) -> dict:
    """Mean AUROC / FPR95 per set of one candidate: per-score tails fitted on a random third of
    the calibration images (`source="fit"`, `reps` draws) or on the reference images' own
    scores (`"ref"`, one fit), then the statistic."""
    from calibration.indist import InDistributionConformal
    from verifier.scoring.comparator import higher_is_worse

    names = d["names"]
    col = lambda c, k: (d["ref"] if k == "__ref" else d["runs"][k])["matrix"][:, names.index(c)] \
        if c in names else extra[c][k]
    mats = {k: np.column_stack([col(c, k) for c in use]) for k in (*d["runs"], "__ref")}
    dirs = [higher_is_worse(c) if c in names else True for c in use]
    ncal = len(mats["calibration"])
    res = []
    for rep in range(reps if source == "fit" else 1):
        fit = np.random.default_rng(rep).permutation(ncal)[: ncal // 3]
        rows = mats["calibration"][fit] if source == "fit" else mats["__ref"]
        c = InDistributionConformal("fisher").fit(rows, dirs)
        s = {k: STATISTICS[stat](c._z(v)) for k, v in mats.items() if k != "__ref"}
        res.append({n: (auroc(s["id_test"], s[n]), fpr95(s["id_test"], s[n])) for n in sets})
    return {n: (float(np.mean([r[n][0] for r in res])), float(np.mean([r[n][1] for r in res]))) for n in sets}


def candidates(d: dict) -> dict[str, tuple[list[str], str, str]]:
    """name -> (scores, statistic, tail source)."""
    from verifier.scoring.comparator import JOINT_SCORES

    comb = [c for c in d["combined"] if c not in JOINT_SCORES]  # the second round's set
    joint = comb + ["joint", "joint_rel"]  # = the store's JOINT_SCORES (tests/test_nearood.py)
    return {"round 2: Fisher, fit split": (comb, "fisher", "fit"),
            "Stouffer, fit split": (comb, "stouffer", "fit"),
            "Stouffer+ (sum of max(z, 0)), fit split": (comb, "stouffer_pos", "fit"),
            "Fisher, reference tails": (comb, "fisher", "ref"),
            "ADOPTED: Fisher + joint, fit split": (joint, "fisher", "fit"),
            "best on seed 0: Fisher + joint, ref. tails": (joint, "fisher", "ref"),
            "Stouffer+ + joint, reference tails": (joint, "stouffer_pos", "ref")}


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, nargs="+", default=[0])
    ap.add_argument("--reps", type=int, default=5, help="random fit splits per candidate")
    ap.add_argument("--cache", type=Path, default=HERE / "results" / "cache")
    args = ap.parse_args(argv)
    near = ood.NEAR
    sets = (*near, *FAR, *SYN)
    peers = ("mahalanobis", "relative_maha", "multi_layer_maha", "energy", "knn", "vim", "msp", "old_fused")
    for seed in args.seed:
        d = load(seed, args.cache)
        extra = joint_scores(d)
        rows = {}
        for p in peers:
            if p in d["peers"]["id_test"]:
                s = d["peers"]
                rows[f"peer {p}"] = {n: (auroc(s["id_test"][p], s[n][p]), fpr95(s["id_test"][p], s[n][p])) for n in sets}
        rows["gate p_value (builder split)"] = {n: (auroc(-d["runs"]["id_test"]["p_value"], -d["runs"][n]["p_value"]),
                                                    fpr95(-d["runs"]["id_test"]["p_value"], -d["runs"][n]["p_value"]))
                                                for n in sets}
        for name, (use, stat, src) in candidates(d).items():
            rows[name] = evaluate(d, extra, use, stat, src, args.reps, sets)
        print(f"\nseed {seed}   AUROC/FPR95; near = mean of {len(near)} benchmark near-OOD sets, "
              f"syn = mean of {len(SYN)} synthetic sets, far = min AUROC over {len(FAR)}")
        print_rows(rows, near, SYN, FAR)
    return 0


def print_rows(rows: dict, near: list[str], syn: list[str], far: list[str], width: int = 44) -> None:
    """One line per candidate: AUROC/FPR95 per near set, the near and synthetic means, far min."""
    print(f"{'':<{width}}" + " ".join(f"{n[:11]:>11}" for n in near) + f" {'near':>11} {'syn':>11} {'far':>5}")
    for name, r in rows.items():
        m = [np.mean([r[n][i] for n in near]) for i in (0, 1)]
        s = [np.mean([r[n][i] for n in syn]) for i in (0, 1)]
        print(f"{name[:width]:<{width}}" + " ".join(f"{r[n][0]:.3f}/{r[n][1]:.3f}"[:11].rjust(11) for n in near)
              + f" {m[0]:.3f}/{m[1]:.3f} {s[0]:.3f}/{s[1]:.3f} {min(r[n][0] for n in far):.3f}")


if __name__ == "__main__":
    sys.exit(main())
