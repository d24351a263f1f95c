"""One part file of the decision log: the contract schema, the atomic write (temporary name,
fsync, rename), and the read-back check (page checksums, the rows' digest, the schema)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

__all__ = ["LogError", "FIXED_SCHEMA", "SCORE_PREFIX", "PVALUE_PREFIX"]

SCORE_PREFIX = "score_"   # raw measure, direction given by the bundle's higher_is_worse
PVALUE_PREFIX = "p_"      # per-score conformal p-value, higher = more in-distribution

#: the contract columns, in order; score_<name> / p_<name> float64 columns follow
FIXED_SCHEMA = pa.schema([
    pa.field("time", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("input", pa.string(), nullable=False),
    pa.field("digest", pa.string()),
    pa.field("bundle_id", pa.string(), nullable=False),
    pa.field("alpha", pa.float64(), nullable=False),
    pa.field("predicted_class", pa.string()),
    pa.field("confidence", pa.float64()),
    pa.field("decision", pa.string(), nullable=False),
    pa.field("p_value", pa.float64()),
    pa.field("reasons", pa.list_(pa.string())),
    pa.field("error", pa.string()),
])

#: this tool's temporaries: today's `.part-*.parquet.tmp`, and `.tmp-part-*.parquet` of older
#: versions (those matched a `**/*.parquet` glob, which is why the name changed)
_TEMP_NAME = re.compile(r"^(\.part-.+\.parquet\.tmp|\.tmp-part-.+\.parquet)$")
#: key of the parts' metadata holding a sha256 of their rows: page checksums cover the data
#: pages, not the footer, and a flipped bit there (a column's type or repetition) would
#: otherwise decode into different rows without an error
_ROWS_DIGEST = b"verifier.rows_sha256"


class LogError(RuntimeError):
    """The log cannot be read or written as asked (missing folder, corrupt file, bad rows)."""


def _write_atomic(table: pa.Table, folder: Path) -> Path:
    """Write to `.<final name>.tmp`, fsync, rename; a crash leaves only a hidden `.tmp` file
    that no `*.parquet` glob matches, and that a later append removes once stale."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    final = folder / f"part-{stamp}-{os.getpid()}-{uuid.uuid4().hex}.parquet"
    tmp = folder / f".{final.name}.tmp"
    try:
        meta = dict(table.schema.metadata or {})
        meta[_ROWS_DIGEST] = _rows_digest(table).encode()
        with open(tmp, "wb") as fh:
            # no min/max statistics: nothing covers them, and a reader that prunes with them
            # (DuckDB) would skip rows silently if one were damaged; date folders prune instead
            pq.write_table(table.replace_schema_metadata(meta), fh, write_page_checksum=True,
                           write_statistics=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(folder)  # make the rename itself durable
    return final


def _verify_part(path: Path) -> tuple[str | None, str]:
    """("corrupt" | "foreign" | None, reason): read the whole part with checksums verified."""
    try:
        table = pq.read_table(path, page_checksum_verification=True)
    except Exception as e:  # noqa: BLE001 - pyarrow raises OSError, ArrowInvalid, ... for damage
        msg = " ".join(str(e).split())[:300]
        return "corrupt", msg or type(e).__name__
    try:
        _check_table(table)
    except LogError as e:
        return "foreign", f"schema is not the decision log's ({e})"
    except Exception as e:  # noqa: BLE001 - e.g. a column name damaged into invalid UTF-8
        return "corrupt", f"unreadable schema ({type(e).__name__}: {e})"
    stored = (table.schema.metadata or {}).get(_ROWS_DIGEST)
    if stored is not None and stored != _rows_digest(table).encode():
        return "corrupt", "rows do not match the checksum written with them (damaged)"
    return None, ""  # no digest: a part from before digests were written; pages still checked


def _rows_digest(table: pa.Table) -> str:
    """sha256 over every column's name, type, validity and values, stable across a Parquet
    round trip (chunking and schema metadata do not enter it)."""
    h = hashlib.sha256()
    for name, col in zip(table.schema.names, table.columns):
        arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
        # a list's item field is named 'item' in memory and 'element' after Parquet
        kind = f"list<{arr.type.value_type}>" if pa.types.is_list(arr.type) else str(arr.type)
        h.update(f"{name}\x00{kind}\x00".encode())
        if pa.types.is_floating(arr.type) or pa.types.is_integer(arr.type) \
                or pa.types.is_timestamp(arr.type):
            h.update(np.asarray(arr.is_valid()).tobytes())
            h.update(pc.fill_null(arr, 0).to_numpy(zero_copy_only=False).tobytes())
        else:  # strings, lists of strings: small per row, JSON is canonical enough
            h.update(json.dumps(arr.to_pylist(), ensure_ascii=True).encode())
    return h.hexdigest()


def _temporaries(folder: Path) -> list[Path]:
    try:
        return [p for p in folder.iterdir() if _TEMP_NAME.match(p.name)]
    except OSError:
        return []


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms without directory handles (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _check_table(table: pa.Table) -> None:
    for f in FIXED_SCHEMA:
        if f.name not in table.schema.names:
            raise LogError(f"log table lacks contract column {f.name!r}")
        if not table.schema.field(f.name).type.equals(f.type):
            raise LogError(f"log column {f.name!r} has type {table.schema.field(f.name).type}, "
                           f"expected {f.type}")
    for name in table.schema.names:
        if name in FIXED_SCHEMA.names:
            continue
        if not (name.startswith(SCORE_PREFIX) or name.startswith(PVALUE_PREFIX)):
            raise LogError(f"unexpected log column {name!r} (score_<name> or p_<name> expected)")
        if not table.schema.field(name).type.equals(pa.float64()):
            raise LogError(f"log column {name!r} must be float64")
