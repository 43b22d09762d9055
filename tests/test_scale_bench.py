"""The scale bench (``bench.scale``) at N=300: its synthetic table is one ``twist label`` would write, and one run
of the bench yields every figure the results file promises."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bench import scale
from bench.scale_data import MODEL, Spec, ensure_files, write_synthetic_table
from twist_core.label.table import load_labels


def test_synthetic_table_reads_like_a_labelled_one(tmp_path: Path) -> None:
    root = ensure_files(tmp_path, 310)
    table = write_synthetic_table(tmp_path / "t" / "labels.csv", root, Spec(300, seed=0))
    rows, embeddings, meta = load_labels(table)
    assert embeddings.shape == (300, 1024) and embeddings.dtype == np.float16
    assert meta["model_sha256"] and Path(meta["model"]) == MODEL.resolve() and meta["rows"] == 300
    assert sum(meta["cluster_sizes"]) == 300 and max(meta["cluster_sizes"]) > 60  # the largest near a third
    for row in rows[:50]:
        assert (root / row["path"]).is_file()
        top = json.loads(row["topk"])
        assert top[0] == [row["cluster"], row["confidence"]]
        assert abs(row["margin"] - (top[0][1] - top[1][1])) < 1e-5
    assert write_synthetic_table(table, root, Spec(300, seed=0)).stat().st_mtime == table.stat().st_mtime  # cached


def test_one_run_yields_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    assert scale.main(["--sizes", "300", "--cache", str(tmp_path / "cache"), "--hits", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    entry = result["300"]
    assert not entry["errors"], entry["errors"]
    for key in (*scale.KEYS, "index_wall_s", "kind", "index_disk_mb", "update_share_of_build", "overview_event_ms",
                "cluster_page_event_ms", "recall_at_10_bench"):
        assert isinstance(entry[key], (int, float, str)), key
    assert entry["images_after_update"] == 303 and entry["recall_at_10"] == 1.0  # flat: exact
    assert set(entry["api"]) >= {"clusters", "cluster_page_0", "cluster_page_deep", "review", "image", "search_id"}
    assert list(result)[:2] == ["notes", "scale_summary"] and result["machine"]["cores"]
