"""Leopart fine-tuning (Sec. 3.1; SPEC 5): one process on a GPU or the CPU, or DDP under torchrun.

    python train.py                       # demo: built-in synthetic scenes, a small ViT from scratch, ~3 min on CPU
    torchrun --nproc_per_node 2 train.py --dataset imagenet100 --data-root /data/in100 --arch vit_small \\
        --pretrained dino_deitsmall16_pretrain.pth --eval-dataset voc --eval-data-root /data/voc
                                          # the paper's ViT-S/16 ImageNet-100 run (32 images per GPU, 50 epochs)
"""
import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import data
import eval_cluster
import leopart_core as lc

# Defaults that apply only when training on the built-in synthetic set (the demo): from scratch on a CPU, a small
# ViT needs larger learning rates and smaller crops and heads than the paper's DINO fine-tuning. Every other default
# is the paper's ViT-S/16 recipe (SPEC 5.1). An explicitly given flag always wins.
DEMO_DEFAULTS = dict(arch="vit_tiny", patch_size=8, depth=4, epochs=6, batch_size=16, num_images=640,
                     image_size=96, global_size=64, local_size=32, jitter_strength=0.4, hidden_dim=512,
                     projection_dim=32, num_prototypes=50, queue_length=1024, teacher_head_init="copy",
                     momentum_teacher=0.99, lr_backbone=2e-4, lr_heads=2e-3, eval_images=200, eval_size=96,
                     eval_ks=[30, 100], eval_seeds=3, eval_iterations=30, eval_restarts=2, workers=1,
                     log_every=10)
PAPER_DEFAULTS = dict(arch="vit_small", patch_size=None, depth=None, epochs=50, batch_size=32, num_images=None,
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
                   help="training images: synthetic (built in, no download), imagenet100 (the paper's main run), "
                        "coco (train2017, Table 2/3 'IN+CC' continues on it), voc (trainaug), folder (your images)")
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
    g.add_argument("--epochs", type=int, default=None, help="paper 50 (IN-100, COCO); demo 6")
    g.add_argument("--batch-size", type=int, default=None, help="images per GPU (paper 32 on 2 GPUs; demo 16)")
    g.add_argument("--lr-backbone", type=float, default=None, help="AdamW lr of the ViT, cosine to 0 (paper 1e-5)")
    g.add_argument("--lr-heads", type=float, default=None, help="lr of head and prototypes (paper 1e-4)")
    g.add_argument("--weight-decay", type=float, default=0.04, help="start of the cosine weight-decay schedule")
    g.add_argument("--weight-decay-end", type=float, default=0.5, help="end of the weight-decay schedule")
    g.add_argument("--momentum-teacher", type=float, default=None,
                   help="EMA momentum, cosine to 1 (SPEC 2.3: 0.9995; demo 0.99, for a run of a few hundred steps)")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="bf16 autocast for backbone and head (Sinkhorn and loss stay fp32); auto = bf16 on CUDA. "
                        "The paper trained in fp32.")
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
    g.add_argument("--output-dir", default="output", help="checkpoints, log.jsonl and the exported backbone")
    g.add_argument("--resume", default=None, help="checkpoint to continue from exactly (step, optimizer, queue, RNG)")
    g.add_argument("--stop-at-step", type=int, default=None,
                   help="end this run after this global step with a checkpoint, e.g. to fit a job's time limit; "
                        "--resume continues it as if never stopped")
    g.add_argument("--log-every", type=int, default=None, help="print and log every N steps")
    return p


def resolve_defaults(args):
    """Fill the flags left at None from the demo or the paper defaults; returns the names that took a demo value."""
    preset = DEMO_DEFAULTS if args.dataset == "synthetic" else PAPER_DEFAULTS
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

