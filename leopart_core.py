"""Leopart (Ziegler & Asano, CVPR 2022) in one file: ViT, projection head, prototypes, Sinkhorn, queue, crop
alignment, foreground mask, loss, teacher EMA and checkpoint loading.

Imports only torch, torchvision and the standard library, so it can be copied into another project.
Section numbers ("SPEC 4.2") refer to the spec of the original implementation; equation numbers to the paper.
"""
import json
import math
import os
import pickle
import struct
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
        """x (B, T, D) -> (B, T, D) and, if asked, the CLS query's softmaxed attention over all keys (B, heads, T).

        The CLS row is computed in float32 with autocast off, from q and k as the qkv projection gave them: under a
        caller's bf16 autocast the matmul would otherwise round its logits to bf16, and the foreground mask
        (SPEC 4.3) thresholds the attention's cumulative mass.
        """
        B, T, D = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        cls_attention = None
        if return_cls_attention:
            with torch.autocast(x.device.type, enabled=False):
                logits = (q[:, :, 0:1].float() * self.scale) @ k.float().transpose(-2, -1)
                cls_attention = logits.softmax(-1)[:, :, 0]
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
    """Stochastic depth per sample: x / keep * floor(keep + U) (SPEC 2.1).

    U is drawn in float32 whatever x's dtype: on bf16's grid (spacing 2^-8 below 1) keep + U rounds, and a small
    drop rate such as the second block's 0.009 would come out as 2/256 = 0.0078.
    """
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    uniform = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=torch.float32, device=x.device)
    return x / keep * (keep + uniform).floor_().to(x.dtype)


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


def interpolate_pos_encoding(pos_embed, grid_h, grid_w, offset=0.1, antialias=False):
    """Resize the (1, 1 + M*M, D) position table to a grid_h x grid_w token grid, exactly as DINO / DINOv2 do.

    Bicubic with `scale_factor=((grid + offset) / M)`, not `size=` (SPEC 2.1, 10.11: `size=` differs by up to 0.34
    at 28x28); offset 0 switches to `size=` (the convention of some exported DINOv2 graphs and of the register
    models, which also antialias).
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
    patch_pos = F.interpolate(patch_pos, mode="bicubic", align_corners=False, antialias=antialias, **resize)
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
                 interpolate_offset=0.1, interpolate_antialias=False, mask_token=False):
        super().__init__()
        self.patch_size, self.embed_dim, self.num_heads = patch_size, embed_dim, num_heads
        self.interpolate_offset, self.interpolate_antialias = interpolate_offset, interpolate_antialias
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
        tokens = tokens + interpolate_pos_encoding(self.pos_embed, H // P, W // P, self.interpolate_offset,
                                                   self.interpolate_antialias)
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
    return VisionTransformer(**{"patch_size": patch_size, "embed_dim": 192, "depth": 12, "num_heads": 3, **kw})


def vit_small(patch_size=16, **kw):
    return VisionTransformer(**{"patch_size": patch_size, "embed_dim": 384, "depth": 12, "num_heads": 6, **kw})


def vit_base(patch_size=16, **kw):
    return VisionTransformer(**{"patch_size": patch_size, "embed_dim": 768, "depth": 12, "num_heads": 12, **kw})


def dinov2_vits14(**kw):
    """DINOv2 ViT-S/14 as on torch.hub: 518-px (37x37) position table, LayerScale, `mask_token` (registers:
    dinov2_vits14_reg)."""
    return VisionTransformer(**{"img_size": 518, "patch_size": 14, "embed_dim": 384, "depth": 12, "num_heads": 6,
                                "layerscale_init": 1.0, "mask_token": True, **kw})


def dinov2_vitb14(**kw):
    return VisionTransformer(**{"img_size": 518, "patch_size": 14, "embed_dim": 768, "depth": 12, "num_heads": 12,
                                "layerscale_init": 1.0, "mask_token": True, **kw})


# torch.hub's register models (dinov2/hub/backbones.py) resize the 518-px position table by size, antialiased
REGISTER_POS_RESIZE = dict(interpolate_offset=0.0, interpolate_antialias=True)


def dinov2_vits14_reg(**kw):
    """DINOv2 ViT-S/14 with 4 register tokens, as torch.hub's dinov2_vits14_reg."""
    return dinov2_vits14(**{"num_register_tokens": 4, **REGISTER_POS_RESIZE, **kw})


def dinov2_vitb14_reg(**kw):
    """DINOv2 ViT-B/14 with 4 register tokens, as torch.hub's dinov2_vitb14_reg."""
    return dinov2_vitb14(**{"num_register_tokens": 4, **REGISTER_POS_RESIZE, **kw})


