"""Scale bench (issue 39): ``twist index``, a 1 % ``--update`` and ``twist app`` on 10k, 100k and 1M images.

For each N a synthetic table in the exact ``twist label`` format (:mod:`bench.scale_data`, cached) is indexed
and served by the product's own commands, each in its own process:

- ``twist index T --out I``: CPU (user+sys of the child, from ``wait4``), wall, peak RSS (``ru_maxrss``), the
  kind chosen, the size on disk, and recall@10 against exact search over all embeddings for 200 sampled rows
  (``recall_at_10`` is the index's own figure when it records one; ``recall_at_10_bench`` is always the bench's);
- the 1 % update in the form a user runs after labelling new files: ``twist index NEW.csv --out I --update``
  with a table of the N/100 new rows only (their files exist beside the others);
- ``twist app --index I --no-warm-thumbnails`` on the updated index (no background work beside the requests):
  seconds until ``GET /`` answers, peak RSS (``VmHWM``), each JSON route hit ``--hits`` times on one kept-alive
  connection after one untimed visit (p50/p95 ms, and the server's CPU per request from ``/proc/PID/stat``), the
  Gradio events ``/overview`` and ``/open_cluster`` through gradio_client (the server's answer), and in Chromium
  (playwright) the page until the overview's covers show (every page-load event) and the Cluster tab until
  its first page shows. ``/api/v1/labels`` (every image, not paged) is timed last and apart: it is in neither
  ``api_p95_ms`` nor ``app_peak_rss_mb`` (``app_peak_rss_after_export_mb`` has it).

A step that fails is recorded as ``error`` for that N and the rest goes on. Results merge into
``bench/results/scale.json`` (sizes not run keep their earlier entry); ``--as-before`` stores them under
``before``, the figures later runs are compared with.

    nice -n 5 python -m bench.scale --sizes 10k,100k --as-before
    python -m bench.scale --sizes 1m --generate-only   # the 1M files and tables alone (~2.5 GB, minutes)
    python -m bench.scale --sizes 1m --cache /data/scale-cache
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import REPO, RESULTS, summary_first
from bench.scale_data import MODEL, Spec, disk_mb, ensure_files, write_synthetic_table
from twist_core.io_utils import atomic_write_text

SIZES = {"10k": 10_000, "100k": 100_000, "1m": 1_000_000}
QUERIES, K = 200, 10
TARGETS = {  # issue 39, for 1M images on a 2-core, 24-GB machine
    "index_cpu_s": ("<", 600), "index_peak_rss_mb": ("<", 4096), "recall_at_10": (">=", 0.95),
    "update_share_of_build": ("<", 0.05), "app_start_s": ("<", 60), "app_peak_rss_mb": ("<", 4096),
    "api_p95_ms": ("<", 50), "api_cpu_ms_per_request": ("<", 20), "cluster_page_event_ms": ("<", 1000),
    "cluster_tab_ms": ("<", 1000), "overview_event_ms": ("<", 2000), "page_load_ms": ("<", 2000)}
KEYS = ("index_cpu_s", "index_peak_rss_mb", "recall_at_10", "update_cpu_s", "app_start_s", "app_peak_rss_mb",
        "api_p95_ms")
COMPARED = (*KEYS, "index_disk_mb", "api_cpu_ms_per_request", "overview_event_ms", "cluster_page_event_ms",
            "page_load_ms", "cluster_tab_ms")  # growth factors and the 10k check against 'before'


def twist(*args: str) -> list[str]:
    return [sys.executable, "-m", "twist_core.cli", *args]


def run_measured(command: list[str], log: Path) -> dict[str, float]:
    """Run ``command`` to its end; its own CPU seconds, wall seconds and peak RSS (raises on a non-zero exit)."""
    start = time.perf_counter()
    with open(log, "w") as output:
        child = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, cwd=REPO)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if child.returncode:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"{' '.join(command[2:5])}... exited {child.returncode}: {' | '.join(tail)}")
    return {"cpu_s": round(usage.ru_utime + usage.ru_stime, 2), "wall_s": round(wall, 2),
            "peak_rss_mb": round(usage.ru_maxrss / 1024)}


def index_info(index: Path) -> dict[str, Any]:
    from twist_core.index.metadata import IndexMetadata, meta_path

    meta = IndexMetadata(meta_path(index))
    try:
        return {**meta.info(), "images": meta.count()}
    finally:
        meta.close()


def exact_recall(index: str, table: str, queries: int = QUERIES, seed: int = 0) -> float:
    """recall@10 of the index's search against exact cosine search over every embedding of the table, for
    ``queries`` sampled rows (run in a child process: the index's memory is not the bench's)."""
    from twist_core.index.image_index import IndexReader
    from twist_core.label.table import load_labels
    from twist_core.vectors import normalized

    rows, embeddings, _ = load_labels(Path(table))
    picked = np.sort(np.random.default_rng(seed).choice(len(rows), min(queries, len(rows)), replace=False))
    query = normalized(np.asarray(embeddings[picked], dtype=np.float32))
    best = np.full((len(picked), K), -np.inf, np.float32)
    best_rows = np.zeros((len(picked), K), np.int64)
    for start in range(0, len(rows), 100_000):
        block = normalized(np.asarray(embeddings[start:start + 100_000], dtype=np.float32))
        sims = np.concatenate([best, query @ block.T], axis=1)
        found = np.concatenate([best_rows, np.arange(start, start + len(block))[None].repeat(len(picked), 0)], 1)
        top = np.argpartition(-sims, K, axis=1)[:, :K]
        best, best_rows = np.take_along_axis(sims, top, 1), np.take_along_axis(found, top, 1)
    reader = IndexReader.open(index, "cpu")
    try:
        id_of = reader.ids_for_paths([rows[r]["path"] for r in np.unique(best_rows)])
        truth = [{id_of[rows[r]["path"]] for r in row} for row in best_rows]
        hits = reader.search_vectors(query, K)
    finally:
        reader.close()
    return round(float(np.mean([len(t & {h.id for h in found}) / K for t, found in zip(truth, hits, strict=True)])),
                 4)


def in_child(function: Any, *args: Any) -> Any:
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def measure_index(table: Path, index: Path, logs: Path) -> dict[str, Any]:
    shutil.rmtree(index, ignore_errors=True)
    figures = run_measured(twist("index", str(table), "--out", str(index)), logs / "index.log")
    info = index_info(index)
    result = {"index_cpu_s": figures["cpu_s"], "index_wall_s": figures["wall_s"],
              "index_peak_rss_mb": figures["peak_rss_mb"], "kind": info.get("kind"), "nlist": info.get("nlist"),
              "index_disk_mb": disk_mb(index)}
    result["recall_at_10_bench"] = in_child(exact_recall, str(index), str(table))
    if info.get("recall_at_10") is not None:
        result.update(recall_at_10=float(info["recall_at_10"]), recall_source="twist index")
    else:
        result.update(recall_at_10=result["recall_at_10_bench"], recall_source="bench")
    return result


def measure_update(new_table: Path, index: Path, logs: Path) -> dict[str, Any]:
    figures = run_measured(twist("index", str(new_table), "--out", str(index), "--update"), logs / "update.log")
    return {"update_cpu_s": figures["cpu_s"], "update_wall_s": figures["wall_s"],
            "update_peak_rss_mb": figures["peak_rss_mb"], "update_form": "twist index NEW.csv --update (a table "
            "of the new rows only)", "index_disk_mb_after_update": disk_mb(index),
            "images_after_update": index_info(index)["images"]}


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def peak_rss_mb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024)
    return -1


def timed_gets(port: int, pid: int, path: str, hits: int) -> dict[str, float]:
    """``hits`` GETs of ``path`` on one connection (after one untimed): p50/p95 ms and the server's CPU ms per
    request."""
    tick_ms = 1000 / os.sysconf("SC_CLK_TCK")
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    connection.request("GET", path)  # once untimed: a first visit also makes its page's thumbnails
    connection.getresponse().read()
    times = []
    ticks = cpu_ticks(pid)
    for _ in range(hits):
        start = time.perf_counter()
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        times.append((time.perf_counter() - start) * 1000)
        if response.status != 200:
            raise RuntimeError(f"GET {path}: HTTP {response.status}")
    cpu = (cpu_ticks(pid) - ticks) * tick_ms / hits
    connection.close()
    return {"p50_ms": round(float(np.percentile(times, 50)), 1), "p95_ms": round(float(np.percentile(times, 95)), 1),
            "cpu_ms_per_request": round(cpu, 1), "hits": hits}


def get_json(port: int, path: str) -> Any:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    connection.request("GET", path)
    return json.loads(connection.getresponse().read())


def gradio_events(port: int, pid: int, cluster: int, deep_page: int, hits: int) -> dict[str, Any]:
    """The overview (page-load) event and the Cluster view's page event, through gradio_client (the server's
    answer, without the client downloading the gallery's thumbnails)."""
    from gradio_client import Client

    client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=False, analytics_enabled=False)
    calls = {"overview": lambda: client.predict("size", api_name="/overview"),
             "cluster_page_0": lambda: client.predict(cluster, 0, False, 0, 1, False, api_name="/open_cluster"),
             "cluster_page_deep": lambda: client.predict(cluster, deep_page, False, 0, 1, False,
                                                         api_name="/open_cluster")}
    out = {}
    for name, call in calls.items():
        call()  # the first call also makes the page's thumbnails: timed apart
        times, ticks = [], cpu_ticks(pid)
        for _ in range(hits):
            start = time.perf_counter()
            call()
            times.append((time.perf_counter() - start) * 1000)
        out[name] = {"p50_ms": round(float(np.percentile(times, 50)), 1),
                     "p95_ms": round(float(np.percentile(times, 95)), 1),
                     "cpu_ms_per_event": round((cpu_ticks(pid) - ticks) * 1000 / os.sysconf("SC_CLK_TCK") / hits, 1)}
    client.close()
    return out


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]


