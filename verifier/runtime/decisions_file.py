"""A batch job's decisions as one Parquet file (`verifier gate --out F.parquet`), in the decision
log's schema: parts per batch, then one file written under a temporary name and renamed.

The file carries a marker in its metadata, so `--overwrite` replaces only a file this tool
wrote; any other file at `--out` is refused.
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from verifier.runtime.decision import Decision
from verifier.runtime.log import decisions_to_table, log_schema

__all__ = ["DecisionsFileError", "DecisionsWriter", "decisions_schema", "check_decisions_out",
           "decisions_table", "write_part", "concat_parts"]

#: metadata key marking a decisions file this tool wrote
_MARK = b"verifier.decisions_file"


class DecisionsFileError(ValueError):
    """`--out` cannot be written as asked (another kind of file there, no parent folder)."""


def decisions_schema(score_names: Sequence[str]) -> pa.Schema:
    """The decision log's schema with a `score_<name>` and a `p_<name>` column per score
    (sorted), marked as this tool's decisions file."""
    names = sorted(score_names)
    return log_schema(names, names).with_metadata({_MARK: b"1"})


def decisions_table(decisions: Sequence[Decision], schema: pa.Schema, *, bundle_id: str,
                    alpha: float) -> pa.Table:
    """`decisions_to_table` conformed to `schema`: a batch of error records only (no scores)
    gets null score columns, so every batch of a job shares one schema."""
    table = decisions_to_table(decisions, bundle_id=bundle_id, alpha=alpha)
    cols = [table[f.name] if f.name in table.column_names else pa.nulls(len(table), f.type)
            for f in schema]
    extra = set(table.column_names) - set(schema.names)
    if extra:
        raise DecisionsFileError(f"scores {sorted(extra)} are not in the bundle's score set")
    return pa.Table.from_arrays(cols, schema=schema)


def check_decisions_out(out: str | Path, overwrite: bool = False) -> Path:
    """Refuse, before any work, an `--out` this job must not write: an existing file unless
    `overwrite` and it is a decisions file this tool wrote; a folder; a missing parent."""
    out = Path(out)
    if not out.parent.is_dir():
        raise DecisionsFileError(f"--out {out}: folder {out.parent} does not exist")
    if out.is_dir():
        raise DecisionsFileError(f"--out {out} is a folder; give a file name (decisions.parquet)")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise DecisionsFileError(f"--out {out} exists; pass --overwrite to replace it (only "
                                     "a decisions file this tool wrote is ever replaced)")
        if not _is_ours(out):
            raise DecisionsFileError(f"--out {out} is not a decisions file written by verifier; "
                                     "it is never overwritten")
    return out


class DecisionsWriter:
    """Stream tables of one schema into `out`: a hidden temporary file beside it, renamed
    into place by `commit` (a crash leaves no half file at `out`); `abort` removes it."""

    def __init__(self, out: str | Path, schema: pa.Schema) -> None:
        self.out = Path(out)
        self.schema = schema
        self.tmp = self.out.parent / f".{self.out.name}.{uuid.uuid4().hex}.tmp"
        self._writer: pq.ParquetWriter | None = pq.ParquetWriter(self.tmp, schema,
                                                                 write_page_checksum=True)
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        assert self._writer is not None, "writer already closed"
        self._writer.write_table(table)
        self.rows += table.num_rows

    def commit(self) -> Path:
        """Close, fsync and rename into place; returns `out`."""
        assert self._writer is not None, "writer already closed"
        self._writer.close()
        self._writer = None
        with open(self.tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(self.tmp, self.out)
        return self.out

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self.tmp.unlink(missing_ok=True)


def write_part(table: pa.Table, path: str | Path) -> Path:
    """Write one part atomically (temporary name, then rename): a retried writer replaces
    its own part whole, and a reader never sees half of one."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        pq.write_table(table, tmp, write_page_checksum=True)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def concat_parts(parts: Iterable[Path], out: str | Path, schema: pa.Schema) -> int:
    """Stream part files, in order, into one decisions file at `out` (one part in memory at a
    time); returns the number of rows."""
    writer = DecisionsWriter(out, schema)
    try:
        for p in parts:
            writer.write(pq.read_table(p, schema=schema))
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return writer.rows


def _is_ours(path: Path) -> bool:
    try:
        meta = pq.read_schema(path).metadata or {}
    except Exception:  # noqa: BLE001 - not Parquet at all: not ours
        return False
    return meta.get(_MARK) == b"1"
