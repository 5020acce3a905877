"""Leopart fine-tuning (Sec. 3.1; SPEC 5): one process on a GPU or the CPU, or DDP under torchrun or SLURM's srun.

    python train.py                       # demo: built-in synthetic scenes, a small ViT from scratch, ~3 min on CPU
    torchrun --nproc_per_node 2 train.py --dataset imagenet100 --data-root /data/in100 --arch vit_small \\
        --pretrained dino_deitsmall16_pretrain.pth --eval-dataset voc --eval-data-root /data/voc
                                          # the paper's ViT-S/16 ImageNet-100 run (global batch 64, 50 epochs)

The global batch, the schedules and the Sinkhorn pool are the same on any number of processes. SIGTERM or SIGUSR1
(a cluster's preemption or time-limit warning) ends the run after the current step with a checkpoint and exit status
75; `--resume auto` continues it, also on another number of GPUs.
"""
import argparse
import datetime
import functools
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import data
import eval_cluster
import leopart_core as lc

# sysexits.h EX_TEMPFAIL, "try again later": the run stopped on a signal after writing its checkpoint. A job script
# can requeue on it: `srun python train.py ... --resume auto; [ $? -eq 75 ] && scontrol requeue $SLURM_JOB_ID`.
PREEMPTED_EXIT_STATUS = 75
# Rendezvous port when neither torchrun nor MASTER_PORT gives one: 29500 (torchrun's default) plus the SLURM job id
# modulo 1000, so two jobs sharing a node do not collide.
DEFAULT_MASTER_PORT = 29500
IMAGENET100_IMAGES = 126_689  # the paper's ImageNet-100 train split (SPEC 5.4, 7); the schedules depend on it

# Defaults that apply only when training on the built-in synthetic set (the demo): from scratch on a CPU, a small
# ViT needs larger learning rates and smaller crops and heads than the paper's DINO fine-tuning. Every other default
# is the paper's ViT-S/16 recipe (SPEC 5.1). An explicitly given flag always wins.
DEMO_DEFAULTS = dict(arch="vit_tiny", patch_size=8, depth=4, epochs=6, batch_size=16, num_images=640,
                     image_size=96, global_size=64, local_size=32, jitter_strength=0.4, hidden_dim=512,
                     projection_dim=32, num_prototypes=50, queue_length=1024, teacher_head_init="copy",
                     momentum_teacher=0.99, lr_backbone=2e-4, lr_heads=2e-3, eval_images=200, eval_size=96,
                     eval_ks=[30, 100], eval_seeds=3, eval_iterations=30, eval_restarts=2, workers=1,
                     log_every=10)
PAPER_DEFAULTS = dict(arch="vit_small", patch_size=None, depth=None, epochs=50, batch_size=64, num_images=None,
                      image_size=None, global_size=224, local_size=96, jitter_strength=1.0, hidden_dim=2048,
                      projection_dim=256, num_prototypes=300, queue_length=8192, teacher_head_init="independent",
                      momentum_teacher=0.9995, lr_backbone=1e-5, lr_heads=1e-4, eval_images=150, eval_size=448,
                      eval_ks=[500, 300, 21], eval_seeds=1, eval_iterations=50, eval_restarts=5, workers=8,
                      log_every=50)


