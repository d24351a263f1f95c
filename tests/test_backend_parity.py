"""The gate through both backends: a PyTorch bundle gated with the model's ONNX export.

Same trained models as the other tests (conftest: `gap_model`, `fc_model`), exported
to ONNX. Through TorchProbe and OnnxProbe they must give logits equal to 1e-4, Grad-CAM
cosine >= 0.999 and EQUAL gate decisions on real held-out digits and real OOD images.
The export is accepted only once declared compatible (verifier.bundle.declarations), and a
hand-edited declaration is refused.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import CAL, POOL

from verifier.bundle.directory import Bundle, BundleError
from verifier.examples.datasets import OOD_SOURCES, ood_images
from verifier.examples.zoo import mnist_spec, preprocess_uint8
from verifier.probe.onnx_backend import OnnxProbe, export_onnx
from verifier.runtime.gatekeeper import Gatekeeper
from verifier.runtime.parity import CompatibilityError, declare_compatible, map_cosine
from verifier.spec import ModelSpec, model_fingerprint

#: real digits the declarations are measured on (reference split; the parity checks use POOL)
DECLARE = slice(2000, 2300)


def onnx_spec(path: Path) -> ModelSpec:
    return ModelSpec(classes=tuple(str(i) for i in range(10)), size=(28, 28), channels=1,
                     mean=(0.1307,), std=(0.3081,), path=path)


@pytest.fixture(scope="module")
def exports(tmp_path_factory, gap_model, fc_model) -> dict[str, ModelSpec]:
    out = tmp_path_factory.mktemp("exports")
    return {head: onnx_spec(export_onnx(m, mnist_spec(m), out / f"{head}.onnx"))
            for head, m in (("gap", gap_model), ("fc", fc_model))}


@pytest.fixture(scope="module")
def models(gap_model, fc_model):
    return {"gap": gap_model, "fc": fc_model}


@pytest.fixture(scope="module")
def declared(tmp_path_factory, mnist, gap_bundle, models, exports) -> dict[str, Path]:
    """Declared copies: the session's gap bundle, and a small fc bundle built here
    (1,000 reference + 300 calibration digits). The session bundle is left as it is."""
    from verifier.bundle.builder import build_bundle

    x, y = mnist
    root = tmp_path_factory.mktemp("declared")
    fc_plain = root / "fc-plain"
    build_bundle(mnist_spec(models["fc"]), (x[:1000], y[:1000]), fc_plain,
                 calibration=(x[CAL][:300], y[CAL][:300]), seed=0)
    out = {}
    for head, plain in (("gap", gap_bundle), ("fc", fc_plain)):
        t0 = time.perf_counter()
        rec = declare_compatible(plain, exports[head], x[DECLARE], model=models[head],
                                 label="onnx", out=root / head)
        f = rec["figures"]
        print(f"\n[{head}] declaration in {time.perf_counter() - t0:.1f}s: "
              f"{f['images']} digits + {f['garbage_images']} garbage, logits max diff "
              f"{f['logit_max_abs_diff']:.2e} (tol {f['logit_tolerance']:.2e}), cam cosine min "
              f"{f['cam_cosine_min']:.7f}, gate disagreements {f['gate_disagreement_count']}, "
              f"p-value max diff {f['p_value_max_abs_diff']:.2e}, method "
              f"{rec['model']['gradient_method']}")
        out[head] = root / head
    out["fc-plain"] = fc_plain
    return out


def _sets(mnist) -> dict[str, np.ndarray]:
    sets = {"digits": mnist[0][POOL]}
    sets.update({src: ood_images(src, 100, seed=11) for src in OOD_SOURCES})
    return sets


@pytest.mark.parametrize("head", ["gap", "fc"])
def test_gate_parity_on_real_digits_and_ood(head, mnist, declared, models, exports):
    bundle = Bundle.load(declared[head], model=models[head])
    torch_gate = Gatekeeper(bundle, probe=None)  # the bundle's own model, TorchProbe
    if head == "gap":
        onnx_gate = Gatekeeper(bundle, probe=OnnxProbe(exports[head]))
    else:
        onnx_gate = Gatekeeper.load(declared[head], spec=exports[head])
    assert type(torch_gate.probe).__name__ == "TorchProbe"
    assert isinstance(onnx_gate.probe, OnnxProbe)
    rates = {}
    for name, imgs in _sets(mnist).items():
        x = preprocess_uint8(imgs).numpy()
        accept = []
        for i in range(0, len(x), 200):
            a, b = torch_gate.score_batch(x[i:i + 200]), onnx_gate.score_batch(x[i:i + 200])
            np.testing.assert_allclose(b.result.logits, a.result.logits, atol=1e-4)
            np.testing.assert_array_equal(b.predicted, a.predicted)
            # every conv block's channel means (averaged inside the ONNX graph, by hooks in torch)
            assert len(b.result.block_stats) == len(a.result.block_stats) >= 2
            for p, q in zip(a.result.block_stats, b.result.block_stats):
                np.testing.assert_allclose(q, p, rtol=1e-4, atol=1e-5)
            # and their channel standard deviations (a SmallCNN's blocks are narrow enough)
            assert len(b.result.block_stds) == len(a.result.block_stds) == len(a.result.block_stats)
            for p, q in zip(a.result.block_stds, b.result.block_stds):
                np.testing.assert_allclose(q, p, rtol=1e-4, atol=1e-5)
            cos = map_cosine(a.result.cam, b.result.cam)
            assert cos.min() >= 0.999, f"{head}/{name}: Grad-CAM cosine {cos.min():.6f}"
            np.testing.assert_array_equal(b.accept, a.accept, err_msg=f"{head}/{name}: decisions differ")
            accept.append(a.accept)
        rates[name] = float(np.concatenate(accept).mean())
    print(f"\n[{head}] acceptance rates (equal through both backends): {rates}")
    # non-trivial decisions: held-out digits mostly accepted, real OOD mostly rejected
    assert rates["digits"] >= 0.85
    assert np.mean([rates[s] for s in OOD_SOURCES]) <= 0.2


def test_public_gate_path_gives_equal_decisions(mnist, declared, gap_model, exports):
    """Raw pixels through `gate()` (decode, preprocess, decide): same Decision records."""
    imgs = np.concatenate([mnist[0][POOL][:40], ood_images("photos", 20, seed=3)])
    t = Gatekeeper.load(declared["gap"], model=gap_model).gate(imgs)
    o = Gatekeeper.load(declared["gap"], spec=exports["gap"]).gate(imgs)
    assert [d.decision for d in t] == [d.decision for d in o]
    assert [d.predicted_class for d in t] == [d.predicted_class for d in o]
    np.testing.assert_allclose([d.p_value for d in o], [d.p_value for d in t], atol=1e-3)


def test_undeclared_export_is_refused(gap_bundle, gap_model, exports):
    with pytest.raises(BundleError, match="was built for model .* declare the export compatible"):
        Bundle.load(gap_bundle, spec=exports["gap"])
    with pytest.raises(BundleError, match="was built for model"):
        Gatekeeper.load(gap_bundle, spec=exports["gap"])
    with pytest.raises(ValueError, match="not the model this bundle was built for"):
        Gatekeeper(Bundle.load(gap_bundle, model=gap_model), probe=OnnxProbe(exports["gap"]))


def test_declared_export_loads_and_records_its_figures(declared, exports, gap_model):
    spec = exports["gap"]
    b = Bundle.load(declared["gap"], spec=spec)
    assert b.spec.path == spec.path and b.model_fingerprint != model_fingerprint(spec)
    assert b.compatible_fingerprints == {"onnx": model_fingerprint(spec)}
    rec = b.info["compatibility"]["onnx"]
    f = rec["figures"]
    assert rec["seal"].startswith("sha256:") and rec["bundle_model_fingerprint"] == b.model_fingerprint
    assert f["images"] == 300 and f["garbage_images"] == 150
    assert f["class_disagreement_count"] == 0 and f["gate_disagreement_count"] == 0
    assert f["cam_cosine_min"] >= 0.999 and f["logit_max_abs_diff"] <= f["logit_tolerance"]
    assert rec["model"]["gradient_method"] == "exact-gap-linear"
    assert Bundle.load(declared["fc"], spec=exports["fc"]).info["compatibility"]["onnx"][
        "model"]["gradient_method"] == "finite-difference"
    # the module still loads it; a declaration is for one model only
    Bundle.load(declared["gap"], model=gap_model)
    with pytest.raises(BundleError, match="was built for model"):
        Bundle.load(declared["gap"], spec=exports["fc"])


def test_another_models_export_fails_the_declaration(gap_bundle, gap_model, exports, mnist, tmp_path):
    before = (gap_bundle / "manifest.json").read_bytes()
    with pytest.raises(CompatibilityError, match=r"predicted classes differ on \d+ of \d+ images"):
        declare_compatible(gap_bundle, exports["fc"], mnist[0][DECLARE][:100], model=gap_model,
                           out=tmp_path / "never")
    assert not (tmp_path / "never").exists()
    assert (gap_bundle / "manifest.json").read_bytes() == before


def test_input_contract_must_match(declared, exports, gap_model, mnist):
    other = replace(exports["gap"], mean=(0.5,))
    with pytest.raises(BundleError, match=r"input contract \(input.mean: bundle \[0.1307\] != given \[0.5\]\)"):
        Bundle.load(declared["gap"], spec=other)
    with pytest.raises(CompatibilityError, match="input contract differs"):
        declare_compatible(declared["gap"], other, mnist[0][DECLARE][:10], model=gap_model)
    with pytest.raises(BundleError, match="not both"):
        Bundle.load(declared["gap"], model=gap_model, spec=exports["gap"])


def _edit(src: Path, dst: Path, change, reseal: bool = True) -> Path:
    """Copy a bundle and edit its manifest; `reseal` recomputes the manifest digest as a
    forger who knows the format would (every load refuses the edit otherwise), so that
    the declaration's own seal is what is tested."""
    from reference_maps.artifact import field_digests, manifest_digest

    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    change(m)
    if reseal:
        m["integrity"].update(digest=manifest_digest(m), fields=field_digests(m))
    (dst / "manifest.json").write_text(json.dumps(m, indent=2, sort_keys=True))
    return dst


