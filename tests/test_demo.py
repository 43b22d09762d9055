"""`twist demo --no-app` end to end on scikit-learn's digits: every real command, and a score worth showing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO

# Measured on the 2-core CI machine (see the closing note of the demo issue): the demo's default 2-minute run
# reached ACC 0.80 and NMI 0.74 on the digits, beside k-means on raw pixels at ACC 0.79; the test keeps a
# margin for slower machines, where the time budget buys fewer steps.
MIN_ACC = 0.55


def test_demo_runs_every_step_and_clusters_the_digits(tmp_path: Path) -> None:
    workspace = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "twist_core.cli", "demo", "--no-app", "--workspace",
                             str(workspace)], capture_output=True, text=True, timeout=900, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    for step in ("1/5", "2/5", "3/5", "4/5", "5/5"):
        assert f"== {step}" in result.stdout
    summary = json.loads((workspace / "demo.json").read_text())
    assert summary["acc"] >= MIN_ACC, summary
    assert "k-means on raw pixels" in result.stdout
    assert len(list((workspace / "digits").rglob("*.png"))) == 1797
    assert Path(summary["model"]).with_suffix(".json").exists()
    assert (workspace / "labels.csv").read_text().count("\n") == 1798  # header + one row per digit
    assert (Path(summary["index"]) / "manifest.json").exists()
