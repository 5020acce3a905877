"""Data for Leopart: multi-crop views with their overlap boxes (SPEC 1), the paper's data sets (SPEC 7), the
evaluation transforms (SPEC 6, 6.a) and a built-in synthetic data set of objects made of parts.

Run `python data.py --help` to measure the multi-crop pipeline's throughput or to preview the synthetic set.
"""
import argparse
import json
import math
import random
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter
from torch.utils.data import Dataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
IMAGENET100_FILE = Path(__file__).resolve().parent / "imagenet100.txt"

VOC_LAYOUT = (
    "either the original code's layout (SPEC 7) <root>/VOCSegmentation/{images/<id>.jpg, SegmentationClass/<id>.png, "
    "SegmentationClassAug/<id>.png, sets/{train,trainaug,val}.txt} (or <root> being that VOCSegmentation folder), "
    "or the official layout <root>/VOCdevkit/VOC2012/{JPEGImages/<id>.jpg, SegmentationClass/<id>.png, "
    "SegmentationClassAug/<id>.png (trainaug only), ImageSets/Segmentation/{train,trainaug,val}.txt} "
    "(or <root> being VOCdevkit or VOC2012)")
COCO_LAYOUT = (
    "images in <root>/coco/images/{train2017,val2017}/<id>.jpg (or <root>/images/<split>2017, <root>/<split>2017); "
    "COCO-Stuff: <root>/annotations/annotations/stuff_annotations/{stuff_val2017.json, "
    "stuff_{train,val}2017_pixelmaps/<id>.png} (or <root>/annotations/stuff_annotations/...); "
    "COCO-Thing: <root>/annotations/panoptic_annotations/{panoptic_val2017.json, "
    "semantic_segmentation_{train,val}2017/<id>.png}")
FOLDER_LAYOUT = "<root>/images/<name>.jpg (or .png), <root>/labels/<name>.png, <root>/<split>.txt (one name a line)"
IMAGENET100_LAYOUT = "<root>/train/<wnid>/*.JPEG (or <root>/<wnid>/*.JPEG) for the 100 wnids of imagenet100.txt"


# ------------------------------------------------------------------------------------------------------------------
# Multi-crop views (SPEC 1)
# ------------------------------------------------------------------------------------------------------------------

def intersection_boxes(abs_boxes, sizes, num_global):
    """Pairwise intersections of the global crops with every crop, in the crops' resized frames (SPEC 1.4).

    abs_boxes: (V, 4) crop boxes (x1, y1, x2, y2) in original-image pixels, globals first. sizes: V output sizes
    (the side of each resized square crop). Returns `gc` (G, V, 4), the intersection of global g and crop v in
    global g's frame, and `all` (V, G, 4), the same region in crop v's frame, both float32 in pixel-edge units
    (0..size). The arithmetic `(p - x1) / w * size` is in the original's order, which reproduces its float32
    boxes bit for bit. Raises ValueError when a global crop does not intersect some crop (the loss needs every box).
    """
    boxes = torch.as_tensor(abs_boxes, dtype=torch.float32)
    sizes = torch.as_tensor(sizes, dtype=torch.float32)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or sizes.shape != (boxes.shape[0],):
        raise ValueError(f"expected abs_boxes (V, 4) and V sizes, got {tuple(boxes.shape)} and {tuple(sizes.shape)}")
    xy1, xy2 = boxes[:, :2], boxes[:, 2:]
    wh = xy2 - xy1
    lt = torch.max(xy1[:num_global, None], xy1[None])  # (G, V, 2)
    rb = torch.min(xy2[:num_global, None], xy2[None])
    if not bool(torch.all(rb - lt > 0)):
        raise ValueError(f"every global crop must intersect every crop; boxes {boxes.tolist()}")
    gx1, gwh, gsize = xy1[:num_global, None], wh[:num_global, None], sizes[:num_global, None, None]
    gc = torch.cat([(lt - gx1) / gwh * gsize, (rb - gx1) / gwh * gsize], dim=-1)
    lt, rb = lt.transpose(0, 1), rb.transpose(0, 1)  # (V, G, 2)
    vx1, vwh, vsize = xy1[:, None], wh[:, None], sizes[:, None, None]
    all_ = torch.cat([(lt - vx1) / vwh * vsize, (rb - vx1) / vwh * vsize], dim=-1)
    return gc, all_


def box_overlap_areas(box, others):
    """Intersection areas (N,) of one box (4,) (x1, y1, x2, y2) with N boxes (N, 4), zero where disjoint."""
    lt = torch.max(box[:2], others[:, :2])
    rb = torch.min(box[2:], others[:, 2:])
    wh = (rb - lt).clamp(min=0)
    return wh[:, 0] * wh[:, 1]


AUGMENT_PLACES = ("cpu", "device")

# ITU-R 601-2 luma weights: PIL's convert("L"), which RandomGrayscale and ImageEnhance use on PIL images
LUMA_601 = (0.299, 0.587, 0.114)

# ColorJitter's ops in its numbering (the values of `order`), their PIL functions, and the factor that changes nothing
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
PIL_JITTER_FUNCTIONS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
NEUTRAL_FACTORS = (1.0, 1.0, 1.0, 0.0)


