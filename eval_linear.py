"""Linear and FCN probes on frozen spatial tokens (SPEC 6.a, 6.b; paper "LC" columns and Table 6).

Train a head on a labelled training split, then evaluate it on the full validation split at 448 px:

    python eval_linear.py --pretrained leopart_vits16.ckpt --dataset voc --data-root /data/VOC --output-dir out/lin
    python eval_linear.py --pretrained leopart_vits16.ckpt --dataset voc --data-root /data/VOC \
        --head leopart_vits16_voc_lin_head.ckpt          # evaluate a trained or released head only

Training follows the original `linear_finetune.py`: joint RandomResizedCrop(448, 0.8-1) + flip, tokens upsampled
bilinearly to 100x100, head at 100x100, cross-entropy against masks nearest-downsampled to 100x100 (ignore 255),
SGD(momentum 0.9, weight decay 1e-4), StepLR(20 epochs, 0.1). The original then selects one of its checkpoints by
mIoU on the first 8 validation batches (SPEC 6.a); this script keeps the head of the last epoch instead (no model
selection on validation data).
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import error_message
from eval_cluster import (Progress, add_backbone_and_data_args, backbone_tokens, build_frozen_backbone, build_split,
                          confusion_matrix, extract_features, maps_folder, match_and_score, resize_labels,
                          resolve_device, save_panel, voc_palette, write_json)
from leopart_core import atomic_save, check_input_size, load_state_strict, read_checkpoint

HEAD_PREFIX = "finetune_head."  # the original's LightningModule attribute; released head files keep it (SPEC 9.3)
# Defaults per head type (SPEC 6.a, 6.b for ViT-S/16): global batch (per-GPU batch x 2 GPUs), epochs, lr.
HEAD_DEFAULTS = {"linear": {"batch_size": 120, "epochs": 25, "lr": 0.01},
                 "fcn": {"batch_size": 64, "epochs": 30, "lr": 0.01}}
HEAD_EVAL_ELEMENTS = 1 << 27


class ConvModule(nn.Module):
    """mmcv `ConvModule` without normalisation: conv (with bias) then ReLU; mmcv `kaiming_init` (fan_out, normal,
    ReLU gain, bias 0) as its `init_weights` does (SPEC 6.b). The conv sits in `.conv` so names match mmcv's."""

    def __init__(self, in_channels, out_channels, kernel_size):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=True)
        nn.init.kaiming_normal_(self.conv.weight, a=0, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.conv.bias)

    def forward(self, x):
        return F.relu(self.conv(x), inplace=True)


class FCNHead(nn.Module):
    """The original's mmseg-style FCN head without normalisation (SPEC 6.b, `fcn/fcn_head.py::FCNHead`).

    x (B, D, H, W) -> logits (B, num_classes, H, W): two 3x3 ConvModules D->512->512, a 3x3 ConvModule on
    concat[x, convs(x)] (D+512 -> 512), Dropout2d, and a 1x1 `conv_seg` with PyTorch's default init (the original
    never calls its init_weights). Parameter names `convs.{0,1}.conv.*`, `conv_cat.conv.*`, `conv_seg.*` load the
    released FCN heads.
    """

    def __init__(self, in_channels, num_classes, channels=512, kernel_size=3, dropout=0.1):
        super().__init__()
        self.convs = nn.Sequential(ConvModule(in_channels, channels, kernel_size),
                                   ConvModule(channels, channels, kernel_size))
        self.conv_cat = ConvModule(in_channels + channels, channels, kernel_size)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x):
        out = self.conv_cat(torch.cat([x, self.convs(x)], dim=1))
        return self.conv_seg(self.dropout(out))


def build_head(head_type, embed_dim, num_classes):
    """The probe head: `nn.Conv2d(D, C, 1)` with PyTorch default init (SPEC 6.a) or `FCNHead` (SPEC 6.b)."""
    if head_type == "linear":
        return nn.Conv2d(embed_dim, num_classes, 1)
    if head_type == "fcn":
        return FCNHead(embed_dim, num_classes)
    raise ValueError(f"head type must be 'linear' or 'fcn', got {head_type!r}")


