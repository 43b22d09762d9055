"""Merge suggestions and the K estimate: planted cases on real FAISS indexes, the command, and the app's merge/undo."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, chromium_page, needs_chromium

from twist_core.curate import merges
from twist_core.index.build import IndexConfig, build_index
from twist_core.label.table import labels_paths, write_table


def planted_index(folder: Path, groups: int, splits: list[int], per_cluster: int, dim: int = 24,
                  noise: float = 0.35, seed: int = 0, images: bool = False) -> tuple[Path, dict[int, int]]:
    """A real index over planted embeddings: ``groups`` well-separated groups, group g split into ``splits[g]``
    clusters at random (a split cluster shares its group's embedding distribution with its siblings).

    Top-k probabilities follow the same story: an image's second cluster is a sibling when it has one.
    With ``images`` a small PNG is written for every row (the app shows them), coloured by group.
    Returns the index folder and cluster -> group.
    """
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.normal(size=(dim, dim)))[0][:groups] * 3.0
    group_of = {}
    for group, parts in enumerate(splits):
        for _ in range(parts):
            group_of[len(group_of)] = group
    siblings = {c: [s for s, g in group_of.items() if g == group_of[c] and s != c] for c in group_of}
    rows, vectors = [], []
    for cluster, group in group_of.items():
        for i in range(per_cluster):
            others = siblings[cluster] or [int(rng.choice([c for c in group_of if c != cluster]))]
            second = int(rng.choice(others))
            third = int(rng.choice([c for c in group_of if c not in (cluster, second)]))
            share = rng.uniform(0.25, 0.45) if siblings[cluster] else rng.uniform(0.0, 0.08)
            top = [[cluster, round(0.97 - share, 4)], [second, round(share, 4)], [third, 0.03]]
            rows.append({"path": f"g{group}/c{cluster}_{i:03d}.png", "cluster": cluster, "cluster_name": f"c{cluster}",
                         "confidence": top[0][1], "margin": top[0][1] - top[1][1], "topk": json.dumps(top),
                         "error": ""})
            vectors.append(centres[group] + rng.normal(scale=noise, size=dim))
    table = folder / "labels.csv"
    folder.mkdir(parents=True, exist_ok=True)
    if images:
        write_pictures(folder / "images", rows, group_of, rng)
    write_table(table, [rows])
    embeddings, meta = labels_paths(table)
    np.save(embeddings, np.asarray(vectors, np.float32))
    meta.write_text(json.dumps({"root": str(folder / "images"), "embedding_dim": dim}))
    build_index(IndexConfig(source=str(table), out=str(folder / "index"), device="cpu"))
    return folder / "index", group_of


def write_pictures(root: Path, rows: list[dict], group_of: dict[int, int], rng: np.random.Generator) -> None:
    from PIL import Image

    colours = [(200, 40, 40), (40, 160, 60), (40, 60, 200), (200, 160, 30), (120, 40, 160), (30, 160, 160)]
    for row in rows:
        base = np.array(colours[group_of[row["cluster"]] % len(colours)], float)
        pixels = np.clip(base + rng.normal(0, 25, (24, 24, 3)), 0, 255).astype(np.uint8)
        (root / row["path"]).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / row["path"])


def twist(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "twist_core.cli", "suggest-merges", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def one_split(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, int]]:
    """Five groups of 60 images per cluster; group 0 split into clusters 0 and 1, the others one cluster each."""
    return planted_index(tmp_path_factory.mktemp("one_split"), 5, [2, 1, 1, 1, 1], 60, noise=0.6)


@pytest.mark.parametrize("measure", merges.MEASURES)
def test_a_class_split_in_two_is_the_top_suggestion(one_split: tuple[Path, dict[int, int]], measure: str) -> None:
    index, _ = one_split
    data = merges.data_from_index(index)
    result = merges.suggest(data, measure, resamples=0)
    a, b, top = result.pairs[0]
    assert {a, b} == {0, 1}, result.pairs[:3]
    assert top > result.pairs[1][2], "the planted pair must stand out, not tie"
    assert result.linkage[0, :2].tolist() in ([0, 1], [1, 0]), "the hierarchy's first merge is the planted pair"


def test_k_estimate_finds_the_planted_number_of_groups(tmp_path: Path) -> None:
    index, group_of = planted_index(tmp_path, 6, [3, 2, 3, 2, 3, 2], 40, noise=0.5)
    data = merges.data_from_index(index)
    result = merges.suggest(data, merges.DEFAULT_MEASURE, resamples=40)
    estimate = result.k_estimate
    assert len(result.clusters) == 15
    assert estimate.k == 6, estimate.as_dict()
    assert estimate.low <= 6 <= estimate.high and estimate.high - estimate.low <= 2, estimate.as_dict()
    groups = merges.greedy_merges(data, merges.gather_evidence(data, merges.DEFAULT_MEASURE), 6)[0]
    truth = np.array([group_of[int(c)] for c in data.labels])
    assert len(np.unique(groups)) == 6
    for merged in np.unique(groups):  # each merged cluster holds exactly one planted group
        assert len(np.unique(truth[groups == merged])) == 1


def test_a_model_that_was_not_over_clustered_keeps_its_k(tmp_path: Path) -> None:
    index, _ = planted_index(tmp_path, 5, [1, 1, 1, 1, 1], 60, noise=0.5)
    result = merges.suggest(merges.data_from_index(index), merges.DEFAULT_MEASURE, resamples=20)
    assert result.k_estimate.k == 5, result.k_estimate.as_dict()


def test_curated_merges_and_exclusions_are_respected(one_split: tuple[Path, dict[int, int]], tmp_path: Path) -> None:
    from twist_core.curate.curation import EXCLUDED, CurationStore
    from twist_core.index.metadata import read_manifest
    from twist_core.layout import META_FILE

    index, _ = one_split
    meta = index / read_manifest(index)["dir"] / META_FILE
    store = CurationStore(tmp_path / "curation.sqlite", meta, [f"c{c}" for c in range(6)])
    store.merge([1], 0)
    excluded = [r.id for r in store.page(5, limit=10)]
    store.move(excluded, EXCLUDED)
    store.close()
    data = merges.data_from_index(index, tmp_path)
    result = merges.suggest(data, merges.DEFAULT_MEASURE, resamples=0)
    assert result.clusters == [0, 2, 3, 4, 5]
    assert result.sizes[0] == 120 and result.sizes[5] == 50
    assert not set(excluded) & set(data.ids.tolist())
    assert (data.topk_clusters != 1).all(), "top-k entries of a merged cluster count for the cluster it went into"


def test_measures_the_guide_rejected_are_left_to_the_bench(one_split: tuple[Path, dict[int, int]]) -> None:
    index, _ = one_split
    for measure in ("knn", "knn-mean", "topk", "centroid"):
        refused = twist(str(index), "--measure", measure)
        assert refused.returncode == 2 and "invalid choice" in refused.stderr, refused.stderr
    assert merges.MEASURES == ("modularity",)  # the app's dropdown offers these (and heads for a coarse model)


def test_command_prints_pairs_and_k_and_writes_json(one_split: tuple[Path, dict[int, int]], tmp_path: Path) -> None:
    index, _ = one_split
    options = tmp_path / "merges.yaml"
    options.write_text("measure: modularity\nbootstrap: 10\ntop: 3\n")
    out = tmp_path / "merges.json"
    done = twist(str(index), "--config", str(options), "--json", str(out), "--plot", str(tmp_path / "tree.png"))
    assert done.returncode == 0, done.stderr
    lines, written = done.stdout.split("wrote:\n")
    assert written.split() == [str(out), "every", "pair's", "scores", "and", "the", "estimate", "of", "K",
                               str(tmp_path / "tree.png"), "the", "dendrogram", "of", "the", "clusters"]
    lines = lines.splitlines()
    assert len(lines) == 5 and "0 c0 (60)" in lines[1] and "1 c1 (60)" in lines[1]
    assert lines[-1].startswith("K estimate: 5 ")
    written = json.loads(out.read_text())
    assert written["measure"] == "modularity" and written["k_estimate"]["resamples"] == 10
    assert {written["pairs"][0]["a"], written["pairs"][0]["b"]} == {0, 1}
    assert len(written["linkage"]) == 5 and (tmp_path / "tree.png").read_bytes()[:4] == b"\x89PNG"


def test_command_mistakes_are_one_line_and_exit_2(one_split: tuple[Path, dict[int, int]], tmp_path: Path,
                                                   tiny_run: Path) -> None:
    index, _ = one_split
    (tmp_path / "empty").mkdir()
    cases = {(str(tmp_path / "missing"),): "not found",
             (str(tiny_run),): "is a training run",
             (str(tmp_path / "empty"),): "neither an index folder",
             (str(index), "--state-dir", str(tmp_path / "empty")): "no curation.sqlite",
             (str(index), "--neighbours", "0"): "at least 1",
             (): "give the INDEX folder"}
    for args, words in cases.items():
        done = twist(*args)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert done.stderr.count("\n") == 1 and words in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert done.stdout == ""


@pytest.fixture(scope="module")
def planted_app(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """The app on a planted index (group 0 split into clusters 0 and 1) with the tiny run's 4-cluster model."""
    from conftest import start_app_server, stop_app_server

    from twist_core.deploy.export import ExportConfig, export_model
    from twist_core.deploy.infer import OnnxModel

    base = tmp_path_factory.mktemp("planted_app")
    model = export_model(ExportConfig(run=str(tiny_run), out=str(base / "model.onnx"), class_names="a,b,c,d"))
    dim = OnnxModel(model, device="cpu").embedding_dim
    index, _ = planted_index(base / "planted", 3, [2, 1, 1], 40, dim=dim, noise=0.5, images=True)
    state = base / "state"
    process, url = start_app_server({"model": model, "index": index}, state)
    try:
        yield {"url": url, "state": state, "index": index, "model": model}
    finally:
        stop_app_server(process)


def clusters_of(url: str) -> dict[int, int]:
    import httpx

    return {c["id"]: c["size"] for c in httpx.get(f"{url}api/v1/clusters", timeout=30).json()}


def test_merge_a_suggestion_then_undo_through_the_app(planted_app: dict) -> None:
    from gradio_client import Client

    client = Client(planted_app["url"], verbose=False)
    estimate, picture, table, pair, gallery, _, plan_to = client.predict("modularity", api_name="/suggest_merges")
    assert "Estimated number of groups: 3**" in estimate and plan_to == 3  # the plan's default: the estimate
    assert pair["value"] in ("0,1", "1,0") and pair["choices"][0][1] == pair["value"] and len(table["data"]) == 6
    assert Path(picture).read_bytes()[:4] == b"\x89PNG" or Path(picture).stat().st_size > 1000
    assert len(gallery) == 12  # six images of each cluster of the pair
    before = clusters_of(planted_app["url"])
    assert before == {0: 40, 1: 40, 2: 40, 3: 40}

    estimate, _, table, pair, _, status = client.predict("0,1", "modularity", api_name="/merge_suggestion")
    assert status.startswith("merged")
    assert clusters_of(planted_app["url"]) == {0: 80, 2: 40, 3: 40}
    assert len(table["data"]) == 3 and "1 b" not in str(table["data"])
    assert "from 3 current clusters" in estimate

    status, *_ = client.predict(api_name="/undo")  # the app's own undo takes the suggested merge back
    assert "undone: merged" in status
    assert clusters_of(planted_app["url"]) == before


def test_merge_plan_previewed_applied_and_undone_at_once_through_the_app(planted_app: dict) -> None:
    """The tab's plan is the command's ``--to N`` plan over the same curation; applying merges several clusters
    as one change, so one Undo restores all of them; a stale or impossible plan is refused."""
    from gradio_client import Client

    client = Client(planted_app["url"], verbose=False)
    before = clusters_of(planted_app["url"])
    assert before == {0: 40, 1: 40, 2: 40, 3: 40}
    saved = planted_app["state"].parent / "plan.json"
    command = subprocess.run([sys.executable, "-m", "twist_core.cli", "suggest-merges", str(planted_app["index"]),
                              "--state-dir", str(planted_app["state"]), "--to", "2", "--bootstrap", "0", "--json",
                              str(saved)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert command.returncode == 0, command.stderr

    text, groups, _ = client.predict(2, "modularity", api_name="/preview_plan")
    assert json.loads(groups) == json.loads(saved.read_text())["plan"]["groups"]
    assert "Plan down to 2 groups" in text and "&#60;-" in text  # shown as text: "<-"
    *_, status, plan_view, _ = client.predict(groups, "modularity", api_name="/apply_plan")
    assert status.startswith("applied the plan: 2 cluster(s) merged, 2 clusters now") and plan_view == ""
    after = clusters_of(planted_app["url"])
    assert len(after) == 2 and sum(after.values()) == 160
    with pytest.raises(Exception, match="changed since the plan was made"):
        client.predict(groups, "modularity", api_name="/apply_plan")
    status, *_ = client.predict(api_name="/undo")  # ONE undo takes the whole plan back
    assert "undone: applied a merge plan down to 2 clusters" in status
    assert clusters_of(planted_app["url"]) == before

    _, groups, _ = client.predict(3, "modularity", api_name="/preview_plan")
    assert json.loads(groups) == [[0, 1], [2], [3]]  # the split class joins again, nothing else moves
    client.predict(groups, "modularity", api_name="/apply_plan")
    assert clusters_of(planted_app["url"]) == {0: 80, 2: 40, 3: 40}
    client.predict(api_name="/undo")
    assert clusters_of(planted_app["url"]) == before
    with pytest.raises(Exception, match="from 1 to 3"):
        client.predict(4, "modularity", api_name="/preview_plan")


@needs_chromium
def test_suggested_merges_view_in_chromium(planted_app: dict) -> None:
    import shutil

    from playwright.sync_api import expect

    shots = REPO / "test-artifacts" / "merges"
    shutil.rmtree(shots, ignore_errors=True)
    shots.mkdir(parents=True)
    with chromium_page() as page:
        page.goto(planted_app["url"])
        page.get_by_role("tab", name="Suggested merges").click()
        page.locator("#suggest-merges").click()
        expect(page.locator("#merge-estimate")).to_contain_text("Estimated number of groups: 3")
        expect(page.locator("#merge-dendrogram img")).to_be_visible()
        expect(page.locator("#merge-pair-gallery button.thumbnail-item")).to_have_count(12)
        page.screenshot(path=shots / "1-suggestions.png", full_page=True)
        page.locator("#merge-pair-button").click()
        expect(page.locator("#merge-status")).to_contain_text("merged")
        expect(page.locator("#merge-estimate")).to_contain_text("from 3 current clusters")
        page.screenshot(path=shots / "2-merged.png", full_page=True)
        page.locator("#merge-undo").click()
        expect(page.locator("#merge-status")).to_contain_text("undone")
        expect(page.locator("#merge-estimate")).to_contain_text("from 4 current clusters")
        expect(page.locator("#merge-plan-to input")).to_have_value("3")  # the estimate
        page.locator("#merge-plan-preview").click()
        expect(page.locator("#merge-plan")).to_contain_text("Plan down to 3 groups")
        page.screenshot(path=shots / "3-plan.png", full_page=True)
        page.locator("#merge-plan-apply").click()
        expect(page.locator("#merge-status")).to_contain_text("applied the plan")
        expect(page.locator("#merge-estimate")).to_contain_text("from 3 current clusters")
        page.screenshot(path=shots / "4-plan-applied.png", full_page=True)
        page.locator("#merge-undo").click()
        expect(page.locator("#merge-estimate")).to_contain_text("from 4 current clusters")


def test_past_the_natural_groups_the_least_harmful_merge_still_comes_first() -> None:
    """Three groups on a line, 1 and 2 close: every merge lowers modularity, and 1 + 2 lowers it least."""
    rng = np.random.default_rng(0)
    vectors = np.concatenate([rng.normal((x, 5.0), 0.6, (50, 2)) for x in (-6.0, 3.0, 5.0)])
    labels = np.repeat([0, 1, 2], 50)
    data = merges.cluster_data(np.arange(150), labels, vectors, [None] * 150, {0: "a", 1: "b", 2: "c"})
    evidence = merges.gather_evidence(data, "modularity", neighbours=10)
    links = merges.knn_links(evidence, labels, 3, np.ones(150))
    graph = (links + links.T) / (2 * links.sum())
    gains = graph - np.outer(graph.sum(1), graph.sum(1))
    assert gains[np.triu_indices(3, 1)].max() < 0, "the planted case must have only harmful merges"
    result = merges.suggest(data, "modularity", resamples=0)
    assert result.pairs[0][:2] == (1, 2), result.pairs
    _, plan = merges.greedy_merges(data, evidence, 2)
    assert plan == [(2, 1)] or plan == [(1, 2)]


def test_command_suggests_over_the_apps_curation(one_split: tuple[Path, dict[int, int]], tmp_path: Path) -> None:
    from twist_core.curate.curation import CurationStore
    from twist_core.index.metadata import read_manifest
    from twist_core.layout import META_FILE

    index, _ = one_split
    store = CurationStore(tmp_path / "curation.sqlite", index / read_manifest(index)["dir"] / META_FILE,
                          [f"c{c}" for c in range(6)])
    store.merge([1], 0)
    store.rename(0, "both halves")
    store.close()
    done = twist(str(index), "--state-dir", str(tmp_path), "--bootstrap", "5")
    assert done.returncode == 0, done.stderr
    assert "0 both halves (120)" in done.stdout and " 1 c1 " not in done.stdout
    assert "from 5 clusters" in done.stdout.splitlines()[-1]


def test_refining_moves_a_misplaced_cluster_back_to_its_group() -> None:
    """Two groups of three clusters linked inside, cluster 2 put in the wrong group (as a greedy merge that a later
    merge made wrong would leave it): refining moves it back and the modularity rises."""
    graph = np.full((6, 6), 0.2)
    graph[:3, :3] = graph[3:, 3:] = 5.0
    graph /= graph.sum()
    wrong = np.array([0, 0, 1, 1, 1, 1])
    mended = merges.refine_groups(graph, wrong)
    assert mended.tolist() == [0, 0, 0, 1, 1, 1]
    assert merges.group_modularity(graph, mended) > merges.group_modularity(graph, wrong)
    lone = merges.refine_groups(graph, np.array([0, 1, 1, 1, 1, 1]))
    assert (lone == 0).sum() >= 1, "a group is never emptied"


def test_command_plans_merges_down_to_n_groups(tmp_path: Path) -> None:
    """``--to 6`` over 15 clusters planted as 6 split groups: the plan's groups are the planted ones, in the JSON
    as merges the app can apply one by one."""
    index, group_of = planted_index(tmp_path, 6, [3, 2, 3, 2, 3, 2], 40, noise=0.5)
    done = twist(str(index), "--to", "6", "--bootstrap", "0", "--json", str(tmp_path / "s.json"))
    assert done.returncode == 0, done.stderr
    assert "Plan down to 6 groups" in done.stdout
    plan = json.loads((tmp_path / "s.json").read_text())["plan"]
    assert sorted(sorted(group_of[c] for c in group) for group in plan["groups"]) == [[g] * n for g, n in
                                                                                        enumerate([3, 2, 3, 2, 3, 2])]
    assert len(plan["merges"]) == 9 and plan["modularity"] >= plan["greedy_modularity"]
    data = merges.data_from_index(index)
    into = dict(tuple(m) for m in plan["merges"])
    applied = np.array([into.get(int(c), int(c)) for c in data.labels])
    truth = np.array([group_of[int(c)] for c in data.labels])
    assert all(len(np.unique(truth[applied == c])) == 1 for c in np.unique(applied))
    refused = twist(str(index), "--to", "15", "--bootstrap", "0")
    assert refused.returncode == 2 and "--to must be from 1 to 14" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_measure_views_plans_on_the_models_confusions_not_the_embeddings(one_split: tuple[Path, dict[int, int]],
                                                                         tmp_path: Path) -> None:
    """On the planted index the embeddings say 0 and 1 belong together; a view graph in which the model confuses
    2 and 3 instead must win under ``views``, and merges made in the app carry their view mass along."""
    import dataclasses

    index, _ = one_split
    data = merges.data_from_index(index)
    joint = np.diag([0.2, 0.2, 0.1, 0.1, 0.2, 0.2]) + 0.002
    joint[2, 3] = joint[3, 2] = 0.08
    evidence = merges.gather_evidence(data, merges.VIEWS, model_graph=joint / joint.sum())
    result = merges.suggest(data, evidence=evidence, to=5)
    assert {result.pairs[0][0], result.pairs[0][1]} == {2, 3}
    assert result.plan is not None and result.plan.graph == "view"
    assert sorted(map(sorted, result.plan.groups)) == [[0], [1], [2, 3], [4], [5]]
    knn = merges.suggest(data, to=5)
    assert knn.plan is not None and knn.plan.graph == "kNN" and sorted(map(sorted, knn.plan.groups))[0] == [0, 1]
    merged = dataclasses.replace(data, labels=np.where(data.labels == 4, 2, data.labels), merged_into={4: 2})
    mapped = merges.graph_by_cluster(joint, merged)
    assert mapped[2, 2] == pytest.approx(joint[np.ix_([2, 4], [2, 4])].sum()) and mapped[4].sum() == 0
    assert mapped.sum() == pytest.approx(joint.sum())
    with pytest.raises(merges.MergeUserError, match="needs the model and the images"):
        merges.gather_evidence(data, merges.VIEWS)
    refused = twist(str(index), "--measure", "views", "--bootstrap", "0")
    assert refused.returncode == 2 and "does not name the model" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
