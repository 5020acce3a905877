"""eval_linear.py: the linear and FCN probe heads (SPEC 6.a, 6.b), head files in the released layout (SPEC 9.3), and
end-to-end runs with the real ViT-S/14 against a random init."""
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from conftest import DATA, REPO, WEIGHTS, require
from eval_cluster import voc_palette
from eval_linear import (FCNHead, build_head, get_args_parser, load_head_strict, main, probe_logits, read_head_state,
                         save_head)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: on the shared, busy 2-core machine two threads are much slower (see test_eval_cluster)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# Parameter names and shapes of the released FCN heads (mmcv ConvModule names, SPEC 6.b) for D=384, C=21.
RELEASED_FCN_SHAPES = {
    "convs.0.conv.weight": (512, 384, 3, 3), "convs.0.conv.bias": (512,),
    "convs.1.conv.weight": (512, 512, 3, 3), "convs.1.conv.bias": (512,),
    "conv_cat.conv.weight": (512, 896, 3, 3), "conv_cat.conv.bias": (512,),
    "conv_seg.weight": (21, 512, 1, 1), "conv_seg.bias": (21,),
}


def test_fcn_head_layout_and_init():
    torch.manual_seed(0)
    head = FCNHead(384, 21)
    assert {k: tuple(v.shape) for k, v in head.state_dict().items()} == RELEASED_FCN_SHAPES
    # mmcv kaiming_init: normal, fan_out, ReLU gain -> std sqrt(2 / (out * k * k)); bias 0.
    for name, conv in (("convs.0", head.convs[0].conv), ("convs.1", head.convs[1].conv), ("conv_cat", head.conv_cat.conv)):
        expected = math.sqrt(2.0 / (512 * 9))
        assert conv.weight.std().item() == pytest.approx(expected, rel=0.02), name
        assert torch.all(conv.bias == 0), name
    # conv_seg keeps PyTorch's default init: uniform within 1/sqrt(fan_in), non-zero bias.
    bound = 1 / math.sqrt(512)
    assert head.conv_seg.weight.abs().max().item() <= bound and head.conv_seg.bias.abs().max().item() > 0
    x = torch.randn(2, 384, 5, 7)
    head.eval()
    out = head(x)
    assert out.shape == (2, 21, 5, 7)
    # Forward as SPEC 6.b: conv_cat on concat[x, convs(x)], then conv_seg (dropout inactive in eval).
    convs = F.relu(head.convs[1].conv(F.relu(head.convs[0].conv(x))))
    expected = head.conv_seg(F.relu(head.conv_cat.conv(torch.cat([x, convs], 1))))
    torch.testing.assert_close(out, expected)


def test_linear_head_commutes_with_bilinear_upsampling():
    torch.manual_seed(0)
    head = build_head("linear", 16, 5)
    assert set(head.state_dict()) == {"weight", "bias"} and head.weight.shape == (5, 16, 1, 1)
    tokens = torch.randn(2, 4, 4, 16)
    fast = probe_logits(head, tokens, 28)
    upsampled = F.interpolate(tokens.permute(0, 3, 1, 2), size=(28, 28), mode="bilinear", align_corners=False)
    torch.testing.assert_close(fast, head(upsampled), atol=1e-5, rtol=1e-5)


def test_head_files_released_layout_prefix_and_strict_errors(tmp_path):
    torch.manual_seed(0)
    head = FCNHead(384, 21)
    path = tmp_path / "fcn_head.pth"
    save_head(head, path)
    saved = torch.load(path, weights_only=True)
    assert set(saved) == {"finetune_head." + k for k in RELEASED_FCN_SHAPES}
    state, head_type = read_head_state(str(path))
    assert head_type == "fcn"
    other = FCNHead(384, 21)
    load_head_strict(other, state, path)
    for k, v in head.state_dict().items():
        assert torch.equal(other.state_dict()[k], v)
    # Without the prefix, inside a Lightning checkpoint, and in float16: all load.
    linear = build_head("linear", 384, 21)
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {k: v.half() for k, v in linear.state_dict().items()}, "epoch": 3}, plain)
    state, head_type = read_head_state(str(plain))
    assert head_type == "linear"
    load_head_strict(build_head("linear", 384, 21), state, plain)
    # Wrong number of classes, wrong embedding size, wrong head type: errors that name the keys.
    with pytest.raises(ValueError, match=r"shape mismatches.*weight"):
        load_head_strict(build_head("linear", 384, 12), state, plain)
    with pytest.raises(ValueError, match=r"missing keys.*convs\.0\.conv\.weight"):
        load_head_strict(FCNHead(384, 21), state, plain)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_head_state(str(tmp_path / "absent.ckpt"))
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read head file"):
        read_head_state(str(tmp_path / "junk.ckpt"))


# ---------------------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def camvid_split(tmp_path_factory):
    """CamVid val cut into a labelled folder with 8 training and 8 held-out images (frames far apart in the list)."""
    source = require(DATA / "camvid_val")
    root = tmp_path_factory.mktemp("camvid_split")
    (root / "images").symlink_to(source / "images")
    (root / "labels").symlink_to(source / "labels")
    names = (source / "val.txt").read_text().split()
    (root / "train.txt").write_text("\n".join(names[:8]) + "\n")
    (root / "val.txt").write_text("\n".join(names[50:58]) + "\n")
    return root