class MultiCropTransform:
    """Leopart's multi-crop views of one PIL image and their pairwise overlap boxes (SPEC 1).

    `augment_on="cpu"` (the original): `__call__(pil_image) -> (crops, boxes)`, crops a list of V = num_global +
    num_local float32 tensors (3, s, s), globals first, photometrically augmented and normalised here; boxes
    `{"gc": (G, V, 4), "all": (V, G, 4)}` float32 from `intersection_boxes` (SPEC 1.4).
    `augment_on="device"`: `__call__(pil_image) -> (crops, boxes, photometric)`, the same boxes and the same resized
    crops as uint8 tensors (3, s, s), not augmented, with each crop's photometric parameters (`draw_photometric`,
    stacked by `photometric_record`); `photometric_on_device` applies them to a whole batch on the training device.
    Both modes make the same random draws in the same order, so for one seed they give the same boxes and the
    device mode's parameters are exactly those the cpu mode applied.

    Crop sampling (SPEC 1.1, 1.3): `RandomResizedCrop.get_params` (area scale, aspect ratio 3/4..4/3 log-uniform).
    Crop 0 is kept as drawn; a later crop is redrawn until its intersection with every global crop drawn so far is
    strictly greater than int(W*H*min_intersection), doubled for the global crops. Each crop's box is drawn, then
    its photometric parameters, then the next crop's box, so with the same torch/Python seeds the boxes are the
    original code's.

    The original redraws forever, which never ends on an image too small or too thin for the threshold. Here at
    most `max_attempts` draws are made per crop; then a defined fallback box is used: for a global crop, the box
    of global crop 0; for a local crop, the intersection of all global crops (or crop 0's box when that is empty).
    The fallback keeps every global-vs-crop intersection non-empty, so the boxes stay valid for the loss, but it
    need not meet the overlap threshold.

    Photometric augmentation per crop (SPEC 1.2): ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) with p=0.8, grayscale
    p=0.2, PIL Gaussian blur sigma ~ U[0.1b, 2b] with p=0.5, ToTensor, ImageNet Normalize; no flips.
    `photometric=False` (cpu mode only) returns the plain `ToTensor` of each crop (any PIL mode, e.g. a float 'F'
    image) and draws no photometric random numbers: for geometry checks and visualisation.
    """

    def __init__(self, global_size=224, local_size=96, num_global=2, num_local=4, global_scale=(0.25, 1.0),
                 local_scale=(0.05, 0.25), min_intersection=0.01, jitter_strength=1.0, blur_strength=1.0,
                 max_attempts=100, photometric=True, augment_on="cpu"):
        if num_global < 1 or num_local < 0:
            raise ValueError(f"need num_global >= 1 and num_local >= 0, got {num_global}, {num_local}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        if augment_on not in AUGMENT_PLACES:
            raise ValueError(f"augment_on must be one of {AUGMENT_PLACES}, got {augment_on!r}")
        if augment_on == "device" and not photometric:
            raise ValueError("photometric=False draws no photometric parameters, so it needs augment_on='cpu'")
        self.num_global, self.num_local = num_global, num_local
        self.sizes = [global_size] * num_global + [local_size] * num_local
        self.scales = [tuple(global_scale)] * num_global + [tuple(local_scale)] * num_local
        self.ratio = (3.0 / 4.0, 4.0 / 3.0)
        self.min_intersection = min_intersection
        self.max_attempts = max_attempts
        self.photometric = photometric
        self.augment_on = augment_on
        s, b = jitter_strength, blur_strength
        self.jitter = T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)  # its ranges, for ColorJitter.get_params
        self.blur_sigma = (0.1 * b, 2.0 * b)
        self.final_transform = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def sample_box(self, i, img, boxes):
        """Box (4,) float32 (x1, y1, x2, y2) in pixels for crop i of `img`, given the earlier boxes (i, 4)
        (SPEC 1.3)."""
        width, height = img.size
        y1, x1, h, w = T.RandomResizedCrop.get_params(img, self.scales[i], self.ratio)
        box = torch.tensor([x1, y1, x1 + w, y1 + h], dtype=torch.float32)
        if i == 0:
            return box
        globals_so_far = boxes[:min(i, self.num_global)]
        threshold = int(width * height * self.min_intersection)
        if i < self.num_global:
            threshold *= 2  # the global crops must overlap each other twice as much
        for _ in range(self.max_attempts - 1):
            if bool(torch.all(box_overlap_areas(box, globals_so_far) > threshold)):
                return box
            y1, x1, h, w = T.RandomResizedCrop.get_params(img, self.scales[i], self.ratio)
            box = torch.tensor([x1, y1, x1 + w, y1 + h], dtype=torch.float32)
        if bool(torch.all(box_overlap_areas(box, globals_so_far) > threshold)):
            return box
        return self.fallback_box(i, boxes)

    def fallback_box(self, i, boxes):
        """The box used when `max_attempts` draws all miss the overlap threshold (see the class docstring)."""
        if i < self.num_global:
            return boxes[0].clone()
        g = boxes[:self.num_global]
        inter = torch.cat([g[:, :2].max(0).values, g[:, 2:].min(0).values])
        return inter if bool(torch.all(inter[2:] > inter[:2])) else boxes[0].clone()

    def draw_photometric(self):
        """One crop's photometric parameters (SPEC 1.2), drawn with exactly the random calls of the original's
        Compose([RandomApply([ColorJitter], p=0.8), RandomGrayscale(p=0.2), RandomApply([GaussianBlur], p=0.5)]):
        a torch.rand(1) for each of the three, ColorJitter.get_params (torch.randperm(4), then one torch uniform
        per op) only when the jitter is applied, Python's random.uniform(0.1b, 2b) for sigma only when the blur is.

        Returns dict(jitter, grayscale, blur: bool; order: the ops (JITTER_OPS indices) in the order they are
        applied; factors: brightness, contrast, saturation and hue factors, None where jitter is off or the op's
        strength is 0 (torchvision then skips the op); sigma: float, 0.0 without blur).
        """
        jitter = bool(torch.rand(1) <= 0.8)  # RandomApply skips when p < rand
        order, factors = list(range(len(JITTER_OPS))), [None] * len(JITTER_OPS)
        if jitter:
            order, *factors = T.ColorJitter.get_params(self.jitter.brightness, self.jitter.contrast,
                                                       self.jitter.saturation, self.jitter.hue)
            order = order.tolist()
        grayscale = bool(torch.rand(1) < 0.2)
        blur = bool(torch.rand(1) <= 0.5)
        sigma = random.uniform(*self.blur_sigma) if blur else 0.0
        return dict(jitter=jitter, order=order, factors=factors, grayscale=grayscale, blur=blur, sigma=sigma)

    def augment_pil(self, crop, params):
        """The cpu mode's augmentation of one PIL crop with its `draw_photometric` parameters: the PIL functions
        ColorJitter, RandomGrayscale and the original's blur call, in their order, then ToTensor and Normalize
        (SPEC 1.2). Returns (3, s, s) float32."""
        if params["jitter"]:
            for op in params["order"]:
                if params["factors"][op] is not None:
                    crop = PIL_JITTER_FUNCTIONS[op](crop, params["factors"][op])
        if params["grayscale"]:
            crop = TF.rgb_to_grayscale(crop, num_output_channels=TF.get_dimensions(crop)[0])
        if params["blur"]:  # PIL's box approximation of a Gaussian, not torchvision's kernel (SPEC 1.2)
            crop = crop.filter(ImageFilter.GaussianBlur(radius=params["sigma"]))
        return self.final_transform(crop)

    def __call__(self, img):
        boxes = torch.zeros(len(self.sizes), 4)
        draws = []
        for i in range(len(self.sizes)):
            boxes[i] = self.sample_box(i, img, boxes[:i])
            if self.photometric:
                draws.append(self.draw_photometric())
        gc, all_ = intersection_boxes(boxes, self.sizes, self.num_global)
        crops = [resized_crop(img, box, size) for box, size in zip(boxes, self.sizes)]
        if not self.photometric:
            return [TF.to_tensor(crop) for crop in crops], {"gc": gc, "all": all_}
        if self.augment_on == "cpu":
            return [self.augment_pil(crop, p) for crop, p in zip(crops, draws)], {"gc": gc, "all": all_}
        return [TF.pil_to_tensor(crop) for crop in crops], {"gc": gc, "all": all_}, photometric_record(draws)


def resized_crop(img, box, size):
    """The square crop of `img` over the integer box (4,) (x1, y1, x2, y2), resized to size x size with PIL's
    bilinear filter (SPEC 1.3)."""
    x1, y1, x2, y2 = (int(v) for v in box.tolist())
    return TF.resized_crop(img, y1, x1, y2 - y1, x2 - x1, [size, size], T.InterpolationMode.BILINEAR)


def photometric_record(draws):
    """The device mode's photometric parameters of V crops (their `draw_photometric` dicts) as tensors with a
    leading crop dimension: jitter, grayscale, blur (V,) bool; order (V, 4) int64; factors (V, 4) float32
    (brightness, contrast, saturation, hue), an op that is not applied at its neutral factor NEUTRAL_FACTORS;
    sigma (V,) float32, 0 without blur. With neutral factors and sigma 0 the device ops are the identity, so
    jitter and blur only record the draws."""
    factors = [[neutral if f is None else f for f, neutral in zip(d["factors"], NEUTRAL_FACTORS)] for d in draws]
    return dict(jitter=torch.tensor([d["jitter"] for d in draws]),
                grayscale=torch.tensor([d["grayscale"] for d in draws]),
                blur=torch.tensor([d["blur"] for d in draws]),
                order=torch.tensor([d["order"] for d in draws], dtype=torch.int64),
                factors=torch.tensor(factors, dtype=torch.float32),
                sigma=torch.tensor([d["sigma"] for d in draws], dtype=torch.float32))


def multicrop_collate(batch):
    """Collate multi-crop items of either mode, dropping None (unreadable images). Returns
    `(crops, boxes, photometric, num_skipped)`: crops a list of V tensors (B, 3, s, s), boxes
    `{"gc": (B, G, V, 4), "all": (B, V, G, 4)}` (SPEC 1.4), photometric None for cpu-mode items and the dict of
    `photometric_record` tensors stacked to (B, V, ...) for device-mode items. When every item was None, crops,
    boxes and photometric are None."""
    kept = [item for item in batch if item is not None]
    num_skipped = len(batch) - len(kept)
    if not kept:
        return None, None, None, num_skipped
    crops = [torch.stack([item[0][v] for item in kept]) for v in range(len(kept[0][0]))]
    boxes = stack_dicts([item[1] for item in kept])
    photometric = stack_dicts([item[2] for item in kept]) if len(kept[0]) == 3 else None
    return crops, boxes, photometric, num_skipped


def stack_dicts(dicts):
    """{key: stack of that key's tensors} over a list of dicts with the same keys."""
    return {key: torch.stack([d[key] for d in dicts]) for key in dicts[0]}


def luma(x):
    """ITU-R 601-2 luma (B, 1, H, W) of RGB images x (B, 3, H, W)."""
    r, g, b = x.unbind(1)
    return (r * LUMA_601[0]).add_(g, alpha=LUMA_601[1]).add_(b, alpha=LUMA_601[2]).unsqueeze(1)