def get_args_parser():
    p = argparse.ArgumentParser("Leopart fine-tuning", add_help=True,
                                description="Defaults are the paper's ViT-S/16 ImageNet-100 recipe (SPEC 5); with the "
                                            "default --dataset synthetic, the demo defaults of DEMO_DEFAULTS apply.")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="synthetic", choices=data.TRAIN_DATASETS,
                   help="training images: synthetic (built in, no download), imagenet100 (the paper's main run; "
                        "126,689 images), coco (train2017; the paper's IN+CC models of Tables 2/3 are trained on it "
                        "from the DINO weights, not from the IN-100 model), voc (trainaug; 500 epochs by default, as "
                        "the paper's PVOC run), folder (your images)")
    g.add_argument("--data-root", default=None, help="root folder of the training set (layouts: README)")
    g.add_argument("--num-images", type=int, default=None, help="synthetic set size (demo: 640)")
    g.add_argument("--image-size", type=int, default=None, help="synthetic image side in pixels (demo: 96)")
    g.add_argument("--global-size", type=int, default=None, help="global crop side (paper 224; demo 64)")
    g.add_argument("--local-size", type=int, default=None, help="local crop side (paper 96; demo 32)")
    g.add_argument("--num-global", type=int, default=2, help="global crops per image (Table 1 crops ablation)")
    g.add_argument("--num-local", type=int, default=4, help="local crops per image; 0 = the [2] ablation")
    g.add_argument("--jitter-strength", type=float, default=None,
                   help="colour-jitter strength s (SPEC 1.2: 1; the from-scratch demo 0.4, as full colour "
                        "invariance is too hard for a few hundred steps and collapses the clustering)")
    g.add_argument("--blur-strength", type=float, default=1.0, help="Gaussian-blur strength b (SPEC 1.2)")
    g.add_argument("--workers", type=int, default=None, help="data-loading processes per GPU (paper runs 8; demo 1)")
    g.add_argument("--augment-on", default=None, choices=["cpu", "device"],
                   help="where the photometric augmentation runs (default: device on CUDA, cpu otherwise). cpu: the "
                        "original's PIL pipeline in the loader workers; device: the workers only decode, crop and "
                        "resize (about 3x the images/s per core) and the training device jitters, greys, blurs and "
                        "normalises whole batches with the same per-crop parameters")

    g = p.add_argument_group("model")
    g.add_argument("--arch", default=None, choices=sorted(lc.ARCHS), help="ViT (paper vit_small; demo vit_tiny)")
    g.add_argument("--patch-size", type=int, default=None,
                   help="patch size (default the arch's: 16, or 14 for DINOv2; ViT-B/8: 8; demo 8)")
    g.add_argument("--depth", type=int, default=None, help="transformer blocks; default the arch's (demo 4)")
    g.add_argument("--pretrained", default=None,
                   help="DINO weights (path or URL) loaded into student and teacher backbones, as the paper starts "
                        "from DINO (Sec. 4.1); any format leopart_core.load_pretrained reads. Omit to train from "
                        "scratch.")
    g.add_argument("--drop-path", type=float, default=0.1, help="student stochastic depth (SPEC 2.1); teacher 0")
    g.add_argument("--hidden-dim", type=int, default=None, help="projection head width (paper 2048; demo 512)")
    g.add_argument("--projection-dim", type=int, default=None,
                   help="L2-normalised bottleneck dim of g (SPEC 2.2: 256; demo 32, whose random prototypes give "
                        "sharper first targets)")
    g.add_argument("--num-prototypes", type=int, default=None, help="K (paper 300; Table 1 ablates 100/500)")

    g = p.add_argument_group("Leopart loss")
    g.add_argument("--loss-mask", default="fg", choices=["fg", "all", "bg"],
                   help="which tokens the loss clusters (Table 1a): fg = the teacher's attention mask (paper)")
    g.add_argument("--fg-mass", type=float, default=0.6, help="attention mass the foreground keeps (Sec. 3.1)")
    g.add_argument("--temperature", type=float, default=0.1, help="student softmax temperature tau (Eq. 2)")
    g.add_argument("--epsilon", type=float, default=0.05, help="Sinkhorn entropy regularisation (SPEC 3.1)")
    g.add_argument("--sinkhorn-iterations", type=int, default=3, help="Sinkhorn-Knopp iterations (SPEC 3.1)")
    g.add_argument("--queue-length", type=int, default=None,
                   help="past teacher embeddings added to Sinkhorn, split over GPUs (paper 8192; 0 = off, Table 1)")
    g.add_argument("--no-teacher", action="store_true", help="targets from the student itself (Table 1c ablation)")
    g.add_argument("--teacher-head-init", default=None, choices=["independent", "copy"],
                   help="the original gives the teacher's head and prototypes their own random init (SPEC 8.1); "
                        "copy starts them equal to the student's (the demo's choice: from scratch nothing else "
                        "anchors the targets)")
    g.add_argument("--roi-size", type=int, default=7, help="RoI-Align output size of the alignment (SPEC 4.2)")

    g = p.add_argument_group("optimisation (SPEC 5)")
    g.add_argument("--epochs", type=int, default=None, help="paper 50 (IN-100, COCO), 500 (VOC); demo 6")
    g.add_argument("--batch-size", type=int, default=None,
                   help="GLOBAL batch, split evenly over the processes (paper 64 = 2 GPUs x 32; demo 16): 1, 2 or 8 "
                        "GPUs run the same steps, schedules and Sinkhorn pool")
    g.add_argument("--lr-backbone", type=float, default=None, help="AdamW lr of the ViT, cosine to 0 (paper 1e-5)")
    g.add_argument("--lr-heads", type=float, default=None, help="lr of head and prototypes (paper 1e-4)")
    g.add_argument("--weight-decay", type=float, default=0.04, help="start of the cosine weight-decay schedule")
    g.add_argument("--weight-decay-end", type=float, default=0.5, help="end of the weight-decay schedule")
    g.add_argument("--momentum-teacher", type=float, default=None,
                   help="EMA momentum, cosine to 1 (SPEC 2.3: 0.9995; demo 0.99, for a run of a few hundred steps)")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="bf16 autocast for backbone and head (scores, Sinkhorn and loss stay in true fp32, no TF32); "
                        "auto = bf16 on CUDA. The paper trained in fp32.")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the student and teacher backbones (the rest has data-dependent shapes); "
                        "faster steps on a GPU after a compilation of a minute or more")
    g.add_argument("--seed", type=int, default=400, help="the original's seed_everything(400)")

    g = p.add_argument_group("evaluation, logging, checkpoints")
    g.add_argument("--eval-dataset", default=None, choices=data.EVAL_DATASETS + ("none",),
                   help="labelled split for the quick cluster evaluation (SPEC 5.5): default synthetic val when "
                        "training on synthetic, none otherwise")
    g.add_argument("--eval-data-root", default=None, help="root of the evaluation data set")
    g.add_argument("--eval-split", default="val", help="evaluation split")
    g.add_argument("--eval-images", type=int, default=None,
                   help="first N images of the split (the original monitors 10 batches per GPU)")
    g.add_argument("--eval-size", type=int, default=None, help="evaluation input size (paper 448)")
    g.add_argument("--eval-ks", type=int, nargs="+", default=None, help="k-means K values (SPEC 5.5: 500 300 21)")
    g.add_argument("--eval-seeds", type=int, default=None, help="k-means seeds averaged (monitoring: 1; demo 3)")
    g.add_argument("--eval-iterations", type=int, default=None, help="k-means iterations (monitoring: 50)")
    g.add_argument("--eval-restarts", type=int, default=None, help="k-means restarts (monitoring: 5)")
    g.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs (0 = only before and after)")
    g.add_argument("--eval-precision", default="fp32", choices=["fp32", "bf16"],
                   help="backbone precision of the quick evaluation: fp32, so the monitored numbers do not depend "
                        "on the GPU's autocast")
    g.add_argument("--output-dir", default="output", help="checkpoints, log.jsonl and the exported backbone")
    g.add_argument("--resume", default=None,
                   help="checkpoint to continue from exactly (step, optimizer, queue, RNG), also on another number "
                        "of processes; 'auto' = <output-dir>/checkpoint.pth when it exists, else start (for job "
                        "scripts that are requeued)")
    g.add_argument("--stop-at-step", type=int, default=None,
                   help="end this run after this global step with a checkpoint, e.g. to fit a job's time limit; "
                        "--resume continues it as if never stopped")
    g.add_argument("--checkpoint-every-minutes", type=float, default=30,
                   help="also write the checkpoint this often (besides every epoch end), so a killed job loses at "
                        "most this much; 0 = only at epoch ends")
    g.add_argument("--dist-timeout-minutes", type=float, default=60,
                   help="how long a process waits for the others before the run fails, e.g. while rank 0 runs the "
                        "quick evaluation (a ViT-B/8 at the defaults takes minutes on a GPU)")
    g.add_argument("--log-every", type=int, default=None, help="print and log every N steps")
    return p


