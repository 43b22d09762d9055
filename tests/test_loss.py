"""The TWIST loss against an independent NumPy computation, and the diversity term's role against collapse."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from twist_core.model.network import ModelSpec, TwistModel
from twist_core.train.loss import EPS, self_label_loss, twist_multicrop_loss, twist_pair_loss


def numpy_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def numpy_twist(a: np.ndarray, b: np.ndarray, tau: float, lam1: float, lam2: float) -> dict[str, float]:
    """Written from the paper's formula (TWIST, arXiv:2110.07402), in float64, sharing no code with twist_core."""
    p1, p2 = numpy_softmax(a), numpy_softmax(b)
    kl12 = np.sum(p1 * (np.log(p1 + EPS) - np.log(p2 + EPS)), axis=1)
    kl21 = np.sum(p2 * (np.log(p2 + EPS) - np.log(p1 + EPS)), axis=1)
    consistency = 0.5 * (kl12.mean() + kl21.mean())
    q1, q2 = numpy_softmax(a / tau), numpy_softmax(b / tau)

    def h(p: np.ndarray) -> np.ndarray:
        return -np.sum(p * np.log(p + EPS), axis=-1)

    sharpness = 0.5 * (h(q1).mean() + h(q2).mean())
    diversity = 0.5 * (h(q1.mean(0)) + h(q2.mean(0)))
    return {"consistency": consistency, "sharpness": sharpness, "diversity": diversity,
            "loss": consistency + (1 + lam1) * sharpness - lam2 * diversity}


@pytest.mark.parametrize(("tau", "lam1", "lam2"), [(1.0, 0.0, 1.0), (0.5, 0.0, 1.0), (1.0, -0.6, 1.0),
                                                   (0.3, 0.4, 2.5), (2.0, 0.0, 0.0)])
def test_pair_loss_matches_numpy(tau: float, lam1: float, lam2: float) -> None:
    rng = np.random.default_rng(7)
    a, b = rng.normal(0, 2.0, (32, 12)), rng.normal(0, 2.0, (32, 12))
    expected = numpy_twist(a, b, tau, lam1, lam2)
    parts = twist_pair_loss(torch.tensor(a), torch.tensor(b), tau, lam1, lam2)
    for name, value in expected.items():
        assert parts[name].item() == pytest.approx(value, rel=1e-10, abs=1e-10), name


def test_multicrop_averages_global_to_other_pairs() -> None:
    rng = np.random.default_rng(3)
    views = [rng.normal(0, 1.5, (16, 8)) for _ in range(4)]  # 2 global + 2 local
    pairs = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3)]  # (1, 0) is the same symmetric pair as (0, 1)
    expected = np.mean([numpy_twist(views[i], views[j], 0.5, 0.0, 1.0)["loss"] for i, j in pairs])
    got = twist_multicrop_loss([torch.tensor(v) for v in views], 2, 0.5, 0.0, 1.0)["loss"].item()
    assert got == pytest.approx(expected, rel=1e-10)
    two = twist_multicrop_loss([torch.tensor(v) for v in views[:2]], 2, 0.5, 0.0, 1.0)["loss"].item()
    assert two == pytest.approx(numpy_twist(views[0], views[1], 0.5, 0.0, 1.0)["loss"], rel=1e-10)


def test_self_label_uses_confident_view_and_masks_the_rest() -> None:
    # 4 images, K = 3. View 0 is confident on images 0 and 1; view 1 on images 2 and 3.
    v0 = torch.tensor([[9.0, 0, 0], [0, 9.0, 0], [0.1, 0, 0], [0, 0.2, 0]])
    v1 = torch.tensor([[0.0, 1, 0], [0, 0, 1.0], [0, 0, 8.0], [0.05, 0, 0]])
    loss = self_label_loss([v0, v1], n_global=2, tau=1.0, keep_fraction=0.5)
    # Top 50 % confidence: images 0 (view 0, label 0) and 1 (view 0, label 1) at 9.0 > 8.0 of image 2.
    log_p1 = torch.log_softmax(v1, -1)
    expected = -(log_p1[0, 0] + log_p1[1, 1]) / 2  # view 1 trained on the two kept images; view 0 is the source
    assert loss.item() == pytest.approx((expected.item() + 0.0) / 2, rel=1e-6)


def short_run(lam2: float, logit_norm: bool, steps: int = 60) -> tuple[int, float]:
    """A real (tiny) TWIST network trained on noisy views of fixed images; returns clusters in use and the
    entropy of the mean prediction."""
    torch.manual_seed(0)
    images = torch.randn(256, 3, 16, 16)
    model = TwistModel(ModelSpec(width=8, hidden_dim=32, n_classes=8, small_stem=True))
    if not logit_norm:
        model.head.logit_norm = torch.nn.Identity()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(steps):
        _, logits_a = model(images + 0.3 * torch.randn_like(images))
        _, logits_b = model(images + 0.3 * torch.randn_like(images))
        loss = twist_pair_loss(logits_a, logits_b, tau=1.0, lam1=0.0, lam2=lam2)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        probs = model(images)[1].softmax(-1)
    mean = probs.mean(0)
    return int(torch.unique(probs.argmax(1)).numel()), float(-(mean * mean.log()).sum())


def test_diversity_term_prevents_collapse() -> None:
    """Without the logit BN, consistency + sharpness alone collapse to one class; the diversity term prevents it."""
    clusters, entropy = short_run(lam2=0.0, logit_norm=False)
    assert clusters == 1 and entropy < 0.05
    clusters, entropy = short_run(lam2=1.0, logit_norm=False)
    assert clusters >= 4 and entropy > 1.0


def test_logit_batchnorm_keeps_classes_in_use() -> None:
    """The non-affine BN over the logits is the second guard: even without the diversity term nothing collapses."""
    clusters, entropy = short_run(lam2=0.0, logit_norm=True)
    assert clusters == 8 and entropy > 0.9 * np.log(8)