def run_main(tmp_path, *argv):
    args = get_args_parser().parse_args(["--num-workers", "0", "--device", "cpu", *argv])
    return main(args)


def test_end_to_end_linear_probe_pretrained_beats_random_init(tmp_path, camvid_split):
    weights = require(WEIGHTS / "dinov2_vits14_imgfocus.pth")
    common = ["--dataset", "folder", "--num-classes", "11", "--data-root", str(camvid_split), "--train-split", "train",
              "--input-size", "224", "--batch-size", "4", "--cache-features", "--arch", "dinov2_vits14"]
    pretrained = run_main(tmp_path, *common, "--pretrained", str(weights), "--output-dir", str(tmp_path / "pre"))
    random_init = run_main(tmp_path, *common, "--pretrained", "none", "--output-dir", str(tmp_path / "rand"))
    print(f"\nCamVid linear probe (8 train / 8 held-out images, 224 px, 25 epochs on cached tokens): "
          f"pretrained {100 * pretrained['miou']:.2f} vs random init {100 * random_init['miou']:.2f}")
    assert pretrained["miou"] > random_init["miou"] + 0.05
    assert pretrained["train_losses"][-1] < pretrained["train_losses"][0]
    assert pretrained["train"]["epochs"] == 25 and pretrained["train"]["lr"] == 0.01
    assert len(pretrained["iou_per_class"]) == 11 and (tmp_path / "pre" / "results.json").is_file()
    # The saved head, evaluated alone with --head, reproduces the score.
    again = run_main(tmp_path, *common, "--pretrained", str(weights), "--head", str(tmp_path / "pre" / "linear_head.pth"),
                     "--output-dir", str(tmp_path / "again"))
    assert again["miou"] == pytest.approx(pretrained["miou"], abs=1e-12)


def test_end_to_end_fcn_probe_with_augmentation_on_voc(tmp_path, capsys):
    """FCN head trained on augmented crops (no cache) of VOC-layout images at small sizes, then --head evaluation;
    progress lines with an ETA, and --save-maps panels image | ground truth | prediction."""
    weights = require(WEIGHTS / "dinov2_vits14_imgfocus.pth")
    root = require(DATA / "voc_mini")
    common = ["--dataset", "voc", "--data-root", str(root), "--pretrained", str(weights), "--input-size", "112",
              "--batch-size", "2", "--head-eval-size", "16"]
    trained = run_main(tmp_path, *common, "--head-type", "fcn", "--train-split", "val", "--epochs", "2",
                       "--train-mask-size", "16", "--output-dir", str(tmp_path / "fcn"), "--save-maps", "3")
    assert trained["protocol"]["head_type"] == "fcn" and len(trained["train_losses"]) == 2
    progress = capsys.readouterr().err.splitlines()
    assert all("ETA" in line for line in progress)
    assert any(line.startswith("probe training: 2/4 batches, epoch 1/2, loss ") for line in progress)
    assert progress[-1].startswith("probe evaluation: 4/4 images")
    maps = sorted((tmp_path / "fcn" / "maps").iterdir())
    assert [m.name for m in maps] == [f"{Path(f).stem}.png" for f in trained["val_files"][:3]]
    for path in maps:
        with Image.open(path) as png:
            panel = np.asarray(png.convert("RGB"))
        assert panel.shape == (112, 3 * 112 + 2 * 4, 3)
        assert {tuple(c) for c in panel[:, 232:].reshape(-1, 3)} <= {tuple(c) for c in voc_palette(21)}
    assert trained["train"]["augmentation"].startswith("RandomResizedCrop")
    assert 0 < trained["miou"] <= 1 and len(trained["iou_per_class"]) == 21
    evaluated = run_main(tmp_path, *common, "--head", str(tmp_path / "fcn" / "fcn_head.pth"),
                         "--output-dir", str(tmp_path / "eval"))
    assert evaluated["protocol"]["head_type"] == "fcn" and evaluated["train"] is None
    assert evaluated["miou"] == pytest.approx(trained["miou"], abs=1e-12)


def test_cli_reports_bad_input_without_traceback(tmp_path):
    weights = require(WEIGHTS / "dinov2_vits14_imgfocus.pth")
    linear = nn.Conv2d(384, 5, 1)
    torch.save({"finetune_head." + k: v for k, v in linear.state_dict().items()}, tmp_path / "head5.ckpt")
    result = subprocess.run([sys.executable, str(REPO / "eval_linear.py"), "--pretrained", str(weights),
                             "--dataset", "voc", "--data-root", str(require(DATA / "voc_mini")),
                             "--head", str(tmp_path / "head5.ckpt"), "--device", "cpu", "--num-workers", "0",
                             "--output-dir", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "cannot load head file" in result.stderr and "head5.ckpt" in result.stderr \
        and "shape mismatches" in result.stderr