def blend_with_degenerate(x, op, factor):
    """PIL's ImageEnhance, which ColorJitter's brightness, contrast and saturation use: x = clip(f x + (1 - f) d)
    with d black (op 0), the image's mean grey level (op 1) or its grey image (op 2); per image op (B,) and
    factor (B,), in place on x (B, 3, H, W) in [0, 1]. Factor 1 leaves an image exactly unchanged."""
    gray = luma(x)
    is_contrast = (op == JITTER_OPS.index("contrast")).to(x.dtype).view(-1, 1, 1, 1)
    is_saturation = (op == JITTER_OPS.index("saturation")).to(x.dtype).view(-1, 1, 1, 1)
    mean = gray.mean((2, 3), keepdim=True)
    degenerate = gray.mul_(is_saturation).add_(mean * is_contrast)
    return x.lerp_(degenerate, (1 - factor).view(-1, 1, 1, 1)).clamp_(0, 1)


def adjust_hue(x, shift):
    """Rotate the hue of x (B, 3, H, W) in [0, 1] by shift (B,) turns in the HSV hexcone, as PIL (via its HSV
    mode) and torchvision's adjust_hue do; in place. Each pixel keeps its max and min channel; channel c becomes
    min + (max - min) * P_c(h), h the rotated hue in sixths of a turn in [0, 6) and P_c the hexcone's profile
    of channel c: 1 where c is the max, 0 where it is the min, linear in between. One scratch plane serves all
    the steps: on the CPU each fresh large tensor costs page faults."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    delta = maxc - minc
    # the hexcone hue in sixths of a turn from the channel holding the max (PIL's rgb2hsv): b, else g, else r
    h = (r - g).add_(delta, alpha=4)
    scratch = (b - r).add_(delta, alpha=2)
    torch.where(g == maxc, scratch, h, out=h)
    torch.where(r == maxc, torch.sub(g, b, out=scratch), h, out=h)
    h.div_(torch.clamp(delta, min=1e-12, out=scratch)).add_(6 * shift.view(-1, 1, 1))
    h.sub_(torch.div(h, 6, out=scratch).floor_().mul_(6))  # mod 6
    # R = clip(|h - 3| - 1), G = clip(2 - |h - 2|), B = clip(2 - |h - 4|)
    for channel, (centre, sign, offset) in enumerate(((3.0, 1.0, -1.0), (2.0, -1.0, 2.0), (4.0, -1.0, 2.0))):
        profile = torch.sub(h, centre, out=scratch).abs_().mul_(sign).add_(offset).clamp_(0, 1)
        torch.addcmul(minc, delta, profile, out=x[:, channel])
    return x


def color_jitter(x, order, factors):
    """ColorJitter of x (B, 3, H, W) in [0, 1] with per-image op order (B, 4) (JITTER_OPS indices) and factors
    (B, 4) (brightness, contrast, saturation, hue), in place. The hue shift, the one op that is not a blend, runs
    once for the whole batch; the blends run in the three steps before it and the three after it, each image
    taking at step k its k-th op where that comes before (after) its hue, and factor 1, the identity, elsewhere.
    So every image gets its own order with no host-side branching."""
    hue = JITTER_OPS.index("hue")
    hue_step = (order == hue).int().argmax(1)
    step_factors = factors.gather(1, order)  # (B, 4): the factor of each image's k-th op
    for k in range(order.shape[1] - 1):
        x = blend_with_degenerate(x, order[:, k], torch.where(k < hue_step, step_factors[:, k], 1.0))
    x = adjust_hue(x, factors[:, hue])
    for k in range(1, order.shape[1]):
        x = blend_with_degenerate(x, order[:, k], torch.where(k > hue_step, step_factors[:, k], 1.0))
    return x


BLUR_PASSES = 3  # PIL's GaussianBlur is three box blurs


def box_blur_radius(sigma):
    """PIL's extended box radius l + a (integer part l, fraction a) whose BLUR_PASSES passes have variance sigma^2
    (Gwosdek et al. 2011, as in PIL's BoxBlur.c); works on floats and tensors alike."""
    var = sigma * sigma / BLUR_PASSES
    l = ((12 * var + 1) ** 0.5 - 1) // 2
    a = (2 * l + 1) * (l * (l + 1) - 3 * var) / (6 * (var - (l + 1) ** 2))
    return l, a


def pil_blur_kernels(sigma, max_sigma):
    """The 1-D kernels (B, 2R + 1) of PIL's GaussianBlur(radius=sigma) for sigma (B,) <= max_sigma: BLUR_PASSES
    extended box blurs (weights 1 on |k| <= l and a at |k| = l + 1, over 2l + 1 + 2a) composed into one kernel of
    the fixed radius R = BLUR_PASSES * (l(max_sigma) + 1); sigma 0 gives the identity."""
    l, a = box_blur_radius(sigma)
    radius = BLUR_PASSES * (int(box_blur_radius(max_sigma)[0]) + 1)
    taps = torch.arange(-radius, radius + 1, dtype=sigma.dtype, device=sigma.device).abs()
    box = (taps <= l[:, None]).to(sigma.dtype) + a[:, None] * (taps == l[:, None] + 1)
    box = box / (2 * l + 1 + 2 * a)[:, None]
    kernel = box
    for _ in range(BLUR_PASSES - 1):
        kernel = F.conv1d(F.pad(kernel[None], (radius, radius)), box[:, None], groups=len(sigma))[0]
    return kernel


def blur(x, sigma, max_sigma):
    """PIL's GaussianBlur(radius=sigma) of each image of x (B, C, H, W) with its sigma (B,), sigma 0 being the
    identity: one separable depthwise convolution with `pil_blur_kernels`, edges replicated, in float. PIL
    replicates the edge before each of its box passes, this once before all of them (three times faster), which
    changes only pixels within R of a border, by at most 24/255 (measured in tests/test_data.py)."""
    batch, channels, height, width = x.shape
    kernel = pil_blur_kernels(sigma, max_sigma).repeat_interleave(channels, 0)
    radius = kernel.shape[1] // 2
    y = F.pad(x.reshape(1, batch * channels, height, width), (radius,) * 4, mode="replicate")
    y = F.conv2d(y, kernel.view(batch * channels, 1, 1, -1), groups=batch * channels)
    y = F.conv2d(y, kernel.view(batch * channels, 1, -1, 1), groups=batch * channels)
    return y.view(batch, channels, height, width)


# The parameters photometric_on_device reads, so the training loop copies only these to the device (the record's
# jitter and blur flags only document the draws: neutral factors and sigma 0 are the identity).
DEVICE_PHOTOMETRIC_KEYS = ("order", "factors", "grayscale", "sigma")


def photometric_on_device(crops, photometric, max_sigma):
    """The device mode's photometric augmentation (SPEC 1.2) and ImageNet normalisation of a batch, on the device
    the tensors are on, one batched pass per crop index with per-image parameters and no host syncs.

    crops: V uint8 tensors (B, 3, s, s); photometric: `multicrop_collate`'s dict of (B, V, ...) tensors, of which
    the DEVICE_PHOTOMETRIC_KEYS are read, on the crops' device; max_sigma: the transform's largest blur sigma
    (`MultiCropTransform.blur_sigma[1]`), which fixes the kernel size. Returns V float32 tensors (B, 3, s, s), ready
    for the model.

    The ops are PIL's (ImageEnhance blends, HSV hexcone hue, ITU-R 601-2 grey, its three-box Gaussian blur), so
    it departs from the cpu mode only in precision (measured in tests/test_data.py): it computes in float32
    without PIL's rounding to 8 bits after each op (PIL also quantises the hue to 1/255 turn), takes the
    contrast's mean grey level unrounded, and replicates the crop's edge once for the whole blur (`blur`).
    """
    views = []
    for v, crop in enumerate(crops):
        x = crop.float().div_(255)
        x = color_jitter(x, photometric["order"][:, v], photometric["factors"][:, v])
        x = x.lerp_(luma(x), photometric["grayscale"][:, v].to(x.dtype).view(-1, 1, 1, 1))  # RandomGrayscale
        x = blur(x, photometric["sigma"][:, v], max_sigma)
        for channel, (mean, std) in enumerate(zip(IMAGENET_MEAN, IMAGENET_STD)):
            x[:, channel].sub_(mean).div_(std)  # Python numbers: a constant tensor would be a host-to-device copy
        views.append(x)
    return views


class SeededViews(Dataset):
    """The training set keyed by (epoch, index): item (e, i) is item i of `dataset` drawn with its own seed
    (seed * 1_000_003 + e) * 10_000_019 + i for Python's and torch's RNGs, so the random crops of sample i in
    epoch e are the same whatever the worker count, the process count, the call order or where a resumed run
    restarts. The epoch comes with the key rather than as an attribute, so persistent DataLoader workers, which
    never see attributes set after they started, still draw each epoch's own crops. The callers' RNG states are
    left as they were."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        if not (isinstance(key, (tuple, list)) and len(key) == 2):
            raise TypeError(f"SeededViews items are keyed (epoch, index), got {key!r}")
        epoch, index = key
        sample_seed = ((self.seed * 1_000_003 + epoch) * 10_000_019 + index) % 2 ** 64  # torch's seed range
        state = random.getstate()
        random.seed(sample_seed)
        with torch.random.fork_rng(devices=[]):
            # only the CPU generator, which the transforms use: torch.manual_seed would also reseed (and, in the
            # main process, change) every accelerator's generator, and costs more than the crops' draws
            torch.default_generator.manual_seed(sample_seed)
            item = self.dataset[index]
        random.setstate(state)
        return item


# ------------------------------------------------------------------------------------------------------------------
# Evaluation and probe transforms (SPEC 6, 6.a)
# ------------------------------------------------------------------------------------------------------------------

def mask_to_tensor(mask):
    """(S, S) int64 label tensor from a single-channel PIL mask (integer indices, never ToTensor()*255)."""
    return torch.from_numpy(np.array(mask, dtype=np.int64))


class EvalTransform:
    """SPEC 6 common preprocessing: image resized to S x S bilinear (aspect ratio not kept), ToTensor, ImageNet
    Normalize; mask resized to S x S nearest, as integer labels. `(pil_image, pil_mask) -> ((3,S,S) float32,
    (S,S) int64)`."""

    def __init__(self, size=448):
        self.size = size
        self.normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)

    def __call__(self, img, mask):
        img = TF.resize(img, [self.size, self.size], T.InterpolationMode.BILINEAR)
        mask = TF.resize(mask, [self.size, self.size], T.InterpolationMode.NEAREST)
        return self.normalize(TF.to_tensor(img)), mask_to_tensor(mask)


class JointTrainTransform:
    """SPEC 6.a probe-training augmentation, joint on image and mask: RandomResizedCrop(size, scale, ratio 3/4..4/3)
    (image bilinear, mask nearest), horizontal flip p=0.5, ToTensor, Normalize. `(pil_image, pil_mask) ->
    ((3,S,S) float32, (S,S) int64)`."""

    def __init__(self, size=448, scale=(0.8, 1.0)):
        self.size, self.scale = size, tuple(scale)
        self.ratio = (3.0 / 4.0, 4.0 / 3.0)
        self.normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)

    def __call__(self, img, mask):
        top, left, h, w = T.RandomResizedCrop.get_params(img, self.scale, self.ratio)
        size = [self.size, self.size]
        img = TF.resized_crop(img, top, left, h, w, size, T.InterpolationMode.BILINEAR)
        mask = TF.resized_crop(mask, top, left, h, w, size, T.InterpolationMode.NEAREST)
        if torch.rand(1) < 0.5:
            img, mask = TF.hflip(img), TF.hflip(mask)
        return self.normalize(TF.to_tensor(img)), mask_to_tensor(mask)


# ------------------------------------------------------------------------------------------------------------------
# Reading files
# ------------------------------------------------------------------------------------------------------------------

def error_message(error):
    """The message of `error` as its script prints it, without a DataLoader worker's traceback. A worker's error
    comes back re-raised with the whole traceback in its message ("Caught ValueError in DataLoader worker process
    0. Original Traceback ... ValueError: <message>"; a RuntimeError when the original type cannot be rebuilt from
    one string): keep the message after the last line that names the type the worker caught."""
    text = str(error)
    caught = re.match(r"Caught (\w+) in DataLoader worker process \d+\.", text)
    if caught and "Original Traceback" in text:
        found = list(re.finditer(rf"(?:^|\n|\.){caught[1]}: ", text))  # "<module.>ExceptionName: <message>"
        if found:
            text = text[found[-1].end():]
    return text.strip()


def load_rgb(path):
    """Decode an image file fully into an RGB PIL image; FileNotFoundError/ValueError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


def read_mask(path, num_classes, lut=None):
    """Label map (H, W) uint8 of a PNG mask read as integer indices (`np.array(Image.open(p))`, palette indices for
    VOC), with 255 = ignore. `lut` (256,) int maps raw values to labels, -1 marking values that may not occur.
    Raises ValueError naming the file and the offending values when a label is outside [0, num_classes) and not 255.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask file {path} does not exist")
    try:
        with Image.open(path) as m:
            raw = np.array(m)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read mask {path}: {e}") from e
    if raw.ndim != 2 or not np.issubdtype(raw.dtype, np.integer):
        raise ValueError(f"mask {path} must be a single-channel integer (palette or greyscale) PNG, "
                         f"got array {raw.shape} {raw.dtype}")
    values = np.unique(raw)
    if values[0] < 0 or values[-1] > 255:
        bad = values[(values < 0) | (values > 255)]
        raise ValueError(f"mask {path} has values outside 0..255: {bad.tolist()[:20]}")
    if lut is not None:
        bad = values[lut[values] < 0]
        if bad.size:
            raise ValueError(f"mask {path} has raw values {bad.tolist()[:20]} that are not categories of this data set")
        return lut[raw].astype(np.uint8)
    bad = values[(values >= num_classes) & (values != 255)]
    if bad.size:
        raise ValueError(f"mask {path} has labels {bad.tolist()[:20]} outside 0..{num_classes - 1} (255 = ignore)")
    return raw.astype(np.uint8)


def read_list(path, layout):
    """Non-empty stripped lines of a split file; FileNotFoundError naming the expected layout when missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} does not exist; expected {layout}")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise ValueError(f"split file {path} is empty")
    return names


