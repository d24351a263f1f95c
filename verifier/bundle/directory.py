"""Bundle: one directory holding spec, model file, reference store, garbage head and calibration.

Written atomically with a versioned, checksummed manifest (`reference_maps.artifact`),
optionally signed (`verifier.bundle.signing`); loading refuses changed files, a hand-edited
manifest, a bad signature, unknown versions, and a model whose fingerprint differs.
"""
from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w

from calibration.conformal import ConformalCalibrator
from calibration.fusion import FusedConformal
from calibration.indist import InDistributionConformal
from reference_maps.artifact import (Artifact, ArtifactError, check_destination, read_artifact,
                                     signed_message, write_artifact)
from reference_maps.store import ReferenceStore
from verifier.bundle.declarations import verify_declarations
from verifier.bundle.errors import BundleError
from verifier.bundle.signing import SignatureError, SigningKey, as_key, sign, verify
from verifier.scoring.attention import DEFAULT_METHODS, GRADCAM
from verifier.scoring.comparator import ATTENTION_MEASURES
from verifier.scoring.garbage import GarbageHead
from verifier.scoring.measures import MEASURES
from verifier.spec import (ModelSpec, SpecError, external_data_files, model_fingerprint,
                           spec_from_dict)

__all__ = ["Bundle", "BundleError", "BUNDLE_KIND", "BUNDLE_FORMAT_VERSION", "check_bundle_out",
           "signature_status"]

BUNDLE_KIND = "verifier-bundle"
#: 2: the whole manifest is digested (and optionally signed); 1 hashed only the files
BUNDLE_FORMAT_VERSION = 2


