"""``twist merge-tables``: two shards labelled apart by the shipped model, merged, give the index of one table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from twist_core import cli
from twist_core.index.build import IndexConfig, build_index
from twist_core.index.image_index import IndexReader
from twist_core.label.labeller import LabelConfig, label_folder
from twist_core.label.table import labels_paths, load_labels, read_labels_meta

MODEL = Path(__file__).resolve().parents[1] / "models" / "demo" / "model.onnx"


def label(folder: Path, out: Path) -> Path:
    label_folder(LabelConfig(model=str(MODEL), folder=str(folder), out=str(out), workers=0, progress=False))
    return out


@pytest.fixture(scope="module")
def shards(shapes_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The whole folder labelled at once, and each of its two class folders labelled on its own."""
    work = tmp_path_factory.mktemp("shards")
    return {"whole": label(shapes_folder, work / "whole.csv"),
            "discs": label(shapes_folder / "discs", work / "discs.csv"),
            "stripes": label(shapes_folder / "stripes", work / "stripes.csv")}


def index_contents(table: Path, out: Path) -> dict[str, tuple[int, np.ndarray]]:
    build_index(IndexConfig(source=str(table), out=str(out), kind="flat"))
    index = IndexReader.open(out, "cpu")
    try:
        return {hit.path: (hit.cluster, index.vector(hit.id)) for hit in map(index.get, index.paths_by_id())}
    finally:
        index.close()


def test_merged_shards_index_like_one_table(shards: dict[str, Path], shapes_folder: Path, tmp_path: Path) -> None:
    merged = tmp_path / "merged.csv"
    code = cli.main(["merge-tables", str(merged), str(shards["discs"]), str(shards["stripes"]),
                     "--root", str(shapes_folder)])
    assert code == 0
    meta, whole_meta = read_labels_meta(merged), read_labels_meta(shards["whole"])
    assert meta["root"] == whole_meta["root"] and meta["rows"] == whole_meta["rows"] == 48
    assert meta["cluster_sizes"] == whole_meta["cluster_sizes"]
    rows, embeddings, _ = load_labels(merged)
    assert rows[0]["path"].startswith("discs/") and rows[-1]["path"].startswith("stripes/")

    one = index_contents(shards["whole"], tmp_path / "one")
    both = index_contents(merged, tmp_path / "both")
    assert sorted(one) == sorted(both)
    for path, (cluster, vector) in one.items():
        assert both[path][0] == cluster
        np.testing.assert_allclose(both[path][1], vector, atol=1e-6)
    assert np.load(labels_paths(merged)[0]).shape == embeddings.shape


def test_refusals_are_one_line(shards: dict[str, Path], shapes_folder: Path, tmp_path: Path, capsys) -> None:
    """A shard given twice, shards from another folder without --root, another model: refused, nothing written."""
    out = tmp_path / "merged.csv"
    other_model = tmp_path / "other.csv"
    for source in (shards["discs"], *labels_paths(shards["discs"])):
        (tmp_path / source.name.replace("discs", "other")).write_bytes(source.read_bytes())
    meta_path = labels_paths(other_model)[1]
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "model_sha256": "0" * 64}))
    edited = tmp_path / "edited.csv"  # a row dropped after labelling: every later row would get another's vector
    for source in (shards["stripes"], *labels_paths(shards["stripes"])):
        (tmp_path / source.name.replace("stripes", "edited")).write_bytes(source.read_bytes())
    edited.write_text("".join(edited.read_text().splitlines(keepends=True)[:-1]))
    cases = {"is in": [str(shards["discs"]), str(shards["discs"]), "--root", str(shapes_folder)],
             "changed after labelling": [str(shards["discs"]), str(edited), "--root", str(shapes_folder)],
             "different folders": [str(shards["discs"]), str(shards["stripes"])],
             "model_sha256": [str(shards["stripes"]), str(other_model), "--root", str(shapes_folder)]}
    for expected, args in cases.items():
        assert cli.main(["merge-tables", str(out), *args]) == 2
        error = capsys.readouterr().err.strip()
        assert expected in error and len(error.splitlines()) == 1, error
        assert not out.exists() and not labels_paths(out)[0].exists()
