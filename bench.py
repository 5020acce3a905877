"""Speed of a Leopart training step on random tensors of the real crop shapes.

    python bench.py --arch vit_small --batch-size 2 --device cpu
    python bench.py --arch vit_small --batch-size 64 --device cuda [--compile]

Prints the time of the first step (which includes torch.compile with --compile); images/s of the full step; the
overhead ratio (full Leopart step / the same networks' plain work on the same crops: student backbone + head +
prototypes forward and backward with a trivial loss, teacher forward, optimizer step), i.e. the cost of what Leopart
adds (Sinkhorn, queue, alignment, foreground mask, loss, EMA); Sinkhorn and the loss alone; the time share of
backbone, head, Sinkhorn, loss, foreground mask and optimizer in one instrumented step; the model FLOPs per step
and, where the device's peak is known (or given), the model FLOP utilisation; and the peak memory on CUDA.
The same code runs on every device.

    python bench.py --eval-memory             # peak host memory of the evaluation scripts at full scale (README)
"""
import argparse
import json
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import data
import leopart_core as lc

# Dense bf16 tensor-core peaks (TFLOP/s, float32 accumulation) by a whole-word part of torch.cuda.get_device_name()
# ("A10" is not "A10G"), most specific first ("H100 PCIe" before "H100"); other GPUs take --peak-tflops.
PEAK_BF16_TFLOPS = [("B200", 2250.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("H20", 148.0),
                    ("A100", 312.0), ("A10", 125.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
                    ("RTX 4090", 165.0), ("RTX 6000 Ada", 364.0)]


def get_args_parser():
    p = argparse.ArgumentParser("Leopart step benchmark")
    p.add_argument("--arch", default="vit_small", choices=sorted(lc.ARCHS))
    p.add_argument("--patch-size", type=int, default=None, help="16 or 8 for the DINO archs (default 16)")
    p.add_argument("--batch-size", type=int, default=2, help="images per step")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="autocast of backbone and head; auto = bf16 on CUDA, as train.py")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the student and teacher backbones (Leopart.compile_backbones, as train.py "
                        "--compile)")
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=96)
    p.add_argument("--num-local", type=int, default=4)
    p.add_argument("--loss-mask", default="fg", choices=["fg", "all", "bg"])
    p.add_argument("--queue-length", type=int, default=8192, help="a full queue is benchmarked")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=6, help="timed steps of each kind, interleaved")
    p.add_argument("--eval-memory", nargs="?", const="all", default=None,
                   choices=["all", "eval_cluster", "eval_linear", "eval_linear_cached", "unsup_seg"],
                   help="instead of the step: peak host memory of the evaluation scripts at full scale (README), "
                        "all cases or the one named")
    p.add_argument("--eval-memory-images", type=int, default=None, help="images of the measured split")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's peak for MFU; default: the dense bf16 peak of known GPUs, none on the CPU")
    return p


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def random_batch(args, device):
    """Crops of the real shapes and boxes from the real multi-crop sampler (on a blank 500x375 image)."""
    transform = data.MultiCropTransform(args.global_size, args.local_size, num_local=args.num_local,
                                        photometric=False)
    boxes = [transform(Image.new("RGB", (500, 375)))[1] for _ in range(args.batch_size)]
    boxes = {k: torch.stack([b[k] for b in boxes]).to(device) for k in ("gc", "all")}
    crops = [torch.randn(args.batch_size, 3, args.global_size, args.global_size, device=device) for _ in range(2)]
    crops += [torch.randn(args.batch_size, 3, args.local_size, args.local_size, device=device)
              for _ in range(args.num_local)]
    return crops, boxes


# ----------------------------------------------------------------------------------------------------------------
# The instrumented step: synchronised timers at every phase boundary, backward staged phase by phase
# ----------------------------------------------------------------------------------------------------------------

class PhaseTimer:
    """Wall-clock seconds per phase; `switch(name)` synchronises the device, closes the running phase and opens
    `name` (None: none)."""

    def __init__(self, device):
        self.device, self.seconds, self.phase, self.start = device, defaultdict(float), None, 0.0

    def switch(self, name):
        sync(self.device)
        now = time.perf_counter()
        if self.phase is not None:
            self.seconds[self.phase] += now - self.start
        self.phase, self.start = name, now


