"""Leopart (Ziegler & Asano, CVPR 2022) in one file: ViT, projection head, prototypes, Sinkhorn, queue, crop
alignment, foreground mask, loss, teacher EMA and checkpoint loading.

Imports only torch, torchvision and the standard library, so it can be copied into another project.
Section numbers ("SPEC 4.2") refer to the spec of the original implementation; equation numbers to the paper.
"""
import math
import os
import pickle
import tempfile
from argparse import Namespace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import roi_align
from torchvision.transforms.functional import gaussian_blur


# ----------------------------------------------------------------------------------------------------------------
# Vision Transformer in the DINO / DINOv2 parameter layout (SPEC 2.1)
# ----------------------------------------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    """Non-overlapping P x P patches -> D-dim tokens: (B, 3, H, W) -> (B, H/P * W/P, D), row-major."""

    def __init__(self, patch_size, embed_dim):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention. The CLS query's attention row is materialised only when asked for, so the
    ordinary path runs fused `scaled_dot_product_attention`."""

    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, return_cls_attention=False):
        """x (B, T, D) -> (B, T, D) and, if asked, the CLS query's softmaxed attention over all keys (B, heads, T)."""
        B, T, D = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        cls_attention = None
        if return_cls_attention:
            cls_attention = ((q[:, :, 0:1].float() * self.scale) @ k.float().transpose(-2, -1)).softmax(-1)[:, :, 0]
        return self.proj(out.transpose(1, 2).reshape(B, T, D)), cls_attention


class Mlp(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """DINOv2's per-channel residual scaling (parameter name `gamma`)."""

    def __init__(self, dim, init_value):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x):
        return x * self.gamma