ARCHS = {"vit_tiny": vit_tiny, "vit_small": vit_small, "vit_base": vit_base,
         "dinov2_vits14": dinov2_vits14, "dinov2_vitb14": dinov2_vitb14,
         "dinov2_vits14_reg": dinov2_vits14_reg, "dinov2_vitb14_reg": dinov2_vitb14_reg}


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
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what a Hugging Face hub snapshot folder holds
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """Read a .safetensors file -> {name: CPU tensor}, without the safetensors package.

    The documented format: an 8-byte little-endian header length N; N bytes of JSON mapping each name to its dtype,
    shape and data_offsets [begin, end) into the data region that follows (plus an optional `__metadata__`); then
    the raw little-endian tensor bytes, which tile the data region without gaps or overlaps. A file that breaks any
    of this (truncated, damaged, an unknown dtype) is a ValueError naming the file.
    """
    path = str(path)

    def damaged(why):
        return ValueError(f"cannot read safetensors file {path}: {why}. Expected a complete .safetensors file "
                          "(is it truncated or damaged?)")

    file_size = os.path.getsize(path)
    if file_size < 8:
        raise damaged(f"{file_size} bytes, fewer than the 8-byte header length")
    with open(path, "rb") as f:
        (header_size,) = struct.unpack("<Q", f.read(8))
        data_size = file_size - 8 - header_size
        if data_size < 0:
            raise damaged(f"the header length is {header_size} bytes, but the file has only {file_size}")
        try:
            header = json.loads(f.read(header_size))
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
            raise damaged(f"the header is not JSON ({e})") from None
        if not isinstance(header, dict):
            raise damaged("the header is not a JSON object")
        header.pop("__metadata__", None)
        entries = []
        for name, entry in header.items():
            try:
                dtype = SAFETENSORS_DTYPES[entry["dtype"]]
                shape = [int(n) for n in entry["shape"]]
                begin, end = (int(o) for o in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise damaged(f"tensor {name!r} has the header entry {entry!r}; expected a dtype of "
                              f"{'/'.join(SAFETENSORS_DTYPES)}, a shape and two data_offsets") from None
            if min(shape, default=0) < 0 or end - begin != math.prod(shape) * dtype.itemsize:
                raise damaged(f"tensor {name!r} spans data bytes {begin}..{end}, but {entry['dtype']} "
                              f"{shape} needs {math.prod(shape) * dtype.itemsize} bytes")
            entries.append((begin, end, name, dtype, shape))
        entries.sort(key=lambda e: e[:2])
        position = 0
        for begin, end, name, _, _ in entries:
            if begin != position:
                raise damaged(f"tensor {name!r} starts at data byte {begin}, not at {position}: the tensors must "
                              "tile the data region without gaps or overlaps")
            position = end
        if position != data_size:
            raise damaged(f"the tensors fill {position} data bytes, but the file holds {data_size}")
        tensors = {}
        for begin, end, name, dtype, shape in entries:  # in file order: one sequential read, no second copy
            buffer = bytearray(end - begin)
            if f.readinto(buffer) != len(buffer):
                raise damaged(f"the file ended inside tensor {name!r}")
            tensors[name] = (torch.frombuffer(buffer, dtype=dtype).reshape(shape) if buffer
                             else torch.empty(shape, dtype=dtype))
    return tensors


def read_checkpoint(path_or_url):
    """Load a checkpoint to CPU, with a clear error for a missing or damaged file: a torch.save file or URL (torch.hub
    cache), a .safetensors file, or a Hugging Face hub snapshot folder (its model.safetensors or pytorch_model.bin).

    torch.save files load with `weights_only=True`; DINO's full checkpoints also pickle their argparse Namespace,
    which is allowed.
    """
    path_or_url = str(path_or_url)
    if path_or_url.startswith(("http://", "https://")):
        if path_or_url.endswith(".safetensors"):
            raise ValueError(f"{path_or_url}: .safetensors URLs are not read; download the hub snapshot "
                             "(e.g. `huggingface-cli download <model>`) and pass its folder")
        return torch.hub.load_state_dict_from_url(path_or_url, map_location="cpu", weights_only=True)
    if os.path.isdir(path_or_url):
        found = [os.path.join(path_or_url, n) for n in HUB_WEIGHT_FILES
                 if os.path.isfile(os.path.join(path_or_url, n))]
        if not found:
            held = ", ".join(sorted(os.listdir(path_or_url))[:8]) or "nothing"
            raise FileNotFoundError(f"folder {path_or_url} holds no {' or '.join(HUB_WEIGHT_FILES)}, as a Hugging "
                                    f"Face hub snapshot does (it holds: {held})")
        path_or_url = found[0]
    if not os.path.isfile(path_or_url):
        raise FileNotFoundError(f"checkpoint {path_or_url} does not exist")
    if path_or_url.endswith(".safetensors"):
        return read_safetensors(path_or_url)
    try:
        with torch.serialization.safe_globals([Namespace]):
            return torch.load(path_or_url, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError, OSError) as e:
        raise ValueError(f"cannot read checkpoint {path_or_url}: {type(e).__name__}: {str(e).splitlines()[0]}. "
                         "Expected a complete torch.save file (is it truncated, or not a checkpoint?)") from None


def read_hub_config(path):
    """The transformers config.json of a hub snapshot folder, or beside a model.safetensors / pytorch_model.bin in
    one -> dict, or None when there is none (timm's snapshots have a config.json without `model_type`: None)."""
    path = str(path)
    folder = path if os.path.isdir(path) else os.path.dirname(path) if os.path.basename(path) in HUB_WEIGHT_FILES \
        else None
    config_path = os.path.join(folder or "", "config.json")
    if folder is None or not os.path.isfile(config_path):
        return None
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (ValueError, OSError) as e:
        raise ValueError(f"cannot read {config_path}: {e}") from None
    return config if isinstance(config, dict) and "model_type" in config else None


def check_hub_config(config, state, source):
    """Check a transformers config.json against the backbone tensors (DINO names) -> its num_attention_heads, which
    the tensors cannot show. The tensors decide the architecture: any field that contradicts them is a ValueError.

    layer_norm_eps is not compared: transformers' DINO conversion (convert_dino_to_pytorch.py) keeps ViTConfig's
    default 1e-12, while DINO was trained with 1e-6, which this ViT uses (SPEC 2.1).
    """
    vit = vit_config_from_state_dict(state)
    D = vit["embed_dim"]
    model_type = ("vit" if vit["layerscale_init"] is None else
                  "dinov2_with_registers" if vit["num_register_tokens"] else "dinov2")
    expected = {"model_type": model_type, "hidden_size": D, "num_hidden_layers": vit["depth"],
                "patch_size": vit["patch_size"], "image_size": vit["img_size"], "qkv_bias": vit["qkv_bias"],
                "num_register_tokens": vit["num_register_tokens"], "mlp_ratio": vit["mlp_ratio"],
                "intermediate_size": round(D * vit["mlp_ratio"]), "hidden_act": "gelu", "use_swiglu_ffn": False}
    wrong = [f"{k} {config[k]!r} (tensors: {v!r})" for k, v in expected.items() if k in config and config[k] != v]
    num_heads = config.get("num_attention_heads")
    if num_heads is not None and (not isinstance(num_heads, int) or num_heads < 1 or D % num_heads):
        wrong.append(f"num_attention_heads {num_heads!r} (must divide the embed_dim {D})")
    if wrong:
        raise ValueError(f"{source}: its config.json does not fit its tensors, a {describe_vit(vit)}: "
                         + "; ".join(wrong))
    return num_heads


# Hugging Face transformers names -> DINO names: the inverse of the rename tables of transformers'
# convert_dinov2_to_hf.py, convert_dinov2_with_registers_to_hf.py and vit/convert_dino_to_pytorch.py.
HF_ANCHOR = "embeddings.patch_embeddings.projection.weight"
HF_NAMES = {"embeddings.cls_token": "cls_token", "embeddings.mask_token": "mask_token",
            "embeddings.register_tokens": "register_tokens", "embeddings.position_embeddings": "pos_embed",
            "embeddings.patch_embeddings.projection.": "patch_embed.proj.", "layernorm.": "norm."}
HF_BLOCK_NAMES = {  # inside encoder.layer.N; attention.attention.{query,key,value} are fused into attn.qkv
    "Dinov2Model": {"norm1.": "norm1.", "norm2.": "norm2.", "mlp.fc1.": "mlp.fc1.", "mlp.fc2.": "mlp.fc2.",
                    "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
                    "attention.output.dense.": "attn.proj."},
    "ViTModel": {"layernorm_before.": "norm1.", "layernorm_after.": "norm2.", "intermediate.dense.": "mlp.fc1.",
                 "output.dense.": "mlp.fc2.", "attention.output.dense.": "attn.proj."}}
HF_NOT_BACKBONE = ("pooler.", "classifier.")  # ViTModel's pooler; the *ForImageClassification heads


def rename_by_table(name, table):
    """`name` with its table entry replaced ('a.' entries match every a.* name, others whole names), or None."""
    for old, new in table.items():
        if name == old or (old.endswith(".") and name.startswith(old)):
            return new + name[len(old):]
    return None


def hf_to_dino_names(tensors):
    """A Hugging Face Dinov2Model, Dinov2WithRegistersModel or ViTModel state dict, under any prefix (`dinov2.`,
    `vit.` of the classification models) -> (state dict with DINO names, format name); (tensors, None) when it
    holds no such model.

    query, key and value (D, D) are concatenated in that order into DINO's fused qkv (3D, D), as the conversions
    split it. Names no table knows keep their original spelling, so the strict load reports them as unexpected.
    """
    prefixes = [k[:-len(HF_ANCHOR)] for k in tensors if k.endswith(HF_ANCHOR)]
    if not prefixes:
        return tensors, None
    if len(prefixes) > 1:
        raise ValueError(f"ambiguous Hugging Face checkpoint: models under the prefixes {prefixes}")
    prefix = prefixes[0]
    arch = "ViTModel" if any(".layernorm_before." in k for k in tensors) else "Dinov2Model"
    state, qkv = {}, {}
    for key, value in tensors.items():
        inside = key.startswith(prefix)
        name = key[len(prefix):] if inside else key
        if name.startswith(HF_NOT_BACKBONE):
            continue
        new = None
        if inside and name.startswith("encoder.layer."):
            block, _, name = name[len("encoder.layer."):].partition(".")
            if name.startswith("attention.attention."):
                part, _, param = name[len("attention.attention."):].partition(".")
                qkv.setdefault((block, param), {})[part] = (key, value)
                continue
            new = rename_by_table(name, HF_BLOCK_NAMES[arch])
            new = new and f"blocks.{block}.{new}"
        elif inside:
            new = rename_by_table(name, HF_NAMES)
        state[new or key] = value
    for (block, param), parts in qkv.items():
        if sorted(parts) == ["key", "query", "value"] and len({v.shape for _, v in parts.values()}) == 1:
            state[f"blocks.{block}.attn.qkv.{param}"] = torch.cat([parts[p][1] for p in ("query", "key", "value")])
        else:  # incomplete or unknown: left under their own names for the strict load to report
            state.update(parts.values())
    if "register_tokens" in state:
        arch = "Dinov2WithRegistersModel"
    return state, f"Hugging Face {arch}" + (f" (prefix '{prefix}')" if prefix else "")


def timm_to_dino_names(state):
    """A DINO-named backbone in timm's layout -> (state dict in DINO's layout, list of the differences found).

    timm keeps DINO's names except (timm vision_transformer.py: _convert_dinov2 and the *_reg4_dinov2 models):
    registers are `reg_token`; register models have no CLS position in pos_embed (`no_embed_class`), their cls_token
    holding cls_token + CLS position, so the CLS position is taken as zeros, which computes the same tokens; and
    DINOv2's mask_token, which timm drops and this ViT never uses, comes back as zeros.
    """
    state, changes = dict(state), []
    if "reg_token" in state:
        state["register_tokens"] = state.pop("reg_token")
        changes.append("reg_token")
    pos_embed = state.get("pos_embed")
    if pos_embed is not None and pos_embed.dim() == 3 and math.isqrt(pos_embed.shape[1]) ** 2 == pos_embed.shape[1]:
        state["pos_embed"] = torch.cat([pos_embed.new_zeros(pos_embed.shape[0], 1, pos_embed.shape[2]), pos_embed], 1)
        changes.append("pos_embed without the CLS position")
    if "blocks.0.ls1.gamma" in state and "mask_token" not in state and "cls_token" in state:
        state["mask_token"] = state["cls_token"].new_zeros(1, state["cls_token"].shape[-1])
        changes.append("no mask_token")
    return state, changes


def backbone_state_dict(checkpoint):
    """Find the ViT backbone in any supported checkpoint -> (state dict with DINO key names, format name).

    Supported: a DINO/DINOv2 backbone `.pth`; a DINO full checkpoint (its `teacher`, SPEC 9.1); the released Leopart
    `.ckpt` and Lightning checkpoints (`model.*` = the student, used for evaluation, SPEC 8.6, 9.3); this project's
    training checkpoints (`student.backbone.*`) and exports; `module.` / `backbone.` prefixes; Hugging Face
    Dinov2Model / Dinov2WithRegistersModel / ViTModel names; timm's DINO and DINOv2 layouts.
    Projection heads, prototypes and classifiers are dropped.
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
    tensors, hf_format = hf_to_dino_names({k: v for k, v in checkpoint.items() if torch.is_tensor(v)})
    fmt = hf_format or fmt
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
    state, timm_changes = timm_to_dino_names({k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES)})
    if prefix == "model.":
        fmt = "Leopart checkpoint (model.*)" if fmt == "state dict" else f"{fmt} (model.*)"
    elif prefix == "student.backbone.":
        fmt = "Leopart training checkpoint (student)"
    elif prefix:
        fmt = f"{fmt} (prefix '{prefix}')"
    elif fmt == "state dict":
        fmt = "DINOv2 backbone" if "blocks.0.ls1.gamma" in state else "DINO backbone"
    if timm_changes:
        fmt += f" in timm layout ({', '.join(timm_changes)})"
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


def read_backbone(path_or_url):
    """Any supported checkpoint file, URL or hub folder -> (backbone state dict with DINO names, format name,
    num_heads from a transformers config.json checked against the tensors, or None)."""
    state, fmt = backbone_state_dict(read_checkpoint(path_or_url))
    config = read_hub_config(path_or_url)
    if config is None:
        return state, fmt, None
    try:
        num_heads = check_hub_config(config, state, path_or_url)
    except KeyError:  # an incomplete backbone: the strict load names what is missing
        num_heads = None
    return state, f"{fmt} with config.json", num_heads


def load_state_strict(model, state, what, num_heads=None):
    """`load_state_dict(strict=True)` that names every missing, unexpected and mis-shaped key in its error; with
    `num_heads` (from a config.json: the tensors cannot show it) the model's head count must match too."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state and state[k].shape != own[k].shape]
    if num_heads is not None and num_heads != model.num_heads:
        mismatched.append(f"attention heads: config.json {num_heads} vs model {model.num_heads}")
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
    state, fmt, num_heads = read_backbone(path_or_url)
    what = f"{path_or_url} ({fmt})"
    try:
        what += f", a {describe_vit(vit_config_from_state_dict(state))}, into a " \
                f"{describe_vit(vit_config_from_state_dict(model.state_dict()))}"
    except KeyError:  # an incomplete backbone: the key lists below say what is missing
        pass
    load_state_strict(model, state, what, num_heads)
    return fmt


def load_backbone(path_or_url, arch=None, patch_size=None, **kw):
    """Build the ViT a checkpoint holds and load it. With `arch=None` the architecture is read off the tensor
    shapes (and the head count off a hub config.json); a backbone with registers is built as torch.hub's
    dinov2_*_reg are (position table resized by size, antialiased). With an explicit `arch` a checkpoint of another
    shape is an error."""
    state, fmt, num_heads = read_backbone(path_or_url)
    try:
        config = vit_config_from_state_dict(state)
    except KeyError as e:
        raise ValueError(f"{path_or_url} ({fmt}) is not a complete ViT backbone: no key {e}") from None
    config["num_heads"] = num_heads or config["num_heads"]
    if config["num_register_tokens"]:
        config.update(REGISTER_POS_RESIZE)
    model = build_vit(arch, patch_size, **kw) if arch else VisionTransformer(**{**config, **kw})
    load_state_strict(model, state, f"{path_or_url} ({fmt}), a {describe_vit(config)}", num_heads)
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


# ----------------------------------------------------------------------------------------------------------------
# Sinkhorn-Knopp (SPEC 3.1, 3.2)
# ----------------------------------------------------------------------------------------------------------------

def _distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def sinkhorn(scores, epsilon=0.05, iterations=3):
    """Optimal soft assignments Q of M spatial tokens to K prototypes (Sec. 3.1; SwAV's Sinkhorn-Knopp [5, 14], as
    Leopart runs it).

    scores (M, K) similarities -> (M, K) float32 assignments whose rows sum to 1; or (G, M, K) -> (G, M, K): G
    independent problems (Leopart's global crops, each with its own queue, SPEC 3.1) solved in one pass. Per
    problem, Q = exp(scores / eps) is scaled to total mass 1, then `iterations` times each prototype's mass is set
    to 1/K and each token's to 1/M; finally rows are renormalised to 1 (SPEC 3.1). The loop ends on a token step,
    so prototype marginals are only approximate, as in the original. Each prototype's maximum score is subtracted
    before exp: a per-prototype factor on Q that the first prototype step divides out exactly, so the result is the
    original's without its overflow for |scores| / eps > 88 (a token row could still underflow if its scores
    spanned more than 87 eps, which cosine scores cannot). Always float32, whatever the input dtype or a caller's
    autocast.

    Under torch.distributed every rank holds some tokens of each problem and gets the rows it would get from one
    process holding all ranks' rows (SPEC 3.2): the maxima, the total mass with the token count, and each
    iteration's prototype masses are all-reduced, one collective each for all G problems (2 + iterations calls).
    """
    if scores.dim() not in (2, 3):
        raise ValueError(f"sinkhorn expects scores (M, K) or (G, M, K), got shape {tuple(scores.shape)}")
    distributed = _distributed()
    with torch.autocast(scores.device.type, enabled=False):
        logits = scores.float().reshape(-1, *scores.shape[-2:]) / epsilon  # (G, M, K)
        G, M, K = logits.shape
        peak = logits.amax(dim=1, keepdim=True)
        if distributed:
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        Q = torch.exp(logits - peak)
        mass_and_tokens = torch.stack([Q.sum(dim=(1, 2)), torch.full_like(Q[:, 0, 0], M)])  # (2, G)
        if distributed:
            dist.all_reduce(mass_and_tokens)
        total, num_tokens = mass_and_tokens[:, :, None, None]
        Q /= total
        tiny = torch.finfo(Q.dtype).tiny  # an all-zero row or column stays zero instead of becoming NaN
        for _ in range(iterations):
            prototype_mass = Q.sum(dim=1, keepdim=True)
            if distributed:
                dist.all_reduce(prototype_mass)
            Q *= (1.0 / K) / prototype_mass.clamp_min(tiny)
            Q *= (1.0 / num_tokens) / Q.sum(dim=2, keepdim=True).clamp_min(tiny)
        Q /= Q.sum(dim=2, keepdim=True).clamp_min(tiny)
    return Q.view(scores.shape)


# ----------------------------------------------------------------------------------------------------------------
# Foreground mask from the CLS attention (SPEC 4.3; paper Sec. 3.1 "Foreground-focused clustering")
# ----------------------------------------------------------------------------------------------------------------

FOREGROUND_MIN_GRID = 4  # the mask's 7x7 blur pads 3 tokens by reflection, which needs 4 tokens a side


def check_input_size(size, patch_size, flag, min_grid=1, needed_for="the ViT"):
    """Fail early, naming the flag, when a size x size input is not a whole token grid of at least min_grid tokens a
    side (e.g. the foreground mask needs FOREGROUND_MIN_GRID), instead of deep inside a forward pass."""
    grid = size // patch_size
    if size % patch_size or grid < min_grid:
        raise ValueError(f"{flag} {size} gives a {size / patch_size:g}x{size / patch_size:g} token grid with patch "
                         f"size {patch_size}; {needed_for} needs a whole grid of at least {min_grid}x{min_grid} "
                         f"tokens: use a multiple of {patch_size} of at least {min_grid * patch_size}")


@torch.no_grad()
def foreground_mask(cls_attention, grid, mass=0.6, blur_sigma=0.6):
    """Binary foreground A_b from the CLS attention: cls_attention (B, heads, h*w), grid (h, w) -> (B, 1, h, w) 0/1.

    Mean over heads; 7x7 Gaussian blur (sigma 0.6, reflect padding); keep the highest tokens holding `mass` of the
    attention (sorted ascending, normalised cumsum > 1 - mass, strictly; DINO's visualisation rule); then drop
    8-connected components of at most 2 pixels, a step of the original that the paper does not mention (SPEC 4.3).

    Autocast is off, and the blur (torchvision builds its kernel with a matmul and applies it as a convolution) runs
    in float64, where neither bf16 autocast nor TF32 (cuDNN's default for float32 convolutions on recent GPUs)
    applies; rounded back to float32 it is within an ulp of the original's float32 blur.
    """
    B, heads, N = cls_attention.shape
    h, w = grid
    if h * w != N:
        raise ValueError(f"attention over {N} tokens does not fit the grid {h}x{w}")
    if min(h, w) < FOREGROUND_MIN_GRID:
        raise ValueError(f"the foreground mask needs a token grid of at least {FOREGROUND_MIN_GRID}x"
                         f"{FOREGROUND_MIN_GRID}, got {h}x{w}: use larger crops or a smaller patch size")
    with torch.autocast(cls_attention.device.type, enabled=False):
        attention = cls_attention.float()
        merged = sum(attention[:, i] / heads for i in range(heads))  # the original's head mean, in this order
        blurred = gaussian_blur(merged.reshape(B, 1, h, w).double(), kernel_size=[7, 7],
                                sigma=[blur_sigma, blur_sigma]).float()
        values, order = blurred.flatten(1).sort(dim=1)
        values = values / values.sum(dim=1, keepdim=True)
        keep_sorted = (values.cumsum(dim=1) > 1 - mass).float()
        fg = torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted).reshape(B, 1, h, w)
        return drop_tiny_components(fg)