def browser_load(port: int, pid: int, loads: int = 3) -> dict[str, Any]:
    """What a person waits for in Chromium: the page until the overview's covers show, then the Cluster tab
    until its first page shows (every page-load event of the app runs in the first)."""
    from playwright.sync_api import expect, sync_playwright

    figures: dict[str, list[float]] = {"page_load": [], "cluster_tab": []}
    ticks = 0
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            for visit in range(loads + 1):  # the first visit is a warm-up (Chromium's start, the covers made)
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                start = time.perf_counter()
                page.goto(f"http://127.0.0.1:{port}/")
                expect(page.locator("#cluster-cards button.thumbnail-item").first).to_be_visible(timeout=600_000)
                loaded = time.perf_counter()
                page.get_by_role("tab", name="Cluster", exact=True).click()
                expect(page.locator("#page-info")).to_contain_text("images", timeout=600_000)
                if visit:
                    figures["page_load"].append((loaded - start) * 1000)
                    figures["cluster_tab"].append((time.perf_counter() - loaded) * 1000)
                page.close()
                if not visit:
                    ticks = cpu_ticks(pid)
        finally:
            browser.close()
    cpu = (cpu_ticks(pid) - ticks) * 1000 / os.sysconf("SC_CLK_TCK") / loads
    return {name: {"p50_ms": round(float(np.percentile(times, 50)), 1), "max_ms": round(max(times), 1)}
            for name, times in figures.items()} | {"server_cpu_ms_per_visit": round(cpu, 1), "visits": loads}