class TimedStage(nn.Module):
    """Stands in for a backbone or projection head during the instrumented step: times its forward as `phase` and
    cuts the autograd graph at its output (a fresh leaf), recording (phase, output, leaf) in `cuts`, so that the
    backward of each stage can be run, and timed, on its own."""

    def __init__(self, inner, phase, timer, cuts):
        super().__init__()
        self.inner, self.phase, self.timer, self.cuts = inner, phase, timer, cuts

    def forward(self, *args, **kwargs):
        self.timer.switch(self.phase)
        out = self.inner(*args, **kwargs)
        rest = ()
        if isinstance(out, tuple):  # the backbone's (tokens, attention)
            out, rest = out[0], out[1:]
        if out.requires_grad:
            leaf = out.detach().requires_grad_()
            self.cuts.append((self.phase, out, leaf))
            out = leaf
        self.timer.switch("other")
        return (out, *rest) if rest else out


def instrumented_step(model, optimizer, crops, boxes, timer):
    """One training step with each phase timed: forward through stand-ins for backbones and heads and timed
    `foreground_masks` / `targets` / `loss`; backward staged loss -> prototype scores -> heads -> backbones (the
    same gradients as one backward); EMA; optimizer step."""
    cuts = []
    networks = [n for n in (model.student, model.teacher) if n is not None]
    originals = [(n.backbone, n.projection_head) for n in networks]
    for network, (backbone, head) in zip(networks, originals):
        network.backbone = TimedStage(backbone, "backbone", timer, cuts)
        network.projection_head = TimedStage(head, "head", timer, cuts)
    for name, phase in (("foreground_masks", "fg mask"), ("targets", "Sinkhorn"), ("loss", "loss")):
        setattr(model, name, timed_method(getattr(model, name), phase, timer, cuts, cut_scores=name == "loss"))
    try:
        timer.switch("other")
        loss = model(crops, boxes)
        optimizer.zero_grad(set_to_none=True)
        timer.switch("loss")
        loss.backward()
        for phase in ("other", "head", "backbone"):  # downstream first: each stage's output gradient is complete
            timer.switch(phase)
            staged = [(out, leaf.grad) for p, out, leaf in cuts if p == phase and leaf.grad is not None]
            torch.autograd.backward([out for out, _ in staged], [grad for _, grad in staged])
        timer.switch("other")
        model.update_teacher(0.9995)
        timer.switch("optimizer")
        optimizer.step()
        timer.switch(None)
    finally:
        for network, (backbone, head) in zip(networks, originals):
            network.backbone, network.projection_head = backbone, head
        for name in ("foreground_masks", "targets", "loss"):
            delattr(model, name)


def timed_method(method, phase, timer, cuts, cut_scores):
    """`method` timed as `phase`; with cut_scores, its first argument's student `scores` become fresh leaves, so the
    loss's backward stops there and the prototype scores' backward is timed apart (as "other")."""
    def run(*args, **kwargs):
        if cut_scores:
            outputs = []
            for out in args[0]:
                leaf = out["scores"].detach().requires_grad_()
                cuts.append(("other", out["scores"], leaf))
                outputs.append(dict(out, scores=leaf))
            args = (outputs,) + args[1:]
        timer.switch(phase)
        result = method(*args, **kwargs)
        timer.switch("other")
        return result
    return run


def peak_tflops(args, device, bf16):
    """--peak-tflops, else the bf16 peak of a known GPU when the step runs in bf16 (fp32 has other peaks), else
    None."""
    if args.peak_tflops or device.type != "cuda" or not bf16:
        return args.peak_tflops
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if re.search(rf"\b{re.escape(key)}\b", name)), None)


