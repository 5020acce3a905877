"""Peak host memory of the evaluation scripts at full scale, measured without a backbone or a data set.

Each case runs a script's own `main` (or unsup_seg's `run`) in a fresh process, with two stand-ins patched in:
a data set of N synthetic 448x448 scenes (a square object of one class on background) and a stub ViT-S/16 that
returns random tokens of the real shape, (S/16)^2 = 784 tokens x 384 per image, with the object's tokens along
their class's direction and the CLS attention on the object. Everything after the backbone is the real code path:
extraction into the split's tensors, standardisation + PCA, k-means for every K, the metric, the probe's training
and evaluation, CBFE and community detection. The peak resident set size (`ru_maxrss`) is printed per case.

    python eval_memory.py                                   # every case below, one process after the other
    python eval_memory.py --case eval_cluster --images 1449 # one case

k-means runs 2 iterations and 1 restart instead of 100 and 5, and the probe 1 epoch: the memory of k-means and
of the probe does not grow with iterations, restarts or epochs, only the time. DataLoader workers are off
(--num-workers 0), so the peak is that of one process; each worker adds its prefetched batches.
"""
import argparse
import json
import resource
import subprocess
import sys
import tempfile

import torch
import torch.nn as nn
import torch.nn.functional as F

# (case, images, label): the full-scale sizes of the paper's evaluations.
CASES = (
    ("eval_cluster", 1449, "VOC val, overclustering K=100/300/500"),
    ("eval_cluster", 5000, "COCO val, overclustering K=100/300/500"),
    ("eval_linear", 10582, "VOC trainaug linear probe, streamed (the protocol), then VOC val"),
    ("eval_linear_cached", 10582, "VOC trainaug linear probe with --cache-features, then VOC val"),
    ("unsup_seg", 1464, "VOC train + val (1,449) fully unsupervised segmentation"),
)
VOC_VAL = 1449


class SyntheticScenes(torch.utils.data.Dataset):
    """N items (image (3, S, S) float32, mask (S, S) int64) like data.py's labelled sets: a square object of class
    1 + i % (C - 1) on background 0, placed by the index. The image's first channel holds mask / C, so the stub
    backbone can see where the object is."""

    def __init__(self, num_images, size=448, num_classes=21, name="synthetic"):
        self.num_images, self.size, self.num_classes = num_images, size, num_classes
        self.files = [f"{name}_{i:05d}.png" for i in range(num_images)]

    def __len__(self):
        return self.num_images

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(index)
        side = self.size // 4 + int(torch.randint(self.size // 2, (1,), generator=generator))
        top, left = torch.randint(self.size - side + 1, (2,), generator=generator).tolist()
        mask = torch.zeros(self.size, self.size, dtype=torch.long)
        mask[top:top + side, left:left + side] = 1 + index % (self.num_classes - 1)
        image = torch.zeros(3, self.size, self.size)
        image[0] = mask / self.num_classes
        return image, mask


class StubViT(nn.Module):
    """Stands in for a ViT-S/16 at no cost: images (B, 3, S, S) -> patch tokens (B, (S/16)^2, 384), a random class
    direction plus unit noise per token, and with return_attention a CLS attention (B, 6, (S/16)^2) peaked on the
    object's tokens."""

    def __init__(self, num_classes=21, patch_size=16, embed_dim=384, num_heads=6):
        super().__init__()
        self.num_classes, self.patch_size = num_classes, patch_size
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.register_buffer("prototypes", 3 * torch.randn(num_classes, embed_dim,
                                                            generator=torch.Generator().manual_seed(0)))
        self.anchor = nn.Parameter(torch.zeros(()))  # extract_features reads the device off the parameters

    def forward(self, images, return_attention=False):
        labels = (F.avg_pool2d(images[:, :1], self.patch_size) * self.num_classes).round().long().flatten(1)
        tokens = self.prototypes[labels] + torch.randn(*labels.shape, self.embed_dim, device=images.device)
        if not return_attention:
            return tokens
        logits = 3 * (labels > 0).float()[:, None] + torch.randn(labels.shape[0], self.num_heads, labels.shape[1],
                                                                 device=images.device)
        return tokens, logits.softmax(-1)


def patch(module, split_sizes):
    """Replace the module's backbone loader and data set builder by the stub and the synthetic scenes, with
    split_sizes[split] images per split (VOC val's 1,449 for a split not named)."""
    def build_frozen_backbone(*args, **kwargs):
        return StubViT().eval().requires_grad_(False), "stub ViT-S/16"

    def build_split(args, split, transform=None, max_images=None):
        dataset = SyntheticScenes(split_sizes.get(split, VOC_VAL), args.input_size, name=split)
        return dataset, dataset.num_classes, list(dataset.files)
    module.build_frozen_backbone, module.build_split = build_frozen_backbone, build_split


def measure(case, num_images):
    """Run one case in this process; returns its peak RSS in GiB and its arguments."""
    torch.set_num_threads(1)
    output = tempfile.mkdtemp(prefix="eval_memory_")
    common = ["--dataset", "voc", "--data-root", "synthetic", "--num-workers", "0", "--device", "cpu", "--quiet"]
    if case == "eval_cluster":
        import eval_cluster as script
        split = "val"
        argv = common + ["--ks", "100", "300", "500", "--seeds", "0", "--iterations", "2", "--restarts", "1",
                         "--output-json", ""]
    elif case.startswith("eval_linear"):
        import eval_linear as script
        split = "trainaug"
        argv = common + ["--epochs", "1", "--output-dir", output] + ["--cache-features"] * case.endswith("cached")
    elif case == "unsup_seg":
        import unsup_seg as script
        split = "train"
        argv = common + ["--kmeans-iterations", "2", "--kmeans-restarts", "1", "--max-panels", "0",
                         "--cbfe-seeds", "1", "--baseline-seeds", "1", "--output-dir", output]
    else:
        raise ValueError(f"unknown case {case!r}")
    patch(script, {split: num_images})
    args = script.get_args_parser().parse_args(argv)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    (script.run if case == "unsup_seg" else script.main)(args)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"case": case, "images": num_images, "peak_rss_gib": peak / 2**20, "rss_after_imports_gib": before / 2**20,
            "argv": argv}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", default=None, choices=sorted({c for c, _, _ in CASES}),
                        help="one case in this process; default: every case of CASES, each in its own process")
    parser.add_argument("--images", type=int, default=None, help="images of the measured split (default: the case's)")
    args = parser.parse_args()
    if args.case:
        images = args.images or next(n for c, n, _ in CASES if c == args.case)
        print(json.dumps(measure(args.case, images)), flush=True)
        return
    for case, images, label in CASES:
        out = subprocess.run([sys.executable, __file__, "--case", case, "--images", str(images)], capture_output=True,
                             text=True)
        if out.returncode:
            print(f"{label}: failed\n{out.stderr[-2000:]}", flush=True)
            continue
        result = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{label} ({images} images): peak RSS {result['peak_rss_gib']:.2f} GiB "
              f"({result['rss_after_imports_gib']:.2f} GiB after imports)", flush=True)


if __name__ == "__main__":
    main()
