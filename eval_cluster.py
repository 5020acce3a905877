"""Overclustering evaluation of a frozen backbone (SPEC 6.c), and the evaluation pieces other scripts import.

Protocol (SPEC 6.c, `experiments/overcluster/sup_overcluster.py` of the original):
spatial tokens of a labelled split at 448 px -> per-dimension standardisation -> PCA to 50 dims -> k-means for each
K over 5 seeds (faiss semantics) -> cluster maps nearest-upsampled to 100x100 -> many-to-one matching by precision
(Hungarian when K equals the number of classes) -> mIoU from one confusion matrix over the whole split.

Importable building blocks: `extract_features`, `backbone_tokens`, `standardizer`, `standardize`, `pca`, `kmeans`,
`confusion_matrix`, `match_and_score`, `compute_miou`, `overcluster`, and what every evaluation script shares: the
backbone/data arguments and loaders, `Progress` lines, and the PNG panels (`voc_palette`, `save_panel`).

    python eval_cluster.py --pretrained leopart_vits16.ckpt --dataset voc --data-root /data/VOC --split val
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.optimize import linear_sum_assignment

from data import IMAGENET_MEAN, IMAGENET_STD, build_eval_dataset, error_message
from leopart_core import ARCHS, build_vit, check_input_size, load_backbone

MATCHINGS = ("none", "hungarian", "many_to_one_precision", "many_to_one_iou")
IGNORE_INDEX = 255
# Rows per block of the float64 sums of the standardisation and the PCA: 2^14 x 384 dims x 8 B = 48 MiB, so their
# temporaries stay small next to the features of a whole split.
STATS_BLOCK_ROWS = 1 << 14


def distance_block_rows(k, device):
    """Rows of one block of the (points x k centroids) distance matrix on `device`, so k-means over millions of
    tokens never materialises the full matrix. On the CPU a block holds 2^19 floats (2 MiB), so it stays in cache
    between the matrix product that writes it and the minima that read it (1.3-1.5x faster than 64 MiB blocks,
    measured); on a GPU 2^24 (64 MiB), so a Lloyd step is a few large kernels rather than hundreds of launches."""
    return max(1, (1 << 19 if torch.device(device).type == "cpu" else 1 << 24) // k)


# ----------------------------------------------------------------------------------------------------------------
# Metric (SPEC 6 "mIoU", golden README section 4)
# ----------------------------------------------------------------------------------------------------------------

def confusion_matrix(gt, pred, num_classes, num_pred, ignore_index=IGNORE_INDEX, chunk=1 << 22):
    """Pixel counts C[c, p] = #(gt == c and pred == p) over the pixels whose gt is not `ignore_index` (SPEC 6).

    gt, pred: tensors or arrays of the same number of elements (any shape, flattened; e.g. (N, H, W)), of any
    integer dtype (uint8 masks stay uint8: only blocks of `chunk` pixels are widened to int64, so a split of many
    maps never needs a full int64 copy). Returns a (num_classes, num_pred) int64 tensor on gt's device. One matrix
    over the whole split is what the original accumulates (no per-image averaging). Values outside
    [0, num_classes) / [0, num_pred) raise ValueError (the original's `max(pred) <= num_pred` check is off by one,
    SPEC 8.15).
    """
    gt = torch.as_tensor(gt).reshape(-1)
    pred = torch.as_tensor(pred, device=gt.device).reshape(-1)
    if gt.numel() != pred.numel():
        raise ValueError(f"gt has {gt.numel()} elements but pred has {pred.numel()}")
    if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= num_pred):
        raise ValueError(f"predicted ids must lie in [0, {num_pred}), got range "
                         f"[{int(pred.min())}, {int(pred.max())}]")
    counts = torch.zeros(num_classes * num_pred, dtype=torch.long, device=gt.device)
    for b in _blocks(gt.numel(), chunk):
        g, p = gt[b].long(), pred[b].long()
        if ignore_index is not None:
            valid = g != ignore_index
            g, p = g[valid], p[valid]
        if g.numel() and (int(g.min()) < 0 or int(g.max()) >= num_classes):
            raise ValueError(f"ground-truth labels must lie in [0, {num_classes}) or be {ignore_index}, got range "
                             f"[{int(g.min())}, {int(g.max())}]")
        counts += torch.bincount(g * num_pred + p, minlength=num_classes * num_pred)
    return counts.reshape(num_classes, num_pred)


def match_and_score(confusion, matching):
    """Match predicted ids to gt classes and score, from a confusion matrix alone (SPEC 6 mIoU; golden README 4).

    confusion: (num_gt, num_pred) counts from `confusion_matrix`. matching:
      - "none": predictions are class ids already (linear probe); needs num_pred == num_gt.
      - "hungarian": `linear_sum_assignment(1 - IoU)`, rows gt, columns clusters; unmatched clusters become 0.
      - "many_to_one_precision" / "many_to_one_iou": each cluster goes to the gt class of highest precision
        tp/(tp+fp) (resp. IoU); ties go to the lowest gt id, so an empty cluster goes to 0. As in the original
        code no Hungarian step follows (the paper mentions one; it would be a no-op, SPEC 8.10).
    Scores use tp/max(tp+fp+fn, 1e-8) (resp. tp/max(tp+fp, 1e-8)) in float64; mIoU is the mean over all num_gt
    classes, so a class absent from gt and prediction counts as 0.
    Returns a dict of CPU tensors: miou (float), iou_per_class (num_gt,) float64, tp/fp/fn (num_gt,) int64,
    match (num_pred,) int64 (the gt id of every predicted id), score_matrix (num_gt, num_pred) float64,
    matched_bg_clusters (float, as the original reports it), and for Hungarian match_gt_idx/match_pred_idx.
    """
    if matching not in MATCHINGS:
        raise ValueError(f"matching must be one of {MATCHINGS}, got {matching!r}")
    conf = torch.as_tensor(confusion).cpu().long()
    num_gt, num_pred = conf.shape
    tp = conf.double()
    fp = conf.sum(0, keepdim=True).double() - tp
    fn = conf.sum(1, keepdim=True).double() - tp
    iou = tp / (tp + fp + fn).clamp_min(1e-8)
    out = {}
    if matching == "none":
        if num_pred != num_gt:
            raise ValueError(f"matching 'none' needs as many predicted ids as classes, got {num_pred} vs {num_gt}")
        score = iou
        match = torch.arange(num_pred)
        matched_bg = 1.0 / num_gt
    elif matching == "hungarian":
        score = iou
        rows, cols = linear_sum_assignment(1 - score.numpy())
        match = torch.zeros(num_pred, dtype=torch.long)
        match[torch.from_numpy(cols).long()] = torch.from_numpy(rows).long()
        out["match_gt_idx"] = torch.from_numpy(rows).long()
        out["match_pred_idx"] = torch.from_numpy(cols).long()
        # The original reports 1/num_gt here whatever the matching (golden README 4).
        matched_bg = 1.0 / num_gt
    else:
        score = iou if matching == "many_to_one_iou" else tp / (tp + fp).clamp_min(1e-8)
        # np.argmax returns the first maximum: the original's strict '>' scan from gt 0 upwards.
        match = torch.from_numpy(np.argmax(score.numpy(), axis=0)).long()
        matched_bg = float((match == 0).sum()) / num_pred
    # Confusion after renaming every predicted id to its matched gt id.
    merged = torch.zeros(num_gt, num_gt, dtype=torch.long).index_add_(1, match, conf)
    tp_c = merged.diagonal().clone()
    fp_c = merged.sum(0) - tp_c
    fn_c = merged.sum(1) - tp_c
    iou_c = tp_c.double() / (tp_c + fp_c + fn_c).double().clamp_min(1e-8)
    out.update(miou=float(iou_c.mean()), iou_per_class=iou_c, tp=tp_c, fp=fp_c, fn=fn_c, match=match,
               score_matrix=score, matched_bg_clusters=matched_bg)
    return out


def compute_miou(gt, pred, num_classes, num_pred, matching, ignore_index=IGNORE_INDEX):
    """mIoU of a prediction against gt with the original's matching (`PredsmIoU.compute_miou`, SPEC 6, 10.7).

    gt, pred: same-size tensors/arrays (flattened); pixels with gt == ignore_index are left out (the original
    removes them before the call). num_classes: gt classes; num_pred: predicted ids (clusters). matching: see
    `match_and_score`. Returns its dict plus `confusion` (num_classes, num_pred) and `reordered`, the prediction
    with every id replaced by its matched gt id, same shape as pred (ignored pixels included).
    """
    confusion = confusion_matrix(gt, pred, num_classes, num_pred, ignore_index)
    out = match_and_score(confusion, matching)
    pred = torch.as_tensor(pred)
    out["confusion"] = confusion
    out["reordered"] = out["match"].to(pred.device)[pred.long()]
    return out


# ----------------------------------------------------------------------------------------------------------------
# Standardisation, PCA, k-means (SPEC 6.c steps 3-5)
# ----------------------------------------------------------------------------------------------------------------

def _blocks(n, rows):
    """Row slices of at most `rows` rows covering range(n)."""
    return [slice(s, min(s + rows, n)) for s in range(0, n, max(1, rows))]


def standardizer(x, eps=0.0, chunk_rows=STATS_BLOCK_ROWS, device=None):
    """Per-dimension z-score of x (n, D) as a function of row blocks (SPEC 6.c step 3): returns z(rows (m, D)) ->
    float32 (m, D) on `device` (default x's), so callers standardise block by block and never hold a standardised
    copy of x.

    sklearn `StandardScaler` semantics: mean and std with ddof 0 over all rows (accumulated in float64 in chunks,
    so memory stays bounded), and a dimension that is constant up to float64 round-off gets scale 1 instead of a
    division by ~0 (sklearn's `_is_constant_feature`). `eps` is added to the std: 0 for the evaluation protocol
    (SPEC 6.c), 1e-5 for the training-time monitor (SPEC 5.5).
    """
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"standardize expects a non-empty (n, D) matrix, got shape {tuple(x.shape)}")
    device = torch.device(device) if device is not None else x.device
    n, dim = x.shape
    total = torch.zeros(dim, dtype=torch.float64, device=device)
    for b in _blocks(n, chunk_rows):
        total += x[b].to(device).double().sum(0)  # widened on the compute device, not before the copy
    mean = total / n
    sq = torch.zeros(dim, dtype=torch.float64, device=device)
    for b in _blocks(n, chunk_rows):
        sq += ((x[b].to(device).double() - mean) ** 2).sum(0)
    var = sq / n
    fp64_eps = torch.finfo(torch.float64).eps
    constant = var <= n * fp64_eps * var + (n * mean * fp64_eps) ** 2
    scale = torch.where(constant, torch.ones_like(var), var.sqrt()) + eps

    def z(rows):
        return ((rows.to(device).double() - mean) / scale).float()
    return z


def standardize(x, eps=0.0, chunk_rows=STATS_BLOCK_ROWS, device=None):
    """Per-dimension z-score of x (n, D) -> float32 (n, D) on x's device: `standardizer` applied block by block.

    This holds a second full copy of x; the protocol passes `standardizer(x)` to `pca` instead, which standardises
    each block on the fly.
    """
    z = standardizer(x, eps, chunk_rows, device)
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    for b in _blocks(x.shape[0], chunk_rows):
        out[b] = z(x[b]).to(x.device)
    return out


def pca(x, dim=50, max_points=None, seed=1234, chunk_rows=STATS_BLOCK_ROWS, device=None, transform=None):
    """Project x (n, D) onto its top `dim` principal directions -> float32 (n, dim) on x's device (SPEC 6.c step 4).

    `faiss.PCAMatrix(D, dim)` semantics: trained on a random subsample of at most `max_points` rows (default
    faiss's max_points_per_d * D = 1000 * D; `seed` picks it), subtracts its own mean, no whitening
    (eigen_power 0) and no random rotation. The covariance is accumulated in float64 in chunks and diagonalised
    with `torch.linalg.eigh`; each direction's sign is fixed so that its largest-magnitude entry is positive
    (faiss leaves the sign to LAPACK; distances, hence k-means, do not depend on it).
    `transform`: a function applied to every block of rows first, returning float32 on `device`; with
    `standardizer(x)` the result equals `pca(standardize(x))` bit for bit without the standardised copy.
    """
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"pca expects a non-empty (n, D) matrix, got shape {tuple(x.shape)}")
    n, d_in = x.shape
    if not 1 <= dim <= d_in:
        raise ValueError(f"pca dim must lie in [1, {d_in}] for {d_in}-dimensional input, got {dim}")
    device = torch.device(device) if device is not None else x.device
    if transform is None:
        def transform(rows):
            return rows.to(device, torch.float32)
    max_points = 1000 * d_in if max_points is None else max_points
    m = min(n, max_points)
    # Training rows, block by block: slices of x, or of its random subsample gathered per block (never a full copy).
    blocks = _blocks(n, chunk_rows)
    if n > max_points:
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_points].to(x.device)
        blocks = [idx[b] for b in _blocks(m, chunk_rows)]
    mean = torch.zeros(d_in, dtype=torch.float64, device=device)
    for b in blocks:
        mean += transform(x[b]).double().sum(0)
    mean /= m
    cov = torch.zeros(d_in, d_in, dtype=torch.float64, device=device)
    for b in blocks:
        centred = transform(x[b]).double() - mean
        cov += centred.T @ centred
    cov /= m
    _, vectors = torch.linalg.eigh(cov)                      # ascending eigenvalues
    components = vectors[:, -dim:].flip(1)                     # (D, dim), largest variance first
    rows = components.abs().argmax(0)
    components = components * torch.sign(components[rows, torch.arange(dim, device=device)])
    components, mean32 = components.float(), mean.float()
    out = torch.empty(n, dim, dtype=torch.float32, device=x.device)
    for b in _blocks(n, chunk_rows):
        out[b] = ((transform(x[b]) - mean32) @ components).to(x.device)
    return out


def _nearest(x, centroids, spherical, chunk_rows, x_sq=None, workspace=None, runner_up=False, rows=None):
    """Nearest centroid of every row of x (or of x[rows]), block by block: the body of `assign_to_centroids`, which
    the Lloyd loop also calls with `runner_up` for the distance to the second-nearest centroid (its lower bounds).

    Each block is one BLAS product of scores whose row minimum is the nearest centroid, as in faiss's exhaustive
    search: ||c||^2 - 2 x.c for L2 (||x||^2 is the same for every centroid, so it is added only to the minimum) and
    -x.c when spherical. The minimum's position comes from vectorised passes (row minimum, then the largest k - j
    over the positions j holding it), exact and several times faster than torch's argmin kernel. x_sq, if given,
    holds the squared norms of the rows searched; workspace is an optional (2, >= min(chunk_rows, m), k) float32
    buffer. Returns assignments (m,) int64, distances (m,) float32 (squared L2 clamped at 0, or the inner product
    when spherical) and the same distance to the second-nearest centroid when runner_up (else None), on the
    centroids' device, m = len(rows) or n. Ties go to the lowest centroid id.
    """
    dev = centroids.device
    n, k = (x.shape[0] if rows is None else rows.shape[0]), centroids.shape[0]
    assign = torch.empty(n, dtype=torch.long, device=dev)
    best = torch.empty(n, 1, dtype=torch.float32, device=dev)
    second = torch.empty(n, 1, dtype=torch.float32, device=dev) if runner_up else None
    norms = None if spherical or x_sq is not None else torch.empty(n, dtype=torch.float32, device=dev)
    if workspace is None:
        workspace = torch.empty(2, min(chunk_rows, n), k, dtype=torch.float32, device=dev)
    c_sq = (centroids * centroids).sum(1)
    reverse_ids = torch.arange(k, 0, -1, dtype=torch.float32, device=dev)  # k - j
    for b in _blocks(n, chunk_rows):
        xb = (x[b] if rows is None else x.index_select(0, rows[b])).to(dev, torch.float32, non_blocking=True)
        block, minima = workspace[0, :xb.shape[0]], workspace[1, :xb.shape[0]]
        torch.addmm(c_sq, xb, centroids.T, beta=0 if spherical else 1, alpha=-1 if spherical else -2, out=block)
        torch.amin(block, 1, keepdim=True, out=best[b])
        torch.eq(block, best[b], out=minima)
        assign[b] = k - torch.amax(minima.mul_(reverse_ids), 1)
        if runner_up:
            block.scatter_(1, assign[b].unsqueeze(1), float("inf"))
            torch.amin(block, 1, keepdim=True, out=second[b])
        if norms is not None:
            norms[b] = (xb * xb).sum(1)
    best, second = best.squeeze(1), None if second is None else second.squeeze(1)
    for dist in (best, second) if runner_up else (best,):
        if spherical:
            dist.neg_()
        else:
            dist += norms if x_sq is None else x_sq
            dist.clamp_min_(0)  # round-off of ||x||^2 - 2 x.c + ||c||^2 can fall below 0
    return assign, best, second


def assign_to_centroids(x, centroids, spherical=False, chunk_rows=None):
    """Nearest centroid of every row of x (faiss `index.search(x, 1)`), in blocks of `chunk_rows` rows; by default
    blocks of `distance_block_rows` rows.

    x (n, d) finite, on any device (streamed to the compute device block by block), centroids (k, d) float32 on the
    compute device. Returns assignments (n,) int64 and distances (n,) float32 on the compute device: squared L2
    distance, or the inner product when spherical (IndexFlatIP). Ties go to the lowest centroid id.
    """
    chunk_rows = chunk_rows or distance_block_rows(centroids.shape[0], centroids.device)
    assign, dist, _ = _nearest(x, centroids, spherical, chunk_rows)
    return assign, dist


def _split_empty_clusters(centroids, counts, generator):
    """Re-seed empty clusters in place as faiss's `split_clusters` does (SPEC 6.c step 5).

    For each empty cluster i (in id order) a donor j is drawn with probability proportional to counts[j] - 1;
    i gets a copy of j's centroid and the two are pushed apart by a relative +-1/1024 on alternating coordinates,
    and j's count is shared between them. If no cluster has two points, empty clusters are left unchanged.
    centroids (k, d) float32, counts (k,) float64 (both modified). Returns the number of splits.
    """
    empty = (counts == 0).nonzero().flatten().tolist()
    if not empty:
        return 0
    d = centroids.shape[1]
    eps = 1.0 / 1024
    up = torch.full((d,), 1 + eps, device=centroids.device)
    up[1::2] = 1 - eps
    down = 2 - up
    splits = 0
    for i in empty:
        weights = (counts - 1).clamp_min(0).cpu()
        if float(weights.sum()) <= 0:
            break
        j = int(torch.multinomial(weights, 1, generator=generator))
        centroids[i] = centroids[j] * up
        centroids[j] = centroids[j] * down
        counts[i] = counts[j] / 2
        counts[j] -= counts[i]
        splits += 1
    return splits


def _rows_to_reassign(train, centroids, previous, assign, lower, margin, buffer):
    """Rows of train (n, d) whose nearest centroid may differ from `assign` now that the centroids moved from
    `previous` to `centroids`; the other rows keep theirs (Hamerly, "Making k-means even faster", SDM 2010).

    lower (n,) float64 bounds each row's distance to every centroid but its own from below; it is lowered in place by
    the farthest any centroid moved (triangle inequality). The upper bound is the row's distance to its own
    centroid, computed afresh in float32 (1/k of a full search; `buffer` is an (n, d) float32 workspace). A row
    keeps its centroid for certain when lower^2 exceeds that squared distance by more than 2 margin (margin (n,),
    see `_lloyd`): the full search could then neither pick another centroid nor tie, so pruning never changes an
    assignment. Returns the indices (m,) of the rows to search.
    """
    lower -= (centroids.double() - previous.double()).norm(dim=1).max()
    own_sq = torch.index_select(centroids, 0, assign, out=buffer).sub_(train).square_().sum(1)
    return (lower.clamp_min(0).square() - own_sq <= 2 * margin).nonzero().squeeze(1)


def _lloyd(train, centroids, iterations, spherical, chunk_rows, generator):
    """`iterations` Lloyd steps from centroids (k, d) on train (n, d) float32, as the loop of faiss's
    `Clustering::train` (SPEC 6.c.5): assign every row to its nearest centroid, move each centroid to the mean of
    its rows, re-seed empty clusters (`_split_empty_clusters`, drawing from `generator`), L2-normalise them when
    spherical.

    Same assignments as searching every row at every step, with less work (issue 14): a step searches only the rows
    that `_rows_to_reassign` cannot rule out (every row at the first and the last step, whose distances make the
    objective); the float64 sums behind the means are updated by the rows that changed cluster (they differ from
    fresh sums by float64 round-off, ~1e-16 relative, far below the float32 resolution of the centroids); a run
    that reached a fixed point goes straight to its last step. Selecting rows costs a few host syncs per step (the
    empty-cluster check was one already). Returns the final centroids (k, d) and faiss's objective, the sum of the
    last step's distances (0-dim float64 tensor).
    """
    n, d = train.shape
    k, dev = centroids.shape[0], train.device
    train_sq = (train * train).sum(1)
    # Twice a bound on the float32 round-off of one computed squared distance (BLAS score plus ||x||^2, or a direct
    # sum of squares): (d + 2) 2^-24 (|x| + max|c|)^2 for any summation order; the factor 2 covers the float64 bound
    # arithmetic and, when spherical, the centroids' norms being 1 only up to round-off.
    rel_err = 2 * (d + 2) * 2.0 ** -24
    x_norm = train_sq.double().sqrt()
    assign = torch.full((n,), k, dtype=torch.long, device=dev)  # k: no cluster yet, a spare row of `sums`
    sums = torch.zeros(k + 1, d, dtype=torch.float64, device=dev)
    lower = torch.empty(n, dtype=torch.float64, device=dev)
    workspace = torch.empty(2, min(chunk_rows, n), k, dtype=torch.float32, device=dev)
    buffer = torch.empty(n, d, device=dev)
    previous, split, last = None, 0, False
    for step in range(iterations):
        last = last or step == iterations - 1
        margin = rel_err * (x_norm + centroids.norm(dim=1).max()).square()
        if previous is None or last:
            rows = torch.arange(n, device=dev)
        else:
            rows = _rows_to_reassign(train, centroids, previous, assign, lower, margin, buffer)
        old, rows_sq = assign.index_select(0, rows), train_sq.index_select(0, rows)
        new, dist, second = _nearest(train, centroids, spherical, chunk_rows, rows_sq, workspace, True, rows)
        if spherical:  # |x - c|^2 = |x|^2 + 1 - 2 x.c for unit centroids
            second = rows_sq + 1 - 2 * second
        lower.index_copy_(0, rows, (second.double() - margin.index_select(0, rows)).clamp_min_(0).sqrt_())
        assign.index_copy_(0, rows, new)
        moved = (new != old).nonzero().squeeze(1)
        moved_x = train.index_select(0, rows.index_select(0, moved)).double()
        sums.index_put_((old.index_select(0, moved),), moved_x.neg(), accumulate=True)
        sums.index_put_((new.index_select(0, moved),), moved_x, accumulate=True)
        previous = centroids
        counts = torch.bincount(assign, minlength=k).double()
        centroids = (sums[:k] / counts.clamp_min(1).unsqueeze(1)).float()
        split, was_split = _split_empty_clusters(centroids, counts, generator), split
        if spherical:
            centroids = F.normalize(centroids, dim=1)
        if last:
            break
        # No row moved and no centroid was split now or before: the centroids are the previous ones again and every
        # later step would repeat this one, so only the last remains.
        last = len(moved) == 0 and split == 0 and was_split == 0
    return centroids, dist.double().sum()


def kmeans(x, k, iterations=100, restarts=5, seed=0, max_points_per_centroid=256, spherical=False, device=None,
           chunk_rows=None):
    """k-means of x (n, d) with the semantics of `faiss.Kmeans(d, k, niter, nredo, spherical, seed)` (SPEC 6.c.5).

    - If n > k * max_points_per_centroid, training uses a random subsample of k * max_points_per_centroid rows.
    - Each of `restarts` runs starts from k distinct random training rows (faiss's nredo) and does `iterations`
      Lloyd steps (`_lloyd`: assign, then recompute centroids as means; empty clusters are re-seeded by splitting a
      large one, see `_split_empty_clusters`). The run with the lowest objective is kept (highest when spherical).
    - Spherical: centroids are L2-normalised after every update and assignment is by largest inner product.
    - Finally every row of x is assigned to the kept centroids.
    Distances are computed in blocks of `chunk_rows` rows (default: `distance_block_rows`), so memory stays
    bounded for millions of points; the work runs on `device` (default: CUDA when available) with x streamed to it
    block by block. Deterministic for a fixed seed (torch.Generator; on GPU up to floating-point reduction order).
    Returns (centroids (k, d) float32, assignments (n,) int64, objective float) on the compute device; objective
    is faiss's: the sum over training rows of the squared distance (inner product when spherical) at the last
    assignment step of the kept run.
    """
    if x.dim() != 2:
        raise ValueError(f"kmeans expects an (n, d) matrix, got shape {tuple(x.shape)}")
    n, d = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"kmeans needs 1 <= k <= number of points, got k={k} for {n} points")
    if iterations < 1 or restarts < 1:
        raise ValueError(f"kmeans needs iterations >= 1 and restarts >= 1, got {iterations} and {restarts}")
    if not torch.stack(torch.aminmax(x)).isfinite().all():  # NaN and inf reach the extremes; one vectorised pass
        raise ValueError("kmeans needs finite points, got NaN or infinite values")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    chunk_rows = chunk_rows or distance_block_rows(k, device)

    if n > k * max_points_per_centroid:
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k * max_points_per_centroid]
        train = x[idx.to(x.device)].to(device, torch.float32)
    else:
        train = x.to(device, torch.float32)

    best = None
    for redo in range(restarts):
        # faiss seeds restart r with seed + 1 + r * 15486557.
        gen = torch.Generator().manual_seed(seed + 1 + redo * 15486557)
        centroids = train[torch.randperm(train.shape[0], generator=gen)[:k].to(device)].clone()
        if spherical:
            centroids = F.normalize(centroids, dim=1)
        centroids, objective = _lloyd(train, centroids, iterations, spherical, chunk_rows, gen)
        objective = float(objective)
        if best is None or (objective > best[1] if spherical else objective < best[1]):
            best = (centroids, objective)
    centroids, objective = best
    assignments, _ = assign_to_centroids(x, centroids, spherical, chunk_rows)
    return centroids, assignments, objective


def benchmark_kmeans(device, ks=(100, 500), n=1_000_000, dim=50):
    """Time `kmeans` on the largest work of the protocol (issue 14): n x dim standard-normal float32 points on the
    host, the protocol's 100 iterations, 5 restarts, 256 training points per centroid, then every point assigned.
    Prints one line per K; compare with faiss on the same machine, interleaved, since the timings vary with load."""
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(0))
    print(f"benchmark: k-means of {n} x {dim} points on {device} with {torch.get_num_threads()} CPU threads")
    for k in ks:
        start = time.perf_counter()
        _, assignments, _ = kmeans(x, k, device=device)
        assignments.cpu()  # waits for the device
        print(f"kmeans {n / 1e6:g}M x {dim} K={k}: {time.perf_counter() - start:.2f} s", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Progress lines and pictures, for every evaluation script
# ----------------------------------------------------------------------------------------------------------------

class Progress:
    """Progress of one loop of `total` steps on a text stream: 'what: done/total unit, rate unit/s, ETA h:mm:ss'.

    On a terminal the line is redrawn in place (carriage return) at most every TTY_INTERVAL seconds; on a log (not a
    terminal) one line is written at most every LOG_INTERVAL seconds, so a long run leaves a readable log. The first
    update, the last (done == total) and those marked `record` (an epoch's end, a k-means run) are always written,
    and stay as lines on a terminal too. The ETA assumes the remaining steps take as long as the done ones on
    average. stream None: silent (--quiet, or a library caller such as train.py's monitor). Use as a context
    manager, or call `close`, so that a terminal line cut short by an error still ends.
    """
    TTY_INTERVAL = 0.2
    LOG_INTERVAL = 10.0

    def __init__(self, what, total, unit, stream=None):
        self.what, self.total, self.unit, self.stream = what, total, unit, stream
        self.tty = stream is not None and stream.isatty()
        self.start = time.perf_counter()
        self.last = None
        self.open_width = 0  # length of the line drawn in place on a terminal, 0 when none is open

    def update(self, done, info="", record=False):
        """Report `done` of `total` steps; `info` is appended (e.g. 'epoch 3/25, loss 0.41' or 'K=300 seed 2')."""
        if self.stream is None:
            return
        now = time.perf_counter()
        record = record or done >= self.total
        due = self.last is None or now - self.last >= (self.TTY_INTERVAL if self.tty else self.LOG_INTERVAL)
        if not (record or due):
            return
        self.last = now
        elapsed = now - self.start
        rate = done / elapsed if done and elapsed > 0 else None
        eta = format_seconds((self.total - done) / rate) if rate else "?"
        line = (f"{self.what}: {done}/{self.total} {self.unit}" + (f", {info}" if info else "")
                + (f", {rate:.3g} {self.unit}/s" if rate else "") + f", ETA {eta}")
        if self.tty:
            self.stream.write("\r" + line.ljust(self.open_width) + ("\n" if record else ""))
            self.open_width = 0 if record else len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self):
        """End a line left open on a terminal."""
        if self.open_width:
            self.stream.write("\n")
            self.stream.flush()
            self.open_width = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def format_seconds(seconds):
    """'m:ss' or 'h:mm:ss'."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def voc_palette(n=256):
    """The PASCAL VOC colour map (n, 3) uint8 (0 black, 255 the VOC void colour), used for every label map the
    scripts draw: classes, clusters and communities. Its bit-interleaving gives n distinct colours for any n."""
    palette = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette[i] = (r, g, b)
    return palette


def save_panel(path, image, maps):
    """PNG of an image and label maps side by side (paper Figures 3 and 4), 4-pixel white gaps, all at image size.

    image (3, S, S) ImageNet-normalised; maps: [(labels (h, w) integer, palette (n, 3) uint8 with n > max label)],
    each nearest-resized to S x S (`resize_labels`) and drawn as palette[labels].
    """
    size = image.shape[-1]
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    tiles = [((image.cpu() * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()]
    for labels, palette in maps:
        tiles.append(palette[resize_labels(torch.as_tensor(labels)[None].long().cpu(), size)[0].numpy()])
    gap = np.full((size, 4, 3), 255, dtype=np.uint8)
    panel = np.concatenate([t for tile in tiles for t in (tile, gap)][:-1], axis=1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(panel.astype(np.uint8)).save(path)


def maps_folder(save_maps, maps_dir, beside):
    """Where --save-maps N writes (None for N = 0): --maps-dir, else maps/ beside `beside` (the JSON file's or the
    output folder). Called before the long work, so a bad argument fails at once."""
    if save_maps < 0:
        raise ValueError(f"--save-maps must be >= 0, got {save_maps}")
    if not save_maps:
        return None
    if maps_dir:
        return Path(maps_dir)
    if not beside:
        raise ValueError("--save-maps needs --maps-dir when no output file or folder is written")
    return Path(beside) / "maps"


# ----------------------------------------------------------------------------------------------------------------
# Features (SPEC 6 common preprocessing, 6.c steps 1-2)
# ----------------------------------------------------------------------------------------------------------------

PRECISIONS = ("fp32", "bf16")


@torch.no_grad()
def backbone_tokens(backbone, images, return_attention=False, precision="fp32"):
    """Frozen spatial tokens of a batch: images (B, 3, H, W) -> (B, H/P, W/P, D) float32 on the images' device.

    precision "fp32" runs the backbone in float32 (the evaluation default: a published number must not depend on
    the GPU's autocast), "bf16" under bfloat16 autocast on the images' device (faster on a GPU). With
    return_attention also returns the last block's CLS attention over the patches, (B, heads, h*w) float32.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    p = backbone.patch_size
    b, _, h, w = images.shape
    if h % p or w % p:
        raise ValueError(f"input size {h}x{w} is not divisible by the backbone's patch size {p}")
    with torch.autocast(device_type=images.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = backbone(images, return_attention=return_attention)
    tokens, attention = out if return_attention else (out, None)
    tokens = tokens.float().reshape(b, h // p, w // p, -1)
    return (tokens, attention.float()) if return_attention else tokens


def _nearest_sources(size_in, size_out, device):
    """Source index of every output index under PyTorch's legacy nearest rule (src = floor(dst * in / out) in
    float32), read off F.interpolate itself on a ramp of indices, so the rule is PyTorch's by construction."""
    ramp = torch.arange(size_in, dtype=torch.float32).reshape(1, 1, size_in)
    return F.interpolate(ramp, size=size_out, mode="nearest")[0, 0].long().to(device)


def resize_labels(maps, size):
    """Label maps (N, H, W) -> (N, size, size), same dtype, by PyTorch's legacy nearest (src = floor(dst * in / out)),
    the rule of every mask and cluster-map resize in the original pipeline (SPEC 6). Done by indexing, so a uint8
    split is never widened to float."""
    maps = torch.as_tensor(maps)
    if maps.dim() != 3:
        raise ValueError(f"expected label maps of shape (N, H, W), got {tuple(maps.shape)}")
    if tuple(maps.shape[1:]) == (size, size):
        return maps
    rows = _nearest_sources(maps.shape[1], size, maps.device)
    cols = _nearest_sources(maps.shape[2], size, maps.device)
    return maps.index_select(1, rows).index_select(2, cols)


@torch.no_grad()
def extract_features(backbone, dataset, batch_size=16, device=None, num_workers=0, return_attention=False,
                     mask_size=None, precision="fp32", dtype=torch.float32, return_features=True, progress=None):
    """Spatial tokens of every item of a labelled eval dataset (SPEC 6.c step 1).

    dataset items: (image (3, S, S) float, mask (S, S) integer labels < 256, as data.py reads them from 8-bit
    PNGs). Runs the backbone in eval mode on `device` (default: where its parameters are; its train/eval mode is
    restored afterwards) at `precision` (see `backbone_tokens`). Everything is written into tensors allocated once
    for the whole split (no list to concatenate, so no transient second copy).
    Returns a dict of CPU tensors: features (N, h, w, D) in `dtype` (float32; eval_linear's token cache keeps
    bfloat16), masks (N, S, S) uint8 (or (N, mask_size, mask_size) when mask_size is given: nearest-downsampled
    during extraction, identical to doing it later), with return_attention attention (N, heads, h*w) float32, and
    without return_features no features (an attention-only pass, e.g. for a second checkpoint's foreground hint).
    progress: a text stream for progress lines (images done, images/s, ETA; see `Progress`), or None for none.
    """
    if len(dataset) == 0:
        raise ValueError("the evaluation dataset is empty")
    device = torch.device(device) if device is not None else next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval().to(device)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         pin_memory=device.type == "cuda")
    n = len(dataset)
    out = {}
    pos = 0
    meter = Progress("backbone", n, "images", progress)
    try:
        for images, batch_masks in loader:
            tokens = backbone_tokens(backbone, images.to(device, non_blocking=True), return_attention, precision)
            tokens, attn = tokens if return_attention else (tokens, None)
            if mask_size is not None:
                batch_masks = resize_labels(batch_masks, mask_size)
            if not out:
                out["masks"] = torch.empty((n,) + batch_masks.shape[1:], dtype=torch.uint8)
                if return_features:
                    out["features"] = torch.empty((n,) + tokens.shape[1:], dtype=dtype)
                if return_attention:
                    out["attention"] = torch.empty((n,) + attn.shape[1:], dtype=torch.float32)
            b = tokens.shape[0]
            out["masks"][pos:pos + b] = batch_masks
            if return_features:
                out["features"][pos:pos + b] = tokens.to(dtype).cpu()
            if return_attention:
                out["attention"][pos:pos + b] = attn.cpu()
            pos += b
            meter.update(pos)
    finally:
        meter.close()
        backbone.train(was_training)
    return out


# ----------------------------------------------------------------------------------------------------------------
# The overclustering protocol (SPEC 6.c)
# ----------------------------------------------------------------------------------------------------------------

def overcluster(features, masks, num_classes, ks=(100, 300, 500), seeds=range(5), mask_size=100, pca_dim=50,
                device=None, iterations=100, restarts=5, matching=None, keep_maps=0, progress=None):
    """SPEC 6.c on already extracted features: standardise, PCA, k-means per K and seed, match, mIoU.

    features (N, h, w, D) float; masks (N, S, S) integer with 255 = ignore (any S; nearest-downsampled to
    mask_size). pca_dim None or >= D skips the PCA. matching None picks the paper's: Hungarian when K equals
    num_classes, else many-to-one by precision. iterations/restarts default to the protocol's 100/5; train.py's
    quick monitor may pass fewer, with small ks and seeds. With the PCA the features are standardised block by
    block inside it (`standardizer`), so the only copy besides them is the (N*h*w, pca_dim) projection; without
    it, the one copy is the standardised features.
    Returns {K: {"miou": [per seed], "mean", "std" (ddof 0), "iou_per_class": [per seed, per class],
    "objective": [per seed], "matching"}}; with keep_maps > 0 also, from each K's first seed, "maps": the cluster
    maps (keep_maps, mask_size, mask_size) int64 of the first images and "match": (K,) the class each cluster was
    matched to (for `--save-maps`; not JSON). progress: a stream for one line per k-means run (K, seed, ETA).
    """
    if features.dim() != 4:
        raise ValueError(f"features must be (N, h, w, D), got shape {tuple(features.shape)}")
    n, h, w, dim = features.shape
    if masks.shape[0] != n:
        raise ValueError(f"{n} feature maps but {masks.shape[0]} masks")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    x = features.reshape(-1, dim)
    if pca_dim is not None and pca_dim < dim:
        x = pca(x, pca_dim, device=device, transform=standardizer(x, device=device))
    else:
        x = standardize(x, device=device)
    gt = resize_labels(masks.to(device), mask_size)
    results = {}
    with Progress("k-means", len(ks) * len(seeds), "runs", progress) as meter:
        for k in ks:
            mode = matching or ("hungarian" if k == num_classes else "many_to_one_precision")
            runs, kept = [], {}
            for seed in seeds:
                meter.update(len(results) * len(seeds) + len(runs), f"now K={k} seed {seed}", record=True)
                _, assign, objective = kmeans(x, k, iterations=iterations, restarts=restarts, seed=seed,
                                              device=device)
                # int32 maps: half the memory of the int64 assignments at the evaluation size.
                cluster_map = resize_labels(assign.to(torch.int32).reshape(n, h, w), mask_size)
                res = match_and_score(confusion_matrix(gt, cluster_map.to(gt.device), num_classes, k), mode)
                if keep_maps and not kept:
                    kept = dict(maps=cluster_map[:keep_maps].long().cpu(), match=res["match"])
                runs.append((res["miou"], res["iou_per_class"].tolist(), objective))
            mious = [r[0] for r in runs]
            results[k] = {"miou": mious, "mean": float(np.mean(mious)), "std": float(np.std(mious)),
                          "iou_per_class": [r[1] for r in runs], "objective": [r[2] for r in runs],
                          "matching": mode, **kept}
        meter.update(len(ks) * len(seeds))
    return results


# ----------------------------------------------------------------------------------------------------------------
# Command line (shared with eval_linear.py: backbone, data and device arguments)
# ----------------------------------------------------------------------------------------------------------------

def add_backbone_and_data_args(parser):
    """Arguments every evaluation script takes: which frozen backbone, which labelled data, where and at which
    precision to run, and whether to show progress."""
    parser.add_argument("--pretrained", default=None,
                        help="backbone checkpoint path or URL: anything leopart_core.load_backbone reads (DINO/DINOv2 "
                             "backbones, DINO full checkpoints, the released Leopart .ckpt, Lightning and this "
                             "project's training checkpoints; SPEC 9). 'none' or absent: random init of --arch")
    parser.add_argument("--arch", default=None,
                        help=f"{', '.join(ARCHS)}; inferred from the checkpoint when omitted, required for a random "
                             "init")
    parser.add_argument("--patch-size", type=int, default=None,
                        help="patch size of a DINO --arch (default 16; the paper's ViT-B/8 needs 8)")
    parser.add_argument("--init-seed", type=int, default=0, help="torch seed of a random-init backbone")
    parser.add_argument("--dataset", default="voc", choices=("voc", "coco_stuff", "coco_thing", "folder", "synthetic"),
                        help="labelled data set (SPEC 7): VOC 21 classes incl. background, COCO-Stuff 15 and "
                             "COCO-Thing 12 super-categories, a labelled folder (images/, labels/, <split>.txt), "
                             "or the built-in synthetic scenes")
    parser.add_argument("--data-root", default=None, help="root folder of the data set (see data.py for layouts)")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="number of label values of a --dataset folder (labels 0..C-1, 255 = ignore)")
    parser.add_argument("--input-size", type=int, default=448,
                        help="images are resized to SxS, aspect ratio not kept (SPEC 6: 448; must be a multiple "
                             "of the patch size)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per backbone forward pass")
    parser.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="DataLoader worker processes (default: 4, or fewer on a smaller machine)")
    parser.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1'")
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS,
                        help="backbone arithmetic: fp32 (default) so that a published number does not depend on the "
                             "GPU's autocast (TF32 at torch's defaults); bf16 runs the backbone under bfloat16 "
                             "autocast, faster on a GPU but not bit-comparable")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress lines (images/s, k-means runs, epochs, each with an ETA) on stderr; they "
                             "are redrawn in place on a terminal and written one per 10 s to a log")
    return parser


def resolve_device(name):
    """torch.device for --device; 'auto' picks CUDA when available. A CUDA request without CUDA is an error."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r} is not a torch device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def build_frozen_backbone(pretrained, arch=None, patch_size=None, device="cpu", init_seed=0):
    """The backbone to evaluate, in eval mode with requires_grad off (SPEC 6.a "frozen"), and a description.

    pretrained: a checkpoint path/URL for `leopart_core.load_backbone`, or None/'none' for a random init of `arch`
    (seeded with `init_seed`, the baseline every pretrained score should clearly beat).
    """
    if pretrained is None or str(pretrained).lower() == "none":
        if not arch:
            raise ValueError("a random-init backbone (--pretrained none) needs --arch, e.g. --arch vit_small")
        torch.manual_seed(init_seed)
        model = build_vit(arch, patch_size)
        description = f"random init {arch} (seed {init_seed})"
    else:
        pretrained = str(pretrained)
        model = load_backbone(pretrained, arch, patch_size)
        description = pretrained
    model.eval().requires_grad_(False).to(device)
    return model, description


def build_split(args, split, transform=None, max_images=None):
    """`data.build_eval_dataset` for the script arguments, optionally cut to its first `max_images` items.

    Returns (dataset, num_classes, files).
    """
    dataset = build_eval_dataset(args.dataset, args.data_root, split, size=args.input_size, transform=transform,
                                 num_classes=args.num_classes)
    num_classes, files = dataset.num_classes, list(dataset.files)
    if len(dataset) == 0:
        raise ValueError(f"split {split!r} of {args.dataset} under {args.data_root} has no images")
    if max_images is not None and max_images < len(dataset):
        dataset = torch.utils.data.Subset(dataset, range(max_images))
        files = files[:max_images]
    return dataset, num_classes, files


def write_json(obj, path):
    """Write JSON atomically (temporary file, then os.replace), creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def get_args_parser():
    parser = argparse.ArgumentParser(
        prog="eval_cluster.py",
        description="Overclustering evaluation of a frozen backbone (SPEC 6.c; paper Tables 1-3, K=100/300/500): "
                    "tokens at 448 px, standardise, PCA-50, k-means per K and seed, many-to-one by precision, mIoU.")
    add_backbone_and_data_args(parser)
    parser.add_argument("--split", default="val",
                        help="split to cluster and score; the original fits k-means on val itself (SPEC 6.c.1, 8.9)")
    parser.add_argument("--max-images", type=int, default=None,
                        help="use only the first N images of the split (smoke runs; the protocol uses all)")
    parser.add_argument("--ks", type=int, nargs="+", default=[100, 300, 500],
                        help="numbers of clusters K (SPEC 6.c.5). K == number of classes uses Hungarian matching, "
                             "other K many-to-one by precision (6.c.7)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                        help="k-means seeds; the paper reports the mean over 5 (SPEC 6.c.8)")
    parser.add_argument("--mask-size", type=int, default=100,
                        help="masks and cluster maps are compared at this size, nearest (SPEC 6.c.2, 6.c.6: 100)")
    parser.add_argument("--pca-dim", type=int, default=50,
                        help="PCA dimensions after standardisation (SPEC 6.c.4: 50); 0 disables the PCA")
    parser.add_argument("--iterations", type=int, default=100,
                        help="Lloyd iterations per run (faiss niter, SPEC 6.c.5)")
    parser.add_argument("--restarts", type=int, default=5,
                        help="k-means restarts keeping the lowest objective (faiss nredo, SPEC 6.c.5)")
    parser.add_argument("--output-json", default="output/eval_cluster.json",
                        help="where to write the results (protocol, mean/std per K, per-seed per-class IoU)")
    parser.add_argument("--save-maps", type=int, default=0, metavar="N",
                        help="write a PNG for each of the first N images: image | ground truth | clusters coloured "
                             "by their matched class | raw clusters (VOC palette), for the first --ks value and "
                             "the first seed; one file per image, named after it")
    parser.add_argument("--maps-dir", default=None,
                        help="folder for --save-maps (default: maps/ beside --output-json)")
    parser.add_argument("--benchmark-kmeans", action="store_true",
                        help="only time k-means on 1M x 50 random points for K=100 and 500 on --device (issue 14) "
                             "and exit; needs no backbone or data")
    return parser


def save_cluster_maps(folder, dataset, files, masks, cluster_maps, match):
    """--save-maps: for image i a PNG image | ground truth | matched clusters | raw clusters, named after its file.

    masks (N, E, E) ground truth (255 void); cluster_maps (n, E, E) cluster ids of the first n images; match (K,)
    the class of every cluster. Classes (and void) take the VOC colours, clusters the first K VOC colours.
    Returns the paths written.
    """
    class_palette, cluster_palette = voc_palette(256), voc_palette(len(match))
    paths = []
    for i, clusters in enumerate(cluster_maps):
        paths.append(Path(folder) / f"{Path(str(files[i])).stem}.png")
        save_panel(paths[-1], dataset[i][0], [(masks[i], class_palette), (match[clusters], class_palette),
                                               (clusters, cluster_palette)])
    return paths


def main(args):
    """Run the overclustering protocol for the arguments; returns the JSON-ready result dict (None for
    --benchmark-kmeans, which only prints timings)."""
    if args.benchmark_kmeans:
        return benchmark_kmeans(resolve_device(args.device))
    device = resolve_device(args.device)
    progress = None if args.quiet else sys.stderr
    maps_dir = maps_folder(args.save_maps, args.maps_dir, Path(args.output_json).parent if args.output_json else None)
    backbone, description = build_frozen_backbone(args.pretrained, args.arch, args.patch_size, device,
                                                  args.init_seed)
    check_input_size(args.input_size, backbone.patch_size, "--input-size")
    dataset, num_classes, files = build_split(args, args.split, max_images=args.max_images)
    start = time.perf_counter()
    extracted = extract_features(backbone, dataset, batch_size=args.batch_size or 16, device=device,
                                 num_workers=args.num_workers, mask_size=args.mask_size, precision=args.precision,
                                 progress=progress)
    extract_s = time.perf_counter() - start
    n, h, w, dim = extracted["features"].shape
    print(f"extracted {n} x {h}x{w} tokens of dim {dim} in {extract_s:.1f} s ({n / extract_s:.2f} images/s)")
    start = time.perf_counter()
    results = overcluster(extracted["features"], extracted["masks"], num_classes, ks=args.ks, seeds=args.seeds,
                          mask_size=args.mask_size, pca_dim=args.pca_dim or None, device=device,
                          iterations=args.iterations, restarts=args.restarts, keep_maps=args.save_maps,
                          progress=progress)
    cluster_s = time.perf_counter() - start
    if args.save_maps:
        kept = {k: (r.pop("maps"), r.pop("match")) for k, r in results.items()}
        paths = save_cluster_maps(maps_dir, dataset, files, extracted["masks"], *kept[args.ks[0]])
        print(f"wrote {len(paths)} cluster maps (K={args.ks[0]}, seed {args.seeds[0]}) to {maps_dir}")
    protocol = {"checkpoint": description, "dataset": args.dataset, "data_root": args.data_root, "split": args.split,
                "num_images": n, "num_classes": num_classes, "input_size": args.input_size, "token_grid": [h, w],
                "mask_size": args.mask_size, "pca_dim": args.pca_dim, "seeds": list(args.seeds),
                "precision": args.precision, "iterations": args.iterations, "restarts": args.restarts,
                "max_points_per_centroid": 256, "extract_seconds": extract_s, "cluster_seconds": cluster_s,
                "device": str(device)}
    print("protocol: " + ", ".join(f"{k} {v}" for k, v in protocol.items() if k not in ("extract_seconds",
                                                                                        "cluster_seconds")))
    print(f"{'K':>6} {'matching':>22} {'mIoU mean':>10} {'std':>7}  per seed")
    for k, r in results.items():
        seeds = " ".join(f"{100 * m:.2f}" for m in r["miou"])
        print(f"{k:>6} {r['matching']:>22} {100 * r['mean']:>10.2f} {100 * r['std']:>7.2f}  {seeds}")
    report = {"protocol": protocol, "results": {str(k): v for k, v in results.items()}, "files": files}
    if args.output_json:
        write_json(report, args.output_json)
        print(f"wrote {args.output_json}")
    return report


if __name__ == "__main__":
    arguments = get_args_parser().parse_args()
    try:
        main(arguments)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"eval_cluster.py: error: {error_message(error)}")
