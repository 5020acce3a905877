"""leopart_core checkpoint readers for backbones as researchers get them: Hugging Face hub snapshots (Dinov2Model,
Dinov2WithRegistersModel, ViTModel; model.safetensors or pytorch_model.bin), timm state dicts, DINOv2 registers.

The name tables below are written here from the published conversions, independently of leopart_core's own tables
(which map the other way), so a wrong entry on either side fails a test:
- transformers src/transformers/models/dinov2/convert_dinov2_to_hf.py (create_rename_keys, read_in_q_k_v: DINOv2 ->
  Dinov2Model; q, k, v are rows [0:D], [D:2D], [2D:3D] of DINO's qkv);
- transformers .../dinov2_with_registers/convert_dinov2_with_registers_to_hf.py (the same plus
  register_tokens -> embeddings.register_tokens);
- transformers src/transformers/models/vit/convert_dino_to_pytorch.py (DINO -> ViTModel, base_model=True: no `vit.`
  prefix, norm -> layernorm; with a classifier: `vit.` prefix and head -> classifier);
- timm timm/models/vision_transformer.py: DINO weights load unchanged ('vit_small_patch16_224.dino' points at DINO's
  own .pth), `_convert_dinov2` drops mask_token and, for registers, writes reg_token = register_tokens,
  cls_token = cls_token + pos_embed[:, 0], pos_embed = pos_embed[:, 1:] (the *_reg4_dinov2 models are
  no_embed_class=True, reg_tokens=4).
"""
import json
import os
import shutil

import pytest
import torch

import leopart_core as lc
from conftest import GOLDEN, WEIGHTS, require

HUB = WEIGHTS / "dinov2-small-hf"


def hf_dinov2_names(dino, registers=False):
    """DINO/DINOv2 state dict -> Dinov2Model (Dinov2WithRegistersModel) names, after convert_dinov2_to_hf.py."""
    out = {"embeddings.cls_token": dino["cls_token"], "embeddings.mask_token": dino["mask_token"],
           "embeddings.position_embeddings": dino["pos_embed"],
           "embeddings.patch_embeddings.projection.weight": dino["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": dino["patch_embed.proj.bias"],
           "layernorm.weight": dino["norm.weight"], "layernorm.bias": dino["norm.bias"]}
    if registers:
        out["embeddings.register_tokens"] = dino["register_tokens"]
    depth = 1 + max(int(k.split(".")[1]) for k in dino if k.startswith("blocks."))
    D = dino["cls_token"].shape[-1]
    for i in range(depth):
        b, e = f"blocks.{i}.", f"encoder.layer.{i}."
        for p in ("weight", "bias"):
            for src, dst in (("norm1", "norm1"), ("norm2", "norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"),
                             ("attn.proj", "attention.output.dense")):
                out[f"{e}{dst}.{p}"] = dino[f"{b}{src}.{p}"]
            qkv = dino[f"{b}attn.qkv.{p}"]
            out[f"{e}attention.attention.query.{p}"] = qkv[:D]
            out[f"{e}attention.attention.key.{p}"] = qkv[D:2 * D]
            out[f"{e}attention.attention.value.{p}"] = qkv[2 * D:]
        out[f"{e}layer_scale1.lambda1"] = dino[f"{b}ls1.gamma"]
        out[f"{e}layer_scale2.lambda1"] = dino[f"{b}ls2.gamma"]
    return out


def hf_vit_names(dino, prefix=""):
    """DINO state dict -> ViTModel names, after convert_dino_to_pytorch.py (prefix 'vit.' for the classifier model)."""
    out = {f"{prefix}embeddings.cls_token": dino["cls_token"],
           f"{prefix}embeddings.position_embeddings": dino["pos_embed"],
           f"{prefix}embeddings.patch_embeddings.projection.weight": dino["patch_embed.proj.weight"],
           f"{prefix}embeddings.patch_embeddings.projection.bias": dino["patch_embed.proj.bias"],
           f"{prefix}layernorm.weight": dino["norm.weight"], f"{prefix}layernorm.bias": dino["norm.bias"]}
    depth = 1 + max(int(k.split(".")[1]) for k in dino if k.startswith("blocks."))
    D = dino["cls_token"].shape[-1]
    for i in range(depth):
        b, e = f"blocks.{i}.", f"{prefix}encoder.layer.{i}."
        for p in ("weight", "bias"):
            for src, dst in (("norm1", "layernorm_before"), ("attn.proj", "attention.output.dense"),
                             ("norm2", "layernorm_after"), ("mlp.fc1", "intermediate.dense"),
                             ("mlp.fc2", "output.dense")):
                out[f"{e}{dst}.{p}"] = dino[f"{b}{src}.{p}"]
            qkv = dino[f"{b}attn.qkv.{p}"]
            for j, part in enumerate(("query", "key", "value")):
                out[f"{e}attention.attention.{part}.{p}"] = qkv[j * D:(j + 1) * D]
    return out


def timm_dinov2_names(dino):
    """DINOv2 state dict -> timm's layout, after timm's _convert_dinov2."""
    out = {k: v for k, v in dino.items() if k not in ("mask_token", "register_tokens", "cls_token", "pos_embed")}
    if "register_tokens" in dino:  # timm's no_embed_class: the CLS position moves into cls_token
        out.update(reg_token=dino["register_tokens"], cls_token=dino["cls_token"] + dino["pos_embed"][:, :1],
                   pos_embed=dino["pos_embed"][:, 1:])
    else:
        out.update(cls_token=dino["cls_token"], pos_embed=dino["pos_embed"])
    return out


SAFETENSORS_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                     torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                     torch.bool: "BOOL"}


