"""File names that are not UTF-8 or hold backslashes, through the index: update, search, duplicates, thumbnails.

Tables and the index store such a name as text (``\\xNN`` for a byte that is not UTF-8, ``\\\\`` for a
backslash); everything that opens the file must turn it back into the real name. All commands run for real,
in child processes, over real files named with those bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from app.thumbnails import PLACEHOLDER, ThumbnailCache
from twist_core.deploy.export import ExportConfig, export_model
from twist_core.index.image_index import IndexReader
from twist_core.io_utils import path_from_text, path_to_text

REPO = Path(__file__).resolve().parents[2]
FAST = ["--chunk-size", "16", "--batch-size", "8", "--workers", "0", "--no-progress"]
LATIN1 = b"caf\xe9.png"  # one byte that is not UTF-8: the same file as ACCENTED below (a duplicate pair)
ACCENTED = "été.png".encode()
ODD_NAMES = [LATIN1, ACCENTED, b"back\\slash.png", b"back\\xe9.png", b"\xff/deep\\\xe9.png"]
PLAIN = [b"plain-a.png", b"plain-b.png", b"plain-c.png"]
ASCII_ONLY = {"PYTHONIOENCODING": "ascii", "LANG": "C", "LC_ALL": "C"}


def twist(*args: str | bytes | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m twist_core.cli ARGS`` in a child process, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "twist_core.cli", *map(os.fsdecode, args)], cwd=REPO,
                          capture_output=True, text=True, errors="backslashreplace", timeout=300,
                          env={**os.environ, **(env or {})})


def as_text(raw: bytes) -> str:
    """The name as tables and the index write it."""
    return path_to_text(os.fsdecode(raw))


@pytest.fixture(scope="module")
def indexed(tiny_run: Path, shapes_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A folder of oddly named images, labelled and indexed by the real commands."""
    base = tmp_path_factory.mktemp("odd_index")
    root = base / "images"
    sources = sorted(shapes_folder.rglob("*.png"))
    names = ODD_NAMES + PLAIN
    for raw, source in zip(names, [sources[0], *sources[1:len(names)]], strict=True):
        target = os.fsencode(root) + b"/" + raw
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(sources[0] if raw == ACCENTED else source, target)
    model = export_model(ExportConfig(run=str(tiny_run), out=str(base / "tiny.onnx"),
                                      class_names="discs,stripes,third,fourth"))
    table = base / "labels.csv"
    labelled = twist("label", model, root, "--out", table, *FAST)
    assert labelled.returncode == 0, labelled.stderr[-3000:]
    index = base / "index"
    built = twist("index", table, "--out", index, "--device", "cpu")
    assert built.returncode == 0, built.stderr[-3000:]
    return {"root": root, "table": table, "index": index, "model": model}


def ids_by_path(index_dir: Path) -> dict[str, int]:
    index = IndexReader.open(index_dir, "cpu")
    try:
        return index.ids_for_paths(index.paths())
    finally:
        index.close()


def test_index_holds_every_name_as_text(indexed: dict[str, Path]) -> None:
    assert sorted(ids_by_path(indexed["index"])) == sorted(as_text(raw) for raw in ODD_NAMES + PLAIN)


@pytest.mark.parametrize("with_table", [False, True], ids=["scan-folder", "from-table"])
def test_update_changes_nothing(indexed: dict[str, Path], tmp_path: Path, with_table: bool) -> None:
    index = shutil.copytree(indexed["index"], tmp_path / "index")  # the other tests keep the original
    before = ids_by_path(index)
    source = [indexed["table"]] if with_table else []
    updated = twist("index", *source, "--update", "--out", index, "--device", "cpu")
    assert updated.returncode == 0, updated.stderr[-3000:]
    assert "added 0, removed 0 images" in updated.stdout
    assert ids_by_path(index) == before


def test_every_indexed_file_opens_and_gets_its_thumbnail(indexed: dict[str, Path], tmp_path: Path) -> None:
    index = IndexReader.open(indexed["index"], "cpu")
    try:
        cache = ThumbnailCache(tmp_path / "thumbnails", owner=index.info["uid"])
        for path, image_id in index.ids_for_paths(index.paths()).items():
            hit = index.get(image_id)
            assert hit.path == path and hit.abs_path.is_file(), path
            assert os.fsencode(hit.abs_path) in {os.fsencode(indexed["root"]) + b"/" + r for r in ODD_NAMES + PLAIN}
            thumbnail = cache.path(image_id, hit.abs_path)
            assert thumbnail.name == f"{image_id}.jpg" != PLACEHOLDER, path
    finally:
        index.close()


@pytest.mark.parametrize("env", [None, ASCII_ONLY], ids=["utf8", "ascii-stdout"])
def test_search_by_an_odd_image_prints_its_name(indexed: dict[str, Path], tmp_path: Path, env: dict | None) -> None:
    query = os.fsencode(indexed["root"]) + b"/" + LATIN1
    out = tmp_path / "hits.json"
    found = twist("search", indexed["index"], query, "-k", "3", "--device", "cpu", "--json", out, env=env)
    assert found.returncode == 0, found.stderr[-3000:]
    table, written = found.stdout.split("wrote:\n")
    assert written.split()[0] == str(out)
    table = table.splitlines()
    accented = "\\xe9t\\xe9.png" if env else "été.png"  # an ascii stdout gets the escaped form, no crash
    assert len(table) == 4 and all("1.0000" in line for line in table[1:3])
    assert sorted(line.split()[-1] for line in table[1:3]) == sorted(["caf\\xe9.png", accented])
    hits = json.loads(out.read_text(encoding="utf-8"))["hits"]
    assert {hits[0]["path"], hits[1]["path"]} == {"caf\\xe9.png", "été.png"}
    assert all(Path(path_from_text(hit["abs_path"])).is_file() for hit in hits)
    by_id = twist("search", indexed["index"], "--id", str(hits[0]["id"]), "-k", "2", "--device", "cpu", env=env)
    assert by_id.returncode == 0 and len(by_id.stdout.splitlines()) == 3, by_id.stderr[-3000:]


@pytest.mark.parametrize("env", [None, ASCII_ONLY], ids=["utf8", "ascii-stdout"])
def test_duplicates_prints_odd_names(indexed: dict[str, Path], env: dict | None) -> None:
    found = twist("duplicates", indexed["index"], "--threshold", "0.999", "--device", "cpu", env=env)
    assert found.returncode == 0, found.stderr[-3000:]
    assert "caf\\xe9.png" in found.stdout
    assert ("\\xe9t\\xe9.png" if env else "été.png") in found.stdout
