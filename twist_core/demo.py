"""``twist demo``: the whole product on a real data set that ships inside scikit-learn, with nothing downloaded.

Writes the 1,797 handwritten digits as 16 px PNGs in class folders (the folder names are used for the score
only), then runs the real commands one after another: train -> export -> label -> index -> eval, and opens
the app on the result.

The training is a fixed recipe (the patches backbone at 16 px, fp32, a fixed number of epochs and seed), not a
time budget: a busy or slow machine takes longer but reaches the same clusters, so the ACC it prints is the one
announced at the start, on any machine.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from twist_core.config import AutoConfig, option
from twist_core.io_utils import atomic_write_text, file_sha256
from twist_core.layout import CHECKPOINT_FILE, DONE_FILE

DIGIT_SIZE = 16  # 2x the original 8 x 8: trains 4x faster than 32 px and loses nothing
DEMO_EPOCHS = 30
# What the fixed recipe (DEMO_EPOCHS, seed 0, K 10) gives: ACC 0.933 / NMI 0.878 / ARI 0.861, measured on this
# project's 2-core CPU machine while other work kept it busy (2026-12-07), training in 141 s there (2m43s in all).
EXPECTED_ACC = 0.933
EXPECTED_TRAINING = "2 to 3 minutes"


@dataclass
class DemoConfig(AutoConfig):
    workspace: str = option("twist-demo", "folder for the digits, the run, the model, the labels and the index")
    epochs: int = option(DEMO_EPOCHS, f"training epochs: a fixed length, so that every machine gets the same result "
                                      f"(ACC about {EXPECTED_ACC} with {DEMO_EPOCHS})")
    classes: int = option(10, "number of clusters to discover")
    app: bool = option(True, "open the web app at the end (--no-app to stop after the report)")
    port: int = option(7860, "port of the web app on 127.0.0.1")
    seed: int = option(0, "random seed")


def write_digits(root: Path) -> Path:
    """scikit-learn's 8 x 8 digits, upscaled to 16 x 16 greyscale PNGs in ``root/<digit>/``; idempotent."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    done = root / ".complete"
    if done.exists():
        return root
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray((255 - pixels * 255 / 16).astype(np.uint8), mode="L")  # dark ink on white
        image.resize((DIGIT_SIZE, DIGIT_SIZE), Image.Resampling.BICUBIC).save(folder / f"{index:04d}.png")
    done.write_text("ok\n")
    return root


def label_and_index(model: Path, images: Path, workspace: Path, progress: bool = True) -> tuple[Path, Path]:
    """``twist label`` then ``twist index``: the table beside the index, as the app expects."""
    from twist_core.index.build import IndexConfig, build_index
    from twist_core.label.labeller import LabelConfig, label_folder

    labels = workspace / "labels.csv"
    label_folder(LabelConfig(model=str(model), folder=str(images), out=str(labels), overwrite=True,
                             progress=progress))
    index = build_index(IndexConfig(source=str(labels), model=str(model), out=str(workspace / "index")))
    return labels, index


def prepare_demo_index(model: Path) -> Path:
    """The digits labelled and indexed with the shipped demo model, built once into the user's cache."""
    import os


    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "twist" / "demo-app"
    stamp = cache / "model.sha256"
    digest = file_sha256(model)
    index = cache / "index"
    if not (stamp.exists() and stamp.read_text() == digest and (index / "manifest.json").exists()):
        print(f"preparing the demo: labelling and indexing the digits in {cache} (once)", file=sys.stderr)
        label_and_index(model, write_digits(cache / "digits"), cache, progress=False)
        atomic_write_text(stamp, digest)
    return index


def step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def run_demo(config: DemoConfig) -> dict:
    from twist_core.deploy.export import ExportConfig, export_model
    from twist_core.evaluation.evaluate import EvalConfig, evaluate, format_report
    from twist_core.train.loop import train
    from twist_core.train.options import TrainConfig

    workspace = Path(config.workspace).resolve()
    print(f"workspace: {workspace} (digits, run, model, labels, index; remove it with: rm -rf {workspace})")
    recipe = f"{DEMO_EPOCHS} epochs, seed 0, 10 classes"
    if (config.epochs, config.seed, config.classes) == (DEMO_EPOCHS, 0, 10):
        print(f"expect ACC about {EXPECTED_ACC:.2f} on any machine: the recipe is fixed ({recipe}); training "
              f"takes {EXPECTED_TRAINING} on a 2-core CPU, longer on a busy one (the bar shows the time left)")
    else:
        print(f"the recipe that gives ACC about {EXPECTED_ACC:.2f} on any machine is {recipe}; this run differs")
    timings: dict[str, float] = {}
    began = step("1/5 writing scikit-learn's handwritten digits as an image folder")
    digits = write_digits(workspace / "digits")
    timings["data"] = time.perf_counter() - began

    began = step(f"2/5 twist train ({config.epochs} epochs)")
    run = workspace / "run"
    if (run / DONE_FILE).exists():  # a finished earlier demo: train again from scratch
        shutil.rmtree(run)
    train(TrainConfig(data=str(digits), out=str(run), classes=config.classes, epochs=config.epochs,
                      backbone="patches", image_size=DIGIT_SIZE, precision="fp32", seed=config.seed,
                      resume=(run / CHECKPOINT_FILE).exists()))
    timings["train"] = time.perf_counter() - began

    began = step("3/5 twist export")
    model = export_model(ExportConfig(run=str(run), out=str(workspace / "model" / "digits.onnx")))
    timings["export"] = time.perf_counter() - began

    began = step("4/5 twist label + twist index")
    labels, index = label_and_index(model, digits, workspace)
    timings["label_index"] = time.perf_counter() - began

    began = step("5/5 twist eval against the true digits")
    report = evaluate(EvalConfig(source=str(model), data=str(digits), json=str(workspace / "eval.json")))
    timings["eval"] = time.perf_counter() - began
    print(format_report(report))
    summary = {"workspace": str(workspace), "model": str(model), "index": str(index), "labels": str(labels),
               "acc": report["acc"], "nmi": report["nmi"], "ari": report["ari"],
               "kmeans_pixels": report["baselines"]["kmeans_pixels"], "seconds": timings}
    atomic_write_text(workspace / "demo.json", json.dumps(summary, indent=2) + "\n")
    return summary