@dataclass
class Bundle:
    """Everything the gate, audit and drift need, for one certified model.

    calibration_scores: {score name: (n,) float64} of the held-out calibration images
    calibration_classes: (n,) int64 predicted class of each calibration image
    """

    spec: ModelSpec
    store: ReferenceStore
    head: GarbageHead | None
    calibrator: ConformalCalibrator
    fusion: FusedConformal
    alpha: float
    calibration_scores: dict[str, np.ndarray]
    calibration_classes: np.ndarray
    higher_is_worse: dict[str, bool]
    model_fingerprint: str
    combine: str = "fusion"
    #: in-distribution-only combination behind `p_value` when combine == "indist"
    combiner: InDistributionConformal | None = None
    #: "marginal" or "pac" (with probability >= 1 - delta over the calibration draw, FRR <= alpha)
    guarantee: str = "marginal"
    delta: float | None = None
    compatible_fingerprints: dict[str, str] = field(default_factory=dict)
    #: the similarity measures the bundle was built, calibrated and is scored with
    measures: tuple[str, ...] = ATTENTION_MEASURES
    #: the attribution methods whose per-class maps the store keeps, Grad-CAM first
    methods: tuple[str, ...] = DEFAULT_METHODS
    info: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    bundle_id: str = ""
    #: how the bundle was verified on load: {"digest", "signed", "verified", "key_id"}
    integrity: dict[str, Any] = field(default_factory=dict)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.spec.classes

    @property
    def score_names(self) -> tuple[str, ...]:
        return tuple(self.calibration_scores)

    @property
    def calibration_sizes(self) -> list[int]:
        """Calibration points behind each class's `p_value` threshold: the class's own count,
        or the pooled count for a class below the active combination's `min_class_size`;
        `[n]` when every class pools (the input of `calibration.decide.false_rejection_sd`)."""
        counts = np.bincount(self.calibration_classes, minlength=len(self.classes))
        pooled = int(counts.sum())
        active = self.combiner if self.combine == "indist" and self.combiner is not None else self.fusion
        size = active.min_class_size if getattr(active, "guarantee", "marginal") == "marginal" else pooled + 1
        if (counts < size).all():  # one pooled calibration set (the "indist" default)
            return [pooled]
        return [int(c) if c >= size else pooled for c in counts]

    def save(self, path: str | Path, *, overwrite: bool = False,
             sign_key: str | Path | SigningKey | None = None) -> Path:
        """Write the bundle directory (atomically); returns its path.

        `path` must be missing or empty, or (with `overwrite`) a bundle this tool wrote
        and nothing else: no other folder is ever replaced. `sign_key` (a key file or
        `SigningKey`) signs the manifest digest (docs/bundle.md).
        """
        path = Path(path)
        try:
            key = as_key(sign_key)
        except SignatureError as e:
            raise BundleError(str(e)) from None
        if key is not None and not key.can_sign:
            raise BundleError(f"{key.path} is an Ed25519 public key: signing needs the private key")
        files: dict[str, bytes] = {}
        spec_tables = self.spec.to_toml_dict()
        if self.spec.path is not None:
            model_name = "model" + self.spec.path.suffix.lower()
            files[model_name] = Path(self.spec.path).read_bytes()
            for name, file in external_data_files(self.spec.path):  # ONNX weights kept beside it
                if name in (model_name, "spec.toml"):
                    raise BundleError(f"{self.spec.path}: external data file {name!r} clashes "
                                      f"with the bundle's own {name}; rename it")
                files[name] = file.read_bytes()
            spec_tables["model"]["path"] = model_name
        else:
            spec_tables["model"].pop("path", None)
        files["spec.toml"] = _toml_bytes(spec_tables)
        arrays = {
            "reference": self.store.to_arrays(),
            "calibration": self.calibrator.to_arrays(),
            "fusion": self.fusion.to_arrays(),
            "calibration_data": {**{f"score.{k}": np.asarray(v, dtype=np.float64)
                                    for k, v in self.calibration_scores.items()},
                                 "classes": np.asarray(self.calibration_classes, dtype=np.int64)},
        }
        if self.head is not None:
            arrays["garbage_head"] = self.head.to_arrays()
        if self.combiner is not None:
            arrays["combiner"] = self.combiner.to_arrays()
        manifest = {
            "model_fingerprint": self.model_fingerprint,
            "compatible_fingerprints": self.compatible_fingerprints,
            "alpha": float(self.alpha),
            "combine": self.combine,
            "guarantee": self.guarantee,
            "delta": self.delta if self.guarantee == "pac" else None,
            "calibration_size": int(len(self.calibration_classes)),
            "classes": list(self.classes),
            "grid": list(self.store.grid),
            "higher_is_worse": self.higher_is_worse,
            "measures": list(self.measures),
            "methods": list(self.methods),
            "reference_metadata": _jsonable(self.store.metadata),
            "info": _jsonable(self.info),
        }
        try:
            write_artifact(path, kind=BUNDLE_KIND, format_version=BUNDLE_FORMAT_VERSION,
                           arrays=arrays, manifest=manifest, files=files, overwrite=overwrite,
                           sign=None if key is None else (lambda message: sign(key, message)))
        except ArtifactError as e:
            raise BundleError(str(e)) from None
        self.path = path
        self.bundle_id = _bundle_id(path)
        return path

    @classmethod
    def load(cls, path: str | Path, model: Any = None, check_model: bool = True,
             spec: ModelSpec | None = None,
             key: str | Path | SigningKey | None = None) -> Bundle:
        """Read and verify a bundle. `model` (an nn.Module) is needed only for bundles
        built from an in-memory module; it must have the fingerprint the bundle was built for.

        `check_model=False` skips the model (drift reports need only the calibration):
        checksums are still verified, but such a bundle cannot open a probe.

        `spec` opens the bundle with another model file (e.g. the ONNX export of the
        module it was built from): its classes, garbage output and input contract must be
        the bundle's, and its fingerprint the bundle's own or one declared compatible with
        `verifier.runtime.parity.declare_compatible` (declarations are verified on every load).

        The manifest digest (every field) and every file's sha256 are always checked.
        `key` (a key file or `SigningKey`): the bundle must also carry a signature by that
        key over the digest, or it is refused; without `key` a signature is not checked.
        """
        path = Path(path)
        try:
            art = read_artifact(path, kind=BUNDLE_KIND, supported_versions={BUNDLE_FORMAT_VERSION})
            integrity = signature_status(art, as_key(key))
        except (ArtifactError, SignatureError) as e:
            raise BundleError(f"bundle {path}: {e}" if str(path) not in str(e) else str(e)) from None
        m = art.manifest
        expected = m["model_fingerprint"]
        compatible = m.get("compatible_fingerprints", {})
        if compatible:
            verify_declarations(path, m, art.arrays, art.files.get("spec.toml", b""))
        if spec is not None:
            if model is not None:
                raise BundleError("give the bundle's module (model=) or another model (spec=), not both")
            spec = _override_spec(path, art.files.get("spec.toml"), spec)
            actual = model_fingerprint(spec)
        else:
            if not check_model and model is None and "path" not in tomllib.loads(
                    art.files.get("spec.toml", b"[model]").decode("utf-8")).get("model", {}):
                model = _NO_MODEL
            spec = _load_spec(path, art.files.get("spec.toml"), model)
            actual = expected if model is _NO_MODEL else model_fingerprint(spec)
        if check_model and actual != expected and actual not in compatible.values():
            raise BundleError(
                f"bundle {path} was built for model {_short(expected)}, but the model given has "
                f"fingerprint {_short(actual)}: a bundle is valid only for the model it was "
                f"calibrated with (rebuild it, or declare the export compatible)")
        measures, methods = _check_measures(path, m), _check_methods(path, m)
        try:
            store = ReferenceStore.from_arrays(art.arrays["reference"], classes=spec.classes,
                                               grid=tuple(m["grid"]), metadata=m["reference_metadata"],
                                               methods=methods[1:])
        except ValueError as e:
            raise BundleError(f"bundle {path}: its reference store is refused: {e}") from None
        cal = art.arrays["calibration_data"]
        bundle = cls(
            spec=spec,
            store=store,
            head=GarbageHead.from_arrays(art.arrays["garbage_head"]) if "garbage_head" in art.arrays else None,
            calibrator=ConformalCalibrator.from_arrays(art.arrays["calibration"]),
            fusion=FusedConformal.from_arrays(art.arrays["fusion"]),
            alpha=float(m["alpha"]),
            calibration_scores={k[len("score."):]: v for k, v in cal.items() if k.startswith("score.")},
            calibration_classes=cal["classes"],
            higher_is_worse={k: bool(v) for k, v in m["higher_is_worse"].items()},
            model_fingerprint=expected,
            combine=m.get("combine", "fusion"),
            combiner=(InDistributionConformal.from_arrays(art.arrays["combiner"])
                      if "combiner" in art.arrays else None),
            guarantee=m.get("guarantee", "marginal"),
            delta=m.get("delta"),
            compatible_fingerprints=dict(compatible),
            measures=measures,
            methods=methods,
            info=m.get("info", {}),
            path=path,
            bundle_id=_bundle_id(path),
            integrity=integrity,
        )
        return bundle


