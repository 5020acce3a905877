"""train.py: DDP equals one process, exact resume, clear failures that keep earlier checkpoints, the demo end to end."""
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import data
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


def launch(argv, processes, tmp_path, how="torchrun", extra_env=None):
    """Start train.py on `processes` processes (torchrun, or SLURM-style: plain processes with only SLURM_* variables
    and a rendezvous address); returns the Popen objects (one for torchrun)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_",
                                                                      "SLURM_"))}
    env.update(OMP_NUM_THREADS="1", **(extra_env or {}))
    if how == "python":
        return [subprocess.Popen([sys.executable, str(REPO / "train.py"), *argv], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)]
    if how == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_port", str(free_port()), str(REPO / "train.py"), *argv]
        return [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    port = str(free_port())
    return [subprocess.Popen([sys.executable, str(REPO / "train.py"), *argv],
                             env=dict(env, SLURM_PROCID=str(r), SLURM_NTASKS=str(processes), SLURM_LOCALID=str(r),
                                      SLURM_JOB_ID="4242", MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(processes)]


def finish(processes, timeout=300):
    """Wait for every process; returns [(returncode, stdout, stderr)]."""
    results = [p.communicate(timeout=timeout) for p in processes]
    return [(p.returncode, out, err) for p, (out, err) in zip(processes, results)]


def run_launched(argv, processes, tmp_path, how="torchrun"):
    results = finish(launch(argv, processes, tmp_path, how))
    for code, out, err in results:
        assert code == 0, err[-3000:]
    return results[0][1]


def test_launchers_and_process_counts_give_the_same_run(tmp_path):
    """The global batch 8 on 1 process (1e-5: float order) and 2 processes; 2 processes under torchrun and under
    SLURM's srun variables alone (bit for bit)."""
    # the paper's learning rates: Adam turns float noise in near-zero gradients into steps of size lr
    common = TINY + ["--num-images", "16", "--epochs", "2", "--batch-size", "8", "--loss-mask", "all",
                     "--queue-length", "0", "--drop-path", "0", "--lr-backbone", "1e-5", "--lr-heads", "1e-4"]
    out = run_launched(common + ["--output-dir", str(tmp_path / "torchrun")], 2, tmp_path)
    assert '"world_size": 2' in out and "global batch 8 = 2 process(es) x 4 images" in out
    out = run_launched(common + ["--output-dir", str(tmp_path / "slurm")], 2, tmp_path, how="slurm")
    assert '"world_size": 2' in out
    run_main(common + ["--output-dir", str(tmp_path / "single")])
    torchrun, slurm, single = (student_state(tmp_path / d / "checkpoint.pth") for d in ("torchrun", "slurm", "single"))
    teacher = {k.replace("teacher.", "student.", 1): v
               for k, v in torch.load(tmp_path / "single" / "checkpoint.pth", weights_only=True)["model"].items()}
    # the teacher started as a copy of the student and follows it by EMA, so they differ iff the student moved
    assert max((single[k] - teacher[k]).abs().max() for k in single if k.startswith("student.backbone.")) > 1e-6
    for k in torchrun:
        assert torch.equal(torchrun[k], slurm[k]), k
        torch.testing.assert_close(torchrun[k], single[k], atol=1e-5, rtol=0, msg=k)


def test_launch_environment_reads_torchrun_and_slurm():
    env = dict(SLURM_PROCID="3", SLURM_NTASKS="8", SLURM_LOCALID="1", SLURM_JOB_ID="123457",
               SLURM_JOB_NODELIST="gpu-a[007-010,012],cpu1")
    assert train.launch_environment(env) == (3, 8, 1, "gpu-a007", train.DEFAULT_MASTER_PORT + 457)
    env.update(MASTER_ADDR="10.0.0.5", MASTER_PORT="23456", SLURM_STEP_NUM_TASKS="4")
    assert train.launch_environment(env) == (3, 4, 1, "10.0.0.5", 23456)
    assert train.launch_environment(dict(SLURM_PROCID="0", SLURM_NTASKS="1")) is None  # a one-task job
    assert train.launch_environment({}) is None
    # torchrun wins over SLURM (torchrun inside an allocation); RANK without LOCAL_RANK leaves the GPU to rank % count
    assert train.launch_environment(dict(env, RANK="5", WORLD_SIZE="6", MASTER_PORT="1")) == (5, 6, None,
                                                                                              "10.0.0.5", 1)
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        train.launch_environment(dict(RANK="0"))
    assert train.first_slurm_host("rack[1-2]-n[01-04]") == "rack1-n01"
    assert train.first_slurm_host("node17") == "node17"


