"""Benchmark the web app on the 50,000 CIFAR-10 training images: start-up, cluster pages, search by upload.

Set-up (not timed as app figures, but reported): extract ``../shared/data/cifar10-train.tar.gz`` to a temp
folder, train a tiny run quickly (a narrow ResNet-18 for one epoch on 1,000 of the images: the weights only
need to be real, not good), export it, label all 50,000 images and build the index. Then, measured:

- start-up: ``twist app`` process start until ``GET /`` answers 200 (index opened, UI built);
- open a cluster page (gradio_client ``/open_cluster``, 60 images): the first visit of each page (thumbnails
  made then) and revisits (thumbnails cached), on the largest cluster, so paging runs on the most rows;
- search by upload (``/search_upload``, k=12): 100 requests with different images, median and p95;
- baselines in the same run: the client round trip to a near-empty handler, and the page and search work
  timed in-process without Gradio, so the app's own cost and the transport's can be told apart;
- the JSON API beside the UI (``/api/v1``): search by id and by upload over plain HTTP (one kept-alive
  connection, as a script uses it), next to Gradio's ``/search_id`` and ``/search_upload`` of the same run.

    python -m bench.bench_app            # writes bench/results/app.json and prints a table
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.common import REPO


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def extract(archive: Path, out: Path) -> Path:
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(out, filter="data")
    return out


def prepare(work: Path, archive: Path) -> dict[str, float | Path]:
    from twist_core.deploy.export import ExportConfig, export_model
    from twist_core.index.build import IndexConfig, build_index
    from twist_core.label.labeller import LabelConfig, label_folder
    from twist_core.train.loop import train
    from twist_core.train.options import TrainConfig

    times: dict[str, float | Path] = {}
    start = time.perf_counter()
    data = extract(archive, work / "cifar")
    times["extract_s"] = time.perf_counter() - start
    subset = work / "subset"
    for class_dir in sorted({p.parent for p in data.rglob("*.jpg")}):
        (subset / class_dir.name).mkdir(parents=True, exist_ok=True)
        for picture in sorted(class_dir.iterdir())[:100]:
            shutil.copy(picture, subset / class_dir.name / picture.name)
    start = time.perf_counter()
    train(TrainConfig(data=str(subset), out=str(work / "run"), classes=10, backbone="resnet18", width=8,
                      hidden_dim=64, image_size=32, epochs=1, batch_size=64, workers=0, progress=False,
                      checkpoint_every=0, self_label_fraction=0.0))
    model = export_model(ExportConfig(run=str(work / "run"), out=str(work / "model.onnx")))
    times["train_export_s"] = time.perf_counter() - start
    start = time.perf_counter()
    label_folder(LabelConfig(model=str(model), folder=str(data), out=str(work / "labels.csv"), progress=False))
    times["label_s"] = time.perf_counter() - start
    start = time.perf_counter()
    build_index(IndexConfig(source=str(work / "labels.csv"), model=str(model), out=str(work / "index"),
                            device="cpu"))
    times["index_s"] = time.perf_counter() - start
    times["model"], times["index"] = model, work / "index"
    return times


def start_app(model: Path, index: Path, state: Path, port: int) -> tuple[subprocess.Popen, float]:
    url = f"http://127.0.0.1:{port}/"
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "twist_core.cli", "app", "--model", str(model), "--index",
                                str(index), "--state-dir", str(state), "--port", str(port)], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"twist app exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return process, time.perf_counter() - start
        except OSError:
            time.sleep(0.05)


def in_process_handlers(setup: dict, state: Path, cluster: int, queries: list[Path],
                        pages: int) -> tuple[list[float], list[float]]:
    """The same work without Gradio: ``Workspace`` calls timed in this process (thumbnails already cached)."""
    from app.workspace import Workspace

    ws = Workspace(setup["model"], setup["index"], state)
    try:
        page_times, search_times = [], []
        for page in range(pages):
            start = time.perf_counter()
            ws.cluster_page(cluster, page, False, 0.0, 1.0)
            page_times.append(time.perf_counter() - start)
        for path in queries:
            start = time.perf_counter()
            ws.search_file(path, 12)
            search_times.append(time.perf_counter() - start)
        return page_times, search_times
    finally:
        ws.close()


def time_api(base: str, ids: list[int], queries: list[Path]) -> tuple[list[float], list[float]]:
    """Search by id and by upload through the JSON API, one kept-alive HTTP connection as a script would use."""
    import httpx

    by_id, by_upload = [], []
    with httpx.Client(base_url=base, timeout=60) as api:
        api.get("clusters").raise_for_status()  # connection open, routes warm
        for image_id in ids:
            start = time.perf_counter()
            api.get(f"search/id/{image_id}", params={"k": 12}).raise_for_status()
            by_id.append(time.perf_counter() - start)
        for path in queries:
            body = path.read_bytes()
            start = time.perf_counter()
            api.post("search/upload", params={"k": 12}, files={"file": (path.name, body)}).raise_for_status()
            by_upload.append(time.perf_counter() - start)
    return by_id, by_upload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archive", default=str(REPO.parent / "shared" / "data" / "cifar10-train.tar.gz"))
    parser.add_argument("--searches", type=int, default=100)
    parser.add_argument("--pages", type=int, default=10)
    parser.add_argument("--port", type=int, default=0, help="0 = a free port")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "app.json"))
    args = parser.parse_args()

    from gradio_client import Client, handle_file

    from app.main import free_port
    from twist_core.index.image_index import IndexReader

    with tempfile.TemporaryDirectory(prefix="bench-app-") as tmp:
        work = Path(tmp)
        setup = prepare(work, Path(args.archive))
        index = IndexReader.open(setup["index"], "cpu")
        size, clusters = index.size, index.cluster_summary()
        biggest = max(clusters, key=lambda c: c["size"])
        sampled = index.records(None, order_by="id", limit=50_000)[::500][:args.searches]
        queries, query_ids = [h.abs_path for h in sampled], [h.id for h in sampled]
        index.close()

        port = args.port or free_port("127.0.0.1")
        process, startup = start_app(setup["model"], setup["index"], work / "state", port)
        try:
            # The figures are the server's answer; a browser then fetches the thumbnails itself, in parallel
            # (gradio_client would download them one by one, about 60 ms each here, and time that instead).
            client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=False)
            first, again = [], []
            for page in range(args.pages):
                for bucket in (first, again):
                    start = time.perf_counter()
                    client.predict(biggest["cluster"], page, False, 0, 1, api_name="/open_cluster")
                    bucket.append(time.perf_counter() - start)
            lowest = time.perf_counter()
            client.predict(biggest["cluster"], 0, True, 0, 1, api_name="/open_cluster")
            lowest = time.perf_counter() - lowest
            searches = []
            for path in queries:
                start = time.perf_counter()
                client.predict(handle_file(str(path)), 12, api_name="/search_upload")
                searches.append(time.perf_counter() - start)
            gradio_by_id = []
            ids = [int(i) for i in query_ids]
            for image_id in ids:
                start = time.perf_counter()
                client.predict(image_id, 12, api_name="/search_id")
                gradio_by_id.append(time.perf_counter() - start)
            api_by_id, api_upload = time_api(f"http://127.0.0.1:{port}/api/v1/", ids, queries)
            trivial = []  # baseline: the same round trip to a handler that does almost nothing
            for _ in range(args.pages * 2):
                start = time.perf_counter()
                client.predict("", api_name="/show_selection")
                trivial.append(time.perf_counter() - start)
        finally:
            process.terminate()
            process.wait(timeout=30)
        handler_page, handler_search = in_process_handlers(setup, work / "state", biggest["cluster"], queries,
                                                           args.pages)

    ms = 1000.0
    result = {
        "images": size, "clusters": len(clusters), "largest_cluster": biggest["size"],
        "setup": {k: round(v, 1) for k, v in setup.items() if isinstance(v, float)},
        "model": "tiny trained run: ResNet-18 width 8, 32 px, 1 epoch on 1,000 CIFAR-10 train images, K=10",
        "startup_s": round(startup, 2),
        "open_cluster_first_visit_ms": {"median": round(statistics.median(first) * ms, 1),
                                        "p95": round(percentile(first, 95) * ms, 1), "n": len(first)},
        "open_cluster_revisit_ms": {"median": round(statistics.median(again) * ms, 1),
                                    "p95": round(percentile(again, 95) * ms, 1), "n": len(again)},
        "open_cluster_lowest_first_ms": round(lowest * ms, 1),
        "search_upload_ms": {"median": round(statistics.median(searches) * ms, 1),
                             "p95": round(percentile(searches, 95) * ms, 1), "n": len(searches)},
        "search_id_ms": {"median": round(statistics.median(gradio_by_id) * ms, 1),
                         "p95": round(percentile(gradio_by_id, 95) * ms, 1), "n": len(gradio_by_id)},
        "api_search_id_ms": {"median": round(statistics.median(api_by_id) * ms, 1),
                             "p95": round(percentile(api_by_id, 95) * ms, 1), "n": len(api_by_id)},
        "api_search_upload_ms": {"median": round(statistics.median(api_upload) * ms, 1),
                                 "p95": round(percentile(api_upload, 95) * ms, 1), "n": len(api_upload)},
        "baselines_ms": {
            "gradio_round_trip_trivial_handler": round(statistics.median(trivial) * ms, 1),
            "handler_only_cluster_page_revisit": round(statistics.median(handler_page) * ms, 1),
            "handler_only_search_file": round(statistics.median(handler_search) * ms, 1),
        },
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'measure':<42} {'median':>10} {'p95':>10}")
    print(f"{'app start-up (process -> HTTP 200)':<42} {result['startup_s'] * 1000:>9.0f}ms {'':>10}")
    for key, title in (("open_cluster_first_visit_ms", f"open cluster page, first visit ({biggest['size']:,})"),
                       ("open_cluster_revisit_ms", "open cluster page, revisit"),
                       ("search_upload_ms", "search by upload (k=12)"),
                       ("search_id_ms", "search by id (k=12)"),
                       ("api_search_id_ms", "JSON API: search by id (k=12)"),
                       ("api_search_upload_ms", "JSON API: search by upload (k=12)")):
        print(f"{title:<42} {result[key]['median']:>8.1f}ms {result[key]['p95']:>8.1f}ms")
    print(json.dumps(result["setup"]))
    print("medians of the baselines (ms):", json.dumps(result["baselines_ms"]))


if __name__ == "__main__":
    main()