def read_head_state(path):
    """Tensors of a head file with the `finetune_head.` prefix removed -> (state dict, inferred head type).

    Accepts the released `*_lin_head.ckpt` / `*_fcn_head.ckpt` (plain dicts with `finetune_head.` keys, SPEC 9.3),
    Lightning checkpoints (`state_dict`; only `finetune_head.*` is kept when present) and the files this script
    writes. The type is 'fcn' when `conv_seg.weight` is present, else 'linear'.
    """
    try:
        checkpoint = read_checkpoint(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"--head file {path} does not exist") from None
    except ValueError as e:
        raise ValueError(f"cannot read head file: {e}") from None
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        raise ValueError(f"head file {path} holds a {type(checkpoint).__name__}, expected a dict of tensors")
    tensors = {k: v for k, v in checkpoint.items() if torch.is_tensor(v)}
    if any(k.startswith(HEAD_PREFIX) for k in tensors):
        tensors = {k[len(HEAD_PREFIX):]: v for k, v in tensors.items() if k.startswith(HEAD_PREFIX)}
    if not tensors:
        raise ValueError(f"head file {path} contains no tensors")
    return tensors, ("fcn" if "conv_seg.weight" in tensors else "linear")


def load_head_strict(head, state, path):
    """Load `state` into `head` strictly; a ValueError names missing, unexpected and mis-shaped keys."""
    load_state_strict(head, state, f"head file {path} into a {type(head).__name__} for this backbone and data set")


def save_head(head, path):
    """Write the head in the released layout (`finetune_head.`-prefixed tensors), atomically."""
    atomic_save({HEAD_PREFIX + k: v.detach().cpu().clone() for k, v in head.state_dict().items()}, path)


def probe_logits(head, tokens, size):
    """Logits (B, C, size, size) of a head on tokens (B, h, w, D): the tokens are upsampled bilinearly
    (align_corners False) to size x size and the head runs there (SPEC 6.a training at 100, 6.b evaluation at 448).

    For the linear head the 1x1 conv runs on the token grid and its logits are upsampled instead: identical up to
    float round-off (a 1x1 conv commutes with bilinear interpolation, whose weights sum to 1), and D/C times cheaper.
    """
    x = tokens.permute(0, 3, 1, 2)
    if isinstance(head, nn.Conv2d) and head.kernel_size == (1, 1):
        return F.interpolate(head(x), size=(size, size), mode="bilinear", align_corners=False)
    return head(F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False))


def cache_tokens(backbone, dataset, args, device, progress):
    """Tokens (N, h, w, D) bfloat16 and masks (N, train_mask_size, train_mask_size) uint8 of a whole split, on CPU,
    each held once (`extract_features` fills tensors allocated for the whole split)."""
    out = extract_features(backbone, dataset, batch_size=args.batch_size, device=device, num_workers=args.num_workers,
                           mask_size=args.train_mask_size, precision=args.precision, dtype=torch.bfloat16,
                           progress=progress)
    return out["features"], out["masks"]


