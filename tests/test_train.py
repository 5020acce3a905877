"""train.py: DDP equals one process, exact resume, clear failures that keep earlier checkpoints, the demo end to end."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import leopart_core as lc
import train

REPO = Path(__file__).resolve().parents[1]
# A tiny synthetic run: 2 steps per epoch at batch 4, 32-px global and 16-px local crops, patch 8.
TINY = ["--dataset", "synthetic", "--num-images", "8", "--image-size", "48", "--global-size", "32",
        "--local-size", "16", "--depth", "1", "--hidden-dim", "32", "--num-prototypes", "12", "--workers", "0",
        "--eval-dataset", "none", "--log-every", "1"]


def run_main(argv):
    args = train.get_args_parser().parse_args(argv)
    return train.main(args)


def student_state(path):
    return {k: v for k, v in torch.load(path, weights_only=True)["model"].items() if k.startswith("student.")}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    # the paper's learning rates: Adam turns float noise in near-zero gradients into steps of size lr
    common = TINY + ["--epochs", "2", "--loss-mask", "all", "--queue-length", "0", "--drop-path", "0",
                     "--lr-backbone", "1e-5", "--lr-heads", "1e-4"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(free_port()), str(REPO / "train.py"), *common, "--batch-size", "2",
                          "--output-dir", str(tmp_path / "ddp")], env=env, capture_output=True, text=True,
                         timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert '"world_size": 2' in ddp.stdout
    single = subprocess.run([sys.executable, str(REPO / "train.py"), *common, "--batch-size", "4",
                             "--output-dir", str(tmp_path / "single")], env=env, capture_output=True, text=True,
                            timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    a, b = student_state(tmp_path / "ddp" / "checkpoint.pth"), student_state(tmp_path / "single" / "checkpoint.pth")
    teacher = {k.replace("teacher.", "student.", 1): v
               for k, v in torch.load(tmp_path / "single" / "checkpoint.pth", weights_only=True)["model"].items()}
    # the teacher started as a copy of the student and follows it by EMA, so they differ iff the student moved
    assert max((b[k] - teacher[k]).abs().max() for k in b if k.startswith("student.backbone.")) > 1e-6
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0, msg=k)


def test_resume_continues_exactly(tmp_path):
    options = TINY + ["--epochs", "2", "--batch-size", "2", "--queue-length", "16"]  # 4 steps per epoch, 8 in all
    straight = run_main(options + ["--output-dir", str(tmp_path / "straight")])
    run_main(options + ["--output-dir", str(tmp_path / "split"), "--stop-at-step", "3"])  # stops mid-epoch
    assert torch.load(tmp_path / "split" / "checkpoint.pth", weights_only=True)["step"] == 3
    resumed = run_main(options + ["--output-dir", str(tmp_path / "split"),
                                  "--resume", str(tmp_path / "split" / "checkpoint.pth")])
    assert resumed.queue.abs().sum() > 0  # the queue took part (it fills after 4 steps)
    for (name, p), q in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), name  # parameters, teacher and queue alike
    assert (tmp_path / "split" / "backbone.pth").exists()


def test_missing_data_root_fails_clearly(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "--dataset", "voc", "--data-root",
                             str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "train.py: error:" in result.stderr and "nowhere" in result.stderr and "Traceback" not in result.stderr


def test_corrupt_checkpoint_fails_clearly_and_loses_nothing(tmp_path):
    out = tmp_path / "run"
    run_main(TINY + ["--epochs", "1", "--batch-size", "4", "--output-dir", str(out)])
    good = (out / "checkpoint.pth").read_bytes()
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(good[: len(good) // 3])
    result = subprocess.run([sys.executable, str(REPO / "train.py"), *TINY, "--epochs", "2", "--output-dir", str(out),
                             "--resume", str(corrupt)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "cannot read checkpoint" in result.stderr and "truncated" in result.stderr
    assert (out / "checkpoint.pth").read_bytes() == good
    # starting again over an existing run without --resume is refused rather than overwriting it
    with pytest.raises(FileExistsError, match="--resume"):
        run_main(TINY + ["--epochs", "1", "--output-dir", str(out)])
    assert (out / "checkpoint.pth").read_bytes() == good


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = []
    real_loss = lc.leopart_loss

    def loss_that_diverges(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) > 3 else loss  # the 4th step, in the second epoch

    monkeypatch.setattr(lc, "leopart_loss", loss_that_diverges)
    out = tmp_path / "run"
    with pytest.raises(train.NonFiniteLoss, match=r"loss is not finite \(nan.*at step 3.*last good checkpoint .*step 2"):
        run_main(TINY + ["--epochs", "2", "--batch-size", "4", "--output-dir", str(out)])
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=True)
    assert checkpoint["step"] == 2 and all(torch.isfinite(v).all() for v in checkpoint["model"].values())
    assert not (out / "backbone.pth").exists()


def test_parameter_groups_follow_spec():
    args = train.get_args_parser().parse_args(TINY)
    train.resolve_defaults(args)
    args.bf16 = False
    model = train.build_model(args, torch.device("cpu"))
    groups = train.param_groups(model, args)
    names = {id(p): n for n, p in model.student.named_parameters()}
    group_names = [{names[id(p)] for p in g["params"]} for g in groups]
    assert "backbone.cls_token" in group_names[0] and "backbone.pos_embed" in group_names[0]
    assert "backbone.norm.weight" in group_names[1] and "backbone.blocks.0.attn.qkv.bias" in group_names[1]
    assert "prototypes.weight" in group_names[2] and "projection_head.0.weight" in group_names[2]
    assert "projection_head.0.bias" in group_names[3]
    assert sum(len(g) for g in group_names) == len(names)
    assert [g["lr"] for g in groups] == [args.lr_backbone] * 2 + [args.lr_heads] * 2


def test_demo_runs_end_to_end_and_compares_with_its_initialisation(tmp_path):
    """The README's first command, shortened: the synthetic set, a small ViT from scratch, the cluster evaluation."""
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "--epochs", "1", "--num-images", "32",
                             "--eval-images", "8", "--output-dir", str(tmp_path)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "initialisation" in result.stdout and "trained" in result.stdout
    assert (tmp_path / "backbone.pth").exists() and (tmp_path / "log.jsonl").exists()
    assert lc.load_backbone(tmp_path / "backbone.pth").patch_size == 8


def test_defaults_are_the_papers_recipe_for_real_data():
    """SPEC 5.1 / 2.2 / 3.3 / 1.1: naming data, arch and weights is all a paper run needs."""
    args = train.get_args_parser().parse_args(["--dataset", "imagenet100", "--data-root", "/data/in100"])
    assert train.resolve_defaults(args) == []  # no demo value leaks into a real run
    expected = dict(arch="vit_small", epochs=50, batch_size=32, lr_backbone=1e-5, lr_heads=1e-4, weight_decay=0.04,
                    weight_decay_end=0.5, momentum_teacher=0.9995, num_prototypes=300, queue_length=8192,
                    global_size=224, local_size=96, num_global=2, num_local=4, hidden_dim=2048, projection_dim=256,
                    jitter_strength=1.0, blur_strength=1.0, loss_mask="fg", fg_mass=0.6, temperature=0.1,
                    epsilon=0.05, sinkhorn_iterations=3, drop_path=0.1, teacher_head_init="independent",
                    roi_size=7, seed=400)
    assert {k: getattr(args, k) for k in expected} == expected
    args.bf16 = False
    assert train.build_model(args, torch.device("cpu")).patch_size == 16