def test_global_batch_must_split_over_processes():
    args = train.get_args_parser().parse_args(TINY + ["--batch-size", "6"])
    train.resolve_defaults(args)
    with pytest.raises(ValueError, match="--batch-size 6 is global and must split evenly over the 4 processes"):
        train.setup_ranks(args, environ=dict(RANK="0", WORLD_SIZE="4"))  # fails before waiting for the others


def queue_rows(queues):
    """The stored (non-zero) rows of per-rank queues [(G, n, d)], per global crop, as sorted lists (a multiset)."""
    queues = torch.stack(list(queues))
    return [sorted(tuple(r) for r in queues[:, g].reshape(-1, queues.shape[-1]).tolist() if any(r))
            for g in range(queues.shape[1])]


def test_split_queues_keeps_every_row_in_push_order():
    G, d = 2, 3
    saved = torch.zeros(2, G, 4, d)  # two ranks, 3 of 4 rows filled each
    saved[:, :, :3] = torch.arange(1, 1 + 2 * G * 3 * d, dtype=torch.float32).view(2, G, 3, d)
    for world_size, rows in ((1, 8), (4, 2), (2, 4)):
        split = train.split_queues(saved, world_size, rows)
        assert split.shape == (world_size, G, rows, d)
        assert queue_rows(split) == queue_rows(saved)
        assert all((split[r, :, :(split[r, 0].abs().sum(1) > 0).sum()].abs().sum(-1) > 0).all()
                   for r in range(world_size))  # filled rows first: the FIFO stays newest first
    one = train.split_queues(saved, 1, 8)[0, 0]
    torch.testing.assert_close(one[:2], torch.stack([saved[0, 0, 0], saved[1, 0, 0]]))  # push order kept


def test_resume_on_another_process_count(tmp_path):
    """A 2-process run stopped part-way continues on 4 processes and on 1, each holding exactly the saved queue
    rows right after the resume, to the end."""
    options = TINY + ["--num-images", "16", "--epochs", "2", "--batch-size", "4", "--queue-length", "32"]  # 8 steps
    run_launched(options + ["--output-dir", str(tmp_path / "two"), "--stop-at-step", "3"], 2, tmp_path)
    saved = torch.load(tmp_path / "two" / "checkpoint.pth", weights_only=True)
    assert saved["step"] == 3 and len(saved["queues"]) == 2 and len(saved["rng"]) == 2
    assert all(q.abs().sum() > 0 for q in saved["queues"])
    for processes in (4, 1):
        resumed_dir = tmp_path / f"on{processes}"
        argv = options + ["--output-dir", str(resumed_dir), "--resume", str(tmp_path / "two" / "checkpoint.pth"),
                          "--stop-at-step", "3"]
        run_launched(argv, processes, tmp_path) if processes > 1 else run_main(argv)
        resumed = torch.load(resumed_dir / "checkpoint.pth", weights_only=True)
        assert len(resumed["queues"]) == processes and resumed["step"] == 3
        assert queue_rows(resumed["queues"]) == queue_rows(saved["queues"])
        for k, v in saved["model"].items():
            assert torch.equal(v, resumed["model"][k]), k
        argv = options + ["--output-dir", str(resumed_dir), "--resume", "auto"]
        run_launched(argv, processes, tmp_path) if processes > 1 else run_main(argv)
        assert torch.load(resumed_dir / "checkpoint.pth", weights_only=True)["step"] == 8
        assert (resumed_dir / "backbone.pth").exists()


@pytest.mark.parametrize("augment_on", ["cpu", "device"])
def test_resume_continues_exactly(tmp_path, augment_on):
    options = TINY + ["--epochs", "2", "--batch-size", "2", "--queue-length", "16",  # 4 steps per epoch, 8 in all
                      "--augment-on", augment_on]
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
    with pytest.raises(train.NonFiniteLoss, match=r"loss is not finite at step 3;.*last good checkpoint .*step 2"):
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
    expected = dict(arch="vit_small", epochs=50, batch_size=64, lr_backbone=1e-5, lr_heads=1e-4, weight_decay=0.04,
                    weight_decay_end=0.5, momentum_teacher=0.9995, num_prototypes=300, queue_length=8192,
                    global_size=224, local_size=96, num_global=2, num_local=4, hidden_dim=2048, projection_dim=256,
                    jitter_strength=1.0, blur_strength=1.0, loss_mask="fg", fg_mass=0.6, temperature=0.1,
                    epsilon=0.05, sinkhorn_iterations=3, drop_path=0.1, teacher_head_init="independent",
                    roi_size=7, seed=400)
    assert {k: getattr(args, k) for k in expected} == expected
    args.bf16 = False
    assert train.build_model(args, torch.device("cpu")).patch_size == 16