def train_head(head, backbone, dataset, args, device, progress=None):
    """Train the probe head (SPEC 6.a/6.b) for args.epochs; returns the per-epoch mean training loss.

    Without --cache-features every epoch recomputes the backbone on freshly augmented images, as the original; the
    training split is streamed, never held. With it the tokens of the un-augmented resized images are computed once
    and kept in bfloat16 (no crop/flip augmentation then; see --cache-features). progress: a stream for progress
    lines (batches, epoch, loss, ETA), one kept per epoch.
    """
    criterion = nn.CrossEntropyLoss(ignore_index=255)
    optimizer = torch.optim.SGD(head.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.drop_at, gamma=0.1)
    generator = torch.Generator().manual_seed(args.seed)
    if args.cache_features:
        start = time.perf_counter()
        cached = cache_tokens(backbone, dataset, args, device, progress)
        print(f"cached {len(cached[0])} token maps ({cached[0].numel() * 2 / 2**30:.2f} GiB bfloat16) in "
              f"{time.perf_counter() - start:.1f} s")
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*cached), batch_size=args.batch_size,
                                             shuffle=True, generator=generator)
    else:
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                                             num_workers=args.num_workers, generator=generator,
                                             pin_memory=device.type == "cuda")
    head.train()
    losses = []
    with Progress("probe training", args.epochs * len(loader), "batches", progress) as meter:
        for epoch in range(args.epochs):
            total, steps = 0.0, 0
            for inputs, masks in loader:
                if args.cache_features:
                    tokens = inputs.to(device, non_blocking=True).float()
                else:
                    tokens = backbone_tokens(backbone, inputs.to(device, non_blocking=True), precision=args.precision)
                target = resize_labels(masks.to(device, non_blocking=True), args.train_mask_size).long()
                loss = criterion(probe_logits(head, tokens, args.train_mask_size), target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item()
                steps += 1
                meter.update(epoch * len(loader) + steps, f"epoch {epoch + 1}/{args.epochs}, loss {total / steps:.4f}, "
                             f"lr {optimizer.param_groups[0]['lr']:.2g}", record=steps == len(loader))
            losses.append(total / max(steps, 1))
            scheduler.step()
    head.eval()
    return losses


@torch.no_grad()
def evaluate_head(head, backbone, dataset, num_classes, args, device, keep_maps=0, progress=None):
    """mIoU of the head on a split (SPEC 6.a "final number"): tokens -> head at --head-eval-size -> logits
    upsampled to the mask size -> argmax; one confusion matrix over the split, no matching.

    Returns `match_and_score`'s dict; with keep_maps > 0 also "masks" and "predictions", (keep_maps, E, E) of the
    first images at the mask size E (for --save-maps). progress: a stream for progress lines (images, ETA).
    """
    head.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False,
                                         num_workers=args.num_workers, pin_memory=device.type == "cuda")
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    # Images per head call, so that the upsampled (chunk, D, S, S) input stays near 2^27 floats (512 MiB): the FCN
    # at 448x448 needs several such activations per image.
    chunk = max(1, HEAD_EVAL_ELEMENTS // (args.head_eval_size ** 2 * backbone.embed_dim))
    kept_masks, kept_predictions = [], []
    done = 0
    with Progress("probe evaluation", len(dataset), "images", progress) as meter:
        for images, masks in loader:
            tokens = backbone_tokens(backbone, images.to(device, non_blocking=True), precision=args.precision)
            masks = resize_labels(masks.to(device, non_blocking=True), args.mask_eval_size)
            for i in range(0, len(tokens), chunk):
                logits = probe_logits(head, tokens[i:i + chunk], args.head_eval_size)
                if logits.shape[-1] != args.mask_eval_size:
                    logits = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear", align_corners=False)
                predictions = logits.argmax(1)
                confusion += confusion_matrix(masks[i:i + chunk], predictions, num_classes, num_classes)
                if done + i < keep_maps:
                    kept_masks.append(masks[i:i + chunk].cpu())
                    kept_predictions.append(predictions.cpu())
            done += len(tokens)
            meter.update(done)
    scores = match_and_score(confusion, "none")
    if keep_maps:
        scores.update(masks=torch.cat(kept_masks)[:keep_maps], predictions=torch.cat(kept_predictions)[:keep_maps])
    return scores


def save_prediction_maps(folder, dataset, files, masks, predictions):
    """--save-maps: for image i a PNG image | ground truth | probe prediction (VOC colours), named after its file.
    Returns the paths written."""
    palette = voc_palette(256)
    paths = []
    for i, (mask, prediction) in enumerate(zip(masks, predictions)):
        paths.append(Path(folder) / f"{Path(str(files[i])).stem}.png")
        save_panel(paths[-1], dataset[i][0], [(mask, palette), (prediction, palette)])
    return paths


def get_args_parser():
    parser = argparse.ArgumentParser(
        prog="eval_linear.py",
        description="Linear (SPEC 6.a; paper 'LC') or FCN (SPEC 6.b; paper Table 6) probe on frozen spatial tokens: "
                    "train a head (or load one with --head), then score it on the full validation split.")
    add_backbone_and_data_args(parser)
    parser.add_argument("--head-type", default=None, choices=("linear", "fcn"),
                        help="1x1 conv (paper's LC, SPEC 6.a) or mmseg-style FCN (Table 6, SPEC 6.b); default "
                             "linear, or what the --head file holds")
    parser.add_argument("--head", default=None,
                        help="evaluate this trained or released head (with or without the 'finetune_head.' key "
                             "prefix, SPEC 9.3) instead of training one")
    parser.add_argument("--train-split", default=None,
                        help="training split (default: trainaug for voc as in SPEC 6.a, train otherwise; COCO's "
                             "train is the original's random 10%% of train2017)")
    parser.add_argument("--val-split", default="val", help="evaluation split; the final number uses all of it")
    parser.add_argument("--max-train-images", type=int, default=None, help="first N training images only (smoke)")
    parser.add_argument("--max-val-images", type=int, default=None, help="first N validation images only (smoke)")
    parser.add_argument("--epochs", type=int, default=None, help="default 25 (linear, SPEC 6.a) or 30 (FCN, 6.b)")
    parser.add_argument("--lr", type=float, default=None,
                        help="SGD learning rate; default 0.01 (DINO/Leopart ViT-S); the original uses 0.1 for MAE, "
                             "MoCo-v2 and ViT-B/8, 1 for MoCo-v3 (SPEC 6.a)")
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="SGD weight decay (SPEC 6.a)")
    parser.add_argument("--drop-at", type=int, default=20, help="StepLR step in epochs, gamma 0.1 (SPEC 6.a)")
    parser.add_argument("--train-mask-size", type=int, default=100,
                        help="training resolution of logits and masks (SPEC 6.a: 100)")
    parser.add_argument("--mask-eval-size", type=int, default=None,
                        help="masks are scored at this size (SPEC 6.a: 448, the input size by default)")
    parser.add_argument("--head-eval-size", type=int, default=None,
                        help="tokens are upsampled to this size before the head at evaluation (SPEC 6.a/6.b: "
                             "448, the mask size by default; 100 runs the FCN at its training resolution, SPEC 8.13)")
    parser.add_argument("--cache-features", action="store_true",
                        help="compute the training tokens once (bfloat16, CPU) instead of every epoch. Faster by "
                             "about the number of epochs, but trains on the un-augmented resized images: a departure "
                             "from SPEC 6.a's crop+flip augmentation, opt-in only")
    parser.add_argument("--cache-max-gb", type=float, default=32.0,
                        help="with --cache-features, recompute per epoch instead when the cache would exceed this")
    parser.add_argument("--seed", type=int, default=0, help="seed of head init, shuffling and augmentation")
    parser.add_argument("--output-dir", default="output/eval_linear",
                        help="where the trained head (<type>_head.pth, released layout) and results.json go")
    parser.add_argument("--save-maps", type=int, default=0, metavar="N",
                        help="write a PNG for each of the first N validation images: image | ground truth | the "
                             "probe's prediction (VOC palette); one file per image, named after it")
    parser.add_argument("--maps-dir", default=None, help="folder for --save-maps (default: maps/ in --output-dir)")
    return parser


