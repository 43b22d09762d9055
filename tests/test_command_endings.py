"""Every command that writes files ends by naming them, the same way (``twist_core.report``): ``wrote:``, one
aligned line per file with what it holds, then the next command where there is one.

The commands run as real subprocesses on a tiny trained run, one after another as a person would chain them.
(train and finetune: test_train_end.py and test_finetune.py; demo: test_demo.py; import-labels:
test_label_studio.py; restore-state: hostile/test_round_two_state_binding.py.)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import REPO

from twist_core.report import written_lines


def twist(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "twist_core.cli", *args], capture_output=True, text=True,
                            timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def named(stdout: str) -> list[str]:
    """The paths of the ``wrote:`` block, which must be the end of the output (a ``next:`` line aside)."""
    lines = stdout.rstrip("\n").split("\n")
    if lines[-1].startswith("next: "):
        lines.pop()
    start = len(lines) - 1 - lines[::-1].index("wrote:")
    assert all(line.startswith("  ") for line in lines[start + 1:]), stdout[-2000:]
    return [line.split()[0] for line in lines[start + 1:]]


def test_written_lines_name_existing_paths_aligned_folders_marked(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text("{}")
    (tmp_path / "folder").mkdir()
    lines = written_lines([(tmp_path / "a.json", "scores"), (tmp_path / "missing.png", "never written"),
                           (tmp_path / "folder", "an index")], next_step="twist app")
    assert lines == ["wrote:", f"  {tmp_path / 'a.json'}   scores", f"  {tmp_path / 'folder'}/  an index",
                     "next: twist app"]
    assert written_lines([(tmp_path / "missing.png", "x")]) == []


def test_every_command_names_the_files_it_wrote(tiny_run: Path, shapes_folder: Path, tmp_path: Path) -> None:
    model, labels, index = tmp_path / "m.onnx", tmp_path / "labels.csv", tmp_path / "index"
    export = twist("export", str(tiny_run), "--out", str(model))
    assert named(export.stdout) == [str(model), str(tmp_path / "m.json")]
    assert export.stdout.rstrip().endswith(f"next: twist label {model} FOLDER --out labels.csv")

    label = twist("label", str(model), str(shapes_folder), "--out", str(labels), "--workers", "0", "--no-progress",
                  "--export-tree", str(tmp_path / "tree"))
    assert named(label.stdout) == [str(labels), str(tmp_path / "labels.embeddings.npy"),
                                   str(tmp_path / "labels.meta.json"), str(tmp_path / "labels.skipped.txt"),
                                   f"{tmp_path / 'tree'}/"]

    built = twist("index", str(labels), "--model", str(model), "--out", str(index), "--device", "cpu")
    assert named(built.stdout) == [f"{index}/"]
    assert built.stdout.rstrip().endswith(f"next: twist app --model {model} --index {index}")

    report = tmp_path / "r.json"
    evaluated = twist("eval", str(model), str(shapes_folder), "--json", str(report))
    assert named(evaluated.stdout) == [str(report), str(tmp_path / "r.png")]  # the PNG was written unannounced

    found = twist("search", str(index), "--id", "0", "-k", "3", "--json", str(tmp_path / "hits.json"))
    assert named(found.stdout) == [str(tmp_path / "hits.json")]
    groups = twist("duplicates", str(index), "--device", "cpu", "--json", str(tmp_path / "dups.json"))
    assert named(groups.stdout) == [str(tmp_path / "dups.json")]
    merges = twist("suggest-merges", str(index), "--json", str(tmp_path / "merges.json"), "--plot",
                   str(tmp_path / "tree.png"))
    assert named(merges.stdout) == [str(tmp_path / "merges.json"), str(tmp_path / "tree.png")]

    quiet = twist("duplicates", str(index), "--device", "cpu")  # wrote nothing: says nothing about files
    assert "wrote:" not in quiet.stdout
