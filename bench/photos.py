"""Photo folders on a CPU: which backbone and size cluster caltech20 best in a fixed wall-clock budget.

Each configuration is a real `twist train --time-budget` run on caltech20 (1,891 photos, K = 20, the folder is
also the evaluation set, as clustering papers do), then `twist eval`. Runs are serialised with `flock` on a
lock file so timings are not disturbed by other benchmarks. A run folder that already holds eval.json is only
collected, so runs made earlier (e.g. by a queue of `run_one.sh` jobs with the same names) count.
Also measured: JPEG decoding with and without Pillow's draft mode (caltech20 and a synthetic 3000 x 4000
photo), `twist label` with the best run's model, and a short training run with and without the allocator
setting of twist_core.train.allocator.

Usage: python -m bench.photos [--runs DIR] [--data DIR] [--collect-only] [--budget 15m] [--only NAME,...]
                              [--decode] [--label] [--allocator]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from bench.common import REPO, RESULTS, extract, machine, save

# name -> (what it is, `twist train` options); the names match the run folders of the benchmark queue.
CONFIGS: dict[str, tuple[str, list[str]]] = {
    "cal_r18_224": ("ResNet-18 width 16 at 224 px (the CPU default before this benchmark)",
                    ["--backbone", "resnet18", "--image-size", "224"]),
    "cal_r18_112": ("ResNet-18 width 16 at 112 px", ["--backbone", "resnet18", "--image-size", "112"]),
    "cal_patches64": ("frozen patch stem + MLP head at 64 px", ["--backbone", "patches", "--image-size", "64"]),
    "cal_patches96": ("frozen patch stem + MLP head at 96 px", ["--backbone", "patches", "--image-size", "96"]),
    "cal_pconv64": ("frozen patch stem + trainable conv stage at 64 px",
                    ["--backbone", "patches-conv", "--image-size", "64"]),
    "cal_patches64_fix": ("frozen patch stem + MLP head at 64 px, rerun with the allocator fix",
                          ["--backbone", "patches", "--image-size", "64"]),
    "cal_pconv96": ("frozen patch stem + trainable conv stage at 96 px",
                    ["--backbone", "patches-conv", "--image-size", "96"]),
    "cal_default_final": ("the default as shipped: `twist train PHOTOS --classes 20` with no backbone or size "
                          "options (auto: patches at 64 px)", []),
}
METRICS = ("acc", "nmi", "ari", "knn_acc")


def twist(*args: str) -> list[str]:
    return [sys.executable, "-m", "twist_core.cli", *args]


def locked(command: list[str], lock: Path) -> list[str]:
    return ["flock", str(lock), *command]


def train_and_evaluate(name: str, options: list[str], data: Path, runs: Path, budget: str, lock: Path) -> None:
    """One benchmark run holding the lock for training and evaluation together."""
    run = runs / name
    script = (f"rm -rf {run} && {' '.join(twist('train', str(data), '--out', str(run), '--classes', '20'))} "
              f"--time-budget {budget} --eval-data {data} --no-progress {' '.join(options)} && "
              f"{' '.join(twist('eval', str(run), str(data), '--json', str(run / 'eval.json')))}")
    print(f"$ {script}", flush=True)
    subprocess.run(locked(["bash", "-c", script], lock), check=True, cwd=REPO,
                   env={**os.environ, "PYTHONPATH": str(REPO)})


def collect(name: str, description: str, run: Path) -> dict | None:
    """The table row of one finished run folder, or None when it has no eval.json yet."""
    if not (run / "eval.json").exists():
        return None
    report = json.loads((run / "eval.json").read_text())
    config = json.loads((run / "config.json").read_text())
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    trained = [row for row in history if "images_per_s" in row]
    curve = [{"epoch": row["epoch"], "run_seconds": round(row.get("run_seconds", 0.0), 1),
              **{m: round(row["eval"][m], 4) for m in METRICS if m in row["eval"]}}
             for row in history if row.get("eval")]
    return {
        "name": name, "what": description, "backbone": config["backbone"], "image_size": config["image_size"],
        "width": config["width"], "budget": config.get("time_budget"), "epochs": trained[-1]["epoch"],
        "images_per_s": round(sum(r["images_per_s"] for r in trained) / len(trained), 1),
        **{m: round(report[m], 4) for m in METRICS},
        "kmeans_pixels": {m: round(v, 4) for m, v in report["baselines"]["kmeans_pixels"].items()},
        "knn_over_run": curve,
    }


def decode_rate(paths: list[Path], draft_size: int | None, resize: int, repeat: int = 1) -> float:
    """Images per second of decode + resize + centre crop, as training and labelling prepare an image."""
    from twist_core.data.folder import decode_image, resize_center_crop

    started = time.perf_counter()
    for _ in range(repeat):
        for path in paths:
            resize_center_crop(decode_image(path, draft_size=draft_size), resize)
    return round(repeat * len(paths) / (time.perf_counter() - started), 1)


def synthetic_photo(path: Path, width: int = 4000, height: int = 3000) -> Path:
    """A 12-megapixel JPEG with smooth shading and fine texture, as a phone photo has."""
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([128 + 90 * np.sin(xx / 400 + c) * np.cos(yy / 300 - c) for c in (0.0, 1.0, 2.0)], -1)
    texture = rng.normal(0, 12, (height, width, 1)).astype(np.float32)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(base + texture, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    path.write_bytes(buffer.getvalue())
    return path


def measure_decoding(data: Path, workdir: Path, lock: Path) -> dict:
    """Decode rates with and without draft mode at the 64 px and 224 px training sizes (decode sizes 64, 256)."""
    photos = sorted(data.rglob("*.jpg"))[::4]
    big = [synthetic_photo(workdir / "synthetic_4000x3000.jpg")]
    result: dict = {"note": "one process, decode + resize + centre crop, images/s"}
    with holding(lock):
        for label, paths, repeat in (("caltech20 (every 4th photo)", photos, 2), ("synthetic 4000x3000 JPEG", big, 5)):
            result[label] = {f"{size} px": {"full": decode_rate(paths, None, size, repeat),
                                            "draft": decode_rate(paths, size, size, repeat)} for size in (64, 256)}
        result["load_average"] = os.getloadavg()[0]
    return result


@contextlib.contextmanager
def holding(lock: Path) -> Iterator[None]:
    """The benchmark lock, so no other timed run shares the CPU."""
    with open(lock, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield  # released when the file closes


def training_rusage(code: str) -> dict:
    """Wall, user and system seconds of a child process running ``code``, and the images/s it logged."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"wall_s": round(time.perf_counter() - started, 1), "user_s": round(after.ru_utime - before.ru_utime, 1),
            "sys_s": round(after.ru_stime - before.ru_stime, 1)}


