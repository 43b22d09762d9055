"""ONNX export: parity with PyTorch at several sizes, the metadata contract, and a tampered model caught."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from twist_core.commands.export import main
from twist_core.data.preprocess import Preprocess
from twist_core.deploy.export import (
    ExportConfig,
    ExportError,
    ProbabilityModel,
    build_card,
    check_parity,
    export_model,
)
from twist_core.deploy.infer import OnnxModel
from twist_core.model.checkpoint import load_checkpoint
from twist_core.model.network import ModelSpec, TwistModel


@pytest.fixture(scope="module")
def exported(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "models" / "tiny.onnx"
    names = "discs,stripes,third,fourth"
    return export_model(ExportConfig(run=str(tiny_run), out=str(out), class_names=names))


def torch_module(run: Path) -> ProbabilityModel:
    checkpoint = load_checkpoint(run)
    model = TwistModel(ModelSpec(**checkpoint["model_spec"]))
    model.load_state_dict(checkpoint["model"])
    return ProbabilityModel(model).eval()


@pytest.mark.parametrize("size", [32, 48])
@pytest.mark.parametrize("batch", [1, 7])
def test_onnx_matches_pytorch(exported: Path, tiny_run: Path, size: int, batch: int) -> None:
    model = OnnxModel(exported, device="cpu")
    images = np.random.default_rng(size * 10 + batch).normal(0, 1, (batch, 3, size, size)).astype(np.float32)
    probs, embeddings = model.predict_arrays(images)
    with torch.no_grad():
        ref_embeddings, ref_probs = torch_module(tiny_run)(torch.from_numpy(images))
    assert probs.shape == (batch, 4) and embeddings.shape == (batch, model.embedding_dim)
    np.testing.assert_allclose(probs, ref_probs.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(embeddings, ref_embeddings.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_metadata_round_trip(exported: Path, tiny_run: Path) -> None:
    card = json.loads(exported.with_suffix(".json").read_text())
    proto = onnx.load(str(exported))
    onnx.checker.check_model(proto, full_check=True)
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["twist_card"]) == card
    assert json.loads(props["class_names"]) == ["discs", "stripes", "third", "fourth"]
    assert props["n_classes"] == "4" and props["channel_order"] == "RGB"
    assert sorted(p.name for p in exported.parent.iterdir()) == ["tiny.json", "tiny.onnx"]  # no external data
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    assert [o.name for o in proto.graph.output] == ["embedding", "probs"]

    model = OnnxModel(exported)
    assert model.card == card and model.providers == ["CPUExecutionProvider"]
    # The tiny run is the CPU default for 32 px images (patches): its embedding is the head's hidden layer.
    assert (model.n_classes, model.embedding_dim, model.class_names) == (4, 64, card["class_names"])
    training = json.loads((tiny_run / "config.json").read_text())
    assert card["training_config"]["image_size"] == training["image_size"] == card["input_size"] == 32
    assert card["resize_size"] == 32 and card["mean"] == [0.485, 0.456, 0.406]
    assert card["std"] == [0.229, 0.224, 0.225] and (card["channel_order"], card["layout"]) == ("RGB", "NCHW")
    assert card["checkpoint_sha256"] and card["backbone"] == "patches"
    assert card["parity_max_abs_diff"]["probs"] < 1e-4


def test_tampered_model_fails_parity(exported: Path, tiny_run: Path, tmp_path: Path) -> None:
    proto = onnx.load(str(exported))
    producer = next(node for node in proto.graph.node if "probs" in node.output)
    producer.output[list(producer.output).index("probs")] = "probs_untampered"
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.array([0.01], np.float32), "tamper"))
    proto.graph.node.append(onnx.helper.make_node("Add", ["probs_untampered", "tamper"], ["probs"]))
    tampered = tmp_path / "tampered.onnx"
    onnx.save(proto, str(tampered))

    batch = np.random.default_rng(0).normal(0, 1, (16, 3, 32, 32)).astype(np.float32)
    module = torch_module(tiny_run)
    assert check_parity(module, exported, batch)["probs"] < 1e-4
    with pytest.raises(ExportError, match=r"probs differs by 0\.01"):
        check_parity(module, tampered, batch)


def test_card_copies_the_sizes_the_checkpoint_records(tiny_run: Path) -> None:
    checkpoint = load_checkpoint(tiny_run)
    assert (checkpoint["model_spec"]["input_size"], checkpoint["model_spec"]["resize_size"]) == (32, 32)
    checkpoint["config"] = {**checkpoint["config"], "image_size": 224}  # the recorded sizes win over the config
    card = build_card(checkpoint, tiny_run / "last.pt", ["a", "b", "c", "d"], 17, 64)
    assert (card["input_size"], card["resize_size"]) == (32, 32)


def test_onnx_doc_string_says_what_the_embedding_is(exported: Path) -> None:
    doc = onnx.load(str(exported)).doc_string
    assert "hidden layer" in doc and "pooled" not in doc  # the tiny run is a patches model


def test_preprocessing_contract_for_large_images(tiny_run: Path) -> None:
    checkpoint = load_checkpoint(tiny_run)
    older = ("input_size", "resize_size")  # a checkpoint written before the spec recorded its sizes
    checkpoint["model_spec"] = {k: v for k, v in checkpoint["model_spec"].items() if k not in older}
    checkpoint["config"] = {**checkpoint["config"], "image_size": 224}
    card = build_card(checkpoint, tiny_run / "last.pt", ["a", "b", "c", "d"], 17, 64)
    assert (card["input_size"], card["resize_size"]) == (224, 256)
    transform = Preprocess.from_card(card)
    gradient = np.tile((np.arange(400) % 256).astype(np.uint8)[None, :, None], (300, 1, 3))
    crop = transform.crop(Image.fromarray(gradient))
    assert crop.shape == (224, 224, 3)
    tensor = transform(Image.fromarray(gradient))
    assert tensor.shape == (3, 224, 224) and tensor.dtype == np.float32
    expected = (crop[0, 0] / 255.0 - np.array(card["mean"])) / card["std"]
    np.testing.assert_allclose(tensor[:, 0, 0], expected, atol=1e-5)


def test_inference_accepts_images_paths_and_arrays(exported: Path, shapes_folder: Path, capfd) -> None:
    model = OnnxModel(exported)  # auto: must quietly fall back to the CPU on a machine without a GPU
    assert model.providers == ["CPUExecutionProvider"]
    assert capfd.readouterr().err == ""
    path = sorted(shapes_folder.rglob("*.png"))[0]
    image = Image.open(path)
    items = [path, str(path), image, np.asarray(image.convert("RGB"))]
    probs, embeddings = model.predict(items, batch_size=3)
    assert probs.shape == (4, 4) and embeddings.shape == (4, model.embedding_dim)
    np.testing.assert_allclose(probs, probs[[0]].repeat(4, 0), atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        model.load(np.zeros((8, 8, 3), np.float64))


def test_cli_errors_are_one_line(tiny_run: Path, tmp_path: Path, capsys) -> None:
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "m.onnx")]) == 2
    assert main([str(tiny_run), "--out", str(tmp_path / "m.onnx"), "--class-names", "a,b"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("twist export: error:") for line in err)
    assert "no checkpoint" in err[0] and "2 names" in err[1]
    assert not (tmp_path / "m.onnx").exists()
