"""``twist finetune``: learning from corrections, on real small runs (no mocks), and the store's confirmations."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO, chromium_page, keep_screenshots, needs_chromium, tiny_train_config

DIGITS_SIZE = 16


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """scikit-learn's 1,797 digits as 16 px images and a short patches run on them (K = 10, about 20 s)."""
    from twist_core.demo import write_digits
    from twist_core.train.loop import train

    base = tmp_path_factory.mktemp("digits")
    digits = write_digits(base / "digits")
    run = base / "run"
    train(tiny_train_config(digits, run, classes=10, backbone="patches", width=32, hidden_dim=128, image_size=16,
                            epochs=4, batch_size=64))
    return {"data": digits, "run": run, "base": base}


def cluster_predictions(run: Path, data: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Every image's cluster by the run's checkpoint (eval mode), its true class and its path."""
    from twist_core.evaluation.evaluate import load_eval_images, predict_torch
    from twist_core.model.checkpoint import load_checkpoint
    from twist_core.model.network import ModelSpec, TwistModel

    checkpoint = load_checkpoint(run)
    model = TwistModel(ModelSpec(**checkpoint["model_spec"]))
    model.load_state_dict(checkpoint["model"])
    images = load_eval_images(data, DIGITS_SIZE, 0, progress=False)
    probs, _ = predict_torch(model, images.images, DIGITS_SIZE, torch.device("cpu"))
    return probs.argmax(1), images.labels, images.files


def accuracy(clusters: np.ndarray, classes: np.ndarray) -> float:
    from twist_core.evaluation.metrics import contingency, hungarian_accuracy

    return hungarian_accuracy(contingency(clusters, classes, int(clusters.max()) + 1, int(classes.max()) + 1))[0]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "twist_core.cli", "finetune", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_ten_percent_confirmed_labels_raise_accuracy_on_the_other_images(digits_run: dict[str, Path]) -> None:
    """10 % of the digits confirmed (each moved to the cluster the Hungarian matching gives its class) and 4
    epochs of fine-tuning: ACC on the 90 % NOT confirmed rose from 0.59 to 0.90 when this was written (seed 0,
    2-core CPU); the test asks for +0.10, far below the measured +0.32. The labels come in as a CSV."""
    from twist_core.curate.finetune import FinetuneConfig, finetune
    from twist_core.evaluation.metrics import contingency, hungarian_accuracy

    before, classes, files = cluster_predictions(digits_run["run"], digits_run["data"])
    _, cluster_to_class = hungarian_accuracy(contingency(before, classes, 10, 10))
    cluster_of = {c: k for k, c in cluster_to_class.items()}
    confirmed = np.random.default_rng(0).permutation(len(files))[:len(files) // 10]
    table = digits_run["base"] / "confirmed.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows([files[i], cluster_of[int(classes[i])]] for i in confirmed)
    out = digits_run["base"] / "finetuned"
    report = finetune(FinetuneConfig(run=str(digits_run["run"]), labels=str(table), out=str(out), epochs=4,
                                     workers=0, progress=False))
    after, _, _ = cluster_predictions(out, digits_run["data"])
    rest = np.ones(len(files), bool)
    rest[confirmed] = False
    gain = accuracy(after[rest], classes[rest]) - accuracy(before[rest], classes[rest])
    assert gain >= 0.10, f"ACC on the unconfirmed images rose by only {gain:.3f}"
    assert report["labelled_images"] == len(confirmed) and report["classes_after"] == 10
    assert (out / "config.json").is_file() and (out / "metrics.jsonl").is_file() and (out / "DONE").is_file()
    assert "supervised" in json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])


def test_a_killed_finetune_resumes_from_its_checkpoint_when_run_again(tiny_run: Path, shapes_folder: Path,
                                                                      tmp_path: Path) -> None:
    """``kill -9`` after the first checkpoint, then the same command: it resumes (with the labels it started
    with, even though the CSV changed meanwhile) and finishes; a third run is refused as finished."""
    import os
    import signal
    import time

    def write_labels(count: int) -> None:
        with open(table, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "label"])
            for cluster, label in enumerate(("discs", "stripes")):
                writer.writerows([f"{label}/{i:03d}.png", cluster] for i in range(count))

    table, out, epochs = tmp_path / "labels.csv", tmp_path / "ft", 12
    write_labels(6)
    args = [str(tiny_run), "--labels", str(table), "--out", str(out), "--epochs", str(epochs), "--workers", "0",
            "--labelled-per-step", "16", "--no-progress"]
    process = subprocess.Popen([sys.executable, "-m", "twist_core.cli", "finetune", *args], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / "last.pt").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert (out / "last.pt").exists() and not (out / "DONE").exists(), "killed after its first checkpoint"
    stopped_at = torch.load(out / "last.pt", weights_only=True)["global_step"]

    write_labels(2)  # changed after the start: the resumed run keeps the labels it started with
    resumed = run_cli(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming the stopped fine-tune" in resumed.stderr
    report = json.loads((out / "finetune.json").read_text())
    assert report["labelled_images"] == 12 and (out / "DONE").is_file()
    final = torch.load(out / "last.pt", weights_only=True)
    assert final["global_step"] == final["total_steps"] > stopped_at > 0
    epochs_logged = [row["epoch"] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    assert epochs_logged == list(range(1, epochs + 1)), "each epoch once: resumed, not restarted or repeated"
    # It ends as twist train does: what ran, the run folder, every file written, and the next command.
    assert f"trained {epochs} epochs" in resumed.stdout and f"run folder: {out}" in resumed.stdout
    for name in ("config.json", "last.pt", "summary.json", "finetune.json", "class_names.txt", "finetune-plan.json"):
        assert f"  {out / name} " in resumed.stdout, name
    assert f"next: twist export {out} --out ft.onnx" in resumed.stdout

    finished = run_cli(*args)
    assert finished.returncode == 2 and "holds a finished fine-tune" in finished.stderr
    assert len(finished.stderr.strip().splitlines()) == 1


def open_store(index: Path, state: Path):
    from twist_core.curate.curation import CurationStore
    from twist_core.index.metadata import IndexMetadata, read_manifest
    from twist_core.layout import META_FILE

    meta_path = index / read_manifest(index)["dir"] / META_FILE
    meta = IndexMetadata(meta_path)
    names = {c["cluster"]: c["name"] for c in meta.cluster_summary()}
    meta.close()
    return CurationStore(state / "curation.sqlite", meta_path, [names.get(c, f"cluster_{c}") for c in range(4)])


def test_merge_lowers_k_and_exclusions_are_left_out(app_bundle: dict[str, Path], tiny_run: Path,
                                                     tmp_path: Path) -> None:
    """A merge, a rename, moves, exclusions and confirmations made in the store become the new run's K, names,
    labels and skipped images; ``twist export`` of the new run carries the curated names."""
    from twist_core.curate.curation import EXCLUDED
    from twist_core.curate.finetune import FinetuneConfig, finetune
    from twist_core.deploy.export import ExportConfig, export_model
    from twist_core.model.checkpoint import load_checkpoint

    store = open_store(app_bundle["index"], tmp_path / "state")
    sizes = {row["cluster"]: row["size"] for row in store.summary()}
    store_names = store.names()
    source, target, other = sorted(sizes, key=lambda c: -sizes[c])[:3]
    store.merge([source], target)
    store.rename(target, "merged things")
    outsiders = [r.id for r in store.page(other, limit=5)]
    moved, excluded = outsiders[:3], outsiders[3:5]
    store.move(moved, target)
    store.move(excluded, EXCLUDED)
    confirmed = [r.id for r in store.page(other, limit=4)]
    assert store.confirm(confirmed) == 4
    excluded_paths = {store.records(excluded)[i].path for i in excluded}
    store.close()
    survivors = [c for c in range(4) if c != source]

    out = tmp_path / "finetuned"
    report = finetune(FinetuneConfig(run=str(tiny_run), index=str(app_bundle["index"]),
                                     state_dir=str(tmp_path / "state"), data=str(app_bundle["images"]), out=str(out),
                                     epochs=1, workers=0, progress=False))
    assert report["classes_before"] == 4 and report["classes_after"] == 3
    assert [c["from"] for c in report["clusters"]] == survivors
    assert report["labelled_images"] == sizes[source] + 3 + 4 and report["excluded_images"] == 2
    checkpoint = load_checkpoint(out)
    assert checkpoint["model_spec"]["n_classes"] == 3 and checkpoint["model"]["head.mlp.6.weight"].shape[0] == 3
    names = (out / "class_names.txt").read_text().splitlines()
    assert "merged things" in names and len(names) == 3
    skipped = (out / "skipped.txt").read_text()
    assert all(f"{path}\texcluded in the curation" in skipped for path in excluded_paths)
    card = json.loads(export_model(ExportConfig(run=str(out), out=str(tmp_path / "m.onnx"))).with_suffix(".json")
                      .read_text())
    assert card["class_names"] == names and card["n_classes"] == 3
    assert (tiny_run / "last.pt").stat().st_mtime < (out / "last.pt").stat().st_mtime  # RUN untouched
    assert load_checkpoint(tiny_run)["model_spec"]["n_classes"] == 4

    # twist label + twist index carry the new model; the Changes view compares it with the previous labels
    from app.label_changes import model_changes
    from twist_core.demo import label_and_index

    _, new_index = label_and_index(tmp_path / "m.onnx", app_bundle["images"], tmp_path, progress=False)
    changes = model_changes("labels.csv", new_index, [app_bundle["index"].parent])
    counts = {row["cluster"]: (row["before"], row["after"]) for row in changes.counts}
    merged_away = store_names[source]
    assert counts[merged_away][1] == 0 and counts[merged_away][0] > 0 and counts["merged things"][0] == 0
    assert sum(after for _, after in counts.values()) == changes.compared == sum(sizes.values())
    assert all(before != after for _, before, after in changes.changed)
    assert len([c for c in changes.changed if c[1] == merged_away]) == counts[merged_away][0]


def test_the_apps_csv_export_gives_the_same_labels_as_the_store(app_bundle: dict[str, Path], tmp_path: Path) -> None:
    from app.exporters import write_csv
    from twist_core.curate.curation import EXCLUDED
    from twist_core.curate.finetune import curation_from_csv, curation_from_store, file_positions
    from twist_core.data.folder import scan_folder

    store = open_store(app_bundle["index"], tmp_path / "state")
    store.merge([1], 0)
    store.move([r.id for r in store.page(2, limit=2)], 3)
    store.move([r.id for r in store.page(3, limit=1)], EXCLUDED)
    store.confirm([r.id for r in store.page(2, limit=3)])
    table = write_csv(store.iter_records(), store.names(), tmp_path / "export.csv")
    store.close()
    from_store, _ = curation_from_store(app_bundle["index"], tmp_path / "state", 4)
    from_csv = curation_from_csv(table, 4)
    files = scan_folder(app_bundle["images"])
    assert sorted(from_csv.names) == sorted(from_store.names) == [0, 2, 3]
    assert file_positions(from_csv, app_bundle["images"], files) == \
        file_positions(from_store, app_bundle["images"], files)
    labelled, excluded, missing = file_positions(from_store, app_bundle["images"], files)
    assert len(excluded) == 1 and missing == 0 and len(labelled) >= 5


def test_head_rows_keep_the_surviving_clusters_in_order() -> None:
    from twist_core.curate.finetune import head_rows
    from twist_core.model.network import ModelSpec, TwistModel

    state = TwistModel(ModelSpec(backbone="patches", width=4, hidden_dim=8, n_classes=5)).state_dict()
    state["head.logit_norm.running_mean"] = torch.arange(5.0)
    kept = head_rows(state, [0, 2, 4])
    assert torch.equal(kept["head.mlp.6.weight"], state["head.mlp.6.weight"][[0, 2, 4]])
    assert kept["head.logit_norm.running_mean"].tolist() == [0.0, 2.0, 4.0]
    smaller = TwistModel(ModelSpec(backbone="patches", width=4, hidden_dim=8, n_classes=3))
    smaller.load_state_dict(kept)  # the rest of the network is unchanged and loads as it is


def test_supervised_loss_counts_only_labelled_images() -> None:
    from torch.nn import functional as F

    from twist_core.train.loss import supervised_loss

    logits = [torch.randn(6, 4), torch.randn(6, 4)]
    targets = torch.tensor([-1, 2, -1, 0, 3, -1])
    labelled = targets >= 0
    expected = torch.stack([F.cross_entropy(v[labelled] / 0.5, targets[labelled]) for v in logits]).mean()
    assert torch.allclose(supervised_loss(logits, targets, tau=0.5), expected)


@pytest.mark.parametrize(("case", "message"), [
    ("no_labels", "give the curated labels"),
    ("both", "give the curated labels"),
    ("bad_column", "needs a header with path and label"),
    ("bad_cluster", "is not a cluster of the run"),
    ("same_out", "one of this command's inputs"),  # twist_core.outputs refuses it first
    ("no_curation", "no curation at"),
])
def test_bad_input_is_one_line_and_exit_2(case: str, message: str, tiny_run: Path, app_bundle: dict[str, Path],
                                          tmp_path: Path) -> None:
    table = tmp_path / "labels.csv"
    table.write_text({"bad_column": "file,cluster\na.png,1\n", "bad_cluster": "path,label\na.png,9\n"}
                     .get(case, "path,label\na.png,1\n"))
    args = {"no_labels": [], "both": ["--labels", str(table), "--index", str(app_bundle["index"])],
            "same_out": ["--labels", str(table), "--out", str(tiny_run)],
            "no_curation": ["--index", str(app_bundle["index"]), "--state-dir", str(tmp_path / "none")],
            }.get(case, ["--labels", str(table)])
    out = [] if case == "same_out" else ["--out", str(tmp_path / "new")]
    result = run_cli(str(tiny_run), *args, *out)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "new").exists()


def test_confirm_marks_images_and_undo_takes_it_back(app_bundle: dict[str, Path], tmp_path: Path) -> None:
    from twist_core.curate.curation import EXCLUDED, CurationError

    store = open_store(app_bundle["index"], tmp_path / "state")
    page = store.page(0, limit=6)
    ids = [r.id for r in page]
    store.move(ids[:1], EXCLUDED)
    assert store.confirm(ids) == 5  # the excluded one has no cluster to confirm
    records = store.records(ids)
    assert [records[i].status for i in ids[1:]] == ["confirmed"] * 5 and records[ids[0]].status == "excluded"
    assert {r.id for r in store.curated_records()} == set(ids)
    assert store.history(1)[0].endswith(f"confirmed: 5 image(s) in {store.name(0)}")
    assert store.undo().startswith("confirmed: 5")
    assert {store.records(ids)[i].status for i in ids[1:]} == {"predicted"}
    with pytest.raises(CurationError, match="none of the selected images"):
        store.confirm(ids[:1])
    store.undo()  # the exclusion
    assert list(store.curated_records()) == []
    store.close()


def previous_with_three_moved(app_bundle: dict[str, Path], tmp_path: Path) -> tuple[Path, list[dict[str, str]]]:
    """A labels table beside the index (where the app may read it) in which three images had another cluster."""
    labels = app_bundle["index"].parent / "labels.csv"
    rows = list(csv.DictReader(labels.open(newline="")))
    previous = app_bundle["index"].parent / f"previous-{tmp_path.name}.csv"
    shutil.copy(labels.with_suffix(".meta.json"), previous.with_suffix(".meta.json"))
    names = sorted({row["cluster_name"] for row in rows})
    for row in rows[:3]:
        row["cluster_name"] = next(n for n in names if n != row["cluster_name"])
    with previous.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return previous, rows


def test_app_confirms_a_selection_and_shows_what_a_new_labelling_changed(app_bundle: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    """Through a real server: the Confirm button's endpoint (and undo), and the Changes view against a labels
    table in which three images were given another cluster."""
    from gradio_client import Client

    from tests.conftest import start_app_server, stop_app_server

    previous, rows = previous_with_three_moved(app_bundle, tmp_path)

    process, url = start_app_server(app_bundle, tmp_path / "state")
    try:
        client = Client(url, verbose=False)
        gallery, *_ = client.predict(0, 0, False, 0.0, 1.0, api_name="/open_cluster")
        ids = [int(item["caption"].split("·")[0].strip(" #")) for item in gallery[:3]]
        status, *_ = client.predict(", ".join(map(str, ids)), api_name="/confirm_images")
        assert "3 image(s) confirmed" in status
        store = open_store(app_bundle["index"], tmp_path / "state")
        assert {r.status for r in store.records(ids).values()} == {"confirmed"}
        status, *_ = client.predict(api_name="/undo")
        assert "undone: confirmed: 3" in status
        assert {r.status for r in store.records(ids).values()} == {"predicted"}
        store.close()

        summary, table, changed = client.predict(str(previous), api_name="/compare_models")
        assert summary.startswith(f"**3 of {len(rows)} images changed cluster**")
        assert sum(row[1] for row in table["data"]) == sum(row[2] for row in table["data"]) == len(rows)
        assert len(changed) == 3 and all("→" in item["caption"] for item in changed)
        summary, _, changed = client.predict("labels.csv", api_name="/compare_models")  # a name: beside the index
        assert summary.startswith(f"**No image changed cluster** among the {len(rows)} images") and changed == []
        with pytest.raises(Exception, match="does not exist"):
            client.predict("nothing.csv", api_name="/compare_models")
        outside = tmp_path / "outside.csv"  # a valid labels table, but not in the app's places
        shutil.copy(previous, outside)
        shutil.copy(previous.with_suffix(".meta.json"), outside.with_suffix(".meta.json"))
        for probe in (outside, tmp_path / "missing.csv", "../" * 12 + "etc/passwd"):
            with pytest.raises(Exception, match="the app reads no other place"):
                client.predict(str(probe), api_name="/compare_models")
    finally:
        stop_app_server(process)


@needs_chromium
def test_confirm_and_changes_in_chromium(app_bundle: dict[str, Path], tmp_path: Path) -> None:
    """A person's path in a real browser: open a cluster, confirm its page, compare with a previous labelling.
    Screenshots go to ``test-artifacts/finetune-browser/``."""

    from playwright.sync_api import expect

    from tests.conftest import start_app_server, stop_app_server

    shots = tmp_path / "screenshots"
    shots.mkdir()
    previous, _ = previous_with_three_moved(app_bundle, tmp_path)
    process, url = start_app_server(app_bundle, tmp_path / "state")
    try:
        with chromium_page() as page:
            page.goto(url)
            page.locator("#cluster-cards button.thumbnail-item").first.click()
            expect(page.locator("#page-info")).to_contain_text("images")
            page.locator("#confirm").click()
            expect(page.locator("#status")).to_contain_text("confirmed in their cluster")
            page.screenshot(path=shots / "1-confirmed.png", full_page=True)
            page.get_by_role("tab", name="Changes").click()
            page.locator("#changes-previous textarea").fill(str(app_bundle["index"].parent / "labels.csv"))
            page.locator("#changes-compare").click()
            expect(page.locator("#changes-summary")).to_contain_text("No image changed cluster")  # none moved
            expect(page.locator("#changes-gallery")).to_be_hidden()  # no empty box
            page.locator("#changes-previous textarea").fill(previous.name)  # three images had another cluster
            page.locator("#changes-compare").click()
            expect(page.locator("#changes-summary")).to_contain_text("3 of")
            changed = page.locator("#changes-gallery button.thumbnail-item")
            expect(changed).to_have_count(3)
            assert changed.first.bounding_box()["width"] < 250  # thumbnails, not three images across the page
            page.screenshot(path=shots / "2-changes.png", full_page=True)
    finally:
        stop_app_server(process)
    store = open_store(app_bundle["index"], tmp_path / "state")
    assert any(r.status == "confirmed" for r in store.curated_records())
    store.close()
    assert len(list(keep_screenshots(shots, "finetune-browser").glob("*.png"))) == 2
