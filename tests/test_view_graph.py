"""The view graph (``twist suggest-merges --measure views``): a real ONNX model run on augmented views of real
images, a model with a planted twin cluster, and the command with its one-line refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_merges import twist as suggest

from twist_core.curate.view_graph import ViewGraphError, view_graph
from twist_core.deploy.export import ExportConfig, export_model
from twist_core.deploy.infer import OnnxModel
from twist_core.index.build import IndexConfig, build_index
from twist_core.layout import CHECKPOINT_FILE
from twist_core.model.checkpoint import load_checkpoint, save_checkpoint

TWIN_OF = 0


def twin_cluster_run(run: Path, out: Path, cluster: int) -> Path:
    """A copy of ``run`` whose head has one more cluster, an exact twin of ``cluster`` (same weights, bias and
    logit statistics): the model cannot tell the two apart, so every view gives them the same probability."""
    state = load_checkpoint(run)
    weights = state["model"]
    last = max((key for key in weights if key.startswith("head.mlp.") and key.endswith(".weight")),
               key=lambda key: int(key.split(".")[2]))
    for key in (last, last.replace("weight", "bias"), "head.logit_norm.running_mean", "head.logit_norm.running_var"):
        weights[key] = torch.cat([weights[key], weights[key][cluster:cluster + 1]])
    state["model_spec"]["n_classes"] += 1
    state["config"]["classes"] += 1
    out.mkdir(parents=True)
    save_checkpoint(out / CHECKPOINT_FILE, state)
    return out


@pytest.fixture(scope="module")
def twin_model(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("twin")
    return export_model(ExportConfig(run=str(twin_cluster_run(tiny_run, base / "run", TWIN_OF)),
                                     out=str(base / "twin.onnx")))


def image_paths(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.suffix.lower() in (".png", ".jpg"))


def test_a_twin_cluster_shares_all_its_siblings_views(twin_model: Path, app_bundle: dict[str, Path]) -> None:
    """The joint is a symmetric distribution over the clusters. A twin the model cannot tell apart from its sibling
    shares as much with it as each keeps to itself, and the same with every other cluster."""
    model = OnnxModel(twin_model, device="cpu")
    twin = model.n_classes - 1
    paths = image_paths(app_bundle["images"])
    joint, used = view_graph(model, app_bundle["images"], paths, pairs=2, seed=0, progress=False)
    assert joint.shape == (twin + 1, twin + 1) and used == len(paths)
    assert np.allclose(joint, joint.T) and (joint >= 0).all() and joint.sum() == pytest.approx(1.0)
    assert joint[TWIN_OF, twin] == pytest.approx(joint[TWIN_OF, TWIN_OF], rel=1e-4)
    assert joint[twin, twin] == pytest.approx(joint[TWIN_OF, TWIN_OF], rel=1e-4)
    others = [c for c in range(twin) if c != TWIN_OF]
    assert np.allclose(joint[twin, others], joint[TWIN_OF, others], rtol=1e-4)
    assert joint[TWIN_OF, twin] > 0.5 * joint[TWIN_OF, TWIN_OF] + joint[twin, others].min()


def test_views_are_seeded_and_unreadable_images_are_left_out(app_bundle: dict[str, Path], tmp_path: Path) -> None:
    model = OnnxModel(app_bundle["model"], device="cpu")
    root = app_bundle["images"]
    paths = image_paths(root)[:60]
    first, _ = view_graph(model, root, paths, pairs=1, seed=3, progress=False)
    again, _ = view_graph(model, root, paths, pairs=1, seed=3, progress=False)
    other, _ = view_graph(model, root, paths, pairs=1, seed=4, progress=False)
    assert np.array_equal(first, again) and not np.allclose(first, other)
    broken = tmp_path / "broken.png"
    broken.write_bytes((root / paths[0]).read_bytes()[:40])
    _, used = view_graph(model, root, [*paths, str(broken), "gone.png"], pairs=1, progress=False)
    assert used == len(paths)
    with pytest.raises(ViewGraphError, match="none of the 2 images"):
        view_graph(model, root, [str(broken), "gone.png"], pairs=1, progress=False)
    with pytest.raises(ViewGraphError, match="at least 1"):
        view_graph(model, root, paths, pairs=0, progress=False)


def test_command_plans_on_the_view_graph(app_bundle: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "views.json"
    done = suggest(str(app_bundle["index"]), "--measure", "views", "--view-pairs", "1", "--to", "2",
                   "--bootstrap", "0", "--json", str(out))
    assert done.returncode == 0, done.stderr
    assert "Plan down to 2 groups (view-graph modularity" in done.stdout
    written = json.loads(out.read_text())
    assert written["measure"] == "views" and written["plan"]["graph"] == "view"
    assert len(written["plan"]["groups"]) == 2


def test_command_refuses_a_model_that_is_gone_or_changed(app_bundle: dict[str, Path], tmp_path: Path) -> None:
    """The view graph must come from the model the index was labelled with: a moved or rewritten model file is
    one line on stderr and exit 2, never a graph from another model."""
    model = tmp_path / "model.onnx"
    shutil.copy(app_bundle["model"], model)
    shutil.copy(app_bundle["model"].with_suffix(".json"), model.with_suffix(".json"))
    index = tmp_path / "index"
    build_index(IndexConfig(source=str(app_bundle["index"].parent / "labels.csv"), model=str(model), out=str(index),
                            device="cpu"))
    args = (str(index), "--measure", "views", "--view-pairs", "1", "--bootstrap", "0")
    with model.open("ab") as handle:
        handle.write(b"\0")
    changed = suggest(*args)
    model.unlink()
    gone = suggest(*args)
    for done, words in ((changed, "SHA-256 differs"), (gone, "not there any more")):
        assert done.returncode == 2 and words in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and done.stdout == ""
