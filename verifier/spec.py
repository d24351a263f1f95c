"""Model spec: what the model is, what it expects as input, which layers to probe.

Loaded from the TOML format of DESIGN.md (`load_spec`) or built in Python
(`ModelSpec(...)`, with `module=` for an in-memory `torch.nn.Module`).
"""
from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

__all__ = ["ModelSpec", "SpecError", "TASKS", "load_spec", "model_fingerprint", "external_data_files",
           "check_output_shape"]


class SpecError(ValueError):
    """A spec file or spec field is invalid; the message names the key."""


_TOP_KEYS = {"model", "input", "layers"}
#: what a model does: "classification" returns (N, K) logits, "segmentation" (N, K, H, W) scores
TASKS = ("classification", "segmentation")
_KEYS = {
    "model": {"path", "classes", "garbage_class", "task", "background_class"},
    "input": {"size", "channels", "mean", "std"},
    "layers": {"target", "early"},
}


@dataclass(frozen=True)
class ModelSpec:
    """Everything the probe needs to know about a classifier or a segmentation model.

    `size` is (height, width); pixels are scaled to [0, 1], then
    `(x - mean) / std` per channel. `target`/`early` are layer names or "auto".
    Exactly one of `path` (a `.onnx` or TorchScript `.pt` file) and `module`
    (an in-memory `torch.nn.Module`) is set. `task` is "classification" (the model
    returns (N, K) logits) or "segmentation" ((N, K, H, W) class scores; `target_layer`
    then names the post-bottleneck layers, comma-separated, or "auto";
    `background_class` is the class a default attribution target never picks).
    """

    classes: tuple[str, ...]
    size: tuple[int, int]
    channels: int = 1
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    target_layer: str = "auto"
    early_layer: str = "auto"
    garbage_class: int | None = None
    path: Path | None = None
    module: Any = field(default=None, compare=False, repr=False)
    source: Path | None = field(default=None, compare=False)
    task: str = "classification"
    background_class: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        object.__setattr__(self, "size", tuple(int(s) for s in self.size))
        object.__setattr__(self, "mean", _per_channel(self.mean, self.channels, "input.mean"))
        object.__setattr__(self, "std", _per_channel(self.std, self.channels, "input.std"))
        if self.path is not None:
            object.__setattr__(self, "path", Path(self.path))
        _validate(self)

    @property
    def num_classes(self) -> int:
        """Number of real (non-garbage) classes the model predicts."""
        return len(self.classes)

    @property
    def backend(self) -> str:
        """'torch' for an nn.Module, 'onnx' for .onnx files, 'torchscript' for .pt/.pth."""
        if self.module is not None:
            return "torch"
        assert self.path is not None
        return "onnx" if self.path.suffix.lower() == ".onnx" else "torchscript"

    def with_module(self, module: Any) -> ModelSpec:
        """A copy of this spec pointing at an in-memory module instead of a file."""
        return replace(self, module=module, path=None)

    def to_toml_dict(self, relative_to: Path | None = None) -> dict[str, Any]:
        """The spec as the TOML tables of DESIGN.md (the model path made relative when possible)."""
        model: dict[str, Any] = {"classes": list(self.classes)}
        if self.path is not None:
            p = Path(self.path)
            if relative_to is not None:
                try:
                    p = p.resolve().relative_to(Path(relative_to).resolve())
                except ValueError:
                    p = p.resolve()
            model["path"] = str(p)
        if self.garbage_class is not None:
            model["garbage_class"] = self.garbage_class
        if self.task != "classification":
            model["task"] = self.task
        if self.background_class is not None:
            model["background_class"] = self.background_class
        return {
            "model": model,
            "input": {"size": list(self.size), "channels": self.channels,
                      "mean": list(self.mean), "std": list(self.std)},
            "layers": {"target": self.target_layer, "early": self.early_layer},
        }


