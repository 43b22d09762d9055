"""The neighbour stage: mined neighbours become second views, over the whole folder, resumable, same export."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_train_config
from test_distributed import HELPERS, torchrun
from test_train import ENV, assert_same_weights, interrupt_during_second_epoch, train_command

from twist_core import distributed
from twist_core.data.augment import BatchAugment, policy_for_size
from twist_core.evaluation.metrics import expected_calibration_error, neighbour_disagreement
from twist_core.train.loop import train
from twist_core.train.neighbours import draw_partners, mine, nearest
from twist_core.train.optim import Schedule


def planted_vectors(groups: int = 8, per_group: int = 6, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors in tight groups around random centres: each vector's nearest others are its group."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(groups, dim))
    labels = np.repeat(np.arange(groups), per_group)
    vectors = centres[labels] + 0.05 * rng.normal(size=(len(labels), dim))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    order = rng.permutation(len(labels))
    return vectors[order].astype(np.float32), labels[order]


def test_nearest_finds_the_planted_groups_and_never_the_image_itself() -> None:
    vectors, labels = planted_vectors()
    table = nearest(vectors, 5)
    assert table.shape == (len(vectors), 5)
    assert not (table == np.arange(len(vectors))[:, None]).any()
    assert (labels[table] == labels[:, None]).all()  # all 5 others of each group of 6
    assert (nearest(vectors[:3], 5)[:, 2:] == -1).all()  # only 2 others exist


def test_partners_are_the_image_itself_or_one_of_its_neighbours() -> None:
    table = torch.tensor([[1, 2], [0, 2], [0, 1], [-1, -1]])
    batches = [[0, 1], [2, 3]]
    alone = draw_partners(table, batches, 0.0, torch.Generator().manual_seed(0))
    assert alone == batches
    paired = draw_partners(table, batches * 50, 1.0, torch.Generator().manual_seed(0))
    for batch, partners in zip(batches * 50, paired, strict=True):
        for image, partner in zip(batch, partners, strict=True):
            assert partner == image if image == 3 else partner in table[image].tolist()  # no neighbour: itself
    assert draw_partners(table, batches, 1.0, torch.Generator().manual_seed(3)) == \
        draw_partners(table, batches, 1.0, torch.Generator().manual_seed(3))


def test_schedule_pairs_the_last_part_of_the_twist_stage_only() -> None:
    schedule = Schedule(100, 10, 0.1, self_label_fraction=0.2, neighbour_fraction=0.5)
    assert schedule.self_label_start == 80 and schedule.neighbour_start == 40
    flags = [schedule.at(step) for step in range(100)]
    assert [p.neighbours for p in flags] == [False] * 40 + [True] * 40 + [False] * 20
    assert all(p.self_labelling for p in flags[80:])
    assert not any(p.neighbours for p in (Schedule(100, 10, 0.1).at(s) for s in range(100)))
    assert Schedule(100, 30, 0.1, neighbour_fraction=0.95).neighbour_start == 20  # never inside the warm-up


def test_second_view_comes_from_the_partners() -> None:
    augment = BatchAugment(policy_for_size(32))
    dark = torch.zeros(8, 3, 32, 32, dtype=torch.uint8)
    light = torch.full((8, 3, 32, 32), 255, dtype=torch.uint8)
    first, second = augment(dark, torch.Generator().manual_seed(0), partners=light)
    plain_first, plain_second = augment(dark, torch.Generator().manual_seed(0))
    assert torch.equal(first, plain_first)
    assert second.mean() > plain_second.mean() + 1.0  # normalised units: light against dark images


def test_disagreement_and_calibration_metrics() -> None:
    vectors, labels = planted_vectors(groups=4, per_group=10)
    assert neighbour_disagreement(vectors, labels, k=5) == 0.0
    wrong = labels.copy()
    wrong[:4] = (wrong[:4] + 1) % 4  # four images put in a cluster their neighbours are not in
    assert neighbour_disagreement(vectors, wrong, k=5) == pytest.approx(4 / len(labels))
    probs = np.full((4, 2), 0.1)
    probs[np.arange(4), [0, 0, 1, 1]] = 0.9
    mapping = {0: 0, 1: 1}
    assert expected_calibration_error(probs, np.array([0, 0, 1, 1]), np.array([0, 0, 1, 1]), mapping) == \
        pytest.approx(0.1)  # 0.9 confident, always right
    assert expected_calibration_error(probs, np.array([0, 0, 1, 1]), np.array([1, 1, 0, 0]), mapping) == \
        pytest.approx(0.9)  # 0.9 confident, always wrong


def test_single_process_mining_covers_every_file_in_file_order() -> None:
    vectors, labels = planted_vectors(groups=4, per_group=5, dim=8)

    class Identity(torch.nn.Module):
        def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return batch, batch

    ctx = distributed.Context(0, 1, 0, torch.device("cpu"))
    files = np.arange(len(vectors))
    batches = [(files[i:i + 7].tolist(), torch.from_numpy(vectors[i:i + 7])) for i in range(0, len(files), 7)]
    table = mine(ctx, Identity(), reversed(batches), len(vectors) + 2, 4)  # order of batches does not matter
    assert (table[-2:] == -1).all()  # files nobody embedded (skipped) get no neighbours
    assert (labels[table[:-2].numpy()] == labels[:, None]).all()


def test_two_processes_mine_the_table_one_process_mines(tmp_path: Path) -> None:
    """Each rank embeds half of the images; the table is over all of them and equals the one-process table."""
    result = torchrun([str(HELPERS / "ddp_neighbours_check.py"), str(tmp_path)])
    assert result.returncode == 0, result.stderr[-3000:]
    single = subprocess.run([sys.executable, str(HELPERS / "ddp_neighbours_check.py"), str(tmp_path)], env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    one = np.load(tmp_path / "table_world1_rank0.npy")
    assert (one >= 0).all()
    for rank in (0, 1):
        two = np.load(tmp_path / f"table_world2_rank{rank}.npy")
        np.testing.assert_array_equal(np.sort(two, axis=1), np.sort(one, axis=1))
    groups = np.load(tmp_path / "groups.npy")
    assert (groups[one] == groups[:, None]).all()  # and it found the planted groups across the ranks' halves


@pytest.fixture(scope="module")
def paired_run(tmp_path_factory: pytest.TempPathFactory, shapes_folder: Path) -> Path:
    out = tmp_path_factory.mktemp("paired")
    train(tiny_train_config(shapes_folder, out, epochs=3, batch_size=8, neighbour_fraction=0.7, neighbour_k=5,
                            neighbour_every=1, eval_data=str(shapes_folder), eval_every=1))
    return out


def test_training_pairs_images_with_neighbours_over_the_whole_folder(paired_run: Path) -> None:
    checkpoint = torch.load(paired_run / "last.pt", weights_only=True)
    table = checkpoint["neighbours"]
    assert table.shape == (48, 5) and (table >= 0).all()
    assert not (table == torch.arange(48).view(-1, 1)).any()
    assert checkpoint["neighbours_epoch"] == 2 and checkpoint["paired_epoch"] == 2  # re-mined every epoch
    metrics = [json.loads(line) for line in (paired_run / "metrics.jsonl").read_text().splitlines()]
    for row in metrics:  # the gap is visible at every evaluation: head, k-means on its embedding, kNN ceiling
        assert {"acc", "kmeans_acc", "kmeans_nmi", "knn_acc", "ece", "neighbour_disagreement"} <= set(row["eval"])
    assert json.loads((paired_run / "config.json").read_text())["neighbour_fraction"] == 0.7


def test_auto_neighbour_fraction_is_recorded_and_paper_recipe_turns_it_off(shapes_folder: Path,
                                                                            tmp_path: Path) -> None:
    from twist_core.train.options import DEFAULT_NEIGHBOUR_FRACTION, recipe_options

    train(tiny_train_config(shapes_folder, tmp_path / "auto", epochs=1))
    config = json.loads((tmp_path / "auto" / "config.json").read_text())
    assert config["neighbour_fraction"] == DEFAULT_NEIGHBOUR_FRACTION > 0
    assert recipe_options("paper")["neighbour_fraction"] == 0.0


@pytest.mark.parametrize("option", [["--neighbour-share", "1.5"], ["--neighbour-fraction", "1"],
                                    ["--neighbour-k", "0"], ["--neighbour-every", "0"]])
def test_bad_neighbour_options_are_one_line_errors(shapes_folder: Path, tmp_path: Path, option: list[str]) -> None:
    result = subprocess.run(train_command(shapes_folder, tmp_path / "bad", *option), env=ENV, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and option[0] in result.stderr
    assert not (tmp_path / "bad").exists()


NEIGHBOUR_STAGE = ("--self-label-fraction", "0", "--epochs", "3", "--neighbour-fraction", "0.7",
                   "--neighbour-every", "1", "--neighbour-k", "4")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_run_killed_inside_the_neighbour_stage_resumes_exactly(shapes_folder: Path, tmp_path: Path,
                                                                  sig: int) -> None:
    straight = tmp_path / "straight"
    subprocess.run(train_command(shapes_folder, straight, *NEIGHBOUR_STAGE), env=ENV, check=True,
                   capture_output=True, timeout=600)
    assert torch.load(straight / "last.pt", weights_only=True)["paired_epoch"] == 2
    out = tmp_path / "interrupted"
    interrupt_during_second_epoch(shapes_folder, out, sig, *NEIGHBOUR_STAGE)
    checkpoint = torch.load(out / "last.pt", weights_only=True)
    assert checkpoint["epoch"] < 3
    resumed = subprocess.run(train_command(shapes_folder, out, *NEIGHBOUR_STAGE, "--resume"), env=ENV,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_weights(out, straight)
    assert torch.equal(torch.load(out / "last.pt", weights_only=True)["neighbours"],
                       torch.load(straight / "last.pt", weights_only=True)["neighbours"])


def test_export_after_the_stage_keeps_the_interface(paired_run: Path, tmp_path: Path) -> None:
    from twist_core.deploy.export import ExportConfig, export_model
    from twist_core.deploy.infer import OnnxModel

    model = export_model(ExportConfig(run=str(paired_run), out=str(tmp_path / "m.onnx")))
    onnx_model = OnnxModel(model)
    probs, embedding = onnx_model.predict_arrays(np.zeros((2, 3, 32, 32), np.float32))[:2]
    assert probs.shape == (2, 4) and np.allclose(probs.sum(1), 1.0, atol=1e-4)
    assert embedding.shape[0] == 2