def drop_path(x, drop_prob, training):
    """Stochastic depth per sample: x / keep * floor(keep + U) (SPEC 2.1)."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = (keep + torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)).floor_()
    return x / keep * mask


class Block(nn.Module):
    """Pre-norm transformer block: x += DropPath(LS(attn(LN(x)))); x += DropPath(LS(mlp(LN(x))))."""

    def __init__(self, dim, num_heads, mlp_ratio, qkv_bias, drop_path_rate, layerscale_init):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.ls1 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.drop_path_rate = drop_path_rate

    def forward(self, x, return_cls_attention=False):
        y, cls_attention = self.attn(self.norm1(x), return_cls_attention)
        x = x + drop_path(self.ls1(y), self.drop_path_rate, self.training)
        x = x + drop_path(self.ls2(self.mlp(self.norm2(x))), self.drop_path_rate, self.training)
        return x, cls_attention


def interpolate_pos_encoding(pos_embed, grid_h, grid_w, offset=0.1):
    """Resize the (1, 1 + M*M, D) position table to a grid_h x grid_w token grid, exactly as DINO / DINOv2 do.

    Bicubic with `scale_factor=((grid + offset) / M)`, not `size=` (SPEC 2.1, 10.11: `size=` differs by up to 0.34
    at 28x28); offset 0 switches to `size=` (the convention of some exported DINOv2 graphs).
    """
    num_patches = pos_embed.shape[1] - 1
    M = int(math.sqrt(num_patches))
    if grid_h * grid_w == num_patches and grid_h == grid_w:
        return pos_embed
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:].float()
    patch_pos = patch_pos.reshape(1, M, M, -1).permute(0, 3, 1, 2)
    if offset:
        resize = dict(scale_factor=((grid_h + offset) / M, (grid_w + offset) / M))
    else:
        resize = dict(size=(grid_h, grid_w))
    patch_pos = F.interpolate(patch_pos, mode="bicubic", align_corners=False, **resize)
    if patch_pos.shape[-2:] != (grid_h, grid_w):
        raise RuntimeError(f"position-embedding interpolation gave {tuple(patch_pos.shape[-2:])}, "
                           f"expected {(grid_h, grid_w)}")
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1).to(pos_embed.dtype)
    return torch.cat([cls_pos, patch_pos], dim=1)


class VisionTransformer(nn.Module):
    """ViT with DINO's parameter names (SPEC 2.1); LayerScale, register tokens and `mask_token` for DINOv2.

    `model(x)`: x (B, 3, H, W) with H, W divisible by the patch size -> spatial tokens after the final norm,
    (B, N, D), N = (H/P) * (W/P) in row-major order. `model(x, return_attention=True)` -> (tokens, cls_attention)
    with cls_attention (B, heads, N): the last block's softmaxed CLS-query attention over the patch keys, from the
    same forward pass.
    """

    def __init__(self, img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0,
                 qkv_bias=True, drop_path_rate=0.0, layerscale_init=None, num_register_tokens=0,
                 interpolate_offset=0.1, mask_token=False):
        super().__init__()
        self.patch_size, self.embed_dim, self.num_heads = patch_size, embed_dim, num_heads
        self.interpolate_offset = interpolate_offset
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (img_size // patch_size) ** 2, embed_dim))
        self.register_tokens = (nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
                                if num_register_tokens else None)
        if mask_token:  # part of DINOv2's state dict (masked-image modelling), never used here: a buffer, not a
            self.register_buffer("mask_token", torch.zeros(1, embed_dim))  # parameter, so DDP and AdamW ignore it
        rates = torch.linspace(0, drop_path_rate, depth).tolist()  # linearly increasing stochastic depth
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias, r, layerscale_init)
                                    for r in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self._init_weights()

    def _init_weights(self):
        """trunc_normal(0.02) for tokens, position table, Linear and the patch Conv2d; LayerNorm 1/0 (SPEC 2.2)."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def num_register_tokens(self):
        return 0 if self.register_tokens is None else self.register_tokens.shape[1]

    def forward_features(self, x, return_attention=False):
        """x (B, 3, H, W) -> (cls (B, D), patch tokens (B, N, D), cls_attention (B, heads, N) or None)."""
        B, _, H, W = x.shape
        P = self.patch_size
        if H % P or W % P:
            raise ValueError(f"input size {H}x{W} is not divisible by the patch size {P}")
        tokens = torch.cat([self.cls_token.expand(B, -1, -1), self.patch_embed(x)], dim=1)
        tokens = tokens + interpolate_pos_encoding(self.pos_embed, H // P, W // P, self.interpolate_offset)
        if self.register_tokens is not None:  # registers carry no position embedding (DINOv2)
            tokens = torch.cat([tokens[:, :1], self.register_tokens.expand(B, -1, -1), tokens[:, 1:]], dim=1)
        for i, block in enumerate(self.blocks):
            tokens, cls_attention = block(tokens, return_attention and i == len(self.blocks) - 1)
        tokens = self.norm(tokens)
        first_patch = 1 + self.num_register_tokens
        if cls_attention is not None:
            cls_attention = cls_attention[:, :, first_patch:]
        return tokens[:, 0], tokens[:, first_patch:], cls_attention

    def forward(self, x, return_attention=False):
        _, patch_tokens, cls_attention = self.forward_features(x, return_attention)
        return (patch_tokens, cls_attention) if return_attention else patch_tokens


def vit_tiny(patch_size=16, **kw):
    return VisionTransformer(patch_size=patch_size, embed_dim=192, depth=12, num_heads=3, **kw)


def vit_small(patch_size=16, **kw):
    return VisionTransformer(patch_size=patch_size, embed_dim=384, depth=12, num_heads=6, **kw)


def vit_base(patch_size=16, **kw):
    return VisionTransformer(patch_size=patch_size, embed_dim=768, depth=12, num_heads=12, **kw)


def dinov2_vits14(num_register_tokens=0, **kw):
    """DINOv2 ViT-S/14 as on torch.hub: 518-px (37x37) position table, LayerScale, `mask_token`."""
    return VisionTransformer(img_size=518, patch_size=14, embed_dim=384, depth=12, num_heads=6, layerscale_init=1.0,
                             num_register_tokens=num_register_tokens, mask_token=True, **kw)


def dinov2_vitb14(num_register_tokens=0, **kw):
    return VisionTransformer(img_size=518, patch_size=14, embed_dim=768, depth=12, num_heads=12, layerscale_init=1.0,
                             num_register_tokens=num_register_tokens, mask_token=True, **kw)


ARCHS = {"vit_tiny": vit_tiny, "vit_small": vit_small, "vit_base": vit_base,
         "dinov2_vits14": dinov2_vits14, "dinov2_vitb14": dinov2_vitb14}


def build_vit(arch, patch_size=None, **kw):
    """`build_vit("vit_small", 16, drop_path_rate=0.1)`; DINOv2 archs have their fixed patch size 14."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(ARCHS)}")
    if arch.startswith("dinov2"):
        if patch_size not in (None, 14):
            raise ValueError(f"{arch} has patch size 14, not {patch_size}")
        return ARCHS[arch](**kw)
    return ARCHS[arch](patch_size=patch_size or 16, **kw)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints (SPEC 9)
# ----------------------------------------------------------------------------------------------------------------

HEAD_PREFIXES = ("projection_head.", "prototypes.", "head.")


def read_checkpoint(path_or_url):
    """Load a checkpoint file or URL (torch.hub cache) to CPU, with a clear error for a missing or damaged file.

    Loads with `weights_only=True`; DINO's full checkpoints also pickle their argparse Namespace, which is allowed.
    """
    path_or_url = str(path_or_url)
    if path_or_url.startswith(("http://", "https://")):
        return torch.hub.load_state_dict_from_url(path_or_url, map_location="cpu", weights_only=True)
    if not os.path.isfile(path_or_url):
        raise FileNotFoundError(f"checkpoint {path_or_url} does not exist")
    try:
        with torch.serialization.safe_globals([Namespace]):
            return torch.load(path_or_url, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError, OSError) as e:
        raise ValueError(f"cannot read checkpoint {path_or_url}: {type(e).__name__}: {str(e).splitlines()[0]}. "
                         "Expected a complete torch.save file (is it truncated, or not a checkpoint?)") from None


def backbone_state_dict(checkpoint):
    """Find the ViT backbone in any supported checkpoint -> (state dict with DINO key names, format name).

    Supported: a DINO/DINOv2 backbone `.pth`; a DINO full checkpoint (its `teacher`, SPEC 9.1); the released Leopart
    `.ckpt` and Lightning checkpoints (`model.*` = the student, used for evaluation, SPEC 8.6, 9.3); this project's
    training checkpoints (`student.backbone.*`) and exports; `module.` / `backbone.` prefixes.
    Projection heads and prototypes are dropped.
    """
    if not isinstance(checkpoint, dict):
        raise ValueError(f"expected a dict of tensors, got {type(checkpoint).__name__}")
    fmt = "state dict"
    if isinstance(checkpoint.get("state_dict"), dict):
        checkpoint, fmt = checkpoint["state_dict"], "Lightning checkpoint"
    elif isinstance(checkpoint.get("model"), dict):
        checkpoint, fmt = checkpoint["model"], "training checkpoint"
    elif isinstance(checkpoint.get("teacher"), dict):
        checkpoint, fmt = checkpoint["teacher"], "DINO full checkpoint (teacher)"
    tensors = {k: v for k, v in checkpoint.items() if torch.is_tensor(v)}
    prefixes = [k[:-len("cls_token")] for k in tensors if k.endswith("cls_token")]
    if not prefixes:
        sample = ", ".join(list(tensors)[:6]) or "no tensors"
        raise ValueError(f"no ViT backbone found in this {fmt}: no key ends in 'cls_token' (keys: {sample} ...)")
    if len(prefixes) > 1:  # e.g. Leopart's `teacher.` and `model.`: evaluate the student, as the original does
        preferred = [p for p in prefixes if p.startswith(("model.", "student."))]
        if len(preferred) != 1:
            raise ValueError(f"ambiguous {fmt}: backbones under the prefixes {prefixes}")
        prefixes = preferred
    prefix = prefixes[0]
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    state = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES)}
    if prefix == "model.":
        fmt = "Leopart checkpoint (model.*)" if fmt == "state dict" else f"{fmt} (model.*)"
    elif prefix == "student.backbone.":
        fmt = "Leopart training checkpoint (student)"
    elif prefix:
        fmt = f"{fmt} (prefix '{prefix}')"
    elif fmt == "state dict":
        fmt = "DINOv2 backbone" if "blocks.0.ls1.gamma" in state else "DINO backbone"
    return state, fmt


def vit_config_from_state_dict(state):
    """Infer VisionTransformer(**config) from a DINO-layout state dict (heads assume the standard 64-dim heads)."""
    embed_dim = state["cls_token"].shape[-1]
    patch_size = state["patch_embed.proj.weight"].shape[-1]
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    grid = math.isqrt(state["pos_embed"].shape[1] - 1)
    return dict(img_size=grid * patch_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                num_heads=max(1, embed_dim // 64),
                mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
                qkv_bias="blocks.0.attn.qkv.bias" in state,
                layerscale_init=1.0 if "blocks.0.ls1.gamma" in state else None,
                num_register_tokens=state["register_tokens"].shape[1] if "register_tokens" in state else 0,
                mask_token="mask_token" in state)


def describe_vit(config):
    return (f"ViT with embed_dim {config['embed_dim']}, depth {config['depth']}, patch {config['patch_size']}, "
            f"{config['img_size']}-px position table")


def load_state_strict(model, state, what):
    """`load_state_dict(strict=True)` that names every missing, unexpected and mis-shaped key in its error."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        def show(keys):
            return ", ".join(keys[:6]) + (f" ... ({len(keys)} in all)" if len(keys) > 6 else "")
        problems = [f"{name}: {show(keys)}" for name, keys in
                    (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
                    if keys]
        raise ValueError(f"cannot load {what}: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def load_pretrained(model, path_or_url):
    """Load a checkpoint's ViT backbone into `model` strictly (SPEC 9); returns the detected format name."""
    state, fmt = backbone_state_dict(read_checkpoint(path_or_url))
    what = f"{path_or_url} ({fmt})"
    if "cls_token" in state and "patch_embed.proj.weight" in state and "pos_embed" in state:
        what += f", a {describe_vit(vit_config_from_state_dict(state))}"
    load_state_strict(model, state, what)
    return fmt


def load_backbone(path_or_url, arch=None, patch_size=None, **kw):
    """Build the ViT a checkpoint holds and load it. With `arch=None` the architecture is read off the tensor
    shapes; with an explicit `arch` a checkpoint of another shape is an error."""
    state, fmt = backbone_state_dict(read_checkpoint(path_or_url))
    try:
        config = vit_config_from_state_dict(state)
    except KeyError as e:
        raise ValueError(f"{path_or_url} ({fmt}) is not a complete ViT backbone: no key {e}") from None
    model = build_vit(arch, patch_size, **kw) if arch else VisionTransformer(**config, **kw)
    load_state_strict(model, state, f"{path_or_url} ({fmt}), a {describe_vit(config)}")
    return model


def atomic_save(obj, path):
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves a half-written file."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pth")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def export_backbone(model, path):
    """Write a plain DINO-layout backbone state dict (of the student, for a Leopart module)."""
    backbone = model.student.backbone if isinstance(model, Leopart) else model
    atomic_save({k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}, path)