def write_safetensors(path, tensors, metadata=None):
    """A writer from the format's documentation (8-byte little-endian header length, JSON header with dtype, shape and
    data_offsets, then the raw bytes in order; the header padded with spaces to 8 bytes, as the library does)."""
    header = {"__metadata__": metadata} if metadata else {}
    blobs, offset = [], 0
    for name, t in tensors.items():
        data = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": SAFETENSORS_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + b"".join(blobs))


def native_dinov2():
    return torch.load(require(WEIGHTS / "dinov2_vits14_imgfocus.pth"), map_location="cpu", weights_only=True)


def dino_golden():
    return torch.load(require(GOLDEN / "dino_vit_tiny_p16.pt"), map_location="cpu", weights_only=False)


def hub_folder(tmp_path, **config_changes):
    """A copy of the shared hub snapshot (weights linked, not copied) with config.json fields changed."""
    folder = tmp_path / "snapshot"
    folder.mkdir(parents=True)
    os.symlink(require(HUB / "model.safetensors"), folder / "model.safetensors")
    config = json.loads((HUB / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **config_changes}))
    return folder


# ------------------------------------------------------------------------------------------------ safetensors reader

def test_safetensors_reader_matches_the_file_the_library_wrote():
    raw = lc.read_safetensors(require(HUB / "model.safetensors"))
    expected = hf_dinov2_names(native_dinov2())
    assert sorted(raw) == sorted(expected)  # 223 tensors: q, k, v split, no qkv
    for name, tensor in expected.items():
        assert raw[name].dtype == tensor.dtype == torch.float16 and torch.equal(raw[name], tensor), name


def test_safetensors_reader_reads_every_dtype(tmp_path):
    torch.manual_seed(0)
    tensors = {f"t_{name}": (torch.randn(3, 5) * 100).to(dtype) for dtype, name in SAFETENSORS_NAMES.items()}
    tensors.update(scalar=torch.tensor(2.5, dtype=torch.float64), empty=torch.zeros(0, 4), flags=torch.rand(7) > 0.5)
    write_safetensors(tmp_path / "all.safetensors", tensors, metadata={"format": "pt"})
    read = lc.read_safetensors(tmp_path / "all.safetensors")
    assert sorted(read) == sorted(tensors)
    for name, tensor in tensors.items():
        assert read[name].dtype == tensor.dtype and read[name].shape == tensor.shape, name
        assert torch.equal(read[name], tensor), name


