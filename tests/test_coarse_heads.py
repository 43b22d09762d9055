"""Coarse heads (``twist train --coarse-classes``): trained with the fine head, exported as ``coarse_probs``, and
read by ``twist suggest-merges --measure heads``, on a planted split: a model whose fine head splits one coarse
cluster in two must suggest merging exactly those two."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import export_label_index, tiny_train_config
from PIL import Image
from test_merges import twist as suggest

from twist_core.curate import merges
from twist_core.curate.finetune import FinetuneConfig, finetune
from twist_core.curate.view_graph import ViewGraphError, head_shares
from twist_core.data.preprocess import centre_crop_normalise
from twist_core.deploy.export import ExportConfig, ProbabilityModel, export_model
from twist_core.deploy.infer import OnnxModel
from twist_core.index.build import IndexConfig, build_index
from twist_core.label.labeller import LabelConfig, label_folder
from twist_core.layout import CHECKPOINT_FILE
from twist_core.model.checkpoint import load_checkpoint, save_checkpoint
from twist_core.model.network import TwistModel, checkpoint_spec, recalibrate_batchnorm
from twist_core.train.loop import train
from twist_core.train.options import ConfigError

SPLIT = 0  # the fine cluster the planted model splits in two (the new cluster is the last)


@pytest.fixture(scope="module")
def coarse_run(shapes_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("coarse_run")
    train(tiny_train_config(shapes_folder, out, classes=4, coarse_classes="2", epochs=2))
    return out


def image_paths(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.suffix.lower() in (".png", ".jpg"))


def test_coarse_heads_train_with_the_fine_head_and_reach_the_backbone(coarse_run: Path, shapes_folder: Path,
                                                                     tmp_path: Path) -> None:
    state = load_checkpoint(coarse_run)
    assert tuple(state["model_spec"]["coarse_classes"]) == (2,)
    assert state["model"]["coarse.0.0.weight"].shape == (2, 64)
    logged = [json.loads(line) for line in (coarse_run / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(row["coarse"]) for row in logged)
    plain = tmp_path / "plain"
    train(tiny_train_config(shapes_folder, plain, classes=4, epochs=2))
    assert "coarse" not in json.loads((plain / "metrics.jsonl").read_text().splitlines()[-1])
    without = load_checkpoint(plain)["model"]
    # same seed, same data: only the coarse head's loss can make the shared layers differ
    assert not torch.allclose(without["head.mlp.0.weight"], state["model"]["head.mlp.0.weight"])


def test_coarse_heads_train_under_ddp_with_two_gloo_processes(shapes_folder: Path, tmp_path: Path) -> None:
    from test_distributed import torchrun

    out = tmp_path / "ddp"
    done = torchrun(["-m", "twist_core.cli", "train", str(shapes_folder), "--out", str(out), "--classes", "4",
                     "--coarse-classes", "2", "--backbone", "resnet18", "--width", "8", "--hidden-dim", "64",
                     "--image-size", "32", "--epochs", "2", "--batch-size", "8", "--workers", "0", "--no-progress"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "DONE").is_file()
    state = load_checkpoint(out)
    assert tuple(state["model_spec"]["coarse_classes"]) == (2,) and "coarse.0.0.weight" in state["model"]
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == 2 and all(np.isfinite(row["coarse"]) for row in logged)


@pytest.mark.parametrize(("value", "message"), [("4", "from 2 to 3"), ("1", "from 2 to 3"), ("ten", "whole numbers"),
                                                ("2,2", "repeats")])
def test_bad_coarse_classes_are_refused_before_training(value: str, message: str, shapes_folder: Path,
                                                        tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        train(tiny_train_config(shapes_folder, tmp_path / "run", classes=4, coarse_classes=value))
    assert not (tmp_path / "run" / CHECKPOINT_FILE).exists()


def test_export_adds_coarse_probabilities_that_match_pytorch(coarse_run: Path, app_bundle: dict[str, Path],
                                                             tmp_path: Path) -> None:
    model_path = export_label_index(coarse_run, app_bundle["images"], tmp_path / "m.onnx", tmp_path / "labels.csv",
                                    tmp_path / "index")
    card = json.loads(model_path.with_suffix(".json").read_text())
    assert card["coarse_classes"] == [2] and card["outputs"] == ["embedding", "probs", "coarse_probs"]
    assert card["parity_max_abs_diff"]["coarse_probs"] < 1e-4
    model = OnnxModel(model_path, device="cpu")
    crops = np.stack([model.transform.crop(model.load(app_bundle["images"] / p))
                      for p in image_paths(app_bundle["images"])[:32]])
    probs, coarse = model.predict_heads(model.transform.normalize(crops))
    assert np.allclose(probs, model.predict_arrays(model.transform.normalize(crops))[0])
    assert len(coarse) == 1 and coarse[0].shape == (32, 2) and np.allclose(coarse[0].sum(1), 1, atol=1e-5)
    state = load_checkpoint(coarse_run)
    torch_model = TwistModel(checkpoint_spec(state))
    torch_model.load_state_dict(state["model"])
    batch = centre_crop_normalise(torch.from_numpy(crops).permute(0, 3, 1, 2), model.transform.input_size)
    expected = ProbabilityModel(torch_model).eval()(batch)[2]
    assert np.allclose(coarse[0], expected.detach().numpy(), atol=1e-4)
    with open(tmp_path / "labels.csv") as handle:  # labelling is unchanged by the extra output
        assert len(list(csv.DictReader(handle))) == len(image_paths(app_bundle["images"]))


def planted_split_run(run: Path, images: Path, out: Path) -> Path:
    """``run`` (4 clusters, no coarse heads) with a coarse head that is a copy of its fine head, and a fine head
    in which cluster SPLIT is split in two along a random direction of the last hidden layer; BatchNorm statistics
    re-estimated on ``images``, temperature 0.1. The coarse head keeps the original 4 clusters, so the two halves
    share one."""
    state = load_checkpoint(run)
    weights = dict(state["model"])
    weight, bias = weights["head.mlp.6.weight"], weights["head.mlp.6.bias"]
    weights.update({"coarse.0.0.weight": weight.clone(), "coarse.0.0.bias": bias.clone(),
                    **{f"coarse.0.1.{name}": weights[f"head.logit_norm.{name}"].clone()
                       for name in ("running_mean", "running_var", "num_batches_tracked")}})
    direction = torch.randn(weight.shape[1], generator=torch.Generator().manual_seed(0))
    direction *= 0.3 * weight[SPLIT].norm() / direction.norm()  # enough to split the cluster, not to move it
    weights["head.mlp.6.weight"] = torch.cat([weight, weight[SPLIT:SPLIT + 1] - direction])
    weights["head.mlp.6.weight"][SPLIT] += direction
    weights["head.mlp.6.bias"] = torch.cat([bias, bias[SPLIT:SPLIT + 1]])
    weights["head.logit_norm.running_mean"], weights["head.logit_norm.running_var"] = torch.zeros(5), torch.ones(5)
    # a low temperature makes the two-epoch model's probabilities as decided as a trained model's
    state["model_spec"] = {**state["model_spec"], "n_classes": 5, "coarse_classes": [4], "tau": 0.1}
    state["config"] = {**state["config"], "classes": 5, "coarse_classes": "4"}
    model = TwistModel(checkpoint_spec(state))
    model.load_state_dict(weights)
    pictures = [np.asarray(Image.open(images / p).convert("RGB").resize((32, 32))) for p in image_paths(images)]
    recalibrate_batchnorm(model, [centre_crop_normalise(torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2), 32)])
    state["model"] = model.state_dict()
    out.mkdir(parents=True)
    save_checkpoint(out / CHECKPOINT_FILE, state)
    return out


@pytest.fixture(scope="module")
def planted(tiny_run: Path, app_bundle: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("planted_split")
    run = planted_split_run(tiny_run, app_bundle["images"], base / "run")
    model = export_model(ExportConfig(run=str(run), out=str(base / "m.onnx")))
    label_folder(LabelConfig(model=str(model), folder=str(app_bundle["images"]), out=str(base / "labels.csv"),
                             workers=0, progress=False))
    build_index(IndexConfig(source=str(base / "labels.csv"), model=str(model), out=str(base / "index"), device="cpu"))
    return {"run": run, "model": model, "index": base / "index", "base": base}


def test_the_two_halves_of_a_split_cluster_share_one_coarse_cluster(planted: dict, app_bundle: dict[str, Path]
                                                                     ) -> None:
    model = OnnxModel(planted["model"], device="cpu")
    paths = image_paths(app_bundle["images"])
    shares, used = head_shares(model, app_bundle["images"], [*paths, "gone.png"], progress=False)
    assert used == len(paths) and [share.shape for share in shares] == [(5, 4)]
    assert shares[0].sum() == pytest.approx(used, rel=1e-4)  # each image's fine x coarse mass sums to 1
    home = shares[0].argmax(1)
    half = 4
    assert home[SPLIT] == home[half] and len(set(home[:4].tolist())) == 4  # the halves share; the rest do not
    graph = merges.heads_graph(shares)
    assert np.allclose(graph, graph.T) and (graph >= 0).all() and graph.sum() == pytest.approx(1.0)
    others = [c for c in range(4) if c != SPLIT]
    # each half is linked to the other more than to any other cluster (the two-epoch model's coarse probabilities
    # are soft, so every pair shares some)
    assert graph[SPLIT, half] > 1.5 * graph[SPLIT, others].max()
    assert graph[half, SPLIT] > 1.5 * graph[half, others].max()
    with pytest.raises(ViewGraphError, match="has no coarse heads"):
        head_shares(OnnxModel(app_bundle["model"], device="cpu"), app_bundle["images"], paths, progress=False)


def test_command_suggests_and_plans_by_the_coarse_heads(planted: dict, app_bundle: dict[str, Path]) -> None:
    out = planted["base"] / "heads.json"
    done = suggest(str(planted["index"]), "--measure", "heads", "--to", "4", "--bootstrap", "0", "--json", str(out))
    assert done.returncode == 0, done.stderr
    assert "Plan down to 4 groups (heads-graph modularity" in done.stdout
    written = json.loads(out.read_text())
    in_use = {c["cluster"] for c in written["clusters"]}
    assert {SPLIT, 4} <= in_use, "both halves hold images"
    assert {written["pairs"][0]["a"], written["pairs"][0]["b"]} == {SPLIT, 4}
    groups = [sorted(group) for group in written["plan"]["groups"]]
    assert sorted([SPLIT, 4]) in groups and written["plan"]["graph"] == "heads"
    assert all(len(group) == 1 for group in groups if group != sorted([SPLIT, 4]))
    refused = suggest(str(app_bundle["index"]), "--measure", "heads", "--bootstrap", "0")
    assert refused.returncode == 2 and "has no coarse heads" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_finetune_drops_the_coarse_heads(coarse_run: Path, shapes_folder: Path, tmp_path: Path) -> None:
    """Curated clusters replace the grouping the coarse heads stood for: the fine-tuned run has none."""
    table = tmp_path / "labels.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows([f"{label}/{i:03d}.png", cluster] for cluster, label in enumerate(("discs", "stripes"))
                         for i in range(4))
    finetune(FinetuneConfig(run=str(coarse_run), labels=str(table), out=str(tmp_path / "ft"), epochs=1,
                            workers=0, progress=False))
    state = load_checkpoint(tmp_path / "ft")
    assert not any(name.startswith("coarse.") for name in state["model"])
    assert tuple(state["model_spec"]["coarse_classes"]) == ()


def six_clusters() -> merges.ClusterData:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(6), 10)
    vectors = rng.normal(size=(60, 8))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return merges.ClusterData(np.arange(60), labels, vectors, labels[:, None], np.ones((60, 1)),
                              {c: f"c{c}" for c in range(6)})


# mass each of 6 clusters shares with 3 coarse clusters: {0, 1} -> 0, {2, 3} -> 1, {4, 5} -> 2; cluster 5 is held
# least firmly, and coarse clusters 1 and 2 overlap more than either does with 0
SHARES = np.array([[9.5, 0.3, 0.2], [9.0, 0.5, 0.5], [0.2, 8.0, 1.8], [0.3, 8.2, 1.5], [0.2, 2.0, 7.8],
                   [0.5, 3.5, 6.0]])


@pytest.mark.parametrize(("target", "groups"), [(3, [[0, 1], [2, 3], [4, 5]]), (2, [[0, 1], [2, 3, 4, 5]]),
                                                (4, [[0, 1], [2, 3], [4], [5]])])
def test_the_heads_plan_follows_the_coarse_head_and_reaches_the_target(target: int, groups: list[list[int]]) -> None:
    data = six_clusters()
    evidence = merges.gather_evidence(data, merges.HEADS, coarse_shares=[SHARES])
    plan = merges.plan_merges(data, evidence, target)
    assert plan.graph == "heads" and sorted(map(sorted, plan.groups)) == groups
    assert len(plan.merges) == 6 - target


def test_the_heads_plan_respects_the_apps_merges_and_picks_the_nearest_head() -> None:
    data = six_clusters()
    merged = dataclasses.replace(data, labels=np.where(data.labels == 5, 2, data.labels), merged_into={5: 2})
    finer = np.eye(6) * 10  # a second head with 6 clusters: each cluster on its own
    evidence = merges.gather_evidence(merged, merges.HEADS, coarse_shares=[SHARES, finer])
    assert np.allclose(evidence.coarse_shares[0][2], SHARES[2] + SHARES[5])  # cluster 5 now counts as 2
    plan = merges.plan_merges(merged, evidence, 3)  # the 3-cluster head is nearest
    assert sorted(map(sorted, plan.groups)) == [[0, 1], [2, 3], [4]]
    plan = merges.plan_merges(merged, evidence, 5)  # the 6-cluster head: nothing to merge
    assert sorted(map(sorted, plan.groups)) == [[0], [1], [2], [3], [4]] and plan.merges == []
    with pytest.raises(merges.MergeUserError, match="needs the model"):
        merges.gather_evidence(data, merges.HEADS)


def test_the_app_offers_heads_first_and_plans_with_them(planted: dict, app_bundle: dict[str, Path],
                                                        tmp_path: Path) -> None:
    from app.workspace import AppUserError, Workspace

    ws = Workspace(planted["model"], planted["index"], state_dir=tmp_path / "state")
    assert ws.merging.measures()[0] == merges.HEADS
    result = ws.merging.suggestions(merges.HEADS)
    assert result.measure == merges.HEADS and {result.pairs[0][0], result.pairs[0][1]} == {SPLIT, 4}
    _, plan = ws.merging.plan(4, merges.HEADS)
    assert sorted([SPLIT, 4]) in [sorted(group) for group in plan.groups]
    ws.merging.apply_plan(json.dumps(plan.groups))
    assert len(ws.store.summary()) == 4
    plain = Workspace(app_bundle["model"], app_bundle["index"], state_dir=tmp_path / "plain")
    assert merges.HEADS not in plain.merging.measures()
    with pytest.raises(AppUserError, match="measure must be one of"):
        plain.merging.suggestions(merges.HEADS)
