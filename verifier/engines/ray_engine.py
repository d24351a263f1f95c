"""Build, gate and audit on Ray (the `[ray]` extra): Ray Data reads the job's chunk files,
`map_batches` hands each chunk to a pool of stateful workers (each loads the model and probe
once), and the driver folds the results in input order.

Ray is imported here only, inside functions: the local engine never needs it. Every worker
runs the same batch functions as a local run (`verifier.bundle.passes`, `pair_batch`,
`Gatekeeper.gate`), on the same batches, so the results are the local ones. A worker that dies
is restarted and its chunk redone (`retries`); a job that still cannot finish raises
`EngineError` naming the inputs left without a result, and writes nothing.
"""
from __future__ import annotations

import io
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from verifier.engines.chunks import ChunkIndex, chunk_items, missing_sources, write_chunks
from verifier.engines.options import EngineError, EngineOptions

__all__ = ["RayCluster", "RayBuild", "RayAudit", "ray_gate"]

_DONE = pa.schema([pa.field("chunk", pa.int64()), pa.field("records", pa.int64()),
                   pa.field("accepted", pa.int64()), pa.field("errors", pa.int64()),
                   pa.field("payload", pa.binary())])


def import_ray() -> Any:
    """The `ray` module, or an `EngineError` saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401 - Ray Data ships with the [ray] extra (ray[data])
    except ImportError as e:
        raise EngineError(f"--engine ray needs Ray with Ray Data: pip install 'verifier[ray]' ({e})") from None
    return ray


class RayCluster:
    """Connect to Ray for one job: the cluster at `options.address` (or RAY_ADDRESS), the
    instance this process already started (tests), or a new local one; a local instance
    started here is shut down on exit."""

    def __init__(self, options: EngineOptions) -> None:
        self.options = options
        self.started = False

    def __enter__(self) -> Any:
        ray = import_ray()
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING,
                                      "configure_logging": True}
            if self.options.address:
                ray.init(address=self.options.address, **kwargs)
            else:
                ray.init(**kwargs)
            self.started = True
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # no per-job INFO lines
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the driver shows its own bar, on a terminal only
        ctx.execution_options.preserve_order = True  # batches fold in input order
        return ray

    def __exit__(self, *exc: object) -> None:
        if self.started:
            import ray

            ray.shutdown()


# ------------------------------------------------------------------ jobs
def iter_chunks(ray: Any, index: ChunkIndex, worker: type, kwargs: dict[str, Any],
                options: EngineOptions, parts: Path | None = None) -> Iterator[dict]:
    """Map every chunk of `index` through a pool of `worker` actors; yields each result row
    ({"chunk", "records", "accepted", "errors", "payload"}) in chunk order, as it comes
    (streamed: the driver holds a few rows at a time). Raises `EngineError` naming the
    inputs of chunks without a result when the job cannot finish (a chunk whose part file
    the workers wrote under `parts` counts as done)."""
    files = sorted(str(p) for p in index.folder.glob("chunks-*.parquet"))
    done: set[int] = set()
    failure: BaseException | None = None
    if files:
        # One block per chunk file, put by the driver one file at a time (its heap holds one;
        # the object store the job's list of names). Not read_parquet: its read tasks would
        # wait forever for a CPU the pool's actors hold on a small cluster, and its threaded
        # file indexer races on an optional fsspec import (Ray 2.60 without aiohttp).
        ds = ray.data.from_arrow_refs([ray.put(pq.read_table(f)) for f in files])
        # bounded restarts (Ray Data's default is forever): passed as remote args, the only
        # way Ray Data offers, deprecated in 2.60 in favour of nothing yet
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
            ds = ds.map_batches(worker, fn_constructor_kwargs={**kwargs, "fault": options.fault,
                                                               "threads": _threads(options)},
                                batch_size=1, batch_format="pyarrow",
                                compute=ray.data.ActorPoolStrategy(size=options.workers),
                                num_cpus=options.cpus_per_worker,
                                num_gpus=options.gpus_per_worker or None,
                                max_restarts=options.retries, max_task_retries=options.retries)
        try:
            for batch in ds.iter_batches(batch_size=1, batch_format="pyarrow"):
                for row in batch.to_pylist():
                    if row["chunk"] != len(done):  # preserve_order: a gap is a lost chunk
                        raise EngineError(f"chunk {row['chunk']} came before chunk {len(done)}")
                    done.add(int(row["chunk"]))
                    yield row
        except EngineError:
            raise
        except Exception as e:  # noqa: BLE001 - Ray raises many kinds; the message says what was lost
            failure = e
    if parts is not None:
        done |= {int(p.stem.split("-")[1]) for p in parts.glob("part-*.parquet")}
    lost = [c for c in range(index.chunks) if c not in done]
    if failure is not None or lost:
        names = missing_sources(index, done)
        cause = "" if failure is None else f"; cause: {type(failure).__name__}: " \
                                           f"{str(failure).strip().splitlines()[0][:300]}"
        shown = ", ".join(names[:10]) + (f", ... ({len(names) - 10} more)" if len(names) > 10 else "")
        raise EngineError(f"the Ray job could not finish: {len(names)} of {index.items} input(s) "
                          f"have no result ({shown}){cause}; nothing was written", missing=names)


def _threads(options: EngineOptions) -> int:
    return max(1, int(options.cpus_per_worker))


class _Worker:
    """Base of the pool's actors: one model load per worker, then one chunk per call."""

    def __init__(self, fault: tuple[str, int] | None = None, threads: int = 1) -> None:
        self.fault = fault
        try:
            import torch

            torch.set_num_threads(threads)
        except ImportError:  # an ONNX-only install
            pass

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for row in batch.to_pylist():
            chunk, items = chunk_items(row)
            _maybe_crash(self.fault, chunk)
            rows.append({"chunk": chunk, **self.chunk(chunk, items)})
        return pa.Table.from_pylist(rows, schema=_DONE)

    def chunk(self, chunk: int, items: list) -> dict[str, Any]:
        raise NotImplementedError