def resolve_defaults(args):
    """Fill the flags left at None from the demo or the paper defaults; returns the names that took a demo value."""
    preset = DEMO_DEFAULTS if args.dataset == "synthetic" else PAPER_DEFAULTS
    if args.dataset == "voc" and args.epochs is None:
        args.epochs = 500  # the paper's PVOC run (SPEC 5.1): trainaug is 12x smaller than IN-100
    filled = []
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
            filled.append(key)
    if args.eval_dataset is None and args.dataset == "synthetic":
        args.eval_dataset = "synthetic"
    if args.eval_dataset == "none":
        args.eval_dataset = None
    return filled if preset is DEMO_DEFAULTS else []


# ------------------------------------------------------------------------------------------------ distributed

def first_slurm_host(nodelist):
    """The first host of a SLURM hostlist: 'gpu[007-010,012],cpu1' -> 'gpu007', 'rack[1-2]-n[01-04]' -> 'rack1-n01'."""
    first = re.match(r"(?:[^,\[]|\[[^\]]*\])+", nodelist.strip())
    if not first:
        raise ValueError(f"cannot read a host from the SLURM node list {nodelist!r}; set MASTER_ADDR")
    return re.sub(r"\[([^\],-]+)[^\]]*\]", r"\1", first.group(0))


def launch_environment(environ):
    """Where this process sits in a launched job: (rank, world_size, local_rank or None, master_addr, master_port),
    from torchrun's RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT or, without them, from SLURM's srun
    (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the address from MASTER_ADDR or the job's first host, the port from
    MASTER_PORT or DEFAULT_MASTER_PORT + job id mod 1000). None when not launched: one process."""
    if "RANK" in environ:
        if "WORLD_SIZE" not in environ:
            raise ValueError("RANK is set but WORLD_SIZE is not: launch with torchrun, or set both")
        local_rank = environ.get("LOCAL_RANK")
        return (int(environ["RANK"]), int(environ["WORLD_SIZE"]), None if local_rank is None else int(local_rank),
                environ.get("MASTER_ADDR", "127.0.0.1"), int(environ.get("MASTER_PORT", DEFAULT_MASTER_PORT)))
    world_size = int(environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS") or 1)
    if "SLURM_PROCID" not in environ or world_size == 1:
        return None
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or ""
    address = environ.get("MASTER_ADDR") or first_slurm_host(nodelist)
    port = int(environ.get("MASTER_PORT") or DEFAULT_MASTER_PORT + int(environ.get("SLURM_JOB_ID", 0)) % 1000)
    return int(environ["SLURM_PROCID"]), world_size, int(environ.get("SLURM_LOCALID", 0)), address, port


class Ranks:
    """This process's place in the run, and the host-side collectives (a gloo group) that keep every rank's
    decisions identical: skip a step, stop, write a checkpoint, resume from which file. They exchange a few numbers
    on the CPU, so they never wait for the GPU. In a single process each is the identity."""

    def __init__(self, rank=0, world_size=1, device=None, timeout_minutes=60.0):
        self.rank, self.world_size = rank, world_size
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.host_group = None
        if world_size > 1:
            timeout = datetime.timedelta(minutes=timeout_minutes)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo", init_method="env://",
                                    rank=rank, world_size=world_size, timeout=timeout)
            self.host_group = dist.new_group(backend="gloo", timeout=timeout)

    def sum(self, values):
        """Element-wise sum over ranks of a list of numbers."""
        if self.world_size == 1:
            return list(values)
        total = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(total, group=self.host_group)
        return total.tolist()

    def share(self, obj):
        """Rank 0's `obj` on every rank (a decision taken once)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.host_group)
        return box[0]

    def gather(self, obj):
        """[obj of rank 0, obj of rank 1, ...] on every rank."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.host_group)
        return out

    def barrier(self):
        """Wait, on the CPU, until every rank arrives (bounded by --dist-timeout-minutes)."""
        if self.world_size > 1:
            dist.barrier(group=self.host_group)

    def close(self):
        if self.world_size > 1:
            dist.destroy_process_group()


