"""Nearest neighbours in the run's own embedding, as second views that augmentation cannot make.

The clusters of a TWIST head lag what its embedding knows: the images nearest to an image in the embedding
share its class far more often than its cluster does (guide, section 1, "Clusters and what the embedding
knows"). SCAN (Van Gansbeke et
al., ECCV 2020) closes that gap by training the head so that an image and its mined neighbours agree. TWIST's
loss is already a consistency loss between two views plus sharpness and diversity terms, so here a neighbour
simply *becomes* the second view: in the neighbour stage the second view of an image is, with probability
``share``, an augmented view of one of its ``k`` nearest neighbours, and the loss is unchanged. The sharpness and
diversity terms keep working, so no cluster collapses, and a step costs what it cost before.

Mining covers the whole folder, not a rank's share: every rank embeds its part, rank 0 searches all of them
(FAISS, exact up to ``vectors.FLAT_MAX_VECTORS`` images, IVF beyond) and broadcasts the table, so N processes
train on the same pairs as one.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from twist_core import distributed
from twist_core.vectors import TRAIN_POINTS_PER_LIST, build, drop_self, normalized, plan_index

SEARCH_BATCH = 4096


@torch.no_grad()
def embed(model: nn.Module, batches: Iterable[tuple[list[int], torch.Tensor]]) -> tuple[np.ndarray, np.ndarray]:
    """Eval-mode embeddings of normalised image batches given with their file indices: (indices, unit vectors)."""
    was_training = model.training
    model.eval()
    indices, vectors = [], []
    for batch_indices, batch in batches:
        if not len(batch_indices):
            continue
        embedding, _ = model(batch)
        indices.append(np.asarray(batch_indices, np.int64))
        vectors.append(normalized(embedding.float().cpu().numpy()))
    model.train(was_training)
    if not indices:
        return np.zeros(0, np.int64), np.zeros((0, 1), np.float32)
    return np.concatenate(indices), np.concatenate(vectors)


def nearest(vectors: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Row i: the ``k`` nearest other rows of unit ``vectors`` by cosine (-1 where fewer exist), best first."""
    n, dim = vectors.shape
    table = np.full((n, k), -1, np.int64)
    if n < 2 or k < 1:
        return table
    plan = plan_index(n, dim)
    sample = None
    if plan.nlist:
        picked = np.random.default_rng(seed).choice(n, min(n, plan.nlist * TRAIN_POINTS_PER_LIST), replace=False)
        sample = vectors[np.sort(picked)]
    index = build(plan, dim, n, lambda: iter([(np.arange(n, dtype=np.int64), vectors)]), sample)
    wanted = min(k, n - 1)
    for start in range(0, n, SEARCH_BATCH):
        queries = np.arange(start, min(n, start + SEARCH_BATCH))
        sims, found = index.search(vectors[queries], wanted + 1)
        table[queries, :wanted] = drop_self(queries, found, sims, wanted)[0]  # IVF may leave -1: no neighbour
    return table


def broadcast_buffers(ctx: distributed.Context, model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every rank, so every rank embeds with the same network."""
    if ctx.distributed:
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=0)


def mine(ctx: distributed.Context, model: nn.Module, batches: Iterable[tuple[list[int], torch.Tensor]],
         n_files: int, k: int, seed: int = 0) -> torch.Tensor:
    """The neighbour table over every file (``n_files`` x ``k``, file indices, -1 = none), the same on every rank.

    ``batches`` are this rank's share of the images (file indices and normalised centre crops); the shares of all
    ranks together must cover every image to pair. Files not embedded by any rank get a row of -1.
    """
    indices, vectors = embed(model, batches)
    parts = distributed.all_gather_objects(ctx, (indices, vectors))
    table = torch.full((n_files, k), -1, dtype=torch.int64)
    if ctx.is_main:
        all_indices = np.concatenate([part[0] for part in parts])
        all_vectors = np.concatenate([part[1] for part in parts if len(part[0])]) if len(all_indices) else None
        if all_vectors is not None:
            order = np.argsort(all_indices, kind="stable")
            all_indices, all_vectors = all_indices[order], np.ascontiguousarray(all_vectors[order])
            found = nearest(all_vectors, k, seed)
            rows = torch.from_numpy(np.where(found >= 0, all_indices[found.clip(0)], -1))
            table[torch.from_numpy(all_indices)] = rows
    if ctx.distributed:
        table = table.to(ctx.device)
        dist.broadcast(table, src=0)
        table = table.cpu()
    return table


def draw_partners(table: torch.Tensor, batches: list[list[int]], share: float,
                  generator: torch.Generator) -> list[list[int]]:
    """For every image of every batch, the image whose view pairs with it: with probability ``share`` one of its
    mined neighbours (uniformly), else the image itself (the usual two views of one image)."""
    partners = []
    k = table.shape[1]
    for batch in batches:
        rows = table[torch.tensor(batch, dtype=torch.long)] if batch else table[:0]
        pick = torch.randint(0, max(k, 1), (len(batch),), generator=generator)
        use = torch.rand(len(batch), generator=generator) < share
        chosen = rows.gather(1, pick.view(-1, 1)).squeeze(1) if k else torch.full((len(batch),), -1)
        own = torch.tensor(batch, dtype=torch.long)
        partners.append(torch.where(use & (chosen >= 0), chosen, own).tolist())
    return partners

