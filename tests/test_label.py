"""Labelling folders: bad files, the three table formats, kill -9 and resume, torchrun, the exported tree."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from twist_core.commands.label import main
from twist_core.deploy.export import ExportConfig, export_model
from twist_core.deploy.infer import OnnxModel
from twist_core.label.labeller import LabelConfig, label_folder, labels_paths, read_labels
from twist_core.label.tree import file_names

REPO = Path(__file__).resolve().parents[1]
# Small chunks and batches so that runs have many commit points; identical in every run that is compared.
RUN_OPTIONS = ["--chunk-size", "50", "--batch-size", "10", "--no-progress"]


@pytest.fixture(scope="module")
def model_path(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("model") / "tiny.onnx"
    return export_model(ExportConfig(run=str(tiny_run), out=str(out), class_names="discs,stripes,a/b,A:B"))


@pytest.fixture(scope="module")
def bad_folder(shapes_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bad") / "images"
    shutil.copytree(shapes_folder, root)
    (root / "broken.jpg").write_text("not a jpeg")
    (root / "empty.png").write_bytes(b"")
    good = (root / "discs" / "000.png").read_bytes()
    (root / "discs" / "truncated.png").write_bytes(good[: len(good) // 2])
    return root


def config(model: Path, folder: Path, out: Path, **overrides) -> LabelConfig:
    settings = dict(model=str(model), folder=str(folder), out=str(out), chunk_size=50, batch_size=10,
                    workers=0, progress=False)
    settings.update(overrides)
    return LabelConfig(**settings)


def same_tables(a: list[dict], b: list[dict], atol: float = 1e-5) -> None:
    assert [r["path"] for r in a] == [r["path"] for r in b]
    for x, y in zip(a, b, strict=True):
        assert (x["cluster"], x["cluster_name"], x["error"]) == (y["cluster"], y["cluster_name"], y["error"])
        if not x["error"]:
            assert abs(x["confidence"] - y["confidence"]) <= atol and abs(x["margin"] - y["margin"]) <= atol


def test_labels_folder_with_bad_files(model_path: Path, bad_folder: Path, tmp_path: Path) -> None:
    summary = label_folder(config(model_path, bad_folder, tmp_path / "labels.csv", workers=1))
    rows, meta = read_labels(tmp_path / "labels.csv")
    files = sorted(p.relative_to(bad_folder).as_posix() for p in bad_folder.rglob("*") if p.is_file())
    assert [r["path"] for r in rows] == files and summary["rows"] == len(files) == 51
    errors = {r["path"]: r for r in rows if r["error"]}
    assert set(errors) == {"broken.jpg", "empty.png", "discs/truncated.png"}
    assert all(r["cluster"] is None and r["confidence"] is None and r["topk"] is None
               for r in errors.values())
    assert (meta["rows"], meta["labelled"], meta["errors"]) == (51, 48, 3)
    assert meta["root"] == str(bad_folder.resolve()) and meta["columns"][0] == "path"

    embeddings_path, _ = labels_paths(tmp_path / "labels.csv")
    embeddings = np.load(embeddings_path)
    assert embeddings.shape == (51, OnnxModel(model_path).embedding_dim) and embeddings.dtype == np.float16
    error_rows = [i for i, r in enumerate(rows) if r["error"]]
    assert not embeddings[error_rows].any() and np.abs(np.delete(embeddings, error_rows, 0)).sum(1).min() > 0

    model = OnnxModel(model_path)  # the table agrees with the inference library
    good = [i for i, r in enumerate(rows) if not r["error"]][:6]
    probs, reference = model.predict([bad_folder / rows[i]["path"] for i in good])
    np.testing.assert_allclose(embeddings[good].astype(np.float32), reference, rtol=2e-3, atol=2e-3)
    for j, i in enumerate(good):
        row, topk = rows[i], json.loads(rows[i]["topk"])
        assert row["cluster"] == int(probs[j].argmax()) == topk[0][0] and len(topk) == 4
        assert row["cluster_name"] == model.class_names[row["cluster"]]
        assert abs(row["confidence"] - probs[j].max()) < 1e-5
        assert abs(row["margin"] - (topk[0][1] - topk[1][1])) < 2e-6

    for suffix in (".jsonl", ".parquet"):
        label_folder(config(model_path, bad_folder, tmp_path / f"labels{suffix}", embedding_dtype="float32"))
        other, _ = read_labels(tmp_path / f"labels{suffix}")
        same_tables(rows, other)
        assert np.load(labels_paths(tmp_path / f"labels{suffix}")[0]).dtype == np.float32


def label_command(model: Path, folder: Path, out: Path, *extra: str) -> list[str]:
    return [str(model), str(folder), "--out", str(out), *RUN_OPTIONS, *extra]


def test_kill_and_resume_gives_the_uninterrupted_table(model_path: Path, cifar_1k: Path, tmp_path: Path,
                                                       shapes_folder: Path, capsys) -> None:
    assert main(label_command(model_path, cifar_1k, tmp_path / "whole.csv")) == 0
    out, parts = tmp_path / "resumed.csv", tmp_path / "resumed.csv.parts"
    slow = label_command(model_path, cifar_1k, out, "--batch-size", "2")
    cmd = [sys.executable, "-m", "twist_core.label", *slow]
    process = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while len(list(parts.glob("chunk-*.npz"))) < 2 and process.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    committed = len(list(parts.glob("chunk-*.npz")))
    assert process.returncode == -signal.SIGKILL and 2 <= committed < 20 and not out.exists()

    # A different folder cannot continue this partial run.
    assert main(label_command(model_path, shapes_folder, out)) == 2
    assert "different the folder" in capsys.readouterr().err
    summary = label_folder(config(model_path, cifar_1k, out))
    assert summary["resumed_chunks"] == committed and summary["images_this_run"] == 1000 - 50 * committed
    same_tables(read_labels(tmp_path / "whole.csv")[0], read_labels(out)[0], atol=0)
    whole_embeddings = np.load(labels_paths(tmp_path / "whole.csv")[0])
    np.testing.assert_array_equal(np.load(labels_paths(out)[0]), whole_embeddings)
    assert not parts.exists()

    assert main(label_command(model_path, cifar_1k, out)) == 2  # a finished table is not silently replaced
    assert "--overwrite" in capsys.readouterr().err


def test_torchrun_two_processes_match_one(model_path: Path, cifar_1k: Path, tmp_path: Path) -> None:
    label_folder(config(model_path, cifar_1k, tmp_path / "one.csv", threads=1))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "twist_core.label", *label_command(model_path, cifar_1k, tmp_path / "two.csv")]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    one, _ = read_labels(tmp_path / "one.csv")
    two, meta = read_labels(tmp_path / "two.csv")
    assert meta["processes"] == 2 and len(two) == 1000
    same_tables(one, two)
    np.testing.assert_allclose(np.load(labels_paths(tmp_path / "two.csv")[0]).astype(np.float32),
                               np.load(labels_paths(tmp_path / "one.csv")[0]).astype(np.float32), atol=2e-3)


def test_exported_tree_opens_with_imagefolder(model_path: Path, bad_folder: Path, tmp_path: Path) -> None:
    from torchvision.datasets import ImageFolder

    label_folder(config(model_path, bad_folder, tmp_path / "t.csv", export_tree=str(tmp_path / "tree")))
    rows, meta = read_labels(tmp_path / "t.csv")
    good = [r for r in rows if not r["error"]]
    dataset = ImageFolder(str(tmp_path / "tree"))
    assert len(dataset) == len(good) == 48 and meta["tree"]["mode"] == "symlink"
    by_source = {Path(p).resolve(): dataset.classes[t] for p, t in dataset.samples}
    # "a/b" and "A:B" clean to names that clash on case-blind disks: the cluster id tells them apart.
    expected = {"discs": "discs", "stripes": "stripes", "a/b": "a_b-2", "A:B": "A_B-3"}
    for row in good:
        assert by_source[(bad_folder / row["path"]).resolve()] == expected[row["cluster_name"]]
    assert all(Path(p).is_symlink() for p, _ in dataset.samples)

    threshold = float(np.median([r["confidence"] for r in good]))
    label_folder(config(model_path, bad_folder, tmp_path / "u.csv", export_tree=str(tmp_path / "copies"),
                        tree_mode="copy", min_confidence=threshold))
    copies = ImageFolder(str(tmp_path / "copies"))
    names = file_names([r["path"] for r in rows])
    by_name = {names[r["path"]]: r for r in good}
    uncertain = [p for p, t in copies.samples if copies.classes[t] == "_uncertain"]
    assert len(copies) == len(good) and 0 < len(uncertain) < len(good)
    assert not any(Path(p).is_symlink() for p, _ in copies.samples)
    for path, target in copies.samples:
        row = by_name[Path(path).name]
        assert (copies.classes[target] == "_uncertain") == (row["confidence"] < threshold)


def test_user_errors_are_one_line(model_path: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "missing.onnx"), str(tmp_path / "empty")]) == 2
    assert main([str(model_path), str(tmp_path / "empty"), "--out", str(tmp_path / "x.csv")]) == 2
    assert main([str(model_path), str(tmp_path / "empty"), "--out", str(tmp_path / "x.xlsx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("twist label: error:") for line in err)
    assert "no model" in err[0] and "no image files" in err[1] and ".csv" in err[2]