def setup_ranks(args, environ=os.environ):
    """One process, or DDP as launched (torchrun or srun), once the global batch and queue split evenly over it."""
    launched = launch_environment(environ)
    world_size = 1 if launched is None else launched[1]
    for flag, total in (("--batch-size", args.batch_size), ("--queue-length", args.queue_length)):
        if total % world_size:
            raise ValueError(f"{flag} {total} is global and must split evenly over the {world_size} processes; "
                             "choose a multiple of the process count")
    args.world_size, args.batch_per_rank = world_size, args.batch_size // world_size
    if launched is None:
        return Ranks()
    rank, world_size, local_rank, address, port = launched
    os.environ.setdefault("MASTER_ADDR", address)
    os.environ.setdefault("MASTER_PORT", str(port))
    device = torch.device("cpu")
    if torch.cuda.is_available():  # RANK without LOCAL_RANK: one process per GPU, in rank order
        device = torch.device("cuda", rank % torch.cuda.device_count() if local_rank is None else local_rank)
        torch.cuda.set_device(device)
    if rank == 0:
        print(f"rank 0 of {world_size}: waiting for the other processes at {os.environ['MASTER_ADDR']}:"
              f"{os.environ['MASTER_PORT']}", flush=True)
    return Ranks(rank, world_size, device, args.dist_timeout_minutes)


# ------------------------------------------------------------------------------------------------ data

def global_batch_indices(num_samples, epoch, seed, batch_size, rank, world_size):
    """This rank's sample indices for one epoch, (steps, batch_size / world_size). Step s takes the global batch
    perm[s*B:(s+1)*B] and rank r its r-th slice, so the samples of a step do not depend on how many processes
    share it; the incomplete last batch is dropped (SPEC 5.4)."""
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed + epoch))
    steps = num_samples // batch_size
    return order[:steps * batch_size].view(steps, world_size, batch_size // world_size)[:, rank]


class StepBatches(torch.utils.data.Sampler):
    """This rank's batch of (epoch, index) keys for every global step in [first_step, last_step)."""

    def __init__(self, num_samples, batch_size, seed, ranks, first_step, last_step):
        self.num_samples, self.batch_size, self.seed, self.ranks = num_samples, batch_size, seed, ranks
        self.iters_per_epoch = num_samples // batch_size
        self.first_step, self.last_step = first_step, last_step

    def __len__(self):
        return self.last_step - self.first_step

    def __iter__(self):
        epoch, indices = None, None
        for step in range(self.first_step, self.last_step):
            if step // self.iters_per_epoch != epoch:
                epoch = step // self.iters_per_epoch
                indices = global_batch_indices(self.num_samples, epoch, self.seed, self.batch_size,
                                               self.ranks.rank, self.ranks.world_size).tolist()
            yield [(epoch, i) for i in indices[step % self.iters_per_epoch]]


def ignore_stop_signals(worker_id):
    """Loader workers leave SIGTERM/SIGUSR1 to the main process, which stops after its step; they end with it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def build_data(args, ranks):
    """The seeded training set, its iterations per epoch (of the global batch), the device-side augmentation (None
    when the workers augment) and the quick-evaluation split."""
    args.augment_on = args.augment_on or ("device" if ranks.device.type == "cuda" else "cpu")
    transform = data.MultiCropTransform(global_size=args.global_size, local_size=args.local_size,
                                        num_global=args.num_global, num_local=args.num_local,
                                        jitter_strength=args.jitter_strength, blur_strength=args.blur_strength,
                                        augment_on=args.augment_on)
    augment = None
    if args.augment_on == "device":
        augment = functools.partial(data.photometric_on_device, max_sigma=transform.blur_sigma[1])
    extra = {} if args.dataset != "synthetic" else dict(num_images=args.num_images, image_size=args.image_size,
                                                        seed=args.seed)
    dataset = data.SeededViews(data.build_train_dataset(args.dataset, args.data_root, transform, **extra), args.seed)
    if args.dataset == "imagenet100" and len(dataset) != IMAGENET100_IMAGES and ranks.rank == 0:
        warnings.warn(f"ImageNet-100 under {args.data_root} has {len(dataset)} training images, not the "
                      f"{IMAGENET100_IMAGES:,} of the paper's split: the epochs and schedules differ from the paper's")
    iters_per_epoch = len(dataset) // args.batch_size
    if iters_per_epoch == 0:
        raise ValueError(f"{len(dataset)} training images are fewer than one global batch of {args.batch_size}")
    eval_set = None
    if args.eval_dataset:
        extra = dict(num_images=args.eval_images) if args.eval_dataset == "synthetic" else {}
        eval_set = data.build_eval_dataset(args.eval_dataset, args.eval_data_root, args.eval_split,
                                           size=args.eval_size, **extra)
        eval_set = torch.utils.data.Subset(eval_set, range(min(args.eval_images, len(eval_set))))
        eval_set.num_classes = eval_set.dataset.num_classes
    return dataset, iters_per_epoch, augment, eval_set


def step_loader(dataset, args, ranks, first_step, last_step):
    """One loader for the rest of the run: its workers live across epochs, and batch s is global step s's."""
    workers = args.workers
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=StepBatches(len(dataset), args.batch_size, args.seed, ranks, first_step, last_step),
        num_workers=workers, collate_fn=data.multicrop_collate, pin_memory=ranks.device.type == "cuda",
        prefetch_factor=4 if workers else None, worker_init_fn=ignore_stop_signals if workers else None,
        generator=torch.Generator().manual_seed(args.seed))  # leaves the global RNG alone


