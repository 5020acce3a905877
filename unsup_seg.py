"""Fully unsupervised semantic segmentation with a Leopart backbone: CBFE + community detection (paper Sec. 3.2).

The pipeline of the original `experiments/fully_unsup_seg/fully_unsup_seg.py` (SPEC 6.d), in one run:

1. Spatial tokens (and last-block CLS attention) of the backbone for the train and val splits; standardisation and
   PCA-50 fitted on train+val together.
2. Cluster-based foreground extraction (CBFE, paper 3.2.1): spherical k-means (K=200) of all tokens; a noisy
   foreground hint from the CLS attention (`leopart_core.foreground_mask`, 60% of the mass) of the same backbone or
   of a second checkpoint; per-cluster precision against the hint; a precision threshold c; clusters with precision
   >= c are foreground.
3. k-means (K=149) of the foreground pixels only, background = label K (Table 5 "+CBFE" uses K = #classes - 1).
4. Community detection (CD, paper 3.2.2): a co-occurrence network of the K+1 labels over the 16 neighbourhood
   offsets, edges min(P(j|i), P(i|j)) above a weight threshold, Infomap communities, clusters merged to
   communities, Hungarian mIoU averaged over the Infomap runs.

Reported: the K=#classes baseline without CBFE/CD, CBFE-only, CBFE+CD, the supervised many-to-one upper bound,
foreground Jaccard and boundary F1 (correct and paper-compatible, SPEC 6.e), for the CBFE masks and for the hint.
Written to --output-dir: results.json, network.json (nodes, edges, communities) and one PNG panel per val image
(image | cluster map | foreground mask | final segmentation; the paper's Figures 3 and 4).

Where the original code and the paper disagree this follows the code (SPEC 8, items 9-12), with flags for the
paper's variant where it is cheap: `--fg-threshold` (the code picks the CBFE threshold with train labels;
`label-free` uses none) and `--graph-splits` (the code builds the network on train+val, the paper on train).
It takes the backbone and data arguments of eval_cluster.py, so it runs on every labelled data set data.py reads;
class 0 is taken as the background (as VOC's), the other classes as the objects.

    python unsup_seg.py --pretrained leopart_vits16.ckpt --attention-pretrained dino_deitsmall16_pretrain.pth \
        --dataset voc --data-root /data/VOC --fg-threshold paper --output-dir out/unsup_vits16
"""
import argparse
import json
import sys
import warnings
from pathlib import Path

import infomap
import numpy as np
import torch
from scipy.spatial import cKDTree

from data import error_message
from eval_cluster import (Progress, add_backbone_and_data_args, assign_to_centroids, build_frozen_backbone,
                          build_split, confusion_matrix, extract_features, kmeans, match_and_score, overcluster, pca,
                          resize_labels, resolve_device, save_panel, standardizer, voc_palette)
from leopart_core import FOREGROUND_MIN_GRID, check_input_size, foreground_mask

IGNORE_INDEX = 255

# (d_row, d_col) pairs that skimage.feature.greycomatrix visits for distances [1, 2] and the original's angles
# [0, pi/4, pi/2, 3pi/4, pi, 4pi/3, 3pi/2, 7pi/4] (SPEC 6.d step 10, golden 5a). 4pi/3 (presumably meant as 5pi/4)
# gives the knight move (-2, -1) at distance 2, and the diagonals repeat at distance 2: kept, the published numbers
# were made with them.
CO_OCCURRENCE_OFFSETS = (
    (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1),
    (0, 2), (1, 1), (2, 0), (1, -1), (0, -2), (-2, -1), (-2, 0), (-1, 1),
)

# The CBFE threshold is the best cut's precision rounded to this grid (SPEC 6.d step 6.4). Kept as numpy's
# arange values (0.15000000000000002, ...), which decide ties of `precision >= threshold` exactly as the original.
THRESHOLD_GRID = np.arange(0, 1, 0.05)

# OpenCV's chain-code directions (0 = east, then counter-clockwise with y pointing down).
_CHAIN_DX = (1, 1, 0, -1, -1, -1, 0, 1)
_CHAIN_DY = (0, -1, -1, -1, 0, 1, 1, 1)


# ----------------------------------------------------------------------------------------------------------------
# Small map helpers
# ----------------------------------------------------------------------------------------------------------------

def has_labels(masks):
    """True when a split's ground truth holds any labelled pixel (masks (N, H, W), 255 = ignore)."""
    return bool((torch.as_tensor(masks) != IGNORE_INDEX).any())


# ----------------------------------------------------------------------------------------------------------------
# Cluster-based foreground extraction (paper 3.2.1; SPEC 6.d steps 5-7; golden 5b)
# ----------------------------------------------------------------------------------------------------------------

def cluster_precisions(cluster_maps, fg_hint, num_clusters):
    """Precision of each cluster against the noisy foreground hint, averaged over the images where it occurs.

    cluster_maps (N, H, W) ids in [0, num_clusters); fg_hint (N, H, W) 0/1 -> (num_clusters,) float64. Per image
    and present cluster, prec = |cluster & hint| / |cluster|; the mean is over images, not pooled over pixels
    (`get_cluster_precs`, SPEC 6.d step 5). A cluster that occurs in no image gets NaN (the original asserts that
    every cluster occurs).
    """
    maps = torch.as_tensor(cluster_maps).long().flatten(1)
    hint = torch.as_tensor(fg_hint).flatten(1)
    if maps.shape != hint.shape:
        raise ValueError(f"cluster maps {tuple(maps.shape)} and foreground hint {tuple(hint.shape)} differ in shape")
    _check_ids(maps, num_clusters, "cluster maps")
    n = maps.shape[0]
    index = (maps + num_clusters * torch.arange(n)[:, None]).flatten()
    count = torch.bincount(index, minlength=n * num_clusters).reshape(n, num_clusters).double()
    hits = torch.bincount(index, weights=(hint == 1).flatten().double(), minlength=n * num_clusters)
    precision = hits.reshape(n, num_clusters) / count.clamp(min=1)
    present = (count > 0).double()
    with np.errstate(invalid="ignore"):
        return ((precision * present).sum(0) / present.sum(0)).numpy()


