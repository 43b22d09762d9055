"""Run an exported TWIST model with onnxruntime alone: no PyTorch needed to label images.

The model file carries its own preprocessing contract (the ``twist_card`` metadata written by
:mod:`twist_core.deploy.export`), so a caller only hands over images and gets probabilities and embeddings back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from twist_core.data.preprocess import ImageLike, Preprocess
from twist_core.errors import UserError

CARD_KEY = "twist_card"


class DeviceUnavailable(UserError, RuntimeError):
    """A GPU was asked for explicitly and onnxruntime cannot use one."""


class ModelOutputError(UserError, ValueError):
    """The model gives NaN or infinite outputs: its weights are damaged (or it was exported from a diverged run)."""


def finite_rows(*arrays: np.ndarray) -> np.ndarray:
    """Per row, whether every value of every array is finite (a NaN anywhere spoils the whole row)."""
    rows = np.ones(len(arrays[0]), dtype=bool)
    for array in arrays:
        rows &= np.isfinite(array.reshape(len(array), -1)).all(axis=1)
    return rows


def physical_cores() -> int:
    """Physical cores this process may use: hyper-threads share one core's FPUs and slow convolutions down."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        cores, physical = set(), "0"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "physical id":
                physical = value.strip()
            elif key.strip() == "core id":
                cores.add((physical, value.strip()))
        return max(1, min(allowed, len(cores) or allowed))
    except OSError:
        return max(1, allowed)


def _session_options(threads: int | None, spin: bool):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or physical_cores()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spin:  # idle intra-op threads would otherwise busy-wait on cores the decoding workers need
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _parse_device(device: str) -> tuple[str, int]:
    kind, _, index = device.partition(":")
    if kind not in ("auto", "cpu", "cuda") or (index and not index.isdigit()):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    return kind, int(index or 0)


def create_session(path: Path, device: str = "auto", threads: int | None = None, spin: bool = True):
    """A session on CUDA when onnxruntime can really use a GPU, else on the CPU, without error logs.

    onnxruntime-gpu lists CUDA as available even on machines without a GPU and logs an error when it then
    fails to load it, so the CUDA attempt runs with logging silenced and is judged by the providers in use.
    """
    import onnxruntime as ort

    kind, index = _parse_device(device)
    options = _session_options(threads, spin)
    cpu = ["CPUExecutionProvider"]
    if kind != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers():
        ort.set_default_logger_severity(4)
        options.log_severity_level = 4
        try:
            session = ort.InferenceSession(str(path), options, providers=[
                ("CUDAExecutionProvider", {"device_id": index}), *cpu])
        finally:
            ort.set_default_logger_severity(2)
        options.log_severity_level = 2
        if "CUDAExecutionProvider" in session.get_providers():
            return session
    if kind == "cuda":
        raise DeviceUnavailable("device cuda was asked for, but onnxruntime cannot use a GPU on this machine")
    return ort.InferenceSession(str(path), options, providers=cpu)


def read_card(session) -> dict:
    meta = session.get_modelmeta().custom_metadata_map
    if CARD_KEY not in meta:
        raise ValueError("the ONNX file has no twist model card in its metadata (not from `twist export`?)")
    return json.loads(meta[CARD_KEY])


class OnnxModel:
    """An exported TWIST model: ``predict(images) -> (probs N x K, embeddings N x D)``.

    ``device`` is auto, cpu, cuda or cuda:N (auto:N picks GPU N when there is one); ``threads`` defaults to
    the physical cores. ``spin=False`` stops idle inference threads busy-waiting (use it beside decoders).
    """

    def __init__(self, path: str | Path, device: str = "auto", threads: int | None = None, *,
                 spin: bool = True):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no model at {self.path}")
        try:
            self.session = create_session(self.path, device, threads, spin)
        except DeviceUnavailable:
            raise
        except Exception as error:  # onnxruntime's own errors: a corrupt or foreign file
            raise ValueError(f"{self.path} is not a model onnxruntime can load: {error}") from None
        try:
            self.card: dict = read_card(self.session)
        except ValueError as error:
            raise ValueError(f"{self.path}: {error}") from None
        self.class_names: list[str] = list(self.card["class_names"])
        self.n_classes: int = int(self.card["n_classes"])
        self.embedding_dim: int = int(self.card["embedding_dim"])
        self.coarse_classes: list[int] = [int(k) for k in self.card.get("coarse_classes", [])]
        self.providers: list[str] = self.session.get_providers()
        self.transform = Preprocess.from_card(self.card)
        self.input_name = self.session.get_inputs()[0].name
        self._check_outputs()

    def _check_outputs(self) -> None:
        """Refuse a model whose output for a plain grey image is NaN or infinite: a few damaged bytes do that."""
        grey = np.full((1, self.transform.input_size, self.transform.input_size, 3), 128, np.uint8)
        if not finite_rows(*self.predict_arrays(self.transform.normalize(grey))).all():
            raise ModelOutputError(f"{self.path} gives NaN or infinite outputs for a plain grey image: the file is "
                                   "damaged (or was exported from a diverged run); export it again")

    def load(self, item: ImageLike) -> Image.Image:
        return self.transform.load(item)

    def preprocess(self, image: Image.Image) -> np.ndarray:
        return self.transform(image)

    def predict_arrays(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Already preprocessed float32 N x 3 x H x W -> (probs, embeddings)."""
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"expected a float32 N x 3 x H x W batch, got shape {batch.shape}")
        probs, embeddings = self.session.run(["probs", "embedding"],
                                             {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})
        return probs, embeddings

    def predict_heads(self, batch: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Already preprocessed batch -> (probs, each coarse head's probabilities), in one run of the graph."""
        if not self.coarse_classes:
            return self.predict_arrays(batch)[0], []
        probs, joined = self.session.run(["probs", "coarse_probs"],
                                         {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})
        return probs, np.split(joined, np.cumsum(self.coarse_classes)[:-1], axis=1)

    def predict(self, items: Sequence[ImageLike], batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        probs = np.zeros((0, self.n_classes), np.float32)
        embeddings = np.zeros((0, self.embedding_dim), np.float32)
        parts = [(probs, embeddings)]
        for start in range(0, len(items), batch_size):
            batch = np.stack([self.preprocess(self.load(item)) for item in items[start:start + batch_size]])
            parts.append(self.predict_arrays(batch))
        return np.concatenate([p for p, _ in parts]), np.concatenate([e for _, e in parts])