def _maybe_crash(fault: tuple[str, int] | None, chunk: int) -> None:
    """Fault injection for the tests: the worker handling chunk `fault[1]` dies (as a killed
    process does) once, when it removes the marker file `fault[0]`, or every time while the
    marker reads 'always'."""
    if fault is None or chunk != fault[1]:
        return
    marker = Path(fault[0])
    try:
        if marker.read_text().strip() != "always":
            marker.unlink()
    except FileNotFoundError:
        return
    os._exit(1)


# ------------------------------------------------------------------ build
class _ReferenceWorker(_Worker):
    def __init__(self, spec: Any, template: Any, **kw: Any) -> None:
        super().__init__(**kw)
        from verifier.probe.factory import open_probe

        self.spec, self.template, self.probe = spec, template, open_probe(spec)

    def chunk(self, chunk: int, items: list) -> dict[str, Any]:
        from verifier.bundle.passes import labelled_batches, reference_batch

        labels = np.array([it.label for it in items], dtype=np.int64)
        out = [reference_batch(self.probe, self.spec, self.template, lab, x).to_bytes()
               for lab, x in labelled_batches(self.spec, items, labels, len(items))]
        return {"records": len(items), "payload": out[0] if out else None}


class _CalibrationWorker(_Worker):
    def __init__(self, spec: Any, template: Any, store: dict, head: Any, **kw: Any) -> None:
        super().__init__(**kw)
        from verifier.bundle.passes import Scorer
        from verifier.probe.factory import open_probe
        from verifier.scoring.comparator import Comparator

        self.spec, self.probe = spec, open_probe(spec)
        self.scorer = Scorer(Comparator(template.from_arrays(store), template.measures), head, spec,
                             template.method_pass(spec, self.probe.target_layer))

    def chunk(self, chunk: int, items: list) -> dict[str, Any]:
        from verifier.bundle.passes import calibration_batch, labelled_batches

        labels = np.array([it.label for it in items], dtype=np.int64)
        out = [calibration_batch(self.probe, self.scorer, lab, x).to_bytes()
               for lab, x in labelled_batches(self.spec, items, labels, len(items))]
        return {"records": len(items), "payload": out[0] if out else None}


class RayBuild:
    """`BuildEngine` on Ray: each pass is one Ray Data job over the chunk files written to
    `staging`; batches come back in input order (`verifier.bundle.passes`)."""

    def __init__(self, ray: Any, options: EngineOptions, staging: Path) -> None:
        self.ray, self.options, self.staging = ray, options, staging

    def reference_batches(self, spec: Any, data: Any, batch_size: int, template: Any) -> Iterator[Any]:
        from verifier.bundle.passes import ReferenceBatch

        rows = self._run("reference", spec, data, batch_size, _ReferenceWorker, {"template": template})
        for payload in rows:
            yield ReferenceBatch.from_bytes(payload, template)

    def calibration_batches(self, spec: Any, data: Any, batch_size: int, template: Any, store: Any,
                            head: Any) -> Iterator[Any]:
        from verifier.bundle.passes import CalibrationBatch

        rows = self._run("calibration", spec, data, batch_size, _CalibrationWorker,
                         {"template": template, "store": store.to_arrays(), "head": head})
        for payload in rows:
            yield CalibrationBatch.from_bytes(payload)

    def _run(self, name: str, spec: Any, data: Any, batch_size: int, worker: type,
             kwargs: dict[str, Any]) -> Iterator[bytes]:
        from verifier.engines.chunks import job_items

        if isinstance(data.inputs, np.ndarray):
            raise EngineError("--engine ray reads image files: give a folder or a CSV manifest, "
                              "not in-memory arrays")
        index = write_chunks(job_items(data.inputs, labels=[int(v) for v in data.labels]),
                             batch_size, self.staging / name)
        for row in iter_chunks(self.ray, index, worker, {"spec": _portable(spec), **kwargs},
                               self.options):
            if row["payload"] is not None:  # None: no readable image in the chunk
                yield row["payload"]