def init_distributed():
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK: DDP with nccl on CUDA, gloo on CPU. Otherwise one process."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def global_batch_indices(num_samples, epoch, seed, batch_size, rank, world_size):
    """This rank's sample indices for one epoch, in step order. Step s takes the global batch
    perm[s*W*B:(s+1)*W*B] and rank r its r-th slice of B, so the samples of a step do not depend on how many
    processes share it; the incomplete last batch is dropped (SPEC 5.4)."""
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(num_samples, generator=generator)
    steps = num_samples // (batch_size * world_size)
    order = order[:steps * batch_size * world_size].view(steps, world_size, batch_size)
    return order[:, rank].reshape(-1).tolist()


class SeededViews(torch.utils.data.Dataset):
    """Wraps the training set so the random crops of sample i in epoch e come from their own seed (seed, e, i):
    identical whatever the worker count, the process count, or where a resumed run restarts."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        sample_seed = (self.seed * 1_000_003 + self.epoch) * 10_000_019 + index
        state = random.getstate()
        random.seed(sample_seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            item = self.dataset[index]
        random.setstate(state)
        return item


# ------------------------------------------------------------------------------------------------ model, optimiser

def build_model(args, device):
    """Student (drop-path 0.1) and teacher (0) ViTs, both from the DINO weights when given (SPEC 2.3, 9.1)."""
    arch_kw = {} if args.depth is None else {"depth": args.depth}
    student = lc.build_vit(args.arch, args.patch_size, drop_path_rate=args.drop_path, **arch_kw)
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
    return model.to(device)


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


# ------------------------------------------------------------------------------------------------ checkpoints

def checkpoint_state(model, optimizer, step, args):
    """Everything an exact resume needs. Under DDP the per-rank queues are gathered (each rank keeps its own)."""
    state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), step=step, args=vars(args),
                 rng=dict(torch=torch.get_rng_state(), python=random.getstate(),
                          cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []))
    if dist.is_initialized() and model.queue.numel():
        queues = [torch.empty_like(model.queue) for _ in range(dist.get_world_size())]
        dist.all_gather(queues, model.queue)
        state["queues"] = [q.cpu() for q in queues]
    return state


def restore_checkpoint(checkpoint, model, optimizer, rank):
    model.load_state_dict(checkpoint["model"])
    if "queues" in checkpoint:
        model.queue.copy_(checkpoint["queues"][rank])
    optimizer.load_state_dict(checkpoint["optimizer"])
    torch.set_rng_state(checkpoint["rng"]["torch"])
    random.setstate(checkpoint["rng"]["python"])
    if checkpoint["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
    return checkpoint["step"]


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ------------------------------------------------------------------------------------------------ evaluation

def cluster_evaluation(backbone, dataset, args, device):
    """The quick overclustering monitor of SPEC 5.5 on the student backbone: {K: mIoU, mean over seeds}."""
    feats = eval_cluster.extract_features(backbone, dataset, batch_size=args.batch_size, device=device,
                                          mask_size=100)
    results = eval_cluster.overcluster(feats["features"], feats["masks"], dataset.num_classes, ks=args.eval_ks,
                                       seeds=range(1, args.eval_seeds + 1), mask_size=100,
                                       iterations=args.eval_iterations, restarts=args.eval_restarts, device=device)
    return {k: r["mean"] for k, r in results.items()}


# ------------------------------------------------------------------------------------------------ training

class NonFiniteLoss(RuntimeError):
    pass


def train_one_epoch(model, leopart, loader, optimizer, schedule, epoch, step, last_step, args, log):
    """One pass over the loader from global step `step`; returns the next step. Per step: lr and weight decay
    from the schedules, loss, backward, teacher EMA with the pre-update student (the original's order, SPEC 2.3),
    then the optimizer step."""
    device = next(leopart.parameters()).device
    start, seen, skipped = time.time(), 0, 0
    for crops, boxes, num_skipped in loader:
        skipped += num_skipped
        if crops is None:
            continue
        for i, group in enumerate(optimizer.param_groups):
            group["lr"] = group["base_lr"] * schedule["lr"][step].item()
            if group["decay"]:
                group["weight_decay"] = schedule["wd"][step].item()
        crops = [c.to(device, non_blocking=True) for c in crops]
        boxes = {k: b.to(device, non_blocking=True) for k, b in boxes.items()}
        loss = model(crops, boxes)
        non_finite = (~torch.isfinite(loss.detach())).float()
        if dist.is_initialized():  # every rank stops together, rather than the others waiting for the one
            dist.all_reduce(non_finite)
        if non_finite.item():
            raise NonFiniteLoss(f"the loss is not finite ({loss.item()} on this process) at step {step}, "
                                f"epoch {epoch}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        leopart.update_teacher(schedule["momentum"][step].item())
        optimizer.step()
        step += 1
        seen += crops[0].shape[0] * args.world_size
        if step % args.log_every == 0 or step == last_step:
            loss = loss.detach()
            if dist.is_initialized():  # log the loss of the global batch, not of this rank's share
                dist.all_reduce(loss)
                loss /= args.world_size
            elapsed = time.time() - start
            eta = elapsed / max(seen, 1) * (last_step - step) * crops[0].shape[0] * args.world_size
            log(dict(step=step, epoch=epoch, loss=loss.item(), lr_backbone=optimizer.param_groups[0]["lr"],
                     lr_heads=optimizer.param_groups[2]["lr"], weight_decay=optimizer.param_groups[0]["weight_decay"],
                     momentum=schedule["momentum"][step - 1].item(), images_per_s=seen / elapsed,
                     eta_min=eta / 60, skipped_images=skipped))
        if step == last_step:
            break
    return step


def main(args):
    demo_keys = resolve_defaults(args)
    rank, args.world_size, device = init_distributed()
    args.bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    output_dir = Path(args.output_dir)
    checkpoint_path = output_dir / "checkpoint.pth"
    if checkpoint_path.exists() and not args.resume:
        raise FileExistsError(f"{checkpoint_path} exists: pass --resume {checkpoint_path} to continue that run, "
                              "or choose another --output-dir")
    resume = lc.read_checkpoint(args.resume) if args.resume else None  # fail early on a bad file
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True

    transform = data.MultiCropTransform(global_size=args.global_size, local_size=args.local_size,
                                        num_global=args.num_global, num_local=args.num_local,
                                        jitter_strength=args.jitter_strength, blur_strength=args.blur_strength)
    extra = {} if args.dataset != "synthetic" else dict(num_images=args.num_images, image_size=args.image_size,
                                                        seed=args.seed)
    dataset = SeededViews(data.build_train_dataset(args.dataset, args.data_root, transform, **extra), args.seed)
    iters_per_epoch = len(dataset) // (args.batch_size * args.world_size)
    if iters_per_epoch == 0:
        raise ValueError(f"{len(dataset)} training images are fewer than one global batch of "
                         f"{args.batch_size * args.world_size}")
    total_steps = args.epochs * iters_per_epoch
    schedule = dict(lr=lc.cosine_schedule(1.0, 0.0, args.epochs, iters_per_epoch),
                    wd=lc.cosine_schedule(args.weight_decay, args.weight_decay_end, args.epochs, iters_per_epoch),
                    momentum=lc.cosine_schedule(args.momentum_teacher, 1.0, args.epochs, iters_per_epoch))
    eval_set = None
    if args.eval_dataset:
        extra = dict(num_images=args.eval_images) if args.eval_dataset == "synthetic" else {}
        eval_set = data.build_eval_dataset(args.eval_dataset, args.eval_data_root, args.eval_split,
                                           size=args.eval_size, **extra)
        eval_set = torch.utils.data.Subset(eval_set, range(min(args.eval_images, len(eval_set))))
        eval_set.num_classes = eval_set.dataset.num_classes

    leopart = build_model(args, device)
    model = leopart
    if args.world_size > 1:  # only the student requires grad, so exactly its gradients are all-reduced
        model = DistributedDataParallel(leopart, device_ids=[device.index] if device.type == "cuda" else None,
                                        broadcast_buffers=False)  # each rank keeps its own queue (SPEC 3.3)
    optimizer = torch.optim.AdamW(param_groups(leopart, args), betas=(0.9, 0.999), eps=1e-8)
    step = restore_checkpoint(resume, leopart, optimizer, rank) if resume else 0

    log_file = None
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        log_file = open(output_dir / "log.jsonl", "a")

    def log(record):
        if rank == 0:
            print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()),
                  flush=True)
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()

    if rank == 0:
        header = dict(event="start", git_commit=git_commit(), device=str(device), world_size=args.world_size,
                      iters_per_epoch=iters_per_epoch, total_steps=total_steps, resumed_at_step=step,
                      args=vars(args))
        print(json.dumps(header, indent=1))
        if demo_keys:
            print(f"demo defaults (built-in synthetic data): {', '.join(demo_keys)}")
        log_file.write(json.dumps(header) + "\n")

    def evaluate(tag):
        if eval_set is None or rank != 0:
            return None
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # training RNG untouched
            scores = cluster_evaluation(leopart.student.backbone, eval_set, args, device)
        log(dict(event="cluster_eval", step=step, model=tag, **{f"miou_k{k}": v for k, v in scores.items()}))
        return scores

    initial_scores = evaluate("init") if step == 0 else None
    last_step = total_steps if args.stop_at_step is None else min(args.stop_at_step, total_steps)
    last_good = None
    try:
        while step < last_step:
            epoch, offset = divmod(step, iters_per_epoch)
            dataset.epoch = epoch
            indices = global_batch_indices(len(dataset), epoch, args.seed, args.batch_size, rank, args.world_size)
            loader = torch.utils.data.DataLoader(
                dataset, batch_size=args.batch_size, sampler=indices[offset * args.batch_size:],
                num_workers=args.workers, collate_fn=data.multicrop_collate, pin_memory=device.type == "cuda",
                generator=torch.Generator().manual_seed(args.seed + epoch))  # leaves the global RNG alone
            leopart.train()
            step = train_one_epoch(model, leopart, loader, optimizer, schedule, epoch, step, last_step, args, log)
            epoch_done = step % iters_per_epoch == 0
            state = checkpoint_state(leopart, optimizer, step, args)
            if rank == 0:
                lc.atomic_save(state, checkpoint_path)
                last_good = step
            if epoch_done and args.eval_every and (step // iters_per_epoch) % args.eval_every == 0 \
                    and step < total_steps:
                evaluate("student")
    except NonFiniteLoss as e:
        kept = f"the last good checkpoint is {checkpoint_path} (step {last_good})" if last_good is not None or \
            checkpoint_path.exists() else "no checkpoint was written yet"
        raise NonFiniteLoss(f"{e}; stopping. Nothing of this epoch was saved; {kept}. Lower the learning rates or "
                            "check the data.") from None

    if step == total_steps and rank == 0:
        lc.export_backbone(leopart, output_dir / "backbone.pth")
        final_scores = evaluate("trained")
        print(f"exported the student backbone (DINO layout) to {output_dir / 'backbone.pth'}")
        if final_scores and initial_scores:
            print(f"cluster evaluation on {args.eval_dataset} {args.eval_split} ({len(eval_set)} images), mIoU:")
            for k in final_scores:
                print(f"  K={k:<4d} initialisation {100 * initial_scores[k]:5.1f}   trained {100 * final_scores[k]:5.1f}")
    if log_file:
        log_file.close()
    if dist.is_initialized():
        dist.destroy_process_group()
    return leopart


if __name__ == "__main__":
    parsed = get_args_parser().parse_args()
    try:
        main(parsed)
    except (FileNotFoundError, FileExistsError, ValueError, NonFiniteLoss) as error:
        print(f"train.py: error: {data.error_message(error)}", file=sys.stderr)
        sys.exit(1)