# ------------------------------------------------------------------------------------------------ model, optimiser

def check_sizes(args, patch_size):
    """Crops and evaluation input must be whole token grids; the foreground mask needs a few tokens a side."""
    masked = args.loss_mask != "all"
    lc.check_input_size(args.global_size, patch_size, "--global-size",
                        lc.FOREGROUND_MIN_GRID if masked else 1, "the foreground loss mask" if masked else "the ViT")
    lc.check_input_size(args.local_size, patch_size, "--local-size")
    if args.eval_dataset:
        lc.check_input_size(args.eval_size, patch_size, "--eval-size")


def build_model(args, device):
    """Student (drop-path 0.1) and teacher (0) ViTs, both from the DINO weights when given (SPEC 2.3, 9.1)."""
    arch_kw = {} if args.depth is None else {"depth": args.depth}
    student = lc.build_vit(args.arch, args.patch_size, drop_path_rate=args.drop_path, **arch_kw)
    check_sizes(args, student.patch_size)
    if args.pretrained:
        fmt = lc.load_pretrained(student, args.pretrained)
        print(f"loaded {args.pretrained} ({fmt}) into student and teacher")
    teacher = None
    if not args.no_teacher:
        teacher = lc.build_vit(args.arch, args.patch_size, **arch_kw)
        teacher.load_state_dict(student.state_dict())
    model = lc.Leopart(student, teacher, num_prototypes=args.num_prototypes, hidden_dim=args.hidden_dim,
                       projection_dim=args.projection_dim, num_global_crops=args.num_global,
                       temperature=args.temperature, epsilon=args.epsilon,
                       sinkhorn_iterations=args.sinkhorn_iterations, loss_mask=args.loss_mask, fg_mass=args.fg_mass,
                       queue_length=args.queue_length, roi_size=args.roi_size,
                       teacher_head_init=args.teacher_head_init, bf16=args.bf16)
    model.to(device)
    if args.compile:
        model.compile_backbones()
    return model


def param_groups(model, args):
    """SPEC 5.2, in this order: backbone decayed, backbone not decayed, heads decayed, heads not decayed.
    Biases and 1-D tensors (LayerNorm, LayerScale) are not decayed; cls_token, pos_embed and prototypes are."""
    groups = [dict(params=[], lr=args.lr_backbone, decay=True), dict(params=[], lr=args.lr_backbone, decay=False),
              dict(params=[], lr=args.lr_heads, decay=True), dict(params=[], lr=args.lr_heads, decay=False)]
    for name, param in model.student.named_parameters():
        head = not name.startswith("backbone.")
        decay = not (name.endswith(".bias") or param.ndim == 1)
        groups[2 * head + (not decay)]["params"].append(param)
    for group in groups:
        group["base_lr"] = group["lr"]
        group["weight_decay"] = args.weight_decay if group["decay"] else 0.0
    return groups


def wrap_for_training(leopart, args, ranks):
    """DDP over the student (the only module with gradients; each rank keeps its own queue, SPEC 3.3) and AdamW.
    The fused AdamW (CPU and CUDA alike; it keeps its step counters on the device, so the step needs no host sync)
    and bucket-view gradients change nothing but floating-point order."""
    model = leopart
    if ranks.world_size > 1:
        model = DistributedDataParallel(leopart, device_ids=[ranks.device.index] if ranks.device.type == "cuda"
                                        else None, broadcast_buffers=False, gradient_as_bucket_view=True)
    optimizer = torch.optim.AdamW(param_groups(leopart, args), betas=(0.9, 0.999), eps=1e-8, fused=True)
    return model, optimizer


# ------------------------------------------------------------------------------------------------ checkpoints

def rng_state(device):
    return dict(torch=torch.get_rng_state(), python=random.getstate(),
                cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def checkpoint_state(leopart, optimizer, step, args, ranks):
    """Everything an exact resume needs: model (without this rank's queue), optimizer, step, args, and per rank its
    queue and RNG states (gathered from every rank; a collective)."""
    model = {k: v for k, v in leopart.state_dict().items() if k != "queue"}
    queues = [torch.empty_like(leopart.queue) for _ in range(ranks.world_size)]
    if ranks.world_size > 1:
        dist.all_gather(queues, leopart.queue.contiguous())
    else:
        queues = [leopart.queue]
    return dict(model=model, optimizer=optimizer.state_dict(), step=step, args=vars(args),
                queues=[q.cpu() for q in queues], rng=ranks.gather(rng_state(ranks.device)))


def split_queues(queues, world_size, rows_per_rank):
    """Deal the stored queue rows of a checkpoint's ranks over `world_size` ranks of `rows_per_rank` rows each.

    queues: per saved rank (G, n, d), newest row first, empty rows (all zero) at the end. Rows are taken in push
    order (row j of every saved rank before row j + 1) and dealt round-robin, so every new rank's FIFO stays newest
    first and the new ranks fill equally; every stored row is kept while the total length is unchanged (the newest
    fit otherwise). Returns (world_size, G, rows_per_rank, d)."""
    stacked = torch.stack(list(queues))  # (W0, G, n, d)
    W0, G, n, d = stacked.shape
    in_push_order = stacked.permute(1, 2, 0, 3).reshape(G, n * W0, d)
    out = torch.zeros(world_size, G, rows_per_rank, d, dtype=stacked.dtype)
    for g in range(G):
        rows = in_push_order[g][in_push_order[g].abs().sum(1) > 0][:world_size * rows_per_rank]
        for r in range(world_size):
            mine = rows[r::world_size]
            out[r, g, :len(mine)] = mine
    return out


def restore_checkpoint(checkpoint, leopart, optimizer, args, ranks):
    """Load a checkpoint of any process count: the same count continues exactly (own queue, own RNG); another one
    re-splits the stored queue rows and continues from the same parameters, optimizer state and queue contents."""
    model = dict(checkpoint["model"])
    queues = checkpoint.get("queues") or [model["queue"]]  # a single-process checkpoint of an earlier version
    model["queue"] = split_queues(queues, ranks.world_size, leopart.queue.shape[1])[ranks.rank]
    leopart.load_state_dict(model)
    optimizer.load_state_dict(checkpoint["optimizer"])
    saved_rng = checkpoint["rng"] if isinstance(checkpoint["rng"], list) else [checkpoint["rng"]]
    if len(saved_rng) == ranks.world_size:
        state = saved_rng[ranks.rank]
        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])
        if ranks.device.type == "cuda" and isinstance(state["cuda"], torch.Tensor):
            torch.cuda.set_rng_state(state["cuda"], ranks.device)
    else:  # another process count: no rank's RNG stream continues, so start fresh, distinct streams
        torch.manual_seed(args.seed + 7919 * checkpoint["step"] + ranks.rank)
        random.seed(args.seed + 7919 * checkpoint["step"] + ranks.rank)
    if len(queues) != ranks.world_size and ranks.rank == 0:
        print(f"resumed a {len(queues)}-process checkpoint on {ranks.world_size} processes: queues re-split, "
              "fresh random streams (the run continues, but not bit for bit)")
    return checkpoint["step"]


