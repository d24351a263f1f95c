"""How many rows (masked inputs, tail re-evaluations) one batched model call takes.

A whole model run on a chunk holds intermediate activations many times its input, and past
a few hundred rows they no longer fit in cache: chunks are bounded in rows and in elements.
"""
from __future__ import annotations

__all__ = ["CHUNK_ELEMENTS", "CHUNK_ROWS", "rows_per_chunk"]

#: most input elements one chunk may hold (16 MiB of float32)
CHUNK_ELEMENTS = 1 << 22
#: most rows one chunk may hold
CHUNK_ROWS = 256


def rows_per_chunk(elements_per_row: int) -> int:
    """Rows per chunk for rows of `elements_per_row` input elements (at least 1)."""
    return max(1, min(CHUNK_ROWS, CHUNK_ELEMENTS // max(1, elements_per_row)))
