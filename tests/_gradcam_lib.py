"""Import pytorch-grad-cam for the reference tests, without torchvision when it cannot load.

grad-cam 1.5.7 imports torchvision at module level only for helpers these tests never call
(`preprocess_image`, detection targets); PyPI's torchvision does not load beside the CPU
torch pin ("operator torchvision::nms does not exist"), so a placeholder stands in for it.
"""
from __future__ import annotations

import sys
import types


def import_gradcam():
    """The `pytorch_grad_cam` module, or None when grad-cam is not installed."""
    try:
        import torchvision  # noqa: F401
    except Exception:  # absent, or present but unloadable against this torch build
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        _placeholder()
    try:
        import pytorch_grad_cam
    except ImportError:
        return None
    return pytorch_grad_cam


def _placeholder() -> None:
    def unavailable(*args, **kwargs):
        raise RuntimeError("torchvision is not installed (test placeholder)")

    tv = types.ModuleType("torchvision")
    tr = types.ModuleType("torchvision.transforms")
    fn = types.ModuleType("torchvision.transforms.functional")
    ops = types.ModuleType("torchvision.ops")
    for name in ("Compose", "Normalize", "ToTensor"):
        setattr(tr, name, unavailable)
    fn.resize = unavailable
    ops.box_iou = unavailable
    tr.functional = fn
    tv.transforms, tv.ops = tr, ops
    sys.modules.update({"torchvision": tv, "torchvision.transforms": tr,
                        "torchvision.transforms.functional": fn, "torchvision.ops": ops})