def _check_measures(path: Path, manifest: dict[str, Any]) -> tuple[str, ...]:
    """The manifest's measures (the seven built-in ones for a bundle that names none), each
    registered in this code and scored in the calibration data, or a BundleError."""
    names = manifest.get("measures", list(ATTENTION_MEASURES))
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise BundleError(f"bundle {path}: manifest field 'measures' must be a non-empty list "
                          f"of measure names, got {names!r}")
    unknown = [n for n in names if n not in MEASURES]
    if unknown:
        raise BundleError(f"bundle {path} was built with measure(s) {unknown} that this code does "
                          f"not register (registered: {list(MEASURES)}): import the module that "
                          f"registers them (verifier.scoring.measures.register_measure) first")
    scored = manifest.get("higher_is_worse", {})
    missing = [n for n in names if n not in scored]
    if missing:
        raise BundleError(f"bundle {path}: the manifest names measure(s) {missing} its "
                          f"calibration never scored")
    return tuple(names)


def _check_methods(path: Path, manifest: dict[str, Any]) -> tuple[str, ...]:
    """The manifest's attribution methods (Grad-CAM only for a bundle that names none),
    Grad-CAM first, each registered in this code, or a BundleError."""
    names = manifest.get("methods", list(DEFAULT_METHODS))
    if not isinstance(names, list) or not names or names[0] != GRADCAM or \
            not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise BundleError(f"bundle {path}: manifest field 'methods' must list distinct method "
                          f"names, {GRADCAM!r} first, got {names!r}")
    if names == [GRADCAM]:
        return DEFAULT_METHODS
    from verifier.attribution.registry import METHODS  # the package registers every method

    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise BundleError(f"bundle {path} holds reference maps of attribution method(s) {unknown} "
                          f"that this code does not know (registered: {', '.join(METHODS)}): "
                          f"upgrade verifier, or rebuild the bundle")
    return tuple(names)


