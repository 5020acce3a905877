"""Tests of unsup_seg.py: CBFE, the co-occurrence network, Infomap communities, Jaccard and boundary F1 against the
original code's outputs (SPEC 10.8-10.10, golden 5 and 6), planted communities, bad input, and one end-to-end run."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from conftest import DATA, GOLDEN, WEIGHTS, require

import unsup_seg as us


@pytest.fixture(autouse=True)
def one_thread():
    """Run each test on one thread: on the shared 2-core machine, with both cores busy, torch's CPU kernels (bincount,
    LAPACK eigh in the PCA) run 20-50x slower with two threads than with one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_golden(name):
    return torch.load(require(GOLDEN / name), weights_only=True)


def squeeze_maps(maps):
    """(N, 1, H, W) golden maps -> (N, H, W) int64."""
    return maps[:, 0].long()


# ---------------------------------------------------------------------------------------------------------------
# Co-occurrence matrix (SPEC 6.d step 10, 10.9; golden 5a)
# ---------------------------------------------------------------------------------------------------------------

def test_offsets_follow_skimage_rule_for_the_golden_angles():
    golden = load_golden("leopart_fully_unsup.pt")["co_occurrence"]
    round_half_away = lambda v: int(math.copysign(math.floor(abs(v) + 0.5), v))
    expected = [(round_half_away(math.sin(a) * d), round_half_away(math.cos(a) * d))
                for d in golden["distances"] for a in golden["angles"]]
    assert list(us.CO_OCCURRENCE_OFFSETS) == expected


SPEC_C0 = [[0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1], [2, 2, 2, 3, 3, 3], [2, 2, 2, 3, 3, 3], [0, 0, 0, 0, 3, 3],
           [0, 0, 0, 0, 3, 3]]
SPEC_C1 = [[1, 1, 1, 2, 2, 2], [1, 1, 1, 2, 2, 2], [1, 1, 1, 2, 2, 2], [0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0],
           [3, 3, 3, 3, 3, 3]]


def test_co_occurrence_spec_table():
    matrix = us.co_occurrence_matrix(torch.tensor([SPEC_C0, SPEC_C1]), 4)
    expected = [[0, .22863, .41869, .35268], [.39246, 0, .33611, .27143], [.60143, .29857, 0, .10000],
                [.67021, .23404, .09574, 0]]
    np.testing.assert_allclose(matrix, expected, atol=5e-6)


def test_co_occurrence_matches_golden():
    golden = load_golden("leopart_fully_unsup.pt")["co_occurrence"]
    matrix = us.co_occurrence_matrix(squeeze_maps(golden["clusters"]), golden["num_clusters"])
    np.testing.assert_allclose(matrix, golden["matrix"].numpy(), rtol=0, atol=1e-12, equal_nan=True)


def test_co_occurrence_equals_naive_loop_and_gives_nan_for_absent_ids():
    rng = np.random.default_rng(0)
    maps = rng.integers(0, 4, size=(3, 7, 9))
    maps[1, :3] = 5  # id 5 occurs in one image only; id 4 never occurs
    k = 6
    total, appear = np.zeros((k, k)), np.zeros(k)
    for image in maps:
        counts = np.zeros((k, k))
        for dr, dc in us.CO_OCCURRENCE_OFFSETS:
            for r in range(image.shape[0]):
                for c in range(image.shape[1]):
                    if 0 <= r + dr < image.shape[0] and 0 <= c + dc < image.shape[1]:
                        counts[image[r, c], image[r + dr, c + dc]] += 1
        np.fill_diagonal(counts, 0)
        rows = counts.sum(1)
        total += np.divide(counts, rows[:, None], out=np.zeros_like(counts), where=rows[:, None] > 0)
        appear += rows > 0
    with np.errstate(invalid="ignore"):
        expected = total / appear[:, None]
    matrix = us.co_occurrence_matrix(torch.as_tensor(maps), k, chunk=2)
    np.testing.assert_allclose(matrix, expected, atol=1e-12, equal_nan=True)
    assert np.isnan(matrix[4]).all() and not np.isnan(matrix[5]).any()


def test_co_occurrence_rejects_ids_out_of_range():
    with pytest.raises(ValueError, match="ids in"):
        us.co_occurrence_matrix(torch.full((1, 4, 4), 7), 5)


# ---------------------------------------------------------------------------------------------------------------
# The noisy foreground hint (golden 3b through leopart_core.foreground_mask, which the pipeline calls)
# ---------------------------------------------------------------------------------------------------------------