def test_hand_edited_declarations_are_refused(declared, exports, gap_model, tmp_path):
    fc_fp = model_fingerprint(exports["fc"])
    src = declared["gap"]

    def add_fingerprint(m):  # the naive forgery: add a fingerprint
        m["compatible_fingerprints"]["mine"] = fc_fp

    def copy_record(m):  # a forged record: the genuine one, relabelled and re-pointed
        rec = dict(m["info"]["compatibility"]["onnx"], fingerprint=fc_fp)
        m["info"]["compatibility"]["mine"] = rec
        m["compatible_fingerprints"]["mine"] = fc_fp

    def swap_fingerprint(m):
        m["compatible_fingerprints"]["onnx"] = fc_fp
        m["info"]["compatibility"]["onnx"]["fingerprint"] = fc_fp

    def edit_figure(m):
        m["info"]["compatibility"]["onnx"]["figures"]["cam_cosine_min"] = 1.0

    def edit_alpha(m):  # the declaration is bound to the calibration it was measured with
        m["alpha"] = 0.2

    cases = [(add_fingerprint, "no sealed declaration record"), (copy_record, "seal does not match"),
             (swap_fingerprint, "seal does not match"), (edit_figure, "seal does not match"),
             (edit_alpha, "seal does not match")]
    for change, why in cases:
        plain = _edit(src, tmp_path / f"plain_{change.__name__}", change, reseal=False)
        with pytest.raises(BundleError, match="manifest.json was edited after it was written"):
            Bundle.load(plain, check_model=False)
        bad = _edit(src, tmp_path / change.__name__, change)
        for kw in ({"spec": exports["fc"]}, {"model": gap_model}, {"check_model": False}):
            with pytest.raises(BundleError, match=f"declaration .* is refused: .*{why}"):
                Bundle.load(bad, **kw)
    # a genuine declaration moved into another bundle of another model
    def transplant(m):
        g = json.loads((src / "manifest.json").read_text())
        m["compatible_fingerprints"] = g["compatible_fingerprints"]
        m["info"]["compatibility"] = g["info"]["compatibility"]

    bad = _edit(declared["fc"], tmp_path / "transplant", transplant)
    with pytest.raises(BundleError, match="copied from another bundle"):
        Bundle.load(bad, spec=exports["gap"])


def test_second_declaration_keeps_the_first(declared, exports, gap_model, mnist, tmp_path):
    """Re-saving re-seals every declaration over the content it is saved with."""
    copy = tmp_path / "twice"
    shutil.copytree(declared["gap"], copy)
    alias = tmp_path / "alias.onnx"
    shutil.copyfile(exports["gap"].path, alias)
    rec = declare_compatible(copy, onnx_spec(alias), mnist[0][DECLARE][:64], model=gap_model,
                             label="alias", garbage=32)
    assert rec["figures"]["images"] == 64 and rec["figures"]["garbage_images"] == 32
    b = Bundle.load(copy, spec=exports["gap"])
    assert set(b.compatible_fingerprints) == {"onnx", "alias"}
    Bundle.load(copy, spec=onnx_spec(alias))