def main(args):
    device = torch.device(args.device)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    student = lc.build_vit(args.arch, args.patch_size, drop_path_rate=0.1)
    teacher = lc.build_vit(args.arch, args.patch_size)
    model = lc.Leopart(student, teacher, loss_mask=args.loss_mask, queue_length=args.queue_length,
                       bf16=bf16).to(device)
    with torch.no_grad():  # a filled queue, so Sinkhorn runs on queue + batch as in steady-state training
        model.queue.copy_(torch.nn.functional.normalize(torch.randn_like(model.queue), dim=-1))
    model.refresh_queue_fill()
    # fused AdamW, as train.py: no per-parameter kernels, no host reads of the step counters
    optimizer = torch.optim.AdamW(model.student.parameters(), lr=1e-5, weight_decay=0.04, fused=True)
    crops, boxes = random_batch(args, device)

    def leopart_step():
        loss = model(crops, boxes)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        model.update_teacher(0.9995)
        optimizer.step()

    def plain_step():  # the same networks' work with a trivial loss: what any student-teacher method pays
        model.normalize_prototypes()
        with torch.no_grad():
            model.teacher(crops[:2])
        outputs = model.student(crops)
        loss = sum(out["scores"].mean() for out in outputs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    # Model FLOPs of one step, counted before any compilation (compiled code dispatches no countable ops),
    # attention as its two matmuls (SDPA's math form), so every device and backend counts the same
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        leopart_step()
    flops = counter.get_total_flops()
    if args.compile:
        model.compile_backbones()
    t_first = timed(leopart_step, device)
    for _ in range(args.warmup):
        leopart_step()
        plain_step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    full, plain = [], []
    for _ in range(args.steps):  # interleaved, so load changes on a shared machine hit both alike
        full.append(timed(leopart_step, device))
        plain.append(timed(plain_step, device))
    t_full, t_plain = statistics.median(full), statistics.median(plain)
    peak_memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None

    phases = defaultdict(list)
    for _ in range(args.steps):
        timer = PhaseTimer(device)
        instrumented_step(model, optimizer, crops, boxes, timer)
        for phase, seconds in timer.seconds.items():
            phases[phase].append(seconds)
    phase_time = {phase: statistics.median(seconds) for phase, seconds in phases.items()}
    t_instrumented = sum(phase_time.values())

    # Leopart's own pieces alone, on this step's real shapes: both global crops' Sinkhorn in one call
    B, K = args.batch_size, model.student.prototypes.out_features
    grid = args.global_size // model.patch_size
    scores = torch.nn.functional.normalize(
        torch.randn(2, model.queue.shape[1] + B * grid * grid, K, device=device), dim=-1)
    t_sinkhorn = statistics.median(timed(lambda: lc.sinkhorn(scores), device) for _ in range(args.steps))
    student_scores = [torch.randn(B, K, c.shape[-2] // model.patch_size, c.shape[-1] // model.patch_size,
                                  device=device, requires_grad=True) for c in crops]
    targets = [torch.softmax(torch.randn(B, K, grid, grid, device=device), 1) for _ in range(2)]
    masks = [(torch.rand(B, 1, grid, grid, device=device) > 0.4).float() for _ in range(2)]
    t_loss = statistics.median(
        timed(lambda: lc.leopart_loss(student_scores, targets, boxes["gc"], boxes["all"], masks,
                                      patch_size=model.patch_size).backward(), device) for _ in range(args.steps))

    print(f"{args.arch}/{model.patch_size} on {device} ({'bf16' if bf16 else 'fp32'}), batch {B}, crops "
          f"2x{args.global_size} + {args.num_local}x{args.local_size}, loss mask {args.loss_mask}, "
          f"queue {args.queue_length}, {torch.get_num_threads()} CPU threads"
          f"{', compiled backbones' if args.compile else ''}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}")
    compiled = ", includes torch.compile" if args.compile else ""
    print(f"first step         {1000 * t_first:9.1f} ms   (the first timed one{compiled})")
    print(f"full Leopart step  {1000 * t_full:9.1f} ms   {B / t_full:8.1f} images/s")
    print(f"plain network work {1000 * t_plain:9.1f} ms   {B / t_plain:8.1f} images/s")
    print(f"overhead ratio     {t_full / t_plain:9.3f}  (full / plain, medians of {args.steps} interleaved steps)")
    print(f"Sinkhorn alone     {1000 * t_sinkhorn:9.2f} ms   ({' x '.join(map(str, scores.shape))}, "
          f"{model.sinkhorn_iterations} iterations, both global crops in one call)")
    print(f"loss alone         {1000 * t_loss:9.2f} ms   (forward + backward, {2 * (len(crops) - 1)} pairs)")
    print(f"time shares        (medians of {args.steps} instrumented steps, synchronised at every phase boundary: "
          f"{1000 * t_instrumented:.1f} ms in all)")
    described = {"backbone": "student forward + backward, teacher forward",
                 "head": "projection heads, student forward + backward, teacher forward",
                 "Sinkhorn": "queue scores, Sinkhorn of both global crops, queue push",
                 "loss": "alignment and cross-entropy, forward + backward",
                 "fg mask": "foreground masks from the teacher's attention",
                 "optimizer": "AdamW step (fused)",
                 "other": "prototype normalisation and scores, EMA, zero_grad, glue"}
    for phase, what in described.items():
        print(f"  {phase:<16} {100 * phase_time.get(phase, 0.0) / t_instrumented:6.1f} %   "
              f"{1000 * phase_time.get(phase, 0.0):9.2f} ms   ({what})")
    achieved = flops / t_full / 1e12
    peak = peak_tflops(args, device, bf16)
    source = "--peak-tflops" if args.peak_tflops else "the dense bf16 peak"
    mfu = f"MFU {100 * achieved / peak:.1f} % of {peak:g} TFLOP/s ({source})" if peak else "MFU n/a (no known peak)"
    print(f"model FLOPs/step   {flops / 1e9:9.1f} GFLOP   {achieved:8.2f} TFLOP/s   {mfu}")
    if peak_memory is not None:
        print(f"peak memory        {peak_memory / 2 ** 30:9.2f} GiB  (torch.cuda.max_memory_allocated, timed steps)")


# ------------------------------------------------------------------------------------------------ evaluation memory
# Peak host memory of the evaluation scripts at full scale, without a backbone or a data set: each case runs a
# script's own `main` (unsup_seg's `run`) in a fresh process with a data set of N synthetic 448 px scenes and a stub
# ViT-S/16 that returns random tokens of the real shape (784 x 384 per image, object tokens along their class's
# direction, CLS attention on the object). Everything after the backbone is the real code path. k-means runs 2
# iterations and 1 restart and the probe 1 epoch (their memory does not grow with either, only the time); no loader
# workers, so the peak is one process's.

# (case, images, label): the full-scale sizes of the paper's evaluations.
EVAL_MEMORY_CASES = (
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


def measure_eval_memory(case, num_images):
    """Run one case in this process; returns its peak RSS in GiB and its arguments."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="eval_memory_") as output:  # the scripts' outputs, removed after
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
        return {"case": case, "images": num_images, "peak_rss_gib": peak / 2**20,
                "rss_after_imports_gib": before / 2**20, "argv": argv}


def eval_memory(args):
    """`--eval-memory`: each case of EVAL_MEMORY_CASES in its own process (or the one named), printing its peak
    resident memory (README, "Host memory at full scale")."""
    if args.eval_memory != "all":
        images = args.eval_memory_images or next(n for c, n, _ in EVAL_MEMORY_CASES if c == args.eval_memory)
        print(json.dumps(measure_eval_memory(args.eval_memory, images)), flush=True)
        return
    for case, images, label in EVAL_MEMORY_CASES:
        out = subprocess.run([sys.executable, __file__, "--eval-memory", case, "--eval-memory-images", str(images)],
                             capture_output=True, text=True)
        if out.returncode:
            print(f"{label}: failed\n{out.stderr[-2000:]}", flush=True)
            continue
        result = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{label} ({images} images): peak RSS {result['peak_rss_gib']:.2f} GiB "
              f"({result['rss_after_imports_gib']:.2f} GiB after imports)", flush=True)


if __name__ == "__main__":
    parsed = get_args_parser().parse_args()
    eval_memory(parsed) if parsed.eval_memory else main(parsed)
