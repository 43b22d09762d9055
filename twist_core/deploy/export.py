"""``twist export RUN --out M.onnx``: one self-describing ONNX file plus a JSON model card beside it.

The graph is backbone + head + softmax(logits / tau) in eval mode with outputs ``embedding`` and ``probs``;
batch, height and width are dynamic. The card (preprocessing contract, K, class names, training config,
checkpoint hash) goes into the ONNX metadata and into ``M.json``. Export checks itself: the same 16 images
through PyTorch and onnxruntime must agree within the tolerance, or no model is written.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from twist_core import __version__
from twist_core.config import AutoConfig, option
from twist_core.data.folder import ImageReadError, scan_folder
from twist_core.data.preprocess import Preprocess, card_fields
from twist_core.deploy.infer import CARD_KEY, create_session
from twist_core.errors import UserError
from twist_core.io_utils import atomic_write, atomic_write_text, file_sha256
from twist_core.layout import CHECKPOINT_FILE, CLASS_NAMES_FILE
from twist_core.model.checkpoint import load_checkpoint
from twist_core.model.network import PATCH_BACKBONES, ModelSpec, TwistModel, checkpoint_spec

N_VERIFY_IMAGES = 16


@dataclass
class ExportConfig(AutoConfig):
    run: str = option(None, "run folder (its last.pt) or a checkpoint file")
    out: str = option("model.onnx", "ONNX file to write; the model card goes beside it as .json")
    class_names: str | None = option(None, "K class names: comma-separated, or a text file with one per line")
    opset: int = option(17, "ONNX opset version")
    verify: bool = option(True, "compare PyTorch and onnxruntime on 16 images and fail on a mismatch")
    tolerance: float = option(1e-4, "largest allowed difference in the verification (probabilities: absolute; "
                                    "embeddings: relative to their largest magnitude)")


class ExportError(UserError):
    """The run cannot be exported as asked (bad class names, a failed parity check, ...)."""


class ProbabilityModel(nn.Module):
    """The exported graph: ``images -> (embedding, softmax(logits / tau))``, and with coarse heads also
    ``coarse_probs``, their probabilities side by side (``coarse_classes`` in the card gives the widths)."""

    def __init__(self, model: TwistModel):
        super().__init__()
        self.model = model
        self.tau = float(model.spec.tau)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not self.model.coarse:
            embedding, logits = self.model(images)
            return embedding, torch.softmax(logits / self.tau, dim=-1)
        embedding, logits, coarse, _ = self.model(images, all_heads=True)
        return (embedding, torch.softmax(logits / self.tau, dim=-1),
                torch.cat([torch.softmax(head / self.tau, dim=-1) for head in coarse], dim=1))


def output_names(spec: ModelSpec) -> list[str]:
    return ["embedding", "probs", *(["coarse_probs"] if spec.coarse_classes else [])]


def parse_class_names(value: str | None, n_classes: int) -> list[str]:
    if not value:
        return [f"cluster_{i}" for i in range(n_classes)]
    path = Path(value)
    names = ([line.strip() for line in path.read_text().splitlines() if line.strip()] if path.is_file()
             else [name.strip() for name in value.split(",")])
    if len(names) != n_classes or not all(names):
        raise ExportError(f"--class-names gives {len(names)} names (empty ones too) for {n_classes} classes")
    if len(set(names)) != len(names):
        raise ExportError("--class-names repeats a name; each class needs its own")
    return names


def embedding_meaning(spec: ModelSpec) -> str:
    """What the ``embedding`` output is for this backbone (the card and the ONNX doc string say it)."""
    if spec.backbone in PATCH_BACKBONES:
        return f"the head's first hidden layer ({spec.hidden_dim}-d), above the {spec.backbone} backbone's features"
    return "the ResNet's pooled feature (a learned representation)"


def build_card(checkpoint: dict[str, Any], checkpoint_path: Path, class_names: list[str], opset: int,
               embedding_dim: int) -> dict:
    """The model card; the preprocessing sizes are the ones the checkpoint records (see ``checkpoint_spec``)."""
    spec = checkpoint_spec(checkpoint)
    training = checkpoint["config"]
    return {
        "format": 1, "input_name": "images", "outputs": output_names(spec),
        **card_fields(spec.input_size, spec.resize_size),
        "n_classes": spec.n_classes, "class_names": class_names, "coarse_classes": list(spec.coarse_classes),
        "backbone": spec.backbone, "width": spec.width, "small_stem": spec.small_stem,
        "hidden_dim": spec.hidden_dim, "tau": spec.tau, "embedding_dim": embedding_dim,
        "embedding": embedding_meaning(spec),
        "init": training.get("init"), "init_sha256": training.get("init_sha256"),
        "training_config": training, "checkpoint": str(checkpoint_path),
        "checkpoint_sha256": file_sha256(checkpoint_path), "checkpoint_epoch": checkpoint.get("epoch"),
        "opset": opset, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "twist_version": __version__,
    }


def verification_batch(card: dict, data_folder: str | None, n: int = N_VERIFY_IMAGES) -> np.ndarray:
    """The first ``n`` readable training images through the card's preprocessing (seeded noise if gone)."""
    transform = Preprocess.from_card(card)
    crops: list[np.ndarray] = []
    if data_folder and Path(data_folder).is_dir():
        for name in scan_folder(data_folder):
            try:
                crops.append(transform.crop(transform.load(Path(data_folder, name))))
            except ImageReadError:
                continue
            if len(crops) == n:
                break
    rng = np.random.default_rng(0)
    size = transform.input_size
    crops += [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n - len(crops))]
    return transform.normalize(np.stack(crops))