def find_images(directory):
    """Sorted image files (by extension, case-insensitive) anywhere under `directory`."""
    return sorted(p for p in Path(directory).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def first_existing(paths, what, layout):
    """The first existing path of `paths`; FileNotFoundError naming the candidates and the layout otherwise."""
    for p in paths:
        if p.exists():
            return p
    raise FileNotFoundError(f"{what} not found (looked for {', '.join(str(p) for p in paths)}); expected {layout}")


# ------------------------------------------------------------------------------------------------------------------
# Unlabelled training sets: items are transform(pil_rgb_image)
# ------------------------------------------------------------------------------------------------------------------

class ImageFiles(Dataset):
    """Unlabelled images from a list of files; item i is `transform(rgb_image)`. An unreadable image is skipped with
    a warning naming it: the item is None, which `multicrop_collate` drops and counts."""

    def __init__(self, files, transform=None):
        self.files = [str(f) for f in files]
        self.transform = transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        try:
            img = load_rgb(self.files[index])
        except (FileNotFoundError, ValueError) as e:
            warnings.warn(f"skipping unreadable training image: {e}")
            return None
        return self.transform(img) if self.transform is not None else img


class ImageFolder(ImageFiles):
    """Every image anywhere under `root` (any tree), unlabelled: for training on one's own photos."""

    def __init__(self, root, transform=None):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist; expected a folder tree of images "
                                    f"({', '.join(IMAGE_EXTENSIONS)})")
        files = find_images(root)
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) anywhere under {root}")
        super().__init__(files, transform)


