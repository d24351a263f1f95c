"""`verifier explain` end to end on an exported ONNX model and real digits: files, JSON records,
per-class mean maps, faithfulness, per-input errors, refusals and exit codes."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import POOL

from verifier.attribution import attribute, deletion_insertion, predictor
from verifier.cli.main import main
from verifier.data import iter_batches, save_dataset
from verifier.examples.zoo import mnist_spec, preprocess_uint8
from verifier.probe.onnx_backend import export_onnx


@pytest.fixture(scope="module")
def setup(tmp_path_factory, gap_model, mnist):
    root = tmp_path_factory.mktemp("explain")
    spec = mnist_spec(gap_model)
    export_onnx(gap_model, spec, root / "m.onnx")
    (root / "m.toml").write_text(
        f'[model]\npath = "m.onnx"\nclasses = {list(spec.classes)}\n'
        '[input]\nsize = [28, 28]\nchannels = 1\nmean = [0.1307]\nstd = [0.3081]\n')
    x, y = mnist[0][POOL][:30], mnist[1][POOL][:30]
    save_dataset(x, y, spec.classes, root / "data")
    return root, x, y


def run_json(capsys, argv):
    code = main(argv)
    lines = [json.loads(s) for s in capsys.readouterr().out.splitlines() if s.strip()]
    return code, lines


def test_explain_writes_maps_overlays_and_json(setup, capsys, tmp_path):
    root, x, y = setup
    files = sorted((root / "data").rglob("*.png"))[:6]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    out = tmp_path / "out"
    code, recs = run_json(capsys, ["explain", "--spec", str(root / "m.toml"), "--method",
                                   "gradcam,crm", *map(str, files), str(bad), "--out", str(out),
                                   "--json", "--faithfulness"])
    assert code == 0
    errors = [r for r in recs if "error" in r]
    maps = [r for r in recs if "map" in r]
    assert len(errors) == 1 and "broken.png" in errors[0]["input"]
    assert len(maps) == 12 and {r["method"] for r in maps} == {"gradcam", "crm"}
    # the stored map is the raw attribution of the same preprocessed image
    (records, xb), = list(iter_batches(files[:1], mnist_spec(None)))
    ref = attribute(root / "m.toml", xb, "crm")[0]
    rec = next(r for r in maps if r["method"] == "crm" and r["input"] == str(files[0]))
    assert np.allclose(np.load(out / rec["map"]), ref, rtol=0, atol=1e-12)
    assert (out / rec["overlay"]).read_bytes()[:4] == b"\x89PNG"
    assert all(0 <= r["deletion_auc"] <= 1 and 0 <= r["insertion_auc"] <= 1 for r in maps)
    manifest = json.loads((out / "explain.json").read_text())
    assert manifest["format"] == "verifier-explain" and manifest["layer"]
    assert len(manifest["files"]) == 24
    # a folder another tool wrote is refused; our own folder may be rewritten
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    assert main(["explain", "--spec", str(root / "m.toml"), "--method", "crm", str(files[0]),
                 "--out", str(other)]) == 2
    assert main(["explain", "--spec", str(root / "m.toml"), "--method", "crm", str(files[0]),
                 "--out", str(out)]) == 0


def test_explain_per_class_means(setup, capsys, tmp_path):
    root, x, y = setup
    out = tmp_path / "pc"
    code, recs = run_json(capsys, ["explain", "--spec", str(root / "m.toml"), "--method", "crm",
                                   "--per-class", str(root / "data"), "--out", str(out), "--json"])
    assert code == 0
    classes = [r for r in recs if "images" in r]
    assert sorted(r["class_index"] for r in classes) == sorted(set(y.tolist()))
    xs = preprocess_uint8(x).numpy()
    maps = attribute(root / "m.toml", xs, "crm", target=y)
    for r in classes:
        c = r["class_index"]
        assert r["images"] == int((y == c).sum())
        assert np.allclose(np.load(out / r["map"]), maps[y == c].mean(0), atol=1e-9)


def test_explain_refuses_gradient_methods_on_onnx(setup, capsys, tmp_path):
    root, _, _ = setup
    f = sorted((root / "data").rglob("*.png"))[0]
    assert main(["explain", "--spec", str(root / "m.toml"), "--method", "saliency", str(f),
                 "--out", str(tmp_path / "o")]) == 2
    assert "ONNX backend runs: gradcam, scorecam, cam, crm" in capsys.readouterr().err
    # every input unreadable: nothing explained, exit 2 with the error record
    bad = tmp_path / "b.png"
    bad.write_bytes(b"")
    assert main(["explain", "--spec", str(root / "m.toml"), "--method", "crm", str(bad),
                 "--out", str(tmp_path / "o2")]) == 2


def test_deletion_insertion_equals_naive_loop_and_ranks_maps(gap_model, mnist):
    x = preprocess_uint8(mnist[0][POOL][:12]).numpy()
    maps = attribute(gap_model, x, "saliency")
    tgt = gap_model(__import__("torch").as_tensor(x)).argmax(1).numpy()
    pred = predictor(gap_model, 1, (28, 28))
    f = deletion_insertion(pred, x, maps, tgt, steps=8)
    order = np.argsort(-maps.reshape(12, -1), axis=1, kind="stable")
    for i in range(12):
        probs_d, probs_i = [], []
        for s in range(9):
            k = round(s / 8 * 784)
            drop = np.zeros(784, bool)
            drop[order[i, :k]] = True
            drop = drop.reshape(1, 1, 28, 28)
            for arr, xin in ((probs_d, np.where(drop, 0, x[i:i + 1])),
                             (probs_i, np.where(drop, x[i:i + 1], 0))):
                z = pred(xin.astype(np.float32))[0]
                arr.append(np.exp(z[tgt[i]] - z.max()) / np.exp(z - z.max()).sum())
        assert np.allclose(f.deletion_curve[i], probs_d, atol=1e-9)
        assert np.allclose(f.insertion_curve[i], probs_i, atol=1e-9)
    # saliency deletes the class faster than a seeded random ranking does, on every image pooled
    rnd = np.random.default_rng(0).random(maps.shape)
    g = deletion_insertion(pred, x, rnd, tgt, steps=8)
    assert f.deletion_auc.mean() < g.deletion_auc.mean()