def resolve_resume(args, ranks, checkpoint_path):
    """Which checkpoint to continue from, decided once on rank 0 and shared, so ranks never disagree."""
    decision = None
    if ranks.rank == 0:
        if args.resume == "auto":
            decision = ("path", str(checkpoint_path) if checkpoint_path.exists() else None)
        elif args.resume:
            decision = ("path", args.resume)
        elif checkpoint_path.exists():
            decision = ("error", f"{checkpoint_path} exists: pass --resume {checkpoint_path} (or --resume auto) to "
                                 "continue that run, or choose another --output-dir")
        else:
            decision = ("path", None)
    kind, value = ranks.share(decision)
    if kind == "error":
        raise FileExistsError(value)
    return value


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ------------------------------------------------------------------------------------------------ evaluation

def cluster_evaluation(backbone, dataset, args, device):
    """The quick overclustering monitor of SPEC 5.5 on the student backbone: {K: mIoU, mean over seeds}."""
    feats = eval_cluster.extract_features(backbone, dataset, batch_size=args.batch_per_rank, device=device,
                                          mask_size=100, precision=args.eval_precision)
    results = eval_cluster.overcluster(feats["features"], feats["masks"], dataset.num_classes, ks=args.eval_ks,
                                       seeds=range(1, args.eval_seeds + 1), mask_size=100,
                                       iterations=args.eval_iterations, restarts=args.eval_restarts, device=device)
    return {k: r["mean"] for k, r in results.items()}


# ------------------------------------------------------------------------------------------------ training

class NonFiniteLoss(RuntimeError):
    pass


class Preempted(RuntimeError):
    """The run stopped on SIGTERM/SIGUSR1 after writing its checkpoint; exit with PREEMPTED_EXIT_STATUS."""


