"""`--engine ray` on a local Ray instance (2 CPUs, started and stopped here) gives the local
engine's results: the same bundle, the same decisions record by record, the same audit; a
worker killed mid-job is restarted and every record still comes; a job that cannot finish
names the inputs it lost and writes nothing. Real MNIST digits, written as PNG files."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray

from conftest import CAL, POOL, TRAIN, write_onnx_model
from verifier.engines.options import EngineError, EngineOptions

CLASSES = [str(i) for i in range(10)]
RAY = EngineOptions(name="ray", workers=2)


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def site(tmp_path_factory, mnist, gap_model):
    """The model as an ONNX file + spec, labelled reference and calibration folders, a folder
    to gate (with one broken file) and a CSV manifest of part of it."""
    from verifier.data import save_dataset

    root = tmp_path_factory.mktemp("ray_site")
    x, y = mnist
    spec = write_onnx_model(root, gap_model)
    save_dataset(x[TRAIN][:400], y[TRAIN][:400], CLASSES, root / "ref")
    save_dataset(x[CAL][:200], y[CAL][:200], CLASSES, root / "cal")
    pool_x, pool_y = x[POOL][:150], y[POOL][:150]
    save_dataset(pool_x, pool_y, CLASSES, root / "scans")
    (root / "scans" / "3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    listed = sorted((root / "scans" / "7").glob("*.png"))
    (root / "manifest.csv").write_text("path\n" + "".join(f"scans/7/{p.name}\n" for p in listed))
    return root


@pytest.fixture(scope="module")
def bundles(site):
    from verifier.engines import jobs
    from verifier.spec import load_spec

    spec = load_spec(site / "model.toml")
    # crm beside Grad-CAM: the workers compute and merge a further method's maps too
    kw = dict(calibration=site / "cal", seed=0, batch_size=64, methods="gradcam,crm")
    local = jobs.build(spec, site / "ref", site / "bundle_local", EngineOptions(), **kw)
    on_ray = jobs.build(spec, site / "ref", site / "bundle_ray", RAY, **kw)
    return local, on_ray


def test_build_on_ray_equals_local(bundles, site):
    local, on_ray = bundles
    a, b = local.store.to_arrays(), on_ray.store.to_arrays()
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-12, err_msg=k)
        assert np.array_equal(a[k], b[k]), f"{k} not bit-equal"
    assert local.score_names == on_ray.score_names
    for k in local.score_names:
        assert np.array_equal(local.calibration_scores[k], on_ray.calibration_scores[k]), k
    assert np.array_equal(local.calibration_classes, on_ray.calibration_classes)
    assert local.info["build"] == on_ray.info["build"]
    assert local.info["build"]["reference_images"] == 400
    assert tuple(on_ray.methods) == ("gradcam", "crm") and any(k.startswith("method.crm") for k in b)
    assert "crm_iou" in on_ray.score_names
    # the staging folder beside the bundle is gone
    assert not [p for p in site.iterdir() if p.name.startswith(".bundle_ray.")]


def _decisions(path: Path):
    return pq.read_table(path).drop(["time"])


def test_gate_on_ray_equals_local_record_by_record(bundles, site, capsys):
    from verifier.cli.main import main

    args = ["gate", "--bundle", str(site / "bundle_local"), str(site / "scans"),
            "--manifest", str(site / "manifest.csv"), "--batch-size", "32"]
    assert main([*args, "--out", str(site / "local.parquet")]) == 0
    assert main([*args, "--out", str(site / "ray.parquet"), "--engine", "ray", "--json"]) == 0
    local, on_ray = _decisions(site / "local.parquet"), _decisions(site / "ray.parquet")
    n_seven = len(list((site / "scans" / "7").glob("*.png")))
    assert local.num_rows == 150 + 1 + n_seven
    assert on_ray.equals(local)  # every column, every row, in input order
    errors = [e for e in local.column("error").to_pylist() if e]
    assert len(errors) == 1 and "broken.png" in errors[0]
    assert '"records": %d' % local.num_rows in capsys.readouterr().out


def test_worker_killed_mid_job_still_yields_every_record(bundles, site, tmp_path):
    from verifier.engines import jobs

    marker = tmp_path / "crash-once"
    marker.write_text("once")
    opts = EngineOptions(name="ray", workers=2, retries=2, fault=(str(marker), 2))
    jobs.gate_to_file(site / "bundle_local", [site / "scans"], tmp_path / "ray.parquet", opts,
                      batch_size=32)
    assert not marker.exists(), "the worker never crashed: the test proves nothing"
    jobs.gate_to_file(site / "bundle_local", [site / "scans"], tmp_path / "local.parquet",
                      EngineOptions(), batch_size=32)
    assert _decisions(tmp_path / "ray.parquet").equals(_decisions(tmp_path / "local.parquet"))


def test_job_that_cannot_finish_names_the_missing_inputs(bundles, site, tmp_path):
    from verifier.engines import jobs

    marker = tmp_path / "crash-always"
    marker.write_text("always")
    opts = EngineOptions(name="ray", workers=2, retries=0, fault=(str(marker), 1))
    out = tmp_path / "decisions.parquet"
    with pytest.raises(EngineError) as err:
        jobs.gate_to_file(site / "bundle_local", [site / "scans"], out, opts, batch_size=32)
    msg = str(err.value)
    assert "could not finish" in msg and "nothing was written" in msg
    chunk_1 = [str(p) for p in sorted((site / "scans").rglob("*.png"))[32:64]]  # sorted walk
    assert set(chunk_1) <= set(err.value.missing)
    assert f"{len(err.value.missing)} of 151 input(s) have no result" in msg
    assert not out.exists() and list(tmp_path.iterdir()) == [marker]  # no output, no staging


def test_audit_on_ray_equals_local(bundles, site):
    from verifier.bundle.directory import Bundle
    from verifier.engines import jobs
    from verifier.spec import load_spec

    bundle = Bundle.load(site / "bundle_local")
    cand = load_spec(site / "model.toml")
    kw = dict(sanity=False, evidence_images=40, batch_size=64)
    local = jobs.audit(bundle, cand, site / "cal", EngineOptions(), **kw)
    on_ray = jobs.audit(bundle, cand, site / "cal", RAY, **kw)
    assert local.to_dict() == on_ray.to_dict()
    assert local.n_images == 200
    assert on_ray.check("crm_attention_per_image").passed is not None  # computed on the workers


def test_local_engine_needs_no_ray(bundles, site, tmp_path):
    """A plain run with Ray made unimportable: the local engine never touches it."""
    code = ("import sys; sys.modules['ray'] = None\n"
            "from verifier.cli.main import main\n"
            f"rc = main(['gate', '--bundle', {str(site / 'bundle_local')!r}, "
            f"{str(site / 'scans' / '1')!r}, '--out', {str(tmp_path / 'd.parquet')!r}])\n"
            "assert rc == 0, rc\n"
            f"rc = main(['gate', '--bundle', {str(site / 'bundle_local')!r}, "
            f"{str(site / 'scans' / '1')!r}, '--out', {str(tmp_path / 'e.parquet')!r}, "
            "'--engine', 'ray'])\n"
            "assert rc == 2, rc\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "pip install 'verifier[ray]'" in run.stderr
    assert pq.read_table(tmp_path / "d.parquet").num_rows == len(list((site / "scans" / "1").glob("*")))


def test_out_never_overwrites_what_the_tool_did_not_write(bundles, site, tmp_path, capsys):
    from verifier.cli.main import main

    out = tmp_path / "d.parquet"
    out.write_text("somebody's notes")
    args = ["gate", "--bundle", str(site / "bundle_local"), str(site / "scans" / "1"), "--out", str(out)]
    assert main(args) == 2 and main([*args, "--overwrite"]) == 2
    assert out.read_text() == "somebody's notes"
    assert "never overwritten" in capsys.readouterr().err
    out.unlink()
    assert main(args) == 0
    assert main(args) == 2  # exists: refused without --overwrite
    assert main([*args, "--overwrite"]) == 0  # our own file: replaced
    assert pq.read_table(out).num_rows == len(list((site / "scans" / "1").glob("*")))
    assert [p.name for p in tmp_path.iterdir()] == ["d.parquet"]  # no temporaries left