class ImageNet100(ImageFiles):
    """The ImageNet-100 training images (SPEC 7): `<root>/train/<wnid>/*.JPEG` for the 100 wnids of the CMC split,
    kept in the repository as `imagenet100.txt`. Unlabelled (Leopart training)."""

    def __init__(self, root, transform=None, class_file=IMAGENET100_FILE):
        root = Path(root)
        wnids = read_list(class_file, "100 ImageNet wnids, one a line")
        train = root / "train" if (root / "train").is_dir() else root
        if not train.is_dir():
            raise FileNotFoundError(f"ImageNet-100 root {root} does not exist; expected {IMAGENET100_LAYOUT}")
        missing = [w for w in wnids if not (train / w).is_dir()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} ImageNet-100 class folders missing under {train} "
                                    f"(e.g. {missing[:3]}); expected {IMAGENET100_LAYOUT}")
        files = [p for w in wnids for p in find_images(train / w)]
        if not files:
            raise FileNotFoundError(f"no images in the ImageNet-100 class folders under {train}")
        super().__init__(files, transform)
        self.wnids = wnids


# ------------------------------------------------------------------------------------------------------------------
# Labelled sets: items are transform(pil_rgb_image, pil_mask) -> (image (3,S,S), mask (S,S) int64, 255 = ignore)
# ------------------------------------------------------------------------------------------------------------------

class SegmentationFiles(Dataset):
    """Image/mask pairs with `num_classes` labels (255 = ignore). Item i is `transform(rgb_image, mask)` with
    `EvalTransform(size)` by default. Any unreadable image or mask, a size mismatch, or a label outside the classes
    is an error naming the file (evaluation must not silently drop data). `lut` maps raw mask values to labels
    (see `read_mask`)."""

    def __init__(self, images, masks, num_classes, transform=None, size=448, lut=None, class_names=None):
        if len(images) != len(masks):
            raise ValueError(f"{len(images)} images but {len(masks)} masks")
        self.files = [str(p) for p in images]
        self.mask_files = [str(p) for p in masks]
        self.num_classes = num_classes
        self.class_names = class_names
        self.lut = lut
        self.transform = transform if transform is not None else EvalTransform(size)

    def __len__(self):
        return len(self.files)

    def load(self, index):
        """(rgb PIL image, 'L' PIL mask of labels) of item `index`, unresized."""
        img = load_rgb(self.files[index])
        mask = read_mask(self.mask_files[index], self.num_classes, self.lut)
        if mask.shape != (img.height, img.width):
            raise ValueError(f"mask {self.mask_files[index]} is {mask.shape[1]}x{mask.shape[0]} but image "
                             f"{self.files[index]} is {img.width}x{img.height}")
        return img, Image.fromarray(mask)

    def __getitem__(self, index):
        return self.transform(*self.load(index))


VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")


def voc_layout(root):
    """Resolve a PASCAL VOC 2012 root (SPEC 7 layout or official VOCdevkit layout) to
    `dict(images, masks, masks_aug, sets)` folders; FileNotFoundError naming both layouts otherwise."""
    root = Path(root)
    for base in (root / "VOCSegmentation", root):
        if (base / "images").is_dir() and (base / "sets").is_dir():
            return dict(images=base / "images", masks=base / "SegmentationClass",
                        masks_aug=base / "SegmentationClassAug", sets=base / "sets")
    for base in (root / "VOCdevkit" / "VOC2012", root / "VOC2012", root):
        if (base / "JPEGImages").is_dir() and (base / "ImageSets" / "Segmentation").is_dir():
            return dict(images=base / "JPEGImages", masks=base / "SegmentationClass",
                        masks_aug=base / "SegmentationClassAug", sets=base / "ImageSets" / "Segmentation")
    raise FileNotFoundError(f"no PASCAL VOC 2012 data under {root}; expected {VOC_LAYOUT}")


def voc_split_ids(layout, split):
    """Image ids of a VOC split; `trainaug` also accepts the `train_aug.txt` name used by many SBD copies."""
    if split not in ("train", "trainaug", "val"):
        raise ValueError(f"VOC split must be train, trainaug or val, got {split!r}")
    path = layout["sets"] / f"{split}.txt"
    if split == "trainaug" and not path.is_file() and (layout["sets"] / "train_aug.txt").is_file():
        path = layout["sets"] / "train_aug.txt"
    return read_list(path, VOC_LAYOUT)


class VOCSegmentation(SegmentationFiles):
    """PASCAL VOC 2012 semantic segmentation (SPEC 7): 21 classes (0 background), 255 boundary/ignore. Masks of
    `val` come from SegmentationClass; those of train/trainaug from SegmentationClassAug, as in the original code
    (the official layout's SegmentationClass is used for `train` when SegmentationClassAug is absent)."""

    def __init__(self, root, split="val", transform=None, size=448):
        layout = voc_layout(root)
        ids = voc_split_ids(layout, split)
        masks = layout["masks"]
        if split != "val" and layout["masks_aug"].is_dir():
            masks = layout["masks_aug"]
        elif split == "trainaug":
            raise FileNotFoundError(f"VOC trainaug needs {layout['masks_aug']}; expected {VOC_LAYOUT}")
        if not masks.is_dir():
            raise FileNotFoundError(f"VOC mask folder {masks} does not exist; expected {VOC_LAYOUT}")
        super().__init__([layout["images"] / f"{i}.jpg" for i in ids], [masks / f"{i}.png" for i in ids],
                         len(VOC_CLASSES), transform, size, class_names=VOC_CLASSES)


