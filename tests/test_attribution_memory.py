"""Memory stays flat over repeated attribution calls, measured by process RSS.

tracemalloc does not see tensor storage, so the process's resident set is read from
/proc. The check is shown able to fail: the same loop with a hook registered and never
removed (MONAI's regret) that keeps each call's early activation grows past the bound.
"""
from __future__ import annotations

import gc
from pathlib import Path

import pytest
from conftest import POOL

from verifier.attribution import METHODS, attribute
from verifier.examples.zoo import preprocess_uint8

CALLS = 200
BOUND_MB = 12.0

pytestmark = pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc (Linux)")


def rss_mb() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    import resource

    return pages * resource.getpagesize() / 2**20


def growth(call, calls: int = CALLS, warmup: int = 20) -> float:
    """RSS growth in MB over `calls` calls after `warmup` calls (allocator pools filled)."""
    for _ in range(warmup):
        call()
    gc.collect()
    before = rss_mb()
    for _ in range(calls):
        call()
    gc.collect()
    return rss_mb() - before


def test_rss_flat_over_repeated_calls(gap_model, mnist):
    x = preprocess_uint8(mnist[0][POOL][:4]).numpy()
    names = [m for m in METHODS if METHODS[m].classification]
    state = {"i": 0}

    def one_call():  # cycles through every method
        attribute(gap_model, x, names[state["i"] % len(names)])
        state["i"] += 1

    assert growth(one_call) < BOUND_MB

    # The same loop leaking ~2 MB a call must fail the bound. Large (the heap keeps the
    # freed transients of Score-CAM's and CRM's batched forwards, tens of MB, and a small
    # leak first fills those without raising RSS), and 80 calls keep the test short.
    kept: list = []
    leak = gap_model.features[2].register_forward_hook(
        lambda m, i, o: kept.append(o.detach().repeat(10, 1, 1, 1)) if o.shape[0] == 4 else None)
    try:
        assert growth(one_call, calls=80, warmup=0) > BOUND_MB
    finally:
        leak.remove()
        kept.clear()