def eval_jac(gt, pred_fg, with_boundary=True, chunk=64):
    """Foreground Jaccard averaged over images (`eval_jac`, SPEC 6.e, 10.8).

    gt (N, H, W) labels (0 = background, 255 = void); pred_fg (N, H, W) 0/1. GT foreground is gt != 0, void
    included, when with_boundary (the Table 7 protocol); otherwise void is background. An image whose GT and
    prediction are both empty gives NaN, as in the original. Counted `chunk` images at a time: torch widens a
    boolean sum to int64, 8 bytes a pixel, which for a whole split at 448 px would be gigabytes.
    """
    gt, pred_fg = torch.as_tensor(gt), torch.as_tensor(pred_fg)
    if gt.shape != pred_fg.shape:
        raise ValueError(f"ground truth {tuple(gt.shape)} and prediction {tuple(pred_fg.shape)} differ in shape")
    counts = []
    for first in range(0, len(gt), chunk):
        labels, pred = gt[first:first + chunk], pred_fg[first:first + chunk] != 0
        gt_fg = labels != 0
        if not with_boundary:
            gt_fg &= labels != IGNORE_INDEX
        counts.append(torch.stack([(gt_fg & pred).flatten(1).sum(1), (gt_fg | pred).flatten(1).sum(1)], 1))
    intersection, union = torch.cat(counts).double().unbind(1)
    return (intersection / union).mean().item()


def threshold_candidates(cluster_maps, target, precisions, low=0.55, high=0.75):
    """The original's search for the CBFE cut (`find_good_threshold`, SPEC 6.d step 6).

    cluster_maps (N, H, W); target (N, H, W) labels scored by `eval_jac` (the train GT in the paper protocol, the
    0/1 hint itself label-free); precisions (K,). For start in [int(low*K), int(high*K)) the clusters at ascending
    precision ranks >= start are foreground. Returns [(precision at the cut, start, jaccard)] sorted by jaccard
    ascending (stable), so the last row is the best cut. Clusters with NaN precision (absent) never count.
    """
    precisions = np.asarray(precisions, dtype=np.float64)
    order = np.argsort(precisions)  # the original's call: its tie order decides equal-precision clusters
    order = order[~np.isnan(precisions[order])]
    sorted_precs = precisions[order]
    k = len(order)
    starts = range(int(low * k), int(high * k))
    if len(starts) == 0:
        raise ValueError(f"{k} clusters are too few to search a foreground cut between {low:.0%} and {high:.0%} "
                         "of them; use a larger --k-fg-extraction")
    maps = torch.as_tensor(cluster_maps).long()
    rows = []
    for start in starts:
        is_fg = torch.zeros(len(precisions), dtype=torch.bool)
        is_fg[torch.as_tensor(order[start:])] = True
        rows.append((float(sorted_precs[start]), start, eval_jac(target, is_fg[maps])))
    return sorted(rows, key=lambda row: row[2])


def round_threshold(precision):
    """The value of THRESHOLD_GRID closest to `precision` (first on ties), as the original rounds c."""
    return float(min(THRESHOLD_GRID, key=lambda x: abs(x - precision)))


