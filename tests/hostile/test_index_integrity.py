"""A rebuilt or refused index never moves curation or thumbnails onto other images, nor half-writes itself.

Everything runs for real: image files on disk, ``twist index`` as a child process, the app's curation store
and thumbnail cache over the index it wrote.
"""

from __future__ import annotations

import json
import os
import resource
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.thumbnails import ThumbnailCache
from twist_core.curate.curation import CurationError, CurationStore
from twist_core.index.image_index import IndexReader
from twist_core.index.metadata import read_manifest
from twist_core.io_utils import OUTPUT_MARKER
from twist_core.label.table import labels_paths, write_table
from twist_core.layout import META_FILE

REPO = Path(__file__).resolve().parents[2]
CLUSTERS = ["red", "green", "blue"]
N_IMAGES = 12
DIM = 8


def colour_of(number: int) -> tuple[int, int, int]:
    """A colour unique to each image number, far enough apart to tell thumbnails apart after JPEG."""
    return (20 * number % 256, 255 - 20 * number % 256, (90 + 70 * number) % 256)


def draw(folder: Path, number: int) -> str:
    path = f"c{number % 3}/img{number:02d}.png"
    (folder / path).parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), colour_of(number)).save(folder / path)
    return path


def label_table(out: Path, root: Path, paths: list[str], vectors: np.ndarray, model_dim: int | None = None) -> Path:
    """A labels table as ``twist label`` writes it: rows, row-aligned embeddings, meta (root, model's dim)."""
    out.mkdir(parents=True, exist_ok=True)
    table = out / "labels.csv"
    rows = [{"path": p, "cluster": int(p[1]), "cluster_name": CLUSTERS[int(p[1])], "confidence": 0.9,
             "margin": 0.5, "topk": json.dumps([[int(p[1]), 0.9]]), "error": ""} for p in paths]
    write_table(table, [rows])
    embeddings_path, meta_path = labels_paths(table)
    np.save(embeddings_path, vectors.astype(np.float32))
    meta_path.write_text(json.dumps({"root": str(root), "model": None, "rows": len(rows),
                                     "embedding_dim": model_dim or vectors.shape[1]}))
    return table