def main(args):
    """Train (unless --head) and evaluate a probe head; returns the JSON-ready result dict."""
    device = resolve_device(args.device)
    progress = None if args.quiet else sys.stderr
    maps_dir = maps_folder(args.save_maps, args.maps_dir, args.output_dir)
    head_state = None
    if args.head:
        head_state, file_type = read_head_state(args.head)
        if args.head_type and args.head_type != file_type:
            raise ValueError(f"--head {args.head} holds a {file_type} head but --head-type is {args.head_type}")
        args.head_type = file_type
    args.head_type = args.head_type or "linear"
    defaults = HEAD_DEFAULTS[args.head_type]
    args.batch_size = args.batch_size or defaults["batch_size"]
    args.epochs = defaults["epochs"] if args.epochs is None else args.epochs
    args.lr = args.lr or defaults["lr"]
    args.mask_eval_size = args.mask_eval_size or args.input_size
    args.head_eval_size = args.head_eval_size or args.mask_eval_size

    backbone, description = build_frozen_backbone(args.pretrained, args.arch, args.patch_size, device,
                                                  args.init_seed)
    check_input_size(args.input_size, backbone.patch_size, "--input-size")
    val_set, num_classes, val_files = build_split(args, args.val_split, max_images=args.max_val_images)
    torch.manual_seed(args.seed)
    head = build_head(args.head_type, backbone.embed_dim, num_classes).to(device)
    losses, train_info = None, None
    if head_state is not None:
        load_head_strict(head, head_state, args.head)
    else:
        from data import JointTrainTransform
        train_split = args.train_split or ("trainaug" if args.dataset == "voc" else "train")
        transform = None if args.cache_features else JointTrainTransform(args.input_size)
        train_set, train_classes, _ = build_split(args, train_split, transform, args.max_train_images)
        if train_classes != num_classes:
            raise ValueError(f"training split has {train_classes} classes but validation split {num_classes}")
        if args.cache_features:
            grid = args.input_size // backbone.patch_size
            size_gb = len(train_set) * grid * grid * backbone.embed_dim * 2 / 1e9
            if size_gb > args.cache_max_gb:
                print(f"the token cache would need {size_gb:.1f} GB > --cache-max-gb {args.cache_max_gb}: "
                      "recomputing the backbone every epoch with augmentation instead")
                args.cache_features = False
                train_set, _, _ = build_split(args, train_split, JointTrainTransform(args.input_size),
                                              args.max_train_images)
        start = time.perf_counter()
        losses = train_head(head, backbone, train_set, args, device, progress)
        train_info = {"split": train_split, "num_images": len(train_set), "epochs": args.epochs,
                      "batch_size": args.batch_size, "lr": args.lr, "momentum": 0.9,
                      "weight_decay": args.weight_decay, "drop_at": args.drop_at,
                      "train_mask_size": args.train_mask_size, "seed": args.seed,
                      "augmentation": "none (cached tokens)" if args.cache_features else
                      "RandomResizedCrop(scale 0.8-1) + hflip", "seconds": time.perf_counter() - start}
        head_path = Path(args.output_dir) / f"{args.head_type}_head.pth"
        save_head(head, head_path)
        print(f"wrote {head_path}")
    start = time.perf_counter()
    scores = evaluate_head(head, backbone, val_set, num_classes, args, device, args.save_maps, progress)
    eval_s = time.perf_counter() - start
    if args.save_maps:
        paths = save_prediction_maps(maps_dir, val_set, val_files, scores.pop("masks"), scores.pop("predictions"))
        print(f"wrote {len(paths)} prediction maps to {maps_dir}")
    protocol = {"checkpoint": description, "head_type": args.head_type, "head": args.head, "dataset": args.dataset,
                "data_root": args.data_root, "val_split": args.val_split, "num_val_images": len(val_set),
                "num_classes": num_classes, "input_size": args.input_size, "mask_eval_size": args.mask_eval_size,
                "head_eval_size": args.head_eval_size, "precision": args.precision, "device": str(device),
                "eval_seconds": eval_s}
    print("protocol: " + ", ".join(f"{k} {v}" for k, v in protocol.items()))
    if train_info:
        print("training: " + ", ".join(f"{k} {v}" for k, v in train_info.items()))
    print("IoU per class: " + " ".join(f"{100 * v:.1f}" for v in scores["iou_per_class"].tolist()))
    print(f"mIoU ({args.head_type} probe, {args.val_split}, {len(val_set)} images): {100 * scores['miou']:.2f}")
    report = {"protocol": protocol, "train": train_info, "train_losses": losses, "miou": scores["miou"],
              "iou_per_class": scores["iou_per_class"].tolist(), "tp": scores["tp"].tolist(),
              "fp": scores["fp"].tolist(), "fn": scores["fn"].tolist(), "val_files": val_files}
    if args.output_dir:
        write_json(report, Path(args.output_dir) / "results.json")
        print(f"wrote {Path(args.output_dir) / 'results.json'}")
    return report


if __name__ == "__main__":
    arguments = get_args_parser().parse_args()
    try:
        main(arguments)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"eval_linear.py: error: {error_message(error)}")