def measure_allocator(data: Path, workdir: Path, lock: Path, seconds: int = 60) -> dict:
    """The same short patches run at 64 px with glibc's default thresholds and with keep_freed_memory()."""
    result = {}
    for label, call in (("default allocator", ""), ("keep_freed_memory", "keep_freed_memory(); ")):
        run = workdir / f"allocator_{label.replace(' ', '_')}"
        code = (f"from twist_core.train.allocator import keep_freed_memory; {call}"
                "from twist_core.train.loop import train; from twist_core.train.options import TrainConfig; "
                f"train(TrainConfig(data={str(data)!r}, out={str(run)!r}, classes=20, backbone='patches', "
                f"image_size=64, time_budget='{seconds}s', progress=False))")
        subprocess.run(["rm", "-rf", str(run)], check=True)
        with holding(lock):
            usage = training_rusage(code)
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        usage["images_per_s"] = round(sum(r["images_per_s"] for r in rows) / len(rows), 1)
        result[label] = usage
    return result


def measure_labelling(run: Path, data: Path, workdir: Path, lock: Path) -> dict:
    """Export the best run and time `twist label` over the whole photo folder (decoding included)."""
    model = workdir / "label_bench" / "model.onnx"
    subprocess.run(twist("export", str(run), "--out", str(model)), check=True, cwd=REPO, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    table = workdir / "label_bench" / "labels.csv"
    n_images = sum(1 for _ in data.rglob("*.jpg"))
    with holding(lock):
        started = time.perf_counter()
        subprocess.run(twist("label", str(model), str(data), "--out", str(table), "--overwrite", "--no-progress"),
                       check=True, cwd=REPO, capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        seconds = time.perf_counter() - started
    return {"run": run.name, "images": n_images, "seconds": round(seconds, 1),
            "images_per_s": round(n_images / seconds, 1), "note": "whole command: start-up, decode, ONNX, write"}


def print_table(rows: list[dict]) -> None:
    print(f"{'run':<14} {'backbone':<13} {'px':>4} {'img/s':>6} {'epochs':>6}  ACC    NMI    ARI    kNN")
    for row in rows:
        print(f"{row['name']:<14} {row['backbone']:<13} {row['image_size']:>4} {row['images_per_s']:>6} "
              f"{row['epochs']:>6}  {row['acc']:.3f}  {row['nmi']:.3f}  {row['ari']:.3f}  {row['knn_acc']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default=None, help="run folders live here (default: WORKDIR/runs)")
    parser.add_argument("--data", default=None, help="caltech20 class folders (default: extract ../shared/data)")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a new temporary folder)")
    parser.add_argument("--budget", default="15m")
    parser.add_argument("--lock", default="/tmp/bench.lock", help="flock file that serialises benchmark runs")
    parser.add_argument("--only", default=None, help="comma-separated configuration names")
    parser.add_argument("--collect-only", action="store_true", help="only read the run folders that exist")
    parser.add_argument("--decode", action="store_true", help="also measure JPEG decoding with and without draft")
    parser.add_argument("--label", action="store_true", help="also time `twist label` with the best run's model")
    parser.add_argument("--allocator", action="store_true", help="also time a 60 s run with/without the setting")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="twist_photos_"))
    workdir.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else extract("caltech20.tar.gz", workdir)
    runs = Path(args.runs) if args.runs else workdir / "runs"
    names = args.only.split(",") if args.only else list(CONFIGS)
    previous = json.loads((RESULTS / "photos.json").read_text()) if (RESULTS / "photos.json").exists() else {}
    rows = {row["name"]: row for row in previous.get("runs", [])}
    for name in names:
        description, options = CONFIGS[name]
        if not args.collect_only and not (runs / name / "eval.json").exists():
            train_and_evaluate(name, options, data, runs, args.budget, Path(args.lock))
        row = collect(name, description, runs / name)
        if row:
            rows[name] = row
    result = {**previous, "machine": machine(), "data": "caltech20 (1,891 photos, 20 classes), K = 20",
              "runs": sorted(rows.values(), key=lambda row: -row["nmi"])}
    if args.decode:
        result["decode_images_per_s"] = measure_decoding(data, workdir, Path(args.lock))
    if args.label and result["runs"]:
        result["label_images_per_s"] = measure_labelling(runs / result["runs"][0]["name"], data, workdir,
                                                         Path(args.lock))
    if args.allocator:
        result["allocator_60s_patches_64px"] = measure_allocator(data, workdir, Path(args.lock))
    print_table(result["runs"])
    print(f"results: {save('photos', result)}")


if __name__ == "__main__":
    main()