def wait_until_up(port: int, child: subprocess.Popen, limit: float = 1800) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < limit:
        if child.poll() is not None:
            raise RuntimeError(f"twist app exited {child.returncode} while starting")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/")
            if connection.getresponse().status == 200:
                return time.perf_counter() - start
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"twist app did not answer within {limit:.0f} s")


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def measure_app(index: Path, work: Path, hits: int, gradio_hits: int) -> dict[str, Any]:
    port, state = free_port(), work / "app-state"
    shutil.rmtree(state, ignore_errors=True)
    command = twist("app", "--model", str(MODEL), "--index", str(index), "--port", str(port), "--state-dir",
                    str(state), "--no-warm-thumbnails")
    with open(work / "app.log", "w") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        result: dict[str, Any] = {"app_start_s": round(wait_until_up(port, child), 2),
                                  "app_start_rss_mb": peak_rss_mb(child.pid)}
        clusters = get_json(port, "/api/v1/clusters")
        largest = max(clusters, key=lambda c: c["size"])
        cluster, pages = largest["id"], -(-largest["size"] // 60)
        one = get_json(port, f"/api/v1/clusters/{cluster}/images")["images"][0]["id"]
        routes = {"clusters": "/api/v1/clusters", "cluster_page_0": f"/api/v1/clusters/{cluster}/images?page=0",
                  "cluster_page_deep": f"/api/v1/clusters/{cluster}/images?page={pages // 2}",
                  "review": "/api/v1/review?page=0", "review_deep": "/api/v1/review?page=50",
                  "image": f"/api/v1/images/{one}", "search_id": f"/api/v1/search/id/{one}"}
        result["api"] = {name: timed_gets(port, child.pid, path, hits) for name, path in routes.items()}
        slowest = max(result["api"], key=lambda name: result["api"][name]["p95_ms"])
        result.update(api_p95_ms=result["api"][slowest]["p95_ms"], api_slowest_route=routes[slowest],
                      api_cpu_ms_per_request=max(r["cpu_ms_per_request"] for r in result["api"].values()),
                      largest_cluster={"cluster": cluster, "size": largest["size"], "deep_page": pages // 2})
        try:
            result["gradio"] = gradio_events(port, child.pid, cluster, pages // 2, gradio_hits)
            result["overview_event_ms"] = result["gradio"]["overview"]["p95_ms"]
            result["cluster_page_event_ms"] = max(result["gradio"]["cluster_page_0"]["p95_ms"],
                                                  result["gradio"]["cluster_page_deep"]["p95_ms"])
        except Exception as error:  # the JSON figures stand without the UI's
            result["gradio_error"] = f"{type(error).__name__}: {error}"
        try:
            result["browser"] = browser_load(port, child.pid, min(3, hits))
            result["page_load_ms"] = result["browser"]["page_load"]["p50_ms"]
            result["cluster_tab_ms"] = result["browser"]["cluster_tab"]["p50_ms"]
        except Exception as error:  # playwright or Chromium missing: the figures above stand
            result["browser_error"] = f"{type(error).__name__}: {error}"
        result["app_peak_rss_mb"] = peak_rss_mb(child.pid)
        result["labels_export"] = timed_gets(port, child.pid, "/api/v1/labels", 2)
        result["app_peak_rss_after_export_mb"] = peak_rss_mb(child.pid)
        return result
    finally:
        child.send_signal(signal.SIGINT)
        try:
            child.wait(30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def prepare(name: str, n: int, cache: Path) -> tuple[Path, Path, dict[str, Any]]:
    """The files, the table of N rows and the table of the N/100 new rows (made once, then reused)."""
    new = max(1, n // 100)
    start = time.perf_counter()
    root = ensure_files(cache, n + new)
    links_s = time.perf_counter() - start
    tables = cache / "tables" / name
    table = write_synthetic_table(tables / "labels.csv", root, Spec(n, seed=0))
    new_table = write_synthetic_table(tables / "new.csv", root, Spec(new, seed=1, first=n))
    figures = {"n": n, "new_rows": new, "links_s": round(links_s, 1),
               "tables_s": round(time.perf_counter() - start - links_s, 1),
               "table_disk_mb": disk_mb(table, table.with_name("labels.embeddings.npy"))}
    print(f"[{name}] files and tables ready: {figures}", flush=True)
    return table, new_table, figures


def measure_size(name: str, n: int, cache: Path, skip_app: bool = False, hits: int = 50) -> dict[str, Any]:
    """Every figure of one N; a failing step records its ``error`` and the next steps still run when they can."""
    table, new_table, figures = prepare(name, n, cache)
    work = cache / "runs" / name
    work.mkdir(parents=True, exist_ok=True)
    index = work / "index"
    result: dict[str, Any] = {**figures, "errors": {}}
    steps = [("index", lambda: measure_index(table, index, work)),
             ("update", lambda: measure_update(new_table, index, work))]
    if not skip_app:
        steps.append(("app", lambda: measure_app(index, work, hits, min(10, hits))))
    for step, measure in steps:
        if step != "index" and "index" in result["errors"]:
            result["errors"][step] = "skipped: no index"
            continue
        print(f"[{name}] {step} ...", flush=True)
        try:
            result.update(measure())
        except Exception as error:  # one failing step must not lose the others
            result["errors"][step] = f"{type(error).__name__}: {error}"
            print(f"[{name}] {step} failed: {result['errors'][step]}", flush=True)
    if result.get("update_cpu_s") is not None and result.get("index_cpu_s"):
        result["update_share_of_build"] = round(result["update_cpu_s"] / result["index_cpu_s"], 3)
    return result


def met(entry: dict[str, Any]) -> dict[str, Any]:
    checks = {}
    for key, (op, limit) in TARGETS.items():
        value = entry.get(key)
        checks[key] = None if value is None else (value < limit if op == "<" else value >= limit)
    return checks


def growth(entries: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    pairs = [("100k/10k", "100k", "10k"), ("1m/100k", "1m", "100k")]
    out = {}
    for label, big, small in pairs:
        if big in entries and small in entries:
            out[label] = {key: round(entries[big][key] / entries[small][key], 2) for key in COMPARED
                          if entries[big].get(key) and entries[small].get(key)}
    return out


def machine() -> dict[str, Any]:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    return {"cores": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()],
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "commit": commit.stdout.strip(), "python": sys.version.split()[0]}


def summary(entries: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    keys = (*KEYS, "update_share_of_build", "kind", "overview_event_ms", "cluster_page_event_ms", "page_load_ms",
            "cluster_tab_ms")
    return {name: {key: entry.get(key) for key in keys} | {"errors": entry.get("errors") or None}
            for name, entry in entries.items()}


def size_entries(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The per-N entries of a results file (``10k``, ``100k``, ``1m``, or a row count run by hand)."""
    return {key: value for key, value in result.items() if isinstance(value, dict) and "new_rows" in value}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10k,100k,1m", help="comma list of 10k, 100k, 1m (or a row count)")
    parser.add_argument("--cache", default="/tmp/twist-scale", help="folder of the files, tables and indexes")
    parser.add_argument("--skip-app", action="store_true", help="measure only the index and the update")
    parser.add_argument("--hits", type=int, default=50, help="requests per API route")
    parser.add_argument("--out", default=str(RESULTS / "scale.json"), help="results file (merged with its sizes)")
    parser.add_argument("--as-before", action="store_true", help="store these figures under 'before'")
    parser.add_argument("--generate-only", action="store_true", help="only make the files and tables (timed)")
    args = parser.parse_args(argv)
    if args.generate_only:
        for name in args.sizes.split(","):
            prepare(name, SIZES.get(name) or int(name), Path(args.cache))
        return 0
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.is_file() else {}
    entries = result.get("before", {}) if args.as_before else size_entries(result)
    for name in args.sizes.split(","):
        n = SIZES.get(name) or int(name)
        entries[name] = measure_size(name, n, Path(args.cache), args.skip_app, args.hits)
        entries[name].update(targets_met=met(entries[name]), machine=machine())
        print(json.dumps(summary({name: entries[name]}), indent=1), flush=True)
    if args.as_before:
        result["before"] = entries
    else:
        result.update(entries)
    current = size_entries(result)
    result.update(notes="Issue 39 scale bench (python -m bench.scale); the targets are for 1M images; CPU "
                        "seconds are the figures to compare on a shared machine. 'before' = main before issue 39.",
                  scale_summary=summary(current), before_summary=summary(result.get("before", {})),
                  growth=growth(current), growth_before=growth(result.get("before", {})),
                  targets={key: f"{op} {limit}" for key, (op, limit) in TARGETS.items()}, machine=machine())
    if "10k" in current and "10k" in result.get("before", {}):
        old, new = result["before"]["10k"], current["10k"]
        result["10k_vs_before"] = {key: round(new[key] / old[key], 2) for key in COMPARED
                                   if old.get(key) and new.get(key)}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(summary_first(result), indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