def test_foreground_hint_matches_process_and_store_attentions():
    golden = load_golden("leopart_attention_masks.pt")["process_and_store_attentions"]
    res = golden["spatial_res"]
    hint = us.foreground_mask(torch.cat(golden["attns_list"]), (res, res), mass=golden["threshold"])
    assert torch.equal(hint, golden["out"])


# ---------------------------------------------------------------------------------------------------------------
# CBFE pieces (SPEC 6.d steps 5-7, 10.8, 10.9; golden 5b)
# ---------------------------------------------------------------------------------------------------------------

def test_cluster_precisions_spec():
    hint = torch.zeros(2, 6, 6)
    hint[0, 0:3] = 1
    hint[1, 3:6] = 1
    precs = us.cluster_precisions(torch.tensor([SPEC_C0, SPEC_C1]), hint, 4)
    np.testing.assert_allclose(precs, [0.666667, 0.5, 0.25, 0.65], atol=1e-6)


def test_cluster_precisions_nan_for_absent_cluster():
    precs = us.cluster_precisions(torch.zeros(2, 3, 3, dtype=torch.long), torch.ones(2, 3, 3), 2)
    assert precs[0] == 1.0 and np.isnan(precs[1])


def test_eval_jac_spec():
    gt = torch.zeros(2, 4, 4, dtype=torch.long)
    gt[0, :2, :2] = 5
    gt[0, 3, 3] = 255
    gt[1, 1:3, 1:3] = 7
    pred = torch.zeros(2, 4, 4)
    pred[0, 0:2, 0:3] = 1
    pred[1, 1:4, 1:4] = 1
    assert us.eval_jac(gt, pred, with_boundary=True) == pytest.approx(0.5079365, abs=1e-7)
    assert us.eval_jac(gt, pred, with_boundary=False) == pytest.approx(0.5555556, abs=1e-7)


def golden_cbfe_inputs(golden):
    size = golden["overclustering_eval_size"]
    resize = lambda maps: us.resize_labels(squeeze_maps(maps), size)
    return {name: resize(golden[name]) for name in
            ("clusters_train", "attn_train", "gt_train", "clusters_val", "attn_val")}


def test_cbfe_matches_golden():
    golden = load_golden("leopart_fully_unsup.pt")["cbfe"]
    x = golden_cbfe_inputs(golden)
    k = golden["k_fg_extraction"]
    out = us.cluster_based_fg_extraction(x["clusters_train"], x["attn_train"], x["clusters_val"], x["attn_val"], k,
                                         target_train=x["gt_train"])
    np.testing.assert_allclose(out["precs_train"], golden["precs_train"].numpy(), atol=1e-12)
    np.testing.assert_allclose(out["precs_val"], golden["precs_val"].numpy(), atol=1e-12)
    candidates = np.array(out["candidates"])
    np.testing.assert_array_equal(candidates[:, 1], golden["threshold_candidates"][:, 1].numpy())
    np.testing.assert_allclose(candidates, golden["threshold_candidates"].numpy(), atol=1e-6)
    assert out["threshold"] == pytest.approx(golden["threshold"], abs=1e-12)
    np.testing.assert_array_equal(out["fg_ids_train"], golden["fg_cluster_ids_train"].numpy())
    np.testing.assert_array_equal(out["fg_ids_val"], golden["fg_cluster_ids_val"].numpy())
    assert torch.equal(out["fg_mask_train"], squeeze_maps(golden["fg_mask_train"]).to(torch.uint8))
    assert torch.equal(out["fg_mask_val"], squeeze_maps(golden["fg_mask_val"]).to(torch.uint8))
    eval_size = golden["masks_eval_size"]
    for split in ("train", "val"):
        jaccard = us.eval_jac(squeeze_maps(golden[f"gt_{split}"]), us.resize_labels(out[f"fg_mask_{split}"],
                                                                                      eval_size))
        assert jaccard == pytest.approx(golden[f"jaccard_{split}_final"], abs=1e-6)


def test_label_free_cbfe_uses_no_labels_and_finds_the_planted_foreground():
    golden = load_golden("leopart_fully_unsup.pt")["cbfe"]
    x = golden_cbfe_inputs(golden)
    k = golden["k_fg_extraction"]
    out = us.cluster_based_fg_extraction(x["clusters_train"], x["attn_train"], x["clusters_val"], x["attn_val"], k,
                                         target_train=x["attn_train"])
    planted = set(golden["planted_fg_cluster_ids"].tolist())
    found = set(out["fg_ids_train"].tolist())
    assert len(found & planted) >= 0.75 * len(planted) and len(found - planted) <= len(planted) // 2
    jaccard = us.eval_jac(x["gt_train"], out["fg_mask_train"])
    assert jaccard > 0.8 * golden["threshold_candidates"][-1, 2].item()