def drop_tiny_components(mask):
    """Zero the 8-connected components of at most 2 pixels in a 0/1 mask (B, 1, h, w).

    A pixel lies in such a component iff it has no 8-neighbour, or exactly one neighbour that itself has exactly
    one: exact, and needs no iterative labelling.
    """
    ring = torch.ones(1, 1, 3, 3, device=mask.device, dtype=mask.dtype)
    ring[0, 0, 1, 1] = 0
    neighbours = F.conv2d(mask, ring, padding=1) * mask
    single = mask * (neighbours == 1)
    paired = single * (F.conv2d(single, ring, padding=1) == 1)
    return mask - mask * (neighbours == 0) - paired


# ----------------------------------------------------------------------------------------------------------------
# The Leopart loss, Eq. (1)-(2), with RoI-Align as the alignment operator alpha (SPEC 4.2, 4.3)
# ----------------------------------------------------------------------------------------------------------------

def align(maps, boxes, patch_size, roi_size):
    """alpha_B: RoI-Align each map over its boxes. maps (B, C, h, w); boxes (B, n, 4) as (x1, y1, x2, y2) in pixels
    of the crop's resized frame -> (B, n, C, roi, roi). `aligned=True`: token i covers [i, i+1) in token units."""
    B, n = boxes.shape[:2]
    index = torch.arange(B, device=maps.device, dtype=maps.dtype).repeat_interleave(n)[:, None]
    rois = torch.cat([index, boxes.reshape(-1, 4).to(maps.dtype) / patch_size], dim=1)
    out = roi_align(maps, rois, output_size=roi_size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    return out.view(B, n, *out.shape[1:])


def leopart_loss(student_scores, target_assignments, boxes_gc, boxes_all, fg_masks=None, temperature=0.1,
                 patch_size=16, roi_size=7):
    """The swapped dense prediction loss, Eq. (1)-(2), as the original computes it (SPEC 4.2-4.3).

    student_scores: V tensors (B, K, h_v, w_v), the student's prototype scores Z^T C, global crops first.
    target_assignments: G tensors (B, K, H, W), Sinkhorn assignments Q of the teacher's global crops.
    boxes_gc (B, G, V, 4): intersection of global crop g with crop v in g's resized frame (pixels); boxes_all
    (B, V, G, 4): the same intersection in v's frame (SPEC 1.4). fg_masks: G 0/1 masks (B, 1, H, W) or None.

    For every target crop g and predicting crop v != g: l(v, g) = H[softmax(alpha(Z_v^T C) / tau), alpha(Q_g)],
    the cross-entropy per aligned cell, averaged over cells (weighted by the aligned mask of g, which keeps only
    cells that are entirely foreground: RoI-Align value >= 1.0). The total is the mean over the G (V - 1) pairs:
    the original averages where Eq. (1) sums, and a pair whose aligned mask is empty adds 0 but still counts.
    Logits are aligned before the softmax. Computed in float32 with autocast off; the (g, g) pairs are computed and
    weighted 0, so the loss has a fixed shape and needs no host sync.
    """
    G, V = len(target_assignments), len(student_scores)
    with torch.autocast(student_scores[0].device.type, enabled=False):
        # targets[b, g, v]: Q_g aligned to its intersection with crop v; predictions[b, v, g]: crop v's logits there
        targets = torch.stack([align(q.float(), boxes_gc[:, g], patch_size, roi_size)
                               for g, q in enumerate(target_assignments)], dim=1)
        predictions = torch.stack([align(s.float(), boxes_all[:, v], patch_size, roi_size)
                                   for v, s in enumerate(student_scores)], dim=1)
        log_p = F.log_softmax(predictions / temperature, dim=3)  # s_tau(alpha_{B_j,i}(Z_i^T C)), Eq. (2)
        cross_entropy = -(targets.transpose(1, 2) * log_p).sum(dim=3)  # H[., alpha_{B_i,j}(Q_j)] per cell, Eq. (2)
        if fg_masks is None:
            weights = torch.ones_like(cross_entropy)
        else:
            aligned_masks = torch.stack([align(m.float(), boxes_gc[:, g], patch_size, roi_size)[:, :, 0]
                                         for g, m in enumerate(fg_masks)], dim=1)  # (B, G, V, roi, roi)
            weights = (aligned_masks >= 1.0).float().transpose(1, 2)
        cell_sum = (cross_entropy * weights).sum(dim=(0, 3, 4))  # (V, G)
        pair_loss = cell_sum / weights.sum(dim=(0, 3, 4)).clamp_min(1.0)  # an empty pair is 0, still in the graph
        off_diagonal = 1.0 - torch.eye(V, G, device=pair_loss.device)  # no (g, g) term, Eq. (1)
        return (pair_loss * off_diagonal).sum() / (G * (V - 1))


# ----------------------------------------------------------------------------------------------------------------
# Projection head g, prototypes C, and the student / teacher networks (SPEC 2.2, 2.3)
# ----------------------------------------------------------------------------------------------------------------

def projection_head(in_dim, hidden_dim=2048, out_dim=256, num_layers=3):
    """g: Linear-GELU-...-Linear, D -> 2048 -> 2048 -> 256; no norm layers. Its output is L2-normalised by the
    caller (the bottleneck of Sec. 3.1)."""
    dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
    layers = []
    for i in range(num_layers):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < num_layers - 1:
            layers.append(nn.GELU())
    head = nn.Sequential(*layers)
    for m in head:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    return head


class LeopartNetwork(nn.Module):
    """Backbone f, projection head g and prototypes C of one network (student or teacher).

    `forward(crops)`: V crops (B, 3, s_v, s_v) -> list of V dicts with `emb` (B, N_v, d), the L2-normalised
    Z = g(f(x)), and `scores` (B, N_v, K) = Z^T C, plus `attention` (B, heads, N_v) when asked. Consecutive crops
    of one size share a backbone call. With `bf16`, autocast covers backbone and head; the normalisation and the
    prototype scores stay in float32, since Sinkhorn divides them by epsilon = 0.05.
    """

    def __init__(self, backbone, num_prototypes=300, hidden_dim=2048, projection_dim=256, head_layers=3,
                 bf16=False):
        super().__init__()
        self.backbone = backbone
        self.projection_head = projection_head(backbone.embed_dim, hidden_dim, projection_dim, head_layers)
        self.prototypes = nn.Linear(projection_dim, num_prototypes, bias=False)
        nn.init.trunc_normal_(self.prototypes.weight, std=0.02)
        self.bf16 = bf16

    @torch.no_grad()
    def normalize_prototypes(self):
        """Rows of C to unit norm, so Z^T C are cosine similarities (Sec. 3.1 "after each gradient step"; the
        original does it at the start of every step, SPEC 2.2, which is the same sequence of values)."""
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    def forward(self, crops, return_attention=False):
        groups = []  # runs of consecutive equal-size crops, e.g. [globals], [locals]
        for i, crop in enumerate(crops):
            if groups and crops[groups[-1][0]].shape[-2:] == crop.shape[-2:]:
                groups[-1].append(i)
            else:
                groups.append([i])
        device_type = crops[0].device.type
        outputs = []
        for group in groups:
            x = torch.cat([crops[i] for i in group])
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.bf16):
                result = self.backbone(x, return_attention=return_attention)
                tokens, attention = result if return_attention else (result, None)
                z = self.projection_head(tokens)
            with torch.autocast(device_type, enabled=False):
                emb = F.normalize(z.float(), dim=-1)
                scores = emb @ self.prototypes.weight.float().t()
            for j, chunk in enumerate(zip(emb.chunk(len(group)), scores.chunk(len(group)))):
                out = dict(emb=chunk[0], scores=chunk[1])
                if attention is not None:
                    out["attention"] = attention.chunk(len(group))[j].float()
                outputs.append(out)
        return outputs


