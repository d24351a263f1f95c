"""A job's inputs cut into chunks of one batch each, as a folder of small Parquet files that
Ray Data maps (one block per file), plus the job's staging folder. No Ray here.

A chunk holds exactly the inputs one local batch would hold, in the same order, so every
engine probes the same batches (same numbers) and a missing chunk names its inputs.
"""
from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from verifier.data import InputItem, expand_inputs, manifest_paths

__all__ = ["CHUNK_SCHEMA", "ChunkIndex", "Staging", "job_items", "write_chunks", "chunk_items",
           "missing_sources"]

CHUNK_SCHEMA = pa.schema([
    pa.field("chunk", pa.int64(), nullable=False),
    pa.field("source", pa.list_(pa.string())),
    pa.field("path", pa.list_(pa.binary())),   # os.fsencode: any file name survives
    pa.field("label", pa.list_(pa.int64())),
    pa.field("error", pa.list_(pa.string())),
])


@dataclass(frozen=True)
class ChunkIndex:
    """What `write_chunks` wrote: `chunks` chunks holding `items` inputs, under `folder`."""

    folder: Path
    chunks: int
    items: int


class Staging:
    """A hidden folder beside a job's output (`.<name>.<engine>-<hex>`), made by this job and
    removed by it whatever happens. It must be visible to every worker (shared storage on a
    cluster), like the inputs and the output."""

    def __init__(self, beside: str | Path, engine: str = "ray") -> None:
        beside = Path(beside).absolute()
        self.path = beside.parent / f".{beside.name}.{engine}-{uuid.uuid4().hex[:12]}"

    def __enter__(self) -> Path:
        self.path.mkdir(parents=False)
        return self.path

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def job_items(inputs: Sequence[str | Path], manifest: str | Path | None = None,
              labels: Sequence[int] | None = None) -> Iterator[InputItem]:
    """The job's inputs in local order, named as a local run names them: `inputs` (files,
    folders walked sorted), then the paths `manifest` lists (CSV or Parquet `path` column),
    streamed. Paths are made absolute here, so a worker opens the same files."""
    for item in expand_inputs(list(inputs), labels):
        yield _absolute(item)
    if manifest is not None:
        for p in manifest_paths(manifest):
            for item in expand_inputs([p]):
                yield _absolute(item)


def write_chunks(items: Iterable[InputItem], batch_size: int, folder: Path,
                 chunks_per_file: int = 1) -> ChunkIndex:
    """Cut items into chunks of `batch_size`, `chunks_per_file` chunks per Parquet file under
    `folder` (streamed: one file's rows in memory at a time)."""
    if batch_size < 1 or chunks_per_file < 1:
        raise ValueError("batch_size and chunks_per_file must be >= 1")
    folder.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    chunk: list[InputItem] = []
    n_chunks = n_items = 0

    def flush_chunk() -> None:
        nonlocal n_chunks
        rows.append({"chunk": n_chunks, "source": [i.source for i in chunk],
                     "path": [None if i.path is None else os.fsencode(i.path) for i in chunk],
                     "label": [i.label for i in chunk], "error": [i.error for i in chunk]})
        n_chunks += 1
        chunk.clear()
        if len(rows) == chunks_per_file:
            flush_file()

    def flush_file() -> None:
        if rows:
            name = folder / f"chunks-{rows[0]['chunk']:09d}.parquet"
            pq.write_table(pa.Table.from_pylist(rows, schema=CHUNK_SCHEMA), name)
            rows.clear()

    for item in items:
        chunk.append(item)
        n_items += 1
        if len(chunk) == batch_size:
            flush_chunk()
    if chunk:
        flush_chunk()
    flush_file()
    return ChunkIndex(folder, n_chunks, n_items)


def chunk_items(row: dict) -> tuple[int, list[InputItem]]:
    """A chunk row (as `pa.Table.to_pylist` gives it) back to (chunk index, its items)."""
    items = [InputItem(s, None if p is None else Path(os.fsdecode(p)), lab, err)
             for s, p, lab, err in zip(row["source"], row["path"], row["label"], row["error"])]
    return int(row["chunk"]), items


def missing_sources(index: ChunkIndex, done: Iterable[int]) -> list[str]:
    """The inputs of the chunks not in `done`, in input order."""
    done = set(done)
    out: list[str] = []
    for f in sorted(index.folder.glob("chunks-*.parquet")):
        for row in pq.read_table(f).to_pylist():
            if row["chunk"] not in done:
                out.extend(row["source"])
    return out


def _absolute(item: InputItem) -> InputItem:
    if item.path is None:
        return item
    return InputItem(item.source, Path(os.path.abspath(item.path)), item.label, item.error)
