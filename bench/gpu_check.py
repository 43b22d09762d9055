"""The GPU check of issue 11, in about 8 minutes on one H100/H200: training speed, data-wait share, quality, ONNX.

1. ResNet-18 TWIST training steps on cifar10-train with the GPU defaults (bf16, channels-last), without and with
   ``torch.compile``: images/s and the share of step time spent waiting for data.
2. A ``--time-budget`` run (default 6 minutes) on cifar10-train, scored on cifar10-test (target ACC >= 0.85).
3. ONNX labelling of cifar10-test with the CUDA provider against the CPU provider, images/s.
4. (``--parts overcluster``, issue 14) ResNet-18 with K = 10 and K = 30 trained side by side on the one GPU on
   cifar10-test for the same budget, then scored by ``python -m bench.merge --another-seed``: the K = 30 run merged down
   to 10 by the suggestions, without labels, against the K = 10 run (its merge.json is written beside --out).
Each part that cannot run (a missing package, no GPU) is recorded as skipped with the reason, never guessed.
Writes bench/results/gpu.json (or --out). Run through bench/gpu_check.sh, which installs what is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import subprocess
import sys
import tarfile
import time
import traceback
from pathlib import Path

from bench.common import REPO, subset_folder
from twist_core.io_utils import atomic_write_text


def extract(archive: Path, destination: Path) -> Path:
    """Extract a CIFAR archive once; returns its class-folder root."""
    if not archive.exists():
        raise SystemExit(f"{archive} not found: give the folder holding cifar10-train.tar.gz and cifar10-test.tar.gz")
    with tarfile.open(archive) as tar:
        root = destination / tar.next().name.split("/")[0]
        if not (root / ".complete").exists():
            tar.extractall(destination, filter="data")
            (root / ".complete").write_text("ok\n")
    return root


def twist(*args: str, log: Path) -> None:
    """Run one `twist` command; its output goes to ``log`` (shown when it fails)."""
    with open(log, "w") as handle:
        result = subprocess.run([sys.executable, "-m", "twist_core.cli", *args], cwd=REPO, stdout=handle,
                                stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise RuntimeError(f"twist {args[0]} failed ({result.returncode}): {log.read_text()[-1500:]}")


def training_speed(data: Path, workdir: Path, device: str, compile_model: bool, batch: int, steps: int) -> dict:
    """Time real training steps (the project's own set-up and step) and the wait for each batch of data."""
    import torch

    from twist_core import distributed
    from twist_core.train.loop import step_loss
    from twist_core.train.options import TrainConfig
    from twist_core.train.run import setup_run

    warmup = 10 if compile_model else 3
    folder = subset_folder(data, batch * (warmup + steps), workdir)
    out = workdir / f"speed_{'compiled' if compile_model else 'eager'}"
    config = TrainConfig(data=str(folder), out=str(out), classes=10, backbone="resnet18", batch_size=batch,
                         epochs=1, device=device, compile=compile_model, progress=False, checkpoint_every=0,
                         workers=8, self_label_fraction=0.0)
    ctx = distributed.setup(device)
    run = setup_run(config, ctx)
    run.train_model.train()
    order = torch.randperm(len(run.files)).tolist()
    sync = torch.cuda.synchronize if ctx.device.type == "cuda" else (lambda: None)
    waited = total = 0.0
    for step in range(warmup + steps):
        began = time.perf_counter()
        indices = torch.tensor(order[(step * batch) % len(order):][:batch])
        images = run.cache[indices].to(ctx.device, non_blocking=True)  # the RAM cache, as twist train uses it
        sync()
        got_data = time.perf_counter()
        loss, _, _ = step_loss(run, images, run.schedule().at(step))
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        sync()
        if step >= warmup:
            waited += got_data - began
            total += time.perf_counter() - began
    return {"images_per_s": steps * batch / total, "data_wait_share": waited / total, "batch": batch,
            "timed_steps": steps, "compile": compile_model, "precision": run.config.precision,
            "channels_last": run.config.channels_last, "width": run.config.width}


def quality(train: Path, test: Path, workdir: Path, device: str, budget: str) -> dict:
    run = workdir / "quality_run"
    twist("train", str(train), "--out", str(run), "--classes", "10", "--backbone", "resnet18", "--time-budget",
          budget, "--device", device, "--no-progress", "--eval-data", str(test), "--eval-every", "10",
          log=workdir / "quality_train.log")
    twist("eval", str(run), str(test), "--json", str(workdir / "quality_eval.json"), "--device", device,
          log=workdir / "quality_eval.log")
    report = json.loads((workdir / "quality_eval.json").read_text())
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    trained = [row for row in history if "images_per_s" in row]
    return {"budget": budget, **{m: report[m] for m in ("acc", "nmi", "ari", "knn_acc", "clusters_in_use")},
            "target_acc": 0.85, "epochs": trained[-1]["epoch"], "steps": trained[-1]["step"],
            "images_per_s_mean": sum(r["images_per_s"] for r in trained) / len(trained),
            "eval_curve": [{"epoch": row["epoch"], **{m: row["eval"].get(m) for m in ("acc", "nmi", "knn_acc")}}
                           for row in history if row.get("eval")],
            "run": str(run)}


def onnx_labelling(run: Path, test: Path, workdir: Path, n_images: int) -> dict:
    model = workdir / "model.onnx"
    twist("export", str(run), "--out", str(model), log=workdir / "export.log")
    folder = subset_folder(test, n_images, workdir)
    rows = {}
    for device in ("cuda", "cpu"):
        out = workdir / f"labels_{device}.csv"
        began = time.perf_counter()
        try:
            twist("label", str(model), str(folder), "--out", str(out), "--device", device, "--overwrite",
                  "--no-progress", "--batch-size", "256", log=workdir / f"label_{device}.log")
        except RuntimeError as error:  # e.g. no CUDA provider in this onnxruntime
            rows[device] = {"skipped": str(error).strip().splitlines()[-1][:300]}
            continue
        rows[device] = {"images_per_s": n_images / (time.perf_counter() - began), "images": n_images}
    return rows


def over_clustering(test: Path, workdir: Path, device: str, budget: str) -> dict:
    """K = 10 and K = 30 ResNet-18 runs trained at once (each gets half the GPU, the same for both), then merged
    and scored by python -m bench.merge, whose merge.json (with the other entries kept) is copied beside the results."""
    runs = {k: workdir / f"over_k{k}" for k in (10, 30)}
    with contextlib.ExitStack() as logs:
        started = {}
        for k, run in runs.items():
            log = logs.enter_context(open(workdir / f"over_k{k}_train.log", "w"))
            started[k] = subprocess.Popen(
                [sys.executable, "-m", "twist_core.cli", "train", str(test), "--out", str(run), "--classes", str(k),
                 "--backbone", "resnet18", "--time-budget", budget, "--device", device, "--no-progress",
                 "--workers", "4"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        for k, process in started.items():
            if process.wait() != 0:
                tail = (workdir / f"over_k{k}_train.log").read_text()[-1500:]
                raise RuntimeError(f"twist train K={k} failed: {tail}")
    name = f"resnet18_{device}"
    with open(workdir / "over_merge.log", "w") as log:
        subprocess.run([sys.executable, "-m", "bench.merge", "--another-seed", name, "--k10-run", str(runs[10]),
                        "--k30-run", str(runs[30]), "--data", str(test), "--work", str(workdir / "merge"),
                        "--bootstrap", "100"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True)
    entry = json.loads((REPO / "bench" / "results" / "merge.json").read_text())["other_seeds"][name]
    return {"budget_each": budget, "trained_side_by_side": True,
            "epochs": {key: recipe["epochs_trained"] for key, recipe in entry["recipes"].items()},
            **{key: entry[key] for key in ("k10", "k30", "k30_merged", "k30_oracle_merge_upper_bound", "k_estimate")}}


def part(results: dict, name: str, function, *args) -> None:
    """Run one part; a failure is recorded with its reason and the check goes on."""
    began = time.perf_counter()
    print(f"== {name}", flush=True)
    try:
        results[name] = {**function(*args), "seconds": time.perf_counter() - began}
    except Exception as error:  # report, never guess a figure
        results[name] = {"skipped": f"{type(error).__name__}: {error}"[:2000], "seconds": time.perf_counter() - began}
        traceback.print_exc()
    print(json.dumps(results[name], indent=2)[:1500], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cifar", type=Path, help="folder holding cifar10-train.tar.gz and cifar10-test.tar.gz")
    parser.add_argument("--device", default="cuda", help="cuda (the check) or cpu (a rehearsal)")
    parser.add_argument("--budget", default="6m", help="time budget of the quality run")
    parser.add_argument("--batch", type=int, default=512, help="batch of the speed measurement")
    parser.add_argument("--steps", type=int, default=20, help="timed steps of the speed measurement")
    parser.add_argument("--label-images", type=int, default=10_000)
    parser.add_argument("--parts", default="speed,quality,onnx",
                        help="comma-separated parts to run: speed, quality, onnx (needs quality), overcluster")
    parser.add_argument("--over-budget", default="3m30s", help="time budget of each over-clustering run")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/twist_gpu_check"))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gpu.json")
    args = parser.parse_args()
    import torch

    args.workdir.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict = {"machine": {"python": platform.python_version(), "torch": torch.__version__,
                                 "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
                                 "device_asked": args.device},
                     "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    parts = set(args.parts.split(","))
    test = extract(args.cifar / "cifar10-test.tar.gz", args.workdir)
    # The speed parts time steps, not learning: cifar10-test serves when the training archive was not brought.
    has_train = (args.cifar / "cifar10-train.tar.gz").exists() or "quality" in parts
    train = extract(args.cifar / "cifar10-train.tar.gz", args.workdir) if has_train else test
    results["speed_data"] = train.name
    if "overcluster" in parts:
        part(results, "overcluster", over_clustering, test, args.workdir, args.device, args.over_budget)
        merged = REPO / "bench" / "results" / "merge.json"
        atomic_write_text(args.out.parent / "merge.json", merged.read_text())
        atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")  # kept should a later part run out of time
    if "speed" in parts:
        part(results, "speed_eager", training_speed, train, args.workdir, args.device, False, args.batch, args.steps)
        part(results, "speed_compiled", training_speed, train, args.workdir, args.device, True, args.batch,
             args.steps)
    if "quality" in parts:
        part(results, "quality", quality, train, test, args.workdir, args.device, args.budget)
    if "onnx" in parts and "run" in results.get("quality", {}):
        part(results, "onnx_labelling", onnx_labelling, Path(results["quality"]["run"]), test, args.workdir,
             args.label_images)
    results["total_seconds"] = time.perf_counter() - started
    atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")
    print(f"results: {args.out} ({results['total_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