def to_map(rows, grid):
    """(B, N, K) token rows in row-major order over an (h, w) token grid -> (B, K, h, w) map."""
    B, _, K = rows.shape
    return rows.transpose(1, 2).reshape(B, K, *grid)


# ----------------------------------------------------------------------------------------------------------------
# Leopart: student, EMA teacher, queue, targets and loss (Sec. 3.1; SPEC 2.3, 3, 4)
# ----------------------------------------------------------------------------------------------------------------

class Leopart(nn.Module):
    """Self-supervised fine-tuning of a ViT's spatial tokens by dense swapped cluster prediction.

    `forward(crops, boxes)` -> scalar loss. crops: V tensors (B, 3, s, s), the G global crops first; boxes:
    `{"gc": (B, G, V, 4), "all": (B, V, G, 4)}` (SPEC 1.4). One step: normalise the prototypes; the teacher
    encodes the global crops (with its CLS attention when the loss is masked); the student encodes all crops;
    the foreground masks come from the teacher's attention; Sinkhorn turns each global crop's teacher scores (with
    its queue prepended) into targets Q_g; the queues take this step's foreground teacher embeddings; the loss is
    Eq. (1)-(2) under the foreground mask. The step has no host-device synchronisation: shapes and branches
    depend only on host-side sizes and the host-side queue fill level.

    Only the student requires gradients, so wrapping this module in DistributedDataParallel all-reduces exactly the
    student's gradients. Call `update_teacher(momentum)` after backward and before the optimizer step (SPEC 2.3).

    Options cover the paper's ablations (Table 1): loss_mask fg / all / bg, the crop numbers (given by the crops
    passed), use_teacher (teacher=None: the student makes its own targets), num_prototypes, queue_length.
    """

    def __init__(self, student_backbone, teacher_backbone=None, num_prototypes=300, hidden_dim=2048,
                 projection_dim=256, head_layers=3, num_global_crops=2, temperature=0.1, epsilon=0.05,
                 sinkhorn_iterations=3, loss_mask="fg", fg_mass=0.6, queue_length=8192, roi_size=7,
                 teacher_head_init="independent", bf16=False):
        super().__init__()
        if loss_mask not in ("fg", "all", "bg"):
            raise ValueError(f"loss_mask must be fg, all or bg, not {loss_mask!r}")
        if teacher_head_init not in ("independent", "copy"):
            raise ValueError(f"teacher_head_init must be independent or copy, not {teacher_head_init!r}")
        head = dict(num_prototypes=num_prototypes, hidden_dim=hidden_dim, projection_dim=projection_dim,
                    head_layers=head_layers, bf16=bf16)
        self.student = LeopartNetwork(student_backbone, **head)
        self.teacher = None
        if teacher_backbone is not None:
            # The original builds the teacher separately: its head and prototypes start from their own random
            # init and reach the student's only through the EMA (SPEC 8.1). "copy" starts them equal instead.
            self.teacher = LeopartNetwork(teacher_backbone, **head)
            if teacher_head_init == "copy":
                self.teacher.load_state_dict(self.student.state_dict())
            self.teacher.requires_grad_(False)
        self.patch_size = student_backbone.patch_size
        self.num_global_crops, self.temperature, self.roi_size = num_global_crops, temperature, roi_size
        self.epsilon, self.sinkhorn_iterations = epsilon, sinkhorn_iterations
        self.loss_mask, self.fg_mass = loss_mask, fg_mass
        world_size = dist.get_world_size() if _distributed() else 1
        # One FIFO per global crop and per rank, holding the past teacher embeddings (SPEC 3.3).
        self.register_buffer("queue", torch.zeros(num_global_crops, queue_length // world_size, projection_dim))
        # Rows of each queue written so far, kept on the host so that testing "full" needs no sync; every crop's
        # queue takes the same number of rows per step. Recounted from the buffer whenever a state dict is loaded.
        self.queue_rows_filled = 0
        self.register_load_state_dict_post_hook(Leopart._recount_queue_after_load)

    @property
    def queue_full(self):
        """The original's test `queue[-1].any()` (SPEC 3.3): every row has been written once."""
        return 0 < self.queue.shape[1] <= self.queue_rows_filled

    @torch.no_grad()
    def refresh_queue_fill(self):
        """Recount `queue_rows_filled` from the buffer (its non-zero rows; one host sync). `load_state_dict` calls
        it; call it yourself after writing `self.queue` directly, e.g. when re-splitting queues across ranks."""
        filled = self.queue.any(dim=-1).sum(dim=-1).min() if self.queue.numel() else 0
        self.queue_rows_filled = int(filled)

    @staticmethod
    def _recount_queue_after_load(module, incompatible_keys):
        module.refresh_queue_fill()

    @torch.no_grad()
    def normalize_prototypes(self):
        for network in (self.student, self.teacher):
            if network is not None:
                network.normalize_prototypes()

    def compile_backbones(self):
        """torch.compile the student's and teacher's ViTs in place (parameter names and checkpoints stay those of
        the plain modules). Only the backbones: the rest of the step has branches on host-side sizes. Static shapes,
        so each crop size (global, local, evaluation) gets its own graph rather than a dynamic-shape one."""
        for network in (self.student, self.teacher):
            if network is not None:
                network.backbone.compile(dynamic=False)

    @torch.no_grad()
    def update_teacher(self, momentum):
        """theta_T <- m theta_T + (1 - m) theta_S for all of backbone, head and prototypes (SPEC 2.3)."""
        if self.teacher is None:
            return
        teacher = list(self.teacher.parameters())
        student = [p.detach() for p in self.student.parameters()]
        torch._foreach_mul_(teacher, momentum)
        torch._foreach_add_(teacher, student, alpha=1.0 - momentum)

    def forward(self, crops, boxes):
        if self.training:
            self.normalize_prototypes()
        masked = self.loss_mask != "all"
        grid = crops[0].shape[-2] // self.patch_size, crops[0].shape[-1] // self.patch_size
        with torch.no_grad():
            target_network = self.teacher if self.teacher is not None else self.student
            teacher_out = target_network(crops[:self.num_global_crops], return_attention=masked)
        student_out = self.student(crops)
        fg_masks = self.foreground_masks(teacher_out, grid) if masked else None
        targets = self.targets(teacher_out, fg_masks, grid)
        return self.loss(student_out, crops, targets, boxes, fg_masks)

    @torch.no_grad()
    def foreground_masks(self, teacher_out, grid):
        """A_b of each global crop from the teacher's CLS attention (SPEC 4.3): G masks (B, 1, h, w) of 0/1,
        inverted for loss_mask bg."""
        attention = torch.cat([out["attention"] for out in teacher_out])
        fg = foreground_mask(attention, grid, self.fg_mass)
        if self.loss_mask == "bg":
            fg = 1.0 - fg
        return list(fg.chunk(len(teacher_out)))

    @torch.no_grad()
    def targets(self, teacher_out, fg_masks, grid):
        """Sinkhorn targets Q_g (B, K, h, w) for each global crop g on its (h, w) token grid (SPEC 3.1), then push
        crop g's foreground embeddings into its queue (SPEC 3.3).

        teacher_out: G dicts with `scores` (B, N, K) and `emb` (B, N, d); fg_masks: G masks (B, 1, h, w) or None.
        Each crop's B N tokens, with its queue's rows prepended once the queue is full, are one Sinkhorn problem;
        the G problems are solved in one call. The queue rows are scored with the student's prototypes, the batch
        with the teacher's (SPEC 3.1, as the original), and the push comes after, so this step's Sinkhorn sees
        only older entries.
        """
        B, N, K = teacher_out[0]["scores"].shape
        scores = torch.stack([out["scores"].reshape(B * N, K) for out in teacher_out]).float()  # (G, B N, K)
        if self.queue_full:
            with torch.autocast(scores.device.type, enabled=False):
                queue_scores = self.queue.float() @ self.student.prototypes.weight.float().t()  # (G, L, K)
            scores = torch.cat([queue_scores, scores], dim=1)
        assignments = sinkhorn(scores, self.epsilon, self.sinkhorn_iterations)[:, -B * N:]
        if self.queue.shape[1]:
            emb = torch.stack([out["emb"].reshape(B * N, -1) for out in teacher_out])
            # the tokens the loss trains on: the foreground (the background for loss_mask bg), SPEC 3.3
            fg = None if fg_masks is None else torch.stack([m.reshape(B * N) for m in fg_masks])
            self.push_to_queue(emb, fg, count=min(10 * B, self.queue.shape[1], B * N))
        return [to_map(q.view(B, N, K), grid) for q in assignments]

    @torch.no_grad()
    def push_to_queue(self, emb, fg, count):
        """FIFO push of `count` random token embeddings into each global crop's queue (SPEC 3.3; the original pushes
        10 B): emb (G, M, d) the teacher embeddings of each crop's M tokens, fg (G, M) 0/1 or None.

        Ranking random keys in [0, 1) plus the mask picks the foreground tokens first, in random order, with a
        fixed count and no host sync. When a crop has fewer foreground tokens than `count`, random background tokens
        of that crop fill the rest (the original crashes there, SPEC 3.3), so every push advances the queues by the
        same host-known count.
        """
        G, M, d = emb.shape
        keys = torch.rand(G, M, device=emb.device)
        if fg is not None:
            keys += fg
        picked = emb.gather(1, keys.topk(count, dim=1).indices[:, :, None].expand(G, count, d))
        length = self.queue.shape[1]
        self.queue.copy_(torch.cat([picked.to(self.queue.dtype), self.queue[:, :length - count]], dim=1))
        self.queue_rows_filled = min(length, self.queue_rows_filled + count)

    def loss(self, student_out, crops, targets, boxes, fg_masks):
        """Eq. (1)-(2) (`leopart_loss`) on the student's prototype scores of all V crops, as (B, K, h_v, w_v)."""
        P = self.patch_size
        student_scores = [to_map(out["scores"], (crop.shape[-2] // P, crop.shape[-1] // P))
                          for out, crop in zip(student_out, crops)]
        return leopart_loss(student_scores, targets, boxes["gc"], boxes["all"], fg_masks, self.temperature, P,
                            self.roi_size)


def cosine_schedule(base, final, epochs, iters_per_epoch):
    """Per-iteration values final + (base - final)(1 + cos(pi t / T)) / 2, t = 0 .. T - 1 (SPEC 10.6): learning
    rates (final 0), weight decay (0.04 -> 0.5), teacher momentum (0.9995 -> 1)."""
    total = epochs * iters_per_epoch
    t = torch.arange(total, dtype=torch.float64)
    return final + 0.5 * (base - final) * (1 + torch.cos(math.pi * t / total))