def test_damaged_safetensors_fail_with_clear_messages(tmp_path):
    data = require(HUB / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=r"cannot read safetensors file .*model\.safetensors: the tensors fill "
                                         r"\d+ data bytes, but the file holds \d+.*truncated"):
        lc.load_backbone(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="model.safetensors: the tensors fill"):  # the folder names the file too
        lc.load_backbone(tmp_path)
    cases = {  # file name: (bytes, expected message)
        "short": (data[:5], "5 bytes, fewer than the 8-byte header length"),
        "cut_header": (data[:100], r"the header length is \d+ bytes, but the file has only 100"),
        "not_json": (len(b"{nope}  ").to_bytes(8, "little") + b"{nope}  ", "the header is not JSON"),
    }
    t = torch.arange(6, dtype=torch.float32)
    for name, header in {"overlap": {"a": [0, 24], "b": [12, 36]}, "gap": {"a": [0, 24], "b": [28, 52]},
                         "size": {"a": [0, 20], "b": [20, 44]}}.items():
        entries = {k: {"dtype": "F32", "shape": [6], "data_offsets": v} for k, v in header.items()}
        text = json.dumps(entries).encode()
        cases[name] = (len(text).to_bytes(8, "little") + text + t.numpy().tobytes() * 3,
                       {"overlap": "tensor 'b' starts at data byte 12, not at 24",
                        "gap": "tensor 'b' starts at data byte 28, not at 24",
                        "size": r"tensor 'a' spans data bytes 0\.\.20, but F32 \[6\] needs 24 bytes"}[name])
    text = json.dumps({"a": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}).encode()
    cases["dtype"] = (len(text).to_bytes(8, "little") + text + bytes(8), "tensor 'a' has the header entry .*C64")
    for name, (blob, message) in cases.items():
        (tmp_path / f"{name}.safetensors").write_bytes(blob)
        with pytest.raises(ValueError, match=f"cannot read safetensors file .*{name}.safetensors: {message}"):
            lc.read_safetensors(tmp_path / f"{name}.safetensors")


# ------------------------------------------------------------------------------------------------ hub snapshots

@pytest.mark.parametrize("source", [HUB, HUB / "model.safetensors"], ids=["folder", "file"])
def test_hub_dinov2_snapshot_loads_exactly_as_the_native_checkpoint(source):
    native = lc.load_backbone(require(WEIGHTS / "dinov2_vits14_imgfocus.pth")).state_dict()
    assert lc.read_backbone(require(source))[2] == 6  # num_attention_heads of config.json
    ours = lc.load_backbone(source).state_dict()
    assert list(ours) == list(native)
    for k in native:
        assert torch.equal(ours[k], native[k]), k
    into = lc.dinov2_vits14()
    assert lc.load_pretrained(into, source) == "Hugging Face Dinov2Model with config.json"
    assert all(torch.equal(v, native[k]) for k, v in into.state_dict().items())


def test_hub_pytorch_model_bin_and_classifier_prefix_load(tmp_path):
    dino = native_dinov2()
    folder = tmp_path / "cls"
    folder.mkdir()
    hf = {f"dinov2.{k}": v for k, v in hf_dinov2_names(dino).items()}  # Dinov2ForImageClassification
    torch.save({**hf, "classifier.weight": torch.ones(1000, 768), "classifier.bias": torch.ones(1000)},
               folder / "pytorch_model.bin")
    shutil.copy(require(HUB / "config.json"), folder / "config.json")
    model = lc.dinov2_vits14()
    assert lc.load_pretrained(model, folder) == "Hugging Face Dinov2Model (prefix 'dinov2.') with config.json"
    assert all(torch.equal(v, dino[k].float()) for k, v in model.state_dict().items())


def test_wrong_snapshots_fail_with_clear_messages(tmp_path):
    with pytest.raises(ValueError, match=r"config.json does not fit its tensors, a ViT with embed_dim 384, depth 12, "
                                         r"patch 14.*hidden_size 768 \(tensors: 384\); num_hidden_layers 24"):
        lc.load_backbone(hub_folder(tmp_path / "b", hidden_size=768, num_hidden_layers=24))
    with pytest.raises(ValueError, match=r"model_type 'vit' \(tensors: 'dinov2'\)"):
        lc.load_backbone(hub_folder(tmp_path / "v", model_type="vit"))
    with pytest.raises(ValueError, match=r"num_register_tokens 4 \(tensors: 0\)"):
        lc.load_backbone(hub_folder(tmp_path / "r", model_type="dinov2_with_registers", num_register_tokens=4))
    with pytest.raises(ValueError, match=r"use_swiglu_ffn True \(tensors: False\)"):
        lc.load_backbone(hub_folder(tmp_path / "g", use_swiglu_ffn=True))
    with pytest.raises(ValueError, match="num_attention_heads 5 \\(must divide the embed_dim 384\\)"):
        lc.load_backbone(hub_folder(tmp_path / "h5", num_attention_heads=5))
    with pytest.raises(ValueError, match="shape mismatches: attention heads: config.json 12 vs model 6"):
        lc.load_pretrained(lc.dinov2_vits14(), hub_folder(tmp_path / "h12", num_attention_heads=12))
    assert lc.load_backbone(tmp_path / "h12" / "snapshot").num_heads == 12  # the tensors cannot tell: the config does
    with pytest.raises(ValueError, match=r"shape mismatches: cls_token: checkpoint \(1, 1, 384\) vs model "
                                         r"\(1, 1, 768\)"):
        lc.load_backbone(require(HUB), arch="dinov2_vitb14", depth=1)
    with pytest.raises(ValueError, match="missing keys: register_tokens"):
        lc.load_backbone(require(HUB), arch="dinov2_vits14_reg", depth=1)
    # tensors of another model (a BERT encoder) in a hub folder
    (tmp_path / "bert").mkdir()
    write_safetensors(tmp_path / "bert" / "model.safetensors",
                      {"embeddings.word_embeddings.weight": torch.zeros(10, 8),
                       "encoder.layer.0.attention.self.query.weight": torch.zeros(8, 8)})
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(ValueError, match="no ViT backbone found in this state dict: no key ends in 'cls_token'"):
        lc.load_backbone(tmp_path / "bert")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no model.safetensors or pytorch_model.bin"):
        lc.load_backbone(tmp_path / "empty")


