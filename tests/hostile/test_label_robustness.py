"""A hostile or unlucky user against ``twist label`` and ``twist search``: damaged models, odd file names,
missing writers, formula cells, the project's own outputs inside the dataset, unreadable folders, a full disk.

Every test runs the real command in a child process (exit code and stderr are what a user sees).
"""

from __future__ import annotations

import csv
import ctypes
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from PIL import Image

from twist_core.deploy.export import ExportConfig, export_model
from twist_core.io_utils import OUTPUT_MARKER, path_from_text
from twist_core.label.table import read_labels

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


ODD_NAMES = [b"caf\xe9.png", b"\xff\xfe/deep\xe9.png", b"back\\slash\\xe9.png", b"=HYPERLINK(1).png",
             b"+plus.png", b"-minus.png", b"@at.png", b"\ttab.png", b"\rcr.png", b"'quoted.png", "été.png".encode()]
FORMULA_CLASSES = "=SUM(1),+two,-three,@four"


@pytest.fixture(scope="module")
def odd_folder(shapes_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Images whose names are not UTF-8, hold backslashes, or start like spreadsheet formulas."""
    root = tmp_path_factory.mktemp("odd") / "images"
    sources = sorted(shapes_folder.rglob("*.png"))
    for raw, source in zip(ODD_NAMES, sources, strict=False):
        target = os.fsencode(root) + b"/" + raw
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(source, target)
    return root


@pytest.fixture(scope="module")
def formula_model(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("formula_model") / "formula.onnx"
    return export_model(ExportConfig(run=str(tiny_run), out=str(out), class_names=FORMULA_CLASSES))


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_odd_file_names_label_and_round_trip(formula_model: Path, odd_folder: Path, tmp_path: Path,
                                             suffix: str) -> None:
    out = tmp_path / f"labels{suffix}"
    tree = tmp_path / "tree"
    result = twist("label", formula_model, odd_folder, "--out", out, "--export-tree", tree, *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    rows, meta = read_labels(out)
    assert meta["errors"] == 0 and len(rows) == len(ODD_NAMES)
    assert sorted(os.fsencode(path_from_text(row["path"])) for row in rows) == sorted(ODD_NAMES)
    assert {row["cluster_name"] for row in rows} <= set(FORMULA_CLASSES.split(","))
    assert all(row["path"].isprintable() or "\t" in row["path"] or "\r" in row["path"] for row in rows)
    links = [Path(dirpath, name) for dirpath, _, names in os.walk(tree) for name in names if name != ".twist-tree"]
    linked = {os.fsencode(link.resolve().relative_to(odd_folder.resolve())) for link in links if link.is_symlink()}
    assert linked == set(ODD_NAMES)


def test_labels_csv_has_no_formula_cells(formula_model: Path, odd_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "labels.csv"
    assert twist("label", formula_model, odd_folder, "--out", out, *FAST).returncode == 0
    with open(out, newline="", encoding="utf-8") as handle:
        cells = [cell for row in csv.reader(handle) for cell in row]
    assert cells and not [cell for cell in cells if cell.startswith(("=", "+", "-", "@", "\t", "\r"))]
    assert "'=HYPERLINK(1).png" in cells and "''quoted.png" in cells
    rows, _ = read_labels(out)  # twist's own reader undoes the quoting exactly
    assert {"=HYPERLINK(1).png", "'quoted.png", "\ttab.png", "-minus.png"} <= {row["path"] for row in rows}
    jsonl = tmp_path / "labels.jsonl"  # JSONL stays faithful
    assert twist("label", formula_model, odd_folder, "--out", jsonl, *FAST).returncode == 0
    names = {json.loads(line)["cluster_name"] for line in jsonl.read_text(encoding="utf-8").splitlines()}
    assert names <= set(FORMULA_CLASSES.split(",")) and any(name.startswith(("=", "+", "-", "@")) for name in names)


def test_parquet_without_pyarrow_is_refused_before_labelling(model_path: Path, shapes_folder: Path,
                                                             tmp_path: Path) -> None:
    out = tmp_path / "labels.parquet"
    blocked = ("import sys; sys.modules['pyarrow'] = None; from twist_core.cli import main; "
               "sys.exit(main(sys.argv[1:]))")
    result = subprocess.run([sys.executable, "-c", blocked, "label", str(model_path), str(shapes_folder), "--out",
                             str(out), *FAST], cwd=REPO, capture_output=True, text=True, timeout=300)
    line = one_error_line(result)
    assert result.returncode == 2 and "pyarrow" in line and ".csv" in line
    assert not list(tmp_path.iterdir())  # no table, no work folder: nothing was labelled


def test_project_outputs_inside_the_dataset_are_not_scanned(model_path: Path, shapes_folder: Path, tiny_run: Path,
                                                            tmp_path: Path) -> None:
    root = tmp_path / "dataset"
    shutil.copytree(shapes_folder, root)
    first = twist("label", model_path, root, "--out", tmp_path / "labels.csv", "--export-tree", tmp_path / "sorted",
                  "--tree-mode", "copy", *FAST)
    assert first.returncode == 0, first.stderr[-3000:]
    index = twist("index", tmp_path / "labels.csv", "--model", model_path, "--out", tmp_path / "index",
                  "--device", "cpu")
    assert index.returncode == 0, index.stderr[-3000:]
    for output in ("sorted", "index"):  # the commands refuse to write there now; moved in by hand, or by older ones
        shutil.move(tmp_path / output, root / output)
    shutil.copytree(tiny_run, root / "runs" / "tiny")  # a run folder: last.pt, config.json, curves.png
    state = root / "app-state" / "thumbnails"  # the app's state: curation.sqlite and thumbnails, no marker
    state.mkdir(parents=True)
    (state.parent / "curation.sqlite").write_bytes(b"")
    shutil.copy(shapes_folder / "discs" / "000.png", state / "0.png")
    marked = root / "other-output"
    marked.mkdir()
    (marked / OUTPUT_MARKER).write_text("")
    shutil.copy(shapes_folder / "discs" / "000.png", marked / "copy.png")
    shutil.copy(model_path, root / "model.onnx")

    again = twist("label", model_path, root, "--out", tmp_path / "again.csv", *FAST)
    assert again.returncode == 0, again.stderr[-3000:]
    rows, _ = read_labels(tmp_path / "again.csv")
    assert sorted(row["path"] for row in rows) == sorted(p.relative_to(shapes_folder).as_posix()
                                                         for p in shapes_folder.rglob("*.png"))


def drop_file_permission_override() -> None:
    """In the child: give up root's power to read any file (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), so chmod 000
    means what it means for every other user. Dropped from the bounding set, they are gone after exec."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def as_ordinary_user() -> dict:
    """``subprocess`` arguments that run the child without root's file-permission override (when root)."""
    if os.geteuid() != 0:
        return {}
    probe = subprocess.run([sys.executable, "-c", "pass"], preexec_fn=drop_file_permission_override)
    if probe.returncode != 0:
        pytest.skip("running as root and the capability to read any file cannot be dropped here")
    return {"preexec_fn": drop_file_permission_override}


def test_unreadable_subfolder_is_listed_not_silently_skipped(model_path: Path, shapes_folder: Path,
                                                             tmp_path: Path) -> None:
    root = tmp_path / "images"
    shutil.copytree(shapes_folder, root)
    locked = root / "locked" / "inner"
    shutil.copytree(shapes_folder / "discs", locked)
    out = tmp_path / "labels.csv"
    os.chmod(locked.parent, 0)
    try:
        result = twist("label", model_path, root, "--out", out, *FAST, **as_ordinary_user())
    finally:
        os.chmod(locked.parent, 0o755)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "locked" in result.stderr and "labels.skipped.txt" in result.stderr
    rows, meta = read_labels(out)
    assert len(rows) == 48 and meta["unreadable_folders"] == ["locked"]
    skipped = (tmp_path / "labels.skipped.txt").read_text().splitlines()
    assert skipped == ["locked/\tcannot read this folder: permission denied"]


def test_training_lists_an_unreadable_subfolder_in_skipped_txt(shapes_folder: Path, tmp_path: Path) -> None:
    root = tmp_path / "images"
    shutil.copytree(shapes_folder, root)
    locked = root / "locked" / "inner"
    shutil.copytree(shapes_folder / "discs", locked)
    os.chmod(locked.parent, 0)
    try:
        result = twist("train", root, "--out", tmp_path / "run", "--classes", "2", "--epochs", "1", "--width", "8",
                       "--hidden-dim", "32", "--image-size", "32", "--batch-size", "16", "--workers", "0",
                       "--no-progress", "--self-label-fraction", "0", **as_ordinary_user())
    finally:
        os.chmod(locked.parent, 0o755)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipping folder locked/" in result.stderr
    skipped = (tmp_path / "run" / "skipped.txt").read_text().splitlines()
    assert skipped == ["locked/\tcannot read this folder: permission denied"]


def file_size_limit(limit: int):
    """A ``preexec_fn``: no file of the child may grow past ``limit`` bytes (writes then fail with EFBIG)."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*.tmp"))


def test_full_disk_during_the_merge_fails_cleanly_and_the_rerun_resumes(model_path: Path, shapes_folder: Path,
                                                                       tmp_path: Path) -> None:
    reference = tmp_path / "reference.csv"
    assert twist("label", model_path, shapes_folder, "--out", reference, *FAST).returncode == 0
    embeddings_size = (tmp_path / "reference.embeddings.npy").stat().st_size
    out_dir = tmp_path / "out"
    command = ["label", model_path, shapes_folder, "--out", out_dir / "labels.csv", *FAST, "--chunk-size", "4"]
    full = twist(*command, preexec_fn=file_size_limit(embeddings_size - 1))  # chunks fit, the embeddings do not
    line = one_error_line(full)
    assert full.returncode == 2 and "File too large" in line and "run the same command again" in line
    assert sorted(p.name for p in out_dir.iterdir()) == ["labels.csv.parts"] and not leftovers(out_dir)
    assert len(list((out_dir / "labels.csv.parts").glob("chunk-*.npz"))) == 12  # all labelling was kept

    rerun = twist(*command)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert read_labels(out_dir / "labels.csv")[0] == read_labels(reference)[0]
    assert sorted(p.name for p in out_dir.iterdir()) == ["labels.csv", "labels.embeddings.npy", "labels.meta.json",
                                                         "labels.skipped.txt"]


def test_full_disk_leaves_the_previous_outputs_untouched(model_path: Path, shapes_folder: Path,
                                                        tmp_path: Path) -> None:
    out = tmp_path / "labels.jsonl"
    first = twist("label", model_path, shapes_folder, "--out", out, "--embedding-dtype", "float32", *FAST)
    assert first.returncode == 0, first.stderr[-3000:]
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    header = 128  # .npy header: float16 embeddings take half the data bytes of float32 ones
    limit = (len(before["labels.embeddings.npy"]) - header) // 2 + header
    assert len(before["labels.jsonl"]) > limit  # the new embeddings fit, the new table does not
    full = twist("label", model_path, shapes_folder, "--out", out, "--overwrite", *FAST,
                 preexec_fn=file_size_limit(limit))
    assert full.returncode == 2 and "File too large" in one_error_line(full)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert after == before and not leftovers(tmp_path)


def test_real_full_disk_is_one_line_and_the_rerun_finishes(model_path: Path, shapes_folder: Path,
                                                          tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12k", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root); the file-size-limit tests cover the code path")
    try:
        command = ["label", model_path, shapes_folder, "--out", disk / "labels.csv", *FAST]
        full = twist(*command)
        line = one_error_line(full)
        assert full.returncode == 2 and "No space left on device" in line and not (disk / "labels.csv").exists()
        assert not leftovers(disk)
        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
        rerun = twist(*command)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert len(read_labels(disk / "labels.csv")[0]) == 48
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_scan_reports_unreadable_folders_to_its_caller(shapes_folder: Path, tmp_path: Path) -> None:
    """The interface ``twist train`` uses: ``scan_folder(root, unreadable)`` fills folder -> reason."""
    root = tmp_path / "images"
    shutil.copytree(shapes_folder, root)
    (root / "a" / "b").mkdir(parents=True)
    scan = ("import json, sys; from twist_core.data.folder import NoImagesError, scan_folder, skipped_lines\n"
            "unreadable = {}\n"
            "try:\n    files = scan_folder(sys.argv[1], unreadable)\n"
            "except NoImagesError as error:\n    files = str(error)\n"
            "print(json.dumps([files, skipped_lines(unreadable)]))")
    os.chmod(root / "a" / "b", 0)
    os.chmod(root / "stripes", 0o311)  # can be entered, not listed
    try:
        inner = subprocess.run([sys.executable, "-c", scan, str(root)], capture_output=True, text=True,
                               cwd=REPO, **as_ordinary_user())
        os.chmod(root, 0)
        whole = subprocess.run([sys.executable, "-c", scan, str(root)], capture_output=True, text=True,
                               cwd=REPO, **as_ordinary_user())
    finally:
        for folder in (root, root / "a" / "b", root / "stripes"):
            os.chmod(folder, 0o755)
    files, lines = json.loads(inner.stdout)
    assert files == [f"discs/{i:03d}.png" for i in range(24)]
    assert lines == ["a/b/\tcannot read this folder: permission denied",
                     "stripes/\tcannot read this folder: permission denied"]
    message, lines = json.loads(whole.stdout)
    assert "cannot read this folder: permission denied" in message and str(root) in message and not lines