class StopSignals:
    """Records SIGTERM / SIGUSR1 (a cluster's preemption or time-limit warning) instead of dying mid-step; the loop
    asks `requested` once per step. A context manager, so the previous handlers come back."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received = None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        return self

    def handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class LossHealth:
    """Watches the loss for non-finite values on the device, without a host sync per step: counts bad steps and
    remembers the first; `check` (at log steps and before every checkpoint) raises NonFiniteLoss on every rank."""

    def __init__(self, device):
        self.bad_steps = torch.zeros((), device=device)
        self.first_bad = torch.full((), torch.iinfo(torch.int64).max, device=device)

    def record(self, loss, step):
        bad = ~torch.isfinite(loss)
        self.bad_steps += bad
        self.first_bad = torch.where(bad, self.first_bad.clamp_max(step), self.first_bad)

    def raise_if_bad(self, bad_steps, ranks):
        if bad_steps:
            first_bad = self.first_bad.clone()
            if ranks.world_size > 1:
                dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
            raise NonFiniteLoss(f"the loss is not finite at step {int(first_bad)}")

    def check(self, ranks):
        bad_steps = self.bad_steps.clone()
        if ranks.world_size > 1:
            dist.all_reduce(bad_steps)
        self.raise_if_bad(float(bad_steps), ranks)


def to_device(crops, boxes, photometric, augment, device):
    """A loader batch on the training device (asynchronous copies from pinned memory on CUDA); with --augment-on
    device, `augment` turns the uint8 crops into augmented, normalised ones with their photometric parameters."""
    crops = [c.to(device, non_blocking=True) for c in crops]
    boxes = {k: b.to(device, non_blocking=True) for k, b in boxes.items()}
    if augment is not None:
        crops = augment(crops, {k: photometric[k].to(device, non_blocking=True) for k in data.DEVICE_PHOTOMETRIC_KEYS})
    return crops, boxes


def train_step(model, leopart, crops, boxes, optimizer, schedule, step, health):
    """One optimisation step at global step `step`: lr and weight decay from the schedules, loss, backward, teacher
    EMA with the pre-update student (the original's order, SPEC 2.3), then the optimizer. No host sync."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * schedule["lr"][step]
        if group["decay"]:
            group["weight_decay"] = schedule["wd"][step]
    loss = model(crops, boxes)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    leopart.update_teacher(schedule["momentum"][step])
    optimizer.step()
    loss = loss.detach()
    health.record(loss, step)
    return loss


class Run:
    """The loop's state that outlives an epoch: the batch iterator, the checkpoint file and when it was last
    written, the counts of skipped images and steps, the signals, and how the loop ended."""

    def __init__(self, batches, augment, stop_signals, checkpoint_path):
        self.batches, self.augment = batches, augment
        self.stop_signals, self.checkpoint_path = stop_signals, checkpoint_path
        self.last_save, self.saved_step = time.monotonic(), None
        self.skipped_images = self.skipped_steps = 0
        self.stopped_by = None

    def save(self, leopart, optimizer, step, args, ranks, health):
        """Write the checkpoint atomically on rank 0 once every rank has contributed its queue and RNG; never one
        with non-finite weights."""
        health.check(ranks)
        state = checkpoint_state(leopart, optimizer, step, args, ranks)
        if ranks.rank == 0:
            lc.atomic_save(state, self.checkpoint_path)
        ranks.barrier()
        self.last_save, self.saved_step = time.monotonic(), step


def train_one_epoch(model, leopart, run, optimizer, schedule, epoch, step, end_step, args, ranks, log, health):
    """Steps [step, end_step) of one epoch; returns the step reached. Before each step the ranks agree, on the host,
    whether any rank's batch is entirely unreadable (then every rank skips that step, which still counts), whether a
    signal asks to stop (then the epoch ends before the step), and whether a time-based checkpoint is due."""
    start, seen, interval = time.time(), 0, args.checkpoint_every_minutes * 60
    while step < end_step:
        crops, boxes, photometric, num_skipped = next(run.batches)
        empty, num_skipped, stop, due = ranks.sum([crops is None, num_skipped, run.stop_signals.received is not None,
                                                   bool(interval) and time.monotonic() - run.last_save >= interval])
        if stop:
            run.stopped_by = run.stop_signals.received or "a signal to another process"
            break
        if due:
            run.save(leopart, optimizer, step, args, ranks, health)
        run.skipped_images += int(num_skipped)
        if empty:
            run.skipped_steps += 1
            log(dict(event="skipped_step", step=step, epoch=epoch, ranks_without_images=int(empty)))
            step += 1
            continue
        crops, boxes = to_device(crops, boxes, photometric, run.augment, ranks.device)
        loss = train_step(model, leopart, crops, boxes, optimizer, schedule, step, health)
        step += 1
        seen += args.batch_size
        if step % args.log_every == 0 or step == end_step:
            stats = torch.stack([loss / ranks.world_size, health.bad_steps])
            if ranks.world_size > 1:  # the loss of the global batch, and any rank's non-finite loss
                dist.all_reduce(stats)
            loss, bad_steps = stats.tolist()
            health.raise_if_bad(bad_steps, ranks)
            elapsed = time.time() - start
            log(dict(step=step, epoch=epoch, loss=loss, lr_backbone=optimizer.param_groups[0]["lr"],
                     lr_heads=optimizer.param_groups[2]["lr"], weight_decay=optimizer.param_groups[0]["weight_decay"],
                     momentum=schedule["momentum"][step - 1], images_per_s=seen / elapsed,
                     eta_min=elapsed / max(seen, 1) * (args.last_step - step) * args.batch_size / 60,
                     skipped_images=run.skipped_images, skipped_steps=run.skipped_steps))
    return step


def open_log(args, ranks, output_dir, step, demo_keys):
    """Rank 0's JSON-lines log with a start record; returns `log(record)` (prints and appends; a no-op elsewhere)."""
    if ranks.rank != 0:
        return lambda record: None
    output_dir.mkdir(parents=True, exist_ok=True)
    log_file = open(output_dir / "log.jsonl", "a")

    def log(record):
        print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()), flush=True)
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()

    header = dict(event="start", git_commit=git_commit(), device=str(ranks.device), world_size=ranks.world_size,
                  batch_per_process=args.batch_per_rank, queue_per_process=args.queue_length // ranks.world_size,
                  iters_per_epoch=args.iters_per_epoch, total_steps=args.total_steps, resumed_at_step=step,
                  args=vars(args))
    print(json.dumps(header, indent=1))
    print(f"global batch {args.batch_size} = {ranks.world_size} process(es) x {args.batch_per_rank} images; queue "
          f"{args.queue_length} = {ranks.world_size} x {args.queue_length // ranks.world_size} rows per global crop")
    if demo_keys:
        print(f"demo defaults (built-in synthetic data): {', '.join(demo_keys)}")
    log_file.write(json.dumps(header) + "\n")
    log_file.flush()
    return log


def main(args):
    demo_keys = resolve_defaults(args)
    ranks = setup_ranks(args)
    try:
        return train(args, ranks, demo_keys)
    finally:
        ranks.close()


