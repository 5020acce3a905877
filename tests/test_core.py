"""leopart_core: ViT, checkpoints, Sinkhorn, foreground mask, loss, queue, teacher EMA, schedules.

Golden data come from the original Leopart code and the reference DINO / DINOv2 model code (../shared/golden).
"""
import json
import math
import os
from argparse import Namespace

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import leopart_core as lc
from conftest import GOLDEN, WEIGHTS, require


def golden(name):
    return torch.load(require(GOLDEN / name), map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------------------------ ViT

def test_vit_matches_reference_dino_code():
    ref = torch.load(require(GOLDEN / "dino_vit_tiny_p16.pt"), map_location="cpu", weights_only=False)
    c = ref["config"]
    model = lc.VisionTransformer(patch_size=c["patch_size"], embed_dim=c["embed_dim"], depth=c["depth"],
                                 num_heads=c["num_heads"], mlp_ratio=c["mlp_ratio"], qkv_bias=c["qkv_bias"]).eval()
    model.load_state_dict(ref["state_dict"], strict=True)
    for case in ref["cases"]:  # 224, 96, 448 and a non-square input: position-table interpolation included
        with torch.no_grad():
            cls, tokens, attention = model.forward_features(case["input"], return_attention=True)
            fast = model(case["input"])
        torch.testing.assert_close(cls, case["cls_token"], atol=1e-4, rtol=0)
        torch.testing.assert_close(tokens, case["patch_tokens"], atol=1e-4, rtol=0)
        torch.testing.assert_close(attention, case["cls_attention"], atol=1e-4, rtol=0)
        assert torch.equal(fast, tokens)  # the attention-free path computes the same function
        assert tokens.shape[1] == case["grid"][0] * case["grid"][1]


def test_position_interpolation_uses_scale_factor_not_size():
    table = torch.randn(1, 1 + 14 * 14, 8)
    ours = lc.interpolate_pos_encoding(table, 28, 28)
    by_size = F.interpolate(table[:, 1:].reshape(1, 14, 14, 8).permute(0, 3, 1, 2), size=(28, 28), mode="bicubic")
    assert (ours[:, 1:] - by_size.permute(0, 2, 3, 1).reshape(1, -1, 8)).abs().max() > 1e-2  # SPEC 10.11
    assert torch.equal(lc.interpolate_pos_encoding(table, 14, 14), table)


@pytest.mark.parametrize("name,build", [("dino_vits16", lambda: lc.vit_small(16)), ("dino_vits8", lambda: lc.vit_small(8)),
                                        ("dino_vitb16", lambda: lc.vit_base(16)), ("dino_vitb8", lambda: lc.vit_base(8))])
def test_backbone_layouts_match_released_dino(name, build):
    layouts = json.loads(require(GOLDEN / "dino_backbone_layouts.json").read_text())
    ours = {k: list(v.shape) for k, v in build().state_dict().items()}
    assert ours == layouts[name]


def test_dinov2_checkpoint_loads_strictly_and_matches_reference():
    ref = torch.load(require(WEIGHTS / "dinov2_vits14_imgfocus_golden.pt"), weights_only=True)
    model = lc.dinov2_vits14().eval()
    assert lc.load_pretrained(model, WEIGHTS / "dinov2_vits14_imgfocus.pth") == "DINOv2 backbone"
    with torch.no_grad():
        cls, tokens, attention = model.forward_features(ref["image"], return_attention=True)
    torch.testing.assert_close(cls, ref["x_norm_clstoken"], atol=1e-3, rtol=0)
    torch.testing.assert_close(tokens, ref["x_norm_patchtokens"], atol=1e-3, rtol=0)
    torch.testing.assert_close(attention, ref["last_attn_cls"], atol=1e-4, rtol=0)
    # the architecture is read off the checkpoint
    inferred = lc.load_backbone(WEIGHTS / "dinov2_vits14_imgfocus.pth").eval()
    assert (inferred.patch_size, inferred.embed_dim, len(inferred.blocks)) == (14, 384, 12)
    with torch.no_grad():
        assert torch.equal(inferred(ref["image"]), tokens)
    model.interpolate_offset = 0  # the `size=` convention of the exported graph
    with torch.no_grad():
        _, tokens, _ = model.forward_features(ref["image"])
    torch.testing.assert_close(tokens, ref["size_interp_x_norm_patchtokens"], atol=1e-3, rtol=0)


def test_register_tokens_are_excluded_from_the_outputs():
    torch.manual_seed(0)
    model = lc.dinov2_vits14(num_register_tokens=4, depth=2).eval()
    x = torch.randn(1, 3, 56, 56)
    tokens, attention = model(x, return_attention=True)
    assert tokens.shape == (1, 16, 384) and attention.shape == (1, 6, 16)
    reloaded = lc.VisionTransformer(**lc.vit_config_from_state_dict(model.state_dict()))
    reloaded.load_state_dict(model.state_dict())
    assert torch.equal(reloaded.eval()(x), tokens)


def test_input_not_divisible_by_patch_size_is_rejected():
    with pytest.raises(ValueError, match="not divisible by the patch size 16"):
        lc.vit_tiny(16, depth=1)(torch.randn(1, 3, 100, 96))


def test_cls_attention_is_float32_under_bf16_autocast():
    torch.manual_seed(0)
    model = lc.vit_small(16, depth=2).eval()
    captured = {}
    model.blocks[-1].attn.qkv.register_forward_hook(lambda module, inputs, out: captured.update(qkv=out))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, attention = model(torch.randn(2, 3, 64, 64), return_attention=True)
    qkv = captured["qkv"]
    assert qkv.dtype == torch.bfloat16  # q and k really come out of autocast in bf16
    B, T, _ = qkv.shape
    heads, head_dim = model.num_heads, model.embed_dim // model.num_heads
    q, k, _ = qkv.reshape(B, T, 3, heads, head_dim).permute(2, 0, 3, 1, 4)

    def cls_row(q, k):
        return ((q[:, :, 0:1].float() * head_dim ** -0.5) @ k.float().transpose(-2, -1)).softmax(-1)[:, :, 0, 1:]
    expected = cls_row(q, k)  # float32 product and softmax, outside autocast
    assert attention.dtype == torch.float32
    torch.testing.assert_close(attention, expected, atol=1e-6, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_product = cls_row(q, k).float()  # the same expression inside autocast: the matmul rounds to bf16
    assert (bf16_product - expected).abs().max() > 1e-4


def test_drop_path_keeps_small_rates_under_bf16():
    p, n = 0.009, 4_000_000  # the second block's rate with drop_path_rate 0.1 over 12 blocks
    torch.manual_seed(0)
    x = torch.ones(n, 1, dtype=torch.bfloat16)
    out = lc.drop_path(x, p, training=True)
    kept = (out != 0).double().mean().item()
    assert abs(kept - (1 - p)) < 0.01 * (1 - p)
    assert abs((1 - kept) - p) < 0.05 * p  # the drop rate itself: 5 % is ~10 standard deviations at n = 4e6
    assert out.dtype == torch.bfloat16 and torch.equal(out[out != 0], (x / (1 - p))[out != 0])
    # A draw on bf16's grid rounds keep + U: it passes the keep-rate test above (0.9922 vs 0.991), but drops 2/256
    bf16_kept = ((1 - p) + torch.rand(n, 1, dtype=torch.bfloat16)).floor().ne(0).double().mean().item()
    assert abs((1 - bf16_kept) - p) > 0.1 * p


# ------------------------------------------------------------------------------------------------ checkpoints

def tiny_state():
    return torch.load(require(GOLDEN / "dino_vit_tiny_p16.pt"), weights_only=False)["state_dict"]


def tiny_vit():
    return lc.VisionTransformer(patch_size=16, embed_dim=192, depth=4, num_heads=3)


@pytest.mark.parametrize("wrap,fmt", [
    (lambda s: s, "DINO backbone"),
    (lambda s: {"teacher": {**{"backbone." + k: v for k, v in s.items()}, "head.last_layer.weight": torch.ones(3)},
                "student": {"module.backbone." + k: v * 0 for k, v in s.items()},
                "args": Namespace(arch="vit_tiny"), "epoch": 3}, "DINO full checkpoint (teacher) (prefix 'backbone.')"),
    (lambda s: {**{"teacher." + k: v * 0 for k, v in s.items()}, **{"model." + k: v for k, v in s.items()},
                "model.projection_head.0.weight": torch.ones(2, 2), "model.prototypes.weight": torch.ones(3, 2)},
     "Leopart checkpoint (model.*)"),
    (lambda s: {"state_dict": {**{"teacher." + k: v * 0 for k, v in s.items()}, **{"model." + k: v for k, v in s.items()}},
                "epoch": 1}, "Lightning checkpoint (model.*)"),
    (lambda s: {"model": {**{"student.backbone." + k: v for k, v in s.items()},
                          **{"teacher.backbone." + k: v * 0 for k, v in s.items()},
                          "student.prototypes.weight": torch.ones(3, 2)}, "step": 5}, "Leopart training checkpoint (student)"),
    (lambda s: {"module." + k: v for k, v in s.items()}, "state dict (prefix 'module.')"),
])
def test_load_pretrained_reads_every_supported_format(tmp_path, wrap, fmt):
    state = tiny_state()
    path = tmp_path / "ckpt.pth"
    torch.save(wrap(state), path)
    model = tiny_vit()
    assert lc.load_pretrained(model, path) == fmt
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # the student / teacher copy that evaluation uses, never the zeros


def test_export_backbone_round_trips(tmp_path):
    leopart = lc.Leopart(tiny_vit(), tiny_vit(), num_prototypes=10, hidden_dim=16, projection_dim=8, queue_length=0)
    leopart.student.backbone.load_state_dict(tiny_state())
    lc.export_backbone(leopart, tmp_path / "backbone.pth")
    reloaded = lc.load_backbone(tmp_path / "backbone.pth")
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, tiny_state()[k])
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_wrong_checkpoints_fail_with_clear_messages(tmp_path):
    torch.manual_seed(0)
    torch.save(lc.vit_base(16, depth=2).state_dict(), tmp_path / "vitb.pth")
    with pytest.raises(ValueError, match=r"embed_dim 768.* into a ViT with embed_dim 384.*shape mismatches: cls_token"):
        lc.load_pretrained(lc.vit_small(16, depth=2), tmp_path / "vitb.pth")
    torch.save(lc.vit_small(16, depth=2).state_dict(), tmp_path / "vits_depth2.pth")
    with pytest.raises(ValueError, match=r"missing keys: blocks\.2\."):
        lc.load_pretrained(lc.vit_small(16), tmp_path / "vits_depth2.pth")
    with pytest.raises(ValueError, match="shape mismatches"):
        lc.load_backbone(tmp_path / "vitb.pth", arch="vit_small")
    torch.save({"encoder.weight": torch.ones(3), "fc.bias": torch.ones(3)}, tmp_path / "unrelated.pth")
    with pytest.raises(ValueError, match="no ViT backbone found.*cls_token"):
        lc.load_pretrained(lc.vit_small(16), tmp_path / "unrelated.pth")
    data = (tmp_path / "vits_depth2.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read checkpoint .*truncated"):
        lc.load_pretrained(lc.vit_small(16, depth=2), tmp_path / "truncated.pth")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lc.load_pretrained(lc.vit_small(16), tmp_path / "absent.pth")


# ------------------------------------------------------------------------------------------------ Sinkhorn

def test_sinkhorn_matches_original():
    ref = golden("leopart_sinkhorn.pt")
    cases = [c for c in ref.values() if isinstance(c, dict) and "scores" in c]
    assert cases
    for case in cases:
        torch.testing.assert_close(lc.sinkhorn(case["scores"], case["eps"], case["iters"]), case["q"],
                                   atol=1e-6, rtol=0)
        if "q_from_float64_input" in case:
            out = lc.sinkhorn(case["scores"].double(), case["eps"], case["iters"])
            assert out.dtype == torch.float32
            torch.testing.assert_close(out, case["q_from_float64_input"], atol=1e-6, rtol=0)


def test_sinkhorn_spec_reference_numbers():
    scores = torch.cos(0.37 * torch.arange(60, dtype=torch.float32)).view(12, 5)  # SPEC 10.1
    P = lc.sinkhorn(scores)
    torch.testing.assert_close(P.sum(1), torch.ones(12), atol=1.2e-7, rtol=0)
    torch.testing.assert_close(P.sum(0), torch.tensor([4.5833354, 1.8969828, 1.1331359, 1.3822403, 3.0043058]),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(P[0], torch.tensor([1.52007565e-1, 7.98052490e-1, 4.96847369e-2, 2.55229766e-4,
                                                   7.65045094e-9]), atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(P[5], torch.tensor([1.28837883e-7, 2.82274186e-6, 1.30204353e-4, 3.59745584e-2,
                                                   9.63892281e-1]), atol=1e-6, rtol=1e-4)
    assert P.argmax(1).tolist() == [1, 0, 4, 2, 0, 4, 3, 0, 0, 4, 1, 0]
    assert abs((P * torch.arange(5)).sum().item() - 20.3272) < 1e-3
    assert torch.equal(lc.sinkhorn(torch.zeros(7, 4)), torch.full((7, 4), 0.25))  # all-ones Q -> 1/K


def test_sinkhorn_is_invariant_to_prototype_shifts_and_does_not_overflow():
    torch.manual_seed(0)
    scores = torch.rand(50, 8) * 2 - 1
    shifted = lc.sinkhorn(scores + torch.randn(8) * 20)  # exp(400) would overflow float32 without the max shift
    assert torch.isfinite(shifted).all()
    # equal up to the float32 rounding of the shifted inputs themselves (spacing ~1e-4 at |scores / eps| ~ 1000)
    torch.testing.assert_close(shifted, lc.sinkhorn(scores), atol=1e-4, rtol=0)
    torch.testing.assert_close(lc.sinkhorn(scores.double()), lc.sinkhorn(scores), atol=2e-7, rtol=0)


def test_sinkhorn_solves_stacked_problems_independently():
    torch.manual_seed(0)
    scores = F.normalize(torch.randn(2, 70, 16), dim=-1) @ F.normalize(torch.randn(12, 16), dim=1).t()
    both = lc.sinkhorn(scores)
    assert both.shape == (2, 70, 12)
    for g in range(2):
        torch.testing.assert_close(both[g], lc.sinkhorn(scores[g]), atol=1e-7, rtol=0)
    with pytest.raises(ValueError, match=r"\(M, K\) or \(G, M, K\)"):
        lc.sinkhorn(scores[None])


def _distributed_sinkhorn_worker(rank, init_file, rows, stacked_rows, out_file):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    calls = []
    all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        calls.append(tuple(tensor.shape))
        return all_reduce(tensor, *args, **kwargs)
    dist.all_reduce = counting_all_reduce
    try:
        single = lc.sinkhorn(rows[rank])
        single_calls = list(calls)
        stacked = lc.sinkhorn(stacked_rows[rank], iterations=3)
    finally:
        dist.all_reduce = all_reduce
    torch.save(dict(single=single, stacked=stacked, single_calls=single_calls,
                    stacked_calls=calls[len(single_calls):]), f"{out_file}.{rank}")
    # no destroy_process_group: on torch 2.5 it can hang right after a gloo collective (half the runs here); the
    # process ends now anyway


def test_distributed_sinkhorn_equals_single_process(tmp_path):
    torch.manual_seed(0)
    prototypes = F.normalize(torch.randn(12, 16), dim=1)
    scores = F.normalize(torch.randn(90, 16), dim=1) @ prototypes.t()
    rows = [scores[:40], scores[40:]]  # unequal shares: M is all-reduced, not assumed equal
    stacked = F.normalize(torch.randn(2, 90, 16), dim=-1) @ prototypes.t()  # (G, M, K): two global crops
    stacked_rows = [stacked[:, :35], stacked[:, 35:]]
    mp.spawn(_distributed_sinkhorn_worker, args=(str(tmp_path / "init"), rows, stacked_rows, str(tmp_path / "out")),
             nprocs=2)
    out = [torch.load(tmp_path / f"out.{r}", weights_only=True) for r in range(2)]
    both = torch.cat([o["single"] for o in out])
    torch.testing.assert_close(both, lc.sinkhorn(scores), atol=1e-6, rtol=0)
    per_rank = torch.cat([lc.sinkhorn(r) for r in rows])
    assert (both - per_rank).abs().max() > 1e-3  # the ranks really solved one problem together
    both = torch.cat([o["stacked"] for o in out], dim=1)
    torch.testing.assert_close(both, lc.sinkhorn(stacked), atol=1e-6, rtol=0)
    for g in range(2):  # each crop is its own problem, across ranks
        torch.testing.assert_close(both[g], lc.sinkhorn(stacked[g]), atol=1e-6, rtol=0)
    # one all-reduce for the maxima, one for mass and token count, one per iteration, for all crops together
    assert out[0]["stacked_calls"] == [(2, 1, 12), (2, 2), (2, 1, 12), (2, 1, 12), (2, 1, 12)]
    assert len(out[0]["single_calls"]) == 2 + 3


# ------------------------------------------------------------------------------------------------ foreground mask

def test_foreground_mask_matches_original():
    ref = golden("leopart_attention_masks.pt")
    process = ref["process_attentions"]
    for r in (14, 28):
        attn = process[f"attn_{r}"]
        out = lc.foreground_mask(attn.flatten(2), (r, r), mass=process["threshold"], blur_sigma=process["blur_sigma"])
        assert torch.equal(out, process[f"out_{r}"])
        # the i.i.d. maps have components of <= 2 pixels, so the removal step is exercised
        assert not torch.equal(process[f"before_small_component_removal_{r}"], process[f"out_{r}"])
    store = ref["process_and_store_attentions"]  # golden 3b: head mean of (n, heads, N) maps
    r = store["spatial_res"]
    out = lc.foreground_mask(torch.cat(store["attns_list"]), (r, r), mass=store["threshold"], blur_sigma=0.6)
    assert torch.equal(out, store["out"])


def test_foreground_mask_spec_example():
    y, x = torch.meshgrid(torch.arange(14.0), torch.arange(14.0), indexing="ij")
    heads = []
    for h in range(6):  # SPEC 10.5
        logits = -((y - 5 - 0.3 * h) ** 2 + (x - 8 + 0.2 * h) ** 2) / 10 + 0.3 * torch.sin(1.3 * x + 0.7 * y + h)
        heads.append(logits.flatten().softmax(0))
    mask = lc.foreground_mask(torch.stack(heads)[None], (14, 14))[0, 0]
    expected = torch.zeros(14, 14)
    expected[3, 6:10] = 1
    expected[4:8, 5:11] = 1
    expected[8, 6:10] = 1
    assert torch.equal(mask, expected)


def naive_drop_tiny_components(mask):
    """Flood fill with 8-connectivity; zero components of <= 2 pixels."""
    out = mask.clone()
    h, w = mask.shape
    seen = torch.zeros_like(mask, dtype=torch.bool)
    for i in range(h):
        for j in range(w):
            if mask[i, j] and not seen[i, j]:
                stack, component = [(i, j)], []
                seen[i, j] = True
                while stack:
                    a, b = stack.pop()
                    component.append((a, b))
                    for da in (-1, 0, 1):
                        for db in (-1, 0, 1):
                            u, v = a + da, b + db
                            if 0 <= u < h and 0 <= v < w and mask[u, v] and not seen[u, v]:
                                seen[u, v] = True
                                stack.append((u, v))
                if len(component) <= 2:
                    for a, b in component:
                        out[a, b] = 0
    return out


def test_tiny_component_removal_equals_flood_fill():
    torch.manual_seed(0)
    masks = (torch.rand(40, 1, 12, 12) < torch.linspace(0.1, 0.6, 40)[:, None, None, None]).float()
    ours = lc.drop_tiny_components(masks)
    for m, o in zip(masks, ours):
        assert torch.equal(o[0], naive_drop_tiny_components(m[0]))


# ------------------------------------------------------------------------------------------------ loss

def golden_targets(ref):
    B, K = ref["teacher_scores"].shape[1:3]
    cfg = ref["config"]
    targets = []
    for t in ref["teacher_scores"]:
        h, w = t.shape[-2:]
        q = lc.sinkhorn(t.permute(0, 2, 3, 1).reshape(-1, K), cfg["epsilon"], cfg["sinkhorn_iterations"])
        targets.append(q.view(B, h, w, K).permute(0, 3, 1, 2))
    return targets


def golden_loss(ref, targets, masks, image=slice(None)):
    cfg = ref["config"]
    glob = ref["student_scores_global"][:, image].clone().requires_grad_()
    local = ref["student_scores_local"][:, image].clone().requires_grad_()
    loss = lc.leopart_loss(list(glob) + list(local), targets, ref["bboxes_gc"][image], ref["bboxes_all"][image],
                           masks, cfg["temperature"], cfg["patch_size"], cfg["roi_align_kernel_size"])
    loss.backward()
    return loss.item(), glob.grad, local.grad


def test_loss_matches_original():
    ref = golden("leopart_spatial_loss.pt")
    B = ref["teacher_scores"].shape[1]
    targets = golden_targets(ref)
    torch.testing.assert_close(targets[0], ref["teacher_q_crop0"], atol=1e-6, rtol=0)
    aligned = lc.align(targets[0], ref["bboxes_gc"][:, 0], 16, 7)
    torch.testing.assert_close(aligned, ref["teacher_q_crop0_aligned"], atol=1e-6, rtol=0)
    for v in (1, 2):
        scores = [ref["student_scores_global"][1], ref["student_scores_local"][0]][v - 1]
        torch.testing.assert_close(lc.align(scores, ref["bboxes_all"][:, v, 0:1], 16, 7)[:, 0],
                                   ref[f"student_aligned_logits_crop0_v{v}"], atol=1e-6, rtol=0)
    loss, grad_global, grad_local = golden_loss(ref, targets, None)
    assert abs(loss - ref["loss_all"]) < 2e-6
    torch.testing.assert_close(grad_global, ref["grad_all_student_global"], atol=1e-8, rtol=0)
    torch.testing.assert_close(grad_local, ref["grad_all_student_local"], atol=1e-8, rtol=0)
    attn = ref["attn_hard"]
    fg = [attn[:B], attn[B:]]
    assert abs(golden_loss(ref, targets, fg)[0] - ref["loss_fg"]) < 2e-6
    assert abs(golden_loss(ref, targets, [1 - m for m in fg])[0] - ref["loss_bg"]) < 2e-6
    assert torch.equal(lc.foreground_mask(ref["attn_maps"].flatten(2), (14, 14)), attn)


def test_loss_skips_pairs_with_empty_masks_like_original():
    ref = golden("leopart_spatial_loss.pt")
    case = ref["sparse_single_image_case"]
    assert (case["derived_pair_mask_sum"] == 0).any()  # some pairs are skipped
    one_image = dict(ref, teacher_scores=ref["teacher_scores"][:, :1])  # Sinkhorn over this batch of one image
    targets = golden_targets(one_image)
    mask = case["attn_hard"]
    loss, grad_global, grad_local = golden_loss(ref, targets, [mask[:1], mask[1:]], image=slice(0, 1))
    assert abs(loss - case["loss"]) < 2e-6
    torch.testing.assert_close(grad_global, case["grad_student_global"], atol=1e-8, rtol=0)
    torch.testing.assert_close(grad_local, case["grad_student_local"], atol=1e-8, rtol=0)


def test_roi_align_erosion_of_all_ones_masks():
    """SPEC 10.4: aligned all-ones maps are >= 1 - 1e-6 everywhere, but some cells fall just below 1.0 in float32,
    which the original's `>= 1.0` then drops (so an all-ones mask does not equal the unmasked loss)."""
    g = torch.Generator().manual_seed(0)
    corners = torch.rand(400, 2, 2, generator=g) * 14
    boxes = torch.cat([corners.min(1).values, corners.max(1).values + 1e-3], dim=1).view(100, 4, 4)
    aligned = lc.align(torch.ones(100, 1, 14, 14), boxes, patch_size=1, roi_size=7)
    assert aligned.min() >= 1 - 1e-6
    fraction_at_one = (aligned >= 1.0).float().mean().item()
    assert 0.98 < fraction_at_one < 1.0


def spec_boxes(abs_boxes, sizes, num_global):
    """The SPEC 1.4 box arithmetic, written out naively for the SPEC 10.3 toy case."""
    V = len(abs_boxes)
    gc, al = torch.zeros(num_global, V, 4), torch.zeros(V, num_global, 4)
    for g in range(num_global):
        for c in range(V):
            lt = [max(abs_boxes[g][i], abs_boxes[c][i]) for i in (0, 1)]
            rb = [min(abs_boxes[g][i + 2], abs_boxes[c][i + 2]) for i in (0, 1)]
            for f, out in ((g, gc[g, c]), (c, al[c, g])):
                x1, y1, x2, y2 = abs_boxes[f]
                scale = (sizes[f] / (x2 - x1), sizes[f] / (y2 - y1))
                out[:] = torch.tensor([(lt[0] - x1) * scale[0], (lt[1] - y1) * scale[1],
                                       (rb[0] - x1) * scale[0], (rb[1] - y1) * scale[1]])
    return gc, al


def test_toy_loss_spec_reference_numbers():
    """SPEC 10.3: bs 2, K 5, 64-px globals (4x4 tokens), 32-px locals (2x2), nmb_crops [2, 2]."""
    images = [[[0, 0, 400, 300], [100, 50, 500, 400], [50, 50, 150, 150], [300, 200, 420, 320]],
              [[20, 10, 220, 210], [0, 40, 260, 240], [100, 100, 180, 160], [10, 20, 90, 120]]]
    boxes = [spec_boxes(b, [64, 64, 32, 32], 2) for b in images]
    gc, al = torch.stack([b[0] for b in boxes]), torch.stack([b[1] for b in boxes])

    def rows(n, a):
        return torch.cos(a * torch.arange(n * 5, dtype=torch.float32)).view(n, 5)

    def maps(r, crops, side):  # rows in (crop, image, token) order -> per-crop (B, K, side, side)
        return [m.view(2, side, side, 5).permute(0, 3, 1, 2) for m in r.view(crops, 2 * side * side, 5)]

    teacher = maps(rows(64, 0.37), 2, 4)
    targets = [lc.sinkhorn(t.permute(0, 2, 3, 1).reshape(-1, 5)).view(2, 4, 4, 5).permute(0, 3, 1, 2) for t in teacher]
    student = maps(rows(64, 0.53), 2, 4) + maps(rows(16, 0.71), 2, 2)
    assert abs(lc.leopart_loss(student, targets, gc, al).item() - 4.5551481) < 2e-6
    mask = torch.zeros(4, 1, 4, 4)
    mask[:, :, 1:3, 0:3] = 1  # SPEC's "rows 1-2 x cols 0-3" is the slice [1:3, 0:3] (the only reading that matches)
    mask[1] = 1
    mask[2, :, 0:2] = 1
    fg = [mask[:2], mask[2:]]  # maps in (crop, image) order
    assert abs(lc.leopart_loss(student, targets, gc, al, fg).item() - 5.8726311) < 2e-6
    ones = [torch.ones(2, 1, 4, 4)] * 2
    assert abs(lc.leopart_loss(student, targets, gc, al, ones).item() - 4.5607729) < 2e-6


# ------------------------------------------------------------------------------------------------ Leopart module

def small_leopart(**kw):
    torch.manual_seed(0)
    student = lc.vit_tiny(16, depth=2, drop_path_rate=0.1)
    teacher = lc.vit_tiny(16, depth=2)
    teacher.load_state_dict(student.state_dict())
    options = dict(num_prototypes=20, hidden_dim=32, projection_dim=16, queue_length=40)
    options.update(kw)
    return lc.Leopart(student, teacher, **options)


def random_views(B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    crops = [torch.randn(B, 3, 64, 64, generator=g) for _ in range(2)] + \
            [torch.randn(B, 3, 32, 32, generator=g) for _ in range(2)]
    gc = torch.tensor([0, 0, 64, 64.]).repeat(B, 2, 4, 1)
    al = torch.tensor([0, 0, 64, 64.]).repeat(B, 4, 2, 1)
    al[:, 2:] = torch.tensor([0, 0, 32, 32.])
    gc[:, :, 2:] = torch.tensor([8, 8, 40, 40.])
    return crops, {"gc": gc, "all": al}


def test_gradients_reach_only_the_student():
    model = small_leopart()
    crops, boxes = random_views()
    model(crops, boxes).backward()
    assert all(not p.requires_grad and p.grad is None for p in model.teacher.parameters())
    grads = {n: p.grad for n, p in model.student.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["prototypes.weight"].abs().sum() > 0 and grads["backbone.patch_embed.proj.weight"].abs().sum() > 0


def test_teacher_ema_update():
    model = small_leopart()
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in model.teacher.parameters()]
    model.update_teacher(0.9)
    for t0, t1, s in zip(before, model.teacher.parameters(), model.student.parameters()):
        torch.testing.assert_close(t1, 0.9 * t0 + 0.1 * s)


def test_prototypes_are_unit_norm_at_every_step():
    model = small_leopart()
    optimizer = torch.optim.SGD(model.student.parameters(), lr=1.0)
    crops, boxes = random_views()
    for _ in range(2):
        model(crops, boxes).backward()
        for network in (model.student, model.teacher):  # normalised at the start of the step, before use
            torch.testing.assert_close(network.prototypes.weight.norm(dim=1), torch.ones(20))
        optimizer.step()
        optimizer.zero_grad()
        assert (model.student.prototypes.weight.norm(dim=1) - 1).abs().max() > 1e-3  # the step moved them off


def test_loss_is_finite_under_bf16_autocast():
    model = small_leopart(bf16=True)
    crops, boxes = random_views()
    loss = model(crops, boxes)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.student.parameters())


@pytest.mark.parametrize("options", [dict(loss_mask="all"), dict(loss_mask="bg"), dict(queue_length=0),
                                     dict(num_prototypes=7), dict(teacher_head_init="copy")])
def test_ablation_options_train(options):
    model = small_leopart(**options)
    crops, boxes = random_views()
    loss = model(crops, boxes)
    assert torch.isfinite(loss)
    loss.backward()


def test_without_teacher_the_student_makes_its_targets():
    torch.manual_seed(0)
    model = lc.Leopart(lc.vit_tiny(16, depth=2), None, num_prototypes=10, hidden_dim=16, projection_dim=8,
                       queue_length=0)
    crops, boxes = random_views()
    loss = model(crops, boxes)
    loss.backward()
    assert torch.isfinite(loss) and model.teacher is None


def test_queue_fills_with_foreground_teacher_embeddings_then_joins_sinkhorn():
    model = small_leopart(queue_length=24)
    model.eval()  # no drop-path, so the teacher forward below is reproducible
    crops, boxes = random_views(B=2)
    with torch.no_grad():
        teacher = model.teacher(crops[:2], return_attention=True)
    fg = lc.foreground_mask(torch.cat([t["attention"] for t in teacher]), (4, 4)).chunk(2)
    model(crops, boxes)
    assert model.queue_rows_filled == 20 and not model.queue_full  # 10 B rows per step
    for g in range(2):
        emb, is_fg = teacher[g]["emb"].reshape(-1, 16), fg[g].flatten() > 0
        distances = torch.cdist(model.queue[g, :20], emb, compute_mode="donot_use_mm_for_euclid_dist")
        assert distances.min(dim=1).values.max() < 1e-5  # every queued row is a teacher embedding of crop g
        token = distances.argmin(dim=1)
        assert len(set(token.tolist())) == 20  # distinct tokens
        n_fg = int(is_fg.sum())
        assert set(token[:min(n_fg, 20)].tolist()) <= set(is_fg.nonzero().flatten().tolist())  # foreground first
        assert not is_fg[token[n_fg:]].any()  # then background tokens, when too few are foreground
        assert not model.queue[g, 20:].any()
    model(crops, boxes)
    assert model.queue_full and model.queue[:, -1].any(dim=1).all()  # full: Sinkhorn now sees the queue rows
    queue_before = model.queue.clone()
    with_queue = model.targets(teacher, None, (4, 4))
    prototypes = model.student.prototypes.weight
    for g in range(2):
        scores = teacher[g]["scores"].reshape(-1, 20)
        plain = lc.sinkhorn(scores).view(2, 4, 4, 20).permute(0, 3, 1, 2)
        assert (with_queue[g] - plain).abs().max() > 1e-4
        expected = lc.sinkhorn(torch.cat([queue_before[g] @ prototypes.t(), scores]))[-32:]
        torch.testing.assert_close(with_queue[g], expected.view(2, 4, 4, 20).permute(0, 3, 1, 2))


def test_queue_push_takes_foreground_first_in_random_order():
    model = small_leopart(queue_length=30)
    emb = torch.randn(2, 12, 16)
    fg = torch.zeros(2, 12)
    fg[0, [1, 4, 5, 7, 8, 10, 11]] = 1  # more foreground tokens than the count
    fg[1, [2, 9]] = 1  # fewer: background tokens fill up
    picks = []
    torch.manual_seed(0)
    for step in range(6):
        before = model.queue.clone()
        model.push_to_queue(emb, fg, count=5)
        assert model.queue_rows_filled == min(30, 5 * (step + 1))
        assert torch.equal(model.queue[:, 5:], before[:, :25])  # FIFO: older rows move back
        token = torch.cdist(model.queue[:, :5], emb, compute_mode="donot_use_mm_for_euclid_dist").argmin(dim=2)
        assert torch.equal(model.queue[:, :5], emb.gather(1, token[:, :, None].expand(2, 5, 16)))
        assert fg[0, token[0]].all() and len(set(token[0].tolist())) == 5
        assert set(token[1, :2].tolist()) == {2, 9} and not fg[1, token[1, 2:]].any()
        assert len(set(token[1].tolist())) == 5
        picks.append(frozenset(token[0].tolist()))
    assert model.queue_full
    assert len(set(picks)) > 1 and set().union(*picks) == {1, 4, 5, 7, 8, 10, 11}  # random, not the same five


def test_queue_fill_level_is_recounted_on_load():
    model = small_leopart(queue_length=24)
    crops, boxes = random_views(B=2)
    model(crops, boxes)
    resumed = small_leopart(queue_length=24)
    resumed.load_state_dict(model.state_dict())
    assert resumed.queue_rows_filled == 20 and not resumed.queue_full
    model(crops, boxes)
    resumed.load_state_dict(model.state_dict())
    assert resumed.queue_full
    resumed.queue.zero_()  # e.g. re-split queues written into the buffer directly
    resumed.refresh_queue_fill()
    assert resumed.queue_rows_filled == 0 and not resumed.queue_full
    assert not small_leopart(queue_length=0).queue_full


# ------------------------------------------------------------------------------------------------ schedules

def test_cosine_schedule_spec_values():
    torch.testing.assert_close(lc.cosine_schedule(0.04, 0.5, 2, 3),
                               torch.tensor([0.04, 0.07081416, 0.155, 0.27, 0.385, 0.46918584], dtype=torch.float64))
    torch.testing.assert_close(lc.cosine_schedule(0.9995, 1, 1, 4),
                               torch.tensor([0.9995, 0.9995732233, 0.99975, 0.9999267767], dtype=torch.float64))
    assert math.isclose(lc.cosine_schedule(1e-4, 0, 3, 7)[0].item(), 1e-4)