def test_voc_defaults_to_the_papers_500_epochs_and_imagenet100_checks_its_size(tmp_path):
    args = train.get_args_parser().parse_args(["--dataset", "voc", "--data-root", "/data/voc"])
    train.resolve_defaults(args)
    assert args.epochs == 500 and args.batch_size == 64
    train_dir = tmp_path / "train"
    for wnid in (REPO / "imagenet100.txt").read_text().split():
        (train_dir / wnid).mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (40, 30)).save(train_dir / wnid / f"{i}.JPEG")
    args = train.get_args_parser().parse_args(TINY + ["--dataset", "imagenet100", "--data-root", str(tmp_path),
                                                      "--batch-size", "1"])
    train.resolve_defaults(args)
    with pytest.warns(UserWarning, match="has 3 training images, not the 126,689"):
        train.build_data(args, train.Ranks())


def test_crops_too_small_for_the_token_grid_fail_naming_the_flag(tmp_path):
    with pytest.raises(ValueError, match=r"--global-size 32 gives a 2x2 token grid with patch size 16; the "
                                         r"foreground loss mask needs .* at least 4x4 tokens.* at least 64"):
        run_main(TINY + ["--patch-size", "16", "--output-dir", str(tmp_path)])
    with pytest.raises(ValueError, match=r"--local-size 20 gives a 2.5x2.5 token grid"):
        run_main(TINY + ["--local-size", "20", "--output-dir", str(tmp_path)])
    assert not tmp_path.joinpath("checkpoint.pth").exists()


def junk_folder(root, count, junk):
    """`count` readable 40x40 photos-to-be and, at sorted position `junk`, a file that is no image."""
    root.mkdir()
    for i in range(count):
        path = root / f"{i:02d}.jpg"
        if i == junk:
            path.write_text("junk")
        else:
            Image.new("RGB", (40, 40), (40 * i, 80, 120)).save(path)
    return root


def log_records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("position", ["last", "first"])
def test_an_unreadable_batch_is_skipped_once_and_the_epoch_ends(tmp_path, position):
    """Batch 1 over 3 images, one of them junk, placed at the epoch's last step (the loop used to re-enter the epoch
    there forever) or first (the last batch used to be trained twice)."""
    order = train.global_batch_indices(3, 0, 400, 1, 0, 1).flatten().tolist()
    root = junk_folder(tmp_path / "imgs", 3, order[-1] if position == "last" else order[0])
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "--dataset", "folder", "--data-root", str(root),
                             "--batch-size", "1", "--epochs", "1", "--arch", "vit_tiny", "--depth", "1",
                             "--eval-dataset", "none", "--workers", "0", "--global-size", "64", "--local-size", "32",
                             "--hidden-dim", "32", "--projection-dim", "16", "--queue-length", "0", "--log-every", "1",
                             "--output-dir", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    records = log_records(out / "log.jsonl")
    assert [r["step"] for r in records if r.get("event") == "skipped_step"] == [2 if position == "last" else 0]
    end = [r for r in records if r.get("event") == "epoch_end"]
    assert len(end) == 1 and end[0]["step"] == 3 and end[0]["skipped_images"] == 1 and end[0]["skipped_steps"] == 1
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=True)
    assert checkpoint["step"] == 3
    assert {int(s["step"]) for s in checkpoint["optimizer"]["state"].values()} == {2}  # two updates, none twice


def test_ranks_skip_together_when_one_rank_cannot_read_its_batch(tmp_path):
    """2 processes, 1 image each per step: the junk image empties one rank's batch at one step; both skip it."""
    root = junk_folder(tmp_path / "imgs", 4, 1)
    argv = ["--dataset", "folder", "--data-root", str(root), "--batch-size", "2", "--epochs", "1", "--arch",
            "vit_tiny", "--depth", "1", "--eval-dataset", "none", "--workers", "0", "--global-size", "64",
            "--local-size", "32", "--hidden-dim", "32", "--projection-dim", "16", "--queue-length", "0",
            "--log-every", "1", "--output-dir", str(tmp_path / "out")]
    run_launched(argv, 2, tmp_path, how="slurm")
    records = log_records(tmp_path / "out" / "log.jsonl")
    skipped = [r for r in records if r.get("event") == "skipped_step"]
    assert len(skipped) == 1 and skipped[0]["ranks_without_images"] == 1  # one rank's batch, both ranks skipped
    end = [r for r in records if r.get("event") == "epoch_end"]
    assert len(end) == 1 and end[0]["step"] == 2 and end[0]["skipped_images"] == 1 and end[0]["skipped_steps"] == 1
    checkpoint = torch.load(tmp_path / "out" / "checkpoint.pth", weights_only=True)
    assert {int(s["step"]) for s in checkpoint["optimizer"]["state"].values()} == {1}


