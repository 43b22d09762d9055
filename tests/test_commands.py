"""Every command is built the same way: ``--config FILE`` is honoured, flags override it, and a known error
is one line ``twist CMD: error: ...`` with exit code 2, whichever command it comes from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from twist_core.cli import commands
from twist_core.cli import main as twist

DEMO_MODEL = REPO / "models" / "demo" / "model.onnx"


def config_cases(tmp_path: Path) -> dict[str, tuple[list[str], dict, str]]:
    """Per command: the command line, a config file's options (one of them wrong) and what the error names."""
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder\n")
    missing = str(tmp_path / "missing")
    return {
        "demo": ([], {"workspace": str(a_file / "ws"), "app": False}, "a-file"),
        "train": ([str(tmp_path)], {"time-budget": "banana"}, "--time-budget"),
        "eval": ([], {"source": missing, "data": str(tmp_path)}, missing),
        "export": ([], {"run": missing, "out": str(tmp_path / "m.onnx")}, missing),
        "finetune": ([missing], {"index": str(tmp_path)}, missing),  # without the file: "give the labels"
        "label": ([str(DEMO_MODEL), str(tmp_path)], {"topk": 0}, "topk"),
        "index": ([], {"source": missing + ".csv"}, missing),
        "merge-tables": ([str(tmp_path / "merged.csv"), str(tmp_path / "shard.csv")], {"root": missing}, missing),
        "search": ([], {"index": missing, "id": 1}, missing),
        "duplicates": ([str(tmp_path)], {"threshold": 2.0}, "--threshold"),
        "suggest-merges": ([str(tmp_path)], {"top": 0}, "--top"),
        "app": ([], {"model": missing + ".onnx", "index": str(tmp_path)}, missing),
        "import-labels": ([missing + ".json"], {"index": str(tmp_path)}, missing),
        "restore-state": ([], {"file": missing + ".json", "index": str(tmp_path)}, missing),
    }


def test_every_command_is_covered(tmp_path: Path) -> None:
    assert set(config_cases(tmp_path)) == set(commands())


@pytest.mark.parametrize("command", sorted(commands()))
def test_config_file_is_honoured(command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The wrong value comes only from the file, so its one-line error proves the file was read (search and
    duplicates had no --config before: argparse refused the flag with a usage message)."""
    args, options, named = config_cases(tmp_path)[command]
    config = tmp_path / ("options.yaml" if len(command) % 2 else "options.json")
    config.write_text(yaml.safe_dump(options) if config.suffix == ".yaml" else json.dumps(options))
    assert twist([command, *args, "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"twist {command}: error: ") and err.count("\n") == 1, err
    assert named in err


def test_flags_override_the_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "options.yaml"
    config.write_text(yaml.safe_dump({"threshold": 0.5}))
    assert twist(["duplicates", str(tmp_path / "missing"), "--config", str(config), "--threshold", "3"]) == 2
    assert "got 3.0" in capsys.readouterr().err


def test_abbreviated_options_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """argparse's prefix matching read ``suggest-merges --to 6`` as ``--top 6`` before ``--to`` existed: a
    misspelt or abbreviated option must be an error, never silently another option."""
    with pytest.raises(SystemExit) as exit_:
        twist(["duplicates", str(tmp_path), "--thresh", "0.5"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --thresh" in capsys.readouterr().err


def test_unknown_or_unreadable_config_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "typo.yaml").write_text("treshold: 0.5\n")
    (tmp_path / "broken.yaml").write_text("threshold: [0.5\n")
    for name, named in (("typo.yaml", "treshold"), ("broken.yaml", "broken.yaml"), ("none.yaml", "none.yaml")):
        assert twist(["duplicates", str(tmp_path), "--config", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("twist duplicates: error: ") and err.count("\n") == 1 and named in err, err


def test_auto_is_one_word_and_old_sentinels_still_load(tmp_path: Path) -> None:
    """``auto`` on the command line and in files; the 0/-1/None that older versions wrote still mean auto."""
    from twist_core.commands.train import build_parser
    from twist_core.config import AUTO, build_config
    from twist_core.index.build import IndexConfig
    from twist_core.label.labeller import LabelConfig
    from twist_core.train.options import TrainConfig

    args = build_parser().parse_args(["photos", "--width", "auto", "--batch-size", "0", "--tau", "0.7"])
    config = build_config(TrainConfig, args)
    assert (config.width, config.batch_size, config.tau, config.lr) == (AUTO, AUTO, 0.7, AUTO)
    old = {"image_size": 0, "hidden_dim": 0, "tau": 0.0, "self_label_fraction": -1.0, "lr": None,
           "weight_decay": None, "small_stem": None, "workers": -1, "batch_size": 0, "width": 0}
    assert {k: getattr(TrainConfig(**old), k) for k in old} == dict.fromkeys(old, AUTO)
    kept = TrainConfig(self_label_fraction=0.0, workers=0, small_stem=False)  # real values, not sentinels
    assert (kept.self_label_fraction, kept.workers, kept.small_stem) == (0.0, 0, False)
    assert (LabelConfig(workers=-1, threads=0).workers, LabelConfig(threads=0).threads) == (AUTO, AUTO)
    assert LabelConfig(workers=0).workers == 0
    assert (IndexConfig(nlist=0).nlist, IndexConfig(nprobe=0).nprobe, IndexConfig(pq_m=0).pq_m) == (AUTO,) * 3


def test_saved_config_reproduces_an_auto_run(shapes_folder: Path, tmp_path: Path) -> None:
    """Every value chosen automatically (batch size, tau, self-labelling share, ...) is in config.json, so
    ``twist train --config RUN/config.json`` trains the same weights."""
    import torch

    from twist_core.commands.train import main as train_main
    from twist_core.config import AUTO

    first = tmp_path / "first"
    options = ["--classes", "4", "--width", "8", "--hidden-dim", "64", "--image-size", "32", "--epochs", "1",
               "--workers", "0", "--no-progress", "--checkpoint-every", "0"]
    assert train_main([str(shapes_folder), "--out", str(first), *options]) == 0
    saved = json.loads((first / "config.json").read_text())
    left_auto = {name for name, value in saved.items() if value == AUTO}
    assert left_auto <= {"cache", "device"}, left_auto  # where the run happens, not what it computes
    assert (saved["batch_size"], saved["tau"], saved["self_label_fraction"]) == (16, 1.0, 0.0)
    again = tmp_path / "again"
    assert train_main(["--config", str(first / "config.json"), "--out", str(again)]) == 0
    weights = [torch.load(run / "last.pt", weights_only=True)["model"] for run in (first, again)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_training_and_eval_commands_start_without_the_libraries_they_may_not_need() -> None:
    """torchvision (with torch._dynamo), scikit-learn and scipy cost about two seconds per process; a patches run,
    ``--help`` and a rejected option need none of them, so the commands import them only where they are used."""
    import subprocess
    import sys

    probe = ("import sys, twist_core.commands.train, twist_core.commands.eval, twist_core.commands.finetune; "
             "print(' '.join(m for m in ('torchvision', 'sklearn', 'scipy') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "", f"imported at start-up: {result.stdout.strip()}"
