"""The GPU check's CPU dry run (``scripts/gpu_check.py --device cpu --tiny``): every step runs or says why it was
skipped, the JSON and the markdown table have their form, and a failing step makes the script exit non-zero."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import gpu_check  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


@pytest.mark.slow
def test_cpu_dry_run_writes_report(tmp_path, capsys):
    """The dry run in this process (its bundle runs are subprocesses either way; an interpreter of its own would
    only add its start-up), its exit status from ``main``; the refusal to overwrite through the script itself."""
    out = tmp_path / "check"
    code = gpu_check.main(["--output_dir", str(out), "--device", "cpu", "--tiny"])
    printed = capsys.readouterr()
    assert code == 0, printed.out[-3000:] + printed.err[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["passed"] and report["device"] == "cpu" and report["spatial_size"] == gpu_check.TINY_SIZE
    assert list(report["steps"]) == gpu_check.STEP_NAMES
    for name, step in report["steps"].items():
        assert step["status"] in ("ok", "skipped"), (name, step)
    training = report["steps"]["training"]["result"]["fp32"]
    assert training["iterations"] >= 1 and training["model_written"]
    assert all(math.isfinite(v) and v > 0 for v in training["step_times_s"])
    assert all(math.isfinite(v) for v in training["losses"])
    assert report["steps"]["torchrun"]["result"]["iterations"] >= 1
    inference = report["steps"]["inference"]["result"]
    assert {"lam=0.083,mu=0.03", "lam=0.5,mu=0.5", "evaluation"} <= set(inference)
    assert inference["evaluation"]["runtime_per_pair_s"] > 0
    assert report["steps"]["sweep"]["result"]["per_point_pair_s"] > 0
    rows = report["steps"]["hyper_vs_plain"]["result"]
    assert {(r["network"], r["mode"]) for r in rows} == {
        (n, m) for n in ("HyperUNet", "HyperLocalNet") for m in ("inference", "training")}
    table = (out / "gpu_check.md").read_text()
    assert "**passed**" in table and table.count("\n| ") >= len(gpu_check.STEP_NAMES) + 1
    # the scratch folder (data, models, fields) is not left in the output
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.md", "logs"]
    # an existing report is not overwritten
    again = subprocess.run([sys.executable, str(SCRIPT), "--output_dir", str(out), "--device", "cpu", "--tiny"],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "already holds" in again.stderr


def test_non_finite_and_false_flags_fail():
    assert gpu_check._finite({"a": [1.0, 2.0], "b": {"c": 3}})
    assert not gpu_check._finite({"a": [1.0, float("nan")]})
    assert not gpu_check._finite({"b": {"c": float("inf")}})
    assert gpu_check._false_flags({"x": {"ddf_finite": False}})
    assert gpu_check._false_flags([{"model_written": False}])
    assert not gpu_check._false_flags({"ddf_finite": True, "other": False})


def test_failed_step_fails_report(tmp_path, monkeypatch):
    check = gpu_check.Check(tmp_path, "cpu", tiny=True)
    monkeypatch.setattr(check, "make_data", lambda: {"pairs": 0})
    for name in gpu_check.STEP_NAMES:
        monkeypatch.setattr(check, name, lambda: {"value": 1.0})
    monkeypatch.setattr(check, "sweep", lambda: {"per_point_pair_s": float("nan")})
    monkeypatch.setattr(check, "torchrun", lambda: (_ for _ in ()).throw(RuntimeError("nccl down")))
    report = check.run()
    assert not report["passed"]
    assert report["steps"]["sweep"]["status"] == "non-finite"
    assert report["steps"]["torchrun"]["status"] == "failed" and "nccl down" in report["steps"]["torchrun"]["error"]
    assert report["steps"]["training"]["status"] == "ok"
    table = gpu_check.render({**report, "gpu": None})
    assert "**FAILED**" in table and "| torchrun | failed | error | RuntimeError: nccl down |" in table