# ------------------------------------------------------------------ audit
class _AuditWorker(_Worker):
    def __init__(self, ref_spec: Any, cand_spec: Any, grid: tuple[int, int], batch_size: int,
                 methods: tuple[str, ...] = (), **kw: Any) -> None:
        super().__init__(**kw)
        from verifier.audit.run import method_passes
        from verifier.probe.factory import open_probe

        self.specs = (ref_spec, cand_spec)
        self.probes = (open_probe(ref_spec), open_probe(cand_spec))
        self.passes = method_passes(ref_spec, cand_spec, tuple(methods), *self.probes)
        self.grid, self.batch_size = grid, batch_size

    def chunk(self, chunk: int, items: list) -> dict[str, Any]:
        from verifier.audit.run import pair_batch
        from verifier.data import iter_batches

        r, c = (next(iter_batches(items, s, batch_size=len(items))) for s in self.specs)
        labels = np.array([it.label for it in items], dtype=np.int64)
        got = pair_batch(*self.probes, self.grid, r, c, labels, chunk * self.batch_size, self.passes)
        if got is None:
            return {"records": len(items), "payload": None}
        arrays = {"kept": got.kept}
        for key, run in (("ref", got.ref), ("cand", got.cand)):
            arrays.update({f"{key}.{f}": getattr(run, f) for f in ("logits", "cam", "early", "stats")})
            arrays.update({f"{key}.map.{m}": v for m, v in run.maps.items()})
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return {"records": len(items), "payload": buf.getvalue()}


class RayAudit:
    """`AuditEngine` on Ray: both models probed on the workers, chunk by chunk."""

    def __init__(self, ray: Any, options: EngineOptions, staging: Path) -> None:
        self.ray, self.options, self.staging = ray, options, staging

    def pair_batches(self, bundle: Any, candidate: Any, data: Any, batch_size: int,
                     methods: tuple[str, ...] = ()) -> Iterator[Any]:
        from verifier.audit.checks import ModelRun
        from verifier.audit.run import PairBatch
        from verifier.engines.chunks import job_items

        if isinstance(data.inputs, np.ndarray):
            raise EngineError("--engine ray reads image files: give a folder or a CSV manifest")
        index = write_chunks(job_items(data.inputs, labels=[int(v) for v in data.labels]),
                             batch_size, self.staging / "audit")
        rows = iter_chunks(self.ray, index, _AuditWorker,
                           {"ref_spec": _portable(bundle.spec), "cand_spec": _portable(candidate),
                            "grid": tuple(bundle.store.grid), "batch_size": batch_size,
                            "methods": tuple(methods)}, self.options)
        for row in rows:
            if row["payload"] is None:
                continue
            with np.load(io.BytesIO(row["payload"]), allow_pickle=False) as z:
                runs = [ModelRun(*(z[f"{k}.{f}"] for f in ("logits", "cam", "early", "stats")),
                                 maps={n[len(k) + 5:]: z[n] for n in z.files
                                       if n.startswith(f"{k}.map.")})
                        for k in ("ref", "cand")]
                yield PairBatch(z["kept"], runs[0], runs[1])


# ------------------------------------------------------------------ gate
class _GateWorker(_Worker):
    def __init__(self, bundle: str, spec: Any, alpha: float | None, batch_size: int,
                 device: str | None, key: str | None, parts: str, **kw: Any) -> None:
        super().__init__(**kw)
        from verifier.runtime.decisions_file import decisions_schema
        from verifier.runtime.gatekeeper import Gatekeeper

        self.gate = Gatekeeper.load(bundle, spec=spec, alpha=alpha, device=device,
                                    batch_size=batch_size, key=key)
        self.schema = decisions_schema(self.gate.bundle.score_names)
        self.parts = Path(parts)

    def chunk(self, chunk: int, items: list) -> dict[str, Any]:
        from verifier.runtime.decisions_file import decisions_table, write_part

        decisions = self.gate.gate(items)
        table = decisions_table(decisions, self.schema, bundle_id=self.gate.bundle.bundle_id,
                                alpha=self.gate.alpha)
        write_part(table, self.parts / part_name(chunk))
        return {"records": len(decisions), "accepted": sum(d.accepted for d in decisions),
                "errors": sum(d.error is not None for d in decisions), "payload": None}


def part_name(chunk: int) -> str:
    return f"part-{chunk:09d}.parquet"


def ray_gate(ray: Any, index: ChunkIndex, parts: Path, options: EngineOptions,
             **gate_kwargs: Any) -> Iterator[dict]:
    """Gate every chunk of `index` on the workers; each writes its chunk's decisions to
    `parts/part-<chunk>.parquet` (atomically, so a redone chunk replaces its part whole)
    and yields a row {"chunk", "records", "accepted", "errors"} per chunk, in order."""
    spec = gate_kwargs.get("spec")
    gate_kwargs["spec"] = None if spec is None else _portable(spec)
    return iter_chunks(ray, index, _GateWorker, {**gate_kwargs, "parts": str(parts)}, options,
                       parts=parts)


def _portable(spec: Any) -> Any:
    """The spec with an absolute model path, so a worker in another folder opens the file."""
    if getattr(spec, "path", None) is not None and not Path(spec.path).is_absolute():
        return replace(spec, path=Path(os.path.abspath(spec.path)))
    return spec