def load_spec(path: str | Path) -> ModelSpec:
    """Read and validate a TOML spec; the model path is resolved relative to the file."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(f"spec file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise SpecError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise SpecError(f"{path}: cannot read spec ({e.strerror or e})") from None
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path}: not valid TOML: {e}") from None
    return spec_from_dict(raw, base_dir=path.parent, source=path)


def spec_from_dict(raw: dict[str, Any], base_dir: Path | None = None,
                   source: Path | None = None) -> ModelSpec:
    """Validate the TOML tables of a spec and build a `ModelSpec`."""
    where = f"{source}: " if source else ""
    for key in raw:
        if key not in _TOP_KEYS:
            raise SpecError(f"{where}unknown table [{key}] (expected {sorted(_TOP_KEYS)})")
    for table, keys in _KEYS.items():
        sub = raw.get(table, {})
        if not isinstance(sub, dict):
            raise SpecError(f"{where}[{table}] must be a table")
        for key in sub:
            if key not in keys:
                raise SpecError(f"{where}unknown key {table}.{key} (expected one of {sorted(keys)})")
    model, inp, layers = raw.get("model", {}), raw.get("input", {}), raw.get("layers", {})
    for key, table in (("path", model), ("classes", model), ("size", inp)):
        if key not in table:
            tname = "model" if table is model else "input"
            raise SpecError(f"{where}missing required key {tname}.{key}")
    if not isinstance(model["path"], str) or not model["path"]:
        raise SpecError(f"{where}model.path must be a file name (a string), got {model['path']!r}")
    mpath = Path(model["path"])
    if base_dir is not None and not mpath.is_absolute():
        mpath = base_dir / mpath
    channels = inp.get("channels", 1)
    try:
        return ModelSpec(
            classes=tuple(model["classes"]),
            size=tuple(inp["size"]),
            channels=channels,
            mean=tuple(inp.get("mean", [0.0] * int(channels))) if isinstance(channels, int) else (0.0,),
            std=tuple(inp.get("std", [1.0] * int(channels))) if isinstance(channels, int) else (1.0,),
            target_layer=layers.get("target", "auto"),
            early_layer=layers.get("early", "auto"),
            garbage_class=model.get("garbage_class"),
            task=model.get("task", "classification"),
            background_class=model.get("background_class"),
            path=mpath,
            source=source,
        )
    except SpecError as e:
        raise SpecError(f"{where}{e}") from None
    except (TypeError, ValueError, OverflowError) as e:  # e.g. size = [inf, 2] (found by fuzzing)
        raise SpecError(f"{where}invalid value: {e}") from None


def check_output_shape(spec: ModelSpec | None, shape: tuple[int, ...]) -> None:
    """Raise SpecError unless a model output of `shape` fits the spec's task: (N, K) logits
    for a classifier, (N, K, H, W) class scores for a segmentation model. The message names
    the shape found, so a segmentation spec on a classifier (or the reverse) says why."""
    task = spec.task if spec is not None else ("segmentation" if len(shape) == 4 else "classification")
    want = 4 if task == "segmentation" else 2
    if len(shape) == want:
        return
    found = f"the model returned an output of shape {tuple(shape)}"
    if task == "segmentation":
        hint = (" (a classifier's (N, K) logits: drop task = \"segmentation\")" if len(shape) == 2
                else "")
        raise SpecError(f"model.task = \"segmentation\" expects (N, K, H, W) class scores, but "
                        f"{found}{hint}")
    hint = (" (per-pixel class scores: set [model] task = \"segmentation\")" if len(shape) == 4
            else "")
    raise SpecError(f"a classifier spec expects (N, K) logits, but {found}{hint}")


def model_fingerprint(spec: ModelSpec) -> str:
    """sha256 identifying the model: of the file bytes, or of an nn.Module's state dict."""
    if spec.module is not None:
        return _module_fingerprint(spec.module)
    assert spec.path is not None
    h = hashlib.sha256()
    _hash_file(h, spec.path)
    # An ONNX model's external weights are part of the model: hash each (name, bytes).
    # A model without external data keeps the plain file hash.
    for name, file in external_data_files(spec.path):
        h.update(f"\0external:{name}\0".encode("utf-8"))
        _hash_file(h, file)
    return "sha256:" + h.hexdigest()