def check_bundle_out(path: str | Path, overwrite: bool = False) -> None:
    """Refuse (BundleError), before any work, an `--out` that `Bundle.save` would refuse:
    a non-empty folder that is not a bundle, or a bundle without `overwrite`."""
    try:
        check_destination(Path(path), BUNDLE_KIND, overwrite)
    except ArtifactError as e:
        raise BundleError(str(e)) from None


def signature_status(art: Artifact, key: SigningKey | None) -> dict[str, Any]:
    """{"digest", "signed", "verified", "alg", "key_id"} of a read artifact; with `key`,
    raises `SignatureError` unless the artifact is signed by that key over its digest."""
    record = art.signature
    status = {"digest": art.digest, "signed": record is not None, "verified": False,
              "alg": record.get("alg") if isinstance(record, dict) else None,
              "key_id": record.get("key_id") if isinstance(record, dict) else None}
    if key is not None:
        if record is None:
            raise SignatureError(f"it is not signed, so it cannot be verified with key "
                                 f"{key.key_id} (anyone could have written or edited it)")
        try:
            verify(key, record, signed_message(art.digest))
        except SignatureError as e:
            raise SignatureError(f"its signature is refused: {e}") from None
        status["verified"] = True
    return status


class _NoModel:
    """Stands in for the module of a bundle loaded with check_model=False."""

    def __repr__(self) -> str:
        return "<model not loaded (check_model=False)>"


_NO_MODEL = _NoModel()


def _load_spec(path: Path, raw: bytes | None, model: Any) -> ModelSpec:
    if raw is None:
        raise BundleError(f"bundle {path} has no spec.toml")
    tables = tomllib.loads(raw.decode("utf-8"))
    try:
        if "path" in tables.get("model", {}):
            spec = spec_from_dict(tables, base_dir=path, source=path / "spec.toml")
            return spec if model is None else spec.with_module(model)
        if model is None:
            raise BundleError(f"bundle {path} was built from an in-memory PyTorch module: "
                              f"pass the module (Gatekeeper.load(path, model=module))")
        return _spec_with_module(tables, path, model)
    except SpecError as e:
        raise BundleError(f"bundle {path}: {e}") from None


#: spec fields another model must share with the bundle's (layers may be named per backend)
CONTRACT_FIELDS = ("classes", "garbage_class", "size", "channels", "mean", "std")


def contract_differences(stored: dict, spec: ModelSpec) -> list[str]:
    """`field: bundle value != given value` for every contract field that differs."""
    given = spec.to_toml_dict()
    out = []
    for key in CONTRACT_FIELDS:
        table = "model" if key in ("classes", "garbage_class") else "input"
        a, b = stored.get(table, {}).get(key), given[table].get(key)
        if a != b:
            out.append(f"{table}.{key}: bundle {a!r} != given {b!r}")
    return out


def _override_spec(path: Path, raw: bytes | None, spec: ModelSpec) -> ModelSpec:
    if raw is None:
        raise BundleError(f"bundle {path} has no spec.toml")
    diff = contract_differences(tomllib.loads(raw.decode("utf-8")), spec)
    if diff:
        raise BundleError(f"bundle {path}: the model spec given does not match the bundle's "
                          f"input contract ({'; '.join(diff)})")
    return spec


def _spec_with_module(tables: dict, path: Path, model: Any) -> ModelSpec:
    model_t, inp, layers = tables["model"], tables["input"], tables.get("layers", {})
    return ModelSpec(classes=tuple(model_t["classes"]), size=tuple(inp["size"]),
                     channels=inp["channels"], mean=tuple(inp["mean"]), std=tuple(inp["std"]),
                     target_layer=layers.get("target", "auto"), early_layer=layers.get("early", "auto"),
                     garbage_class=model_t.get("garbage_class"), module=model, source=path / "spec.toml",
                     task=model_t.get("task", "classification"),
                     background_class=model_t.get("background_class"))


def _bundle_id(path: Path) -> str:
    """Short id of a bundle: sha256 of its manifest (which lists every file's sha256)."""
    return hashlib.sha256((Path(path) / "manifest.json").read_bytes()).hexdigest()[:16]


def _short(fp: str) -> str:
    return fp.split(":")[-1][:12]


def _toml_bytes(tables: dict[str, dict[str, Any]]) -> bytes:
    """TOML written by a TOML writer (JSON string escapes are not TOML's)."""
    return tomli_w.dumps(tables).encode("utf-8")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj
