"""Build, gate to a file and audit on the engine `EngineOptions` names: the entry points the
CLI calls. `local` runs in this process (no Ray); `ray` runs the heavy passes on Ray workers
and gives the same result (same store, calibration, decisions, verdict).
"""
from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from verifier.engines.chunks import Staging, job_items, write_chunks
from verifier.engines.options import EngineError, EngineOptions

__all__ = ["build", "gate_to_file", "audit", "GateSummary"]


@dataclass
class GateSummary:
    """What `gate_to_file` wrote: `records` decisions (one per input) to `out`."""

    out: Path
    records: int
    accepted: int
    errors: int


def build(spec: Any, data: Any, out: str | Path, options: EngineOptions, **kwargs: Any) -> Any:
    """`verifier.bundle.builder.build_bundle` on the engine; returns the saved `Bundle`."""
    from verifier.bundle.builder import build_bundle
    from verifier.bundle.directory import check_bundle_out

    if options.name == "local":
        return build_bundle(spec, data, out, **kwargs)
    check_bundle_out(out, kwargs.get("overwrite", False))  # before any cluster work
    Path(out).absolute().parent.mkdir(parents=True, exist_ok=True)
    from verifier.engines.ray_engine import RayBuild, RayCluster

    with RayCluster(options) as ray, Staging(out) as stage:
        return build_bundle(spec, data, out, engine=RayBuild(ray, options, stage), **kwargs)


def gate_to_file(bundle: str | Path, inputs: Sequence[str | Path], out: str | Path,
                 options: EngineOptions, *, manifest: str | Path | None = None, spec: Any = None,
                 alpha: float | None = None, batch_size: int = 64, device: str | None = None,
                 key: str | Path | None = None, log: str | Path | None = None,
                 overwrite: bool = False, progress: bool = False) -> GateSummary:
    """Gate files, folders and the paths a CSV/Parquet `manifest` lists; write one row per
    input to `out` (Parquet, the decision log's schema; temporary name, then renamed), in
    input order, and append them to the decision log `log` when given. An existing `out` is
    replaced only with `overwrite` and only if this tool wrote it."""
    from verifier.runtime.decisions_file import check_decisions_out

    out = check_decisions_out(out, overwrite)
    if options.name == "local":
        return _local_gate(bundle, inputs, out, manifest=manifest, spec=spec, alpha=alpha,
                           batch_size=batch_size, device=device, key=key, log=log, progress=progress)
    return _ray_gate(bundle, inputs, out, options, manifest=manifest, spec=spec, alpha=alpha,
                     batch_size=batch_size, device=device, key=key, log=log, progress=progress)


def audit(bundle: Any, candidate: Any, data: Any, options: EngineOptions,
          staging_beside: str | Path | None = None, **kwargs: Any) -> Any:
    """`verifier.audit.run.audit` with both models probed on the engine; the checks run here.
    Ray's chunk files sit beside `staging_beside` (the report or JSON path; must be visible to
    every worker on a cluster), else in the temporary folder."""
    from verifier.audit.run import audit as run_audit
    from verifier.bundle.builder import LabelledData

    if options.name == "local":
        return run_audit(bundle, candidate, data, **kwargs)
    from verifier.engines.ray_engine import RayAudit, RayCluster

    labelled = LabelledData.from_source(data, bundle.classes)
    beside = Path(staging_beside) if staging_beside else Path(tempfile.gettempdir()) / "verifier-audit"
    with RayCluster(options) as ray, Staging(beside) as stage:
        return run_audit(bundle, candidate, labelled, engine=RayAudit(ray, options, stage), **kwargs)


# ------------------------------------------------------------------ gate
def _local_gate(bundle: Any, inputs: Sequence[str | Path], out: Path, *, manifest: Any, spec: Any,
                alpha: float | None, batch_size: int, device: str | None, key: Any, log: Any,
                progress: bool) -> GateSummary:
    from verifier.runtime.decisions_file import DecisionsWriter, decisions_schema, decisions_table
    from verifier.runtime.gatekeeper import Gatekeeper

    gate = Gatekeeper.load(bundle, spec=spec, alpha=alpha, device=device, batch_size=batch_size,
                           key=key)
    schema = decisions_schema(gate.bundle.score_names)
    writer = DecisionsWriter(out, schema)
    accepted = errors = 0
    try:
        for decisions in gate.iter_gate(list(job_items(inputs, manifest)), log=log, progress=progress):
            writer.write(decisions_table(decisions, schema, bundle_id=gate.bundle.bundle_id,
                                         alpha=gate.alpha))
            accepted += sum(d.accepted for d in decisions)
            errors += sum(d.error is not None for d in decisions)
        if writer.rows == 0:
            raise EngineError("no inputs to gate")
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return GateSummary(out, writer.rows, accepted, errors)


def _ray_gate(bundle: Any, inputs: Sequence[str | Path], out: Path, options: EngineOptions, *,
              manifest: Any, spec: Any, alpha: float | None, batch_size: int, device: str | None,
              key: Any, log: Any, progress: bool) -> GateSummary:
    import pyarrow.parquet as pq

    from verifier.bundle.directory import Bundle
    from verifier.engines.ray_engine import RayCluster, part_name, ray_gate
    from verifier.runtime.decisions_file import concat_parts, decisions_schema

    loaded = Bundle.load(bundle, spec=spec, key=key)  # refuse a bad bundle before any worker starts
    schema = decisions_schema(loaded.score_names)
    del loaded
    absolute = (lambda p: None if p is None else os.path.abspath(p))
    with RayCluster(options) as ray, Staging(out) as stage:
        index = write_chunks(job_items(inputs, manifest), batch_size, stage / "chunks")
        if index.items == 0:
            raise EngineError("no inputs to gate")
        parts = stage / "parts"
        parts.mkdir()
        accepted = errors = 0
        bar = _bar(progress, index.items)
        try:
            for row in ray_gate(ray, index, parts, options, bundle=absolute(bundle), spec=spec,
                                alpha=alpha, batch_size=batch_size, device=device,
                                key=absolute(key)):
                accepted += row["accepted"]
                errors += row["errors"]
                if bar is not None:
                    bar.update(row["records"])
        finally:
            if bar is not None:
                bar.close()
        files = [parts / part_name(c) for c in range(index.chunks)]
        lost = [f.name for f in files if not f.is_file()]
        if lost:
            raise EngineError(f"worker output missing for {len(lost)} chunk(s) ({lost[:5]}); "
                              f"nothing was written")
        rows = concat_parts(files, out, schema)
        if log is not None:
            from verifier.runtime.log import DecisionLog

            target = DecisionLog(log)
            for f in files:
                target.append_table(pq.read_table(f).replace_schema_metadata(None))
    return GateSummary(out, rows, accepted, errors)


def _bar(enabled: bool, total: int) -> Any:
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="gate")
