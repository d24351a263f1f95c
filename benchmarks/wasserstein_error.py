"""Error and speed of the fast (sliced) Wasserstein measure against exact POT `ot.emd2`.

Run `python benchmarks/wasserstein_error.py`: prints a table per map family and
writes benchmarks/results/wasserstein_error.json (the figures in docs/measures.md).
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from reference_maps.canonical import to_grid
from verifier.examples.datasets import load_mnist, ood_images
from verifier.scoring.measures import MeasureOptions, to_distribution, wasserstein

GRID = 16
N_PER_FAMILY = 200
SEED = 0
OUT = Path(__file__).resolve().parent / "results" / "wasserstein_error.json"


def map_families(n: int = N_PER_FAMILY, seed: int = SEED) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Realistic (map, reference) pairs, each (n, 16, 16) float32 canonical maps."""
    rng = np.random.default_rng(seed)
    x, y = load_mnist()
    digits = to_grid(x[:n].astype(np.float32))
    pool_x, pool_y = x[1000:], y[1000:]
    class_refs = to_grid(np.stack([to_grid(pool_x[pool_y == c][:300].astype(np.float32)).mean(0)
                                   for c in range(10)]))
    photos = to_grid(ood_images("photos", 2 * n, size=(64, 64), seed=seed).astype(np.float32))
    blobs, shifted = _blob_pairs(n, rng)
    return {
        "mnist_vs_own_class_ref": (digits, class_refs[y[:n]]),
        "mnist_vs_other_class_ref": (digits, class_refs[(y[:n] + 1 + rng.integers(0, 9, n)) % 10]),
        "gradcam_blobs_vs_jittered": (blobs, shifted),
        "gradcam_blobs_vs_unrelated": (blobs, np.roll(shifted, 1, axis=0)),
        "photo_crops_vs_photo_crops": (photos[:n], photos[n:]),
    }


def evaluate(maps: np.ndarray, refs: np.ndarray, directions: int = 32,
             exact: tuple[np.ndarray, float] | None = None) -> dict[str, float]:
    """Exact vs fast on one family: errors, rank agreement and time per pair of each mode.
    `exact`: already computed (values, seconds per pair), to time the slow mode only once."""
    if exact is None:
        t0 = time.perf_counter()
        values = wasserstein(maps, refs, MeasureOptions(wasserstein="exact"))
        exact = values, (time.perf_counter() - t0) / len(maps)
    exact_values, t_exact = exact
    opts = MeasureOptions(wasserstein="fast", wasserstein_directions=directions)
    wasserstein(maps[:4], refs[:4], opts)  # warm the per-grid projection cache
    t0 = time.perf_counter()
    fast = wasserstein(maps, refs, opts)
    t_fast = (time.perf_counter() - t0) / len(maps)
    return _figures(exact_values, fast) | {"ms_per_pair_exact": 1e3 * t_exact, "ms_per_pair_fast": 1e3 * t_fast}


def sinkhorn_figures(maps: np.ndarray, refs: np.ndarray, exact: np.ndarray, eps: float = 0.01,
                     iters: int = 100) -> dict[str, float]:
    """The alternative considered: batched float64 Sinkhorn transport cost (for the docs)."""
    from verifier.scoring.measures import _exact_cost  # the same cost matrix exact mode uses

    a, b = to_distribution(maps), to_distribution(refs)
    cost = _exact_cost(*maps.shape[1:])
    k = np.exp(-cost / eps)
    t0 = time.perf_counter()
    u = np.ones_like(a)
    for _ in range(iters):
        v = b / np.maximum(u @ k, 1e-300)
        u = a / np.maximum(v @ k, 1e-300)
    val = np.einsum("ni,ij,nj->n", u, k * cost, v)
    t = (time.perf_counter() - t0) / len(maps)
    return _figures(exact, val) | {"ms_per_pair": 1e3 * t, "eps": eps, "iterations": iters}