# ------------------------------------------------------------------------------------------------ DINO (v1) layouts

def tiny_outputs(model, ref):
    """(cls, patch tokens, CLS attention) of every golden case: 224, 96, 448 and a non-square input, so the
    position-table interpolation is included."""
    with torch.no_grad():
        return [model.eval().forward_features(case["input"], return_attention=True) for case in ref["cases"]]


def test_hf_vit_and_timm_dino_state_dicts_give_the_native_outputs(tmp_path):
    ref = dino_golden()
    dino, c = ref["state_dict"], ref["config"]

    def tiny_vit():  # heads from the file: a state dict cannot show them
        return lc.VisionTransformer(patch_size=c["patch_size"], embed_dim=c["embed_dim"], depth=c["depth"],
                                    num_heads=c["num_heads"], mlp_ratio=c["mlp_ratio"], qkv_bias=c["qkv_bias"])

    native_model = tiny_vit()
    native_model.load_state_dict(dino)
    native = tiny_outputs(native_model, ref)
    for case, (_, tokens, attention) in zip(ref["cases"], native):
        torch.testing.assert_close(tokens, case["patch_tokens"], atol=1e-4, rtol=0)
        torch.testing.assert_close(attention, case["cls_attention"], atol=1e-4, rtol=0)
    grid = int((dino["pos_embed"].shape[1] - 1) ** 0.5)
    # ViTModel snapshot (pytorch_model.bin, with its pooler), as convert_dino_to_pytorch.py writes it
    (tmp_path / "hf").mkdir()
    torch.save({**hf_vit_names(dino), "pooler.dense.weight": torch.ones(c["embed_dim"], c["embed_dim"]),
                "pooler.dense.bias": torch.ones(c["embed_dim"])}, tmp_path / "hf" / "pytorch_model.bin")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(dict(
        model_type="vit", hidden_size=c["embed_dim"], num_hidden_layers=c["depth"],
        num_attention_heads=c["num_heads"], intermediate_size=c["embed_dim"] * c["mlp_ratio"],
        patch_size=c["patch_size"], image_size=grid * c["patch_size"], qkv_bias=True, hidden_act="gelu",
        layer_norm_eps=1e-12)))
    # ViTForImageClassification weights (`vit.` prefix, classifier) as a bare .safetensors file
    write_safetensors(tmp_path / "vit_cls.safetensors",
                      {**hf_vit_names(dino, "vit."), "classifier.weight": torch.ones(10, c["embed_dim"]),
                       "classifier.bias": torch.zeros(10)})
    # timm: DINO's own names (plus a classifier head when built with classes), and timm's no_embed_class layout
    torch.save({**dino, "head.weight": torch.ones(10, c["embed_dim"]), "head.bias": torch.zeros(10)},
               tmp_path / "timm.pth")
    torch.save({**dino, "cls_token": dino["cls_token"] + dino["pos_embed"][:, :1],
                "pos_embed": dino["pos_embed"][:, 1:]}, tmp_path / "timm_no_embed_class.pth")
    for name, fmt in (("hf", "Hugging Face ViTModel with config.json"),
                      ("vit_cls.safetensors", "Hugging Face ViTModel (prefix 'vit.')"),
                      ("timm.pth", "DINO backbone"),
                      ("timm_no_embed_class.pth", "DINO backbone in timm layout (pos_embed without the CLS position)")):
        model = tiny_vit()
        assert lc.load_pretrained(model, tmp_path / name) == fmt
        for ours, theirs in zip(tiny_outputs(model, ref), native):
            assert all(torch.equal(a, b) for a, b in zip(ours, theirs)), name
        inferred = lc.load_backbone(tmp_path / name).state_dict()  # the architecture read off the tensors
        assert inferred.keys() == dino.keys()
        assert all(torch.equal(v, inferred[k]) for k, v in model.state_dict().items()), name