def coco_label_lut(json_path, task):
    """Raw-id -> label table (256,) int16 and the sorted super-category names (SPEC 7).

    COCO-Stuff (`task="stuff"`): stuff ids map to the alphabetically sorted super-categories of the json without
    "other" (15); "other" (183) and 0 (things; the original sets 0 -> 183) become 255. COCO-Thing (`task="thing"`):
    thing ids map to the sorted thing super-categories (12); stuff ids and 0 (unlabelled; the original sets 0 ->
    200, a stuff id) become 255. 255 stays ignore; every other raw value is invalid (-1).
    """
    try:
        categories = json.loads(Path(json_path).read_text())["categories"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot read the categories of COCO annotation file {json_path}: {e}") from e
    if task == "stuff":
        keep = [c for c in categories if c["supercategory"] != "other"]
    else:
        keep = [c for c in categories if c.get("isthing", 0) == 1]
    names = sorted({c["supercategory"] for c in keep})
    lut = np.full(256, -1, dtype=np.int16)
    lut[[0, 255]] = 255
    for c in categories:
        if not 0 < c["id"] < 255:
            raise ValueError(f"category id {c['id']} in {json_path} does not fit an 8-bit mask")
        lut[c["id"]] = 255
    for c in keep:
        lut[c["id"]] = names.index(c["supercategory"])
    return lut, names


def coco_train_subset(names, list_file, fraction=0.1, seed=400):
    """The COCO probe-training subset (SPEC 6.a): `fraction` of the sorted names, shuffled with `random.Random(seed)`.
    The original shuffles `os.listdir` order, which differs between machines; drawing from the sorted list makes it
    the same everywhere. The list is written to `list_file` and read back from there when it exists."""
    list_file = Path(list_file)
    if list_file.is_file():
        return read_list(list_file, "one COCO image id a line")
    chosen = sorted(names)
    random.Random(seed).shuffle(chosen)
    chosen = chosen[:int(fraction * len(chosen))]
    if not chosen:
        raise ValueError(f"a {fraction:.0%} subset of {len(names)} COCO images is empty")
    try:
        list_file.write_text("\n".join(chosen) + "\n")
    except OSError as e:
        warnings.warn(f"could not write the COCO subset list {list_file} ({e}); the subset is still seed-determined")
    return chosen


class COCOSegmentation(SegmentationFiles):
    """COCO-Stuff (15 stuff super-categories) or COCO-Thing (12 thing super-categories) as in SPEC 7: labels from
    `coco_label_lut` using the val json for both splits (as the original). `split="val"` is all of val2017;
    `split="train"` is a `subset_fraction` random subset of train2017 (`coco_train_subset`), listed in
    `<root>/coco_<task>_train2017_subset<fraction>_seed<seed>.txt` (or `subset_file`)."""

    def __init__(self, root, split="val", task="stuff", transform=None, size=448, subset_fraction=0.1,
                 subset_seed=400, subset_file=None):
        root = Path(root)
        if task not in ("stuff", "thing"):
            raise ValueError(f"COCO task must be stuff or thing, got {task!r}")
        if split not in ("train", "val"):
            raise ValueError(f"COCO split must be train or val, got {split!r}")
        if not root.is_dir():
            raise FileNotFoundError(f"COCO root {root} does not exist; expected {COCO_LAYOUT}")
        images = first_existing([root / "coco" / "images" / f"{split}2017", root / "images" / f"{split}2017",
                                 root / f"{split}2017"], f"COCO {split}2017 image folder", COCO_LAYOUT)
        if task == "stuff":
            ann = first_existing([root / "annotations" / "annotations" / "stuff_annotations",
                                  root / "annotations" / "stuff_annotations"], "COCO-Stuff annotations", COCO_LAYOUT)
            json_path, mask_dir = ann / "stuff_val2017.json", ann / f"stuff_{split}2017_pixelmaps"
        else:
            ann = first_existing([root / "annotations" / "panoptic_annotations"], "COCO panoptic annotations",
                                 COCO_LAYOUT)
            json_path, mask_dir = ann / "panoptic_val2017.json", ann / f"semantic_segmentation_{split}2017"
        for p in (json_path, mask_dir):
            if not p.exists():
                raise FileNotFoundError(f"{p} does not exist; expected {COCO_LAYOUT}")
        lut, names = coco_label_lut(json_path, task)
        ids = sorted(p.stem for p in mask_dir.glob("*.png"))
        if not ids:
            raise FileNotFoundError(f"no PNG masks in {mask_dir}; expected {COCO_LAYOUT}")
        if split == "train":
            subset_file = subset_file or root / f"coco_{task}_train2017_subset{subset_fraction:g}_seed{subset_seed}.txt"
            ids = coco_train_subset(ids, subset_file, subset_fraction, subset_seed)
        super().__init__([images / f"{i}.jpg" for i in ids], [mask_dir / f"{i}.png" for i in ids], len(names),
                         transform, size, lut=lut, class_names=tuple(names))


class LabelledFolder(SegmentationFiles):
    """A user's labelled set (the layout of CamVid in ../shared/data/camvid_val): `<root>/<split>.txt` names,
    `<root>/images/<name>.<jpg|png|...>`, `<root>/labels/<name>.png` with labels 0..num_classes-1, 255 = ignore."""

    def __init__(self, root, split, num_classes, transform=None, size=448):
        root = Path(root)
        if num_classes is None or num_classes < 1:
            raise ValueError(f"a labelled folder needs num_classes (the number of label values), got {num_classes}")
        if not (root / "images").is_dir() or not (root / "labels").is_dir():
            raise FileNotFoundError(f"labelled folder {root} lacks images/ or labels/; expected {FOLDER_LAYOUT}")
        names = read_list(root / f"{split}.txt", FOLDER_LAYOUT)
        by_stem = {p.stem: p for p in sorted((root / "images").iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS}
        missing = [n for n in names if n not in by_stem]
        if missing:
            raise FileNotFoundError(f"{len(missing)} images of {root / f'{split}.txt'} are missing in "
                                    f"{root / 'images'} (e.g. {missing[:3]}); expected {FOLDER_LAYOUT}")
        super().__init__([by_stem[n] for n in names], [root / "labels" / f"{n}.png" for n in names], num_classes,
                         transform, size)


# ------------------------------------------------------------------------------------------------------------------
# Built-in synthetic set: procedural scenes of objects made of parts
# ------------------------------------------------------------------------------------------------------------------

SYNTHETIC_CLASSES = ("background", "car", "bus", "face", "house", "bug")
SYNTHETIC_SPLITS = {"train": 0, "val": 1, "test": 2}

# Part appearances: base RGB colour, texture pattern and its amplitude, the same in every object class that has the
# part (wheels: car, bus; windows: car, bus, house; eyes: face, bug), so a dense method can find shared parts.
PARTS = {
    "car_body": ((205, 35, 40), "hstripes", 30),
    "bus_body": ((235, 190, 30), "vstripes", 30),
    "wheel": ((25, 25, 28), "flat", 0),
    "hub": ((170, 170, 175), "flat", 0),
    "window": ((140, 205, 245), "diagonal", 25),
    "head": ((230, 170, 130), "flat", 0),
    "eye": ((248, 248, 248), "flat", 0),
    "pupil": ((10, 10, 40), "flat", 0),
    "mouth": ((150, 15, 60), "flat", 0),
    "wall": ((175, 85, 50), "bricks", 55),
    "roof": ((45, 55, 125), "diagonal", 30),
    "door": ((105, 60, 25), "vstripes", 20),
    "bug_body": ((40, 165, 60), "dots", -70),
}

# Half width and height of each object class in size units (the `unit` of `_draw_object`), used for placement.
OBJECT_HALF_SIZES = {1: (0.85, 0.65), 2: (1.25, 0.7), 3: (0.6, 0.7), 4: (0.85, 0.8), 5: (0.85, 0.55)}


def _region(cx, cy, rx, ry, size):
    """Pixel-centre coordinates (h,1), (1,w) of the canvas window covering [cx-rx, cx+rx] x [cy-ry, cy+ry], or None."""
    x0, x1 = max(int(cx - rx), 0), min(int(math.ceil(cx + rx)) + 1, size)
    y0, y1 = max(int(cy - ry), 0), min(int(math.ceil(cy + ry)) + 1, size)
    if x0 >= x1 or y0 >= y1:
        return None
    ys = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5
    xs = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5
    return (slice(y0, y1), slice(x0, x1)), ys, xs


def _pattern(kind, ys, xs, period):
    """Texture in [-1, 1]-ish (h, w) on the window coordinates; `period` in pixels."""
    if kind == "hstripes":
        return np.sign(np.sin(ys * (2 * np.pi / period))) + 0 * xs
    if kind == "vstripes":
        return np.sign(np.sin(xs * (2 * np.pi / period))) + 0 * ys
    if kind == "diagonal":
        return np.sin((xs + ys) * (np.pi / period))
    if kind == "dots":
        return ((np.sin(xs * (2 * np.pi / period)) * np.sin(ys * (2 * np.pi / period))) > 0.5).astype(np.float32)
    if kind == "bricks":
        row = np.floor(ys / period)
        mortar = (ys % period < period * 0.2) | ((xs + row * period) % (2 * period) < period * 0.2)
        return mortar.astype(np.float32)
    return np.zeros(np.broadcast_shapes(ys.shape, xs.shape), dtype=np.float32)


class SyntheticParts(Dataset):
    """Built-in labelled synthetic set: procedural scenes of 2-3 objects made of parts over textured backgrounds.

    Classes (SYNTHETIC_CLASSES): 0 background, 1 car (body + cabin, 2 windows, 2 wheels), 2 bus (long body, 3-5
    windows, 2-3 wheels), 3 face (head, 2 eyes, mouth), 4 house (brick wall, roof, 1-2 windows, door), 5 bug
    (spotted body, 2 eyes). Wheels, windows and eyes look the same in every class that has them, and every part
    keeps its colour and texture up to a small per-object jitter, so the parts are discoverable and shared across
    classes. Masks label the object class of every pixel drawn for an object (later objects occlude earlier ones in
    both image and mask), background 0; no ignore pixels. Objects span about 0.25-0.7 of the image side.

    Image i of a split is a pure function of (seed, split, i), generated on the fly with numpy (3-6 ms at
    64-128 px on one busy CPU core); train/val/test use disjoint random streams. With `labelled=True` item i is
    `transform(rgb_image, mask)` (default `EvalTransform(image_size)`, which keeps the size); with `labelled=False`
    it is `transform(rgb_image)` (the unlabelled training view).
    """

    def __init__(self, num_images=1000, image_size=128, seed=0, split="train", transform=None, labelled=True,
                 min_objects=2, max_objects=3):
        if split not in SYNTHETIC_SPLITS:
            raise ValueError(f"synthetic split must be one of {list(SYNTHETIC_SPLITS)}, got {split!r}")
        if image_size < 16 or num_images < 1 or not 1 <= min_objects <= max_objects:
            raise ValueError(f"need image_size >= 16, num_images >= 1 and 1 <= min_objects <= max_objects, got "
                             f"{image_size}, {num_images}, {min_objects}, {max_objects}")
        self.num_images, self.image_size, self.seed, self.split = num_images, image_size, seed, split
        self.min_objects, self.max_objects = min_objects, max_objects
        self.labelled = labelled
        self.transform = transform if transform is not None or not labelled else EvalTransform(image_size)
        self.num_classes = len(SYNTHETIC_CLASSES)
        self.class_names = SYNTHETIC_CLASSES
        self.files = [f"synthetic_{split}_{seed}_{i:06d}" for i in range(num_images)]

    def __len__(self):
        return self.num_images

    def render(self, index, objects=True):
        """Image (S, S, 3) uint8 and mask (S, S) uint8 of scene `index` (deterministic). `objects=False` gives the
        same scene without its objects: the pixels of the background are then identical (the pixel noise has its own
        random stream), which shows that the mask covers exactly what the objects painted."""
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} synthetic images")
        rng = np.random.default_rng([self.seed, SYNTHETIC_SPLITS[self.split], index, 0])
        noise_rng = np.random.default_rng([self.seed, SYNTHETIC_SPLITS[self.split], index, 1])
        size = self.image_size
        canvas = self._background(rng, size)
        mask = np.zeros((size, size), dtype=np.uint8)
        placed = []
        for _ in range(int(rng.integers(self.min_objects, self.max_objects + 1)) if objects else 0):
            cls = int(rng.integers(1, len(SYNTHETIC_CLASSES)))
            unit = size * rng.uniform(0.2, 0.27)
            half_w, half_h = (unit * h for h in OBJECT_HALF_SIZES[cls])
            for _ in range(10):  # a few tries to limit occlusion; the last try is kept anyway
                cx = rng.uniform(half_w * 0.7, size - half_w * 0.7)
                cy = rng.uniform(half_h * 0.7, size - half_h * 0.7)
                if all(abs(cx - px) > 0.8 * (half_w + pw) or abs(cy - py) > 0.8 * (half_h + ph)
                       for px, py, pw, ph in placed):
                    break
            placed.append((cx, cy, half_w, half_h))
            self._draw_object(canvas, mask, rng, cls, cx, cy, unit)
        canvas += 5.0 * noise_rng.standard_normal(canvas.shape, dtype=np.float32)
        return np.clip(canvas, 0, 255).astype(np.uint8), mask

    def __getitem__(self, index):
        image, mask = self.render(index)
        img = Image.fromarray(image)
        if not self.labelled:
            return self.transform(img) if self.transform is not None else img
        return self.transform(img, Image.fromarray(mask))

    @staticmethod
    def _background(rng, size):
        """Muted textured background (S, S, 3) float32: a smooth colour field plus a random grating or checks."""
        # grey level plus a little colour, so that the saturated object parts stand out
        low = rng.uniform(70, 180) + rng.normal(0, 12, size=(1, 1, 3)) + rng.normal(0, 12, size=(4, 4, 3))
        field = np.asarray(Image.fromarray(np.clip(low, 0, 255).astype(np.uint8)).resize(
            (size, size), Image.BILINEAR), dtype=np.float32)
        ys = np.arange(size, dtype=np.float32)[:, None]
        xs = np.arange(size, dtype=np.float32)[None, :]
        period = size * rng.uniform(0.05, 0.15)
        kind = int(rng.integers(3))
        if kind == 0:
            theta = rng.uniform(0, np.pi)
            pattern = np.sin((xs * np.cos(theta) + ys * np.sin(theta)) * (2 * np.pi / period))
        elif kind == 1:
            pattern = np.sign(np.sin(xs * (np.pi / period)) * np.sin(ys * (np.pi / period)))
        else:
            pattern = np.zeros((size, size), dtype=np.float32)
        return field + (rng.uniform(8, 20) * pattern)[..., None].astype(np.float32)

    @staticmethod
    def _paint(canvas, mask, jitter, part, cls, shape, cx, cy, rx, ry, unit):
        """Paint one part (a `shape` in ellipse, rect, rounded, roof, centred at (cx, cy) with half sizes rx, ry)
        with its appearance from PARTS, and write `cls` into the mask under it."""
        region = _region(cx, cy, rx, ry, canvas.shape[0])
        if region is None:
            return
        window, ys, xs = region
        dx, dy = (xs - cx) / rx, (ys - cy) / ry
        if shape == "ellipse":
            inside = dx * dx + dy * dy <= 1
        elif shape == "rect":
            inside = (np.abs(dx) <= 1) & (np.abs(dy) <= 1)
        elif shape == "rounded":
            inside = dx ** 6 + dy ** 6 <= 1
        else:  # roof: a triangle with its apex at the top centre
            inside = (np.abs(dy) <= 1) & (np.abs(dx) <= (dy + 1) / 2)
        if not inside.any():
            return
        colour, kind, amplitude = PARTS[part]
        # the pattern is anchored to the object, so a part's texture moves with it
        texture = _pattern(kind, ys - cy, xs - cx, unit * 0.22)
        value = np.asarray(colour, np.float32) * jitter + (amplitude * texture)[..., None]
        canvas[window][inside] = np.broadcast_to(value, inside.shape + (3,))[inside]
        mask[window][inside] = cls

    def _draw_object(self, canvas, mask, rng, cls, cx, cy, u):
        """Draw object class `cls` centred at (cx, cy) with size unit `u` pixels."""
        jitter = rng.uniform(0.88, 1.12) * rng.uniform(0.95, 1.05, size=3).astype(np.float32)
        flip = 1 if rng.random() < 0.5 else -1

        def paint(part, shape, x, y, rx, ry):
            self._paint(canvas, mask, jitter, part, cls, shape, cx + flip * x * u, cy + y * u, rx * u, ry * u, u)

        if cls == 1:  # car: body with a cabin, two windows, two wheels
            paint("car_body", "rounded", 0.0, 0.15, 0.85, 0.3)
            paint("car_body", "rounded", -0.05, -0.25, 0.5, 0.25)
            for x in (-0.3, 0.2):
                paint("window", "rect", x, -0.25, 0.18, 0.15)
            for x in (-0.5, 0.5):
                paint("wheel", "ellipse", x, 0.45, 0.22, 0.22)
                paint("hub", "ellipse", x, 0.45, 0.09, 0.09)
        elif cls == 2:  # bus: long body, a row of windows, wheels
            paint("bus_body", "rounded", 0.0, 0.0, 1.25, 0.5)
            n = int(rng.integers(3, 6))
            for k in range(n):
                paint("window", "rect", -1.0 + (k + 0.5) * 2.0 / n, -0.18, 0.8 / n, 0.17)
            for x in ((-0.8, 0.8) if rng.random() < 0.5 else (-0.8, 0.0, 0.8)):
                paint("wheel", "ellipse", x, 0.5, 0.22, 0.22)
                paint("hub", "ellipse", x, 0.5, 0.09, 0.09)
        elif cls == 3:  # face: head, two eyes, mouth
            paint("head", "ellipse", 0.0, 0.0, 0.6, 0.7)
            for x in (-0.25, 0.25):
                paint("eye", "ellipse", x, -0.15, 0.17, 0.12)
                paint("pupil", "ellipse", x, -0.15, 0.07, 0.07)
            paint("mouth", "ellipse", 0.0, 0.35, 0.25, 0.08)
        elif cls == 4:  # house: roof, brick wall, windows, door
            paint("wall", "rect", 0.0, 0.3, 0.7, 0.5)
            paint("roof", "roof", 0.0, -0.5, 0.85, 0.3)
            for x in ((-0.38, 0.38) if rng.random() < 0.7 else (-0.38,)):
                paint("window", "rect", x, 0.15, 0.17, 0.15)
            paint("door", "rect", 0.05, 0.55, 0.14, 0.25)
        else:  # bug: spotted body with two eyes at its front
            paint("bug_body", "ellipse", 0.0, 0.0, 0.85, 0.55)
            for y in (-0.22, 0.22):
                paint("eye", "ellipse", 0.55, y, 0.15, 0.12)
                paint("pupil", "ellipse", 0.6, y, 0.06, 0.06)


# ------------------------------------------------------------------------------------------------------------------
# Builders used by train.py and the evaluation scripts
# ------------------------------------------------------------------------------------------------------------------

TRAIN_DATASETS = ("synthetic", "imagenet100", "coco", "voc", "folder")
EVAL_DATASETS = ("synthetic", "voc", "coco_stuff", "coco_thing", "folder")


def build_train_dataset(name, root, transform, **kwargs):
    """Unlabelled training set whose items are `transform(pil_rgb_image)` (None for an unreadable image).

    name: synthetic (`SyntheticParts` train split; kwargs num_images, image_size, seed), imagenet100 (SPEC 7),
    coco (all of `<root>/train2017`, or `<root>/images/train2017`, `<root>/coco/images/train2017`), voc (the images
    of a VOC split, kwarg split, default trainaug), folder (every image under root).
    """
    if name == "synthetic":
        return SyntheticParts(transform=transform, labelled=False, split="train", **kwargs)
    if root is None:
        raise ValueError(f"training data set {name!r} needs a root folder")
    root = Path(root)
    if name == "imagenet100":
        return ImageNet100(root, transform, **kwargs)
    if name == "coco":
        layout = "<root>/train2017/*.jpg (or <root>/images/train2017, <root>/coco/images/train2017)"
        folder = first_existing([root / "train2017", root / "images" / "train2017",
                                 root / "coco" / "images" / "train2017"], "COCO train2017 image folder", layout)
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise FileNotFoundError(f"no images in {folder}; expected {layout}")
        return ImageFiles(files, transform)
    if name == "voc":
        layout = voc_layout(root)
        ids = voc_split_ids(layout, kwargs.get("split", "trainaug"))
        return ImageFiles([layout["images"] / f"{i}.jpg" for i in ids], transform)
    if name == "folder":
        return ImageFolder(root, transform)
    raise ValueError(f"unknown training data set {name!r}; choose from {', '.join(TRAIN_DATASETS)}")


def build_eval_dataset(name, root, split, size=448, transform=None, num_classes=None, **kwargs):
    """Labelled set whose items are `(image (3,S,S) float32, mask (S,S) int64, 255 = ignore)`, with `.num_classes`
    and `.files`. `transform(pil_image, pil_mask)` defaults to `EvalTransform(size)` (SPEC 6).

    name: synthetic (split train/val/test, rendered at `size`; kwargs num_images (default 1000 train, 100 else),
    seed), voc (train/trainaug/val), coco_stuff and coco_thing (train = 10% subset, val; kwargs of
    `COCOSegmentation`), folder (`LabelledFolder`, needs num_classes).
    """
    if name == "synthetic":
        kwargs.setdefault("num_images", 1000 if split == "train" else 100)
        return SyntheticParts(image_size=size, split=split, transform=transform, **kwargs)
    if root is None:
        raise ValueError(f"evaluation data set {name!r} needs a root folder")
    if name == "voc":
        return VOCSegmentation(root, split, transform, size)
    if name in ("coco_stuff", "coco_thing"):
        return COCOSegmentation(root, split, name[len("coco_"):], transform, size, **kwargs)
    if name == "folder":
        return LabelledFolder(root, split, num_classes, transform, size)
    raise ValueError(f"unknown evaluation data set {name!r}; choose from {', '.join(EVAL_DATASETS)}")


# ------------------------------------------------------------------------------------------------------------------
# Throughput measurement and synthetic preview
# ------------------------------------------------------------------------------------------------------------------

def get_args_parser():
    parser = argparse.ArgumentParser(
        "data.py: measure the multi-crop pipeline (SPEC 1) with both places of the photometric augmentation, or "
        "preview the synthetic set", add_help=True)
    task = parser.add_mutually_exclusive_group(required=True)
    task.add_argument("--benchmark", action="store_true",
                      help="time, on the same images with one thread, the CPU stage (what one DataLoader worker "
                           "does per image) of --augment-on cpu and device, and the device stage of the latter")
    task.add_argument("--preview", default=None, help="write a PNG grid of synthetic images and their masks here")
    parser.add_argument("--dataset", default="folder", choices=TRAIN_DATASETS,
                        help="training data set to read (see build_train_dataset)")
    parser.add_argument("--root", default=None, help="its root folder (not needed for synthetic)")
    parser.add_argument("--num-images", type=int, default=200, help="how many images to time")
    parser.add_argument("--global-size", type=int, default=224, help="global crop side (SPEC 1.1: 224)")
    parser.add_argument("--local-size", type=int, default=96, help="local crop side (SPEC 1.1: 96)")
    parser.add_argument("--device", default="cpu", help="where to time the device stage, e.g. cpu or cuda")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="images per batch of the device stage (it runs batched, as in training)")
    return parser