def torch_outputs(module: nn.Module, batch: np.ndarray) -> list[np.ndarray]:
    """Every output of the exported module (embedding, probs[, coarse_probs]) for ``batch``."""
    with torch.no_grad():
        return [output.numpy() for output in module.eval()(torch.from_numpy(batch))]


def check_parity(module: nn.Module, onnx_path: Path, batch: np.ndarray,
                 tolerance: float = 1e-4) -> dict[str, float]:
    """Largest difference per output between PyTorch and onnxruntime; raises above ``tolerance``.

    Probabilities are compared absolutely; embeddings relative to their largest magnitude (at least 1), as
    their scale depends on the backbone (BatchNorm'd patch codes reach tens) and float32 carries ~7 digits.
    """
    session = create_session(onnx_path, device="cpu")
    names = [output.name for output in session.get_outputs()]
    exported = dict(zip(names, session.run(names, {session.get_inputs()[0].name: batch}), strict=True))
    expected = dict(zip(["embedding", "probs", "coarse_probs"], torch_outputs(module, batch), strict=False))
    if set(exported) != set(expected):
        raise ExportError(f"the ONNX graph has outputs {sorted(exported)}, the model {sorted(expected)}")
    scale = max(1.0, float(np.abs(expected["embedding"]).max()))
    diffs = {name: float(np.abs(exported[name] - value).max()) / (scale if name == "embedding" else 1.0)
             for name, value in expected.items()}
    bad = {name: diff for name, diff in diffs.items() if not diff <= tolerance}
    if bad:
        detail = ", ".join(f"{name} differs by {diff:.3g}" for name, diff in bad.items())
        raise ExportError(f"ONNX and PyTorch disagree on {len(batch)} images: {detail} "
                          f"(tolerance {tolerance:g})")
    return diffs


def to_onnx(module: ProbabilityModel, example: torch.Tensor, opset: int) -> Any:
    """Trace to an in-memory ONNX model with dynamic batch, height and width."""
    import onnx

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of the dynamo one, which takes ~50x longer here
        # and gives the same graph for this plain CNN.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(module, (example,), buffer, input_names=["images"],
                          output_names=output_names(module.model.spec),
                          dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"},
                                        **{name: {0: "batch"} for name in output_names(module.model.spec)}},
                          opset_version=opset, do_constant_folding=True, dynamo=False)
    module.eval()  # the exporter restores the wrapper's mode, which may switch the children to training
    return onnx.load_from_string(buffer.getvalue())


def export_model(config: ExportConfig) -> Path:
    """Export, check and write ``config.out`` and its card; returns the ONNX path."""
    import onnx

    run = Path(config.run)
    checkpoint_path = run / CHECKPOINT_FILE if run.is_dir() else run
    checkpoint = load_checkpoint(checkpoint_path)
    spec = dataclasses.replace(checkpoint_spec(checkpoint), overcluster=0)  # a training-only head: not exported
    model = TwistModel(spec)
    model.load_state_dict({name: value for name, value in checkpoint["model"].items()
                           if not name.startswith("overcluster.")})
    module = ProbabilityModel(model).eval()
    curated = run / CLASS_NAMES_FILE if run.is_dir() else None  # written by twist finetune
    names = parse_class_names(config.class_names or (str(curated) if curated and curated.is_file() else None),
                              spec.n_classes)
    card = build_card(checkpoint, checkpoint_path.resolve(), names, config.opset, model.embedding_dim)
    batch = verification_batch(card, checkpoint["config"].get("data"))

    proto = to_onnx(module, torch.from_numpy(batch[:2]), config.opset)
    out = Path(config.out)
    card_path = out.with_suffix(".json")
    if config.verify:  # check the bare graph before anything is written where the user will look
        out.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".verify", dir=out.parent)
        os.close(handle)  # a new file of its own: never a link left at a fixed name
        scratch = Path(name)
        try:
            onnx.save_model(proto, scratch)
            card["parity_max_abs_diff"] = check_parity(module, scratch, batch, config.tolerance)
        finally:
            scratch.unlink(missing_ok=True)
    proto.producer_name, proto.producer_version = "twist", __version__
    proto.doc_string = f"TWIST image clustering model; outputs probs and embedding: {card['embedding']}"
    readable = {"n_classes": card["n_classes"], "input_size": card["input_size"],
                "resize_size": card["resize_size"], "mean": card["mean"], "std": card["std"],
                "channel_order": card["channel_order"], "class_names": card["class_names"],
                "backbone": card["backbone"], "checkpoint_sha256": card["checkpoint_sha256"]}
    metadata = {CARD_KEY: json.dumps(card, sort_keys=True),
                **{key: v if isinstance(v, str) else json.dumps(v) for key, v in readable.items()}}
    onnx.helper.set_model_props(proto, metadata)
    onnx.checker.check_model(proto, full_check=True)
    atomic_write(out, lambda tmp: onnx.save_model(proto, tmp))
    atomic_write_text(card_path, json.dumps(card, indent=2, sort_keys=True) + "\n")
    return out