def test_no_foreground_found_is_a_clear_error():
    clusters = torch.arange(40).repeat_interleave(10).reshape(4, 10, 10)
    hint = (clusters % 2 == 1).long()  # odd clusters are foreground on train
    target = hint.clone()
    with pytest.raises(ValueError, match="no foreground found.*val split is empty"):
        us.cluster_based_fg_extraction(clusters, hint, clusters, torch.zeros(4, 10, 10), 40, target_train=target)
    half = torch.zeros(4, 10, 10)
    half[..., :5] = 1  # on val every cluster has precision 0.5, below the train threshold 0.95
    with pytest.raises(ValueError, match="no foreground found on the val split"):
        us.cluster_based_fg_extraction(clusters, hint, clusters, half, 40, target_train=target)


def test_too_few_clusters_for_the_cut_search_is_a_clear_error():
    with pytest.raises(ValueError, match="too few"):
        us.threshold_candidates(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2), [0.5])


def test_round_threshold_uses_numpy_grid():
    assert us.round_threshold(0.6677) == pytest.approx(0.65)
    assert us.round_threshold(0.024) == 0.0 and us.round_threshold(0.99) == pytest.approx(0.95)


# ---------------------------------------------------------------------------------------------------------------
# Community detection (SPEC 6.d steps 11-13; golden 5c)
# ---------------------------------------------------------------------------------------------------------------

def test_edges_infomap_and_merge_match_golden():
    golden = load_golden("leopart_fully_unsup.pt")["community_detection"]
    params = golden["params"]
    num_nodes = params["k_community"] + 1
    maps = torch.cat([squeeze_maps(golden["clusters_train"]), squeeze_maps(golden["clusters_val"])])
    edges = us.community_edges(us.co_occurrence_matrix(maps, num_nodes), params["weight_threshold"])
    golden_edges = golden["edges"].numpy()
    assert [(i, j) for i, j, _ in edges] == [(int(i), int(j)) for i, j in golden_edges[:, :2]]
    np.testing.assert_allclose([w for _, _, w in edges], golden_edges[:, 2], rtol=0, atol=1e-12)

    system = golden["system_infomap"]
    for row, seed in enumerate(system["seeds"].tolist()):
        if seed < 1:  # infomap 2.16 rejects seed 0; the golden row records the error
            assert str(row) in system["errors"] or row in system["errors"]
            continue
        communities, codelength = us.detect_communities(edges, num_nodes, params["markov_time"],
                                                        params["num_objects_pvoc"], seed)
        np.testing.assert_array_equal(communities, system["communities"][row].numpy())
        assert np.isfinite(codelength)

    clusters_val = squeeze_maps(golden["clusters_val"])
    for run in range(params["num_runs"]):
        merged = us.merge_clusters(clusters_val, golden["communities"][run].numpy())
        assert merged.dtype == torch.uint8
        assert torch.equal(merged.long(), squeeze_maps(golden["merged_val"][run]).long())


def test_hungarian_miou_of_merged_maps_matches_golden():
    golden = load_golden("leopart_fully_unsup.pt")["community_detection"]
    params = golden["params"]
    num_classes = params["num_objects_pvoc"] + 1
    gt = us.resize_labels(squeeze_maps(golden["gt_val"]), params["clustering_eval_size"])
    merged = torch.stack([squeeze_maps(m).long() for m in golden["merged_val"]])
    result = us.evaluate_communities(gt, merged, num_classes)
    np.testing.assert_allclose(result["miou_per_run"], golden["miou_per_run"].numpy(), atol=1e-12)
    assert result["miou"] == pytest.approx(golden["mean_miou"], abs=1e-12)
    for run, per_run in enumerate(result["runs"]):
        np.testing.assert_array_equal(per_run["tp"], golden["tp_per_run"][run].numpy())
        np.testing.assert_array_equal(per_run["fp"], golden["fp_per_run"][run].numpy())
        np.testing.assert_array_equal(per_run["fn"], golden["fn_per_run"][run].numpy())
    assert not result["warnings"]


