"""Speed of a Leopart training step on random tensors of the real crop shapes.

    python bench.py --arch vit_small --batch-size 2 --device cpu
    python bench.py --arch vit_small --batch-size 32 --device cuda

Prints images/s of the full step; the overhead ratio (full Leopart step / the same networks' plain work on the same
crops: student backbone + head + prototypes forward and backward with a trivial loss, teacher forward, optimizer
step), i.e. the cost of what Leopart adds (Sinkhorn, queue, alignment, foreground mask, loss, EMA); the model FLOP
utilisation on CUDA; and Sinkhorn and the loss alone.
"""
import argparse
import statistics
import time

import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import data
import leopart_core as lc

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


def get_args_parser():
    p = argparse.ArgumentParser("Leopart step benchmark")
    p.add_argument("--arch", default="vit_small", choices=sorted(lc.ARCHS))
    p.add_argument("--patch-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=2, help="images per step")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="auto = bf16 on CUDA")
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=96)
    p.add_argument("--num-local", type=int, default=4)
    p.add_argument("--loss-mask", default="fg", choices=["fg", "all", "bg"])
    p.add_argument("--queue-length", type=int, default=8192, help="a full queue is benchmarked")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=6, help="timed steps of each kind, interleaved")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: known GPUs)")
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


def main(args):
    device = torch.device(args.device)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    torch.manual_seed(0)
    student = lc.build_vit(args.arch, args.patch_size, drop_path_rate=0.1)
    teacher = lc.build_vit(args.arch, args.patch_size)
    model = lc.Leopart(student, teacher, loss_mask=args.loss_mask, queue_length=args.queue_length,
                       bf16=bf16).to(device)
    with torch.no_grad():  # a filled queue, so Sinkhorn runs on queue + batch as in steady-state training
        model.queue.copy_(torch.nn.functional.normalize(torch.randn_like(model.queue), dim=-1))
    optimizer = torch.optim.AdamW([p for p in model.student.parameters()], lr=1e-5, weight_decay=0.04)
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

    for _ in range(args.warmup):
        leopart_step()
        plain_step()
    full, plain = [], []
    for _ in range(args.steps):  # interleaved, so load changes on a shared machine hit both alike
        full.append(timed(leopart_step, device))
        plain.append(timed(plain_step, device))
    t_full, t_plain = statistics.median(full), statistics.median(plain)

    # Leopart's own pieces alone, on this step's real shapes
    B, K = args.batch_size, model.student.prototypes.out_features
    grid = args.global_size // model.patch_size
    scores = torch.nn.functional.normalize(torch.randn(model.queue.shape[1] + B * grid * grid, K, device=device))
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
          f"queue {args.queue_length}, {torch.get_num_threads()} CPU threads")
    print(f"full Leopart step  {1000 * t_full:9.1f} ms   {B / t_full:8.1f} images/s")
    print(f"plain network work {1000 * t_plain:9.1f} ms   {B / t_plain:8.1f} images/s")
    print(f"overhead ratio     {t_full / t_plain:9.3f}  (full / plain, medians of {args.steps} interleaved steps)")
    print(f"Sinkhorn alone     {1000 * t_sinkhorn:9.2f} ms   ({scores.shape[0]} x {K}, 3 iterations)")
    print(f"loss alone         {1000 * t_loss:9.2f} ms   (forward + backward, {2 * (len(crops) - 1)} pairs)")
    if device.type == "cuda":
        with FlopCounterMode(display=False) as counter:
            leopart_step()
        flops = counter.get_total_flops()
        name = torch.cuda.get_device_name(device)
        peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        achieved = flops / t_full / 1e12
        mfu = f"{100 * achieved / peak:.1f} % of {peak:.0f} TFLOP/s bf16 peak" if peak else "unknown peak"
        print(f"model FLOPs/step   {flops / 1e9:9.1f} GFLOP   {achieved:8.1f} TFLOP/s   MFU {mfu} ({name})")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