def benchmark(args):
    """Images/s per core of the CPU stage of both modes, timed image by image in turns on the same images and
    seeds, and the device stage's ms per image on one batch, run 20 times spread over the same loop so that all
    three figures see the same load of a shared machine. On the CPU the clock is the process's CPU time (one
    thread), which other processes do not inflate by time-slicing; on an accelerator it is the wall time up to a
    sync."""
    if args.num_images < 1 or args.batch_size < 1:
        raise ValueError(f"--num-images and --batch-size must be >= 1, got {args.num_images}, {args.batch_size}")
    torch.set_num_threads(1)
    device = torch.device(args.device)
    sets = {place: SeededViews(build_train_dataset(args.dataset, args.root, MultiCropTransform(
        global_size=args.global_size, local_size=args.local_size, augment_on=place)), seed=0)
        for place in AUGMENT_PLACES}
    n = min(args.num_images, len(sets["cpu"]))
    warm = [sets["device"][(0, i)] for i in range(n)]  # imports, and every file in the page cache for both modes
    crops, _, photometric, _ = multicrop_collate(warm[:args.batch_size])
    crops = [c.to(device) for c in crops]
    photometric = {k: v.to(device) for k, v in photometric.items()}
    max_sigma = sets["device"].dataset.transform.blur_sigma[1]
    clock = time.process_time if device.type == "cpu" else time.perf_counter

    def device_stage():
        start = clock()
        views = photometric_on_device(crops, photometric, max_sigma)
        views[-1][0, 0, 0, 0].item()  # waits for the device
        return clock() - start

    device_stage()  # warm-up
    seconds = dict.fromkeys(AUGMENT_PLACES, 0.0)
    device_seconds, device_runs = 0.0, 0
    for i in range(n):
        for place in AUGMENT_PLACES if i % 2 == 0 else AUGMENT_PLACES[::-1]:
            start = time.process_time()
            sets[place][(0, i)]
            seconds[place] += time.process_time() - start
        if i % max(1, n // 20) == 0:
            device_seconds += device_stage()
            device_runs += 1
    cpu_rate, device_rate = n / seconds["cpu"], n / seconds["device"]
    device_ms = 1000 * device_seconds / (device_runs * crops[0].shape[0])

    print(f"{n} images from {args.dataset}, {len(crops)} crops each ({args.global_size}/{args.local_size} px), one "
          f"thread; device stage on a batch of {crops[0].shape[0]}, {device_runs} runs")
    print(f"device mode: the CPU stage saves {1000 / cpu_rate - 1000 / device_rate:.2f} ms per image; the device "
          f"stage costs {device_ms:.2f} ms per image on {device}")
    print(f"cpu-stage images/s per core: cpu {cpu_rate:.1f}, device {device_rate:.1f} "
          f"(ratio {device_rate / cpu_rate:.2f})")
    print(f"device-stage ms per image: {device_ms:.2f} ({device})")


def preview(path):
    """Write a PNG grid of 8 synthetic validation images next to their colour-coded masks."""
    ds = SyntheticParts(num_images=8, image_size=128, split="val", labelled=False)
    palette = np.array([[0, 0, 0], [230, 25, 75], [255, 225, 25], [245, 130, 48], [60, 180, 75], [0, 130, 200]],
                       dtype=np.uint8)
    rows = []
    for i in range(8):
        image, mask = ds.render(i)
        rows.append(np.concatenate([image, palette[mask]], axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)
    print(f"wrote {path}")


def main(args):
    if args.preview:
        preview(args.preview)
    else:
        benchmark(args)


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    try:
        main(args)
    except (FileNotFoundError, ValueError) as error:
        print(f"data.py: error: {error}", file=sys.stderr)
        sys.exit(1)