def planted_scene_maps(num_objects=4, parts_per_object=4, num_images=60, size=24, seed=0):
    """Synthetic cluster maps: objects are 2x2 blocks of their own part ids, on a background id, apart."""
    rng = np.random.default_rng(seed)
    background = num_objects * parts_per_object
    maps = np.full((num_images, size, size), background)
    half = size // 2
    for image in maps:
        for corner in rng.permutation(4)[:2]:  # two objects per image, in separate quadrants
            obj = rng.integers(num_objects)
            top, left = (corner // 2) * half + 2, (corner % 2) * half + 2
            parts = obj * parts_per_object + rng.permutation(parts_per_object)
            cell = (half - 4) // 2
            for q, part in enumerate(parts):
                r, c = top + (q // 2) * cell, left + (q % 2) * cell
                image[r:r + cell, c:c + cell] = part
    return torch.as_tensor(maps), background


def test_community_detection_recovers_planted_objects():
    maps, background = planted_scene_maps()
    num_nodes = background + 1
    edges = us.community_edges(us.co_occurrence_matrix(maps, num_nodes), 0.09)
    assert all(background not in (i, j) for i, j, _ in edges)  # P(part|bg) is small: bg stays out of the graph
    for seed in (1, 2, 3):
        communities, _ = us.detect_communities(edges, num_nodes, markov_time=1.0, num_modules=4, seed=seed)
        assert communities[background] == -1
        parts = communities[:background].reshape(4, 4)
        assert (parts == parts[:, :1]).all()  # all parts of an object in one community
        assert len(set(parts[:, 0].tolist())) == 4  # and the objects in different communities
    merged = us.merge_clusters(maps, communities)
    assert set(merged.unique().tolist()) == {0} | set(communities[:background].tolist())


def test_more_communities_than_classes_is_reported_not_asserted():
    gt = torch.zeros(2, 8, 8, dtype=torch.long)
    gt[:, 4:] = 1
    merged = torch.arange(4).repeat_interleave(32).reshape(1, 2, 8, 8)  # ids 0..3 for 2 classes
    result = us.evaluate_communities(gt, merged, num_classes=2)
    assert "more communities than classes" in result["warnings"][0]
    assert 0 <= result["miou"] <= 1


def test_detect_communities_without_edges_leaves_every_cluster_out():
    communities, codelength = us.detect_communities([], 5, 1.0, 2, seed=1)
    assert (communities == -1).all() and math.isnan(codelength)


# ---------------------------------------------------------------------------------------------------------------
# Boundary F1 (SPEC 6.e, 10.10; golden 6)
# ---------------------------------------------------------------------------------------------------------------

def shoelace_area(points):
    x, y = points[:, 0].astype(float), points[:, 1].astype(float)
    return abs(0.5 * np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))


def test_bfscore_matches_golden_direct_cases():
    golden = load_golden("leopart_bfscore.pt")["bfscore_direct"]
    for name, case in golden.items():
        gt, pred = case["gt"].numpy(), case["pred"].numpy()
        scores = us.bfscore(gt, pred, case["threshold"])
        if case["error"] is not None:  # the original raised for a class only in the GT: here that class is NaN
            only_gt = sorted(set(np.unique(gt)) - set(np.unique(pred)))
            assert all(np.isnan(scores[c - 1]) for c in only_gt)
            assert np.isfinite(np.delete(scores, [c - 1 for c in only_gt])).all()
            continue
        expected = case["bfscores"].numpy()
        if len(expected) != len(scores):  # the original's whole-image NaN for a class only in the prediction
            only_pred = sorted(set(np.unique(pred)) - set(np.unique(gt)))
            assert np.isnan(expected).all() and all(np.isnan(scores[c - 1]) for c in only_pred)
            continue
        np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-12, equal_nan=True)
        # cv2.contourArea of the pooled GT points checks the points and their order, not only the score
        for c, area in enumerate(case["areas_gt"].tolist(), start=1):
            assert shoelace_area(us.contour_points(gt == c)) == pytest.approx(area, abs=1e-9)