def wait_for_step(process, step):
    """Read the run's stdout until it logs `step`; returns what it printed."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith(f"step {step} "):
            return lines
    raise AssertionError("the run ended before step %d: %s" % (step, "".join(lines)[-2000:]))


LONG = TINY + ["--num-images", "240", "--batch-size", "4", "--epochs", "1", "--queue-length", "16"]  # 60 steps


def test_sigterm_checkpoints_exits_75_and_resumes_bit_for_bit(tmp_path):
    process = launch(LONG + ["--output-dir", str(tmp_path / "run")], 1, tmp_path, how="python")[0]
    wait_for_step(process, 3)
    process.send_signal(signal.SIGTERM)
    code, out, err = finish([process])[0]
    assert code == train.PREEMPTED_EXIT_STATUS, err[-3000:]
    assert "stopped by SIGTERM" in err and "--resume" in err
    stopped_at = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)["step"]
    assert 3 <= stopped_at < 60 and f"after step {stopped_at} " in err
    # the same thread count in every run (OMP_NUM_THREADS=1): float sums may differ between thread counts
    finish(launch(LONG + ["--output-dir", str(tmp_path / "run"), "--resume", "auto"], 1, tmp_path, how="python"))
    finish(launch(LONG + ["--output-dir", str(tmp_path / "straight")], 1, tmp_path, how="python"))
    resumed, straight = (torch.load(tmp_path / d / "checkpoint.pth", weights_only=True) for d in ("run", "straight"))
    assert resumed["step"] == straight["step"] == 60
    for name, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][name]), name
    assert all(torch.equal(a, b) for a, b in zip(straight["queues"], resumed["queues"]))


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    processes = launch(LONG + ["--batch-size", "2", "--output-dir", str(tmp_path / "run")], 2, tmp_path, how="slurm")
    wait_for_step(processes[0], 3)
    processes[1].send_signal(signal.SIGUSR1)
    results = finish(processes)
    assert [code for code, _, _ in results] == [train.PREEMPTED_EXIT_STATUS] * 2, results[0][2][-3000:]
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)
    assert 3 <= checkpoint["step"] < 120 and len(checkpoint["queues"]) == 2
    assert f"after step {checkpoint['step']} " in results[0][2] and "SIGUSR1" in results[1][2]


@pytest.mark.parametrize("augment_on,bf16", [("cpu", False), ("device", False), ("device", True)])
def test_a_training_step_has_no_host_sync(augment_on, bf16):
    """train.py's step as the loop runs it (batch to the device, device augmentation, loss, backward, EMA, fused
    AdamW, in fp32 or under bf16 autocast) with the queue full and the foreground mask on: no host sync outside
    logging steps."""
    from test_sync import count_host_syncs
    args = train.get_args_parser().parse_args(TINY + ["--batch-size", "4", "--queue-length", "16",
                                                      "--augment-on", augment_on])
    train.resolve_defaults(args)
    args.bf16 = bf16
    ranks = train.setup_ranks(args, environ={})
    leopart = train.build_model(args, ranks.device)
    dataset, args.iters_per_epoch, augment, _ = train.build_data(args, ranks)
    model, optimizer = train.wrap_for_training(leopart, args, ranks)
    schedule = dict(lr=[1.0] * 4, wd=[0.04] * 4, momentum=[0.99] * 4)
    health = train.LossHealth(ranks.device)
    batches = [data.multicrop_collate([dataset[(0, i)] for i in range(4 * s, 4 * s + 4)]) for s in range(2)]
    crops, boxes = train.to_device(*batches[0][:3], augment, ranks.device)
    train.train_step(model, leopart, crops, boxes, optimizer, schedule, 0, health)  # fills the queue
    assert leopart.queue_full and leopart.queue[:, -1].any(dim=1).all() and leopart.loss_mask == "fg"
    crops, boxes, photometric = batches[1][:3]  # on CUDA, asynchronous copies from pinned memory, not counted here
    with count_host_syncs() as syncs:  # (on the CPU, where .to(device) would look like a copy to the host)
        if augment is not None:
            crops = augment(crops, photometric)
        loss = train.train_step(model, leopart, crops, boxes, optimizer, schedule, 1, health)
    assert syncs.count == 0, syncs.report()
    assert torch.isfinite(loss)
