"""Benchmark ``twist label`` against model-only inference, and its peak memory at 10k versus 50k images.

Model: a freshly built (random init) ResNet-18, width 32, small stem, 32 px, K = 10, exported to ONNX.
Random weights cost the same time as trained ones. Figures, all on the same machine in the same run:
  * label images/s: the whole pipeline (decode in workers + onnxruntime + chunk commits), 10k CIFAR JPEGs;
  * PyTorch eager and onnxruntime model-only images/s on the same pre-decoded tensors;
  * pipeline / model-only ratio (1.0 = decoding costs nothing); peak RSS labelling 10k vs 50k images.
Usage: python -m bench.bench_label [--data ../shared/data] [--out bench/results/label.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import REPO


def extract(archive: Path, destination: Path) -> Path:
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(destination, filter="data")
    return destination


def make_model(workdir: Path) -> Path:
    import torch

    from twist_core.deploy.export import ExportConfig, export_model
    from twist_core.model.checkpoint import save_checkpoint
    from twist_core.model.network import ModelSpec, TwistModel
    from twist_core.train.options import TrainConfig

    torch.manual_seed(0)
    spec = ModelSpec(backbone="resnet18", width=32, small_stem=True, n_classes=10, tau=0.5)
    config = dataclasses.asdict(TrainConfig(image_size=32, width=32, small_stem=True, classes=10))
    save_checkpoint(workdir / "run" / "last.pt", {"model": TwistModel(spec).eval().state_dict(),
                                                  "model_spec": dataclasses.asdict(spec), "config": config,
                                                  "epoch": 0})
    return export_model(ExportConfig(run=str(workdir / "run"), out=str(workdir / "bench.onnx")))


def model_only(model_path: Path, folder: Path, batch_size: int = 64) -> dict[str, float]:
    """Decode once, then time PyTorch eager and onnxruntime on the same float32 batches."""
    import torch

    from twist_core.data.folder import scan_folder
    from twist_core.deploy.infer import OnnxModel, physical_cores
    from twist_core.model.checkpoint import load_checkpoint
    from twist_core.model.network import ModelSpec, TwistModel

    onnx_model = OnnxModel(model_path, device="cpu")
    files = scan_folder(folder)
    start = time.perf_counter()
    crops = np.stack([onnx_model.transform.crop(onnx_model.load(folder / f)) for f in files])
    decode_s = time.perf_counter() - start
    normalize = onnx_model.transform.normalize
    batches = [normalize(crops[i:i + batch_size]) for i in range(0, len(crops), batch_size)]

    start = time.perf_counter()
    for batch in batches:
        onnx_model.predict_arrays(batch)
    onnx_s = time.perf_counter() - start

    torch.set_num_threads(physical_cores())
    checkpoint = load_checkpoint(model_path.parent / "run")
    model = TwistModel(ModelSpec(**checkpoint["model_spec"]))
    model.load_state_dict(checkpoint["model"])
    model = model.eval().to(memory_format=torch.channels_last)
    with torch.inference_mode():
        model(torch.from_numpy(batches[0]).contiguous(memory_format=torch.channels_last))  # warm-up
        start = time.perf_counter()
        for batch in batches:
            _, logits = model(torch.from_numpy(batch).contiguous(memory_format=torch.channels_last))
            torch.softmax(logits / model.spec.tau, -1)
        torch_s = time.perf_counter() - start
    n = len(files)
    return {"images": n, "decode_only_img_s": n / decode_s, "onnxruntime_img_s": n / onnx_s,
            "pytorch_eager_img_s": n / torch_s}


def label_child(model_path: str, folder: str, out: str) -> None:
    """Runs in its own process so that its peak memory is its own."""
    from twist_core.label.labeller import LabelConfig, label_folder

    start = time.perf_counter()
    summary = label_folder(LabelConfig(model=model_path, folder=folder, out=out, progress=False))
    wall = time.perf_counter() - start
    self_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    workers_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"images": summary["rows"], "label_loop_img_s": summary["images_per_s"],
                      "end_to_end_img_s": summary["rows"] / wall, "wall_s": wall,
                      "peak_rss_main_mib": self_kib / 1024, "peak_rss_worker_mib": workers_kib / 1024}))


def run_label(model_path: Path, folder: Path, out: Path) -> dict[str, float]:
    result = subprocess.run([sys.executable, __file__, "--child", str(model_path), str(folder), str(out)],
                            capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "label.json"))
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        label_child(*args.child)
        return
    with tempfile.TemporaryDirectory(prefix="bench_label_") as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        test = extract(Path(args.data) / "cifar10-test.tar.gz", work / "test")
        train = extract(Path(args.data) / "cifar10-train.tar.gz", work / "train")
        print(f"extracted 60,000 JPEGs in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        model_path = make_model(work)
        baseline = model_only(model_path, test)
        label_10k = run_label(model_path, test, work / "l10k.csv")
        label_50k = run_label(model_path, train, work / "l50k.parquet")
    from twist_core.deploy.infer import physical_cores

    results = {
        "machine": f"{physical_cores()} physical CPU cores, no GPU",
        "model": "ResNet-18 width 32, small stem, 32 px, K=10, random init (speed is independent of weights)",
        "model_only_10k": baseline, "label_10k": label_10k, "label_50k": label_50k,
        "onnx_over_eager": baseline["onnxruntime_img_s"] / baseline["pytorch_eager_img_s"],
        "label_over_eager": label_10k["label_loop_img_s"] / baseline["pytorch_eager_img_s"],
        "pipeline_over_model_only": label_10k["label_loop_img_s"] / baseline["onnxruntime_img_s"],
        "peak_rss_ratio_50k_over_10k": label_50k["peak_rss_main_mib"] / label_10k["peak_rss_main_mib"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    rows = [("PyTorch eager, model only (img/s)", baseline["pytorch_eager_img_s"]),
            ("onnxruntime, model only (img/s)", baseline["onnxruntime_img_s"]),
            ("decode only, 1 process (img/s)", baseline["decode_only_img_s"]),
            ("twist label 10k, labelling loop (img/s)", label_10k["label_loop_img_s"]),
            ("twist label 10k, end to end (img/s)", label_10k["end_to_end_img_s"]),
            ("onnxruntime / eager", results["onnx_over_eager"]),
            ("twist label / eager", results["label_over_eager"]),
            ("pipeline / model-only (target >= 0.8)", results["pipeline_over_model_only"]),
            ("peak RSS main, 10k (MiB)", label_10k["peak_rss_main_mib"]),
            ("peak RSS main, 50k (MiB)", label_50k["peak_rss_main_mib"]),
            ("peak RSS decode worker, 10k / 50k (MiB)",
             f"{label_10k['peak_rss_worker_mib']:.0f} / {label_50k['peak_rss_worker_mib']:.0f}")]
    for name, value in rows:
        print(f"{name:<44} {value:>10.2f}" if isinstance(value, float) else f"{name:<44} {value:>10}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