def foreground_cluster_ids(precisions, threshold):
    """Ids (ascending) of the clusters whose precision is >= threshold (SPEC 6.d step 7); NaN never passes."""
    precisions = np.asarray(precisions, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.nonzero(precisions >= threshold)[0]


def ids_to_mask(cluster_maps, ids, num_clusters):
    """0/1 uint8 maps (N, H, W): 1 where the cluster id is in `ids`."""
    lookup = torch.zeros(num_clusters, dtype=torch.uint8)
    lookup[torch.as_tensor(np.asarray(ids), dtype=torch.long)] = 1
    return lookup[torch.as_tensor(cluster_maps).long()]


def cluster_based_fg_extraction(clusters_train, hint_train, clusters_val, hint_val, num_clusters, target_train):
    """CBFE (paper 3.2.1; `cluster_based_fg_extraction`, SPEC 6.d steps 5-7; golden 5b).

    All maps at the evaluation size: clusters_* (N, H, W) ids in [0, num_clusters); hint_* (N, H, W) 0/1;
    target_train (N_train, H, W) labels that score the candidate cuts (train GT for the paper's rule, hint_train
    for the label-free rule). Precisions are recomputed on val and the train threshold applied (no val labels).
    Returns dict: precs_train, precs_val (K,), candidates [(prec, start, jaccard)], threshold (float),
    fg_ids_train, fg_ids_val (ascending ids), fg_mask_train, fg_mask_val (N, H, W) uint8.
    Raises ValueError when no cluster reaches the threshold (the original hit an IndexError there).
    """
    for split, hint in (("train", hint_train), ("val", hint_val)):
        if not bool((torch.as_tensor(hint) == 1).any()):
            raise ValueError(f"no foreground found: the attention foreground hint of the {split} split is empty, so no "
                             "cluster can be ranked; check the attention checkpoint (--attention-pretrained)")
    precs_train = cluster_precisions(clusters_train, hint_train, num_clusters)
    candidates = threshold_candidates(clusters_train, target_train, precs_train)
    threshold = round_threshold(candidates[-1][0])
    precs_val = cluster_precisions(clusters_val, hint_val, num_clusters)
    result = dict(precs_train=precs_train, precs_val=precs_val, candidates=candidates, threshold=threshold)
    for split, precs, maps, hint in (("train", precs_train, clusters_train, hint_train),
                                     ("val", precs_val, clusters_val, hint_val)):
        ids = foreground_cluster_ids(precs, threshold)
        if len(ids) == 0:
            raise ValueError(
                f"no foreground found on the {split} split: no cluster has a foreground-hint precision >= "
                f"{threshold:.2f} (highest {np.nanmax(precs):.3f}; the hint marks "
                f"{float(torch.as_tensor(hint).float().mean()):.1%} of the pixels). Check the attention checkpoint "
                "(--attention-pretrained) or use a larger --k-fg-extraction")
        result[f"fg_ids_{split}"] = ids
        result[f"fg_mask_{split}"] = ids_to_mask(maps, ids, num_clusters)
    return result


# ----------------------------------------------------------------------------------------------------------------
# Community detection (paper 3.2.2; SPEC 6.d steps 10-13; golden 5a, 5c)
# ----------------------------------------------------------------------------------------------------------------

def co_occurrence_matrix(cluster_maps, num_clusters, offsets=CO_OCCURRENCE_OFFSETS, chunk=128):
    """Conditional co-occurrence P(j|i) of cluster ids over a local neighbourhood (`create_matrix`, SPEC 6.d step 10).

    cluster_maps (N, H, W) ids in [0, num_clusters) -> (num_clusters, num_clusters) float64. Per image: count the
    pairs (pixel with id i, pixel at offset with id j) over `offsets` (partners outside the image are skipped, no
    symmetrisation), zero the diagonal, divide each row by its sum (empty rows stay 0). P(j|i) is the sum of the
    normalised rows over images divided by the number of images where row i is non-empty; NaN for an id that never
    has a neighbour. One bincount over (image, i, j) per offset replaces skimage's greycomatrix.
    """
    maps = torch.as_tensor(cluster_maps).long()
    if maps.dim() != 3:
        raise ValueError(f"expected cluster maps of shape (N, H, W), got {tuple(maps.shape)}")
    _check_ids(maps, num_clusters, "cluster maps")
    n_images, height, width = maps.shape
    k = num_clusters
    accumulated = torch.zeros(k, k, dtype=torch.float64)
    appear = torch.zeros(k, dtype=torch.float64)
    for first in range(0, n_images, chunk):
        block = maps[first:first + chunk]
        n = block.shape[0]
        image_base = (torch.arange(n) * k * k)[:, None, None]
        counts = torch.zeros(n * k * k, dtype=torch.long)
        for d_row, d_col in offsets:
            rows = slice(max(0, -d_row), height - max(0, d_row))
            cols = slice(max(0, -d_col), width - max(0, d_col))
            shifted_rows = slice(rows.start + d_row, rows.stop + d_row)
            shifted_cols = slice(cols.start + d_col, cols.stop + d_col)
            pairs = image_base + block[:, rows, cols] * k + block[:, shifted_rows, shifted_cols]
            counts += torch.bincount(pairs.flatten(), minlength=n * k * k)
        counts = counts.reshape(n, k, k).double()
        counts.diagonal(dim1=1, dim2=2).zero_()
        row_sum = counts.sum(2, keepdim=True)
        accumulated += torch.where(row_sum > 0, counts / row_sum.clamp(min=1), 0.0).sum(0)
        appear += (row_sum[..., 0] > 0).double().sum(0)
    return (accumulated / appear[:, None]).numpy()


def community_edges(matrix, weight_threshold):
    """Undirected edges (i, j, w) for i <= j with w = min(P(j|i), P(i|j)), kept iff both are >= weight_threshold.

    matrix (K, K) from `co_occurrence_matrix`. Row-major (i, j) order as the original (SPEC 6.d step 11); the zero
    diagonal and NaN rows never pass.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        keep = np.triu((matrix >= weight_threshold) & (matrix.T >= weight_threshold))
    weights = np.minimum(matrix, matrix.T)
    return [(int(i), int(j), float(weights[i, j])) for i, j in zip(*np.nonzero(keep))]


def detect_communities(edges, num_nodes, markov_time, num_modules, seed):
    """Two-level undirected Infomap on `edges` (SPEC 6.d step 12) -> (communities (num_nodes,) int64, codelength).

    communities[i] is the 1-based module of cluster i, or -1 when i is in no edge. `num_modules` is Infomap's
    preferred number of modules (the number of object classes, 20 on VOC). infomap >= 2.16 rejects seed 0, so
    callers use seeds 1..num_runs where the original used 0..num_runs-1 (infomap 2.2.0); the deprecated legacy
    calls below are the ones that both versions accept.
    """
    communities = np.full(num_nodes, -1, dtype=np.int64)
    if not edges:
        return communities, float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        im = infomap.Infomap(directed=False, two_level=True, seed=seed, markov_time=markov_time, silent=True,
                             preferred_number_of_modules=num_modules)
        im.add_links(edges)
        im.run()
        for node in im.tree:
            if node.is_leaf:
                communities[node.node_id] = node.module_id
        codelength = float(im.codelength)
    return communities, codelength


def merge_clusters(cluster_maps, communities):
    """Replace each cluster id by its community (SPEC 6.d step 13); clusters in no edge (-1) become 0.

    cluster_maps (N, H, W) -> (N, H, W) community ids, uint8 when they fit (the R runs' maps of a whole split are
    kept together), else int32."""
    communities = np.maximum(np.asarray(communities), 0)
    dtype = torch.uint8 if communities.max(initial=0) < 256 else torch.int32
    return torch.as_tensor(communities).to(dtype)[torch.as_tensor(cluster_maps).long()]


def community_detection(graph_maps, num_nodes, weight_threshold, markov_time, num_modules, num_runs):
    """The co-occurrence network of `graph_maps` (N, H, W) and its Infomap communities (SPEC 6.d steps 10-12).

    Returns dict: matrix (num_nodes, num_nodes), edges [(i, j, w)], seeds (1..num_runs, as infomap >= 2.16
    rejects the original's seed 0), communities (num_runs, num_nodes) int64 (-1 = in no edge), codelengths.
    """
    matrix = co_occurrence_matrix(graph_maps, num_nodes)
    edges = community_edges(matrix, weight_threshold)
    seeds = list(range(1, num_runs + 1))
    detected = [detect_communities(edges, num_nodes, markov_time, num_modules, seed) for seed in seeds]
    return dict(matrix=matrix, edges=edges, seeds=seeds, communities=np.stack([c for c, _ in detected]),
                codelengths=[length for _, length in detected])


def evaluate_communities(gt, merged, num_classes):
    """Hungarian mIoU of merged maps per Infomap run, and the mean (SPEC 6.d step 13).

    gt (N, H, W) labels with 255 = void (left out); merged (R, N, H, W) community ids, 0 for clusters outside the
    graph. The original asserted at most num_classes ids; here more ids are evaluated all the same (Hungarian
    matching leaves the extra ones unmatched, i.e. background) and reported in `warnings`.
    Returns dict: miou (mean over runs), miou_per_run, runs [match_and_score's dict + num_ids], warnings.
    """
    gt = torch.as_tensor(gt)
    valid = gt != IGNORE_INDEX
    runs, notes = [], []
    for run, maps in enumerate(torch.as_tensor(merged)):
        num_ids = len(maps[valid].unique())
        if num_ids > num_classes:
            notes.append(f"run {run}: more communities than classes ({num_ids} ids including 0, for {num_classes} "
                         "classes); the extra communities stay unmatched (background) in the Hungarian matching")
        num_pred = max(num_classes, int(maps.max()) + 1)
        scores = match_and_score(confusion_matrix(gt, maps, num_classes, num_pred), "hungarian")
        runs.append(dict(scores, num_ids=num_ids))
    per_run = [float(r["miou"]) for r in runs]
    return dict(miou=float(np.mean(per_run)), miou_per_run=per_run, runs=runs, warnings=notes)


# ----------------------------------------------------------------------------------------------------------------
# Boundary F1 (SPEC 6.e, 10.10; golden 6), without OpenCV
# ----------------------------------------------------------------------------------------------------------------

def contour_points(mask):
    """All points of all contours of a binary mask, as `cv2.findContours(mask, RETR_LIST, CHAIN_APPROX_NONE)`.

    mask (H, W), nonzero = object -> (M, 2) int64 (x = column, y = row), contours concatenated in OpenCV's output
    order. Suzuki-Abe border following of 8-connected objects (outer borders and hole borders) on the mask padded
    with a zero frame, so object pixels on the image edge are border points. Points are repeated where a border
    passes a pixel more than once, as in OpenCV; the pooled multiset is what bfscore counts.
    """
    mask = np.asarray(mask) != 0
    height, width = mask.shape
    step = width + 2
    padded = np.zeros((height + 2, step), dtype=np.int8)
    padded[1:-1, 1:-1] = mask
    # A border starts where a row changes value; zeros never change while tracing, so scanning these candidates in
    # raster order with the current labels equals OpenCV's full raster scan.
    inside, left = padded[1:-1, 1:-1], padded[1:-1, :-2]
    ys, xs = np.nonzero(inside != left)
    labels = padded.ravel().tolist()
    deltas = [_CHAIN_DX[s] + _CHAIN_DY[s] * step for s in range(8)] * 2
    contours = []
    for y, x in zip(ys.tolist(), xs.tolist()):
        position = (y + 1) * step + x + 1
        value, previous = labels[position], labels[position - 1]
        if value == 1 and previous == 0:
            contours.append(_follow_border(labels, position, False, deltas))
        elif value == 0 and previous >= 1:
            contours.append(_follow_border(labels, position - 1, True, deltas))
    if not contours:
        return np.zeros((0, 2), dtype=np.int64)
    flat = np.concatenate([np.asarray(c, dtype=np.int64) for c in reversed(contours)])  # RETR_LIST order
    return np.stack([flat % step - 1, flat // step - 1], axis=1)


def _follow_border(labels, start, is_hole, deltas):
    """Trace one border from `start` (flat index into the padded label list); returns its flat point indices.

    Suzuki-Abe step 3 as OpenCV's icvFetchContourEx: 1 = unvisited object pixel, 2 = visited, -2 = visited with
    a background pixel examined to its right (such a pixel never starts a hole border).
    """
    s_end = 0 if is_hole else 4
    s = s_end
    while True:  # clockwise search for the first object neighbour
        s = (s - 1) & 7
        first = start + deltas[s]
        if labels[first] != 0 or s == s_end:
            break
    if labels[first] == 0:  # a single-pixel object
        labels[start] = -2
        return [start]
    points = []
    current = start
    while True:
        s_end = s
        while s < 15:  # counter-clockwise search from the direction after the one we came from
            s += 1
            following = current + deltas[s]
            if labels[following] != 0:
                break
        s &= 7
        if 1 <= s <= s_end:
            labels[current] = -2
        elif labels[current] == 1:
            labels[current] = 2
        points.append(current)
        if following == start and current == first:
            return points
        current = following
        s = (s + 4) & 7


def _match_fraction(reference, query, threshold):
    """Fraction of `query` points with a `reference` point at squared distance < threshold**2 (exact integers)."""
    _, nearest = cKDTree(reference).query(query)
    squared = ((query - reference[nearest]) ** 2).sum(1)
    return float(np.mean(squared < threshold * threshold))


def bfscore(gt, pred, threshold=2):
    """Boundary F1 per class 1..max label of two label maps (`bfscore.py::bfscore`, SPEC 6.e step 4).

    gt, pred (H, W) integer maps -> (max_label,) float64, entry c-1 for class c. Contours of (map == c) as
    `contour_points`; precision = fraction of predicted contour points within distance < threshold of a GT contour
    point, recall the reverse, F1 = 2PR/(P+R). NaN for a class absent from either map (the original returns NaN for
    the whole image when a class is only predicted, and raises IndexError when it is only in the GT) and when
    P + R = 0.
    """
    gt, pred = np.asarray(gt), np.asarray(pred)
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} differ in shape")
    num_classes = int(max(gt.max(), pred.max()))
    scores = np.full(num_classes, np.nan)
    for c in range(1, num_classes + 1):
        gt_points, pred_points = contour_points(gt == c), contour_points(pred == c)
        if len(gt_points) == 0 or len(pred_points) == 0:
            continue
        precision = _match_fraction(gt_points, pred_points, threshold)
        recall = _match_fraction(pred_points, gt_points, threshold)
        if precision + recall > 0:
            scores[c - 1] = 2 * precision * recall / (precision + recall)
    return scores


def boundary_f1(gt, pred_fg, threshold=16, paper_compatible=False, progress=None):
    """Mean boundary F1 of binary foreground predictions (`eval_bf.py::evaluate_bf_score`, SPEC 6.e; golden 6b).

    gt (N, H, W) labels; pred_fg (N, H, W) 0/1 at the same size -> (per-image scores (N,) float64, nanmean).
    A prediction holding a single value (empty or full) scores 0. The GT boundary is that of the foreground
    gt != 0 (void counted as foreground, as the Table 7 Jaccard); paper_compatible=True instead passes the
    background gt == 0 as the GT mask, as the published B-F1 numbers did (SPEC 8 item 12), which adds the image
    frame to the GT contour wherever the background touches it. progress: a stream for progress lines, or None.
    """
    gt, pred_fg = np.asarray(gt), np.asarray(pred_fg)
    if gt.shape != pred_fg.shape:
        raise ValueError(f"ground truth {gt.shape} and prediction {pred_fg.shape} differ in shape")
    scores = np.zeros(len(gt))
    what = "boundary F1" + (" (paper-compatible)" if paper_compatible else "")
    with Progress(what, len(gt), "images", progress) as meter:
        for i, (labels, pred) in enumerate(zip(gt, pred_fg)):
            pred = (pred != 0).astype(np.uint8)
            if pred.min() != pred.max():
                gt_mask = (labels == 0) if paper_compatible else (labels != 0)
                scores[i] = bfscore(gt_mask.astype(np.uint8), pred, threshold)[0]
            meter.update(i + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN: reported as NaN
        return scores, float(np.nanmean(scores))


def _check_ids(maps, num_clusters, what):
    if maps.numel() and (int(maps.min()) < 0 or int(maps.max()) >= num_clusters):
        raise ValueError(f"{what} hold ids in [{int(maps.min())}, {int(maps.max())}], expected [0, {num_clusters})")


# ----------------------------------------------------------------------------------------------------------------
# Features, clustering and the foreground hint (SPEC 6.d steps 2-4, 8)
# ----------------------------------------------------------------------------------------------------------------

def foreground_hint(attention, grid, mass):
    """Noisy foreground hint A_b (paper 3.2.1): attention (N, heads, h*w) -> (N, h, w) uint8 0/1.

    `leopart_core.foreground_mask`: head mean, 7x7 Gaussian blur, the tokens holding `mass` of the attention,
    components of <= 2 tokens dropped. The paper keeps 60%; the original's own stored masks used 65% (SPEC 6.d step
    4, golden 3b), and the DINO masks it downloaded are of unknown mass.
    """
    return foreground_mask(attention, grid, mass=mass)[:, 0].to(torch.uint8)


def foreground_clustering(features, fg_masks, k, seed, device=None, iterations=100, restarts=5,
                          max_points_per_centroid=256):
    """k-means of the foreground pixels only (`cluster_all(mask, interpolate_embeddings=True)`, SPEC 6.d step 8).

    features (N, h, w, d) PCA features on the token grid; fg_masks (N, E, E) 0/1 at the evaluation size E.
    The original nearest-upsamples the features to E x E and clusters the foreground pixels (faiss trains on
    k * 256 of them, then assigns all). Nearest upsampling only copies token features, so the same is done without
    the upsampled tensor: the training rows are drawn among the foreground pixels (each the copy of its token), and
    every token is assigned to its nearest centroid and upsampled. Returns (N, E, E) int64: the cluster of every
    foreground pixel, k for the background.
    """
    n, h, w, dim = features.shape
    fg_masks = torch.as_tensor(fg_masks)
    size = fg_masks.shape[-1]
    token_of_pixel = resize_labels(torch.arange(h * w).reshape(1, h, w), size)[0].flatten()
    # The token of every foreground pixel, in raster order over the split; found a block of images at a time, as the
    # int64 indices of torch.nonzero over a whole split would be several times the masks' size.
    parts = []
    for first in range(0, n, 256):
        images, pixels = torch.nonzero(fg_masks[first:first + 256].flatten(1), as_tuple=True)
        parts.append((images + first) * (h * w) + token_of_pixel[pixels])
    pixel_tokens = torch.cat(parts)
    if len(pixel_tokens) < k:
        raise ValueError(f"only {len(pixel_tokens)} foreground pixels at {size}x{size} for k={k} foreground "
                         "clusters; use a smaller --k-community or more images")
    budget = k * max_points_per_centroid
    if len(pixel_tokens) > budget:
        pick = torch.randperm(len(pixel_tokens), generator=torch.Generator().manual_seed(seed))[:budget]
        pixel_tokens = pixel_tokens[pick]
    flat = features.reshape(n * h * w, dim)
    centroids, _, _ = kmeans(flat[pixel_tokens], k, iterations=iterations, restarts=restarts, seed=seed,
                             device=device, max_points_per_centroid=max_points_per_centroid)
    token_ids, _ = assign_to_centroids(flat, centroids)
    maps = resize_labels(token_ids.cpu().reshape(n, h, w), size)
    maps[fg_masks == 0] = k
    return maps


def cbfe_target(mode, gt_train, hint_train):
    """The maps that score the CBFE cuts (SPEC 6.d step 6): the train GT for `paper`, the hint for `label-free`.

    The paper's rule uses train labels (SPEC 8 item 11); the label-free rule runs the same search against the
    noisy hint itself, i.e. it keeps the cut whose cluster mask best reproduces the hint's foreground, so no label
    is read anywhere.
    """
    if mode == "label-free":
        return hint_train
    if mode != "paper":
        raise ValueError(f"--fg-threshold must be 'label-free' or 'paper', got {mode!r}")
    if not has_labels(gt_train):
        raise ValueError("--fg-threshold paper chooses the CBFE threshold with train labels, but the train split "
                         "has no labelled pixel (all 255); use --fg-threshold label-free or a labelled --train-split")
    return gt_train


# ----------------------------------------------------------------------------------------------------------------
# Outputs: PNG panels (paper Figures 3 and 4; eval_cluster.save_panel) and the community network
# ----------------------------------------------------------------------------------------------------------------

def cluster_palette(num_clusters):
    """Colours of foreground cluster maps: cluster c gets VOC colour c + 1, the background id num_clusters black."""
    return np.concatenate([voc_palette(num_clusters + 1)[1:], np.zeros((1, 3), dtype=np.uint8)])


FG_PALETTE = np.array([[0, 0, 0], [255, 255, 255]], dtype=np.uint8)  # foreground masks: white on black


def network_json(matrix, edges, communities, codelengths, seeds, node_pixels, background):
    """The community network (paper Figure 5) as a JSON-ready dict: nodes, edges, communities per Infomap run."""
    in_graph = {i for edge in edges for i in edge[:2]}
    nodes = [dict(id=i, pixels=int(node_pixels[i]), background=i == background, in_graph=i in in_graph,
                  community=int(communities[0][i]) if len(communities) else -1) for i in range(len(node_pixels))]
    return dict(
        nodes=nodes,
        edges=[dict(source=i, target=j, weight=w, p_target_given_source=float(matrix[i, j]),
                    p_source_given_target=float(matrix[j, i])) for i, j, w in edges],
        communities=[dict(seed=int(seed), codelength=codelength, num_communities=len(set(c[c > 0].tolist())),
                          assignment=[int(v) for v in c]) for seed, codelength, c in
                     zip(seeds, codelengths, communities)],
        note="community -1: the cluster is in no edge and merges into 0 (with the background, usually)")


# ----------------------------------------------------------------------------------------------------------------
# The whole pipeline
# ----------------------------------------------------------------------------------------------------------------

def extract_splits(backbone, train_set, val_set, args, device, progress, return_features=True):
    """Tokens (N, h, w, D) float32 (unless return_features is False), CLS attention (N, heads, h*w) and uint8 masks
    (N, S, S) of the train split followed by the val split, N = N_train + N_val, in one pass into tensors allocated
    once (SPEC 6.d steps 1-2). A val split that is the train split is extracted once and repeated."""
    same = val_set is train_set
    out = extract_features(backbone, train_set if same else torch.utils.data.ConcatDataset([train_set, val_set]),
                           batch_size=args.batch_size, device=device, num_workers=args.num_workers,
                           return_attention=True, precision=args.precision, return_features=return_features,
                           progress=progress)
    return {key: torch.cat([value, value]) for key, value in out.items()} if same else out


def table7_metrics(gt, fg, bf_threshold, progress=None):
    """Foreground Jaccard (void as foreground) and boundary F1, correct and paper-compatible (SPEC 6.e)."""
    fg = resize_labels(torch.as_tensor(fg), gt.shape[-1])
    return dict(jaccard=eval_jac(gt, fg),
                bf1=boundary_f1(gt.numpy(), fg.numpy(), bf_threshold, progress=progress)[1],
                bf1_paper_compatible=boundary_f1(gt.numpy(), fg.numpy(), bf_threshold, paper_compatible=True,
                                                 progress=progress)[1])


def evaluate(args, gt_val, merged, val_clusters, feats, fg_masks, n_train, features_val, masks_val, num_classes,
             kmeans_kw, progress=None):
    """The mIoU numbers of Table 5 on the val split at the evaluation size (SPEC 6.d steps 9, 13, 15; 6.c).

    gt_val (N_val, E, E); merged (R, N_val, E, E) community maps; val_clusters (N_val, E, E) foreground clusters with
    background k; features_val (N_val, h, w, D) raw tokens and masks_val (N_val, S, S) for the baseline.
    Returns dict: cbfe_cd (+ per run), upper_bound_k{k+1} (many-to-one by precision), cbfe_only
    (K = #classes - 1 foreground clusters, Hungarian; + per seed), baseline_k{#classes} (k-means of all val tokens,
    SPEC 6.c; + per seed), and, for the caller, match (run 0's community -> class map) and warnings.
    """
    k = args.k_community
    cd = evaluate_communities(gt_val, merged, num_classes)
    upper = match_and_score(confusion_matrix(gt_val, val_clusters, num_classes, k + 1), "many_to_one_precision")
    out = {"cbfe_cd": cd["miou"], "cbfe_cd_per_run": cd["miou_per_run"], f"upper_bound_k{k + 1}": upper["miou"]}
    if args.cbfe_seeds > 0:
        runs = []
        with Progress("CBFE-only k-means", args.cbfe_seeds, "runs", progress) as meter:
            for seed in range(args.cbfe_seeds):
                meter.update(seed, f"now K={num_classes - 1} seed {seed}", record=True)
                maps = foreground_clustering(feats, fg_masks, num_classes - 1, seed, **kmeans_kw)[n_train:]
                runs.append(match_and_score(confusion_matrix(gt_val, maps, num_classes, num_classes),
                                            "hungarian")["miou"])
            meter.update(args.cbfe_seeds)
        out.update(cbfe_only=float(np.mean(runs)), cbfe_only_per_seed=runs)
    if args.baseline_seeds > 0:
        base = overcluster(features_val, masks_val, num_classes, ks=(num_classes,), seeds=range(args.baseline_seeds),
                           mask_size=gt_val.shape[-1], pca_dim=args.pca_dim, progress=progress,
                           **kmeans_kw)[num_classes]
        out.update({f"baseline_k{num_classes}": base["mean"], f"baseline_k{num_classes}_per_seed": base["miou"]})
    out.update(match=cd["runs"][0]["match"], warnings=cd["warnings"])
    return out


def write_outputs(out_dir, results, cd, graph_maps, val_set, val_files, val_clusters, fg_masks_val, segmentation,
                  k, max_panels, progress=None):
    """results.json, network.json and panels/<index>_<image>.png (the first max_panels val images; -1 = all):
    image | foreground clusters (background black) | CBFE mask | final segmentation (VOC colours)."""
    out_dir.mkdir(parents=True, exist_ok=True)  # only once there is something to write: bad input leaves no folder
    node_pixels = torch.bincount(graph_maps.flatten(), minlength=k + 1).numpy()
    network = network_json(cd["matrix"], cd["edges"], cd["communities"], cd["codelengths"], cd["seeds"],
                           node_pixels, k)
    with open(out_dir / "network.json", "w") as f:
        json.dump(network, f, indent=1)
    panel_dir = out_dir / "panels"
    panel_dir.mkdir(exist_ok=True)
    clusters_palette = cluster_palette(k)
    segmentation_palette = voc_palette(max(256, int(segmentation.max()) + 1))
    count = len(val_set) if max_panels < 0 else min(max_panels, len(val_set))
    with Progress("panels", count, "images", progress) as meter:
        for i in range(count):
            save_panel(panel_dir / f"{i:05d}_{Path(str(val_files[i])).stem}.png", val_set[i][0],
                       [(val_clusters[i], clusters_palette), (fg_masks_val[i], FG_PALETTE),
                        (segmentation[i], segmentation_palette)])
            meter.update(i + 1)
    with open(out_dir / "results.json", "w") as f:
        json.dump(results, f, indent=1, default=float)


def load_backbones(args, device):
    """The backbone whose tokens are clustered and, with --attention-pretrained, the one whose CLS attention gives
    the foreground hint (else None); --input-size is checked against both, the hint's needing
    FOREGROUND_MIN_GRID tokens a side for the mask's blur."""
    backbone, _ = build_frozen_backbone(args.pretrained, args.arch, args.patch_size, device, args.init_seed)
    hint_backbone = None
    if args.attention_pretrained:
        hint_backbone, _ = build_frozen_backbone(args.attention_pretrained, args.attention_arch, None, device)
        check_input_size(args.input_size, backbone.patch_size, "--input-size")
    check_input_size(args.input_size, (hint_backbone or backbone).patch_size, "--input-size", FOREGROUND_MIN_GRID,
                     "the attention foreground hint")
    return backbone, hint_backbone


def run_record(args, n_train, n_val, num_classes, grid, cbfe, cd, num_communities):
    """results.json's description of the run: settings, sizes, the CBFE threshold and how it was chosen, Infomap."""
    rule = ("cut chosen by Jaccard with the train GT (paper/original code, uses train labels)"
            if args.fg_threshold == "paper" else
            "cut chosen by Jaccard with the noisy attention hint (no labels used anywhere)")
    return dict(
        settings={key: (str(v) if isinstance(v, Path) else v) for key, v in vars(args).items()},
        num_train_images=n_train, num_val_images=n_val, num_classes=num_classes, token_grid=list(grid),
        fg_threshold=dict(mode=args.fg_threshold, rule=rule, value=cbfe["threshold"],
                          candidates=[list(r) for r in cbfe["candidates"]],
                          fg_clusters_train=cbfe["fg_ids_train"].tolist(), fg_clusters_val=cbfe["fg_ids_val"].tolist()),
        infomap=dict(seeds=cd["seeds"], num_edges=len(cd["edges"]), codelengths=cd["codelengths"],
                     num_communities=num_communities))


def run(args):
    """Run the pipeline of SPEC 6.d with the arguments of `get_args_parser`; returns and writes results.json."""
    for name in ("k_fg_extraction", "k_community", "num_runs", "eval_size", "input_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    device = resolve_device(args.device)
    progress = None if args.quiet else sys.stderr
    args.batch_size = args.batch_size or 16
    out_dir = Path(args.output_dir)
    notes = []
    log = lambda msg: print(msg, flush=True)

    train_set, num_classes, train_files = build_split(args, args.train_split)
    val_set, val_files = train_set, train_files
    if args.val_split != args.train_split:
        val_set, num_classes, val_files = build_split(args, args.val_split)
    num_objects = num_classes - 1
    n_train = len(train_set)
    backbone, hint_backbone = load_backbones(args, device)
    stage_names = (["backbone features"] + ["attention hint"] * (hint_backbone is not None) +
                   ["standardise + PCA", f"CBFE k-means K={args.k_fg_extraction}",
                    f"foreground k-means K={args.k_community}", f"community detection, {args.num_runs} Infomap runs",
                    "evaluation and outputs"])
    stages = Progress("unsup_seg", len(stage_names), "stages", progress)
    stage = iter(enumerate(stage_names))

    def next_stage():
        done, name = next(stage)
        stages.update(done, f"now {name}", record=True)

    # Tokens, masks and the attention foreground hint of train followed by val (SPEC 6.d steps 1, 4).
    next_stage()
    extracted = extract_splits(backbone, train_set, val_set, args, device, progress)
    features, masks, attention = extracted["features"], extracted["masks"], extracted["attention"]
    hint_grid = grid = tuple(features.shape[1:3])
    if hint_backbone is not None:
        next_stage()
        attention = extract_splits(hint_backbone, train_set, val_set, args, device, progress,
                                   return_features=False)["attention"]
        hint_grid = (args.input_size // hint_backbone.patch_size,) * 2
    hint = foreground_hint(attention, hint_grid, args.fg_hint_mass)
    labelled_val = has_labels(masks[n_train:])
    if not labelled_val:
        notes.append("the val split has no labels: segmentations are written, metrics are not computed")
    size = args.eval_size
    hints = resize_labels(hint, size)
    gt_small = resize_labels(masks, size)
    target = cbfe_target(args.fg_threshold, gt_small[:n_train], hints[:n_train])  # fails early without labels

    # Standardisation + PCA fitted on train+val together (SPEC 6.d step 2), standardised block by block.
    next_stage()
    n_all, h, w, dim = features.shape
    tokens = features.reshape(-1, dim)
    feats = pca(tokens, dim=min(args.pca_dim, dim), device=device, transform=standardizer(tokens, device=device))
    feats = feats.reshape(n_all, h, w, -1)

    # CBFE (SPEC 6.d steps 3-7), at the evaluation size E.
    next_stage()
    kmeans_kw = dict(iterations=args.kmeans_iterations, restarts=args.kmeans_restarts, device=device)
    _, assign, _ = kmeans(feats.reshape(-1, feats.shape[-1]), args.k_fg_extraction, seed=args.clustering_seed,
                          spherical=True, **kmeans_kw)
    clusters = resize_labels(assign.cpu().reshape(n_all, h, w), size)
    cbfe = cluster_based_fg_extraction(clusters[:n_train], hints[:n_train], clusters[n_train:], hints[n_train:],
                                       args.k_fg_extraction, target)
    fg_masks = torch.cat([cbfe["fg_mask_train"], cbfe["fg_mask_val"]])
    log(f"CBFE threshold {cbfe['threshold']:.2f} ({args.fg_threshold}): {len(cbfe['fg_ids_train'])} train / "
        f"{len(cbfe['fg_ids_val'])} val foreground clusters of {args.k_fg_extraction}")

    # Foreground clustering (step 8) and the co-occurrence network with Infomap (steps 10-12).
    next_stage()
    k = args.k_community
    fg_clusters = foreground_clustering(feats, fg_masks, k, args.clustering_seed, **kmeans_kw)
    next_stage()
    graph_maps = fg_clusters if args.graph_splits == "train+val" else fg_clusters[:n_train]
    cd = community_detection(graph_maps, k + 1, args.weight_threshold, args.markov_time, num_objects, args.num_runs)
    if not cd["edges"]:
        notes.append(f"no edge passes --weight-threshold {args.weight_threshold}: every cluster merges into 0")
    val_clusters = fg_clusters[n_train:]
    merged = torch.stack([merge_clusters(val_clusters, c) for c in cd["communities"]])
    num_communities = [len(set(c[c > 0].tolist())) for c in cd["communities"]]
    log(f"Infomap over {len(cd['edges'])} edges: {num_communities} communities")

    next_stage()
    results = run_record(args, n_train, len(val_set), num_classes, grid, cbfe, cd, num_communities)
    segmentation = merged[0]
    if labelled_val:
        evaluation = evaluate(args, gt_small[n_train:], merged, val_clusters, feats, fg_masks, n_train,
                              features[n_train:], masks[n_train:], num_classes, kmeans_kw, progress)
        notes.extend(evaluation.pop("warnings"))
        segmentation = evaluation.pop("match")[merged[0].long()]
        foreground = dict(cbfe=table7_metrics(masks[n_train:], cbfe["fg_mask_val"], args.bf_threshold, progress),
                          attention_hint=table7_metrics(masks[n_train:], hint[n_train:], args.bf_threshold, progress))
        if has_labels(masks[:n_train]):
            foreground["cbfe_train_jaccard"] = eval_jac(masks[:n_train], resize_labels(cbfe["fg_mask_train"],
                                                                                       args.input_size))
        results.update(miou=evaluation, foreground=foreground)
    results["notes"] = notes

    write_outputs(out_dir, results, cd, graph_maps, val_set, val_files, val_clusters, cbfe["fg_mask_val"],
                  segmentation, k, args.max_panels, progress)
    stages.update(len(stage_names))
    report(results, log)
    return results


def report(results, log):
    """Print the numbers of Tables 5 and 7."""
    log(f"foreground threshold: {results['fg_threshold']['value']:.2f} ({results['fg_threshold']['mode']}: "
        f"{results['fg_threshold']['rule']})")
    for name, value in results.get("miou", {}).items():
        if not name.endswith(("per_run", "per_seed")):
            log(f"mIoU {name:>22}: {100 * value:6.2f}")
    for what, metrics in results.get("foreground", {}).items():
        if isinstance(metrics, dict):
            log(f"{what:>15}: Jaccard {100 * metrics['jaccard']:6.2f}  B-F1 {100 * metrics['bf1']:6.2f}  "
                f"B-F1 paper-compatible {100 * metrics['bf1_paper_compatible']:6.2f}")
    for note in results["notes"]:
        log(f"note: {note}")


def get_args_parser():
    parser = argparse.ArgumentParser(
        prog="unsup_seg.py", description="Fully unsupervised semantic segmentation with CBFE and community "
        "detection (paper 3.2, SPEC 6.d).")
    add_backbone_and_data_args(parser)
    parser.add_argument("--attention-pretrained", default=None,
                        help="second checkpoint whose CLS attention gives the noisy foreground hint; the original "
                             "used DINO ViT-S/16 attention (SPEC 8 item 11), e.g. dino_deitsmall16_pretrain.pth. "
                             "Default: the --pretrained backbone")
    parser.add_argument("--attention-arch", default=None,
                        help="architecture of --attention-pretrained (inferred from the checkpoint by default)")
    parser.add_argument("--fg-hint-mass", type=float, default=0.6,
                        help="attention mass kept by the foreground hint (paper: 60%%; the original's own stored "
                             "masks used 0.65)")
    parser.add_argument("--train-split", default="train",
                        help="split for the CBFE threshold and the network (the original: VOC train, 1,464 images)")
    parser.add_argument("--val-split", default="val", help="split that is segmented and evaluated")
    parser.add_argument("--pca-dim", type=int, default=50, help="PCA dimension after standardisation (SPEC 6.d)")
    parser.add_argument("--k-fg-extraction", type=int, default=200,
                        help="spherical k-means clusters ranked by CBFE (SPEC 6.d step 3)")
    parser.add_argument("--fg-threshold", default="label-free", choices=("label-free", "paper"),
                        help="how the CBFE precision threshold is chosen: 'paper' as the original code, by Jaccard "
                             "with the train labels (SPEC 6.d step 6, 8 item 11); 'label-free' runs the same search "
                             "against the attention hint, so no label is used anywhere")
    parser.add_argument("--eval-size", type=int, default=100,
                        help="side of the cluster maps, masks and mIoU evaluation (the original's "
                             "clustering_eval_size); Jaccard and B-F1 use --input-size")
    parser.add_argument("--clustering-seed", type=int, default=0, help="seed of the CBFE and foreground k-means")
    parser.add_argument("--kmeans-iterations", type=int, default=100,
                        help="Lloyd iterations of every k-means (faiss niter in the original: 100)")
    parser.add_argument("--kmeans-restarts", type=int, default=5,
                        help="k-means restarts, the best objective kept (faiss nredo in the original: 5)")
    parser.add_argument("--k-community", type=int, default=149,
                        help="foreground clusters for community detection (README: 149 for ViT-S/16, 109 for "
                             "ViT-B/8; chosen by the original's Optuna search with train labels)")
    parser.add_argument("--markov-time", type=float, default=2.0,
                        help="Infomap Markov time (README: 2 for ViT-S/16, 0.4 for ViT-B/8)")
    parser.add_argument("--weight-threshold", type=float, default=0.09,
                        help="edges need both P(j|i) and P(i|j) >= this (README: 0.09 for ViT-S/16, 0.07 ViT-B/8)")
    parser.add_argument("--num-runs", type=int, default=10,
                        help="Infomap runs (seeds 1..N: infomap >= 2.16 rejects the original's seed 0); the mIoU "
                             "is their mean")
    parser.add_argument("--graph-splits", default="train+val", choices=("train+val", "train"),
                        help="cluster maps of the co-occurrence network: the original code uses train+val, the "
                             "paper says train (SPEC 8 item 11)")
    parser.add_argument("--cbfe-seeds", type=int, default=5,
                        help="k-means seeds of the CBFE-only result (Table 5 '+CBFE', K = #classes - 1); 0 skips")
    parser.add_argument("--baseline-seeds", type=int, default=5,
                        help="k-means seeds of the K = #classes baseline without CBFE/CD (Table 5); 0 skips")
    parser.add_argument("--bf-threshold", type=float, default=16,
                        help="boundary F1 match distance in pixels at --input-size (eval_bf.py: 16)")
    parser.add_argument("--max-panels", type=int, default=-1,
                        help="PNG panels written (first val images); -1 = one per val image")
    parser.add_argument("--output-dir", default="unsup_seg_output",
                        help="folder for results.json, network.json and panels/")
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"unsup_seg.py: error: {error_message(err)}")


if __name__ == "__main__":
    main()