def main() -> None:
    families = map_families()
    rows: dict[str, dict[str, float]] = {}
    for name, (m, r) in families.items():
        rows[name] = evaluate(m, r)
    all_m = np.concatenate([m for m, _ in families.values()])
    all_r = np.concatenate([r for _, r in families.values()])
    all_exact = np.concatenate([wasserstein(m, r, MeasureOptions(wasserstein="exact"))
                                for m, r in families.values()])
    t_exact = float(np.mean([rows[f]["ms_per_pair_exact"] for f in families])) / 1e3
    rows["all"] = evaluate(all_m, all_r, exact=(all_exact, t_exact))
    by_directions = {str(k): evaluate(all_m, all_r, k, exact=(all_exact, t_exact))
                     for k in (8, 16, 32, 64, 128)}
    sinkhorn = sinkhorn_figures(all_m, all_r, all_exact)
    _print_table(rows, by_directions, sinkhorn)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({
        "grid": [GRID, GRID], "pairs_per_family": N_PER_FAMILY, "seed": SEED,
        "default_directions": MeasureOptions().wasserstein_directions,
        "machine": platform.platform(), "families": rows,
        "all_by_directions": by_directions, "sinkhorn_alternative": sinkhorn,
    }, indent=2) + "\n")
    print(f"wrote {OUT}")


def _figures(exact: np.ndarray, approx: np.ndarray) -> dict[str, float]:
    rel = np.abs(approx - exact) / np.maximum(exact, 1e-12)
    return {
        "n": int(len(exact)),
        "mean_exact": float(exact.mean()),
        "mean_abs_error": float(np.abs(approx - exact).mean()),
        "mean_rel_error": float(rel.mean()),
        "max_rel_error": float(rel.max()),
        "spearman": float(spearmanr(approx, exact)[0]),
        "max_excess_over_exact": float((approx - exact).max()),  # <= 0: fast is a lower bound
        "ratio_fast_over_exact_min": float((approx / np.maximum(exact, 1e-12)).min()),
    }


def _blob_pairs(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM-like maps: 1-3 Gaussian blobs; the partner has every blob moved up to 2 cells
    and its width and weight perturbed, as a same-class image's map would be."""
    yy, xx = np.mgrid[0:GRID, 0:GRID].astype(np.float64)
    a = np.zeros((n, GRID, GRID))
    b = np.zeros((n, GRID, GRID))
    for i in range(n):
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(2, GRID - 3, 2)
            s, wt = rng.uniform(1.2, 3.5), rng.uniform(0.4, 1.0)
            a[i] += wt * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
            dy, dx = rng.uniform(-2, 2, 2)
            s2, wt2 = s * rng.uniform(0.8, 1.25), wt * rng.uniform(0.7, 1.3)
            b[i] += wt2 * np.exp(-((yy - cy - dy) ** 2 + (xx - cx - dx) ** 2) / (2 * s2 * s2))
    return to_grid(a.astype(np.float32)), to_grid(b.astype(np.float32))


def _print_table(rows: dict[str, dict[str, float]], by_k: dict[str, dict[str, float]],
                 sinkhorn: dict[str, float]) -> None:
    head = f"{'family':30s} {'n':>4s} {'mean W':>7s} {'MAE':>7s} {'MRE':>6s} {'rho':>6s} " \
           f"{'exact ms':>8s} {'fast ms':>8s}"
    print(head)
    for name, r in rows.items():
        print(f"{name:30s} {r['n']:4d} {r['mean_exact']:7.4f} {r['mean_abs_error']:7.4f} "
              f"{r['mean_rel_error']:6.3f} {r['spearman']:6.3f} {r['ms_per_pair_exact']:8.3f} "
              f"{r['ms_per_pair_fast']:8.4f}")
    print("\nall pairs, by number of directions")
    for k, r in by_k.items():
        print(f"  K={k:>4s}  MAE {r['mean_abs_error']:.4f}  MRE {r['mean_rel_error']:.3f}  "
              f"rho {r['spearman']:.4f}  fast ms {r['ms_per_pair_fast']:.4f}")
    print(f"\nalternative, batched Sinkhorn eps={sinkhorn['eps']} x{sinkhorn['iterations']}: "
          f"MAE {sinkhorn['mean_abs_error']:.4f}  MRE {sinkhorn['mean_rel_error']:.3f}  "
          f"rho {sinkhorn['spearman']:.4f}  ms {sinkhorn['ms_per_pair']:.3f}")


if __name__ == "__main__":
    main()