def twist(*args: str, limit_file_bytes: int | None = None) -> subprocess.CompletedProcess:
    def limit() -> None:
        if limit_file_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_bytes, limit_file_bytes))

    return subprocess.run([sys.executable, "-m", "twist_core.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env=os.environ.copy(), timeout=120, preexec_fn=limit)


def embeddings(numbers: list[int]) -> np.ndarray:
    """One fixed random vector per image number, so a rebuild embeds the same image the same way."""
    return np.stack([np.random.default_rng(n).normal(size=DIM) for n in numbers])


@pytest.fixture
def dataset(tmp_path: Path) -> dict:
    root = tmp_path / "photos"
    numbers = list(range(N_IMAGES))
    paths = [draw(root, n) for n in numbers]
    return {"root": root, "numbers": numbers, "paths": paths, "tmp": tmp_path}


def build(dataset: dict, out: Path, numbers: list[int], table_dir: str = "labels") -> subprocess.CompletedProcess:
    paths = [dataset["paths"][n] for n in numbers]
    table = label_table(dataset["tmp"] / table_dir, dataset["root"], paths, embeddings(numbers))
    return twist("index", str(table), "--out", str(out), "--device", "cpu")


def open_store(index_dir: Path, state: Path) -> CurationStore:
    manifest = read_manifest(index_dir)
    return CurationStore(state / "curation.sqlite", index_dir / manifest["dir"] / META_FILE, CLUSTERS)


def labels_by_path(store: CurationStore) -> dict[str, tuple[int | None, str]]:
    return {r.path: (r.label, r.status) for r in store.iter_records()}


def thumbnail_colour(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(axis=0)


def assert_thumbnails_match_files(index_dir: Path, thumbs: ThumbnailCache, root: Path) -> None:
    index = IndexReader.open(index_dir, "cpu")
    try:
        for path in index.paths():
            image_id = index.ids_for_paths([path])[path]
            number = int(Path(path).stem[3:])
            got = thumbnail_colour(thumbs.path(image_id, root / path))
            assert np.abs(got - colour_of(number)).max() < 12, f"thumbnail of {path} shows another picture"
    finally:
        index.close()


def test_rebuild_keeps_moves_and_thumbnails_on_the_same_files(dataset: dict) -> None:
    index_dir = dataset["tmp"] / "ix"
    built = build(dataset, index_dir, dataset["numbers"])
    assert built.returncode == 0, built.stderr
    store = open_store(index_dir, index_dir)
    moved_path, deleted_path = dataset["paths"][7], dataset["paths"][2]
    moved_id = IndexReader.open(index_dir, "cpu").ids_for_paths([moved_path])[moved_path]
    store.move([moved_id], 0)
    store.rename(1, "leaves")
    thumbs = ThumbnailCache(index_dir / "thumbnails", owner=IndexReader.open(index_dir, "cpu").info["uid"])
    assert_thumbnails_match_files(index_dir, thumbs, dataset["root"])  # every thumbnail made once
    before = labels_by_path(store)
    store.close()

    (dataset["root"] / deleted_path).unlink()  # ids after it would shift by one in a renumbering rebuild
    rebuilt = build(dataset, index_dir, [n for n in dataset["numbers"] if n != 2], table_dir="labels2")
    assert rebuilt.returncode == 0, rebuilt.stderr

    store = open_store(index_dir, index_dir)
    after = labels_by_path(store)
    assert after[moved_path] == (0, "moved")
    assert [p for p, (_, status) in after.items() if status == "moved"] == [moved_path]
    assert after == {p: v for p, v in before.items() if p != deleted_path}
    assert store.name(1) == "leaves"
    store.close()
    index = IndexReader.open(index_dir, "cpu")
    thumbs = ThumbnailCache(index_dir / "thumbnails", owner=index.info["uid"])
    assert_thumbnails_match_files(index_dir, thumbs, dataset["root"])


def test_rebuild_over_an_index_from_before_fingerprints_matches_by_path(dataset: dict) -> None:
    index_dir = dataset["tmp"] / "ix"
    assert build(dataset, index_dir, dataset["numbers"]).returncode == 0
    meta = index_dir / read_manifest(index_dir)["dir"] / META_FILE
    with sqlite3.connect(meta) as db:  # what an index written by the previous release holds
        db.execute("ALTER TABLE images DROP COLUMN fingerprint")
        db.execute("DELETE FROM info WHERE key IN ('uid', 'next_id')")
    store = open_store(index_dir, index_dir)
    path = dataset["paths"][9]
    store.move([IndexReader.open(index_dir, "cpu").ids_for_paths([path])[path]], 1)
    store.close()
    (dataset["root"] / dataset["paths"][0]).unlink()
    dataset["paths"].append(draw(dataset["root"], N_IMAGES))  # a new file needs an id no old one has
    rebuilt = build(dataset, index_dir, list(range(1, N_IMAGES + 1)), table_dir="labels2")
    assert rebuilt.returncode == 0, rebuilt.stderr
    store = open_store(index_dir, index_dir)
    assert [p for p, (_, status) in labels_by_path(store).items() if status == "moved"] == [path]
    assert IndexReader.open(index_dir, "cpu").ids_for_paths(dataset["paths"][-1:]) == {dataset["paths"][-1]: N_IMAGES}
    store.close()


def test_a_file_replaced_in_place_is_a_new_image(dataset: dict) -> None:
    """Same path, other picture: the move made on the old picture does not follow the path."""
    index_dir = dataset["tmp"] / "ix"
    assert build(dataset, index_dir, dataset["numbers"]).returncode == 0
    store = open_store(index_dir, index_dir)
    path = dataset["paths"][5]
    old_id = IndexReader.open(index_dir, "cpu").ids_for_paths([path])[path]
    store.move([old_id], 0)
    thumbs = ThumbnailCache(index_dir / "thumbnails", owner=IndexReader.open(index_dir, "cpu").info["uid"])
    thumbs.path(old_id, dataset["root"] / path)
    store.close()
    Image.new("RGB", (41, 30), colour_of(9)).save(dataset["root"] / path)  # another picture, same name
    os.utime(dataset["root"] / path, ns=(1, 1))
    assert build(dataset, index_dir, dataset["numbers"], table_dir="labels2").returncode == 0
    new_id = IndexReader.open(index_dir, "cpu").ids_for_paths([path])[path]
    assert new_id != old_id
    store = open_store(index_dir, index_dir)
    assert labels_by_path(store)[path] == (2, "predicted")
    store.close()
    got = thumbnail_colour(thumbs.path(new_id, dataset["root"] / path))
    assert np.abs(got - colour_of(9)).max() < 12


def test_update_takes_a_file_changed_in_place_as_a_new_image(dataset: dict) -> None:
    index_dir = dataset["tmp"] / "ix"
    assert build(dataset, index_dir, dataset["numbers"]).returncode == 0
    path = dataset["paths"][4]
    old_id = IndexReader.open(index_dir, "cpu").ids_for_paths([path])[path]
    store = open_store(index_dir, index_dir)
    store.move([old_id], 0)
    store.close()
    Image.new("RGB", (41, 30), colour_of(11)).save(dataset["root"] / path)
    os.utime(dataset["root"] / path, ns=(1, 1))
    numbers = dataset["numbers"]
    table = label_table(dataset["tmp"] / "relabel", dataset["root"], dataset["paths"], embeddings(numbers))
    updated = twist("index", str(table), "--update", "--out", str(index_dir), "--device", "cpu")
    assert updated.returncode == 0 and "added 1, removed 0" in updated.stdout, updated.stderr
    index = IndexReader.open(index_dir, "cpu")
    new_id = index.ids_for_paths([path])[path]
    assert new_id != old_id and index.size == N_IMAGES
    store = open_store(index_dir, index_dir)
    assert labels_by_path(store)[path] == (1, "predicted")
    store.close()
    thumbs = ThumbnailCache(index_dir / "thumbnails", owner=index.info["uid"])
    assert np.abs(thumbnail_colour(thumbs.path(new_id, dataset["root"] / path)) - colour_of(11)).max() < 12


def test_state_of_another_index_is_refused_and_its_thumbnails_dropped(dataset: dict) -> None:
    """A state folder kept apart from an index that was deleted and built afresh (ids start at 0 again)."""
    index_dir, state = dataset["tmp"] / "ix", dataset["tmp"] / "state"
    assert build(dataset, index_dir, dataset["numbers"]).returncode == 0
    store = open_store(index_dir, state)
    store.move([3], 1)
    store.close()
    thumbs = ThumbnailCache(state / "thumbnails", owner=IndexReader.open(index_dir, "cpu").info["uid"])
    thumbs.path(0, dataset["root"] / dataset["paths"][0])
    for child in sorted(index_dir.rglob("*"), reverse=True):
        child.unlink() if child.is_file() else child.rmdir()
    assert build(dataset, index_dir, dataset["numbers"][1:]).returncode == 0
    with pytest.raises(CurationError, match="another index"):
        open_store(index_dir, state)
    thumbs = ThumbnailCache(state / "thumbnails", owner=IndexReader.open(index_dir, "cpu").info["uid"])
    got = thumbnail_colour(thumbs.path(0, dataset["root"] / dataset["paths"][1]))
    assert np.abs(got - colour_of(1)).max() < 12


def test_index_and_thumbnail_folders_are_marked_as_outputs(dataset: dict) -> None:
    inside = build(dataset, dataset["root"] / "ix", dataset["numbers"])  # where a folder scan would look
    assert inside.returncode == 2 and "where it would be taken for images" in inside.stderr
    assert not (dataset["root"] / "ix").exists()  # refused before anything is written (issue 36, item 9)
    index_dir = dataset["tmp"] / "ix"  # beside it, still marked: moved into a dataset by hand, scans skip it
    assert build(dataset, index_dir, dataset["numbers"]).returncode == 0
    assert (index_dir / OUTPUT_MARKER).is_file()
    thumbs = ThumbnailCache(dataset["tmp"] / "state" / "thumbnails")
    assert (thumbs.folder / OUTPUT_MARKER).is_file()
    open_store(index_dir, dataset["root"] / "state").close()  # an app state folder kept in the dataset
    assert (dataset["root"] / "state" / OUTPUT_MARKER).is_file()


@pytest.mark.parametrize("poison", ["nan", "inf", "dimension"])
def test_index_refuses_bad_embeddings_and_keeps_the_previous_index(dataset: dict, poison: str) -> None:
    index_dir = dataset["tmp"] / "ix"
    assert build(dataset, index_dir, dataset["numbers"]).returncode == 0
    before = read_manifest(index_dir)
    numbers = dataset["numbers"]
    vectors = embeddings(numbers)
    if poison == "dimension":
        vectors = np.hstack([vectors, vectors])
    else:
        vectors[4, 1] = np.nan if poison == "nan" else np.inf
    table = label_table(dataset["tmp"] / "bad", dataset["root"], dataset["paths"], vectors, model_dim=DIM)
    refused = twist("index", str(table), "--out", str(index_dir), "--device", "cpu")
    assert refused.returncode == 2, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and "Traceback" not in refused.stderr
    assert ("dimension" in refused.stderr) if poison == "dimension" else ("non-finite" in refused.stderr)
    assert read_manifest(index_dir) == before
    assert sorted(p.name for p in index_dir.iterdir() if p.name.startswith(("gen-", ".tmp"))) == [before["dir"]]
    fresh = twist("index", str(table), "--out", str(dataset["tmp"] / "new"), "--device", "cpu")
    assert fresh.returncode == 2 and not (dataset["tmp"] / "new" / "manifest.json").exists()


def test_index_refuses_embeddings_that_the_given_model_cannot_have_made(dataset: dict) -> None:
    model = REPO / "models" / "demo" / "model.onnx"  # the shipped demo model gives 1024-d embeddings
    table = label_table(dataset["tmp"] / "labels", dataset["root"], dataset["paths"], embeddings(dataset["numbers"]))
    refused = twist("index", str(table), "--model", str(model), "--out", str(dataset["tmp"] / "ix"), "--device", "cpu")
    assert refused.returncode == 2 and "dimension 8" in refused.stderr and "1024" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert not (dataset["tmp"] / "ix" / "manifest.json").exists()


def test_update_refuses_wrong_dimension_or_nan_and_changes_nothing(dataset: dict) -> None:
    index_dir = dataset["tmp"] / "ix"
    assert build(dataset, index_dir, dataset["numbers"][:6]).returncode == 0
    before = read_manifest(index_dir)
    (dataset["root"] / dataset["paths"][0]).unlink()  # a refused update must not even drop this one
    wide = np.hstack([embeddings(dataset["numbers"])] * 2)
    poisoned = embeddings(dataset["numbers"])
    poisoned[8] = np.nan
    for name, vectors in (("wide", wide), ("nan", poisoned)):
        table = label_table(dataset["tmp"] / name, dataset["root"], dataset["paths"], vectors)
        refused = twist("index", str(table), "--update", "--out", str(index_dir), "--device", "cpu")
        assert refused.returncode == 2, refused.stderr
        assert ("dimension" if name == "wide" else "non-finite") in refused.stderr
        assert read_manifest(index_dir) == before


@pytest.fixture(params=["file-size-limit", "full-tmpfs"])
def small_disk(request: pytest.FixtureRequest, tmp_path: Path):
    """Where writes fail for lack of space: a 1 MB tmpfs (real ENOSPC; needs root), else a 64 KB file-size limit.

    Under RLIMIT_FSIZE a write past the limit fails with EFBIG (Python ignores SIGXFSZ), like a full disk.
    """
    if request.param == "file-size-limit":
        yield tmp_path / "disk", 64 << 10
        return
    mount = tmp_path / "disk"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root); the file-size-limit case covers it")
    try:
        yield mount, None
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def bulky(numbers: list[int]) -> np.ndarray:
    """Wide embeddings: 16 images make a 1 MB index, more than the small disk holds beside the first one."""
    return np.stack([np.random.default_rng(n).normal(size=16_384) for n in numbers])


@pytest.mark.parametrize("update", [False, True])
def test_disk_full_names_the_problem_and_keeps_the_previous_index(dataset: dict, small_disk: tuple,
                                                                 update: bool) -> None:
    disk, size_limit = small_disk
    index_dir = disk / "ix"
    first = [0, 1]
    table = label_table(dataset["tmp"] / "first", dataset["root"], [dataset["paths"][n] for n in first],
                        bulky(first))
    assert twist("index", str(table), "--out", str(index_dir), "--device", "cpu").returncode == 0
    before = read_manifest(index_dir)
    for n in range(N_IMAGES, N_IMAGES + 4):
        dataset["paths"].append(draw(dataset["root"], n))
    numbers = list(range(len(dataset["paths"])))
    table = label_table(dataset["tmp"] / "all", dataset["root"], dataset["paths"], bulky(numbers))
    args = ["index", str(table), "--out", str(index_dir), "--device", "cpu", *(["--update"] if update else [])]
    full = twist(*args, limit_file_bytes=size_limit)
    assert full.returncode == 2, full.stderr
    assert len(full.stderr.strip().splitlines()) == 1 and "Traceback" not in full.stderr
    assert "free some space" in full.stderr and str(index_dir) in full.stderr
    assert read_manifest(index_dir) == before
    assert sorted(p.name for p in index_dir.iterdir() if p.name.startswith(("gen-", ".tmp"))) == [before["dir"]]
    index = IndexReader.open(index_dir, "cpu")
    assert index.paths() == [dataset["paths"][n] for n in first]
    index.close()
