"""The command line on a file-based bundle: build from PNG folders, gate --json/--log, exit codes."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import CAL, POOL, TRAIN, write_onnx_model

from verifier.cli.main import main
from verifier.data import save_dataset

FIELDS = {"input", "decision", "p_value", "predicted_class", "confidence", "reasons", "scores",
          "p_values", "error"}


@pytest.fixture(scope="module")
def cli_bundle(tmp_path_factory, mnist, gap_model):
    root = tmp_path_factory.mktemp("cli")
    write_onnx_model(root, gap_model)
    x, y = mnist
    classes = [str(i) for i in range(10)]
    save_dataset(x[TRAIN][:1500], y[TRAIN][:1500], classes, root / "ref")
    save_dataset(x[CAL], y[CAL], classes, root / "cal")
    code = main(["build", "--spec", str(root / "model.toml"), "--data", str(root / "ref"),
                 "--calibration", str(root / "cal"), "--out", str(root / "bundle")])
    assert code == 0
    return root


def test_gate_json_lines(cli_bundle, mnist, capsys, tmp_path):
    folder = tmp_path / "in"
    save_dataset(mnist[0][POOL][:20], mnist[1][POOL][:20], [str(i) for i in range(10)], folder)
    (folder / "broken.png").write_bytes(b"not an image")
    capsys.readouterr()
    code = main(["gate", "--bundle", str(cli_bundle / "bundle"), str(folder), "--json",
                 "--log", str(tmp_path / "log")])
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 21
    assert all(set(d) == FIELDS for d in lines)
    broken = [d for d in lines if d["input"].endswith("broken.png")][0]
    assert broken["error"] and broken["decision"] == "reject"
    ok = [d for d in lines if d["error"] is None]
    assert all(d["decision"] in ("accept", "reject") and 0 < d["p_value"] <= 1 for d in ok)
    assert sum(d["decision"] == "accept" for d in ok) >= 16
    files = list((tmp_path / "log").glob("date=*/part-*.parquet"))
    assert files and sum(pq.read_table(f).num_rows for f in files) == 21


def test_alpha_override_changes_decisions(cli_bundle, mnist, capsys, tmp_path):
    folder = tmp_path / "in"
    save_dataset(mnist[0][POOL][:40], mnist[1][POOL][:40], [str(i) for i in range(10)], folder)
    rates = []
    for alpha in ("0.01", "0.5"):
        capsys.readouterr()
        assert main(["gate", "--bundle", str(cli_bundle / "bundle"), str(folder), "--json", "--alpha", alpha]) == 0
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        rates.append(np.mean([d["decision"] == "reject" for d in lines]))
    assert rates[0] < rates[1]


def test_errors_exit_2(cli_bundle, tmp_path, capsys):
    assert main(["gate", "--bundle", str(tmp_path / "nope"), str(tmp_path)]) == 2
    assert "no verifier-bundle" in capsys.readouterr().err
    (tmp_path / "bad.toml").write_text("[model]\n")
    assert main(["build", "--spec", str(tmp_path / "bad.toml"), "--data", str(tmp_path), "--out", str(tmp_path / "b")]) == 2
    assert "model.path" in capsys.readouterr().err


def test_help_teaches():
    out = subprocess.run([sys.executable, "-m", "verifier.cli.main", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for cmd in ("demo", "build", "gate", "audit", "drift"):
        assert cmd in out.stdout
    out = subprocess.run([sys.executable, "-m", "verifier.cli.main", "gate", "--help"], capture_output=True, text=True)
    assert "--bundle" in out.stdout and "--json" in out.stdout and "Exit code" in out.stdout


def test_declare_a_torchscript_copy_then_gate_with_it(cli_bundle, gap_model, mnist, tmp_path, capsys):
    import shutil

    import torch

    bundle = tmp_path / "bundle"
    shutil.copytree(cli_bundle / "bundle", bundle)
    traced = torch.jit.trace(gap_model.eval(), torch.zeros(1, 1, 28, 28))
    traced.save(str(tmp_path / "model.pt"))
    spec = (cli_bundle / "model.toml").read_text().replace("model.onnx", "model.pt")
    (tmp_path / "ts.toml").write_text(spec)
    folder = tmp_path / "in"
    save_dataset(mnist[0][POOL][:60], mnist[1][POOL][:60], [str(i) for i in range(10)], folder)
    args = ["gate", "--bundle", str(bundle), "--spec", str(tmp_path / "ts.toml"), str(folder), "--json"]
    assert main(args) == 2
    assert "was built for model" in capsys.readouterr().err
    assert main(["declare", "--bundle", str(bundle), "--spec", str(tmp_path / "ts.toml"), "--data", str(folder)]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["fingerprint"].startswith("sha256:") if "fingerprint" in record else record
    assert main(args) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 60 and sum(d["decision"] == "accept" for d in lines) >= 50