def test_contour_points_are_the_object_pixels_touching_background():
    rng = np.random.default_rng(1)
    for trial in range(20):
        mask = rng.random((15, 17)) < (0.3 + 0.02 * trial)
        points = us.contour_points(mask)
        padded = np.pad(mask, 1)
        four_neighbour_bg = ~(padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
        ys, xs = np.nonzero(mask & four_neighbour_bg)
        assert set(map(tuple, points.tolist())) == set(zip(xs.tolist(), ys.tolist()))
    assert us.contour_points(np.zeros((4, 4))).shape == (0, 2)
    line = np.zeros((5, 7), dtype=np.uint8)
    line[2, 1:6] = 1  # a one-pixel line is traced there and back: the inner points twice, as OpenCV lists them
    assert len(us.contour_points(line)) == 8


def test_bfscore_spec_numbers():
    gt = np.zeros((64, 64), np.uint8)
    gt[16:48, 16:48] = 1
    pred = np.zeros((64, 64), np.uint8)
    pred[20:52, 18:50] = 1
    assert us.bfscore(gt, pred, 2)[0] == pytest.approx(0.0483871, abs=1e-7)
    assert us.bfscore(gt, pred, 16)[0] == pytest.approx(1.0)
    assert us.bfscore(1 - gt, pred, 2)[0] == pytest.approx(0.12884889, abs=1e-8)
    assert us.bfscore(1 - gt, pred, 16)[0] == pytest.approx(0.74587459, abs=1e-8)
    same = np.zeros((64, 64), np.uint8)
    same[0:40, 0:40] = 1
    assert us.bfscore(same, same, 2)[0] == pytest.approx(1.0)
    assert us.bfscore(1 - same, same, 2)[0] == pytest.approx(0.39122226, abs=1e-8)


def test_boundary_f1_paper_variant_matches_golden_and_correct_variant_differs():
    golden = load_golden("leopart_bfscore.pt")["evaluate_bf_score"]
    size = golden["eval_size"]
    gt = squeeze_maps(golden["gt_masks"]).numpy()
    pred = us.resize_labels(golden["pred_fg"][:, 0], size).numpy()
    per_image, mean = us.boundary_f1(gt, pred, golden["match_threshold"], paper_compatible=True)
    np.testing.assert_allclose(per_image, golden["per_image_score"].numpy(), rtol=0, atol=1e-12)
    assert mean == pytest.approx(golden["overall"], abs=1e-12)
    correct, correct_mean = us.boundary_f1(gt, pred, golden["match_threshold"])
    assert correct[-1] == 0  # an empty prediction scores 0 in both variants
    assert 0 <= correct_mean <= 1 and not np.allclose(correct, per_image)
    # identical border-touching masks: 1 when computed correctly
    same = np.zeros((1, 48, 48), np.uint8)
    same[0, :30, :30] = 1
    assert us.boundary_f1(same, same, 16)[1] == pytest.approx(1.0)
    assert us.boundary_f1(same, same, 16, paper_compatible=True)[1] < 0.7


# ---------------------------------------------------------------------------------------------------------------
# Bad input and the end-to-end pipeline on real data (voc_mini, the ViT-S/14 weights)
# ---------------------------------------------------------------------------------------------------------------

def test_paper_threshold_on_a_split_without_labels_is_a_clear_error():
    unlabelled = torch.full((2, 8, 8), 255, dtype=torch.uint8)
    hint = torch.ones(2, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="train split has no labelled pixel"):
        us.cbfe_target("paper", unlabelled, hint)
    assert us.cbfe_target("label-free", unlabelled, hint) is hint


def test_cli_reports_bad_data_root_without_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        us.main(["--pretrained", "unused.pth", "--data-root", str(tmp_path / "missing"),
                 "--output-dir", str(tmp_path / "out")])
    assert str(exit_info.value).startswith("unsup_seg.py: error:") and "missing" in str(exit_info.value)


E2E_FLAGS = ["--train-split", "val", "--val-split", "val", "--input-size", "224", "--eval-size", "56",
             "--k-fg-extraction", "20", "--k-community", "12", "--num-runs", "3", "--kmeans-iterations", "20",
             "--kmeans-restarts", "2", "--device", "cpu", "--num-workers", "0"]


def test_end_to_end_on_voc_mini(tmp_path):
    weights = str(require(WEIGHTS / "dinov2_vits14_imgfocus.pth"))
    root = str(require(DATA / "voc_mini"))
    args = us.get_args_parser().parse_args(
        ["--pretrained", weights, "--data-root", root, "--output-dir", str(tmp_path / "free"), "--cbfe-seeds", "2",
         "--baseline-seeds", "2"] + E2E_FLAGS)
    results = us.run(args)
    out = tmp_path / "free"
    assert json.loads((out / "results.json").read_text())["fg_threshold"]["mode"] == "label-free"
    assert results["fg_threshold"]["value"] in [pytest.approx(v) for v in us.THRESHOLD_GRID]
    miou = results["miou"]
    for name in ("cbfe_cd", "cbfe_only", "baseline_k21", "upper_bound_k13"):
        assert 0.02 < miou[name] < 0.6, name  # 4 images, 21 classes: low but far from 0
    assert len(miou["cbfe_cd_per_run"]) == 3
    for what in ("cbfe", "attention_hint"):
        metrics = results["foreground"][what]
        assert 0.3 < metrics["jaccard"] < 0.95 and 0.3 < metrics["bf1"] <= 1
        assert 0.2 < metrics["bf1_paper_compatible"] < metrics["bf1"]  # the frame lowers the paper variant
    network = json.loads((out / "network.json").read_text())
    assert len(network["nodes"]) == 13 and network["nodes"][12]["background"]
    assert [c["seed"] for c in network["communities"]] == [1, 2, 3]
    assert all(0 <= e["weight"] <= 1 and e["source"] <= e["target"] for e in network["edges"])
    panels = sorted((out / "panels").glob("*.png"))
    assert len(panels) == 4 and "2011_000003" in panels[0].name
    with Image.open(panels[0]) as panel:
        assert panel.size == (4 * 224 + 3 * 4, 224)

    # The paper's threshold rule (train labels), the hint from a second checkpoint (here the same weights, so the
    # hint's metrics must not change), the network from train only.
    args = us.get_args_parser().parse_args(
        ["--pretrained", weights, "--attention-pretrained", weights, "--data-root", root, "--output-dir",
         str(tmp_path / "paper"), "--fg-threshold", "paper", "--graph-splits", "train", "--cbfe-seeds", "0",
         "--baseline-seeds", "0", "--max-panels", "1"] + E2E_FLAGS)
    paper = us.run(args)
    assert paper["fg_threshold"]["mode"] == "paper" and "train GT" in paper["fg_threshold"]["rule"]
    assert paper["foreground"]["attention_hint"] == results["foreground"]["attention_hint"]
    assert set(paper["miou"]) == {"cbfe_cd", "cbfe_cd_per_run", "upper_bound_k13"}
    assert len(list((tmp_path / "paper" / "panels").glob("*.png"))) == 1


def test_cli_on_camvid_as_a_labelled_folder(tmp_path, capsys):
    """The shared backbone and data arguments: CamVid (11 classes; class 0, sky, plays the background) as a labelled
    folder, --device auto; the run prints the numbers of Tables 5 and 7, stage progress with an ETA on stderr."""
    weights = str(require(WEIGHTS / "dinov2_vits14_imgfocus.pth"))
    source = require(DATA / "camvid_val")
    root = tmp_path / "camvid"
    root.mkdir()
    (root / "images").symlink_to(source / "images")
    (root / "labels").symlink_to(source / "labels")
    names = (source / "val.txt").read_text().split()
    (root / "train.txt").write_text("\n".join(names[:4]) + "\n")
    (root / "val.txt").write_text("\n".join(names[50:54]) + "\n")
    out = tmp_path / "out"
    us.main(["--pretrained", weights, "--dataset", "folder", "--num-classes", "11", "--data-root", str(root),
             "--input-size", "112", "--eval-size", "28", "--k-fg-extraction", "20", "--k-community", "12",
             "--num-runs", "2", "--kmeans-iterations", "10", "--kmeans-restarts", "1", "--cbfe-seeds", "1",
             "--baseline-seeds", "1", "--max-panels", "1", "--num-workers", "0", "--device", "auto",
             "--output-dir", str(out)])
    captured = capsys.readouterr()
    results = json.loads((out / "results.json").read_text())
    assert results["num_classes"] == 11 and results["num_train_images"] == 4 and results["num_val_images"] == 4
    assert results["token_grid"] == [8, 8] and results["settings"]["precision"] == "fp32"
    for name in ("cbfe_cd", "cbfe_only", "baseline_k11", "upper_bound_k13"):
        assert 0 < results["miou"][name] < 1
        assert f"mIoU {name:>22}: {100 * results['miou'][name]:6.2f}" in captured.out
    assert "cbfe: Jaccard" in captured.out and "attention_hint: Jaccard" in captured.out
    stages = [line for line in captured.err.splitlines() if line.startswith("unsup_seg: ")]
    assert len(stages) == 7 and stages[-1].startswith("unsup_seg: 6/6 stages")
    assert all("ETA" in line for line in captured.err.splitlines())
    with Image.open(next((out / "panels").iterdir())) as panel:
        assert panel.size == (4 * 112 + 3 * 4, 112)