def train(args, ranks, demo_keys):
    """Set up, loop over epochs with checkpoints and the quick evaluation, then export; returns the Leopart module."""
    device = ranks.device
    args.bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    output_dir = Path(args.output_dir)
    checkpoint_path = output_dir / "checkpoint.pth"
    resume_path = resolve_resume(args, ranks, checkpoint_path)
    resume = lc.read_checkpoint(resume_path) if resume_path else None  # fail early on a bad file
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    if device.type == "cuda":
        # TF32 matmuls stay off (torch's default), so the scores are true fp32; cuDNN's own TF32 default for
        # convolutions reaches only the backbone's patch embedding (the mask's blur runs in float64)
        torch.backends.cudnn.benchmark = True

    leopart = build_model(args, device)
    dataset, args.iters_per_epoch, augment, eval_set = build_data(args, ranks)
    args.total_steps = args.epochs * args.iters_per_epoch
    schedule = dict(lr=lc.cosine_schedule(1.0, 0.0, args.epochs, args.iters_per_epoch).tolist(),
                    wd=lc.cosine_schedule(args.weight_decay, args.weight_decay_end, args.epochs,
                                          args.iters_per_epoch).tolist(),
                    momentum=lc.cosine_schedule(args.momentum_teacher, 1.0, args.epochs, args.iters_per_epoch).tolist())
    model, optimizer = wrap_for_training(leopart, args, ranks)
    step = restore_checkpoint(resume, leopart, optimizer, args, ranks) if resume else 0
    log = open_log(args, ranks, output_dir, step, demo_keys)

    def evaluate(tag, step):
        scores = None
        if eval_set is not None and ranks.rank == 0:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # training RNG untouched
                scores = cluster_evaluation(leopart.student.backbone, eval_set, args, device)
            log(dict(event="cluster_eval", step=step, model=tag, **{f"miou_k{k}": v for k, v in scores.items()}))
        ranks.barrier()  # the other ranks wait here, bounded by --dist-timeout-minutes
        return scores

    initial_scores = evaluate("init", 0) if step == 0 else None
    args.last_step = args.total_steps if args.stop_at_step is None else min(args.stop_at_step, args.total_steps)
    health = LossHealth(device)
    with StopSignals() as stop_signals:
        run = Run(iter(step_loader(dataset, args, ranks, step, args.last_step)), augment, stop_signals,
                  checkpoint_path)
        try:
            step = train_epochs(model, leopart, run, optimizer, schedule, step, args, ranks, log, health, evaluate)
        except NonFiniteLoss as e:
            kept = f"the last good checkpoint is {checkpoint_path} (step {run.saved_step})" \
                if run.saved_step is not None else f"the last good checkpoint is {resume_path}" if resume_path \
                else "no checkpoint was written yet"
            raise NonFiniteLoss(f"{e}; stopping. Nothing after it was saved; {kept}. Lower the learning rates or "
                                "check the data.") from None
        if resume and step == resume["step"]:  # nothing trained, e.g. --stop-at-step at the resumed step:
            run.save(leopart, optimizer, step, args, ranks, health)  # still write the (re-split) state
    if run.stopped_by is not None:
        raise Preempted(f"stopped by {run.stopped_by} after step {step} of {args.total_steps}; checkpoint "
                        f"{checkpoint_path}. To continue, run the same command with --resume {checkpoint_path} (or "
                        f"--resume auto); exit status {PREEMPTED_EXIT_STATUS}")
    if step == args.total_steps:
        finish(leopart, evaluate, initial_scores, eval_set, args, ranks, output_dir)
    return leopart


def train_epochs(model, leopart, run, optimizer, schedule, step, args, ranks, log, health, evaluate):
    """Epochs from `step` to --stop-at-step or the end, a checkpoint after each (and at a stop), the quick
    evaluation every --eval-every epochs; returns the step reached."""
    while step < args.last_step and run.stopped_by is None:
        epoch = step // args.iters_per_epoch
        end_step = min((epoch + 1) * args.iters_per_epoch, args.last_step)
        leopart.train()
        step = train_one_epoch(model, leopart, run, optimizer, schedule, epoch, step, end_step, args, ranks, log,
                               health)
        run.save(leopart, optimizer, step, args, ranks, health)
        log(dict(event="epoch_end" if step == end_step else "stop", epoch=epoch, step=step,
                 skipped_images=run.skipped_images, skipped_steps=run.skipped_steps))
        epochs_done = step // args.iters_per_epoch
        if step % args.iters_per_epoch == 0 and args.eval_every and epochs_done % args.eval_every == 0 \
                and step < args.total_steps and run.stopped_by is None:
            evaluate("student", step)
    return step


def finish(leopart, evaluate, initial_scores, eval_set, args, ranks, output_dir):
    """Export the student backbone and compare the trained model's quick evaluation with its initialisation's."""
    if ranks.rank == 0:
        lc.export_backbone(leopart, output_dir / "backbone.pth")
        print(f"exported the student backbone (DINO layout) to {output_dir / 'backbone.pth'}")
    final_scores = evaluate("trained", args.total_steps)
    if final_scores and initial_scores:
        print(f"cluster evaluation on {args.eval_dataset} {args.eval_split} ({len(eval_set)} images), mIoU:")
        for k in final_scores:
            print(f"  K={k:<4d} initialisation {100 * initial_scores[k]:5.1f}   trained {100 * final_scores[k]:5.1f}")


if __name__ == "__main__":
    parsed = get_args_parser().parse_args()
    try:
        main(parsed)
    except Preempted as stopped:
        print(f"train.py: {stopped}", file=sys.stderr)
        sys.exit(PREEMPTED_EXIT_STATUS)
    except (FileNotFoundError, FileExistsError, ValueError, NonFiniteLoss) as error:
        print(f"train.py: error: {data.error_message(error)}", file=sys.stderr)
        sys.exit(1)
