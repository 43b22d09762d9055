"""How a training run ends and what it says on the way (issue 37, items 8 and 9): a summary of what ran with
its files and the next command; under --time-budget a bar with the time left instead of a changing epoch total,
and the epochs that ran recorded in summary.json (config.json keeps the options, so --resume and --config
still run the same recipe); one warning when the speed stays under half the expected one."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO

from twist_core.train.budget import format_duration
from twist_core.train.speed import SETTLE_SECONDS, SpeedWatch, slow_speed_warning

TINY = ["--classes", "4", "--width", "8", "--hidden-dim", "32", "--image-size", "32", "--batch-size", "16",
        "--workers", "0", "--checkpoint-every", "0"]


def run_train(*args: str, prelude: str = "") -> subprocess.CompletedProcess:
    """``twist train`` in a subprocess; ``prelude`` is Python run before the command (to set a constant)."""
    code = f"import sys\n{prelude}\nfrom twist_core.cli import main\nsys.exit(main(['train', *sys.argv[1:]]))"
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600,
                            cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_a_budgeted_run_shows_the_time_left_records_what_ran_and_ends_with_a_summary(shapes_folder: Path,
                                                                                      tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run_train(str(shapes_folder), "--out", str(out), *TINY, "--epochs", "100", "--time-budget", "8s")
    bars = result.stderr.replace("\r", "\n")
    assert re.search(r"epoch \d+:", bars) and "left=" in bars
    assert not re.search(r"epoch \d+/\d+", bars), "a budgeted run's bar has no epoch total (it was refitted)"

    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["epochs_run"] == rows[-1]["epoch"] == len(rows) < 100
    assert summary["epochs_asked"] == 100 and summary["time_budget"] == "8s"
    assert summary["steps"] == rows[-1]["step"] and summary["images_seen"] == summary["steps"] * 16
    assert summary["final"]["clusters_in_use"] == rows[-1]["clusters_in_use"]
    config = json.loads((out / "config.json").read_text())
    assert config["epochs"] == 100 and "epochs_run" not in config  # the options as given: --resume reads them

    stdout = result.stdout
    assert f"trained {len(rows)} epochs ({summary['steps']:,} steps, {summary['images_seen']:,} images seen)" \
        in stdout and "the time budget 8s set the length" in stdout
    assert f"run folder: {out}" in stdout and "final: loss " in stdout
    for name in ("config.json", "metrics.jsonl", "curves.png", "last.pt", "skipped.txt", "summary.json", "DONE"):
        assert f"  {out / name} " in stdout, name
    assert stdout.rstrip().endswith(f"next: twist export {out} --out run.onnx")

    again = run_train("--out", str(out), "--resume", "--no-progress")  # a finished run resumes to its end
    assert f"trained {len(rows)} epochs" in again.stdout
    assert json.loads((out / "summary.json").read_text())["epochs_run"] == len(rows)


def test_slow_speed_is_judged_only_after_enough_training_time_and_only_below_half() -> None:
    assert slow_speed_warning(None, 100, 100.0, False) is None  # nothing was promised
    assert slow_speed_warning(400.0, 10, SETTLE_SECONDS / 2, False) is None  # too early to judge
    assert slow_speed_warning(400.0, 201 * 60, 60.0, False) is None  # 201 images/s: above half
    slow = slow_speed_warning(400.0, 100 * 60, 60.0, True)
    assert slow is not None and slow.startswith("warning: training runs at 100 images/s, under half the expected 400")
    assert "other processes" in slow and "slow disk" in slow and "25% of the epochs" in slow
    assert "4 times longer" in str(slow_speed_warning(400.0, 100 * 60, 60.0, False))
    watch = SpeedWatch(400.0, False)
    watch.end_epoch(100 * 40, 40.0)
    assert watch.check(0, 0.0) is not None and watch.check(100, 10.0) is None  # once


def test_format_duration() -> None:
    assert [format_duration(s) for s in (0.4, 42, 185, 3725)] == ["0s", "42s", "3m05s", "1h02m"]


def test_a_run_far_below_the_expected_speed_says_so_once(shapes_folder: Path, tmp_path: Path) -> None:
    """The run is real; the expectation is set out of reach (and judged after 0.01 s), so no timing decides it."""
    prelude = ("from twist_core.train import photo_defaults, speed\n"
               "photo_defaults.MEASURED_IMAGES_PER_S[('patches', 32)] = 1e9\nspeed.SETTLE_SECONDS = 0.01")
    result = run_train(str(shapes_folder), "--out", str(tmp_path / "run"), *TINY, "--epochs", "3", "--eval-data",
                       str(shapes_folder), prelude=prelude)
    assert "final eval: ACC " in result.stdout and "| kNN " in result.stdout  # the summary's final scores
    bars = result.stderr.replace("\r", "\n")
    assert bars.count("warning: training runs at") == 1, result.stderr[-3000:]
    assert "expected speed: about 1000000000 images/s" in bars
    assert "epoch 3/3" in bars and "left=" in bars  # without a budget: the epoch total and an estimate of time left