def external_data_files(path: str | Path) -> list[tuple[str, Path]]:
    """(location as written in the model, file) of every external-data file an ONNX model
    at `path` refers to, sorted; [] for other formats. A location that leaves the model's
    folder or a missing file is a `SpecError`."""
    path = Path(path)
    if path.suffix.lower() != ".onnx":
        return []
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception:  # a damaged file has no external data; the backend refuses it by name
        return []
    names = set()
    for tensor in _get_all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            names |= {e.value for e in tensor.external_data if e.key == "location"}
    out = []
    for name in sorted(names):
        file = path.parent / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise SpecError(f"{path}: external data location {name!r} leaves the model's folder")
        if not file.is_file():
            raise SpecError(f"{path}: external data file {name!r} is missing (expected at {file})")
        out.append((Path(name).as_posix(), file))
    return out


def _hash_file(h: Any, path: Path) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


def _module_fingerprint(module: Any) -> str:
    h = hashlib.sha256()
    h.update(type(module).__qualname__.encode())
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()  # bfloat16 has no numpy dtype; float32 holds it exactly
        h.update(t.numpy().tobytes())
    return "sha256:" + h.hexdigest()


def _per_channel(values: Any, channels: Any, key: str) -> tuple[float, ...]:
    if isinstance(values, (int, float)):
        values = (values,)
    try:
        vals = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise SpecError(f"{key} must be a list of numbers, got {values!r}") from None
    if isinstance(channels, int) and len(vals) == 1 and channels > 1:
        vals = vals * channels
    return vals


def _validate(spec: ModelSpec) -> None:
    if not spec.classes:
        raise SpecError("model.classes must list at least one class")
    if len(set(spec.classes)) != len(spec.classes):
        raise SpecError("model.classes has duplicate names")
    if len(spec.size) != 2 or any(s < 1 or s > 8192 for s in spec.size):
        raise SpecError(f"input.size must be [height, width] between 1 and 8192, got {list(spec.size)}")
    if not isinstance(spec.channels, int) or spec.channels not in (1, 3):
        raise SpecError(f"input.channels must be 1 or 3, got {spec.channels!r}")
    if len(spec.mean) != spec.channels:
        raise SpecError(f"input.mean needs {spec.channels} value(s), got {len(spec.mean)}")
    if len(spec.std) != spec.channels:
        raise SpecError(f"input.std needs {spec.channels} value(s), got {len(spec.std)}")
    if any(s <= 0 for s in spec.std):
        raise SpecError("input.std values must be positive")
    for key, val in (("layers.target", spec.target_layer), ("layers.early", spec.early_layer)):
        if not isinstance(val, str) or not val:
            raise SpecError(f"{key} must be a layer name or \"auto\"")
    if spec.task not in TASKS:
        raise SpecError(f"model.task must be one of {', '.join(TASKS)}, got {spec.task!r}")
    if spec.background_class is not None:
        b = spec.background_class
        if not isinstance(b, int) or isinstance(b, bool) or not 0 <= b < len(spec.classes):
            raise SpecError(f"model.background_class must be a class index in [0, "
                            f"{len(spec.classes)}), got {b!r}")
        if spec.task != "segmentation":
            raise SpecError("model.background_class applies to task = \"segmentation\" only")
    if spec.garbage_class is not None:
        if not isinstance(spec.garbage_class, int) or isinstance(spec.garbage_class, bool):
            raise SpecError("model.garbage_class must be an integer output index")
        if spec.garbage_class < 0:
            raise SpecError("model.garbage_class must be >= 0")
    if (spec.path is None) == (spec.module is None):
        raise SpecError("give exactly one of model.path (a file) and module (an nn.Module)")
    if spec.path is not None:
        if spec.path.suffix.lower() not in (".onnx", ".pt", ".pth", ".ts", ".torchscript"):
            raise SpecError(f"model.path must be an .onnx or TorchScript .pt file, got {spec.path.name}")
        if not spec.path.exists():
            raise SpecError(f"model.path does not exist: {spec.path}")
