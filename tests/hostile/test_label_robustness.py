"""A hostile or unlucky user against ``twist label`` and ``twist search``: damaged models, odd file names,
missing writers, formula cells, the project's own outputs inside the dataset, unreadable folders, a full disk.

Every test runs the real command in a child process (exit code and stderr are what a user sees).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from PIL import Image

from twist_core.export import ExportConfig, export_model
from twist_core.label_table import read_labels

REPO = Path(__file__).resolve().parents[2]
FAST = ["--chunk-size", "16", "--batch-size", "8", "--workers", "0", "--no-progress"]


def twist(*args: str | Path, env: dict[str, str] | None = None, **popen) -> subprocess.CompletedProcess:
    """``python -m twist_core.cli ARGS`` in a child process, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "twist_core.cli", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})}, **popen)


def one_error_line(result: subprocess.CompletedProcess, command: str = "label") -> str:
    """The single line a failed command prints, checked to be one line and no traceback."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"twist {command}: "), result.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def model_path(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("model") / "tiny.onnx"
    return export_model(ExportConfig(run=str(tiny_run), out=str(out), class_names="discs,stripes,third,fourth"))


def largest_initializer(model: Path) -> onnx.TensorProto:
    graph = onnx.load(str(model)).graph
    return max(graph.initializer, key=lambda tensor: len(tensor.raw_data))


def overwrite_weight_bytes(model: Path, out: Path, n_bytes: int = 4096) -> Path:
    """Copy of ``model`` with ``n_bytes`` of its largest weight tensor overwritten in the file, as a bad disk does."""
    raw = largest_initializer(model).raw_data
    data = bytearray(model.read_bytes())
    start = data.find(raw)
    assert start >= 0 and data.find(raw, start + 1) < 0 and len(raw) >= n_bytes
    data[start:start + n_bytes] = b"\xff" * n_bytes
    out.write_bytes(bytes(data))
    return out


def scale_first_filter(model: Path, out: Path, factor: float = 1e37) -> Path:
    """Copy of ``model`` whose first stem filter is huge: grey images stay finite, colourful ones overflow to NaN."""
    proto = onnx.load(str(model))
    stem = next(t for t in proto.graph.initializer if t.name.endswith("stem.filters"))
    weights = numpy_helper.to_array(stem).copy()
    weights[0] *= factor
    stem.CopyFrom(numpy_helper.from_array(weights, stem.name))
    onnx.save(proto, str(out))
    return out


def test_damaged_model_is_refused_before_labelling(model_path: Path, shapes_folder: Path, tmp_path: Path) -> None:
    damaged = overwrite_weight_bytes(model_path, tmp_path / "damaged.onnx")
    out = tmp_path / "labels.csv"
    result = twist("label", damaged, shapes_folder, "--out", out, *FAST)
    line = one_error_line(result)
    assert result.returncode == 2 and "NaN" in line and "damaged" in line
    assert not out.exists() and not list(tmp_path.glob("labels.*"))


def test_model_that_gives_nan_for_most_images_is_refused(model_path: Path, shapes_folder: Path,
                                                         tmp_path: Path) -> None:
    overflowing = scale_first_filter(model_path, tmp_path / "overflowing.onnx")
    out = tmp_path / "labels.jsonl"
    result = twist("label", overflowing, shapes_folder, "--out", out, *FAST)
    line = one_error_line(result)
    assert result.returncode == 2 and "NaN or infinite outputs for" in line and "--overwrite" in line
    assert not out.exists()


def test_a_few_nan_outputs_become_error_rows(model_path: Path, shapes_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(12):  # near-grey images keep the overflowing filter finite
        Image.new("RGB", (32, 32), (124 + i, 128, 130 - i)).save(folder / f"grey{i:02d}.png")
    for name in ("discs/000.png", "stripes/000.png"):
        shutil.copy(shapes_folder / name, folder / name.replace("/", "-"))
    overflowing = scale_first_filter(model_path, tmp_path / "overflowing.onnx")
    out = tmp_path / "labels.csv"
    result = twist("label", overflowing, folder, "--out", out, "--embedding-dtype", "float32", *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    rows, meta = read_labels(out)
    errors = {row["path"]: row["error"] for row in rows if row["error"]}
    assert set(errors) == {"discs-000.png", "stripes-000.png"} and all("not finite" in e for e in errors.values())
    assert (meta["labelled"], meta["errors"]) == (12, 2)
    assert np.isfinite(np.load(out.with_name("labels.embeddings.npy"))).all()
    float16 = twist("label", overflowing, folder, "--out", tmp_path / "half.csv", *FAST)  # huge values overflow
    assert float16.returncode == 2 and "for 14 of 14 images" in one_error_line(float16)


def test_search_refuses_nan_query_instead_of_an_empty_table(model_path: Path, shapes_folder: Path,
                                                            tmp_path: Path) -> None:
    labels, index = tmp_path / "labels.csv", tmp_path / "index"
    assert twist("label", model_path, shapes_folder, "--out", labels, *FAST).returncode == 0
    built = twist("index", labels, "--model", model_path, "--out", index, "--device", "cpu")
    assert built.returncode == 0, built.stderr[-3000:]
    query = shapes_folder / "discs" / "001.png"
    good = twist("search", index, query, "-k", "3", "--device", "cpu")
    assert good.returncode == 0 and len(good.stdout.strip().splitlines()) == 4, good.stderr[-2000:]

    overflowing = scale_first_filter(model_path, tmp_path / "overflowing.onnx")
    nan_query = twist("search", index, query, "--model", overflowing, "--device", "cpu")
    assert nan_query.returncode != 0 and "NaN" in one_error_line(nan_query, "search") and not nan_query.stdout
    damaged = overwrite_weight_bytes(model_path, tmp_path / "damaged.onnx")
    broken = twist("search", index, query, "--model", damaged, "--device", "cpu")
    assert broken.returncode != 0 and "damaged" in one_error_line(broken, "search") and not broken.stdout