def test_incomplete_hf_attention_is_reported_by_name(tmp_path):
    hf = hf_vit_names(dino_golden()["state_dict"])
    del hf["encoder.layer.1.attention.attention.key.bias"]
    torch.save(hf, tmp_path / "broken.bin")
    with pytest.raises(ValueError, match=r"missing keys: blocks\.1\.attn\.qkv\.bias; unexpected keys: "
                                         r"encoder\.layer\.1\.attention\.attention\.(query|value)\.bias"):
        lc.load_backbone(tmp_path / "broken.bin")


# ------------------------------------------------------------------------------------------------ DINOv2 registers

def test_register_constructors_are_the_hub_models():
    for arch, dim, heads in (("dinov2_vits14_reg", 384, 6), ("dinov2_vitb14_reg", 768, 12)):
        model = lc.build_vit(arch, depth=1)
        assert (model.embed_dim, model.num_heads, model.patch_size, model.num_register_tokens) == (dim, heads, 14, 4)
        assert model.pos_embed.shape == (1, 1 + 37 * 37, dim) and model.mask_token.shape == (1, dim)
        # torch.hub's reg models resize by size (interpolate_offset=0.0), antialiased (interpolate_antialias=True)
        assert model.interpolate_offset == 0.0 and model.interpolate_antialias


def test_dinov2_registers_round_trip_through_timm_and_hf_layouts(tmp_path):
    torch.manual_seed(0)
    original = lc.dinov2_vits14_reg(depth=2).eval()
    with torch.no_grad():
        original.pos_embed[:, 0].normal_()  # a nonzero CLS position, which timm folds into cls_token
        original.mask_token.normal_()
    dino = original.state_dict()
    torch.save(timm_dinov2_names(dino), tmp_path / "timm.pth")
    write_safetensors(tmp_path / "hf.safetensors", hf_dinov2_names(dino, registers=True))
    (tmp_path / "timm_snapshot").mkdir()  # a timm hub snapshot: its config.json is timm's, without model_type
    write_safetensors(tmp_path / "timm_snapshot" / "model.safetensors", timm_dinov2_names(dino))
    (tmp_path / "timm_snapshot" / "config.json").write_text(json.dumps(
        {"architecture": "vit_small_patch14_reg4_dinov2", "num_classes": 0, "num_features": 384}))
    x = torch.randn(1, 3, 70, 56)  # not the 518-px grid: the position table is resized
    with torch.no_grad():
        expected = original.forward_features(x, return_attention=True)
    for name, arch in (("timm.pth", None), ("timm.pth", "dinov2_vits14_reg"), ("timm_snapshot", None),
                       ("hf.safetensors", None)):
        model = lc.load_backbone(tmp_path / name, arch, depth=2) if arch else lc.load_backbone(tmp_path / name)
        state = model.state_dict()
        assert list(state) == list(dino)
        for k in dino:
            if name.startswith("timm") and k in ("cls_token", "pos_embed", "mask_token"):
                continue
            assert torch.equal(state[k], dino[k]), (name, k)
        if name.startswith("timm"):  # the CLS position is in cls_token; timm has no mask_token (unused here)
            assert torch.equal(state["cls_token"], dino["cls_token"] + dino["pos_embed"][:, :1])
            assert torch.equal(state["pos_embed"][:, 1:], dino["pos_embed"][:, 1:])
            assert not state["pos_embed"][:, 0].any() and not state["mask_token"].any()
        with torch.no_grad():
            got = model.eval().forward_features(x, return_attention=True)
        assert all(torch.equal(a, b) for a, b in zip(got, expected)), name
    assert lc.read_backbone(tmp_path / "timm.pth")[1] == \
        "DINOv2 backbone in timm layout (reg_token, pos_embed without the CLS position, no mask_token)"
    assert lc.read_backbone(tmp_path / "hf.safetensors")[1] == "Hugging Face Dinov2WithRegistersModel"


def test_timm_dinov2_without_mask_token_loads_into_the_hub_architecture(tmp_path):
    dino = native_dinov2()
    torch.save(timm_dinov2_names(dino), tmp_path / "vit_small_patch14_dinov2.pth")
    model = lc.dinov2_vits14()
    assert lc.load_pretrained(model, tmp_path / "vit_small_patch14_dinov2.pth") == \
        "DINOv2 backbone in timm layout (no mask_token)"
    for k, v in model.state_dict().items():
        assert torch.equal(v, torch.zeros_like(v) if k == "mask_token" else dino[k].float()), k
