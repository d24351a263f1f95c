"""Benchmark: peak memory of loading one image just under the 64-Mpx guard, before and after.

"before" is what `load_images` did until issue 10: `preprocess([decode_image(path)], spec)`
(a full-size float32 image, then resized). "after" is `load_images([path], spec)`, which
resizes large images strip by strip from their 8/16-bit pixels. Each measurement runs in a
fresh interpreter; the peak is VmHWM after the call minus VmRSS before it (VmHWM reset first
through /proc/self/clear_refs, Linux). Real pixels: skimage's astronaut / camera, enlarged.

Run: .venv/bin/python benchmarks/decode_memory.py [--side 7990]
Prints a table and writes benchmarks/results/decode_memory.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
from pathlib import Path
import numpy as np
sys.path.insert(0, {root!r})
from verifier.data import decode_image, load_images, preprocess
from verifier.spec import ModelSpec

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
path, method, channels = Path({path!r}), {method!r}, {channels}
spec = ModelSpec(classes=("a",), size=(224, 224), channels=channels, mean=(0.5,) * channels,
                 std=(0.25,) * channels, module=object())
try:
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
except OSError:
    pass
before = status("VmRSS:")
t0 = time.perf_counter()
if method == "before":
    out = preprocess([decode_image(path)], spec)[0]
else:
    [rec] = load_images([path], spec, workers=1)
    out = rec.pixels
seconds = time.perf_counter() - t0
np.save({npy!r}, out)
print(json.dumps({{"peak_bytes": status("VmHWM:") - before, "seconds": seconds}}))
"""


def make_images(folder: Path, side: int) -> dict[str, Path]:
    """Real photos enlarged to side x (side+10) (just under 64 Mpx at side 7990)."""
    import numpy as np
    import skimage.data
    from PIL import Image

    size = (side + 10, side)  # width, height
    rgb = Image.fromarray(skimage.data.astronaut()).resize(size, Image.BILINEAR)
    gray = Image.fromarray(skimage.data.camera()).resize(size, Image.BILINEAR)
    out = {"RGB JPEG": folder / "rgb.jpg", "gray PNG 8-bit": folder / "gray.png",
           "gray PNG 16-bit": folder / "gray16.png"}
    rgb.save(out["RGB JPEG"], quality=90)
    gray.save(out["gray PNG 8-bit"], compress_level=1)
    Image.fromarray(np.asarray(gray).astype(np.uint16) * 257).save(out["gray PNG 16-bit"],
                                                                    compress_level=1)
    return out


def measure(path: Path, method: str, channels: int, tmp: Path) -> dict:
    npy = tmp / f"{path.stem}-{method}-{channels}.npy"
    code = CHILD.format(root=str(ROOT), path=str(path), method=method, channels=channels,
                        npy=str(npy))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-2000:])
    return {**json.loads(res.stdout.strip().splitlines()[-1]), "npy": npy}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=int, default=7990, help="image height; width is side + 10")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "decode_memory.json")
    args = ap.parse_args()
    import numpy as np

    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        t0 = time.perf_counter()
        images = make_images(tmp, args.side)
        print(f"made {len(images)} images of {args.side + 10} x {args.side} = "
              f"{(args.side + 10) * args.side / 1e6:.1f} Mpx in {time.perf_counter() - t0:.0f} s")
        for kind, path in images.items():
            for channels in ((1, 3) if kind.startswith("RGB") else (1,)):
                r = {m: measure(path, m, channels, tmp) for m in ("before", "after")}
                diff = float(np.abs(np.load(r["before"]["npy"]) - np.load(r["after"]["npy"])).max())
                rows.append({"image": kind, "file_mb": path.stat().st_size / 1e6,
                             "spec_channels": channels,
                             "before_peak_mb": r["before"]["peak_bytes"] / 1e6,
                             "after_peak_mb": r["after"]["peak_bytes"] / 1e6,
                             "ratio": r["before"]["peak_bytes"] / max(r["after"]["peak_bytes"], 1),
                             "before_s": r["before"]["seconds"], "after_s": r["after"]["seconds"],
                             "max_abs_diff": diff})
    print(f"\n{'image':<16} {'file MB':>7} {'C':>2} {'before MB':>10} {'after MB':>9} "
          f"{'ratio':>6} {'before s':>9} {'after s':>8} {'max |diff|':>10}")
    for r in rows:
        print(f"{r['image']:<16} {r['file_mb']:7.1f} {r['spec_channels']:>2} "
              f"{r['before_peak_mb']:10.0f} {r['after_peak_mb']:9.0f} {r['ratio']:6.1f} "
              f"{r['before_s']:9.2f} {r['after_s']:8.2f} {r['max_abs_diff']:10.2e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"side": args.side, "python": platform.python_version(),
                                    "machine": platform.machine(), "rows": rows}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
